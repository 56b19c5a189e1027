//! Starting, watching and always stopping a QEMU process.
//!
//! [`QemuVmBuilder::start`] makes a private work directory (overlay disk, OVMF vars copy, sockets,
//! serial log, QEMU's stderr), picks free host ports for the forwarded guest ports, and starts
//! QEMU in its own process group. With [`Accel::Auto`] it tries KVM first and falls back to TCG when
//! QEMU dies or reports a KVM error; [`QemuVm::fall_back_if_kvm_failed`] does the same later in boot.

use super::args::{qemu_args, GuestForward, LaunchPlan, PortForward};
use super::{is_kvm_failure, net, reaper, Accel, Firmware, NetPolicy};
use super::{DEFAULT_GUEST_PORTS, OVMF_CODE, OVMF_VARS};
use crate::error::input;
use anyhow::{bail, Context, Result};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How to start a VM; see [`QemuVm::builder`].
#[derive(Debug, Clone)]
pub struct QemuVmBuilder {
    image: PathBuf,
    name: String,
    memory_mib: u32,
    cpus: u32,
    firmware: Firmware,
    accel: Accel,
    seed_iso: Option<PathBuf>,
    guest_ports: Vec<u16>,
    guestfwd: Vec<GuestForward>,
    net: NetPolicy,
    qmp: bool,
    keep: bool,
    tie_to_parent: bool,
    kvm_probe: Duration,
    qemu: PathBuf,
    ovmf_code: PathBuf,
    ovmf_vars: PathBuf,
}

/// A running QEMU. Dropping it kills QEMU and removes its work directory (unless kept).
pub struct QemuVm {
    child: Option<Child>,
    cfg: QemuVmBuilder,
    plan: LaunchPlan,
    dir: Option<tempfile::TempDir>,
    dir_path: PathBuf,
    stderr_log: PathBuf,
    started: Instant,
    image: PathBuf,
    image_format: String,
    requested: Accel,
}

impl QemuVm {
    /// Starts describing a VM that boots `image` (never modified: QEMU writes to an overlay).
    pub fn builder(image: impl Into<PathBuf>) -> QemuVmBuilder {
        QemuVmBuilder {
            image: image.into(),
            name: "vm".into(),
            memory_mib: 2048,
            cpus: 2,
            firmware: Firmware::Bios,
            accel: Accel::Auto,
            seed_iso: None,
            guest_ports: DEFAULT_GUEST_PORTS.to_vec(),
            guestfwd: Vec::new(),
            net: NetPolicy::Restricted,
            qmp: false,
            keep: false,
            tie_to_parent: true,
            kvm_probe: Duration::from_secs(5),
            qemu: "qemu-system-x86_64".into(),
            ovmf_code: OVMF_CODE.into(),
            ovmf_vars: OVMF_VARS.into(),
        }
    }
}

impl QemuVmBuilder {
    /// VM name (letters, digits, '-', '_').
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }
    /// Memory in MiB (default 2048).
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }
    /// Virtual CPUs (default 2).
    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }
    /// Firmware (default SeaBIOS).
    pub fn firmware(mut self, fw: Firmware) -> Self {
        self.firmware = fw;
        self
    }
    /// Accelerator (default auto; `IMAGECTL_ACCEL` overrides whatever is set here).
    pub fn accel(mut self, accel: Accel) -> Self {
        self.accel = accel;
        self
    }
    /// The NoCloud seed ISO to attach as a cdrom.
    pub fn seed_iso(mut self, iso: impl Into<PathBuf>) -> Self {
        self.seed_iso = Some(iso.into());
        self
    }
    /// Guest TCP ports to forward to free ports on 127.0.0.1 (default 9100, 8080, 9252).
    pub fn guest_ports(mut self, ports: &[u16]) -> Self {
        self.guest_ports = ports.to_vec();
        self
    }
    /// Relays guest connections to `guest_ip:guest_port` to `127.0.0.1:host_port`.
    pub fn guest_forward(mut self, fwd: GuestForward) -> Self {
        self.guestfwd.push(fwd);
        self
    }
    /// Outbound network policy (default restricted).
    pub fn network(mut self, net: NetPolicy) -> Self {
        self.net = net;
        self
    }
    /// Also open a QMP socket.
    pub fn qmp(mut self, on: bool) -> Self {
        self.qmp = on;
        self
    }
    /// Keep the work directory (serial log, overlay) after the VM stops.
    pub fn keep_files(mut self, keep: bool) -> Self {
        self.keep = keep;
        self
    }
    /// Kill QEMU when the thread that started it dies (default on; uses `setpriv --pdeathsig`).
    /// Turn off for VMs that must outlive imagectl.
    pub fn tie_to_parent(mut self, on: bool) -> Self {
        self.tie_to_parent = on;
        self
    }
    /// How long a KVM start is watched before it is trusted (auto mode; default 5 s).
    pub fn kvm_probe(mut self, d: Duration) -> Self {
        self.kvm_probe = d;
        self
    }
    /// The QEMU binary (default `qemu-system-x86_64` from PATH).
    pub fn qemu_binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.qemu = path.into();
        self
    }

    /// Creates the work directory and overlay and starts QEMU.
    pub fn start(self) -> Result<QemuVm> {
        if !self
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            || self.name.is_empty()
        {
            return Err(input(format!("invalid VM name {:?}", self.name)));
        }
        let image = std::fs::canonicalize(&self.image)
            .map_err(|e| input(format!("cannot use image {}: {e}", self.image.display())))?;
        let format = image_format(&image)?;
        if let Some(iso) = &self.seed_iso {
            if !iso.is_file() {
                return Err(input(format!("seed ISO {} does not exist", iso.display())));
            }
        }
        if self.firmware == Firmware::Uefi {
            for f in [&self.ovmf_code, &self.ovmf_vars] {
                if !f.is_file() {
                    return Err(input(format!(
                        "UEFI firmware {} is missing (install the ovmf package)",
                        f.display()
                    )));
                }
            }
        }
        let requested = Accel::from_env_or(self.accel)?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("imagectl-vm-{}-", self.name))
            .tempdir()
            .context("creating VM work directory")?;
        let d = dir.path().to_path_buf();
        let seed_iso = match &self.seed_iso {
            Some(p) => Some(std::fs::canonicalize(p).context("resolving seed ISO path")?),
            None => None,
        };
        let plan = LaunchPlan {
            name: self.name.clone(),
            accel: if requested == Accel::Tcg {
                Accel::Tcg
            } else {
                Accel::Kvm
            },
            memory_mib: self.memory_mib,
            cpus: self.cpus,
            firmware: self.firmware,
            ovmf_code: self.ovmf_code.clone(),
            ovmf_vars: d.join("OVMF_VARS.fd"),
            disk: d.join("disk.qcow2"),
            seed_iso,
            serial_log: d.join("serial.log"),
            qga_socket: d.join("qga.sock"),
            qmp_socket: self.qmp.then(|| d.join("qmp.sock")),
            pidfile: d.join("qemu.pid"),
            net: self.net,
            hostfwd: Vec::new(),
            guestfwd: self.guestfwd.clone(),
        };
        let mut vm = QemuVm {
            child: None,
            stderr_log: d.join("qemu.stderr.log"),
            dir_path: d,
            dir: Some(dir),
            cfg: self,
            plan,
            started: Instant::now(),
            image,
            image_format: format,
            requested,
        };
        vm.launch_with_fallback()?;
        Ok(vm)
    }
}

/// The format `qemu-img info` reports for an image (`qcow2`, `raw`, …).
pub fn image_format(image: &Path) -> Result<String> {
    let out = Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(image)
        .stdin(Stdio::null())
        .output()
        .context("starting qemu-img (is qemu-utils installed?)")?;
    if !out.status.success() {
        return Err(input(format!(
            "{} is not a readable disk image: {}",
            image.display(),
            crate::util::tail(&String::from_utf8_lossy(&out.stderr), 3)
        )));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing qemu-img info output")?;
    v.get("format")
        .and_then(|f| f.as_str())
        .map(str::to_string)
        .context("qemu-img info reported no format")
}

/// True when `/dev/kvm` can be opened for reading and writing.
pub fn kvm_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn setpriv_available() -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("setpriv").is_file()))
        .unwrap_or(false)
}

impl QemuVm {
    fn launch_with_fallback(&mut self) -> Result<()> {
        match self.requested {
            Accel::Tcg => self.launch(Accel::Tcg),
            Accel::Kvm => {
                self.launch(Accel::Kvm)?;
                self.settle(self.cfg.kvm_probe)
            }
            Accel::Auto if !kvm_available() => {
                tracing::info!("/dev/kvm is not usable; using TCG");
                self.launch(Accel::Tcg)
            }
            Accel::Auto => {
                let kvm = self
                    .launch(Accel::Kvm)
                    .and_then(|()| self.settle(self.cfg.kvm_probe));
                match kvm {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        tracing::warn!(
                            "KVM did not work for {} ({}); restarting with TCG",
                            self.plan.name,
                            crate::util::tail(&format!("{e:#}"), 1)
                        );
                        self.kill();
                        self.launch(Accel::Tcg)
                    }
                }
            }
        }
    }

    /// Starts QEMU with a fresh overlay, vars copy and ports; retries when a host port was taken.
    fn launch(&mut self, accel: Accel) -> Result<()> {
        let name = self.plan.name.clone();
        self.plan.accel = accel;
        let d = self.dir_path.clone();
        for f in [
            "disk.qcow2",
            "OVMF_VARS.fd",
            "serial.log",
            "qga.sock",
            "qmp.sock",
            "qemu.pid",
        ] {
            let _ = std::fs::remove_file(d.join(f));
        }
        crate::util::run(
            Command::new("qemu-img")
                .args([
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-F",
                    &self.image_format,
                    "-b",
                ])
                .arg(&self.image)
                .arg(&self.plan.disk),
        )
        .with_context(|| format!("creating overlay disk for {name}"))?;
        if self.plan.firmware == Firmware::Uefi {
            std::fs::copy(&self.cfg.ovmf_vars, &self.plan.ovmf_vars)
                .with_context(|| format!("copying OVMF variables for {name}"))?;
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let ports = net::free_ports(self.cfg.guest_ports.len())?;
            self.plan.hostfwd = self
                .cfg
                .guest_ports
                .iter()
                .zip(ports)
                .map(|(&guest, host)| PortForward { guest, host })
                .collect();
            self.spawn()
                .with_context(|| format!("starting qemu for {name}"))?;
            match self.settle(Duration::from_millis(800)) {
                Ok(()) => return Ok(()),
                Err(e) if attempt < 3 && self.stderr_tail(20).contains("host forwarding") => {
                    tracing::debug!("host port taken, retrying: {e:#}");
                    self.kill();
                }
                Err(e) => {
                    self.kill();
                    return Err(e);
                }
            }
        }
    }

    fn spawn(&mut self) -> Result<()> {
        let stderr = std::fs::File::create(&self.stderr_log).context("creating qemu stderr log")?;
        let mut cmd = if self.cfg.tie_to_parent && setpriv_available() {
            let mut c = Command::new("setpriv");
            c.args(["--pdeathsig", "KILL", "--"]).arg(&self.cfg.qemu);
            c
        } else {
            Command::new(&self.cfg.qemu)
        };
        cmd.args(qemu_args(&self.plan))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .process_group(0);
        tracing::debug!(
            "starting {} for {} ({}, {})",
            self.cfg.qemu.display(),
            self.plan.name,
            self.plan.accel,
            self.plan.firmware
        );
        let child = cmd.spawn().context("spawning qemu-system-x86_64")?;
        let cleanup = (!self.cfg.keep).then(|| self.dir_path.clone());
        reaper::register(child.id(), cleanup);
        self.child = Some(child);
        self.started = Instant::now();
        Ok(())
    }

    /// Watches QEMU for `d`: an error if it exits or (under KVM) reports a KVM failure.
    fn settle(&mut self, d: Duration) -> Result<()> {
        let until = Instant::now() + d;
        loop {
            self.check_running()?;
            if let Some(k) = self.kvm_failure() {
                bail!("qemu reported a KVM failure: {k}");
            }
            if Instant::now() >= until {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// An error when QEMU is no longer running (with the tail of its stderr).
    pub fn check_running(&mut self) -> Result<()> {
        let Some(child) = self.child.as_mut() else {
            bail!("qemu for {} is not running", self.plan.name);
        };
        if let Some(status) = child.try_wait().context("checking on qemu")? {
            let pid = child.id();
            reaper::unregister(pid);
            self.child = None;
            bail!(
                "qemu for {} exited ({status}): {}",
                self.plan.name,
                self.stderr_tail(10)
            );
        }
        Ok(())
    }

    /// Under KVM: the KVM error QEMU printed, if any.
    pub fn kvm_failure(&self) -> Option<String> {
        if self.plan.accel != Accel::Kvm {
            return None;
        }
        let err = self.stderr_tail(30);
        is_kvm_failure(&err).then(|| crate::util::tail(&err, 3))
    }

    /// In auto mode, when KVM failed after start (QEMU died, or paused with a KVM internal error),
    /// restarts the VM from scratch with TCG and returns true. Timings restart with it.
    pub fn fall_back_if_kvm_failed(&mut self) -> Result<bool> {
        if self.requested != Accel::Auto || self.plan.accel != Accel::Kvm {
            return Ok(false);
        }
        let failure = match self.kvm_failure() {
            Some(k) => k,
            None => match self.check_running() {
                Ok(()) => return Ok(false),
                Err(e) => format!("{e:#}"),
            },
        };
        tracing::warn!(
            "KVM failed for {} ({}); restarting with TCG",
            self.plan.name,
            crate::util::tail(&failure, 1)
        );
        self.kill();
        self.launch(Accel::Tcg)?;
        Ok(true)
    }

    /// The host port that forwards to `guest_port`.
    pub fn host_port(&self, guest_port: u16) -> Option<u16> {
        self.plan
            .hostfwd
            .iter()
            .find(|f| f.guest == guest_port)
            .map(|f| f.host)
    }
    /// All port forwards.
    pub fn forwards(&self) -> &[PortForward] {
        &self.plan.hostfwd
    }
    /// The resolved launch plan (what QEMU was started with).
    pub fn plan(&self) -> &LaunchPlan {
        &self.plan
    }
    /// The accelerator in use (`Tcg` or `Kvm`).
    pub fn accel(&self) -> Accel {
        self.plan.accel
    }
    /// The guest agent socket.
    pub fn qga_socket(&self) -> &Path {
        &self.plan.qga_socket
    }
    /// The serial console log.
    pub fn serial_log(&self) -> &Path {
        &self.plan.serial_log
    }
    /// The work directory.
    pub fn work_dir(&self) -> &Path {
        &self.dir_path
    }
    /// When QEMU was (last) started: "power on".
    pub fn started(&self) -> Instant {
        self.started
    }
    /// QEMU's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Connects to the guest agent, waiting up to `timeout` for it to answer.
    pub fn qga(&self, timeout: Duration) -> Result<super::Qga> {
        super::Qga::connect(&self.plan.qga_socket, timeout)
            .with_context(|| format!("talking to the guest agent of {}", self.plan.name))
    }

    /// The last `n` lines of the serial console.
    pub fn serial_tail(&self, n: usize) -> String {
        read_tail(&self.plan.serial_log, n)
    }

    /// The last `n` lines of QEMU's stderr.
    pub fn stderr_tail(&self, n: usize) -> String {
        read_tail(&self.stderr_log, n)
    }

    /// Keeps the work directory after the VM stops; returns its path.
    pub fn keep_files(&mut self) -> PathBuf {
        self.cfg.keep = true;
        if let Some(pid) = self.pid() {
            reaper::unregister(pid);
            reaper::register(pid, None);
        }
        self.dir_path.clone()
    }

    /// Kills QEMU (its whole process group) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id();
            reaper::unregister(pid);
            reaper::kill_tree(pid);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the VM and removes its work directory (unless kept).
    pub fn stop(mut self) -> Result<()> {
        self.kill();
        if let Some(dir) = self.dir.take() {
            if self.cfg.keep {
                let _ = dir.keep();
            } else {
                dir.close().context("removing VM work directory")?;
            }
        }
        Ok(())
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = self.dir.take() {
            if self.cfg.keep {
                let _ = dir.keep();
            }
        }
    }
}

fn read_tail(path: &Path, n: usize) -> String {
    std::fs::read(path)
        .map(|b| crate::util::tail(&String::from_utf8_lossy(&b), n))
        .unwrap_or_default()
}
