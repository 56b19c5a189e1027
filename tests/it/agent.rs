//! imagectl-agent's registration logic (the library) against the GitLab fake, in a `--root`
//! tempdir with `--seed-dir` and without systemctl.
//!
//! Submodules: [`backoff`] (429/503 with `Retry-After`, bursts, budgets), [`poll`] (the proof that
//! gitlab-runner polls, with the runner double), [`token`] (`token_obtained_at` and a config.toml
//! rewritten by gitlab-runner).

mod backoff;
mod poll;
mod token;

use imagectl_agent::{seed::SeedSource, Options, Outcome};
use imagectl_proto::{AgentSeed, AgentState, AgentStatus, DockerExecutor, Secret};
use imagectl_tests::gitlab_fake::{CreatedRunner, GitlabFake, NewRunnerParams};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A self-signed CA, only parsed (the fake speaks plain HTTP).
const TEST_CA: &str = "-----BEGIN CERTIFICATE-----
MIIBjTCCATOgAwIBAgIUMiADSQCWA6K59R8vhFvOj1Nz7kcwCgYIKoZIzj0EAwIw
GzEZMBcGA1UEAwwQaW1hZ2VjdGwgdGVzdCBDQTAgFw0yNjExMjMxMzA0MDBaGA8y
MTI2MTAzMDEzMDQwMFowGzEZMBcGA1UEAwwQaW1hZ2VjdGwgdGVzdCBDQTBZMBMG
ByqGSM49AgEGCCqGSM49AwEHA0IABKuI5GFpqqpT3qxPz9hsSb9vEfefoox1M/XF
3ApCafBAPQhd2Kq9YApQjsKQabULVb0m82CjDNPpkLeVTP+8jvSjUzBRMB0GA1Ud
DgQWBBSHxOtad+2/gzn7/h/wu6Su+9IBiDAfBgNVHSMEGDAWgBSHxOtad+2/gzn7
/h/wu6Su+9IBiDAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIQCJ
DW297HHKnQYrCS8GYaZmhmqanU1GYI3smJTF4yD7uwIgPxBUuWxUuL9KgF23wj47
XQQSBgQ9CDoLCRcfceuTOs4=
-----END CERTIFICATE-----
";

const MACHINE_ID: &str = "5f1c2a0b9e8d4c7ba1f2e3d4c5b6a798";

struct Env {
    gl: GitlabFake,
    runner: CreatedRunner,
    root: tempfile::TempDir,
    seed_dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        Self::with(|_| {})
    }

    fn with(edit: impl FnOnce(&mut AgentSeed)) -> Self {
        let gl = GitlabFake::start();
        let runner = gl.create_runner(NewRunnerParams {
            description: "imagectl/ci/vm1".into(),
            tag_list: vec!["docker".into()],
            ..Default::default()
        });
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(
            root.path().join("etc/machine-id"),
            format!("{MACHINE_ID}\n"),
        )
        .unwrap();
        let seed_dir = tempfile::tempdir().unwrap();
        let mut seed = AgentSeed {
            version: 1,
            gitlab_url: gl.url(),
            runner_token: runner.token.clone(),
            runner_id: runner.id,
            runner_name: "imagectl/ci/vm1".into(),
            ca_bundle: None,
            concurrent: 2,
            tags: vec!["docker".into()],
            docker: DockerExecutor {
                privileged: true,
                allowed_images: vec!["docker:*".into()],
                ..Default::default()
            },
            metrics_listen: ":9252".into(),
            verify_budget_secs: 600,
        };
        edit(&mut seed);
        std::fs::create_dir_all(seed_dir.path().join("imagectl")).unwrap();
        std::fs::write(
            seed_dir.path().join(imagectl_proto::SEED_AGENT_PATH),
            serde_json::to_vec(&seed).unwrap(),
        )
        .unwrap();
        Self {
            gl,
            runner,
            root,
            seed_dir,
        }
    }

    fn opts(&self) -> Options {
        Options {
            root: self.root.path().to_path_buf(),
            seed: SeedSource::Dir(self.seed_dir.path().to_path_buf()),
            seed_wait: Duration::ZERO,
            systemctl: false,
            budget: Some(Duration::from_secs(10)),
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_secs(30),
            active_timeout: Duration::from_secs(1),
            // No gitlab-runner here; `poll` runs the double and turns this on.
            runner_poll: None,
            metrics_url: None,
            time_sync_wait: Duration::from_secs(1),
            local_clock: std::time::SystemTime::now,
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.path().join(p.trim_start_matches('/'))
    }

    fn status(&self) -> AgentStatus {
        serde_json::from_slice(&std::fs::read(self.path(imagectl_proto::STATUS_PATH)).unwrap())
            .unwrap()
    }

    fn config(&self) -> toml::Table {
        toml::from_str(
            &std::fs::read_to_string(self.path("/etc/gitlab-runner/config.toml")).unwrap(),
        )
        .unwrap()
    }

    fn config_token(&self) -> String {
        self.config()["runners"][0]["token"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn verify_status(&self, token: &str) -> u16 {
        let resp = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .new_agent()
            .post(format!("{}/api/v4/runners/verify", self.gl.url()))
            .send_json(serde_json::json!({"token": token, "system_id": "s_probe0000000"}))
            .unwrap();
        resp.status().as_u16()
    }

    fn assert_failed_cleanly(&self) {
        let st = self.status();
        assert_eq!(st.state, AgentState::Failed);
        assert!(st.error.as_deref().is_some_and(|e| !e.is_empty()));
        for p in [
            "/etc/gitlab-runner/config.toml",
            "/etc/gitlab-runner/.runner_system_id",
            "/etc/gitlab-runner/ca.pem",
            imagectl_proto::REGISTERED_MARKER,
        ] {
            assert!(!self.path(p).exists(), "{p} left behind by a failed run");
        }
        let leftovers: Vec<_> = std::fs::read_dir(self.path("/etc/gitlab-runner"))
            .map(|d| d.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        let prom =
            std::fs::read_to_string(self.path("/var/lib/prometheus/node-exporter/imagectl.prom"))
                .unwrap();
        assert!(prom.contains("imagectl_agent_registered 0\n"), "{prom}");
        assert!(!format!("{st:?}").contains(self.runner.token.expose()));
    }
}

fn expected_system_id() -> String {
    imagectl_agent::sysid::system_id(MACHINE_ID)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn happy_path_registers_rotates_and_writes_config() {
    let env = Env::with(|s| s.ca_bundle = Some(TEST_CA.into()));
    let out = imagectl_agent::run(&env.opts()).unwrap();
    let sid = expected_system_id();
    assert_eq!(
        out,
        Outcome::Registered {
            runner_id: env.runner.id,
            system_id: sid.clone(),
            recovered: false
        }
    );

    // verify once, with the machine's system_id and the seed's token; then one rotation.
    let verifies = env.gl.requests_to("/runners/verify");
    assert_eq!(verifies.len(), 1);
    assert_eq!(verifies[0].system_id.as_deref(), Some(sid.as_str()));
    assert_eq!(verifies[0].token.as_ref(), Some(&env.runner.token));
    let rotations = env.gl.requests_to("/runners/reset_authentication_token");
    assert_eq!(rotations.len(), 1);
    // Named, so GitLab files the rotation under this manager and not a stray `<legacy>` one.
    assert_eq!(rotations[0].system_id.as_deref(), Some(sid.as_str()));
    let managers: Vec<_> = env
        .gl
        .runner(env.runner.id)
        .unwrap()
        .managers
        .into_keys()
        .collect();
    assert_eq!(managers, vec![sid.clone()]);

    // The seed's token is dead; config.toml holds the live one.
    assert_eq!(env.verify_status(env.runner.token.expose()), 403);
    let live = env.gl.token(env.runner.id).unwrap();
    assert_eq!(env.config_token(), live.expose());
    assert_eq!(env.verify_status(live.expose()), 200);

    let cfg_path = env.path("/etc/gitlab-runner/config.toml");
    assert_eq!(mode(&cfg_path), 0o600);
    assert_eq!(mode(&env.path("/etc/gitlab-runner")), 0o700);
    let cfg = env.config();
    assert_eq!(cfg["concurrent"].as_integer(), Some(2));
    assert_eq!(cfg["check_interval"].as_integer(), Some(3));
    assert_eq!(cfg["listen_address"].as_str(), Some(":9252"));
    let r = &cfg["runners"][0];
    assert_eq!(r["name"].as_str(), Some("imagectl/ci/vm1"));
    assert_eq!(r["url"].as_str(), Some(env.gl.url().as_str()));
    assert_eq!(r["id"].as_integer(), Some(env.runner.id as i64));
    assert_eq!(r["executor"].as_str(), Some("docker"));
    assert_eq!(
        r["token_expires_at"].as_datetime().unwrap().to_string(),
        "0001-01-01T00:00:00Z"
    );
    assert!(r["token_obtained_at"].as_datetime().is_some());
    assert_eq!(r["tls-ca-file"].as_str(), Some("/etc/gitlab-runner/ca.pem"));
    let d = &r["docker"];
    assert_eq!(d["image"].as_str(), Some("docker:stable"));
    assert_eq!(d["privileged"].as_bool(), Some(true));
    assert_eq!(
        d["allowed_images"].as_array().unwrap()[0].as_str(),
        Some("docker:*")
    );
    assert_eq!(d["volumes"].as_array().unwrap()[0].as_str(), Some("/cache"));
    assert_eq!(d["shm_size"].as_integer(), Some(0));
    assert_eq!(d["disable_cache"].as_bool(), Some(false));
    assert_eq!(
        std::fs::read_to_string(env.path("/etc/gitlab-runner/ca.pem")).unwrap(),
        TEST_CA
    );
    assert_eq!(mode(&env.path("/etc/gitlab-runner/ca.pem")), 0o644);

    let sid_file = env.path("/etc/gitlab-runner/.runner_system_id");
    assert_eq!(std::fs::read_to_string(&sid_file).unwrap().trim(), sid);
    assert_eq!(mode(&sid_file), 0o600);

    let st = env.status();
    assert_eq!(st.state, AgentState::Registered);
    assert_eq!(st.runner_id, Some(env.runner.id));
    assert_eq!(st.system_id.as_deref(), Some(sid.as_str()));
    assert!(st.error.is_none());
    for step in ["seed", "machine_id", "verify", "rotate", "config"] {
        assert!(
            st.timings_ms.contains_key(step),
            "{step} missing from {:?}",
            st.timings_ms
        );
    }
    assert!(st.started_uptime_s.unwrap() <= st.finished_uptime_s.unwrap());
    assert!(env.path(imagectl_proto::REGISTERED_MARKER).exists());
    let prom = std::fs::read_to_string(env.path("/var/lib/prometheus/node-exporter/imagectl.prom"))
        .unwrap();
    assert!(prom.contains("imagectl_agent_registered 1\n"), "{prom}");
    assert!(
        prom.contains("imagectl_agent_last_run_timestamp_seconds "),
        "{prom}"
    );
}

#[test]
fn token_expiry_from_gitlab_lands_in_config() {
    let env = Env::new();
    env.gl.set_token_expiry(Some("2031-01-02T03:04:05.000Z"));
    imagectl_agent::run(&env.opts()).unwrap();
    let cfg = env.config();
    assert_eq!(
        cfg["runners"][0]["token_expires_at"]
            .as_datetime()
            .unwrap()
            .to_string(),
        "2031-01-02T03:04:05Z"
    );
}

#[test]
fn forbidden_is_final() {
    let env = Env::with(|s| s.runner_token = Secret::new("glrt-not-a-real-token-000"));
    let err = imagectl_agent::run(&env.opts()).unwrap_err();
    assert!(format!("{err:#}").contains("403"), "{err:#}");
    assert_eq!(
        env.gl.requests_to("/runners/verify").len(),
        1,
        "403 must not be retried"
    );
    assert!(env
        .gl
        .requests_to("/runners/reset_authentication_token")
        .is_empty());
    env.assert_failed_cleanly();
    assert!(!format!("{err:#}").contains("glrt-not-a-real-token-000"));
}

#[test]
fn orphaned_is_final() {
    let env = Env::new();
    env.gl.set_orphaned(env.runner.id, true);
    let err = imagectl_agent::run(&env.opts()).unwrap_err();
    assert!(format!("{err:#}").contains("orphaned"), "{err:#}");
    assert_eq!(
        env.gl.requests_to("/runners/verify").len(),
        1,
        "422 must not be retried"
    );
    env.assert_failed_cleanly();
    // The seed's token was not rotated.
    assert_eq!(env.gl.token(env.runner.id).unwrap(), env.runner.token);
}

#[test]
fn server_errors_are_retried() {
    let env = Env::new();
    env.gl.fault("POST", "/runners/verify", 502, 1);
    env.gl.fault("POST", "/runners/verify", 503, 1);
    env.gl
        .fault("POST", "/runners/reset_authentication_token", 500, 1);
    imagectl_agent::run(&env.opts()).unwrap();
    let verifies = env.gl.requests_to("/runners/verify");
    let statuses: Vec<u16> = verifies.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![502, 503, 200]);
    let rotations: Vec<u16> = env
        .gl
        .requests_to("/runners/reset_authentication_token")
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(rotations, vec![500, 201]);
    assert_eq!(env.status().state, AgentState::Registered);
}

#[test]
fn exhausted_budget_fails_without_config() {
    let env = Env::new();
    env.gl.fault("POST", "/runners/verify", 503, 10_000);
    let mut opts = env.opts();
    opts.budget = Some(Duration::from_millis(400));
    let t0 = std::time::Instant::now();
    let err = imagectl_agent::run(&opts).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    assert!(format!("{err:#}").contains("time budget"), "{err:#}");
    assert!(env.gl.requests_to("/runners/verify").len() >= 2);
    env.assert_failed_cleanly();
}

#[test]
fn a_hanging_gitlab_is_bounded_by_the_budget() {
    let env = Env::new();
    env.gl.hang("POST", "/runners/verify", 100);
    let mut opts = env.opts();
    opts.budget = Some(Duration::from_millis(500));
    let t0 = std::time::Instant::now();
    imagectl_agent::run(&opts).unwrap_err();
    // Each attempt is capped (at least 1 s), and no new attempt starts after the budget.
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    env.assert_failed_cleanly();
}

#[test]
fn failed_rotation_leaves_the_seed_token_usable() {
    let env = Env::new();
    env.gl
        .fault("POST", "/runners/reset_authentication_token", 503, 10_000);
    let mut opts = env.opts();
    opts.budget = Some(Duration::from_millis(300));
    imagectl_agent::run(&opts).unwrap_err();
    env.assert_failed_cleanly();
    // GitLab never rotated, so the next boot's run succeeds with the same seed.
    env.gl.clear_faults();
    let out = imagectl_agent::run(&env.opts()).unwrap();
    assert!(matches!(
        out,
        Outcome::Registered {
            recovered: false,
            ..
        }
    ));
}

#[test]
fn second_run_is_a_no_op() {
    let env = Env::new();
    imagectl_agent::run(&env.opts()).unwrap();
    let before = std::fs::read(env.path("/etc/gitlab-runner/config.toml")).unwrap();
    let n = env.gl.requests().len();
    assert_eq!(
        imagectl_agent::run(&env.opts()).unwrap(),
        Outcome::AlreadyRegistered
    );
    assert_eq!(env.gl.requests().len(), n, "no GitLab call after success");
    assert_eq!(
        std::fs::read(env.path("/etc/gitlab-runner/config.toml")).unwrap(),
        before
    );
}

#[test]
fn crash_after_rotation_reuses_the_committed_token() {
    let env = Env::new();
    imagectl_agent::run(&env.opts()).unwrap();
    let live = env.config_token();
    // As if the VM died after config.toml was committed but before the marker was written.
    std::fs::remove_file(env.path(imagectl_proto::REGISTERED_MARKER)).unwrap();
    let out = imagectl_agent::run(&env.opts()).unwrap();
    assert!(
        matches!(
            out,
            Outcome::Registered {
                recovered: true,
                ..
            }
        ),
        "{out:?}"
    );
    assert_eq!(
        env.gl
            .requests_to("/runners/reset_authentication_token")
            .len(),
        1,
        "no second rotation"
    );
    let verifies = env.gl.requests_to("/runners/verify");
    assert_eq!(verifies.len(), 2);
    assert_eq!(
        verifies[1].token.as_ref().map(|t| t.expose()),
        Some(live.as_str())
    );
    assert_eq!(
        verifies[1].system_id, verifies[0].system_id,
        "same runner manager"
    );
    assert_eq!(env.config_token(), live);
    assert_eq!(env.gl.runner(env.runner.id).unwrap().managers.len(), 1);
    assert!(env.path(imagectl_proto::REGISTERED_MARKER).exists());
    assert_eq!(env.status().state, AgentState::Registered);
}

#[test]
fn lost_rotated_token_fails_with_a_clear_reason() {
    let env = Env::new();
    imagectl_agent::run(&env.opts()).unwrap();
    // As if the VM died after GitLab rotated but before config.toml was committed.
    std::fs::remove_file(env.path(imagectl_proto::REGISTERED_MARKER)).unwrap();
    std::fs::remove_file(env.path("/etc/gitlab-runner/config.toml")).unwrap();
    let err = imagectl_agent::run(&env.opts()).unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("403") && text.contains("recreated"), "{text}");
    assert_eq!(env.status().state, AgentState::Failed);
    assert!(!env.path("/etc/gitlab-runner/config.toml").exists());
}

#[test]
fn stored_system_id_wins_and_empty_machine_id_is_filled() {
    let env = Env::new();
    std::fs::write(env.path("/etc/machine-id"), "").unwrap();
    std::fs::create_dir_all(env.path("/etc/gitlab-runner")).unwrap();
    std::fs::write(
        env.path("/etc/gitlab-runner/.runner_system_id"),
        "r_abcdefABCDEF\n",
    )
    .unwrap();
    imagectl_agent::run(&env.opts()).unwrap();
    assert_eq!(
        env.gl.requests_to("/runners/verify")[0]
            .system_id
            .as_deref(),
        Some("r_abcdefABCDEF")
    );

    let env = Env::new();
    std::fs::write(env.path("/etc/machine-id"), "").unwrap();
    imagectl_agent::run(&env.opts()).unwrap();
    let mid = std::fs::read_to_string(env.path("/etc/machine-id")).unwrap();
    assert_eq!(mid.trim().len(), 32);
    let sid = imagectl_agent::sysid::system_id(&mid);
    assert_eq!(
        env.gl.requests_to("/runners/verify")[0]
            .system_id
            .as_deref(),
        Some(sid.as_str())
    );
}

#[test]
fn a_foreign_config_is_replaced() {
    let env = Env::new();
    std::fs::create_dir_all(env.path("/etc/gitlab-runner")).unwrap();
    std::fs::write(
        env.path("/etc/gitlab-runner/config.toml"),
        "concurrent = 1\ncheck_interval = 0\n[[runners]]\nname = \"baked\"\nurl = \"https://other\"\nid = 999\ntoken = \"glrt-baked\"\nexecutor = \"shell\"\n",
    )
    .unwrap();
    imagectl_agent::run(&env.opts()).unwrap();
    assert_eq!(
        env.config()["runners"][0]["id"].as_integer(),
        Some(env.runner.id as i64)
    );
    assert_eq!(env.gl.requests_to("/runners/verify").len(), 1);
}
