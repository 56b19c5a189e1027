//! The local provider: real QEMU VMs on this machine (TCG or KVM), the embedded default.
//!
//! * Images come from a local image store: a directory of `<name>-<version>.qcow2` files with
//!   their manifests (`imagectl build --out DIR`).
//! * Each VM is a linked clone: a qcow2 overlay backed by the image (never written).
//! * The seed ISO is attached as a cdrom, ejected (QMP) and deleted once the runner registered.
//! * Guest ports 9100, 8080 and 9252 are forwarded to free ports on 127.0.0.1, recorded in the
//!   VM's `vm.json` so `status` and `targets` find them.
//! * Networking is QEMU user mode, `restrict=on` by default (the guest reaches nothing but what
//!   is relayed to it). A loopback GitLab URL is relayed into the guest as `http://10.0.2.100`
//!   (`guestfwd` in its per-connection `cmd:` form). [`NetPolicy::Open`] lets runners pull images.
//! * QEMU runs detached (own process group, no parent-death signal): VMs keep running after
//!   `imagectl deploy` exits; `destroy` kills them by pid and removes their directory.
//!
//! State layout: see [`state`].

pub mod images;
pub mod process;
pub mod state;

pub use images::scan_images;

use super::{
    now_rfc3339, CreateVm, Endpoint, FleetLock, ImageInfo, NodeInfo, Provider, SeedRef, VmInfo,
    VmState,
};
use crate::error::input;
use crate::vm::args::{GuestForward, LaunchPlan, PortForward};
use crate::vm::{Accel, Firmware, NetPolicy, Qga, DEFAULT_GUEST_PORTS, OVMF_CODE, OVMF_VARS};
use anyhow::{bail, Context, Result};
use imagectl_proto::{AgentStatus, STATUS_PATH};
use process::VmPaths;
use state::{Forward, LocalVm, StateDir};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Guest address the GitLab relay listens on (inside QEMU's 10.0.2.0/24).
pub const GITLAB_RELAY_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 100);
/// Block backend name of the seed cdrom (see `vm::args`).
const SEED_DRIVE: &str = "seed0";

/// How the local provider runs VMs.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// State directory (see [`state::default_state_dir`]).
    pub state_dir: PathBuf,
    /// Image store: a directory of qcow2 images with manifests.
    pub images_dir: PathBuf,
    /// Only images of this name (manifest `name`), when set.
    pub image_name: Option<String>,
    /// Outbound network policy of the guests.
    pub net: NetPolicy,
    /// The GitLab base URL (a loopback URL is relayed into the guest).
    pub gitlab_url: String,
    /// Accelerator (`IMAGECTL_ACCEL` overrides).
    pub accel: Accel,
    /// Firmware.
    pub firmware: Firmware,
    /// The QEMU binary.
    pub qemu: PathBuf,
}

/// The local provider.
#[derive(Debug, Clone)]
pub struct LocalProvider {
    opts: LocalOptions,
    state: StateDir,
    relay_port: Option<u16>,
    /// Renews the fleet locks this provider holds (shared by its clones).
    renewer: std::sync::Arc<super::lease::Renewer>,
}

/// The port of a loopback GitLab URL (`http://127.0.0.1:PORT`, `localhost`, `[::1]`), if it is one.
pub fn loopback_port(url: &str) -> Option<u16> {
    let u = reqwest::Url::parse(url).ok()?;
    let host = u.host_str()?.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    loopback.then(|| u.port_or_known_default()).flatten()
}

impl LocalProvider {
    /// Opens the state directory and checks the options.
    pub fn new(opts: LocalOptions) -> Result<Self> {
        let state = StateDir::open(&opts.state_dir)?;
        let relay_port = loopback_port(&opts.gitlab_url);
        Ok(Self {
            opts,
            state,
            relay_port,
            renewer: Default::default(),
        })
    }

    /// The state directory.
    pub fn state(&self) -> &StateDir {
        &self.state
    }

    /// The private (0700) directory where seeds are staged before they are attached.
    pub fn seeds_dir(&self) -> PathBuf {
        self.state.seeds_dir()
    }

    fn paths(&self, name: &str) -> VmPaths {
        VmPaths {
            dir: self.state.vm_dir(name),
        }
    }

    fn record(&self, vm: &VmInfo) -> Result<LocalVm> {
        self.state
            .read_vm(&vm.name)
            .with_context(|| format!("reading the state of VM {}", vm.name))
    }

    /// The state a record's pid says the VM is in.
    fn live_state(&self, r: &LocalVm) -> VmState {
        match r.pid {
            Some(pid) if process::is_qemu_of(pid, &r.info.name) => VmState::Running,
            Some(_) => VmState::Dead,
            None => VmState::Stopped,
        }
    }

    /// Starts QEMU for a record with `accel`; fills in pid, ports and accel.
    fn launch(&self, r: &mut LocalVm, accel: Accel) -> Result<()> {
        let p = self.paths(&r.info.name);
        for f in [p.qga(), p.qmp(), p.pidfile()] {
            let _ = std::fs::remove_file(f);
        }
        if self.opts.firmware == Firmware::Uefi && !p.ovmf_vars().exists() {
            fs_err::copy(OVMF_VARS, p.ovmf_vars()).context("copying the OVMF variable store")?;
        }
        let seed = p.seed();
        let mut last = None;
        for _ in 0..3 {
            let ports = crate::vm::net::free_ports(DEFAULT_GUEST_PORTS.len())?;
            let hostfwd: Vec<PortForward> = DEFAULT_GUEST_PORTS
                .iter()
                .zip(ports)
                .map(|(&guest, host)| PortForward { guest, host })
                .collect();
            let plan = LaunchPlan {
                name: r.info.name.clone(),
                accel,
                memory_mib: r.memory_mib,
                cpus: r.cpus,
                firmware: self.opts.firmware,
                ovmf_code: OVMF_CODE.into(),
                ovmf_vars: p.ovmf_vars(),
                disk: p.disk(),
                seed_iso: seed.is_file().then(|| seed.clone()),
                serial_log: p.serial(),
                qga_socket: p.qga(),
                qmp_socket: Some(p.qmp()),
                pidfile: p.pidfile(),
                net: if r.open_network {
                    NetPolicy::Open
                } else {
                    NetPolicy::Restricted
                },
                hostfwd: hostfwd.clone(),
                guestfwd: r
                    .gitlab_relay_port
                    .map(|host_port| GuestForward {
                        guest_ip: GITLAB_RELAY_IP,
                        guest_port: relay_guest_port(&self.opts.gitlab_url),
                        host_port,
                    })
                    .into_iter()
                    .collect(),
            };
            match process::spawn(
                &self.opts.qemu,
                &plan,
                &p.stderr(),
                Duration::from_millis(800),
            ) {
                Ok(pid) => {
                    r.pid = Some(pid);
                    r.accel = Some(accel.to_string());
                    r.forwards = hostfwd
                        .iter()
                        .map(|f| Forward {
                            guest: f.guest,
                            host: f.host,
                        })
                        .collect();
                    r.info.state = VmState::Running;
                    return Ok(());
                }
                Err(e) if format!("{e:#}").contains("host forwarding") => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no free host ports")))
    }

    fn resolve_accel(&self) -> Result<Accel> {
        Ok(match Accel::from_env_or(self.opts.accel)? {
            Accel::Auto if crate::vm::qemu::kvm_available() => Accel::Kvm,
            Accel::Auto => Accel::Tcg,
            a => a,
        })
    }

    fn destroy_blocking(&self, name: &str) -> Result<()> {
        let dir = self.state.vm_dir(name);
        if !dir.exists() {
            return Ok(());
        }
        let p = self.paths(name);
        let pids = [
            self.state.read_vm(name).ok().and_then(|r| r.pid),
            process::read_pidfile(&p.pidfile()),
        ];
        for pid in pids.into_iter().flatten() {
            if process::is_qemu_of(pid, name) {
                process::kill(pid, Duration::from_secs(10))
                    .with_context(|| format!("killing the QEMU of {name}"))?;
            }
        }
        fs_err::remove_dir_all(&dir).with_context(|| format!("removing VM directory of {name}"))
    }
}

/// The guest-side port of the GitLab relay: the URL's scheme default (80/443).
fn relay_guest_port(url: &str) -> u16 {
    if url.trim_start().starts_with("https://") {
        443
    } else {
        80
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("joining a blocking local-provider task")?
}

impl Provider for LocalProvider {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn scope(&self) -> String {
        let dir = std::fs::canonicalize(self.state.root())
            .unwrap_or_else(|_| self.state.root().to_path_buf());
        format!("local:{}:{}", state::hostname(), dir.display())
    }

    fn guest_gitlab_url(&self, url: &str) -> String {
        match self.relay_port {
            Some(_) => {
                let path = reqwest::Url::parse(url)
                    .map(|u| u.path().trim_end_matches('/').to_string())
                    .unwrap_or_default();
                let scheme = if relay_guest_port(url) == 443 {
                    "https"
                } else {
                    "http"
                };
                format!("{scheme}://{GITLAB_RELAY_IP}{path}")
            }
            None => url.trim_end_matches('/').to_string(),
        }
    }

    async fn images(&self) -> Result<Vec<ImageInfo>> {
        scan_images(&self.opts.images_dir, self.opts.image_name.as_deref())
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let free_kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0);
        Ok(vec![NodeInfo {
            name: state::hostname(),
            free_memory_mib: free_kib / 1024,
            online: true,
        }])
    }

    async fn list(&self, fleet: Option<&str>) -> Result<Vec<VmInfo>> {
        let mut out = Vec::new();
        for r in self.state.all_vms()? {
            if fleet.is_some_and(|f| f != r.info.fleet) {
                continue;
            }
            let mut info = r.info.clone();
            info.state = self.live_state(&r);
            info.seed_attached = self.paths(&info.name).seed().exists();
            out.push(info);
        }
        Ok(out)
    }

    async fn create(&self, req: &CreateVm) -> Result<VmInfo> {
        crate::seed::validate_hostname(&req.name)?;
        if req.name.contains('.') {
            return Err(input(format!("VM name {:?} may not contain '.'", req.name)));
        }
        let dir = self.state.vm_dir(&req.name);
        std::fs::create_dir(&dir)
            .with_context(|| format!("creating VM directory {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .context("restricting the VM directory")?;
        let info = VmInfo {
            id: req.name.clone(),
            name: req.name.clone(),
            node: state::hostname(),
            fleet: req.fleet.clone(),
            image_version: req.image.version.clone(),
            image_sha256: Some(req.image.sha256.clone()),
            runner_id: req.runner_id,
            created_at: now_rfc3339(),
            state: VmState::Stopped,
            seed_attached: false,
        };
        let rec = LocalVm {
            info: info.clone(),
            image_path: PathBuf::from(&req.image.location),
            memory_mib: req.memory_mib,
            cpus: req.cpus,
            accel: None,
            pid: None,
            forwards: Vec::new(),
            gitlab_relay_port: self.relay_port,
            open_network: self.opts.net == NetPolicy::Open,
        };
        let this = self.clone();
        let made = blocking(move || {
            let disk = this.paths(&rec.info.name).disk();
            crate::util::run(
                Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                    .arg(&rec.image_path)
                    .arg(&disk),
            )
            .with_context(|| format!("creating the overlay disk of {}", rec.info.name))?;
            this.state.write_vm(&rec)
        })
        .await;
        if let Err(e) = made {
            let _ = self.destroy_blocking(&req.name);
            return Err(e);
        }
        Ok(info)
    }

    async fn attach_seed(&self, vm: &VmInfo, iso: &Path) -> Result<()> {
        let dest = self.paths(&vm.name).seed();
        if std::fs::rename(iso, &dest).is_err() {
            fs_err::copy(iso, &dest).context("copying the seed ISO to the VM")?;
        }
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o600))
            .context("restricting the seed ISO")?;
        Ok(())
    }

    async fn start(&self, vm: &VmInfo) -> Result<()> {
        let this = self.clone();
        let name = vm.name.clone();
        blocking(move || {
            let mut r = this.state.read_vm(&name)?;
            if this.live_state(&r) == VmState::Running {
                return Ok(());
            }
            let accel = this.resolve_accel()?;
            this.launch(&mut r, accel)
                .with_context(|| format!("starting the QEMU of {name}"))?;
            this.state.write_vm(&r)
        })
        .await
    }

    async fn agent_status(&self, vm: &VmInfo) -> Result<Option<AgentStatus>> {
        let this = self.clone();
        let name = vm.name.clone();
        blocking(move || {
            let mut r = this.state.read_vm(&name)?;
            let p = this.paths(&name);
            if this.live_state(&r) != VmState::Running {
                bail!(
                    "the QEMU of {name} is not running: {}",
                    process::read_tail(&p.stderr(), 5)
                );
            }
            let err = process::read_tail(&p.stderr(), 30);
            if r.accel.as_deref() == Some("kvm") && crate::vm::is_kvm_failure(&err) {
                if Accel::from_env_or(this.opts.accel)? != Accel::Auto {
                    bail!("KVM failed for {name}: {}", crate::util::tail(&err, 2));
                }
                tracing::warn!("KVM failed for {name}; restarting it with TCG");
                if let Some(pid) = r.pid.take() {
                    process::kill(pid, Duration::from_secs(10))?;
                }
                let disk = p.disk();
                let _ = std::fs::remove_file(&disk);
                crate::util::run(
                    Command::new("qemu-img")
                        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                        .arg(&r.image_path)
                        .arg(&disk),
                )?;
                this.launch(&mut r, Accel::Tcg)?;
                this.state.write_vm(&r)?;
                return Ok(None);
            }
            let Ok(mut q) = Qga::connect(&p.qga(), Duration::from_secs(2)) else {
                return Ok(None);
            };
            q.set_timeout(Duration::from_secs(10));
            let Ok(body) = q.read_file(STATUS_PATH) else {
                return Ok(None);
            };
            match serde_json::from_slice::<AgentStatus>(&body) {
                Ok(s) => Ok(Some(s)),
                Err(e) => {
                    tracing::debug!("{name}: status.json does not parse yet: {e}");
                    Ok(None)
                }
            }
        })
        .await
    }

    async fn detach_seed(&self, vm: &VmInfo) -> Result<()> {
        let this = self.clone();
        let name = vm.name.clone();
        blocking(move || {
            let p = this.paths(&name);
            let r = this.state.read_vm(&name).ok();
            if r.as_ref()
                .is_some_and(|r| this.live_state(r) == VmState::Running)
            {
                if let Err(e) = process::eject(&p.qmp(), SEED_DRIVE) {
                    tracing::warn!("could not eject the seed of {name}: {e:#}");
                }
            }
            match std::fs::remove_file(p.seed()) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e).with_context(|| format!("deleting the seed of {name}")),
            }
        })
        .await
    }

    async fn endpoints(&self, vm: &VmInfo) -> Result<Vec<Endpoint>> {
        let r = self.record(vm)?;
        Ok(r.forwards
            .iter()
            .map(|f| Endpoint {
                guest_port: f.guest,
                host: "127.0.0.1".into(),
                port: f.host,
            })
            .collect())
    }

    async fn stop(&self, vm: &VmInfo, grace: Duration) -> Result<()> {
        let this = self.clone();
        let name = vm.name.clone();
        blocking(move || {
            let Ok(mut r) = this.state.read_vm(&name) else {
                return Ok(());
            };
            if let Some(pid) = r.pid.filter(|&pid| process::is_qemu_of(pid, &name)) {
                let p = this.paths(&name);
                if grace.is_zero() || !process::powerdown(&p.qmp(), pid, grace) {
                    process::kill(pid, Duration::from_secs(10))
                        .with_context(|| format!("killing the QEMU of {name}"))?;
                }
            }
            r.pid = None;
            r.info.state = VmState::Stopped;
            this.state.write_vm(&r)
        })
        .await
    }

    async fn destroy(&self, vm: &VmInfo) -> Result<()> {
        let this = self.clone();
        let name = vm.name.clone();
        blocking(move || this.destroy_blocking(&name)).await
    }

    async fn seeds(&self, fleet: Option<&str>) -> Result<Vec<SeedRef>> {
        let mut out = Vec::new();
        for r in self.state.all_vms()? {
            if fleet.is_some_and(|f| f != r.info.fleet) {
                continue;
            }
            let seed = self.paths(&r.info.name).seed();
            if seed.exists() {
                out.push(SeedRef {
                    fleet: Some(r.info.fleet.clone()),
                    vm: r.info.name.clone(),
                    location: seed.to_string_lossy().into_owned(),
                });
            }
        }
        Ok(out)
    }

    async fn delete_seed(&self, seed: &SeedRef) -> Result<()> {
        match std::fs::remove_file(&seed.location) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting seed {}", seed.location)),
        }
    }

    async fn lock(&self, fleet: &str, ttl: Duration) -> Result<FleetLock> {
        let l = self.state.lock(fleet, ttl).await?;
        // Renewed while this command runs (the pid keeps it on this host; the expiry elsewhere).
        self.renewer.start(
            &l.owner,
            super::lease::renew_loop(self.state.locks(), state::lock_id(fleet), l.clone(), ttl),
        );
        Ok(l)
    }

    async fn unlock(&self, lock: &FleetLock) -> Result<()> {
        self.renewer.stop(&lock.owner);
        self.state.unlock(lock).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_urls_are_relayed() {
        assert_eq!(loopback_port("http://127.0.0.1:4567"), Some(4567));
        assert_eq!(loopback_port("http://localhost"), Some(80));
        assert_eq!(loopback_port("https://[::1]:8443/gl"), Some(8443));
        assert_eq!(loopback_port("https://gitlab.example.com"), None);
        let d = tempfile::tempdir().unwrap();
        let mk = |url: &str| {
            LocalProvider::new(LocalOptions {
                state_dir: d.path().join("state"),
                images_dir: d.path().join("out"),
                image_name: None,
                net: NetPolicy::Restricted,
                gitlab_url: url.into(),
                accel: Accel::Tcg,
                firmware: Firmware::Bios,
                qemu: "qemu-system-x86_64".into(),
            })
            .unwrap()
        };
        assert_eq!(
            mk("http://127.0.0.1:4567/").guest_gitlab_url("http://127.0.0.1:4567/"),
            "http://10.0.2.100"
        );
        assert_eq!(
            mk("https://gitlab.example.com/").guest_gitlab_url("https://gitlab.example.com/"),
            "https://gitlab.example.com"
        );
        let mode = std::fs::metadata(d.path().join("state/seeds"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
