//! Fleet commands on the local provider, end to end: real QEMU (TCG) VMs of the offline-profile
//! image registering against the GitLab fake, which the guests reach through QEMU's restricted
//! user networking (`guestfwd` to the fake's loopback port). Everything runs through the
//! `imagectl` binary, as a user would.
//!
//! * `fleet_local_e2e`: deploy 2 (while a second deploy is refused by the fleet lock) → both
//!   register with distinct runner ids and system_ids → re-deploy is a no-op → status shows both
//!   online/registered with node_exporter up → targets → rollback to the previous image version
//!   replaces both → destroy leaves nothing (no QEMU, no runner at the fake, no files, no seed).
//! * `fleet_local_faults`: GitLab 5xx on create, a per-VM timeout, Ctrl-C while booting: each
//!   exits non-zero and leaves 0 VMs, 0 QEMU processes, 0 runners, 0 seeds.
//! * `fleet_local_agent_failed`: the agent reports `failed` (verify answered 403 by the fake):
//!   the same, after one full boot.
//!
//! Both scan every output and every state file for token bytes (the admin token and every
//! runner token the fake saw). Boots are expensive here (TCG, two shared cores), so each test
//! reuses one deployment for several assertions.
//!
//! Cleanup runs even when an assertion fails mid-test: dropping an [`Env`] (also while the test
//! panics) interrupts imagectl commands of its own that still run, runs `imagectl destroy
//! --fleet F` for every fleet it touched, and kills what is left of its QEMU processes.

mod lock_race;

use crate::publish::stderr;
use crate::support::{
    agent_bin, cache_dir, heavy, imagectl_bin, offline_image, test_dir, workspace,
};
use imagectl_proto::Secret;
use imagectl_tests::gitlab_fake::GitlabFake;
use serde_json::Value;
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// An isolated place to run `imagectl` fleet commands: the fake, a state dir, an image store.
/// Dropping it cleans up what the test left running (see [`Env::cleanup`]).
struct Env {
    gl: GitlabFake,
    dir: tempfile::TempDir,
    images: PathBuf,
    outputs: Vec<u8>,
    /// Every `--fleet` a command was run for, for the cleanup.
    fleets: RefCell<BTreeSet<String>>,
}

impl Env {
    fn new(images: &Path) -> Self {
        Self {
            gl: GitlabFake::start(),
            dir: tempfile::tempdir().expect("tempdir"),
            images: images.to_path_buf(),
            outputs: Vec::new(),
            fleets: RefCell::new(BTreeSet::new()),
        }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn command(&self, args: &[&str]) -> Command {
        if let Some(i) = args.iter().position(|a| *a == "--fleet") {
            if let Some(f) = args.get(i + 1) {
                self.fleets.borrow_mut().insert((*f).to_string());
            }
        }
        let mut c = Command::new(imagectl_bin());
        c.args(args)
            .arg("--images-dir")
            .arg(&self.images)
            .current_dir(self.dir.path())
            .env("GITLAB_URL", self.gl.url())
            .env("GITLAB_TOKEN", self.gl.admin_token())
            .env("IMAGECTL_STATE_DIR", self.state())
            .env("IMAGECTL_ACCEL", "tcg")
            .env("XDG_CONFIG_HOME", self.dir.path().join("config"))
            .env_remove("IMAGECTL_CONFIG")
            .stdin(Stdio::null());
        c
    }

    /// Runs imagectl to completion; keeps its output for the token scan.
    fn run(&mut self, args: &[&str]) -> Output {
        run_logged(
            &mut self.command(args),
            "fleet_local",
            args,
            &mut self.outputs,
        )
    }

    fn json(&mut self, args: &[&str]) -> (Output, Value) {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        let o = self.run(&a);
        let v = stdout_json(args, &o);
        (o, v)
    }

    /// Runners of `fleet` at the fake.
    fn runners(&self, fleet: &str) -> Vec<imagectl_tests::gitlab_fake::Runner> {
        let prefix = format!("imagectl/{fleet}/");
        self.gl
            .runners()
            .into_iter()
            .filter(|r| r.description.starts_with(&prefix))
            .collect()
    }

    /// Every token the fake handed out or was shown, plus the admin token.
    fn tokens(&self) -> Vec<Secret> {
        let mut t = vec![Secret::new(self.gl.admin_token())];
        for r in self.gl.runners() {
            t.push(r.token.clone());
            t.extend(r.dead_tokens.iter().cloned());
        }
        t.extend(self.gl.requests().into_iter().filter_map(|r| r.token));
        t.retain(|s| s.expose().len() >= 12);
        t
    }

    /// No token in any imagectl output or state file (the VMs' own disks and attached seeds are
    /// where tokens belong and are skipped).
    fn assert_no_tokens(&self, extra: &[Secret]) {
        let mut tokens = self.tokens();
        tokens.extend(extra.iter().cloned());
        let mut hay: Vec<(String, Vec<u8>)> =
            vec![("imagectl output".into(), self.outputs.clone())];
        for f in files_under(&self.state()) {
            let name = f
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if name == "disk.qcow2" || name.ends_with(".sock") {
                continue;
            }
            hay.push((
                f.display().to_string(),
                std::fs::read(&f).unwrap_or_default(),
            ));
        }
        for (what, bytes) in &hay {
            for t in &tokens {
                assert!(
                    !contains(bytes, t.expose().as_bytes()),
                    "a token ({}…) occurs in {what}",
                    &t.expose()[..5]
                );
            }
        }
    }

    /// 0 QEMU processes, 0 VM directories, 0 seeds, 0 runners, no lock of `fleet`.
    fn assert_nothing_left(&self, fleet: &str) {
        let pids = qemu_pids(fleet);
        assert!(pids.is_empty(), "QEMU processes of {fleet} left: {pids:?}");
        let vms: Vec<_> = std::fs::read_dir(self.state().join("vms"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(vms.is_empty(), "VM directories left: {vms:?}");
        let isos: Vec<PathBuf> = files_under(self.dir.path())
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "iso"))
            .collect();
        assert!(isos.is_empty(), "seed ISOs left: {isos:?}");
        let seeds: Vec<_> = std::fs::read_dir(self.state().join("seeds"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(seeds.is_empty(), "staged seeds left: {seeds:?}");
        let runners: Vec<u64> = self.runners(fleet).iter().map(|r| r.id).collect();
        assert!(runners.is_empty(), "runners left at GitLab: {runners:?}");
        assert!(
            !self.state().join(format!("locks/{fleet}.lock")).exists(),
            "fleet lock left"
        );
    }
}

impl Env {
    /// Leaves no VM behind, whatever happened: SIGINT to this env's imagectl commands that still
    /// run (a spawned deploy rolls back on it; SIGKILL after 60 s), `imagectl destroy --fleet F`
    /// for every fleet used (killed after 5 min), then SIGKILL for any process left that belongs
    /// to this env (QEMU of its fleets, anything naming its state dir). Never panics: it runs
    /// while a failed test unwinds.
    fn cleanup(&mut self) {
        let fleets: Vec<String> = self.fleets.borrow().iter().cloned().collect();
        let state = self.state();
        let leftovers = !own_pids(&state, &fleets).is_empty();
        if !std::thread::panicking() && !leftovers {
            return;
        }
        eprintln!(
            "fleet_local: cleanup of {} ({})",
            fleets.join(", "),
            if std::thread::panicking() {
                "the test failed"
            } else {
                "processes left"
            }
        );
        let imagectl: Vec<u32> = own_pids(&state, &fleets)
            .into_iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim() == "imagectl")
            })
            .collect();
        signal(&imagectl, "-INT");
        let until = Instant::now() + Duration::from_secs(60);
        while imagectl.iter().any(|p| alive(*p)) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(200));
        }
        signal(&imagectl, "-KILL");
        for fleet in &fleets {
            let child = self
                .command(&["destroy", "--fleet", fleet])
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn();
            let Ok(mut child) = child else {
                eprintln!("fleet_local: cleanup: cannot run imagectl destroy --fleet {fleet}");
                continue;
            };
            let until = Instant::now() + Duration::from_secs(300);
            loop {
                match child.try_wait() {
                    Ok(Some(st)) => {
                        eprintln!("fleet_local: cleanup: imagectl destroy --fleet {fleet}: {st}");
                        break;
                    }
                    Ok(None) if Instant::now() < until => {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    _ => {
                        eprintln!(
                            "fleet_local: cleanup: imagectl destroy --fleet {fleet} hangs; killed"
                        );
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        let left = own_pids(&state, &fleets);
        if !left.is_empty() {
            eprintln!("fleet_local: cleanup: killing leftover processes {left:?}");
            signal(&left, "-KILL");
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Live processes of an env: QEMU of one of `fleets`, or anything whose command line or
/// environment names `state` (imagectl commands get `IMAGECTL_STATE_DIR`; QEMU's disks live there).
fn own_pids(state: &Path, fleets: &[String]) -> Vec<u32> {
    let me = std::process::id();
    let dir = state.as_os_str().as_encoded_bytes();
    let mut out: Vec<u32> = fleets.iter().flat_map(|f| qemu_pids(f)).collect();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me || out.contains(&pid) || !alive(pid) {
            continue;
        }
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if contains(&cmd, dir) || contains(&env, dir) {
            out.push(pid);
        }
    }
    out
}

/// True while `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

/// `kill SIG PID…`, errors ignored.
fn signal(pids: &[u32], sig: &str) {
    let live: Vec<String> = pids
        .iter()
        .filter(|p| alive(**p))
        .map(u32::to_string)
        .collect();
    if !live.is_empty() {
        let _ = Command::new("kill")
            .arg(sig)
            .args(&live)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Live QEMU processes of `fleet` (found by their `-name …,process=imagectl-<fleet>-…`).
fn qemu_pids(fleet: &str) -> Vec<u32> {
    let want = format!("process=imagectl-{fleet}-");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
        if !zombie && contains(&cmd, want.as_bytes()) {
            out.push(pid);
        }
    }
    out
}

/// Runs an imagectl command to completion, logs how long it took and keeps its output (for the
/// token scans).
pub(crate) fn run_logged(
    cmd: &mut Command,
    label: &str,
    args: &[&str],
    outputs: &mut Vec<u8>,
) -> Output {
    let t = Instant::now();
    let o = cmd.output().expect("running imagectl");
    eprintln!(
        "{label}: imagectl {} → {} in {:.1}s",
        args.join(" "),
        o.status,
        t.elapsed().as_secs_f64()
    );
    outputs.extend_from_slice(&o.stdout);
    outputs.extend_from_slice(&o.stderr);
    o
}

/// Waits for a spawned imagectl and keeps its output (for the token scans).
pub(crate) fn collect(child: std::process::Child, outputs: &mut Vec<u8>) -> Output {
    let out = child.wait_with_output().expect("imagectl output");
    outputs.extend_from_slice(&out.stdout);
    outputs.extend_from_slice(&out.stderr);
    out
}

/// Sends a running imagectl SIGINT (Ctrl-C) and collects it.
pub(crate) fn interrupt(child: std::process::Child, outputs: &mut Vec<u8>) -> Output {
    let k = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(k.success());
    collect(child, outputs)
}

/// The JSON document on stdout of `imagectl ARGS --output json`.
pub(crate) fn stdout_json(args: &[&str], o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "imagectl {args:?}: stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            stderr(o)
        )
    })
}

/// An image store with two versions of the offline image: the one `offline_image()` baked
/// (older) and a second bake of the same spec with `--version <v>-r2` (newer, so `latest`).
/// Returns (dir, old version, new version).
fn two_versions() -> (PathBuf, String, String) {
    let v1 = offline_image();
    let m1: Value = serde_json::from_slice(
        &std::fs::read(v1.with_extension("manifest.json")).expect("manifest"),
    )
    .expect("manifest JSON");
    let old = m1["version"].as_str().expect("version").to_string();
    let new = format!("{old}-r2");
    let dir = test_dir().join("fleet-images");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for src in [v1.to_path_buf(), v1.with_extension("manifest.json")] {
        let dst = dir.join(src.file_name().unwrap());
        if std::fs::hard_link(&src, &dst).is_err() {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
    let t = Instant::now();
    let o = Command::new(imagectl_bin())
        .arg("build")
        .arg(workspace().join("image-specs/gitlab-runner.yaml"))
        .args([
            "--profile",
            "offline",
            "--output",
            "json",
            "--quiet",
            "--version",
            &new,
        ])
        .arg("--out")
        .arg(&dir)
        .arg("--cache-dir")
        .arg(cache_dir())
        .arg("--lock")
        .arg(test_dir().join("offline.lock"))
        .arg("--agent-binary")
        .arg(agent_bin())
        .output()
        .expect("running imagectl build");
    assert!(o.status.success(), "second bake failed: {}", stderr(&o));
    eprintln!(
        "fleet_local: baked version {new} in {:.0}s",
        t.elapsed().as_secs_f64()
    );
    (dir, old, new)
}

pub(crate) fn names(v: &Value, key: &str) -> Vec<String> {
    v[key]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    x["name"]
                        .as_str()
                        .or(x.as_str())
                        .unwrap_or_default()
                        .to_string()
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn fleet_local_e2e() {
    let _g = heavy();
    let (images, old, new) = two_versions();
    let mut env = Env::new(&images);
    let fleet = "fle2e";

    // --- deploy 2 (latest = the new version); a concurrent deploy is refused by the lock -------
    let t = Instant::now();
    let first = env
        .command(&[
            "deploy", "--fleet", fleet, "--count", "2", "--image", "latest", "--output", "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting deploy");
    let lock = env.state().join(format!("locks/{fleet}.lock"));
    let until = Instant::now() + Duration::from_secs(60);
    while !lock.exists() {
        assert!(
            Instant::now() < until,
            "the first deploy never took the fleet lock"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let second = env.run(&["deploy", "--fleet", fleet, "--count", "2"]);
    assert!(!second.status.success(), "a second deploy ran concurrently");
    assert!(
        stderr(&second).contains("locked by pid"),
        "{}",
        stderr(&second)
    );
    let out = first.wait_with_output().expect("deploy output");
    let deploy_s = t.elapsed().as_secs_f64();
    env.outputs.extend_from_slice(&out.stdout);
    env.outputs.extend_from_slice(&out.stderr);
    assert!(
        out.status.success(),
        "deploy failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    let rep: Value = serde_json::from_slice(&out.stdout).expect("deploy JSON");
    eprintln!("FLEET-TIMING deploy_2_vms_s={deploy_s:.0}");
    assert_eq!(rep["image_version"].as_str(), Some(new.as_str()));
    let created = rep["created"].as_array().expect("created").clone();
    assert_eq!(created.len(), 2, "{rep}");
    let ids: Vec<u64> = created
        .iter()
        .map(|v| v["runner_id"].as_u64().unwrap())
        .collect();
    assert_ne!(ids[0], ids[1], "distinct runner ids");
    let runners = env.runners(fleet);
    assert_eq!(runners.len(), 2);
    let mut sids = Vec::new();
    for r in &runners {
        let vm = created
            .iter()
            .find(|v| v["runner_id"].as_u64() == Some(r.id))
            .expect("runner of a VM");
        assert_eq!(
            r.description,
            format!("imagectl/{fleet}/{}", vm["name"].as_str().unwrap())
        );
        assert_eq!(env.gl.status(r.id).as_deref(), Some("online"));
        assert_eq!(r.managers.len(), 1, "one runner manager per VM");
        sids.extend(r.managers.keys().cloned());
        assert_eq!(r.dead_tokens.len(), 1, "the seed's token was rotated");
    }
    assert_ne!(sids[0], sids[1], "distinct system_ids (machine-ids)");
    assert_eq!(
        qemu_pids(fleet).len(),
        2,
        "both VMs keep running after deploy exited"
    );
    assert!(
        files_under(&env.state())
            .iter()
            .all(|p| p.extension().is_none_or(|e| e != "iso")),
        "seeds deleted"
    );

    // --- re-deploy: nothing to do --------------------------------------------------------------
    let creates = env.gl.requests_to("/user/runners").len();
    let (o, rep) = env.json(&[
        "deploy", "--fleet", fleet, "--count", "2", "--image", "latest",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(rep["created"].as_array().map(Vec::len), Some(0));
    assert_eq!(rep["removed"].as_array().map(Vec::len), Some(0));
    assert_eq!(rep["unchanged"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        env.gl.requests_to("/user/runners").len(),
        creates,
        "no runner created"
    );

    // --- status --------------------------------------------------------------------------------
    let (o, st) = env.json(&["status", "--fleet", fleet]);
    assert!(o.status.success(), "status not healthy: {st}");
    let vms = st["vms"].as_array().expect("vms");
    assert_eq!(vms.len(), 2);
    for v in vms {
        assert_eq!(v["gitlab_status"], "online", "{v}");
        assert_eq!(v["agent_state"], "registered", "{v}");
        assert_eq!(v["node_exporter"], "up", "{v}");
        assert_eq!(v["image_version"].as_str(), Some(new.as_str()));
        assert_eq!(v["state"], "running");
        assert!(
            sids.contains(&v["system_id"].as_str().unwrap_or_default().to_string()),
            "{v}"
        );
    }

    // --- targets -------------------------------------------------------------------------------
    let o = env.run(&["targets", "--fleet", fleet]);
    let groups: Value = serde_json::from_slice(&o.stdout).expect("targets JSON");
    let groups = groups.as_array().expect("file_sd list");
    assert_eq!(groups.len(), 6, "3 ports x 2 VMs: {groups:?}");
    for g in groups {
        assert_eq!(g["labels"]["fleet"], fleet);
        assert_eq!(g["labels"]["image_version"].as_str(), Some(new.as_str()));
        assert!(g["targets"][0].as_str().unwrap().starts_with("127.0.0.1:"));
    }
    let node_targets = groups
        .iter()
        .filter(|g| g["labels"]["exporter"] == "node")
        .count();
    assert_eq!(node_targets, 2);

    // --- rollback to the previous version: both replaced -------------------------------------
    let before: Vec<String> = names(&rep, "unchanged");
    let old_pids = qemu_pids(fleet);
    let t = Instant::now();
    let (o, rb) = env.json(&["rollback", "--fleet", fleet, "--max-surge", "2"]);
    eprintln!(
        "FLEET-TIMING rollback_2_vms_s={:.0}",
        t.elapsed().as_secs_f64()
    );
    assert!(o.status.success(), "rollback failed: {rb}\n{}", stderr(&o));
    assert_eq!(rb["image_version"].as_str(), Some(old.as_str()));
    let mut removed = names(&rb, "removed");
    removed.sort();
    let mut b = before.clone();
    b.sort();
    assert_eq!(removed, b, "both old VMs drained and deleted");
    assert_eq!(rb["created"].as_array().map(Vec::len), Some(2));
    for id in &ids {
        assert!(
            env.gl.runner(*id).is_none(),
            "old runner {id} still at GitLab"
        );
    }
    let now_pids = qemu_pids(fleet);
    assert_eq!(now_pids.len(), 2);
    assert!(
        old_pids.iter().all(|p| !now_pids.contains(p)),
        "old QEMUs still running"
    );
    let (_, st) = env.json(&["status", "--fleet", fleet]);
    for v in st["vms"].as_array().unwrap() {
        assert_eq!(v["image_version"].as_str(), Some(old.as_str()));
        assert_eq!(v["gitlab_status"], "online");
    }
    let tokens_before_destroy = env.tokens();

    // --- destroy: nothing left -----------------------------------------------------------------
    let (o, d) = env.json(&["destroy", "--fleet", fleet]);
    assert!(o.status.success(), "destroy failed: {d}\n{}", stderr(&o));
    assert_eq!(d["removed"].as_array().map(Vec::len), Some(2), "{d}");
    env.assert_nothing_left(fleet);
    env.assert_no_tokens(&tokens_before_destroy);
}

#[test]
fn fleet_local_faults() {
    let _g = heavy();
    let image = offline_image();
    let mut env = Env::new(image.parent().expect("image dir"));

    // GitLab 5xx on create: nothing is made.
    let fleet = "flf5xx";
    env.gl.fault("POST", "/user/runners", 500, 1);
    let (o, rep) = env.json(&["deploy", "--fleet", fleet, "--count", "1"]);
    assert_eq!(o.status.code(), Some(1), "{rep}");
    let err = rep["failed"][0]["error"].as_str().unwrap_or_default();
    assert!(err.contains("HTTP 500"), "{rep}");
    env.assert_nothing_left(fleet);

    // Timeout: the VM boots but cannot register in 20 s: rolled back (QEMU killed).
    let fleet = "fltime";
    let (o, rep) = env.json(&[
        "deploy",
        "--fleet",
        fleet,
        "--count",
        "1",
        "--timeout",
        "20",
    ]);
    assert_eq!(o.status.code(), Some(1), "{rep}");
    assert!(
        rep["failed"][0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("not registered within 20s"),
        "{rep}"
    );
    let cleaned: Vec<&str> = rep["failed"][0]["cleaned"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(cleaned.len(), 2, "vm and runner cleaned: {rep}");
    env.assert_nothing_left(fleet);

    // Ctrl-C while booting: rolled back, exit non-zero.
    let fleet = "flint";
    let child = env
        .command(&["deploy", "--fleet", fleet, "--count", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting deploy");
    let until = Instant::now() + Duration::from_secs(120);
    while qemu_pids(fleet).is_empty() {
        assert!(Instant::now() < until, "the VM never started");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    let out = interrupt(child, &mut env.outputs);
    assert!(!out.status.success(), "an interrupted deploy succeeded");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("interrupted"),
        "{}",
        stderr(&out)
    );
    env.assert_nothing_left(fleet);
    env.assert_no_tokens(&[]);
}

#[test]
fn fleet_local_agent_failed() {
    let _g = heavy();
    let image = offline_image();
    let mut env = Env::new(image.parent().expect("image dir"));

    // The agent reports failed (verify answered 403): runner, VM and seed rolled back.
    let fleet = "flfail";
    env.gl.fault("POST", "/runners/verify", 403, 5);
    let t = Instant::now();
    let (o, rep) = env.json(&[
        "deploy",
        "--fleet",
        fleet,
        "--count",
        "1",
        "--timeout",
        "900",
    ]);
    eprintln!(
        "FLEET-TIMING agent_failed_detected_s={:.0}",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(o.status.code(), Some(1), "{rep}");
    let err = rep["failed"][0]["error"].as_str().unwrap_or_default();
    assert!(err.contains("the agent failed"), "{rep}");
    assert!(
        !env.gl.requests_to("/runners/verify").is_empty(),
        "the agent never called verify"
    );
    env.assert_nothing_left(fleet);
    env.gl.clear_faults();

    env.assert_no_tokens(&[]);
}
