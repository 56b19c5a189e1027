//! The PVE guest seam (`imagectl_tests::pve_guest`, a test double) on its own, without the fleet
//! provider: a seed ISO made by `imagectl::seed::write_iso` is uploaded to fakepve through the real
//! PVE API (multipart, API token, TLS with the harness's CA), a running VM gets it on `ide2`, and
//! the emulator must run the real `imagectl-agent` on it against the GitLab fake, show its
//! status.json through `GET …/agent/file-read`, and poll GitLab like gitlab-runner.
//!
//! * `seam_registers_and_reports`: status `registered` through the guest agent, token rotated
//!   (the seed's token is dead), runner `online`, no token in fakepve (state, task logs, VM
//!   config) nor in the emulator's output; stop → agent 500, start → reboot without a new
//!   registration; deleting the ISO volume deletes its kept bytes; destroying the VM forgets it.
//! * `fault_modes`: `NoGuestAgent` (agent 500 although the runner registered), `HangBeforeStatus`
//!   (`''` forever, token untouched) and a failing agent (verify answered 403 by the GitLab fake).

use crate::agent_bin;
use imagectl::remote::pve::tls::{client_config, Observed};
use imagectl::remote::pve::Trust;
use imagectl::seed::{write_iso, SeedConfig};
use imagectl_proto::{AgentSeed, AgentState, AgentStatus, DockerExecutor, Secret, STATUS_PATH};
use imagectl_tests::fakepve::FakePve;
use imagectl_tests::gitlab_fake::{CreatedRunner, GitlabFake, NewRunnerParams};
use imagectl_tests::pve_guest::{GuestEmulator, GuestMode, GuestOptions};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const NODE: &str = "pve1";
const STORAGE: &str = "local";

/// The PVE API as the provider uses it: HTTPS with the CA file, `PVEAPIToken` auth.
struct Api {
    http: reqwest::blocking::Client,
    base: String,
    auth: String,
}

impl Api {
    fn new(pve: &FakePve) -> Self {
        let tls = client_config(
            &Trust::CaFile(pve.ca_file().to_path_buf()),
            Arc::new(Observed::default()),
        )
        .expect("TLS config");
        let http = reqwest::blocking::Client::builder()
            .tls_backend_preconfigured(tls)
            .http1_only()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("HTTP client");
        Self {
            http,
            base: format!("{}/api2/json", pve.endpoint()),
            auth: format!("PVEAPIToken={}", pve.token()),
        }
    }

    fn send(&self, req: reqwest::blocking::RequestBuilder) -> (u16, String) {
        let resp = req
            .header("Authorization", &self.auth)
            .send()
            .expect("PVE request");
        let status = resp.status().as_u16();
        (status, resp.text().unwrap_or_default())
    }

    fn get(&self, path: &str) -> (u16, String) {
        self.send(self.http.get(format!("{}{path}", self.base)))
    }

    fn post(&self, path: &str) -> (u16, String) {
        self.send(
            self.http
                .post(format!("{}{path}", self.base))
                .form(&Vec::<(String, String)>::new()),
        )
    }

    fn delete(&self, path: &str) -> (u16, String) {
        self.send(self.http.delete(format!("{}{path}", self.base)))
    }

    /// `POST /nodes/{node}/storage/{storage}/upload` with content=iso, as the provider does.
    fn upload_iso(&self, iso: &Path, filename: &str) {
        let part = reqwest::blocking::multipart::Part::bytes(std::fs::read(iso).unwrap())
            .file_name(filename.to_owned())
            .mime_str("application/octet-stream")
            .unwrap();
        let form = reqwest::blocking::multipart::Form::new()
            .text("content", "iso")
            .part("filename", part);
        let (status, body) = self.send(
            self.http
                .post(format!(
                    "{}/nodes/{NODE}/storage/{STORAGE}/upload",
                    self.base
                ))
                .multipart(form),
        );
        assert_eq!(status, 200, "upload: {body}");
    }

    /// `GET …/agent/file-read?file=STATUS_PATH`: (HTTP status, the answer's `data`/`message`).
    fn read_status(&self, vmid: u32) -> (u16, Value) {
        let (status, body) = self.send(
            self.http
                .get(format!(
                    "{}/nodes/{NODE}/qemu/{vmid}/agent/file-read",
                    self.base
                ))
                .query(&[("file", STATUS_PATH)]),
        );
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        (status, v)
    }

    /// The agent's status once the guest agent shows one.
    fn agent_status(&self, vmid: u32) -> Option<AgentStatus> {
        let (status, v) = self.read_status(vmid);
        if status != 200 {
            return None;
        }
        let content = v["data"]["content"].as_str().unwrap_or_default();
        serde_json::from_str(content).ok()
    }
}

fn seed_iso(dir: &Path, gl: &GitlabFake, r: &CreatedRunner, vm: &str) -> std::path::PathBuf {
    let mut cfg = SeedConfig::new(vm).unwrap();
    cfg.agent = Some(AgentSeed {
        version: 1,
        gitlab_url: gl.url(),
        runner_token: r.token.clone(),
        runner_id: r.id,
        runner_name: format!("imagectl/ci/{vm}"),
        ca_bundle: None,
        concurrent: 1,
        tags: vec![],
        docker: DockerExecutor::default(),
        metrics_listen: ":9252".into(),
        verify_budget_secs: 20,
    });
    let iso = dir.join(format!("imagectl-seed-{vm}.iso"));
    write_iso(&cfg, &iso).expect("writing the seed ISO");
    iso
}

/// A runner at the fake, its seed uploaded to fakepve and a running fleet VM with it on ide2.
fn seeded_vm(
    pve: &FakePve,
    api: &Api,
    gl: &GitlabFake,
    dir: &Path,
    vmid: u32,
    vm: &str,
) -> CreatedRunner {
    let r = gl.create_runner(NewRunnerParams {
        description: format!("imagectl/ci/{vm}"),
        ..Default::default()
    });
    let iso = seed_iso(dir, gl, &r, vm);
    let filename = format!("imagectl-seed-{vm}.iso");
    api.upload_iso(&iso, &filename);
    let kept = pve.iso_file(STORAGE, &filename);
    assert_eq!(
        std::fs::read(&kept).expect("the harness keeps the uploaded ISO"),
        std::fs::read(&iso).unwrap(),
        "kept ISO bytes differ from the upload"
    );
    let volid = format!("{STORAGE}:iso/{filename}");
    let vol = pve
        .volumes()
        .into_iter()
        .find(|v| v.volid == volid)
        .expect("ISO volume");
    assert_eq!(vol.path.as_deref(), Some(kept.as_path()));
    pve.add_vm_with_status(
        vmid,
        vm,
        NODE,
        "running",
        json!({"tags": "fleet-ci;imagectl", "agent": "1",
               "ide2": format!("{volid},media=cdrom")}),
    );
    r
}

fn wait<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < until, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn verify_status(gl: &GitlabFake, token: &Secret) -> u16 {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .new_agent();
    agent
        .post(format!("{}/api/v4/runners/verify", gl.url()))
        .send_json(json!({"token": token.expose()}))
        .expect("verify request")
        .status()
        .as_u16()
}

#[test]
fn seam_registers_and_reports() {
    let pve = FakePve::start();
    let api = Api::new(&pve);
    let gl = GitlabFake::start();
    let dir = tempfile::tempdir().unwrap();
    let vmid = 9101;
    let r = seeded_vm(&pve, &api, &gl, dir.path(), vmid, "ci-guest01");

    // No guest yet: PVE's 500.
    let (status, v) = api.read_status(vmid);
    assert_eq!(status, 500, "{v}");
    assert!(
        v.to_string().contains("QEMU guest agent is not running"),
        "{v}"
    );

    let guests = GuestEmulator::start(&pve, agent_bin(), GuestOptions::default());
    let st = wait("status registered", Duration::from_secs(60), || {
        api.agent_status(vmid)
            .filter(|s| s.state == AgentState::Registered)
    });
    assert_eq!(st.runner_id, Some(r.id));
    let system_id = st.system_id.clone().expect("system_id in status.json");

    // The real verify + rotation happened at the fake: the seed's token is dead.
    let rotated = gl.token(r.id).expect("runner");
    assert_ne!(rotated, r.token, "token rotated");
    assert_eq!(
        verify_status(&gl, &r.token),
        403,
        "the seed's token still works"
    );
    assert!(!gl.requests_to("/runners/verify").is_empty());

    // The emulated gitlab-runner polls with the rotated token: online, one manager.
    wait("runner online", Duration::from_secs(20), || {
        (gl.status(r.id).as_deref() == Some("online")).then_some(())
    });
    let at_fake = gl.runner(r.id).unwrap();
    assert_eq!(
        at_fake.managers.keys().collect::<Vec<_>>(),
        [&system_id],
        "one runner manager, the agent's system_id"
    );
    let runs = guests.wait_until(Duration::from_secs(10), "a job request", |r| {
        r.first().is_some_and(|r| r.job_requests > 0)
    });
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(
        (
            runs[0].vmid,
            runs[0].name.as_str(),
            runs[0].boot,
            runs[0].mode
        ),
        (vmid, "ci-guest01", 1, GuestMode::Normal)
    );
    assert_eq!(runs[0].exit_code, Some(0));
    assert_eq!(runs[0].state, Some(AgentState::Registered));

    // No token anywhere in fakepve or in the emulator's output.
    let mut hay: Vec<(String, Vec<u8>)> = vec![
        ("fakepve state".into(), pve.state_text().into_bytes()),
        ("emulator output".into(), guests.log().into_bytes()),
    ];
    let (s, config) = api.get(&format!("/nodes/{NODE}/qemu/{vmid}/config"));
    assert_eq!(s, 200, "{config}");
    hay.push(("VM config".into(), config.into_bytes()));
    let tasks = pve.state().tasks;
    assert!(tasks.iter().any(|t| t.kind == "imgcopy"), "{tasks:?}");
    for t in &tasks {
        let node = t.upid.split(':').nth(1).unwrap_or(NODE);
        let (s, log) = api.get(&format!("/nodes/{node}/tasks/{}/log?limit=10000", t.upid));
        assert_eq!(s, 200, "{log}");
        hay.push((format!("task log {}", t.upid), log.into_bytes()));
    }
    for (what, bytes) in &hay {
        for tok in [&r.token, &rotated] {
            assert!(
                !contains(bytes, tok.expose().as_bytes()),
                "a runner token occurs in {what}"
            );
        }
    }
    assert!(guests.log().contains("imagectl-agent exited Some(0)"));

    // Stop: the guest agent goes away and gitlab-runner stops polling.
    let (s, b) = api.post(&format!("/nodes/{NODE}/qemu/{vmid}/status/stop"));
    assert_eq!(s, 200, "{b}");
    wait("agent down after stop", Duration::from_secs(10), || {
        (api.read_status(vmid).0 == 500).then_some(())
    });
    wait("polling stopped", Duration::from_secs(10), || {
        guests
            .log()
            .contains("gitlab-runner stopped polling")
            .then_some(())
    });
    // Start again: a reboot; the agent finds its marker (exit 0, no new verify/rotation).
    let verifies = gl.requests_to("/runners/verify").len();
    let (s, b) = api.post(&format!("/nodes/{NODE}/qemu/{vmid}/status/start"));
    assert_eq!(s, 200, "{b}");
    let runs = guests.wait_for_runs(2, Duration::from_secs(30));
    assert_eq!(
        (runs[1].boot, runs[1].exit_code, runs[1].state),
        (2, Some(0), Some(AgentState::Registered))
    );
    assert_eq!(gl.requests_to("/runners/verify").len(), verifies);
    assert_eq!(gl.token(r.id), Some(rotated.clone()), "no second rotation");
    let again = wait("status after reboot", Duration::from_secs(10), || {
        api.agent_status(vmid)
    });
    assert_eq!(again.state, AgentState::Registered);
    guests.wait_until(Duration::from_secs(10), "polling after reboot", |r| {
        r.get(1).is_some_and(|r| r.job_requests > 0)
    });

    // Deleting the ISO volume deletes the kept bytes.
    let filename = "imagectl-seed-ci-guest01.iso";
    let kept = pve.iso_file(STORAGE, filename);
    assert!(kept.is_file());
    let (s, b) = api.delete(&format!(
        "/nodes/{NODE}/storage/{STORAGE}/content/{STORAGE}:iso/{filename}"
    ));
    assert_eq!(s, 200, "{b}");
    assert!(!kept.exists(), "kept ISO left after its volume was deleted");

    // Destroying the VM: the emulator forgets it.
    let (s, b) = api.post(&format!("/nodes/{NODE}/qemu/{vmid}/status/stop"));
    assert_eq!(s, 200, "{b}");
    let (s, b) = api.delete(&format!("/nodes/{NODE}/qemu/{vmid}"));
    assert_eq!(s, 200, "{b}");
    wait("VM forgotten", Duration::from_secs(10), || {
        guests.log().contains("VM gone").then_some(())
    });
    let log = guests.log();
    drop(guests);
    for tok in [&r.token, &rotated] {
        assert!(
            !log.contains(tok.expose()),
            "a token in the emulator output"
        );
    }
}

#[test]
fn fault_modes() {
    let pve = FakePve::start();
    let api = Api::new(&pve);
    let gl = GitlabFake::start();
    let dir = tempfile::tempdir().unwrap();
    let noga = seeded_vm(&pve, &api, &gl, dir.path(), 9201, "ci-noga");
    let hang = seeded_vm(&pve, &api, &gl, dir.path(), 9202, "ci-hang");
    let guests = GuestEmulator::start(
        &pve,
        agent_bin(),
        GuestOptions::default().mode_for(|name| match name {
            "ci-noga" => GuestMode::NoGuestAgent,
            "ci-hang" => GuestMode::HangBeforeStatus,
            _ => GuestMode::Normal,
        }),
    );
    let runs = guests.wait_for_runs(2, Duration::from_secs(60));
    let by = |vmid| runs.iter().find(|r| r.vmid == vmid).expect("run").clone();

    // NoGuestAgent: the agent registered (the runner comes online), but PVE keeps answering 500.
    let r = by(9201);
    assert_eq!(
        (r.mode, r.exit_code, r.state),
        (
            GuestMode::NoGuestAgent,
            Some(0),
            Some(AgentState::Registered)
        )
    );
    wait(
        "NoGuestAgent runner online",
        Duration::from_secs(20),
        || (gl.status(noga.id).as_deref() == Some("online")).then_some(()),
    );
    for _ in 0..5 {
        let (status, v) = api.read_status(9201);
        assert_eq!(status, 500, "{v}");
        assert!(
            v.to_string().contains("QEMU guest agent is not running"),
            "{v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // HangBeforeStatus: the guest agent answers, status.json never appears, nothing at GitLab.
    let r = by(9202);
    assert_eq!(
        (r.mode, r.exit_code, r.state),
        (GuestMode::HangBeforeStatus, None, None)
    );
    for _ in 0..5 {
        let (status, v) = api.read_status(9202);
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["data"]["content"], "", "{v}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        gl.token(hang.id),
        Some(hang.token.clone()),
        "token untouched"
    );
    assert_eq!(gl.status(hang.id).as_deref(), Some("never_contacted"));

    // A failing agent: verify answered 403 by the GitLab fake → status `failed`, no polling.
    gl.fault("POST", "/runners/verify", 403, 5);
    let failing = seeded_vm(&pve, &api, &gl, dir.path(), 9203, "ci-fail");
    let st = wait("status failed", Duration::from_secs(60), || {
        api.agent_status(9203)
            .filter(|s| s.state == AgentState::Failed)
    });
    assert!(st.error.is_some(), "{st:?}");
    let runs = guests.wait_for_runs(3, Duration::from_secs(30));
    let r = runs.iter().find(|r| r.vmid == 9203).unwrap();
    assert_eq!((r.exit_code, r.state), (Some(1), Some(AgentState::Failed)));
    assert_eq!(gl.status(failing.id).as_deref(), Some("never_contacted"));
    gl.clear_faults();

    let log = guests.log();
    drop(guests);
    for c in [&noga, &hang, &failing] {
        assert!(
            !log.contains(c.token.expose()),
            "a seed token in the output"
        );
    }
    for r in gl.runners() {
        assert!(
            !log.contains(r.token.expose()),
            "a live token in the output"
        );
    }
}
