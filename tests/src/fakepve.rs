//! A running fakepve (PyPI `fakepve[crypto]`, AGPL, test-only) behind `tests/fakepve/harness.py`,
//! for the publish/images/gc tests.
//!
//! The harness serves the PVE API on `https://127.0.0.1:<free port>` with a real certificate
//! signed by its own CA, creates an API token, and takes faults and state queries on a loopback
//! control port. The Python interpreter is `$FAKEPVE_PYTHON`, else `<workspace>/.venv/bin/python`
//! (`python3 -m venv .venv && .venv/bin/pip install 'fakepve[crypto]'`). The process is killed
//! when the [`FakePve`] is dropped (and exits on its own when its stdin closes).
//!
//! ```no_run
//! let pve = imagectl_tests::fakepve::FakePve::start();
//! pve.fail("POST", "/template", 500, "can't lock file '/var/lock/qemu-server/lock-100.conf' - got timeout", Some(2));
//! // … run imagectl with pve.env() …
//! assert!(pve.vms().iter().all(|v| v.template));
//! ```

use serde::Deserialize;
use serde_json::{json, Value};
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
    /// Config lock.
    pub lock: Option<String>,
    /// Tags.
    pub tags: String,
    /// Notes.
    pub description: String,
    /// Config, values as text.
    pub config: std::collections::BTreeMap<String, String>,
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
}

#[derive(Deserialize)]
struct Hello {
    port: u16,
    control_port: u16,
    fingerprint: String,
    ca_file: PathBuf,
    token: String,
}

/// A running fake PVE.
pub struct FakePve {
    child: Child,
    _stdin: ChildStdin,
    hello: Hello,
    agent: ureq::Agent,
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
            .build()
            .new_agent();
        Self {
            child,
            _stdin: stdin,
            hello,
            agent,
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

    fn control(&self, cmd: &str, body: Value) {
        let mut resp = self
            .agent
            .post(format!(
                "http://127.0.0.1:{}/{cmd}",
                self.hello.control_port
            ))
            .send_json(body)
            .unwrap_or_else(|e| panic!("harness control {cmd}: {e}"));
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        assert_eq!(status, 200, "harness control {cmd}: {text}");
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

    /// Everything the fake holds.
    pub fn state(&self) -> State {
        let mut resp = self
            .agent
            .get(format!(
                "http://127.0.0.1:{}/state",
                self.hello.control_port
            ))
            .call()
            .expect("harness state");
        let text = resp
            .body_mut()
            .read_to_string()
            .expect("harness state body");
        serde_json::from_str(&text).expect("harness state JSON")
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
    }
}
