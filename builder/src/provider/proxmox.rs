//! The Proxmox VE provider: runner VMs are clones of the templates `imagectl publish` made.
//!
//! * **Images** are the ready templates (`imagectl images`); one version may exist on several
//!   nodes (local storage, `publish --all-nodes`) — then VMs are placed only on those nodes — or
//!   once on shared storage, which every node can clone from (`target`).
//! * **Create**: `POST …/clone` (linked; `full=1` with `--full`) with a VM id claimed in the
//!   process and checked with PVE ([`vmids`]), another one after a backoff when it turns out
//!   taken; then tags
//!   (`imagectl;fleet-<name>;image-<version>`), notes (fleet, runner id, image sha256, created)
//!   and sizing. Lock timeouts are retried by the client.
//! * **Seed**: uploaded with `content=iso` to the seed storage (default `local`) of the VM's
//!   node as `imagectl-seed-<vm>.iso` (checksum verified by PVE), attached as `ide2` cdrom
//!   (templates are i440fx, whose IDE Debian's cloud kernel drives), detached and deleted once
//!   the runner is online.
//! * **Status**: the agent's `status.json` read through the QEMU guest agent (`file-read`).
//! * **Pool**: the VMs of a fleet join the resource pool `imagectl-<fleet>` (or `--pool`), made on
//!   first use (read first: an existing pool needs no `Pool.Allocate`) and removed once empty,
//!   so permissions can be scoped to `/pool/…`.
//! * **Lock**: a second, empty pool per fleet while a command changes it ([`lock`]).

mod clone;
pub mod facts;
pub mod lock;
pub mod vmids;

use super::{
    CreateVm, Endpoint, FleetLock, ImageInfo, NodeInfo, Provider, SeedRef, VmInfo, VmState,
};
use crate::config::VmidRange;
use crate::publish::list_images;
use crate::remote::pve::{params, seg, PveClient, PveError};
use anyhow::{anyhow, Context, Result};
use facts::VmFacts;
use futures_util::stream::{self, StreamExt};
use imagectl_proto::{AgentStatus, STATUS_PATH};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// Settings of the Proxmox provider.
#[derive(Debug, Clone)]
pub struct ProxmoxOptions {
    /// File storage with `iso` content for the seeds (default `local`).
    pub seed_storage: String,
    /// Resource pool the VMs join (default `imagectl-<fleet>`).
    pub pool: Option<String>,
    /// Storage of full clones (default: the template's).
    pub full_storage: Option<String>,
    /// VM ids imagectl may allocate.
    pub vmid_range: Option<VmidRange>,
    /// Only templates of this image name.
    pub image_name: Option<String>,
}

/// Runner VMs on a Proxmox VE cluster.
pub struct ProxmoxProvider {
    pve: PveClient,
    opts: ProxmoxOptions,
    /// VM ids this process is cloning to (two clones of one run never race for one id).
    vmids: vmids::VmIds,
    /// Renews the fleet locks this provider holds.
    renewer: super::lease::Renewer,
}

#[derive(Deserialize)]
struct FileRead {
    #[serde(default)]
    content: String,
}

impl ProxmoxProvider {
    /// A provider over a PVE client.
    pub fn new(pve: PveClient, opts: ProxmoxOptions) -> Self {
        Self {
            pve,
            opts,
            vmids: Default::default(),
            renewer: Default::default(),
        }
    }

    /// The PVE client.
    pub fn client(&self) -> &PveClient {
        &self.pve
    }

    fn qemu(node: &str, vmid: &str) -> String {
        format!("/nodes/{}/qemu/{}", seg(node), seg(vmid))
    }

    fn seed_volid(&self, vm: &str) -> String {
        format!(
            "{}:iso/{}",
            self.opts.seed_storage,
            facts::seed_filename(vm)
        )
    }

    /// The VM with this id, if it exists and is the one named `name` (ids are reused by PVE).
    async fn find(&self, vmid: &str, name: &str) -> Result<Option<(String, String)>> {
        let guests = self
            .pve
            .guests()
            .await
            .context("listing the cluster's VMs")?;
        Ok(guests
            .into_iter()
            .find(|g| g.vmid.to_string() == vmid && g.kind == "qemu")
            .filter(|g| g.name.as_deref() == Some(name))
            .map(|g| (g.node, g.status.unwrap_or_default())))
    }

    async fn template_storage_shared(&self, node: &str, storage: Option<&str>) -> bool {
        let Some(storage) = storage else { return false };
        match self.pve.storages(node).await {
            Ok(list) => list.iter().any(|s| s.storage == storage && s.shared),
            Err(e) => {
                tracing::warn!("reading the storages of {node}: {e}");
                false
            }
        }
    }
}

impl Provider for ProxmoxProvider {
    fn kind(&self) -> &'static str {
        "proxmox"
    }

    fn scope(&self) -> String {
        format!("proxmox:{}", self.pve.options().endpoint)
    }

    fn guest_gitlab_url(&self, url: &str) -> String {
        url.to_string()
    }

    fn parallel_waits(&self) -> bool {
        true
    }

    async fn images(&self) -> Result<Vec<ImageInfo>> {
        let listing = list_images(&self.pve).await?;
        let mut by_version: BTreeMap<(String, String), Vec<&crate::publish::ImageRow>> =
            BTreeMap::new();
        for r in listing.images.iter().filter(|r| r.state == "ready") {
            if self.opts.image_name.as_ref().is_some_and(|n| *n != r.name) {
                continue;
            }
            by_version
                .entry((r.name.clone(), r.version.clone()))
                .or_default()
                .push(r);
        }
        let mut out = Vec::new();
        for ((name, version), rows) in by_version {
            let mut shared = None;
            for r in &rows {
                if self
                    .template_storage_shared(&r.node, r.storage.as_deref())
                    .await
                {
                    shared = Some(*r);
                    break;
                }
            }
            let mut locs: Vec<(String, u32)> =
                rows.iter().map(|r| (r.node.clone(), r.vmid)).collect();
            let nodes = match shared {
                Some(s) => {
                    locs.retain(|l| l.1 != s.vmid);
                    locs.insert(0, (s.node.clone(), s.vmid));
                    Vec::new()
                }
                None => rows.iter().map(|r| r.node.clone()).collect(),
            };
            out.push(ImageInfo {
                name,
                version,
                sha256: rows[0].sha256.clone(),
                built_at: rows[0].built_at.clone().unwrap_or_default(),
                location: facts::render_locations(&locs),
                nodes,
            });
        }
        out.sort_by(|a, b| (&a.built_at, &a.version).cmp(&(&b.built_at, &b.version)));
        Ok(out)
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>> {
        let nodes = self.pve.nodes().await.context("listing the PVE nodes")?;
        Ok(nodes
            .into_iter()
            .map(|n| NodeInfo {
                online: n.online(),
                free_memory_mib: n.maxmem.unwrap_or(0).saturating_sub(n.mem.unwrap_or(0))
                    / (1 << 20),
                name: n.node,
            })
            .collect())
    }

    async fn list(&self, fleet: Option<&str>) -> Result<Vec<VmInfo>> {
        let guests = self
            .pve
            .guests()
            .await
            .context("listing the cluster's VMs")?;
        let ours: Vec<_> = guests
            .into_iter()
            .filter(|g| g.kind == "qemu" && !g.template && g.has_tag(facts::OUR_TAG))
            .filter(|g| {
                g.tag_list()
                    .iter()
                    .any(|t| match (facts::fleet_of_tag(t), fleet) {
                        (Some(f), Some(want)) => f == crate::publish::tag_value(want),
                        (Some(_), None) => true,
                        _ => false,
                    })
            })
            .collect();
        let seed_prefix = format!("{}:iso/imagectl-seed-", self.opts.seed_storage);
        let read: Vec<Result<Option<VmInfo>>> = stream::iter(ours)
            .map(|g| {
                let seed_prefix = seed_prefix.clone();
                async move {
                    let cfg = self
                        .pve
                        .vm_config(&g.node, g.vmid)
                        .await
                        .with_context(|| format!("reading the config of VM {}", g.vmid))?;
                    let Some(f) = VmFacts::parse(cfg.get("description").map_or("", String::as_str))
                    else {
                        tracing::warn!("VM {} has imagectl tags but no imagectl notes", g.vmid);
                        return Ok(None);
                    };
                    if fleet.is_some_and(|want| want != f.fleet) {
                        return Ok(None);
                    }
                    let state = match g.status.as_deref() {
                        Some("running") => VmState::Running,
                        _ => VmState::Stopped,
                    };
                    let seed = cfg.get("ide2").is_some_and(|v| v.starts_with(&seed_prefix));
                    Ok(Some(f.info(g.vmid, &g.node, state, seed)))
                }
            })
            .buffer_unordered(8)
            .collect()
            .await;
        let mut out = Vec::new();
        for r in read {
            if let Some(v) = r? {
                out.push(v);
            }
        }
        out.sort_by(|a, b| (&a.created_at, &a.name).cmp(&(&b.created_at, &b.name)));
        Ok(out)
    }

    async fn create(&self, req: &CreateVm) -> Result<VmInfo> {
        let (vmid, node, from) = self.clone_vm(req).await?;
        let f = VmFacts::new(&req.fleet, &req.name, &req.image, req.runner_id, from);
        let set = self
            .pve
            .put::<serde_json::Value>(
                &format!("{}/config", Self::qemu(&node, &vmid.to_string())),
                params([
                    ("tags", facts::tags(&req.fleet, &req.image.version)),
                    ("description", f.render()),
                    ("memory", req.memory_mib.to_string()),
                    ("cores", req.cpus.to_string()),
                ]),
            )
            .await;
        let info = f.info(vmid, &node, VmState::Stopped, false);
        if let Err(e) = set {
            if let Err(d) = self.destroy(&info).await {
                tracing::warn!("removing VM {vmid} after a failed configuration: {d:#}");
            }
            return Err(e).with_context(|| format!("configuring VM {vmid} on {node}"));
        }
        Ok(info)
    }

    async fn attach_seed(&self, vm: &VmInfo, iso: &Path) -> Result<()> {
        let file = facts::seed_filename(&vm.name);
        let sha = crate::util::sha256_file(iso)?;
        let upid = self
            .pve
            .upload_iso(&vm.node, &self.opts.seed_storage, &file, iso, &sha)
            .await
            .with_context(|| {
                format!(
                    "uploading the seed to {} on {}",
                    self.opts.seed_storage, vm.node
                )
            })?;
        self.pve
            .wait_task(&upid, self.pve.options().task_timeout)
            .await
            .context("storing the seed")?;
        self.pve
            .put::<serde_json::Value>(
                &format!("{}/config", Self::qemu(&vm.node, &vm.id)),
                params([("ide2", format!("{},media=cdrom", self.seed_volid(&vm.name)))]),
            )
            .await
            .with_context(|| format!("attaching the seed to VM {}", vm.id))?;
        Ok(())
    }

    async fn start(&self, vm: &VmInfo) -> Result<()> {
        self.pve
            .run_task(
                &format!("{}/status/start", Self::qemu(&vm.node, &vm.id)),
                Vec::new(),
            )
            .await
            .with_context(|| format!("starting VM {} on {}", vm.id, vm.node))?;
        Ok(())
    }

    async fn agent_status(&self, vm: &VmInfo) -> Result<Option<AgentStatus>> {
        let r: Result<FileRead, PveError> = self
            .pve
            .get_once(
                &format!("{}/agent/file-read", Self::qemu(&vm.node, &vm.id)),
                params([("file", STATUS_PATH)]),
            )
            .await;
        match r {
            Ok(f) if f.content.trim().is_empty() => Ok(None),
            Ok(f) => match serde_json::from_str(&f.content) {
                Ok(s) => Ok(Some(s)),
                Err(e) => {
                    tracing::debug!("status.json of VM {} is not readable yet: {e}", vm.id);
                    Ok(None)
                }
            },
            // "QEMU guest agent is not running", "guest-file-open … No such file", a guest-agent
            // timeout: not there yet. A VM that is gone is an error.
            Err(e) if e.status().is_some_and(|s| s >= 500) && !e.is_not_found() => {
                tracing::debug!("guest agent of VM {}: {e}", vm.id);
                Ok(None)
            }
            Err(e) => Err(e).with_context(|| format!("reading the agent status of VM {}", vm.id)),
        }
    }

    async fn detach_seed(&self, vm: &VmInfo) -> Result<()> {
        let cfg = match self
            .pve
            .vm_config(&vm.node, vm.id.parse().unwrap_or(0))
            .await
        {
            Ok(c) => c,
            Err(e) if e.is_not_found() => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("reading the config of VM {}", vm.id)),
        };
        if cfg
            .get("ide2")
            .is_some_and(|v| v.contains("imagectl-seed-"))
        {
            self.pve
                .put::<serde_json::Value>(
                    &format!("{}/config", Self::qemu(&vm.node, &vm.id)),
                    params([("ide2", "none,media=cdrom")]),
                )
                .await
                .with_context(|| format!("ejecting the seed of VM {}", vm.id))?;
        }
        self.delete_seed(&SeedRef {
            fleet: Some(vm.fleet.clone()),
            vm: vm.name.clone(),
            location: format!("{}|{}", vm.node, self.seed_volid(&vm.name)),
        })
        .await
    }

    async fn endpoints(&self, vm: &VmInfo) -> Result<Vec<Endpoint>> {
        #[derive(Deserialize)]
        struct Ifaces {
            result: Vec<Iface>,
        }
        #[derive(Deserialize)]
        struct Iface {
            name: String,
            #[serde(default, rename = "ip-addresses")]
            ips: Vec<Ip>,
        }
        #[derive(Deserialize)]
        struct Ip {
            #[serde(rename = "ip-address")]
            ip: String,
            #[serde(rename = "ip-address-type")]
            kind: String,
        }
        let r: Ifaces = self
            .pve
            .get_once(
                &format!(
                    "{}/agent/network-get-interfaces",
                    Self::qemu(&vm.node, &vm.id)
                ),
                Vec::new(),
            )
            .await
            .with_context(|| format!("asking the guest agent of VM {} for its addresses", vm.id))?;
        let ip = r
            .result
            .iter()
            .filter(|i| {
                i.name != "lo" && !i.name.starts_with("docker") && !i.name.starts_with("br-")
            })
            .flat_map(|i| i.ips.iter())
            .find(|a| a.kind == "ipv4")
            .map(|a| a.ip.clone())
            .ok_or_else(|| anyhow!("VM {} reports no IPv4 address", vm.id))?;
        Ok([9100, 8080, 9252]
            .into_iter()
            .map(|p| Endpoint {
                guest_port: p,
                host: ip.clone(),
                port: p,
            })
            .collect())
    }

    async fn stop(&self, vm: &VmInfo, grace: Duration) -> Result<()> {
        match self.find(&vm.id, &vm.name).await? {
            Some((_, status)) if status == "running" => {}
            _ => return Ok(()),
        }
        self.pve
            .run_task(
                &format!("{}/status/shutdown", Self::qemu(&vm.node, &vm.id)),
                params([
                    ("timeout", grace.as_secs().max(1).to_string()),
                    ("forceStop", "1".into()),
                ]),
            )
            .await
            .with_context(|| format!("shutting down VM {}", vm.id))?;
        Ok(())
    }

    async fn destroy(&self, vm: &VmInfo) -> Result<()> {
        let vmid: u32 = vm
            .id
            .parse()
            .with_context(|| format!("VM id {:?} is not a number", vm.id))?;
        if let Some((node, status)) = self.find(&vm.id, &vm.name).await? {
            if status == "running" {
                self.pve
                    .run_task(
                        &format!("{}/status/stop", Self::qemu(&node, &vm.id)),
                        Vec::new(),
                    )
                    .await
                    .with_context(|| format!("stopping VM {vmid} on {node}"))?;
            }
            match self.pve.destroy_vm(&node, vmid).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e).with_context(|| format!("destroying VM {vmid} on {node}")),
            }
        }
        self.delete_seed(&SeedRef {
            fleet: Some(vm.fleet.clone()),
            vm: vm.name.clone(),
            location: format!("{}|{}", vm.node, self.seed_volid(&vm.name)),
        })
        .await
    }

    async fn seeds(&self, fleet: Option<&str>) -> Result<Vec<SeedRef>> {
        let mut out: Vec<SeedRef> = Vec::new();
        for n in self.nodes().await?.into_iter().filter(|n| n.online) {
            let vols = match self
                .pve
                .volumes(&n.name, &self.opts.seed_storage, Some("iso"))
                .await
            {
                Ok(v) => v,
                Err(e) if e.is_not_found() => continue,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("listing seeds on {} of {}", self.opts.seed_storage, n.name)
                    })
                }
            };
            for v in vols {
                let Some(vm) = facts::seed_vm(&v.volid) else {
                    continue;
                };
                let f = facts::fleet_of_vm(vm).map(str::to_string);
                if fleet.is_some_and(|want| f.as_deref() != Some(want)) {
                    continue;
                }
                // Storages may be shared: list each volume once.
                if out
                    .iter()
                    .any(|s| s.location.ends_with(&format!("|{}", v.volid)))
                {
                    continue;
                }
                out.push(SeedRef {
                    fleet: f,
                    vm: vm.to_string(),
                    location: format!("{}|{}", n.name, v.volid),
                });
            }
        }
        Ok(out)
    }

    async fn delete_seed(&self, seed: &SeedRef) -> Result<()> {
        let (node, volid) = seed
            .location
            .split_once('|')
            .ok_or_else(|| anyhow!("not a Proxmox seed location: {}", seed.location))?;
        match self.pve.delete_volume(node, volid).await {
            Ok(()) => Ok(()),
            Err(e)
                if e.is_not_found() || e.message().is_some_and(|m| m.contains("No such file")) =>
            {
                Ok(())
            }
            Err(e) => Err(e).with_context(|| format!("deleting seed {volid} on {node}")),
        }
    }

    async fn lock(&self, fleet: &str, ttl: Duration) -> Result<FleetLock> {
        let l = lock::lock(&self.pve, fleet, ttl).await?;
        // Renewed while this command runs, so a rollout longer than the ttl keeps it.
        self.renewer.start(
            &l.owner,
            super::lease::renew_loop(
                lock::PoolStore::new(&self.pve),
                lock::pool_id(fleet),
                l.clone(),
                ttl,
            ),
        );
        Ok(l)
    }

    async fn unlock(&self, l: &FleetLock) -> Result<()> {
        self.renewer.stop(&l.owner);
        if let Err(e) = self.remove_pool_if_empty(&l.fleet).await {
            tracing::warn!("{e:#}");
        }
        lock::unlock(&self.pve, l).await
    }
}
