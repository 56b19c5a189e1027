//! The proof that gitlab-runner polls: the agent reports `registered` only once gitlab-runner's
//! own metrics show a successful job request (`gitlab_runner_api_request_statuses_total`,
//! `endpoint="request_job"`, status 201/204). gitlab-runner is the test double
//! (`tests/gitlab-runner-double`), run with the host's python3 against the same root.

use super::{expected_system_id, Env};
use imagectl_agent::Outcome;
use imagectl_proto::AgentState;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The double, running `gitlab-runner run` on the agent's config.toml; killed when dropped.
struct Double {
    child: Child,
    stderr: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Double {
    fn start(root: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let stderr = dir.path().join("stderr");
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("gitlab-runner-double/pkg/usr/bin/gitlab-runner");
        let child = Command::new("python3")
            .arg(script)
            .arg("run")
            .arg("--config")
            .arg(root.join("etc/gitlab-runner/config.toml"))
            .arg("--working-directory")
            .arg(dir.path())
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("python3 runs the gitlab-runner double");
        Self {
            child,
            stderr,
            _dir: dir,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Double {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An environment whose seed points gitlab-runner's metrics at a free loopback port.
fn env_with_metrics() -> (Env, u16) {
    let port = free_port();
    let env = Env::with(|s| s.metrics_listen = format!("127.0.0.1:{port}"));
    (env, port)
}

#[test]
fn registered_only_after_gitlab_runner_made_a_job_request() {
    let (env, _port) = env_with_metrics();
    let double = Double::start(env.root.path());
    let mut opts = env.opts();
    opts.runner_poll = Some(Duration::from_secs(30));
    let out = imagectl_agent::run(&opts).unwrap_or_else(|e| panic!("{e:#}\n{}", double.stderr()));
    assert!(
        matches!(
            out,
            Outcome::Registered {
                recovered: false,
                ..
            }
        ),
        "{out:?}"
    );
    // By the time the agent said `registered`, gitlab-runner had been answered 204 with the
    // rotated token and this VM's system_id.
    let live = env.gl.token(env.runner.id).unwrap();
    let polls = env.gl.requests_to("/jobs/request");
    assert!(
        polls.iter().any(|p| p.status == 204
            && p.token.as_ref() == Some(&live)
            && p.system_id.as_deref() == Some(expected_system_id().as_str())),
        "{polls:?}"
    );
    let st = env.status();
    assert_eq!(st.state, AgentState::Registered);
    assert!(
        st.timings_ms.contains_key("runner_poll"),
        "{:?}",
        st.timings_ms
    );
    assert!(env.path(imagectl_proto::REGISTERED_MARKER).exists());
}

#[test]
fn no_job_request_means_no_registered_and_the_next_boot_recovers() {
    let (env, port) = env_with_metrics();
    let mut opts = env.opts();
    opts.runner_poll = Some(Duration::from_secs(2));
    // gitlab-runner is not running. GitLab has heard from the agent (verify, rotation), which
    // recent GitLab versions count as contact — that must not be taken for gitlab-runner polling.
    let err = imagectl_agent::run(&opts).unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("not polling GitLab")
            && text.contains(&format!("http://127.0.0.1:{port}/metrics"))
            && text.contains("could not be read"),
        "{text}"
    );
    assert!(env.gl.requests_to("/jobs/request").is_empty());
    let st = env.status();
    assert_eq!(st.state, AgentState::Failed);
    assert!(!env.path(imagectl_proto::REGISTERED_MARKER).exists());
    // config.toml was committed before: it holds the only live token and stays.
    let live = env.gl.token(env.runner.id).unwrap();
    assert_eq!(env.config_token(), live.expose());
    assert!(!text.contains(live.expose()) && !text.contains(env.runner.token.expose()));

    // Next boot, gitlab-runner comes up: the recover path reuses the token and now sees it poll.
    let double = Double::start(env.root.path());
    let mut opts = env.opts();
    opts.runner_poll = Some(Duration::from_secs(30));
    let out = imagectl_agent::run(&opts).unwrap_or_else(|e| panic!("{e:#}\n{}", double.stderr()));
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
    assert_eq!(env.status().state, AgentState::Registered);
}

#[test]
fn a_rejected_gitlab_runner_is_named() {
    let (env, _port) = env_with_metrics();
    env.gl.fault("POST", "/jobs/request", 403, 10_000);
    let _double = Double::start(env.root.path());
    let mut opts = env.opts();
    opts.runner_poll = Some(Duration::from_secs(4));
    let err = imagectl_agent::run(&opts).unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("no successful job request")
            && text.contains("request_job statuses seen: 403×")
            && text.contains("rejects the token"),
        "{text}"
    );
    assert!(!env.gl.requests_to("/jobs/request").is_empty());
    assert_eq!(env.status().state, AgentState::Failed);
    assert!(!env.path(imagectl_proto::REGISTERED_MARKER).exists());
}
