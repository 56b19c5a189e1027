//! Cloning a fleet VM from its template (VM ids from [`super::vmids`], retried with backoff when
//! taken; half-made clean-up) and the fleet's resource pool.

use super::{facts, lock, vmids, ProxmoxProvider};
use crate::provider::CreateVm;
use crate::remote::pve::params;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashSet;

/// Clone attempts per VM when ids turn out taken (each after a longer backoff).
const ID_ATTEMPTS: u32 = 10;

impl ProxmoxProvider {
    /// The pool of `fleet`'s VMs.
    fn pool_of(&self, fleet: &str) -> String {
        self.opts
            .pool
            .clone()
            .unwrap_or_else(|| format!("imagectl-{fleet}"))
    }

    /// Creates the fleet's pool unless it exists. Reads first: pve-manager `PVE/API2/Pool.pm`
    /// (`create_pool`) checks `Pool.Allocate` on `/pool/{poolid}` before it looks whether the pool
    /// exists, so a POST for a `--pool` an administrator made fails with 403 for a token that may
    /// only use it. `GET /pools?poolid=` (`index`) refuses nobody (`check(…, 1)` = noerr).
    async fn ensure_pool(&self, fleet: &str) -> Result<()> {
        let id = self.pool_of(fleet);
        if lock::pool(&self.pve, &id).await?.is_some() {
            return Ok(());
        }
        let r = self
            .pve
            .post::<serde_json::Value>(
                "/pools",
                params([
                    ("poolid", id.clone()),
                    ("comment", format!("imagectl runner VMs of fleet {fleet}")),
                ]),
            )
            .await;
        match r {
            Ok(_) => Ok(()),
            // Made by another run meanwhile.
            Err(e) if e.is_already_exists() => Ok(()),
            Err(e) if e.status() == Some(403) => Err(e).with_context(|| {
                format!(
                    "pool {id} of fleet {fleet} does not exist, and creating it needs Pool.Allocate \
                     on /pool/{id}; create it (pveum pool add {id}) or name an existing one \
                     with --pool"
                )
            }),
            Err(e) => Err(e).with_context(|| format!("creating the pool {id} of fleet {fleet}")),
        }
    }

    /// Removes the fleet's own pool (not a `--pool`) once no VM is in it.
    pub(super) async fn remove_pool_if_empty(&self, fleet: &str) -> Result<()> {
        if self.opts.pool.is_some() {
            return Ok(());
        }
        let id = self.pool_of(fleet);
        let empty = lock::pool(&self.pve, &id)
            .await?
            .is_some_and(|p| p.members.is_empty());
        if empty {
            match lock::delete_pool(&self.pve, &id).await {
                Ok(()) => {}
                // A VM joined meanwhile.
                Err(e) if e.message().is_some_and(|m| m.contains("not empty")) => {}
                Err(e) => return Err(e).with_context(|| format!("removing the empty pool {id}")),
            }
        }
        Ok(())
    }

    pub(super) async fn clone_vm(&self, req: &CreateVm) -> Result<(u32, String, u32)> {
        self.ensure_pool(&req.fleet).await?;
        let locs = facts::parse_locations(&req.image.location);
        let first = locs
            .first()
            .cloned()
            .ok_or_else(|| anyhow!("image {} has no template", req.image.version))?;
        let node = req.node.clone().unwrap_or_else(|| first.0.clone());
        let (tnode, tvmid) = locs
            .iter()
            .find(|(n, _)| *n == node)
            .cloned()
            .unwrap_or(first);
        let mut tried = HashSet::new();
        for attempt in 0..ID_ATTEMPTS {
            let vmid = self
                .vmids
                .claim(&self.pve, self.opts.vmid_range, &tried)
                .await?;
            let mut form = vec![
                ("newid".to_string(), vmid.to_string()),
                ("name".to_string(), req.name.clone()),
                ("full".to_string(), u8::from(req.full_clone).to_string()),
            ];
            if node != tnode {
                form.push(("target".into(), node.clone()));
            }
            form.push(("pool".into(), self.pool_of(&req.fleet)));
            if let (true, Some(s)) = (req.full_clone, &self.opts.full_storage) {
                form.push(("storage".into(), s.clone()));
            }
            let path = format!("{}/clone", Self::qemu(&tnode, &tvmid.to_string()));
            // The id stays claimed until the task has ended: by then PVE lists the VM.
            let r = self.pve.run_task(&path, form).await;
            self.vmids.release(vmid);
            match r {
                Ok(_) => return Ok((vmid, node, tvmid)),
                Err(e) if vmids::id_taken(&e, vmid) => {
                    tried.insert(vmid);
                    let delay = self.pve.backoff(attempt);
                    tracing::info!(
                        "VM id {vmid} was taken meanwhile ({}); trying another in {:.1}s",
                        e.message().unwrap_or_default(),
                        delay.as_secs_f64()
                    );
                    tokio::time::sleep(delay).await;
                }
                Err(e) => {
                    // A failed clone task may leave a half-made VM (PVE usually removes it).
                    if let Ok(Some((n, _))) = self.find(&vmid.to_string(), &req.name).await {
                        if let Err(d) = self.pve.destroy_vm(&n, vmid).await {
                            tracing::warn!("removing the half-made VM {vmid}: {d}");
                        }
                    }
                    return Err(e).with_context(|| {
                        format!("cloning template {tvmid} on {tnode} to VM {vmid} on {node}")
                    });
                }
            }
        }
        bail!(
            "could not find a free VM id for {}: {ID_ATTEMPTS} ids were taken by other clones \
             meanwhile (tried {tried:?}); set a vmid_range that only imagectl uses",
            req.name
        )
    }
}
