//! The fleet lock, held in Proxmox itself: a resource pool `imagectl-lock-<fleet>` whose
//! comment names the holder and when the lock expires.
//!
//! Creating a pool is atomic in PVE (`pool '…' already exists` for the second creator), so two
//! imagectl processes — on one machine or on two CI runners — can never both hold a fleet. A
//! holder that died leaves the pool behind; after its expiry anyone may take it over. The pool
//! stays empty, so it never constrains permissions or VMs. Needs `Pool.Allocate` on `/pool`.

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

/// The pool `id`, or `None` when it does not exist.
pub(super) async fn pool(pve: &PveClient, id: &str) -> Result<Option<Pool>> {
    match pve
        .get::<Vec<Pool>>("/pools", params([("poolid", id)]))
        .await
    {
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

/// The lock in pool `id`: `None` when the pool is gone, `Some(None)` when it is not a lock.
async fn read(pve: &PveClient, id: &str) -> Result<Option<Option<FleetLock>>> {
    Ok(pool(pve, id)
        .await?
        .map(|p| p.comment.as_deref().and_then(parse)))
}

/// Takes the lock of `fleet` for `ttl`; an error naming the holder when someone else has it.
pub async fn lock(pve: &PveClient, fleet: &str, ttl: Duration) -> Result<FleetLock> {
    let id = pool_id(fleet);
    let now = time::OffsetDateTime::now_utc();
    let mine = FleetLock {
        fleet: fleet.into(),
        owner: uuid::Uuid::new_v4().simple().to_string(),
        host: crate::provider::local::state::hostname(),
        pid: std::process::id(),
        acquired_at: now_rfc3339(),
        expires_at: rfc3339(now + ttl),
    };
    for _ in 0..3 {
        let created = pve
            .post::<serde_json::Value>(
                "/pools",
                params([("poolid", id.clone()), ("comment", render(&mine))]),
            )
            .await;
        match created {
            Ok(_) => return Ok(mine),
            Err(e) if e.is_already_exists() => {}
            Err(e) if e.status() == Some(403) => {
                return Err(e).with_context(|| {
                    format!(
                        "taking the fleet lock: creating pool {id} needs Pool.Allocate on /pool"
                    )
                })
            }
            Err(e) => return Err(e).with_context(|| format!("taking the fleet lock (pool {id})")),
        }
        match read(pve, &id).await? {
            // Gone meanwhile: try again.
            None => continue,
            // Our own create went through although its answer was lost.
            Some(Some(h)) if h.owner == mine.owner => return Ok(mine),
            Some(Some(h)) => {
                let expired = parse_rfc3339(&h.expires_at)
                    .is_some_and(|t| t < time::OffsetDateTime::now_utc());
                if !expired {
                    bail!(
                        "fleet {fleet} is locked by {} (pid {}) since {} until {} (pool {id}); \
                         wait for it, or delete the pool if that run is gone",
                        h.host,
                        h.pid,
                        h.acquired_at,
                        h.expires_at
                    );
                }
                tracing::warn!(
                    "taking over the expired lock of fleet {fleet} held by {} (pid {}) since {}",
                    h.host,
                    h.pid,
                    h.acquired_at
                );
                remove(pve, &id).await?;
            }
            Some(None) => bail!(
                "pool {id} exists but is not an imagectl lock; rename or delete it to use fleet {fleet}"
            ),
        }
    }
    bail!("could not take the lock of fleet {fleet} (pool {id} keeps changing hands)")
}

async fn remove(pve: &PveClient, id: &str) -> Result<()> {
    delete_pool(pve, id)
        .await
        .with_context(|| format!("removing the fleet lock (pool {id})"))
}

/// Gives the lock back if `l` still holds it.
pub async fn unlock(pve: &PveClient, l: &FleetLock) -> Result<()> {
    let id = pool_id(&l.fleet);
    match read(pve, &id).await? {
        Some(Some(h)) if h.owner == l.owner => remove(pve, &id).await,
        Some(Some(h)) => {
            tracing::warn!(
                "the lock of fleet {} was taken over by {} (pid {}); leaving it",
                l.fleet,
                h.host,
                h.pid
            );
            Ok(())
        }
        _ => Ok(()),
    }
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
