//! A running fakepve (PyPI `fakepve[crypto]`, AGPL, test-only) behind `tests/fakepve/harness.py`,
//! for the publish/images/gc and Proxmox fleet tests.
//!
//! The harness serves the PVE API on `https://127.0.0.1:<free port>` with a real certificate
//! signed by its own CA, creates an API token, and takes faults and state queries on a loopback
//! control port. The Python interpreter is `$FAKEPVE_PYTHON`, else `<workspace>/.venv/bin/python`
//! (`python3 -m venv .venv && .venv/bin/pip install 'fakepve[crypto]'`). The process is killed
//! when the [`FakePve`] is dropped, and its working directory removed (it also exits on its own
//! when its stdin closes).
//!
//! Beyond the PVE API, the harness keeps the bytes of uploaded ISO volumes
//! ([`FakePve::iso_file`]) and lets a test play the guest agent ([`FakePve::set_agent_files`]);
//! [`PveControl`] is a cloneable handle on the control channel for other threads (the guest
//! emulation in [`crate::pve_guest`] uses it).
//!
//! ```no_run
//! let pve = imagectl_tests::fakepve::FakePve::start();
//! pve.fail("POST", "/template", 500, "can't lock file '/var/lock/qemu-server/lock-100.conf' - got timeout", Some(2));
//! // … run imagectl with pve.env() …
//! assert!(pve.vms().iter().all(|v| v.template));
//! ```

use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

/// A VM as the fake holds it.
#[derive(Debug, Clone, Deserialize)]
pub struct Vm {
    /// VM id.
    pub vmid: u32,
    /// Name.
    pub name: String,
    /// Node.
    pub node: String,
    /// A template.
    pub template: bool,
    /// `running` or `stopped`.
    #[serde(default)]
    pub status: String,
    /// The guest agent answers (set with [`FakePve::set_agent_files`]).
    #[serde(default)]
    pub agent: bool,
    /// Config lock.
    pub lock: Option<String>,
    /// Tags.
    pub tags: String,
    /// Notes.
    pub description: String,
    /// Config, values as text.
    pub config: BTreeMap<String, String>,
}

/// A volume on one of the fake's storages.
#[derive(Debug, Clone, Deserialize)]
pub struct Volume {
    /// `STORAGE:NAME`.
    pub volid: String,
    /// Content type.
    pub content: Option<String>,
    /// Bytes.
    pub size: u64,
    /// Owner.
    pub vmid: Option<u32>,
    /// Where the harness keeps the bytes of an ISO volume (see [`FakePve::iso_file`]).
    #[serde(default)]
    pub path: Option<PathBuf>,
}

/// A task the fake ran.
#[derive(Debug, Clone, Deserialize)]
pub struct Task {
    /// UPID.
    pub upid: String,
    /// Type (imgcopy, qmcreate, …).
    #[serde(rename = "type")]
    pub kind: String,
    /// Exit status once stopped.
    pub exitstatus: Option<String>,
}

/// One upload or download the fake received.
#[derive(Debug, Clone, Deserialize)]
pub struct Upload {
    /// File name.
    pub filename: String,
    /// Bytes received.
    pub bytes: u64,
    /// `stored`, `failed`, `rejected`.
    pub status: String,
}

/// Everything the control channel reports.
#[derive(Debug, Clone, Deserialize)]
pub struct State {
    /// VMs.
    pub vms: Vec<Vm>,
    /// Volumes of every storage.
    pub volumes: Vec<Volume>,
    /// Tasks.
    pub tasks: Vec<Task>,
    /// Uploads.
    pub uploads: Vec<Upload>,
    /// Requests seen: (method, path).
    pub requests: Vec<(String, String)>,
    /// Resource pools.
    #[serde(default)]
    pub pools: Vec<String>,
}

#[derive(Deserialize)]
struct Hello {
    port: u16,
    control_port: u16,
    fingerprint: String,
    ca_file: PathBuf,
    token: String,
    workdir: PathBuf,
}

/// A running fake PVE.
pub struct FakePve {
    child: Child,
    _stdin: ChildStdin,
    hello: Hello,
    ctl: PveControl,
}

/// The harness's loopback control channel: cheap to clone, usable from any thread, valid as long
/// as the [`FakePve`] it came from runs (calls panic after that, except
/// [`PveControl::try_state`]).
#[derive(Clone)]
pub struct PveControl {
    control_port: u16,
    workdir: PathBuf,
    agent: ureq::Agent,
}

impl std::fmt::Debug for PveControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PveControl")
            .field("control_port", &self.control_port)
            .field("workdir", &self.workdir)
            .finish()
    }
}

impl PveControl {
    /// Sends control command `cmd`; `Err` with the harness's answer unless it says 200.
    pub fn try_control(&self, cmd: &str, body: Value) -> Result<(), String> {
        let mut resp = self
            .agent
            .post(format!("http://127.0.0.1:{}/{cmd}", self.control_port))
            .send_json(body)
            .map_err(|e| format!("harness control {cmd}: {e}"))?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        if status == 200 {
            Ok(())
        } else {
            Err(format!("harness control {cmd}: HTTP {status}: {text}"))
        }
    }

    /// Sends control command `cmd`; panics unless the harness answers 200.
    pub fn control(&self, cmd: &str, body: Value) {
        if let Err(e) = self.try_control(cmd, body) {
            panic!("{e}");
        }
    }

    /// The control channel's `/state` answer as it came (JSON text), or why it could not be read.
    pub fn try_state_text(&self) -> Result<String, String> {
        let mut resp = self
            .agent
            .get(format!("http://127.0.0.1:{}/state", self.control_port))
            .call()
            .map_err(|e| format!("harness state: {e}"))?;
        resp.body_mut()
            .read_to_string()
            .map_err(|e| format!("harness state body: {e}"))
    }

    /// Everything the fake holds, or why it could not be read.
    pub fn try_state(&self) -> Result<State, String> {
        let text = self.try_state_text()?;
        serde_json::from_str(&text).map_err(|e| format!("harness state JSON: {e}"))
    }

    /// Everything the fake holds.
    pub fn state(&self) -> State {
        self.try_state().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Sets what VM `vmid`'s guest agent answers: `Some(files)` makes it run, and
    /// `GET …/agent/file-read?file=PATH` answers `files[PATH]` (`''` for other paths); `None`
    /// stops it (PVE's 500 "QEMU guest agent is not running").
    pub fn try_set_agent_files(
        &self,
        vmid: u32,
        files: Option<&BTreeMap<String, String>>,
    ) -> Result<(), String> {
        self.try_control("agent", json!({"vmid": vmid, "files": files}))
    }

    /// Like [`PveControl::try_set_agent_files`]; panics on failure.
    pub fn set_agent_files(&self, vmid: u32, files: Option<&BTreeMap<String, String>>) {
        if let Err(e) = self.try_set_agent_files(vmid, files) {
            panic!("{e}");
        }
    }

    /// Makes VM `vmid`'s guest agent run but never answer (every agent call fails after a
    /// timeout with PVE's "qmp command 'guest-ping' failed - got timeout").
    pub fn set_agent_hangs(&self, vmid: u32) {
        self.control("agent", json!({"vmid": vmid, "files": {}, "hangs": true}));
    }

    /// Where the harness keeps the bytes of ISO volume `storage:iso/filename` (the file exists
    /// while the volume does).
    pub fn iso_file(&self, storage: &str, filename: &str) -> PathBuf {
        self.workdir.join("isos").join(storage).join(filename)
    }

    /// The harness's working directory (kept ISOs, temp files, its PKI).
    pub fn workdir(&self) -> &Path {
        &self.workdir
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The Python that has fakepve installed.
pub fn python() -> PathBuf {
    std::env::var_os("FAKEPVE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv/bin/python"))
}

impl FakePve {
    /// Starts the harness with tasks finishing at once (time scale 0).
    pub fn start() -> Self {
        Self::start_with(0.0)
    }

    /// Starts the harness; `time_scale` real seconds per PVE second.
    pub fn start_with(time_scale: f64) -> Self {
        let py = python();
        assert!(
            py.exists(),
            "{} missing: create it with `python3 -m venv .venv && .venv/bin/pip install 'fakepve[crypto]'` \
             (or set FAKEPVE_PYTHON)",
            py.display()
        );
        let mut child = Command::new(&py)
            .arg(workspace().join("tests/fakepve/harness.py"))
            .args(["--time-scale", &time_scale.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting tests/fakepve/harness.py");
        let stdin = child.stdin.take().expect("harness stdin");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("harness stdout"))
            .read_line(&mut line)
            .expect("reading the harness greeting");
        let hello: Hello = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("harness greeting {line:?}: {e}"));
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(30)))
            .build()
            .new_agent();
        let ctl = PveControl {
            control_port: hello.control_port,
            workdir: hello.workdir.clone(),
            agent,
        };
        Self {
            child,
            _stdin: stdin,
            hello,
            ctl,
        }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.hello.port)
    }

    /// SHA-256 fingerprint of the served certificate, `AB:CD:…`.
    pub fn fingerprint(&self) -> &str {
        &self.hello.fingerprint
    }

    /// The CA certificate that signed it (like `pve-root-ca.pem`).
    pub fn ca_file(&self) -> &Path {
        &self.hello.ca_file
    }

    /// The API token `imagectl@pve!ci=SECRET`.
    pub fn token(&self) -> &str {
        &self.hello.token
    }

    /// The token's secret part.
    pub fn secret(&self) -> &str {
        self.hello.token.split_once('=').map_or("", |(_, s)| s)
    }

    /// The environment for imagectl: endpoint, token and fingerprint.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("PROXMOX_VE_ENDPOINT", self.endpoint()),
            ("PROXMOX_VE_API_TOKEN", self.token().to_string()),
            ("PROXMOX_VE_FINGERPRINT", self.fingerprint().to_string()),
        ]
    }

    /// A handle on the control channel for other threads.
    pub fn control_handle(&self) -> PveControl {
        self.ctl.clone()
    }

    fn control(&self, cmd: &str, body: Value) {
        self.ctl.control(cmd, body);
    }

    /// Answers requests whose path ends with `suffix` with `status` and PVE message `message`
    /// (`times` requests, or all).
    pub fn fail(&self, method: &str, suffix: &str, status: u16, message: &str, times: Option<u32>) {
        self.control(
            "fail",
            json!({"method": method, "suffix": suffix, "status": status, "message": message, "times": times}),
        );
    }

    /// Answers with one of PVE's catalogued errors by name (fakepve's `error=`).
    pub fn fail_named(&self, method: &str, suffix: &str, error: &str, times: Option<u32>) {
        self.control(
            "fail",
            json!({"method": method, "suffix": suffix, "error": error, "times": times}),
        );
    }

    /// Answers with a UPID whose task ends with `TASK ERROR: message`.
    pub fn fail_task(&self, method: &str, suffix: &str, message: &str, times: Option<u32>) {
        self.control(
            "fail-task",
            json!({"method": method, "suffix": suffix, "message": message, "times": times}),
        );
    }

    /// Like [`FakePve::fail_task`], but the task first runs for `secs` real seconds (start the
    /// harness with a non-zero time scale so that tasks run in the background).
    pub fn fail_task_after(&self, method: &str, suffix: &str, message: &str, secs: f64) {
        self.control(
            "fail-task",
            json!({"method": method, "suffix": suffix, "message": message, "times": 1, "delay": secs}),
        );
    }

    /// Takes a node offline or brings it back.
    pub fn set_node_online(&self, node: &str, online: bool) {
        self.control("node", json!({"name": node, "online": online}));
    }

    /// Changes a storage: any of content, shared, avail (bytes), type.
    pub fn set_storage(&self, name: &str, settings: Value) {
        let mut v = settings;
        v["name"] = json!(name);
        self.control("storage", v);
    }

    /// Adds or replaces an API token.
    pub fn set_token(&self, id: &str, secret: &str) {
        self.control("token", json!({"id": id, "secret": secret}));
    }

    /// Makes `GET /version` report `version` (e.g. `8.3.2`).
    pub fn set_version(&self, version: &str) {
        self.control("version", json!({ "version": version }));
    }

    /// Grants `privs` on `path` to `user` (a user or `user@realm!token`). After the first grant
    /// fakepve checks every call against the ACL, as PVE does.
    pub fn grant(&self, user: &str, path: &str, privs: &[&str]) {
        self.control(
            "grant",
            json!({ "user": user, "path": path, "privs": privs }),
        );
    }

    /// Revokes an API token (PVE answers 401 for it from now on).
    pub fn revoke_token(&self, id: &str) {
        self.control("token", json!({"id": id, "remove": true}));
    }

    /// Adds a VM directly (a runner VM, a clone, a VM holding an id).
    pub fn add_vm(&self, vmid: u32, name: &str, node: &str, config: Value) {
        self.control(
            "vm",
            json!({"vmid": vmid, "name": name, "node": node, "config": config}),
        );
    }

    /// Adds a VM in `status` (`running` or `stopped`), e.g. a runner VM that is already up.
    pub fn add_vm_with_status(
        &self,
        vmid: u32,
        name: &str,
        node: &str,
        status: &str,
        config: Value,
    ) {
        self.control(
            "vm",
            json!({"vmid": vmid, "name": name, "node": node, "status": status, "config": config}),
        );
    }

    /// See [`PveControl::set_agent_files`].
    pub fn set_agent_files(&self, vmid: u32, files: Option<&BTreeMap<String, String>>) {
        self.ctl.set_agent_files(vmid, files);
    }

    /// See [`PveControl::set_agent_hangs`].
    pub fn set_agent_hangs(&self, vmid: u32) {
        self.ctl.set_agent_hangs(vmid);
    }

    /// See [`PveControl::iso_file`].
    pub fn iso_file(&self, storage: &str, filename: &str) -> PathBuf {
        self.ctl.iso_file(storage, filename)
    }

    /// The harness's working directory.
    pub fn workdir(&self) -> &Path {
        self.ctl.workdir()
    }

    /// Everything the fake holds.
    pub fn state(&self) -> State {
        self.ctl.state()
    }

    /// Everything the fake holds, as the JSON text the harness sent (for scans for secrets).
    pub fn state_text(&self) -> String {
        self.ctl.try_state_text().unwrap_or_else(|e| panic!("{e}"))
    }

    /// VMs.
    pub fn vms(&self) -> Vec<Vm> {
        self.state().vms
    }

    /// Volumes of every storage.
    pub fn volumes(&self) -> Vec<Volume> {
        self.state().volumes
    }

    /// Import volumes (`…:import/…`) left on any storage.
    pub fn import_volumes(&self) -> Vec<Volume> {
        self.volumes()
            .into_iter()
            .filter(|v| v.volid.contains(":import/"))
            .collect()
    }
}

impl Drop for FakePve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Killed, the harness cannot remove its workdir (its PKI, and kept ISOs: seed ISOs hold
        // runner tokens).
        let _ = std::fs::remove_dir_all(&self.hello.workdir);
    }
}
