//! Bad input never panics and never hangs: every subcommand × {no environment, a malformed one,
//! endpoints on a closed loopback port}, run in parallel with a deadline. No case may exit 101
//! (a panic), be killed by the deadline, or print a panic message or Rust `Debug` text; input
//! errors exit 2. Also: completions into a closed pipe, and a refused GitLab connection failing
//! in seconds.

use crate::support::imagectl_bin;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn envs(dir: &Path) -> Vec<(&'static str, Vec<(&'static str, String)>)> {
    let port = closed_port();
    let fp = vec!["AB"; 32].join(":");
    vec![
        ("none", vec![]),
        (
            "malformed",
            vec![
                ("GITLAB_URL", "gitlab dot example".into()),
                ("GITLAB_TOKEN", " ".into()),
                ("PROXMOX_VE_ENDPOINT", "::::".into()),
                ("PROXMOX_VE_API_TOKEN", "garbage".into()),
                ("PROXMOX_VE_FINGERPRINT", "zz".into()),
                ("IMAGECTL_ACCEL", "bogus".into()),
                ("IMAGECTL_STATE_DIR", "/dev/null/state".into()),
                (
                    "IMAGECTL_CONFIG",
                    dir.join("missing.toml").display().to_string(),
                ),
            ],
        ),
        (
            "unreachable",
            vec![
                ("GITLAB_URL", format!("http://127.0.0.1:{port}")),
                ("GITLAB_TOKEN", "glpat-0123456789abcdefghij".into()),
                ("PROXMOX_VE_ENDPOINT", format!("https://127.0.0.1:{port}")),
                (
                    "PROXMOX_VE_API_TOKEN",
                    "imagectl@pve!ci=0b7cd9a4-3e2f-4f0e-9a51-2f8e0a1c4d11".into(),
                ),
                ("PROXMOX_VE_FINGERPRINT", fp),
                (
                    "IMAGECTL_STATE_DIR",
                    dir.join("state").display().to_string(),
                ),
            ],
        ),
    ]
}

fn cases(dir: &Path) -> Vec<Vec<String>> {
    let d = |p: &str| dir.join(p).display().to_string();
    let cases: Vec<Vec<String>> = [
        vec!["build".into(), d("missing.yaml")],
        vec![
            "fetch".into(),
            d("missing.yaml"),
            "--into".into(),
            d("cache"),
        ],
        vec!["inspect".into(), d("missing.qcow2")],
        vec!["test".into(), d("missing.qcow2")],
        vec![
            "seed".into(),
            "--out".into(),
            d("s.iso"),
            "--hostname".into(),
            "vm1".into(),
        ],
        vec!["publish".into(), d("missing.qcow2")],
        vec!["images".into()],
        vec!["gc".into(), "--dry-run".into()],
        vec![
            "deploy".into(),
            "--fleet".into(),
            "ci".into(),
            "--count".into(),
            "1".into(),
        ],
        vec!["status".into(), "--fleet".into(), "ci".into()],
        vec![
            "replace".into(),
            "--fleet".into(),
            "ci".into(),
            "ci-000000".into(),
        ],
        vec!["rollback".into(), "--fleet".into(), "ci".into()],
        vec!["destroy".into(), "--fleet".into(), "ci".into()],
        vec!["targets".into(), "--fleet".into(), "ci".into()],
        vec!["completions".into(), "bash".into()],
        vec!["man".into()],
    ]
    .into_iter()
    .collect();
    cases
}

/// Text that only a panic or a Rust `Debug` value would print.
const DEBUG_TEXT: [&str; 6] = [
    "panicked",
    "RUST_BACKTRACE",
    "Os { code",
    "kind: ",
    "Error {",
    "Some(",
];

#[test]
fn no_subcommand_panics_or_hangs_on_bad_environment() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let mut jobs = Vec::new();
    for (label, env) in envs(dir.path()) {
        for args in cases(dir.path()) {
            jobs.push((label, env.clone(), args));
        }
    }
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .chunks(8)
            .map(|chunk| {
                let home = home.clone();
                let cwd = dir.path().to_path_buf();
                s.spawn(move || {
                    let mut bad = Vec::new();
                    for (label, env, args) in chunk {
                        let mut c = Command::new(imagectl_bin());
                        c.env_clear()
                            .env("PATH", std::env::var("PATH").unwrap_or_default())
                            .env("HOME", &home)
                            .current_dir(&cwd)
                            .args(args)
                            .stdin(Stdio::null())
                            .stdout(Stdio::piped())
                            .stderr(Stdio::piped());
                        for (k, v) in env {
                            c.env(k, v);
                        }
                        let t = Instant::now();
                        let mut child = c.spawn().expect("imagectl runs");
                        let status = loop {
                            if let Some(st) = child.try_wait().unwrap() {
                                break Some(st);
                            }
                            if t.elapsed() > Duration::from_secs(60) {
                                let _ = child.kill();
                                let _ = child.wait();
                                break None;
                            }
                            std::thread::sleep(Duration::from_millis(50));
                        };
                        let out = child.wait_with_output().unwrap();
                        let err = String::from_utf8_lossy(&out.stderr).into_owned();
                        let case = format!("[{label}] imagectl {}", args.join(" "));
                        match status {
                            None => bad.push(format!("{case}: still running after 60 s")),
                            Some(st) if st.code() == Some(101) || st.code().is_none() => {
                                bad.push(format!("{case}: {st}: {err}"))
                            }
                            Some(_) => {
                                if let Some(d) = DEBUG_TEXT.iter().find(|d| err.contains(*d)) {
                                    bad.push(format!("{case}: Debug text {d:?} in: {err}"));
                                }
                            }
                        }
                    }
                    bad
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn completions_into_a_closed_pipe_end_quietly() {
    use std::io::Read;
    for shell in ["bash", "zsh", "fish", "powershell", "elvish"] {
        let mut child = Command::new(imagectl_bin())
            .args(["completions", shell])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = [0u8; 16];
        child.stdout.take().unwrap().read_exact(&mut first).unwrap();
        // stdout is closed now: the rest of the script meets a broken pipe.
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{shell}: {err}");
        assert!(!err.contains("panicked"), "{shell}: {err}");
    }
}

#[test]
fn a_refused_gitlab_connection_fails_deploy_in_seconds_and_leaves_nothing_to_find() {
    let dir = tempfile::tempdir().unwrap();
    let bin = imagectl_bin();
    let t = Instant::now();
    let out = Command::new(bin)
        .current_dir(dir.path())
        .env("GITLAB_URL", format!("http://127.0.0.1:{}", closed_port()))
        .env("GITLAB_TOKEN", "glpat-0123456789abcdefghij")
        .env("IMAGECTL_STATE_DIR", dir.path().join("state"))
        .args([
            "deploy",
            "--fleet",
            "ci",
            "--count",
            "1",
            "--provider",
            "local",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "{:?}: {err}",
        t.elapsed()
    );
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("Connection refused"), "names the cause: {err}");
    assert!(err.contains("127.0.0.1"), "names the host: {err}");
    assert!(!err.contains("maybe a runner"), "{err}");
    assert!(
        !err.contains("0123456789abcdefghij"),
        "the token in an error: {err}"
    );
}

/// Runs imagectl in `dir` with `env`; (exit code, stderr).
fn run(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(imagectl_bin())
        .current_dir(dir)
        .env_remove("IMAGECTL_RUNNER_TOKEN")
        .env_remove("IMAGECTL_ACCEL")
        .envs(env.iter().copied())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn flags_files_and_variables_that_cannot_work_exit_2_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let iso = d.join("s.iso").display().to_string();
    let seed = |env: &[(&str, &str)], extra: &[&str]| {
        let mut a = vec![
            "seed",
            "--out",
            &iso,
            "--hostname",
            "vm1",
            "--gitlab-url",
            "https://gitlab.example",
            "--runner-id",
            "7",
        ];
        a.extend_from_slice(extra);
        run(d, env, &a)
    };
    // A personal access token never goes into a VM.
    let (code, err) = seed(
        &[("IMAGECTL_RUNNER_TOKEN", "glpat-0123456789abcdefghij")],
        &[],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("glrt-") && err.contains("glpat-"), "{err}");
    assert!(!err.contains("0123456789abcdefghij"), "{err}");
    // A directory as the token file.
    let (code, err) = seed(&[], &["--token-file", d.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--token-file") && err.contains("not a regular file"),
        "{err}"
    );
    assert!(!Path::new(&iso).exists(), "a seed was written anyway");
    // A GitLab URL that cannot be parsed never reaches a seed (the agent would retry it for
    // its whole budget).
    let (code, err) = seed(
        &[("IMAGECTL_RUNNER_TOKEN", "glrt-0123456789abcdefghij")],
        &["--gitlab-url", "http://[::1"],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--gitlab-url"), "{err}");
    // Prometheus must be able to read the targets file.
    let out = d.join("targets.json");
    let state = d.join("tstate").display().to_string();
    let (code, err) = run(
        d,
        &[("IMAGECTL_STATE_DIR", state.as_str())],
        &[
            "targets",
            "--fleet",
            "ci",
            "--provider",
            "local",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644, "targets file mode {mode:o}");
    // Absurd VM sizes for `test`.
    for flag in [["--memory", "0"], ["--cpus", "0"]] {
        let (code, err) = run(d, &[], &["test", "x.qcow2", flag[0], flag[1]]);
        assert_eq!(code, Some(2), "{flag:?}: {err}");
        assert!(err.contains(flag[0]), "{flag:?}: {err}");
    }
    // A bad IMAGECTL_ACCEL is refused before GitLab is even asked.
    let gl = imagectl_tests::gitlab_fake::GitlabFake::start();
    let state = d.join("state").display().to_string();
    let url = gl.url();
    let env = [
        ("GITLAB_URL", url.as_str()),
        ("GITLAB_TOKEN", gl.admin_token()),
        ("IMAGECTL_STATE_DIR", state.as_str()),
    ];
    let mut bogus = env.to_vec();
    bogus.push(("IMAGECTL_ACCEL", "bogus"));
    let deploy = [
        "deploy",
        "--fleet",
        "ci",
        "--count",
        "1",
        "--provider",
        "local",
    ];
    let (code, err) = run(d, &bogus, &deploy);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("IMAGECTL_ACCEL"), "{err}");
    assert!(
        gl.runners().is_empty() && gl.requests().is_empty(),
        "GitLab was called"
    );
    // A count nobody means.
    let (code, err) = run(
        d,
        &env,
        &[
            "deploy",
            "--fleet",
            "ci",
            "--count",
            "100000",
            "--provider",
            "local",
        ],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("max_count"), "{err}");
    assert!(gl.runners().is_empty(), "a runner was made");
}

#[test]
fn pipes_devices_and_damaged_images_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fifo = d.join("spec.yaml");
    let ok = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(ok.success());
    let fifo = fifo.to_str().unwrap();
    let mut damaged = b"QFI\xfb\x00\x00\x00\x03".to_vec();
    damaged.extend([0xffu8; 200]);
    std::fs::write(d.join("damaged.qcow2"), &damaged).unwrap();
    std::fs::write(d.join("blank.qcow2"), b"").unwrap();
    let cases: [(&[&str], &str); 6] = [
        (&["build", fifo], "not a regular file"),
        (&["build", "/dev/zero"], "not a regular file"),
        (&["inspect", fifo], "not a regular file"),
        (&["inspect", d.to_str().unwrap()], "is a directory"),
        (&["inspect", "damaged.qcow2"], "truncated or damaged"),
        (&["inspect", "blank.qcow2"], "not a qcow2 image"),
    ];
    for (args, want) in cases {
        let t = Instant::now();
        let (code, err) = run(d, &[], args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{args:?} took {:?}",
            t.elapsed()
        );
    }
}

#[test]
fn publish_parameters_are_checked_before_anything_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = crate::publish::image(d, "1.0", &["bios"]);
    let img = img.to_str().unwrap();
    let endpoint = format!("https://127.0.0.1:{}", closed_port());
    let fp = vec!["AB"; 32].join(":");
    let env = [
        ("PROXMOX_VE_ENDPOINT", endpoint.as_str()),
        (
            "PROXMOX_VE_API_TOKEN",
            "imagectl@pve!ci=0b7cd9a4-3e2f-4f0e-9a51-2f8e0a1c4d11",
        ),
        ("PROXMOX_VE_FINGERPRINT", fp.as_str()),
    ];
    for (flag, value) in [
        ("--bridge", "vmbr0,firewall=0"),
        ("--storage", "../x"),
        ("--import-storage", "local/../../etc"),
        ("--node", "a b"),
        ("--cores", "0"),
        ("--memory", "0"),
    ] {
        let (code, err) = run(d, &env, &["publish", img, flag, value]);
        assert_eq!(code, Some(2), "{flag} {value}: {err}");
        assert!(err.contains(flag), "{flag} {value}: {err}");
    }
}
