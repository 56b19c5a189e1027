//! **TEST SEAM / TEST DOUBLE — not product code, never shipped.** [`GuestEmulator`] plays the
//! *guest* of fleet VMs in fakepve (`tests/fakepve/harness.py`), which boots nothing.
//!
//! fakepve keeps VMs as records: `POST …/status/start` only flips their status. The Proxmox fleet
//! provider (`imagectl deploy --provider proxmox`) however waits for what a booted runner VM does:
//! the agent's `status.json` read through the QEMU guest agent, and the runner `online` in GitLab.
//! This emulator closes that gap from outside the provider, over fakepve's loopback control
//! channel ([`PveControl`]), with the real pieces wherever there are real pieces:
//!
//! 1. Every ~200 ms it reads the fake's state. A **running** VM whose `ide2` holds a seed ISO named
//!    `imagectl-seed-*.iso` (`<storage>:iso/imagectl-seed-<vm>.iso,media=cdrom`, as the provider
//!    attaches it) and that it has not booted yet is booted, in a thread of its own:
//! 2. after [`GuestOptions::boot_delay`], the guest agent comes up (`file-read` answers `''` for
//!    every file instead of PVE's 500 "QEMU guest agent is not running");
//! 3. the seed ISO's bytes (the harness keeps uploaded ISOs, see [`PveControl::iso_file`]) are
//!    extracted with `xorriso -osirrox on -indev ISO -extract / DIR`;
//! 4. the **real** `imagectl-agent` runs on it: `--root <per-VM temp root> --seed-dir <extracted>
//!    --no-systemctl` plus [`GuestOptions::agent_args`]. It verifies and rotates the runner token
//!    at the GitLab URL of the seed's `agent.json` (the fleet writes the GitLab fake's loopback URL
//!    there for the proxmox provider) and writes `status.json`;
//! 5. `<root>/var/lib/imagectl/status.json` is published as the guest agent's file
//!    [`imagectl_proto::STATUS_PATH`] whenever it changes (so `running` shows before
//!    `registered`/`failed`);
//! 6. an emulated gitlab-runner ([`runner`]) starts with the boot: once the agent has written
//!    `<root>/etc/gitlab-runner/config.toml` it polls `POST {url}/api/v4/jobs/request` every
//!    [`GuestOptions::job_poll_interval`] with the token from that file and the manager's
//!    `system_id`, as gitlab-runner does, while the VM exists and runs, and serves gitlab-runner's
//!    API request counter on a loopback port of its own, which the agent reads
//!    (`--runner-metrics-url`) before it reports `registered`.
//!
//! A VM that is stopped loses its guest agent; started again it "reboots" with the same root (the
//! agent finds its `registered` marker and exits 0, polling resumes). A VM that disappears is
//! forgotten (its running agent is killed, its root removed).
//!
//! Faults: [`GuestMode`] (globally, or per VM name with [`GuestOptions::mode_for`]) makes a guest
//! lack the guest agent, hang before writing a status, or never boot. Everything else — the agent
//! *failing* — comes from the GitLab fake's own fault injection, e.g.
//! `gl.fault("POST", "/runners/verify", 403, 5)` makes the real agent report `failed`.
//!
//! The runner token never reaches the emulator's output ([`GuestEmulator::log`], also echoed on
//! stderr): `agent.json` is never printed, the agent redacts its own output, and the rotated token
//! read from config.toml is held as a [`Secret`]. Dropping the emulator stops it: running agents
//! are killed, threads joined, temporary directories removed.
//!
//! ```no_run
//! use imagectl_tests::fakepve::FakePve;
//! use imagectl_tests::pve_guest::{GuestEmulator, GuestMode, GuestOptions};
//! # let agent_bin = std::path::PathBuf::from("target/debug/imagectl-agent");
//! let pve = FakePve::start();
//! let guests = GuestEmulator::start(
//!     &pve,
//!     agent_bin,
//!     GuestOptions::default().mode_for(|name| {
//!         if name.ends_with("-02") { GuestMode::NoGuestAgent } else { GuestMode::Normal }
//!     }),
//! );
//! // … run `imagectl deploy --provider proxmox` against pve.env() …
//! let runs = guests.runs();
//! # let _ = runs;
//! ```

mod runner;

use crate::fakepve::{FakePve, PveControl, State, Vm};
use imagectl_proto::{AgentState, AgentStatus, STATUS_PATH};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What an emulated guest does when its VM starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestMode {
    /// Boots: guest agent up, the real imagectl-agent runs, status published, gitlab-runner polls.
    Normal,
    /// Like `Normal` (the agent registers and the runner polls, so GitLab shows it online), but
    /// no QEMU guest agent ever answers: `file-read` stays PVE's 500 "QEMU guest agent is not
    /// running", so the fleet can never read `status.json` and must time out.
    NoGuestAgent,
    /// Like `Normal`, but the guest agent is stuck: every agent call fails with PVE's
    /// "qmp command 'guest-ping' failed - got timeout" (fakepve's `agent_hangs`).
    AgentTimeout,
    /// The guest agent comes up, but the guest hangs before imagectl-agent writes any status:
    /// `file-read` answers `''` forever, the token is never verified nor rotated.
    HangBeforeStatus,
    /// The VM "runs" but its guest never comes up: no guest agent, no agent, no runner.
    NoBoot,
}

/// Picks a [`GuestMode`] by VM name.
pub type ModeFn = Arc<dyn Fn(&str) -> GuestMode + Send + Sync>;

/// How the emulator behaves.
#[derive(Clone)]
pub struct GuestOptions {
    /// From the VM's start (as the emulator sees it) until its guest agent answers. Default 300 ms.
    pub boot_delay: Duration,
    /// How often the fake's state is read. Default 200 ms.
    pub scan_interval: Duration,
    /// How often the emulated gitlab-runner asks for jobs. Default 1 s.
    pub job_poll_interval: Duration,
    /// The mode of every VM that [`GuestOptions::mode_for`] does not decide. Default `Normal`.
    pub mode: GuestMode,
    /// Per-VM-name mode; overrides [`GuestOptions::mode`].
    pub mode_for: Option<ModeFn>,
    /// Extra `imagectl-agent` arguments after `--root R --seed-dir S --no-systemctl`. Default
    /// `--retry-initial-ms 50 --seed-wait-secs 0` (fast retries; the verify budget is the seed's).
    pub agent_args: Vec<String>,
}

impl Default for GuestOptions {
    fn default() -> Self {
        Self {
            boot_delay: Duration::from_millis(300),
            scan_interval: Duration::from_millis(200),
            job_poll_interval: Duration::from_secs(1),
            mode: GuestMode::Normal,
            mode_for: None,
            agent_args: ["--retry-initial-ms", "50", "--seed-wait-secs", "0"]
                .map(String::from)
                .to_vec(),
        }
    }
}

impl std::fmt::Debug for GuestOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestOptions")
            .field("boot_delay", &self.boot_delay)
            .field("scan_interval", &self.scan_interval)
            .field("job_poll_interval", &self.job_poll_interval)
            .field("mode", &self.mode)
            .field("mode_for", &self.mode_for.as_ref().map(|_| "Fn(&str)"))
            .field("agent_args", &self.agent_args)
            .finish()
    }
}

impl GuestOptions {
    /// Sets [`GuestOptions::mode`].
    pub fn mode(mut self, mode: GuestMode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets [`GuestOptions::mode_for`].
    pub fn mode_for(mut self, f: impl Fn(&str) -> GuestMode + Send + Sync + 'static) -> Self {
        self.mode_for = Some(Arc::new(f));
        self
    }

    /// Sets [`GuestOptions::boot_delay`].
    pub fn boot_delay(mut self, d: Duration) -> Self {
        self.boot_delay = d;
        self
    }

    /// The mode of the VM called `name`.
    pub fn mode_of(&self, name: &str) -> GuestMode {
        self.mode_for.as_ref().map_or(self.mode, |f| f(name))
    }
}

/// One boot of one VM's guest, as the emulator ran it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestRun {
    /// VM id.
    pub vmid: u32,
    /// VM name.
    pub name: String,
    /// 1 for the first boot, 2 after one stop/start, …
    pub boot: u32,
    /// The mode it ran in.
    pub mode: GuestMode,
    /// imagectl-agent's exit code; `None` if it did not run or was killed (VM gone, emulator
    /// stopped).
    pub exit_code: Option<i32>,
    /// The `state` of its status.json after the agent exited, if it wrote one.
    pub state: Option<AgentState>,
    /// `POST /jobs/request` answered 204 this many times (the emulated gitlab-runner).
    pub job_requests: u64,
}

/// The running emulator. Dropping it stops it (see the module docs).
pub struct GuestEmulator {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl GuestEmulator {
    /// Starts emulating the guests of `pve`'s VMs with the `imagectl-agent` binary `agent_bin`.
    pub fn start(pve: &FakePve, agent_bin: impl Into<PathBuf>, opts: GuestOptions) -> Self {
        Self::start_with_control(pve.control_handle(), agent_bin, opts)
    }

    /// Like [`GuestEmulator::start`], from a control handle.
    pub fn start_with_control(
        ctl: PveControl,
        agent_bin: impl Into<PathBuf>,
        opts: GuestOptions,
    ) -> Self {
        let agent_bin = agent_bin.into();
        assert!(
            agent_bin.is_file(),
            "pve_guest: imagectl-agent binary {} missing",
            agent_bin.display()
        );
        let shared = Arc::new(Shared::default());
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("pve-guest".into())
            .spawn(move || {
                Scanner {
                    shared: sh,
                    ctl,
                    agent_bin,
                    opts: Arc::new(opts),
                }
                .run()
            })
            .expect("starting the pve_guest thread");
        Self {
            shared,
            thread: Some(thread),
        }
    }

    /// Every boot so far (a record appears once the guest finished booting: after the agent
    /// exited, or at once in the modes without an agent), oldest first.
    pub fn runs(&self) -> Vec<GuestRun> {
        lock(&self.shared.runs).clone()
    }

    /// Everything the emulator said (also echoed on stderr), with the agents' output.
    pub fn log(&self) -> String {
        lock(&self.shared.log).clone()
    }

    /// Waits until `done(runs)` holds; panics with `what` and the log after `timeout`.
    pub fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&[GuestRun]) -> bool,
    ) -> Vec<GuestRun> {
        let until = Instant::now() + timeout;
        loop {
            let runs = self.runs();
            if done(&runs) {
                return runs;
            }
            assert!(
                Instant::now() < until,
                "pve_guest: {what}: not within {timeout:?}; runs: {runs:?}\nlog:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until at least `n` boots finished.
    pub fn wait_for_runs(&self, n: usize, timeout: Duration) -> Vec<GuestRun> {
        self.wait_until(timeout, &format!("{n} guest boot(s)"), |r| r.len() >= n)
    }

    /// Stops the emulator (as dropping it does).
    pub fn stop(self) {}
}

impl Drop for GuestEmulator {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ------------------------------------------------------------------------------------------------

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    runs: Mutex<Vec<GuestRun>>,
    log: Mutex<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn say(&self, vmid: u32, name: &str, msg: impl Display) {
        let line = format!("pve_guest: vm {vmid} ({name}): {msg}");
        eprintln!("{line}");
        let mut log = lock(&self.log);
        log.push_str(&line);
        log.push('\n');
    }

    /// Sleeps `d` while `up` holds and the emulator runs; false if either ended.
    fn sleep_while(&self, up: &AtomicBool, d: Duration) -> bool {
        let until = Instant::now() + d;
        loop {
            if self.stopped() || !up.load(Ordering::SeqCst) {
                return false;
            }
            let now = Instant::now();
            if now >= until {
                return true;
            }
            std::thread::sleep((until - now).min(Duration::from_millis(25)));
        }
    }
}

/// A VM the scanner booted at least once.
struct Guest {
    name: String,
    dir: PathBuf,
    up: Arc<AtomicBool>,
    /// Booted during the VM's current running period.
    booted: bool,
    boots: u32,
    thread: Option<JoinHandle<()>>,
}

/// The main thread: reads the fake's state, boots and forgets guests.
struct Scanner {
    shared: Arc<Shared>,
    ctl: PveControl,
    agent_bin: PathBuf,
    opts: Arc<GuestOptions>,
}

/// `(storage, filename)` of the imagectl seed ISO on `ide2`, if one is there.
fn seed_of(vm: &Vm) -> Option<(String, String)> {
    let ide2 = vm.config.get("ide2")?;
    let volid = ide2.split(',').next()?;
    let (storage, vol) = volid.split_once(':')?;
    let file = vol.strip_prefix("iso/")?;
    (file.starts_with("imagectl-seed-") && file.ends_with(".iso") && !file.contains('/'))
        .then(|| (storage.to_owned(), file.to_owned()))
}

impl Scanner {
    fn run(self) {
        let base = match tempfile::Builder::new().prefix("pve-guest-").tempdir() {
            Ok(d) => d,
            Err(e) => {
                self.shared
                    .say(0, "-", format!("cannot create a temp dir: {e}"));
                return;
            }
        };
        let mut guests: BTreeMap<u32, Guest> = BTreeMap::new();
        let mut retired: Vec<Guest> = Vec::new();
        let mut seq = 0u64;
        while !self.shared.stopped() {
            if let Ok(state) = self.ctl.try_state() {
                self.reconcile(&state, &mut guests, &mut retired, base.path(), &mut seq);
            }
            retired.retain_mut(|g| !reap(g, false));
            let forever = AtomicBool::new(true);
            self.shared.sleep_while(&forever, self.opts.scan_interval);
        }
        for g in guests.values() {
            g.up.store(false, Ordering::SeqCst);
        }
        for mut g in guests.into_values().chain(retired) {
            reap(&mut g, true);
        }
        drop(base);
    }

    fn reconcile(
        &self,
        state: &State,
        guests: &mut BTreeMap<u32, Guest>,
        retired: &mut Vec<Guest>,
        base: &Path,
        seq: &mut u64,
    ) {
        let present: BTreeSet<u32> = state.vms.iter().map(|v| v.vmid).collect();
        for vmid in guests.keys().copied().collect::<Vec<_>>() {
            let renamed = state
                .vms
                .iter()
                .find(|v| v.vmid == vmid)
                .is_some_and(|v| v.name != guests[&vmid].name);
            if !present.contains(&vmid) || renamed {
                if let Some(g) = guests.remove(&vmid) {
                    g.up.store(false, Ordering::SeqCst);
                    self.shared.say(vmid, &g.name, "VM gone; guest forgotten");
                    retired.push(g);
                }
            }
        }
        for vm in state.vms.iter().filter(|v| !v.template) {
            let running = vm.status == "running";
            let iso = seed_of(vm).map(|(storage, file)| {
                let volid = format!("{storage}:iso/{file}");
                state
                    .volumes
                    .iter()
                    .find(|v| v.volid == volid)
                    .and_then(|v| v.path.clone())
                    .unwrap_or_else(|| self.ctl.iso_file(&storage, &file))
            });
            match guests.get_mut(&vm.vmid) {
                None => {
                    let Some(iso) = iso.filter(|p| running && p.is_file()) else {
                        continue;
                    };
                    *seq += 1;
                    let dir = base.join(format!("vm{}-{seq}", vm.vmid));
                    if let Err(e) = std::fs::create_dir_all(dir.join("root/etc")) {
                        self.shared.say(
                            vm.vmid,
                            &vm.name,
                            format!("cannot create {}: {e}", dir.display()),
                        );
                        continue;
                    }
                    let mut g = Guest {
                        name: vm.name.clone(),
                        dir,
                        up: Arc::new(AtomicBool::new(true)),
                        booted: false,
                        boots: 0,
                        thread: None,
                    };
                    self.boot(vm.vmid, &mut g, Some(iso));
                    guests.insert(vm.vmid, g);
                }
                Some(g) if !running => {
                    if g.booted {
                        self.shared.say(vm.vmid, &g.name, "VM stopped");
                    }
                    g.up.store(false, Ordering::SeqCst);
                    g.booted = false;
                }
                Some(g) => {
                    if g.booted || g.thread.as_ref().is_some_and(|t| !t.is_finished()) {
                        continue;
                    }
                    if let Some(t) = g.thread.take() {
                        let _ = t.join();
                    }
                    g.up.store(true, Ordering::SeqCst);
                    self.boot(vm.vmid, g, iso.filter(|p| p.is_file()));
                }
            }
        }
    }

    fn boot(&self, vmid: u32, g: &mut Guest, iso: Option<PathBuf>) {
        g.boots += 1;
        g.booted = true;
        let mode = self.opts.mode_of(&g.name);
        self.shared.say(
            vmid,
            &g.name,
            format!("VM running: boot {} ({mode:?})", g.boots),
        );
        let b = Boot {
            vmid,
            name: g.name.clone(),
            boot: g.boots,
            mode,
            dir: g.dir.clone(),
            iso,
            up: g.up.clone(),
            shared: self.shared.clone(),
            ctl: self.ctl.clone(),
            agent_bin: self.agent_bin.clone(),
            opts: self.opts.clone(),
        };
        match std::thread::Builder::new()
            .name(format!("pve-guest-{vmid}"))
            .spawn(move || b.run())
        {
            Ok(t) => g.thread = Some(t),
            Err(e) => self
                .shared
                .say(vmid, &g.name, format!("cannot start a thread: {e}")),
        }
    }
}

/// Joins a forgotten guest's thread (if finished, or `wait`) and removes its directory; true
/// when done.
fn reap(g: &mut Guest, wait: bool) -> bool {
    if let Some(t) = &g.thread {
        if !wait && !t.is_finished() {
            return false;
        }
    }
    if let Some(t) = g.thread.take() {
        let _ = t.join();
    }
    let _ = std::fs::remove_dir_all(&g.dir);
    true
}

/// One boot of one guest, in its own thread.
struct Boot {
    vmid: u32,
    name: String,
    boot: u32,
    mode: GuestMode,
    dir: PathBuf,
    iso: Option<PathBuf>,
    up: Arc<AtomicBool>,
    shared: Arc<Shared>,
    ctl: PveControl,
    agent_bin: PathBuf,
    opts: Arc<GuestOptions>,
}

impl Boot {
    fn say(&self, msg: impl Display) {
        self.shared.say(self.vmid, &self.name, msg);
    }

    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    fn status_file(&self) -> PathBuf {
        self.root().join(STATUS_PATH.trim_start_matches('/'))
    }

    fn record(&self, exit_code: Option<i32>, state: Option<AgentState>) -> usize {
        let mut runs = lock(&self.shared.runs);
        runs.push(GuestRun {
            vmid: self.vmid,
            name: self.name.clone(),
            boot: self.boot,
            mode: self.mode,
            exit_code,
            state,
            job_requests: 0,
        });
        runs.len() - 1
    }

    /// Sets the guest agent's files: none (agent down), or status.json if there is one.
    fn set_agent(&self, files: Option<BTreeMap<String, String>>) {
        if let Err(e) = self.ctl.try_set_agent_files(self.vmid, files.as_ref()) {
            if self.up.load(Ordering::SeqCst) && !self.shared.stopped() {
                self.say(format!("setting the guest agent: {e}"));
            }
        }
    }

    /// Publishes status.json through the guest agent if it changed since `last`.
    fn publish(&self, last: &mut Option<String>) {
        let text = std::fs::read_to_string(self.status_file()).ok();
        if text.is_none() || *last == text {
            return;
        }
        *last = text.clone();
        if matches!(self.mode, GuestMode::Normal) {
            let files = text.map(|t| BTreeMap::from([(STATUS_PATH.to_owned(), t)]));
            self.set_agent(files);
        }
    }

    fn run(self) {
        // Power on: no guest agent until the guest has booted.
        self.set_agent(None);
        if !self.shared.sleep_while(&self.up, self.opts.boot_delay) {
            return;
        }
        match self.mode {
            GuestMode::NoBoot => {
                self.say("guest never boots (NoBoot)");
                self.record(None, None);
                return;
            }
            GuestMode::NoGuestAgent => self.say("guest up, without a guest agent (NoGuestAgent)"),
            GuestMode::AgentTimeout => {
                if let Err(e) = self.ctl.try_control(
                    "agent",
                    json!({"vmid": self.vmid, "files": {}, "hangs": true}),
                ) {
                    self.say(format!("setting the guest agent: {e}"));
                }
                self.say("guest up, its guest agent times out (AgentTimeout)");
            }
            GuestMode::Normal | GuestMode::HangBeforeStatus => {
                // A reboot shows the status.json kept on the root disk.
                let files = std::fs::read_to_string(self.status_file())
                    .map(|t| BTreeMap::from([(STATUS_PATH.to_owned(), t)]))
                    .unwrap_or_default();
                self.set_agent(Some(files));
                self.say("guest agent up");
            }
        }
        if self.mode == GuestMode::HangBeforeStatus {
            self.say("guest hangs before imagectl-agent writes a status (HangBeforeStatus)");
            self.record(None, None);
            return;
        }
        let emu = {
            let shared = self.shared.clone();
            let (vmid, name) = (self.vmid, self.name.clone());
            runner::EmulatedRunner::start(
                self.root(),
                self.opts.job_poll_interval,
                self.up.clone(),
                move |m| shared.say(vmid, &name, m),
            )
        };
        let emu = match emu {
            Ok(e) => e,
            Err(e) => {
                self.say(format!("cannot start the emulated gitlab-runner: {e}"));
                self.record(None, None);
                return;
            }
        };
        let seed = self.dir.join(format!("seed-{}", self.boot));
        let _ = std::fs::remove_dir_all(&seed);
        self.extract_seed(&seed);
        let outcome = self.run_agent(&seed, &emu.metrics_url);
        // The extracted seed holds the one-time token: do not keep it around.
        make_writable(&seed);
        let _ = std::fs::remove_dir_all(&seed);
        let Some(code) = outcome else {
            self.record(None, None);
            emu.join();
            return;
        };
        let status: Option<AgentStatus> = std::fs::read(self.status_file())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let state = status.as_ref().map(|s| s.state);
        self.say(format!(
            "imagectl-agent exited {code:?}, status {}",
            state.map_or("missing".to_owned(), |s| format!("{s:?}").to_lowercase())
        ));
        let idx = self.record(code, state);
        // gitlab-runner keeps polling while the VM runs (whatever the agent reported).
        while self
            .shared
            .sleep_while(&self.up, Duration::from_millis(100))
        {
            lock(&self.shared.runs)[idx].job_requests = emu.job_requests.load(Ordering::SeqCst);
        }
        lock(&self.shared.runs)[idx].job_requests = emu.job_requests.load(Ordering::SeqCst);
        emu.join();
    }

    /// Extracts the seed ISO into `seed` (left empty if there is none or it cannot be read: the
    /// agent then fails as it would without its seed).
    fn extract_seed(&self, seed: &Path) {
        let Some(iso) = &self.iso else {
            let _ = std::fs::create_dir_all(seed);
            return;
        };
        let out = Command::new("xorriso")
            .args(["-osirrox", "on", "-indev"])
            .arg(iso)
            .args(["-extract", "/"])
            .arg(seed)
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => make_writable(seed),
            Ok(o) => {
                // xorriso's messages name files, never their contents.
                let err = String::from_utf8_lossy(&o.stderr);
                self.say(format!(
                    "cannot read the seed ISO: xorriso {}: {}",
                    o.status,
                    err.lines().last().unwrap_or_default()
                ));
            }
            Err(e) => self.say(format!(
                "cannot run xorriso (tools/setup-host.sh installs it): {e}"
            )),
        }
        let _ = std::fs::create_dir_all(seed);
    }

    /// Runs imagectl-agent, publishing its status as it changes; `None` if it did not run to the
    /// end (could not start; killed because the VM went away or the emulator stopped).
    fn run_agent(&self, seed: &Path, metrics_url: &str) -> Option<Option<i32>> {
        let log_path = self.dir.join(format!("agent-{}.log", self.boot));
        let out = File::create(&log_path).and_then(|f| Ok((f.try_clone()?, f)));
        let (stdout, stderr) = match out {
            Ok(p) => p,
            Err(e) => {
                self.say(format!("cannot create {}: {e}", log_path.display()));
                return None;
            }
        };
        let spawned = Command::new(&self.agent_bin)
            .arg("--root")
            .arg(self.root())
            .arg("--seed-dir")
            .arg(seed)
            .arg("--no-systemctl")
            .arg("--runner-metrics-url")
            .arg(metrics_url)
            .args(&self.opts.agent_args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                self.say(format!("cannot run {}: {e}", self.agent_bin.display()));
                return None;
            }
        };
        self.say("imagectl-agent started");
        let mut last = None;
        let code = loop {
            match child.try_wait() {
                Ok(Some(st)) => break Some(st.code()),
                Ok(None) => {}
                Err(e) => {
                    self.say(format!("waiting for imagectl-agent: {e}"));
                    break None;
                }
            }
            self.publish(&mut last);
            if !self.shared.sleep_while(&self.up, Duration::from_millis(50)) {
                let _ = child.kill();
                let _ = child.wait();
                self.say("imagectl-agent killed (VM stopped or gone, or emulator stopped)");
                break None;
            }
        };
        for line in std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .lines()
        {
            self.say(format_args!("agent: {line}"));
        }
        let _ = std::fs::remove_file(&log_path);
        self.publish(&mut last);
        code
    }
}

/// Makes an extracted ISO tree (0555 dirs, 0444/0400 files) owner-writable so it can be removed.
fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return;
    };
    if meta.is_dir() {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            make_writable(&e.path());
        }
    } else if meta.is_file() {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o600));
    }
}
