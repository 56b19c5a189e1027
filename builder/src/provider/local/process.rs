//! QEMU processes of the local provider: started detached (their own process group, no
//! parent-death signal) so they outlive `imagectl deploy`, found again by pid file, and killed by
//! pid on `destroy`. A tiny QMP client ejects the seed cdrom and asks for an ACPI power-down.
//!
//! The command line comes from [`crate::vm::args::qemu_args`] (the same layout `imagectl test`
//! boots and Proxmox gives a VM); only the process handling differs from [`crate::vm::QemuVm`],
//! which ties QEMU to the calling process on purpose.

use crate::vm::args::{qemu_args, LaunchPlan};
use anyhow::{anyhow, bail, Context, Result};
use rustix::process::{kill_process, kill_process_group, Pid, Signal};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// QEMU children started by this process, kept so they can be reaped (no zombies) when killed.
static CHILDREN: Mutex<Option<HashMap<u32, Child>>> = Mutex::new(None);

/// True when `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // "pid (comm) S …": the state follows the last ')'.
            let state = stat
                .rsplit_once(')')
                .map(|(_, r)| r.trim_start())
                .unwrap_or("");
            !state.starts_with('Z') && !state.starts_with('X')
        }
        Err(_) => false,
    }
}

/// True when `pid` is alive and is the QEMU of VM `name` (guards against pid reuse).
pub fn is_qemu_of(pid: u32, name: &str) -> bool {
    if !pid_alive(pid) {
        return false;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let want = format!("process=imagectl-{name}");
    String::from_utf8_lossy(&cmdline).contains(&want)
}

/// Starts QEMU for `plan`, detached; stderr goes to `stderr_log`. Returns its pid once it has run
/// for `settle` without exiting.
pub fn spawn(qemu: &Path, plan: &LaunchPlan, stderr_log: &Path, settle: Duration) -> Result<u32> {
    let stderr = std::fs::File::create(stderr_log).context("creating qemu's stderr log")?;
    let mut child = Command::new(qemu)
        .args(qemu_args(plan))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {} (is QEMU installed?)", qemu.display()))?;
    let pid = child.id();
    let until = Instant::now() + settle;
    while Instant::now() < until {
        if let Some(status) = child.try_wait().context("checking on qemu")? {
            bail!(
                "qemu exited at start ({status}): {}",
                read_tail(stderr_log, 10)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    CHILDREN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(pid, child);
    Ok(pid)
}

/// Kills a QEMU (its process group) and waits up to `wait` for it to be gone.
pub fn kill(pid: u32, wait: Duration) -> Result<()> {
    if let Some(p) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = kill_process_group(p, Signal::KILL);
        let _ = kill_process(p, Signal::KILL);
    }
    if let Some(mut c) = CHILDREN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_mut()
        .and_then(|m| m.remove(&pid))
    {
        let _ = c.wait();
    }
    let until = Instant::now() + wait;
    while pid_alive(pid) {
        if Instant::now() >= until {
            bail!("qemu (pid {pid}) did not die after SIGKILL");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The pid in QEMU's pid file, if any.
pub fn read_pidfile(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The last `n` lines of a log file.
pub fn read_tail(path: &Path, n: usize) -> String {
    std::fs::read(path)
        .map(|b| crate::util::tail(&String::from_utf8_lossy(&b), n))
        .unwrap_or_default()
}

/// A QMP session (QEMU's machine protocol) on a unix socket.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self> {
        let s = UnixStream::connect(socket)
            .with_context(|| format!("connecting to QMP at {}", socket.display()))?;
        s.set_read_timeout(Some(timeout))
            .context("setting the QMP timeout")?;
        let writer = s.try_clone().context("cloning the QMP socket")?;
        let mut q = Self {
            reader: BufReader::new(s),
            writer,
        };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            bail!("QMP greeting missing: {greeting}");
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .context("reading from QMP")?;
        if n == 0 {
            bail!("QMP closed the connection");
        }
        serde_json::from_str(&line).context("parsing a QMP message")
    }

    /// Runs a command; returns its `return` value (events in between are skipped).
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        writeln!(self.writer, "{msg}").context("writing to QMP")?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(anyhow!(
                    "QMP {command}: {}",
                    e["desc"].as_str().unwrap_or("error")
                ));
            }
        }
    }
}

/// Ejects the cdrom whose block backend is `drive` (the seed) and closes its file.
pub fn eject(qmp_socket: &Path, drive: &str) -> Result<()> {
    let mut q = Qmp::connect(qmp_socket, Duration::from_secs(10))?;
    let blocks = q.execute("query-block", None)?;
    let qdev = blocks.as_array().and_then(|a| {
        a.iter()
            .find(|b| b["device"].as_str() == Some(drive))
            .and_then(|b| b["qdev"].as_str().map(str::to_string))
    });
    let args = match qdev {
        Some(id) => json!({ "id": id, "force": true }),
        None => json!({ "device": drive, "force": true }),
    };
    q.execute("eject", Some(args)).map(|_| ())
}

/// Asks the guest to power down (ACPI), then waits up to `grace` for QEMU to exit.
pub fn powerdown(qmp_socket: &Path, pid: u32, grace: Duration) -> bool {
    let asked = Qmp::connect(qmp_socket, Duration::from_secs(5))
        .and_then(|mut q| q.execute("system_powerdown", None))
        .is_ok();
    if !asked {
        return false;
    }
    let until = Instant::now() + grace;
    while Instant::now() < until {
        if !pid_alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

/// Paths of one VM's runtime files.
#[derive(Debug, Clone)]
pub struct VmPaths {
    /// The VM directory.
    pub dir: PathBuf,
}

impl VmPaths {
    /// Overlay disk.
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
    /// Seed ISO while attached.
    pub fn seed(&self) -> PathBuf {
        self.dir.join("seed.iso")
    }
    /// QEMU pid file.
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
    /// Guest agent socket.
    pub fn qga(&self) -> PathBuf {
        self.dir.join("qga.sock")
    }
    /// QMP socket.
    pub fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    /// Serial console log.
    pub fn serial(&self) -> PathBuf {
        self.dir.join("serial.log")
    }
    /// QEMU's stderr.
    pub fn stderr(&self) -> PathBuf {
        self.dir.join("qemu.stderr.log")
    }
    /// OVMF variables copy.
    pub fn ovmf_vars(&self) -> PathBuf {
        self.dir.join("OVMF_VARS.fd")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_follows_the_process() {
        let mut c = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = c.id();
        assert!(pid_alive(pid));
        assert!(!is_qemu_of(pid, "x"), "sleep is not a QEMU");
        // Killed: a zombie until reaped, which counts as gone.
        kill(pid, Duration::from_secs(5)).unwrap();
        assert!(!pid_alive(pid));
        c.wait().unwrap();
        assert!(!pid_alive(999_999_999));
    }
}
