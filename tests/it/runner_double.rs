//! The gitlab-runner TEST DOUBLE (`tests/gitlab-runner-double/`): its script, run with the host's
//! python3 against the GitLab fake, makes the runner online, serves metrics and never prints the
//! token; and its package tree builds with `dpkg-deb`.

use imagectl_tests::gitlab_fake::{GitlabFake, NewRunnerParams};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Its package scripts installed with dpkg, with and without the bake's hooks.
mod install;

fn double_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("gitlab-runner-double")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn metrics(port: u16) -> Option<String> {
    let mut resp = ureq::get(format!("http://127.0.0.1:{port}/metrics"))
        .call()
        .ok()?;
    resp.body_mut().read_to_string().ok()
}

/// Sends SIGTERM and waits (bounded) for a clean exit.
fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            child.kill().unwrap();
            panic!("the double did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn double_polls_gitlab_serves_metrics_and_keeps_the_token_secret() {
    let gl = GitlabFake::start();
    let r = gl.create_runner(NewRunnerParams::default());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let port = free_port();
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");

    // Start before config.toml exists: the double must wait for it, as on first boot.
    let mut child = Command::new("python3")
        .arg(double_dir().join("pkg/usr/bin/gitlab-runner"))
        .args(["run", "--config"])
        .arg(&config)
        .arg("--working-directory")
        .arg(dir.path())
        .args(["--service", "gitlab-runner", "--user", "gitlab-runner"])
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();

    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(dir.path().join(".runner_system_id"), "s_d0ub1e000001").unwrap();
    let toml = format!(
        "concurrent = 1\ncheck_interval = 1\nlisten_address = \"127.0.0.1:{port}\"\n\n[[runners]]\n\
         name = \"double-test\"\nurl = \"{}\"\nid = {}\ntoken = \"{}\"\n\
         token_obtained_at = 2026-01-01T00:00:00Z\ntoken_expires_at = 0001-01-01T00:00:00Z\n\
         executor = \"docker\"\n[runners.docker]\nimage = \"docker:stable\"\n",
        gl.url(),
        r.id,
        r.token.expose()
    );
    std::fs::write(&config, toml).unwrap();

    wait_for("the runner to be online", Duration::from_secs(15), || {
        gl.status(r.id).as_deref() == Some("online")
    });
    let polls = gl.requests_to("/jobs/request");
    assert!(polls
        .iter()
        .all(|p| p.system_id.as_deref() == Some("s_d0ub1e000001")));
    assert_eq!(polls[0].token.as_ref(), Some(&r.token));
    assert!(gl.runner(r.id).unwrap().managers["s_d0ub1e000001"]
        .contacted_at
        .is_some());

    let mut text = String::new();
    wait_for("a 204 in /metrics", Duration::from_secs(10), || {
        text = metrics(port).unwrap_or_default();
        text.contains("status=\"204\"")
    });
    assert!(text.contains("double=\"true\"} 1"), "{text}");
    assert!(text.contains("gitlab_runner_jobs 0"), "{text}");
    // The real runner's name, help text and label set (gitlab-org/gitlab-runner
    // network/api_requests_collector.go), labels sorted as client_golang prints them; the double's
    // `runner` label is the runner id instead of the real 9-character token prefix.
    assert!(
        text.contains(
            "# HELP gitlab_runner_api_request_statuses_total The total number of API requests made by \
             GitLab Runner, partitioned by runner, system_id, endpoint, status and method.\n\
             # TYPE gitlab_runner_api_request_statuses_total counter\n"
        ),
        "{text}"
    );
    let prefix = format!(
        "gitlab_runner_api_request_statuses_total{{endpoint=\"request_job\",method=\"post\",runner=\"{}\",status=\"204\",system_id=\"s_d0ub1e000001\"}} ",
        r.id
    );
    let line = text
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} in {text}"));
    // The value is the number of answered job requests so far, as the real counter counts them.
    let n: u64 = line[prefix.len()..].parse().unwrap();
    let answered = gl
        .requests_to("/jobs/request")
        .iter()
        .filter(|p| p.status == 204)
        .count() as u64;
    assert!(n >= 1 && n <= answered, "{n} vs {answered} answered");
    // gitlab-runner's own parser in the agent reads it as proof of polling.
    let t = imagectl_agent::runner_poll::tally(&text, "s_d0ub1e000001");
    assert!(t.successful >= 1.0, "{t:?}");

    // A rotated token makes the double's polls fail with 403; it keeps running and says so.
    gl.fault("POST", "/jobs/request", 403, 1);
    wait_for("a 403 in /metrics", Duration::from_secs(10), || {
        metrics(port).unwrap_or_default().contains("status=\"403\"")
    });

    let status = terminate(&mut child);
    assert!(status.success(), "{status}");
    let stdout = std::fs::read(&out_path).unwrap();
    let stderr = std::fs::read(&err_path).unwrap();
    let err_text = String::from_utf8_lossy(&stderr);
    assert!(err_text.contains("TEST DOUBLE"), "{err_text}");
    assert!(err_text.contains("forbidden (403)"), "{err_text}");
    for stream in [&stdout, &stderr] {
        assert!(
            !stream
                .windows(r.token.expose().len())
                .any(|w| w == r.token.expose().as_bytes()),
            "the token was printed"
        );
    }
    assert!(!text.contains(r.token.expose()));
}

#[test]
fn double_verify_and_version() {
    let gl = GitlabFake::start();
    let r = gl.create_runner(NewRunnerParams::default());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(dir.path().join(".runner_system_id"), "s_d0ub1e000002").unwrap();
    std::fs::write(
        &config,
        format!("concurrent = 1\n[[runners]]\nname = \"v\"\nurl = \"{}\"\nid = {}\ntoken = \"{}\"\nexecutor = \"docker\"\n", gl.url(), r.id, r.token.expose()),
    )
    .unwrap();
    let script = double_dir().join("pkg/usr/bin/gitlab-runner");
    let out = Command::new("python3")
        .arg(&script)
        .arg("verify")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("is valid"), "{stdout}");
    assert!(!stdout.contains(r.token.expose()));
    assert!(gl
        .runner(r.id)
        .unwrap()
        .managers
        .contains_key("s_d0ub1e000002"));

    let out = Command::new("python3")
        .arg(&script)
        .arg("--version")
        .output()
        .unwrap();
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(
        v.contains("0.0.0~imagectl.double1") && v.contains("TEST DOUBLE"),
        "{v}"
    );
}

#[test]
fn double_package_tree_builds_with_dpkg_deb() {
    use std::os::unix::fs::PermissionsExt;
    let pkg = double_dir().join("pkg");
    for exe in [
        "DEBIAN/postinst",
        "usr/bin/gitlab-runner",
        "usr/share/gitlab-runner/post-install",
    ] {
        let mode = std::fs::metadata(pkg.join(exe))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o111,
            0o111,
            "{exe} must be executable (mode {mode:o})"
        );
    }
    let control = std::fs::read_to_string(pkg.join("DEBIAN/control")).unwrap();
    assert!(control.contains("Package: gitlab-runner\n"));
    assert!(control.contains("TEST DOUBLE"));
    if Command::new("dpkg-deb").arg("--version").output().is_err() {
        eprintln!("dpkg-deb not installed; skipping the package build");
        return;
    }
    let out_dir = tempfile::tempdir().unwrap();
    let deb = out_dir.path().join("gitlab-runner-double.deb");
    let out = Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&pkg)
        .arg(&deb)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = Command::new("dpkg-deb")
        .arg("--field")
        .arg(&deb)
        .args(["Package", "Architecture"])
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains("Package: gitlab-runner") && info.contains("Architecture: all"),
        "{info}"
    );
    let list = Command::new("dpkg-deb")
        .arg("--contents")
        .arg(&deb)
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.contains("-rwxr-xr-x root/root") && list.contains("./usr/bin/gitlab-runner"),
        "{list}"
    );
    // Like GitLab's package: the post-install hook ships, the unit does not (`install` writes it).
    assert!(
        list.contains("./usr/share/gitlab-runner/post-install")
            && !list.contains("gitlab-runner.service"),
        "{list}"
    );
}
