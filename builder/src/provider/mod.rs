//! Where VMs run: one trait, implemented by the Proxmox and local providers.
//!
//! The fleet logic ([`crate::fleet`]) is written once over [`Provider`]. A provider keeps every
//! fact about a VM **with the VM** — Proxmox in tags (`imagectl`, `fleet-<name>`,
//! `image-<version>`) and notes (runner id, image sha256, created time), the local provider in one
//! small JSON file per VM under its state directory — so there is no separate state file that a
//! team could lose or fork. [`Provider::list`] rebuilds the fleet from those facts every time.
//!
//! The trait is async so a provider can run clones in parallel (PVE tasks) and the fleet can
//! drive several VMs at once; the local provider does its blocking work (QEMU, the guest agent) on
//! tokio's blocking pool. Futures are not required to be `Send`: the fleet drives its VMs
//! concurrently inside one task (bounded `buffer_unordered`), never spawning them.
//!
//! Every method is safe to call again after a failure: `destroy` of a VM that is already gone,
//! `detach_seed` of a seed that is gone and `unlock` of a lock that is gone all succeed.

pub mod any;
pub mod lease;
pub mod local;
pub mod proxmox;

pub use any::AnyProvider;

use anyhow::Result;
use imagectl_proto::AgentStatus;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

/// Where a VM is in its life, as the provider sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Created (cloned), not started yet.
    Stopped,
    /// Running.
    Running,
    /// Was started but is not running any more (crashed, or the host rebooted).
    Dead,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::Stopped => "stopped",
            VmState::Running => "running",
            VmState::Dead => "dead",
        })
    }
}

/// The facts kept with one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    /// The provider's id (PVE: the VMID; local: the VM name).
    pub id: String,
    /// VM name, `<fleet>-<6 hex>`; also its host name.
    pub name: String,
    /// The node it runs on (local: this host's name).
    pub node: String,
    /// Fleet name.
    pub fleet: String,
    /// Image version it was cloned from.
    pub image_version: String,
    /// sha256 of the image (qcow2) it was cloned from.
    #[serde(default)]
    pub image_sha256: Option<String>,
    /// The GitLab runner created for it.
    pub runner_id: u64,
    /// When it was created (RFC 3339, UTC).
    pub created_at: String,
    /// Current state.
    pub state: VmState,
    /// True while a seed ISO (with a runner token) is attached.
    #[serde(default)]
    pub seed_attached: bool,
}

/// One image version a provider can clone VMs from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Image name (from the manifest).
    pub name: String,
    /// Version.
    pub version: String,
    /// sha256 of the qcow2.
    pub sha256: String,
    /// When it was built (RFC 3339); orders versions.
    pub built_at: String,
    /// Where it is: a qcow2 path (local) or a template VMID (PVE).
    pub location: String,
    /// Nodes that hold it (PVE templates on local storage); empty = everywhere.
    #[serde(default)]
    pub nodes: Vec<String>,
}

/// What to create.
#[derive(Debug, Clone)]
pub struct CreateVm {
    /// Fleet.
    pub fleet: String,
    /// VM name.
    pub name: String,
    /// Image to clone.
    pub image: ImageInfo,
    /// The runner already created for it (stored with the VM).
    pub runner_id: u64,
    /// Node to place it on (`None`: the provider decides).
    pub node: Option<String>,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub cpus: u32,
    /// Full clone instead of a linked clone (PVE; local is always linked).
    pub full_clone: bool,
}

/// A node VMs can be placed on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node name.
    pub name: String,
    /// Free memory in MiB.
    pub free_memory_mib: u64,
    /// Online and accepting VMs.
    pub online: bool,
}

/// Where a guest TCP port can be reached from this machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Port in the guest (9100, 8080, 9252).
    pub guest_port: u16,
    /// Host or IP to connect to.
    pub host: String,
    /// Port to connect to.
    pub port: u16,
}

/// A seed ISO held by the provider (attached or left over).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedRef {
    /// Fleet, when known.
    pub fleet: Option<String>,
    /// The VM it belongs to (by name).
    pub vm: String,
    /// Provider-specific location (a path, or a PVE volume id).
    pub location: String,
}

/// A held fleet lock; give it back with [`Provider::unlock`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetLock {
    /// Fleet.
    pub fleet: String,
    /// Random owner id of this holder.
    pub owner: String,
    /// Holder's host name.
    pub host: String,
    /// Holder's pid.
    pub pid: u32,
    /// When it was taken (RFC 3339).
    pub acquired_at: String,
    /// When another process may take it over even if the holder cannot be checked (RFC 3339).
    pub expires_at: String,
}

/// A place where runner VMs run. See the module docs.
#[allow(async_fn_in_trait)] // driven inside one task by the fleet; no Send bound wanted
pub trait Provider {
    /// `local` or `proxmox`.
    fn kind(&self) -> &'static str;

    /// Which installation this is (`local:<host>:<state dir>`, `proxmox:<endpoint>`): written into
    /// each runner's maintenance note so orphan gc never touches another installation's runners.
    fn scope(&self) -> String;

    /// The GitLab URL as the guest must use it (the local provider relays a loopback URL into
    /// restricted guests as `http://10.0.2.100`).
    fn guest_gitlab_url(&self, url: &str) -> String;

    /// True when waiting for a VM to boot and register costs this machine nothing (Proxmox), so
    /// the fleet bounds only the API work (clone, upload, start) by `--concurrency` and lets
    /// every VM wait at once. False (local): the whole VM life counts against it, because a
    /// booting VM burns this machine's CPU.
    fn parallel_waits(&self) -> bool {
        false
    }

    /// Image versions available to clone from, oldest first.
    async fn images(&self) -> Result<Vec<ImageInfo>>;

    /// Nodes VMs can be placed on.
    async fn nodes(&self) -> Result<Vec<NodeInfo>>;

    /// Every VM imagectl manages here (of `fleet`, or of all fleets).
    async fn list(&self, fleet: Option<&str>) -> Result<Vec<VmInfo>>;

    /// Clones the image into a new, stopped VM and records its facts (tags/notes, pool). On error
    /// the provider removes whatever it made of this VM.
    async fn create(&self, req: &CreateVm) -> Result<VmInfo>;

    /// Puts the seed ISO (at `iso` on this machine) next to the VM and attaches it as a cdrom
    /// (PVE: upload with `content=iso`, set `ide2`). The caller deletes its own copy afterwards.
    async fn attach_seed(&self, vm: &VmInfo, iso: &Path) -> Result<()>;

    /// Powers the VM on.
    async fn start(&self, vm: &VmInfo) -> Result<()>;

    /// The agent's `status.json`, read through the guest agent. `Ok(None)` while the guest agent
    /// or the file is not there yet; an error when the VM is gone or broken.
    async fn agent_status(&self, vm: &VmInfo) -> Result<Option<AgentStatus>>;

    /// Ejects the seed and deletes the provider's copy of it.
    async fn detach_seed(&self, vm: &VmInfo) -> Result<()>;

    /// Where the guest's metrics ports can be reached from here.
    async fn endpoints(&self, vm: &VmInfo) -> Result<Vec<Endpoint>>;

    /// Powers the VM off (gracefully within `grace`, then hard).
    async fn stop(&self, vm: &VmInfo, grace: Duration) -> Result<()>;

    /// Deletes the VM, its disks and any seed of it. Succeeds if it is already gone.
    async fn destroy(&self, vm: &VmInfo) -> Result<()>;

    /// Seed ISOs the provider holds (for orphan gc).
    async fn seeds(&self, fleet: Option<&str>) -> Result<Vec<SeedRef>>;

    /// Deletes one seed ISO.
    async fn delete_seed(&self, seed: &SeedRef) -> Result<()>;

    /// Takes the fleet lock, so that two imagectl processes never change one fleet at once. An
    /// error (naming the holder) when another live holder has it.
    async fn lock(&self, fleet: &str, ttl: Duration) -> Result<FleetLock>;

    /// Gives the fleet lock back (only if `lock` still owns it).
    async fn unlock(&self, lock: &FleetLock) -> Result<()>;
}

/// RFC 3339 text for now (UTC, seconds).
pub fn now_rfc3339() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

/// RFC 3339 text for a time (UTC, whole seconds).
pub fn rfc3339(t: time::OffsetDateTime) -> String {
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Parses RFC 3339 text.
pub fn parse_rfc3339(s: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}
