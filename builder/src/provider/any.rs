//! [`AnyProvider`]: the provider a command chose at run time, itself a [`Provider`] that hands
//! every call to the one inside, so the fleet code stays generic and the CLI stays one path.

use super::local::LocalProvider;
use super::proxmox::ProxmoxProvider;
use super::{CreateVm, Endpoint, FleetLock, ImageInfo, NodeInfo, Provider, SeedRef, VmInfo};
use anyhow::Result;
use imagectl_proto::AgentStatus;
use std::path::Path;
use std::time::Duration;

/// The local or the Proxmox provider.
pub enum AnyProvider {
    /// QEMU VMs on this machine.
    Local(LocalProvider),
    /// A Proxmox VE cluster.
    Proxmox(ProxmoxProvider),
}

macro_rules! each {
    ($self:ident, $p:ident => $e:expr) => {
        match $self {
            AnyProvider::Local($p) => $e,
            AnyProvider::Proxmox($p) => $e,
        }
    };
}

impl Provider for AnyProvider {
    fn kind(&self) -> &'static str {
        each!(self, p => p.kind())
    }
    fn scope(&self) -> String {
        each!(self, p => p.scope())
    }
    fn guest_gitlab_url(&self, url: &str) -> String {
        each!(self, p => p.guest_gitlab_url(url))
    }
    fn parallel_waits(&self) -> bool {
        each!(self, p => p.parallel_waits())
    }
    async fn images(&self) -> Result<Vec<ImageInfo>> {
        each!(self, p => p.images().await)
    }
    async fn nodes(&self) -> Result<Vec<NodeInfo>> {
        each!(self, p => p.nodes().await)
    }
    async fn list(&self, fleet: Option<&str>) -> Result<Vec<VmInfo>> {
        each!(self, p => p.list(fleet).await)
    }
    async fn create(&self, req: &CreateVm) -> Result<VmInfo> {
        each!(self, p => p.create(req).await)
    }
    async fn attach_seed(&self, vm: &VmInfo, iso: &Path) -> Result<()> {
        each!(self, p => p.attach_seed(vm, iso).await)
    }
    async fn start(&self, vm: &VmInfo) -> Result<()> {
        each!(self, p => p.start(vm).await)
    }
    async fn agent_status(&self, vm: &VmInfo) -> Result<Option<AgentStatus>> {
        each!(self, p => p.agent_status(vm).await)
    }
    async fn detach_seed(&self, vm: &VmInfo) -> Result<()> {
        each!(self, p => p.detach_seed(vm).await)
    }
    async fn endpoints(&self, vm: &VmInfo) -> Result<Vec<Endpoint>> {
        each!(self, p => p.endpoints(vm).await)
    }
    async fn stop(&self, vm: &VmInfo, grace: Duration) -> Result<()> {
        each!(self, p => p.stop(vm, grace).await)
    }
    async fn destroy(&self, vm: &VmInfo) -> Result<()> {
        each!(self, p => p.destroy(vm).await)
    }
    async fn seeds(&self, fleet: Option<&str>) -> Result<Vec<SeedRef>> {
        each!(self, p => p.seeds(fleet).await)
    }
    async fn delete_seed(&self, seed: &SeedRef) -> Result<()> {
        each!(self, p => p.delete_seed(seed).await)
    }
    async fn lock(&self, fleet: &str, ttl: Duration) -> Result<FleetLock> {
        each!(self, p => p.lock(fleet, ttl).await)
    }
    async fn unlock(&self, lock: &FleetLock) -> Result<()> {
        each!(self, p => p.unlock(lock).await)
    }
}
