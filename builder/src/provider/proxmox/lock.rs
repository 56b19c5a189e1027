//! The fleet lock, held in Proxmox itself: a resource pool `imagectl-lock-<fleet>` whose
//! comment names the holder and when the lock expires.
//!
//! Creating a pool is atomic in PVE (`pool '…' already exists` for the second creator), so two
//! imagectl processes — on one machine or on two CI runners — can never both hold a fleet. A
//! holder that died leaves the pool behind; after its expiry anyone may take it over, through a
//! takeover guard pool `imagectl-lock-<fleet>.takeover-<holder>` so that two takers never both
//! win ([`lease`]). The holder renews the expiry while it works (`PUT /pools` comment). The pool
//! stays empty, so it never constrains permissions or VMs. Needs `Pool.Allocate` on `/pool`.

use crate::provider::lease::{self, LeaseStore, Taken};
use crate::provider::{now_rfc3339, parse_rfc3339, rfc3339, FleetLock};
use crate::remote::pve::{params, PveClient, PveError};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::time::Duration;

/// The pool that is the lock of `fleet`.
pub fn pool_id(fleet: &str) -> String {
    format!("imagectl-lock-{fleet}")
}

/// The pool comment for a lock.
pub fn render(l: &FleetLock) -> String {
    format!(
        "imagectl fleet lock; fleet={}; owner={}; host={}; pid={}; acquired={}; expires={}",
        l.fleet, l.owner, l.host, l.pid, l.acquired_at, l.expires_at
    )
}

/// Reads a pool comment back (`None` when it is not a lock comment).
pub fn parse(comment: &str) -> Option<FleetLock> {
    let get = |k: &str| {
        comment
            .split("; ")
            .find_map(|p| p.strip_prefix(&format!("{k}=")))
            .map(str::to_string)
    };
    Some(FleetLock {
        fleet: get("fleet")?,
        owner: get("owner")?,
        host: get("host")?,
        pid: get("pid")?.parse().ok()?,
        acquired_at: get("acquired")?,
        expires_at: get("expires")?,
    })
}

/// A resource pool as `GET /pools?poolid=` describes it.
#[derive(Deserialize)]
pub(super) struct Pool {
    /// Its comment.
    #[serde(default)]
    pub comment: Option<String>,
    /// VMs and storages in it.
    #[serde(default)]
    pub members: Vec<serde_json::Value>,
}

/// The pool `id`, or `None` when it does not exist. PVE answers a missing pool with HTTP 500
/// "pool '…' does not exist" (pve-manager `PVE/API2/Pool.pm`, `index`), which the client would
/// retry as a failed read: ask once first, and retry only what is not that answer.
pub(super) async fn pool(pve: &PveClient, id: &str) -> Result<Option<Pool>> {
    let first = pve
        .get_once::<Vec<Pool>>("/pools", params([("poolid", id)]))
        .await;
    let answer = match first {
        Err(e) if !e.is_not_found() => {
            pve.get::<Vec<Pool>>("/pools", params([("poolid", id)]))
                .await
        }
        other => other,
    };
    match answer {
        Ok(p) => Ok(p.into_iter().next()),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading pool {id}")),
    }
}

/// Deletes the pool `id`; succeeds when it is already gone.
pub(super) async fn delete_pool(pve: &PveClient, id: &str) -> Result<(), PveError> {
    match pve
        .delete::<serde_json::Value>("/pools", params([("poolid", id)]))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Leases kept as resource pools: the comment names the holder and its expiry.
///
/// A create is atomic: pve-manager `PVE/API2/Pool.pm` (`create_pool`) checks "pool '…' already
/// exists" and writes `user.cfg` inside `lock_user_config` (pve-access-control
/// `src/PVE/AccessControl.pm`). Nothing in PVE deletes or updates a pool only if its comment is
/// unchanged (`update_pool` and `delete_pool` take no digest), hence [`lease`]'s takeover guards.
#[derive(Clone)]
pub struct PoolStore {
    pve: PveClient,
}

impl PoolStore {
    /// Leases in the pools of `pve`.
    pub fn new(pve: &PveClient) -> Self {
        Self { pve: pve.clone() }
    }
}

impl LeaseStore for PoolStore {
    async fn create(&self, id: &str, l: &FleetLock) -> Result<bool> {
        let created = self
            .pve
            .post::<serde_json::Value>(
                "/pools",
                params([("poolid", id.to_string()), ("comment", render(l))]),
            )
            .await;
        match created {
            Ok(_) => Ok(true),
            Err(e) if e.is_already_exists() => Ok(false),
            Err(e) if e.status() == Some(403) => Err(e).with_context(|| {
                format!("taking the fleet lock: creating pool {id} needs Pool.Allocate on /pool")
            }),
            Err(e) => Err(e).with_context(|| format!("taking the fleet lock (pool {id})")),
        }
    }

    async fn read(&self, id: &str) -> Result<Option<Option<FleetLock>>> {
        Ok(pool(&self.pve, id)
            .await?
            .map(|p| p.comment.as_deref().and_then(parse)))
    }

    async fn delete(&self, id: &str) -> Result<()> {
        delete_pool(&self.pve, id)
            .await
            .with_context(|| format!("removing the fleet lock (pool {id})"))
    }

    async fn replace(&self, id: &str, l: &FleetLock) -> Result<()> {
        self.pve
            .put::<serde_json::Value>(
                "/pools",
                params([("poolid", id.to_string()), ("comment", render(l))]),
            )
            .await
            .with_context(|| format!("renewing the fleet lock (pool {id})"))?;
        Ok(())
    }

    fn live(&self, h: &FleetLock) -> bool {
        parse_rfc3339(&h.expires_at).is_some_and(|t| t > time::OffsetDateTime::now_utc())
    }
}

/// A new lease of `fleet` for this process, valid for `ttl`.
pub fn new_lease(fleet: &str, ttl: Duration) -> FleetLock {
    let now = time::OffsetDateTime::now_utc();
    FleetLock {
        fleet: fleet.into(),
        owner: uuid::Uuid::new_v4().simple().to_string(),
        host: crate::provider::local::state::hostname(),
        pid: std::process::id(),
        acquired_at: now_rfc3339(),
        expires_at: rfc3339(now + ttl),
    }
}

/// Takes the lock of `fleet` for `ttl`; an error naming the holder when someone else has it.
/// Renewing it is the caller's ([`lease::renew_loop`] over a [`PoolStore`]).
pub async fn lock(pve: &PveClient, fleet: &str, ttl: Duration) -> Result<FleetLock> {
    let id = pool_id(fleet);
    let mine = new_lease(fleet, ttl);
    match lease::acquire(&PoolStore::new(pve), &id, &mine).await? {
        Taken::Mine => Ok(mine),
        Taken::Held(h) => bail!(
            "fleet {fleet} is locked by {} (pid {}) since {} until {} (pool {id}); \
             wait for it, or delete the pool if that run is gone",
            h.host,
            h.pid,
            h.acquired_at,
            h.expires_at
        ),
        Taken::Busy { holder, taker } => bail!(
            "fleet {fleet} is locked: the expired lock of {} (pid {}) is being taken over by {} \
             (pid {}) right now (pool {id}); try again",
            holder.host,
            holder.pid,
            taker.host,
            taker.pid
        ),
        Taken::Foreign => bail!(
            "pool {id} exists but is not an imagectl lock; rename or delete it to use fleet {fleet}"
        ),
    }
}

/// Gives the lock back if `l` still holds it.
pub async fn unlock(pve: &PveClient, l: &FleetLock) -> Result<()> {
    let id = pool_id(&l.fleet);
    let store = PoolStore::new(pve);
    if !lease::release(&store, &id, &l.owner).await? {
        if let Some(Some(h)) = store.read(&id).await? {
            tracing::warn!(
                "the lock of fleet {} was taken over by {} (pid {}); leaving it",
                l.fleet,
                h.host,
                h.pid
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comment_round_trips() {
        let l = FleetLock {
            fleet: "ci".into(),
            owner: "0a1b2c3d".into(),
            host: "runner-7".into(),
            pid: 4242,
            acquired_at: "2025-01-01T00:00:00Z".into(),
            expires_at: "2025-01-01T04:00:00Z".into(),
        };
        assert_eq!(parse(&render(&l)), Some(l));
        assert_eq!(parse("shared VMs of team A"), None);
        assert_eq!(pool_id("ci"), "imagectl-lock-ci");
    }
}
