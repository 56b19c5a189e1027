//! VM ids for clones. PVE reserves none: pve-manager `PVE/API2/Cluster.pm` (`nextid`) answers the
//! lowest id missing from the cluster's VM list, and a clone enters that list only when its worker
//! writes the config file, after `POST …/clone` has returned (qemu-server `PVE/API2/Qemu.pm`,
//! `clone_vm`: `$clonefn` writes "# qmclone temporary file" inside the forked worker). Parallel
//! clones are therefore handed the same id. So:
//!
//! * ids are claimed within the process ([`VmIds::claim`]): an id stays claimed until its clone
//!   task has ended, and no two clones of one run get the same id;
//! * each candidate is checked with `GET /cluster/nextid?vmid=N` (same file and method: a
//!   parameter error "VM N already exists" when the list holds it);
//! * a clone that fails because the id was taken after all ([`id_taken`]) is retried with another
//!   id after a backoff.

use crate::config::VmidRange;
use crate::remote::pve::{PveClient, PveError};
use anyhow::{anyhow, Context, Result};
use std::collections::HashSet;
use std::sync::Mutex;

/// Candidates checked with PVE per claim before giving up.
const MAX_CHECKS: u32 = 256;

/// The largest VM id PVE accepts (pve-common `PVE/JSONSchema.pm`, `pve-vmid`: 100–999999999).
const VMID_MAX: u32 = 999_999_999;

/// The VM ids this process is cloning to.
#[derive(Debug, Default)]
pub struct VmIds {
    claimed: Mutex<HashSet<u32>>,
}

impl VmIds {
    /// Claims an id that no guest holds and no other clone of this process uses: the lowest such
    /// id of `range`, else from `/cluster/nextid` upwards. `tried` are ids to skip (taken after
    /// all). Give it back with [`VmIds::release`] once the clone task has ended.
    pub async fn claim(
        &self,
        pve: &PveClient,
        range: Option<VmidRange>,
        tried: &HashSet<u32>,
    ) -> Result<u32> {
        let (first, last, mut known) = match range {
            Some(r) => {
                // One listing saves a check per id that is visibly taken.
                let taken: HashSet<u32> = pve
                    .guests()
                    .await
                    .context("listing the cluster's VM ids")?
                    .iter()
                    .map(|g| g.vmid)
                    .collect();
                (r.first, r.last, taken)
            }
            None => {
                let next = pve
                    .next_id()
                    .await
                    .context("asking PVE for the next free VM id")?;
                (next, VMID_MAX, HashSet::new())
            }
        };
        let mut checks = 0;
        for id in first..=last {
            if known.contains(&id) || tried.contains(&id) || self.is_claimed(id) {
                continue;
            }
            if checks == MAX_CHECKS {
                break;
            }
            checks += 1;
            let free = pve
                .vmid_free(id)
                .await
                .with_context(|| format!("checking whether VM id {id} is free"))?;
            if !free {
                known.insert(id);
                continue;
            }
            if self.lock().insert(id) {
                return Ok(id);
            }
        }
        Err(match range {
            Some(r) => anyhow!(
                "no free VM id left in {}-{} (vmid_range; ids in use by this run: {})",
                r.first,
                r.last,
                self.lock().len()
            ),
            None => anyhow!("no free VM id found from {first} after checking {checks} candidates"),
        })
    }

    /// Gives a claimed id back (its clone task has ended).
    pub fn release(&self, id: u32) {
        self.lock().remove(&id);
    }

    fn is_claimed(&self, id: u32) -> bool {
        self.lock().contains(&id)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<u32>> {
        self.claimed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// True when a clone to `vmid` failed because another guest holds or is taking that id:
/// * "unable to create VM N: config file already exists" — qemu-server `PVE/API2/Qemu.pm`
///   (`clone_vm`, `$load_and_check`), from the request or again from the worker;
/// * "close (rename) atomic file '…/qemu-server/N.conf' failed: File exists" — the id exists on
///   another node: the worker's `file_set_contents` (pve-common `PVE/File.pm`) is refused by
///   pmxcfs (pve-cluster `src/pmxcfs/memdb.c`, `memdb_rename`: `vmlist_different_vm_exists`);
/// * "can't lock file '/var/lock/qemu-server/lock-N.conf' - got timeout" — another worker holds
///   the new id's config lock (`clone_vm`: `lock_config_full($newid, 1, …)`).
pub fn id_taken(e: &PveError, vmid: u32) -> bool {
    let Some(m) = e.message() else { return false };
    let conf = format!("/{vmid}.conf");
    // A clone writes one config file, the new id's: whatever id the message names, it is that.
    e.is_already_exists()
        || (m.contains("File exists") && m.contains(&conf))
        || (e.is_lock_timeout() && m.contains(&format!("lock-{vmid}.conf")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn err(status: u16, m: &str) -> PveError {
        PveError::api("POST", "/clone", status, m.into(), BTreeMap::new())
    }

    #[test]
    fn taken_ids_are_recognised_in_every_wording() {
        assert!(id_taken(
            &err(500, "unable to create VM 105: config file already exists"),
            105
        ));
        let task = PveError::Task {
            node: "pve1".into(),
            upid: "UPID:pve1:1:1:1:qmclone:100:x:".into(),
            exitstatus: "close (rename) atomic file '/etc/pve/nodes/pve1/qemu-server/105.conf' \
                         failed: File exists"
                .into(),
            log: Vec::new(),
        };
        assert!(id_taken(&task, 105));
        assert!(!id_taken(&task, 106));
        assert!(id_taken(
            &err(
                500,
                "can't lock file '/var/lock/qemu-server/lock-105.conf' - got timeout"
            ),
            105
        ));
        // The template's lock, or another failure, is not about the id.
        assert!(!id_taken(
            &err(
                500,
                "can't lock file '/var/lock/qemu-server/lock-100.conf' - got timeout"
            ),
            105
        ));
        assert!(!id_taken(&err(500, "clone failed: out of space"), 105));
    }

    #[test]
    fn claims_are_exclusive_until_released() {
        let ids = VmIds::default();
        assert!(ids.lock().insert(7));
        assert!(ids.is_claimed(7));
        assert!(!ids.lock().insert(7));
        ids.release(7);
        assert!(!ids.is_claimed(7));
    }
}
