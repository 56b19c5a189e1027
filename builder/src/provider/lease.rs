//! Fleet locks as leases, written once over where they are kept ([`LeaseStore`]: a PVE resource
//! pool, a lock file). A lease is created atomically (a second creator is refused); a holder that
//! died leaves it behind, and once it has expired anyone may take it over.
//!
//! **Takeover is compare-and-delete on the holder.** Neither store can delete "only if it still
//! names holder H", so a taker first wins a *guard*: the lease `<id>.takeover-<H's owner id>`,
//! created the same atomic way. Only the guard's winner deletes `<id>`, and only after reading it
//! again and finding H. Two takers of one stale lease race for the same guard, so at most one of
//! them deletes; a taker that comes later finds the new holder and deletes nothing. A guard left
//! by a taker that died is itself a stale lease, taken over the same way (a deeper guard).
//!
//! **Renewal.** The holder pushes its expiry forward every quarter of its time to live while it
//! works ([`Renewer`]), so a long rollout never looks stale; it renews only a lease that still
//! names it and has not expired, and stops once it has lost it.

use super::{rfc3339, FleetLock};
use anyhow::{bail, Result};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use time::OffsetDateTime;

/// How long a takeover guard is honoured (a takeover takes a few requests).
pub const GUARD_TTL: Duration = Duration::from_secs(120);

/// Nested takeovers (guards of guards) before giving up.
const MAX_DEPTH: usize = 3;

/// Where leases live.
#[allow(async_fn_in_trait)]
pub trait LeaseStore {
    /// Creates lease `id` naming `l`, atomically; `false` when `id` exists already.
    async fn create(&self, id: &str, l: &FleetLock) -> Result<bool>;
    /// Lease `id`: `None` when it does not exist, `Some(None)` when it is not a lease.
    async fn read(&self, id: &str) -> Result<Option<Option<FleetLock>>>;
    /// Deletes `id`; succeeds when it is gone.
    async fn delete(&self, id: &str) -> Result<()>;
    /// Replaces the lease in `id` with `l` (renewal by its holder).
    async fn replace(&self, id: &str, l: &FleetLock) -> Result<()>;
    /// Whether holder `h` may still be working (not expired; the local store also asks the pid).
    fn live(&self, h: &FleetLock) -> bool;
}

/// The outcome of [`acquire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    /// The lease is ours.
    Mine,
    /// A live holder has it.
    Held(FleetLock),
    /// Its holder expired and `taker` is taking it over right now.
    Busy {
        /// The expired holder.
        holder: FleetLock,
        /// Who is taking it over.
        taker: FleetLock,
    },
    /// `id` exists but is not a lease.
    Foreign,
}

/// The guard a taker must win before it deletes lease `id` of holder `owner`.
pub fn guard_id(id: &str, owner: &str) -> String {
    format!("{id}.takeover-{owner}")
}

/// Takes lease `id` for `mine`, taking over an expired holder (see the module docs).
pub async fn acquire<S: LeaseStore>(store: &S, id: &str, mine: &FleetLock) -> Result<Taken> {
    acquire_at(store, id, mine, 0).await
}

async fn acquire_at<S: LeaseStore>(
    store: &S,
    id: &str,
    mine: &FleetLock,
    depth: usize,
) -> Result<Taken> {
    for _ in 0..4 {
        if store.create(id, mine).await? {
            return Ok(Taken::Mine);
        }
        let held = match store.read(id).await? {
            // Released meanwhile: create again.
            None => continue,
            Some(None) => return Ok(Taken::Foreign),
            Some(Some(h)) => h,
        };
        if held.owner == mine.owner {
            // Our own create went through although its answer was lost.
            return Ok(Taken::Mine);
        }
        if store.live(&held) {
            return Ok(Taken::Held(held));
        }
        if depth >= MAX_DEPTH {
            bail!(
                "{id}: {MAX_DEPTH} takeovers of it stopped half-way; remove it and its \
                 `.takeover-` companions by hand"
            );
        }
        let gid = guard_id(id, &held.owner);
        let now = OffsetDateTime::now_utc();
        let guard = FleetLock {
            acquired_at: rfc3339(now),
            expires_at: rfc3339(now + GUARD_TTL),
            ..mine.clone()
        };
        match Box::pin(acquire_at(store, &gid, &guard, depth + 1)).await? {
            Taken::Mine => {}
            Taken::Held(taker) | Taken::Busy { taker, .. } => {
                return Ok(Taken::Busy {
                    holder: held,
                    taker,
                })
            }
            Taken::Foreign => bail!("{gid} exists but is not an imagectl lock; remove it"),
        }
        tracing::warn!(
            "taking over {id}, held by {} (pid {}) since {}, expired {}",
            held.host,
            held.pid,
            held.acquired_at,
            held.expires_at
        );
        // We hold the guard for displacing `held`: compare, then delete, then create.
        let swapped = async {
            if let Some(Some(cur)) = store.read(id).await? {
                if cur.owner == held.owner {
                    store.delete(id).await?;
                }
            }
            store.create(id, mine).await
        }
        .await;
        if let Err(e) = release(store, &gid, &guard.owner).await {
            tracing::warn!("removing the takeover guard {gid}: {e:#}");
        }
        if swapped? {
            return Ok(Taken::Mine);
        }
        // Someone else created it in between: read it again.
    }
    bail!("{id} keeps changing hands; try again")
}

/// Deletes lease `id` if `owner` still holds it; `true` when it did.
pub async fn release<S: LeaseStore>(store: &S, id: &str, owner: &str) -> Result<bool> {
    match store.read(id).await? {
        Some(Some(h)) if h.owner == owner => {
            store.delete(id).await?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Pushes the expiry of `mine` to now + `ttl` if it still holds `id` and has not expired; the
/// renewed lease, or `None` when it was lost.
pub async fn renew<S: LeaseStore>(
    store: &S,
    id: &str,
    mine: &FleetLock,
    ttl: Duration,
) -> Result<Option<FleetLock>> {
    let expired =
        super::parse_rfc3339(&mine.expires_at).is_none_or(|t| t <= OffsetDateTime::now_utc());
    match store.read(id).await? {
        Some(Some(h)) if h.owner == mine.owner && !expired => {
            let next = FleetLock {
                expires_at: rfc3339(OffsetDateTime::now_utc() + ttl),
                ..mine.clone()
            };
            store.replace(id, &next).await?;
            Ok(Some(next))
        }
        _ => Ok(None),
    }
}

/// How often a holder renews a lease of `ttl`.
pub fn renew_every(ttl: Duration) -> Duration {
    (ttl / 4).max(Duration::from_millis(200))
}

/// Renews `mine` in `store` every [`renew_every`] until aborted or the lease is lost.
pub async fn renew_loop<S: LeaseStore>(store: S, id: String, mut mine: FleetLock, ttl: Duration) {
    loop {
        tokio::time::sleep(renew_every(ttl)).await;
        match renew(&store, &id, &mine, ttl).await {
            Ok(Some(next)) => {
                tracing::debug!("renewed {id} until {}", next.expires_at);
                mine = next;
            }
            Ok(None) => {
                tracing::warn!("the lock {id} is no longer ours; stopped renewing it");
                return;
            }
            // A failed renewal is tried again at the next tick; the lease lasts ttl.
            Err(e) => tracing::warn!("renewing the lock {id}: {e:#}"),
        }
    }
}

/// The renewal tasks of the leases a provider holds, by owner id; all stop when it is dropped.
#[derive(Debug, Default)]
pub struct Renewer {
    tasks: Mutex<HashMap<String, tokio::task::AbortHandle>>,
}

impl Renewer {
    /// Runs `task` (a [`renew_loop`]) for the lease of `owner` (outside a runtime: nothing).
    pub fn start<F>(&self, owner: &str, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let h = rt.spawn(task).abort_handle();
        if let Some(old) = self.lock().insert(owner.to_string(), h) {
            old.abort();
        }
    }

    /// Stops renewing the lease of `owner`.
    pub fn stop(&self, owner: &str) {
        if let Some(h) = self.lock().remove(owner) {
            h.abort();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, tokio::task::AbortHandle>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Renewer {
    fn drop(&mut self) {
        for (_, h) in self.lock().drain() {
            h.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Leases in memory; every call yields, so racing takers interleave.
    #[derive(Default)]
    struct Mem {
        map: Mutex<BTreeMap<String, FleetLock>>,
    }

    impl LeaseStore for Mem {
        async fn create(&self, id: &str, l: &FleetLock) -> Result<bool> {
            tokio::task::yield_now().await;
            let mut m = self.map.lock().unwrap();
            if m.contains_key(id) {
                return Ok(false);
            }
            m.insert(id.into(), l.clone());
            Ok(true)
        }
        async fn read(&self, id: &str) -> Result<Option<Option<FleetLock>>> {
            tokio::task::yield_now().await;
            Ok(self.map.lock().unwrap().get(id).cloned().map(Some))
        }
        async fn delete(&self, id: &str) -> Result<()> {
            tokio::task::yield_now().await;
            self.map.lock().unwrap().remove(id);
            Ok(())
        }
        async fn replace(&self, id: &str, l: &FleetLock) -> Result<()> {
            tokio::task::yield_now().await;
            self.map.lock().unwrap().insert(id.into(), l.clone());
            Ok(())
        }
        fn live(&self, h: &FleetLock) -> bool {
            super::super::parse_rfc3339(&h.expires_at)
                .is_some_and(|t| t > OffsetDateTime::now_utc())
        }
    }

    fn lease(owner: &str, ttl_secs: i64) -> FleetLock {
        let now = OffsetDateTime::now_utc();
        FleetLock {
            fleet: "ci".into(),
            owner: owner.into(),
            host: "h".into(),
            pid: 1,
            acquired_at: rfc3339(now),
            expires_at: rfc3339(now + time::Duration::seconds(ttl_secs)),
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn racing_takers_of_a_stale_lease_never_both_win() {
        for round in 0..50 {
            let store = Mem::default();
            store.create("L", &lease("dead", -5)).await.unwrap();
            let takers: Vec<FleetLock> = (0..4).map(|i| lease(&format!("t{i}"), 60)).collect();
            let results =
                futures_util::future::join_all(takers.iter().map(|t| acquire(&store, "L", t)))
                    .await;
            let winners: Vec<&FleetLock> = takers
                .iter()
                .zip(&results)
                .filter(|(_, r)| matches!(r, Ok(Taken::Mine)))
                .map(|(t, _)| t)
                .collect();
            assert_eq!(winners.len(), 1, "round {round}: {results:?}");
            let m = store.map.lock().unwrap();
            assert_eq!(m.get("L").map(|l| &l.owner), Some(&winners[0].owner));
            assert_eq!(m.len(), 1, "guards left: {:?}", m.keys());
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_guard_left_by_a_dead_taker_is_taken_over_and_renewal_stops_when_lost() {
        let store = Mem::default();
        store.create("L", &lease("dead", -5)).await.unwrap();
        store
            .create(&guard_id("L", "dead"), &lease("deadtaker", -1))
            .await
            .unwrap();
        let me = lease("me", 60);
        assert_eq!(acquire(&store, "L", &me).await.unwrap(), Taken::Mine);
        assert_eq!(store.map.lock().unwrap().len(), 1);
        // A live holder is not taken over; a live guard means "busy".
        let other = lease("other", 60);
        assert!(
            matches!(acquire(&store, "L", &other).await.unwrap(), Taken::Held(h) if h.owner == "me")
        );
        // Renewal moves the expiry; a lost lease is not renewed.
        let renewed = renew(&store, "L", &me, Duration::from_secs(3600))
            .await
            .unwrap()
            .unwrap();
        assert!(renewed.expires_at > me.expires_at);
        assert_eq!(
            renew(&store, "L", &other, Duration::from_secs(60))
                .await
                .unwrap(),
            None
        );
        assert!(release(&store, "L", "me").await.unwrap());
        assert!(store.map.lock().unwrap().is_empty());
    }
}
