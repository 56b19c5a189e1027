//! The `imagectl-agent` binary end to end against the GitLab fake: exit codes, and that no token
//! ever shows up in its output or in any file it writes except config.toml.
//!
//! These live here rather than in `agent/tests/` so that the agent crate does not dev-depend on
//! this crate (and through it on the builder): the agent's own build and lints stay independent.

use crate::agent_bin;

use imagectl_proto::{AgentSeed, DockerExecutor};
use imagectl_tests::gitlab_fake::{GitlabFake, NewRunnerParams};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn write_seed(dir: &Path, gl: &GitlabFake, token: &imagectl_proto::Secret, id: u64) {
    let seed = AgentSeed {
        version: 1,
        gitlab_url: gl.url(),
        runner_token: token.clone(),
        runner_id: id,
        runner_name: "imagectl/ci/vm-cli".into(),
        ca_bundle: None,
        concurrent: 1,
        tags: vec![],
        docker: DockerExecutor::default(),
        metrics_listen: ":9252".into(),
        verify_budget_secs: 600,
    };
    std::fs::create_dir_all(dir.join("imagectl")).unwrap();
    std::fs::write(
        dir.join("imagectl/agent.json"),
        serde_json::to_vec(&seed).unwrap(),
    )
    .unwrap();
}

fn run_agent(root: &Path, seed_dir: &Path, extra: &[&str]) -> Output {
    Command::new(agent_bin())
        .arg("--root")
        .arg(root)
        .arg("--seed-dir")
        .arg(seed_dir)
        .arg("--no-systemctl")
        // No gitlab-runner here (tests/it/agent/poll.rs runs the double and checks it polls).
        .arg("--no-poll-check")
        .args(["--retry-initial-ms", "20"])
        .args(extra)
        .output()
        .unwrap()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[test]
fn no_token_outside_config_toml() {
    let gl = GitlabFake::start();
    let r = gl.create_runner(NewRunnerParams::default());
    let root = tempfile::tempdir().unwrap();
    let seed = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    std::fs::write(root.path().join("etc/machine-id"), "").unwrap();
    write_seed(seed.path(), &gl, &r.token, r.id);
    // One transient failure so the retry/warning paths print too.
    gl.fault("POST", "/runners/verify", 503, 1);

    let out = run_agent(root.path(), seed.path(), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rotated = gl.token(r.id).unwrap();
    assert_ne!(rotated, r.token);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("POST /runners/verify"), "{stderr}");

    for tok in [r.token.expose(), rotated.expose()] {
        assert!(!contains(&out.stdout, tok), "token in stdout");
        assert!(!contains(&out.stderr, tok), "token in stderr");
    }
    let config = root.path().join("etc/gitlab-runner/config.toml");
    let files = files_under(root.path());
    assert!(files.len() >= 6, "{files:?}"); // machine-id, config, system id, status, marker, .prom
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        if f == config {
            assert!(contains(&bytes, rotated.expose()));
            assert!(
                !contains(&bytes, r.token.expose()),
                "the dead seed token in config.toml"
            );
            continue;
        }
        for tok in [r.token.expose(), rotated.expose()] {
            assert!(!contains(&bytes, tok), "token found in {}", f.display());
        }
    }

    // Second run: exit 0, no GitLab call.
    let n = gl.requests().len();
    let out = run_agent(root.path(), seed.path(), &[]);
    assert!(out.status.success());
    assert_eq!(gl.requests().len(), n);
}

#[test]
fn failure_exits_non_zero_without_leaking() {
    let gl = GitlabFake::start();
    let r = gl.create_runner(NewRunnerParams::default());
    let root = tempfile::tempdir().unwrap();
    let seed = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    std::fs::write(
        root.path().join("etc/machine-id"),
        "0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();
    write_seed(seed.path(), &gl, &r.token, r.id);
    gl.fault("POST", "/runners/reset_authentication_token", 502, 1000);

    let out = run_agent(root.path(), seed.path(), &["--budget-secs", "0.3"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("registration failed"), "{stderr}");
    assert!(!contains(&out.stderr, r.token.expose()));
    let status = std::fs::read_to_string(root.path().join("var/lib/imagectl/status.json")).unwrap();
    assert!(status.contains("\"failed\""), "{status}");
    assert!(!status.contains(r.token.expose()));
    assert!(!root.path().join("etc/gitlab-runner/config.toml").exists());
    assert!(!root.path().join("var/lib/imagectl/registered").exists());
}

#[test]
fn rate_limited_beyond_the_budget_fails_fast_without_leaking() {
    let gl = GitlabFake::start();
    let r = gl.create_runner(NewRunnerParams::default());
    let root = tempfile::tempdir().unwrap();
    let seed = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    std::fs::write(
        root.path().join("etc/machine-id"),
        "0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();
    write_seed(seed.path(), &gl, &r.token, r.id);
    // One 429 asking for a minute, then a 503 burst would follow: the minute does not fit in 3 s.
    gl.fault_retry_after("POST", "/runners/verify", 429, 60, 1);
    let t0 = std::time::Instant::now();
    let out = run_agent(root.path(), seed.path(), &["--budget-secs", "3"]);
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(3),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("HTTP 429 (Retry-After 60 s)") && stderr.contains("asked to wait 60 s"),
        "{stderr}"
    );
    assert!(!contains(&out.stderr, r.token.expose()));
    assert!(!contains(&out.stdout, r.token.expose()));
    for f in files_under(root.path()) {
        assert!(
            !contains(&std::fs::read(&f).unwrap(), r.token.expose()),
            "token found in {}",
            f.display()
        );
    }
    assert!(!root.path().join("etc/gitlab-runner/config.toml").exists());
    assert!(!root
        .path()
        .join("etc/gitlab-runner/.runner_system_id")
        .exists());
    assert_eq!(gl.requests_to("/runners/verify").len(), 1);
    assert_eq!(gl.token(r.id).unwrap(), r.token, "not rotated");
}

#[test]
fn bad_seed_is_reported() {
    let root = tempfile::tempdir().unwrap();
    let seed = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(seed.path().join("imagectl")).unwrap();
    std::fs::write(
        seed.path().join("imagectl/agent.json"),
        r#"{"version":1,"gitlab_url":"http://x","runner_token":"glrt-cli-SECRET-1","runner_id":"glrt-cli-SECRET-1","runner_name":"n"}"#,
    )
    .unwrap();
    let out = run_agent(root.path(), seed.path(), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        !contains(&out.stderr, "glrt-cli-SECRET-1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = std::fs::read_to_string(root.path().join("var/lib/imagectl/status.json")).unwrap();
    assert!(
        status.contains("agent.json") && !status.contains("glrt-cli-SECRET-1"),
        "{status}"
    );
}

#[test]
fn missing_seed_device_fails_fast() {
    let root = tempfile::tempdir().unwrap();
    let out = Command::new(agent_bin())
        .arg("--root")
        .arg(root.path())
        .args([
            "--seed-device",
            "/nonexistent/imagectl-seed",
            "--seed-wait-secs",
            "0",
            "--no-systemctl",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/imagectl-seed"));
}

#[test]
fn help_documents_every_flag() {
    let out = Command::new(agent_bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--root",
        "--seed-dir",
        "--seed-device",
        "--seed-wait-secs",
        "--no-systemctl",
        "--budget-secs",
        "--retry-initial-ms",
        "--retry-max-secs",
        "--active-timeout-secs",
        "--runner-poll-timeout-secs",
        "--no-poll-check",
        "--time-sync-wait-secs",
        "--version",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
    }
}
