//! Token expiry and recovery: `token_obtained_at` is GitLab's `Date`, not the guest clock; and a
//! config.toml that gitlab-runner rewrote (after rotating an expiring token itself) is read back
//! on the recover path.

use super::Env;
use imagectl_agent::Outcome;
use imagectl_proto::AgentState;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A guest clock that has not been synchronised yet: 2001-01-01.
fn unsynced_clock() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(978_307_200)
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

#[test]
fn token_obtained_at_is_gitlabs_date_not_the_guest_clock() {
    let env = Env::new();
    env.gl.set_token_expiry(Some("2031-01-02T03:04:05.000Z"));
    // The fake answers with a Date header (hyper adds it), as GitLab does.
    let resp = ureq::get(format!("{}/api/v4/runners/all", env.gl.url()))
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .unwrap();
    assert!(
        resp.headers().contains_key("date"),
        "the fake sends no Date"
    );

    let mut opts = env.opts();
    opts.local_clock = unsynced_clock;
    let before = unix(SystemTime::now());
    imagectl_agent::run(&opts).unwrap();
    let after = unix(SystemTime::now());

    let r = &env.config()["runners"][0];
    let obtained = r["token_obtained_at"].as_datetime().unwrap().to_string();
    let t = time::OffsetDateTime::parse(&obtained, &time::format_description::well_known::Rfc3339)
        .unwrap();
    assert!(
        (before - 1..=after + 1).contains(&t.unix_timestamp()),
        "token_obtained_at {obtained} is not GitLab's time ({before}..{after})"
    );
    assert_ne!(t.year(), 2001, "taken from the unsynchronised guest clock");
    assert_eq!(t.nanosecond(), 0, "HTTP dates have whole seconds");
    assert_eq!(
        r["token_expires_at"].as_datetime().unwrap().to_string(),
        "2031-01-02T03:04:05Z"
    );
}

/// config.toml as gitlab-runner (17.x/18.x, BurntSushi/toml encoder) writes it after rotating
/// the token itself: the keys and tags of gitlab-org/gitlab-runner `common/config.go`
/// (`RunnerCredentials`, `RunnerSettings`, `DockerConfig`), nanosecond `token_obtained_at`,
/// zero `token_expires_at`, `omitzero`/`omitempty` fields left out, `pull_policy` as one string,
/// and tables the agent never writes.
fn rewritten_by_runner(env: &Env, token: &str) -> String {
    format!(
        r#"listen_address = ":9252"
concurrent = 2
check_interval = 3
connection_max_age = "15m0s"
shutdown_timeout = 0

[session_server]
  session_timeout = 1800

[[runners]]
  name = "imagectl/ci/vm1"
  url = "{url}"
  id = {id}
  token = "{token}"
  token_obtained_at = 2026-03-01T10:20:30.123456789Z
  token_expires_at = 0001-01-01T00:00:00Z
  executor = "docker"
  [runners.custom_build_dir]
  [runners.cache]
    MaxUploadedArchiveSize = 0
    [runners.cache.s3]
    [runners.cache.gcs]
    [runners.cache.azure]
  [runners.docker]
    tls_verify = false
    image = "docker:stable"
    volumes = ["/cache"]
    pull_policy = "if-not-present"
    network_mtu = 0
"#,
        url = env.gl.url(),
        id = env.runner.id,
    )
}

/// The minimum gitlab-runner needs: no times, no docker section, no check_interval.
fn minimal(env: &Env, token: &str) -> String {
    format!(
        "concurrent = 1\n\n[[runners]]\n  url = \"{}\"\n  id = {}\n  token = \"{token}\"\n  executor = \"docker\"\n",
        env.gl.url(),
        env.runner.id
    )
}

/// gitlab-runner rotating its (expiring) token on its own: `POST /runners/reset_authentication_token`.
fn runner_rotates(env: &Env, token: &str) -> String {
    let mut resp = ureq::post(format!(
        "{}/api/v4/runners/reset_authentication_token",
        env.gl.url()
    ))
    .send_json(serde_json::json!({ "token": token }))
    .unwrap();
    let v: serde_json::Value = resp.body_mut().read_json().unwrap();
    v["token"].as_str().unwrap().to_owned()
}

#[test]
fn a_config_rewritten_by_gitlab_runner_is_recovered() {
    for write in [rewritten_by_runner, minimal] {
        let env = Env::new();
        imagectl_agent::run(&env.opts()).unwrap();
        let t1 = env.config_token();
        // Later gitlab-runner rotated the token and rewrote config.toml in its own style; then the
        // VM died before the marker was durable (or it was removed to re-run the agent).
        let t2 = runner_rotates(&env, &t1);
        let cfg_path = env.path("/etc/gitlab-runner/config.toml");
        std::fs::write(&cfg_path, write(&env, &t2)).unwrap();
        let before = std::fs::read(&cfg_path).unwrap();
        std::fs::remove_file(env.path(imagectl_proto::REGISTERED_MARKER)).unwrap();

        let out = imagectl_agent::run(&env.opts()).unwrap_or_else(|e| panic!("{e:#}"));
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
        let verifies = env.gl.requests_to("/runners/verify");
        assert_eq!(verifies.len(), 2);
        assert_eq!(
            verifies[1].token.as_ref().map(|t| t.expose()),
            Some(t2.as_str()),
            "the runner's token from its rewritten file was verified"
        );
        assert_eq!(verifies[1].status, 200);
        // The agent rotated once (gitlab-runner the second time) and left the runner's file alone.
        assert_eq!(
            env.gl
                .requests_to("/runners/reset_authentication_token")
                .len(),
            2
        );
        assert_eq!(std::fs::read(&cfg_path).unwrap(), before);
        assert_eq!(env.gl.token(env.runner.id).unwrap().expose(), t2);
        assert_eq!(env.status().state, AgentState::Registered);
    }
}

/// A scripted GitLab without a `Date` header (the fake, like GitLab, always sends one): verify →
/// 200, rotation → 201 with an expiring token. Returns the base URL.
fn gitlab_without_date(id: u64) -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let bodies = [
        format!(r#"{{"id":{id},"token":"glrt-nodate-seed-SECRET","token_expires_at":null}}"#),
        r#"{"token":"glrt-nodate-rotated-SECRET","token_expires_at":"2031-01-02T03:04:05Z"}"#
            .to_owned(),
    ];
    std::thread::spawn(move || {
        for (status, body) in ["200 OK", "201 Created"].into_iter().zip(bodies) {
            let Ok((mut conn, _)) = l.accept() else {
                return;
            };
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut req = vec![0; len];
            let _ = r.read_exact(&mut req);
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

/// Runs the agent against [`gitlab_without_date`]; `sync_after` makes the clock synchronise
/// (timesyncd's marker appears) that long after the start, or never.
fn run_without_date(sync_after: Option<Duration>) -> (String, imagectl_proto::AgentStatus) {
    let root = tempfile::tempdir().unwrap();
    let seed_dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    std::fs::write(
        root.path().join("etc/machine-id"),
        "5f1c2a0b9e8d4c7ba1f2e3d4c5b6a798\n",
    )
    .unwrap();
    let seed = serde_json::json!({
        "version": 1, "gitlab_url": gitlab_without_date(42),
        "runner_token": "glrt-nodate-seed-SECRET", "runner_id": 42, "runner_name": "n"
    });
    std::fs::create_dir_all(seed_dir.path().join("imagectl")).unwrap();
    std::fs::write(
        seed_dir.path().join(imagectl_proto::SEED_AGENT_PATH),
        seed.to_string(),
    )
    .unwrap();
    let marker = root.path().join("run/systemd/timesync/synchronized");
    if let Some(d) = sync_after {
        std::thread::spawn(move || {
            std::thread::sleep(d);
            std::fs::create_dir_all(marker.parent().unwrap()).unwrap();
            std::fs::write(&marker, "").unwrap();
        });
    }
    let opts = imagectl_agent::Options {
        root: root.path().to_path_buf(),
        seed: imagectl_agent::seed::SeedSource::Dir(seed_dir.path().to_path_buf()),
        seed_wait: Duration::ZERO,
        systemctl: false,
        budget: Some(Duration::from_secs(5)),
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_secs(1),
        active_timeout: Duration::from_secs(1),
        runner_poll: None,
        metrics_url: None,
        time_sync_wait: Duration::from_secs(3),
        local_clock: unsynced_clock,
    };
    imagectl_agent::run(&opts).unwrap_or_else(|e| panic!("{e:#}"));
    let cfg: toml::Table = toml::from_str(
        &std::fs::read_to_string(root.path().join("etc/gitlab-runner/config.toml")).unwrap(),
    )
    .unwrap();
    let st = serde_json::from_slice(
        &std::fs::read(root.path().join("var/lib/imagectl/status.json")).unwrap(),
    )
    .unwrap();
    let obtained = cfg["runners"][0]["token_obtained_at"]
        .as_datetime()
        .unwrap()
        .to_string();
    (obtained, st)
}

#[test]
fn without_gitlabs_date_the_agent_waits_for_time_sync() {
    // The clock synchronises a second in: token_obtained_at is the synchronised clock's time of
    // the rotation (the injected clock reads 2001-01-01T00:00:00Z "now", so a moment before it).
    let (obtained, st) = run_without_date(Some(Duration::from_secs(1)));
    assert!(
        obtained.starts_with("2000-12-31T23:59:5"),
        "{obtained}: not the synchronised time of the rotation"
    );
    assert!(st.timings_ms["time_sync"] >= 900, "{:?}", st.timings_ms);
    assert_eq!(st.state, AgentState::Registered);

    // It never synchronises: "unknown" stays, and gitlab-runner will rotate at its first chance.
    let (obtained, st) = run_without_date(None);
    assert_eq!(obtained, "0001-01-01T00:00:00Z");
    assert!(st.timings_ms["time_sync"] >= 2900, "{:?}", st.timings_ms);
    assert_eq!(st.state, AgentState::Registered);
}
