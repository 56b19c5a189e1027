//! The fault matrix of the Proxmox fleet: every injected fault ends with a non-zero exit, a
//! summary naming what failed and what was cleaned, and 0 orphan VMs, runners and seeds.

use super::{names, stderr, PveFleet};
use crate::fleet_local::{collect, interrupt};
use imagectl_tests::pve_guest::{GuestMode, GuestOptions};
use serde_json::Value;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn failed_error(rep: &Value) -> String {
    rep["failed"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn cleaned(rep: &Value) -> String {
    rep["failed"][0]["cleaned"].to_string()
}

/// Deploys one VM of `fleet`, expects exit 1 with `error` in the failure, and nothing left.
fn deploy_fails(env: &mut PveFleet, fleet: &str, extra: &[&str], error: &str) -> Value {
    let mut args = vec!["deploy", "--fleet", fleet, "--count", "1", "--image", "1.0"];
    args.extend_from_slice(extra);
    let (o, rep) = env.json(&args);
    assert_eq!(o.status.code(), Some(1), "{rep}\n{}", stderr(&o));
    assert!(
        failed_error(&rep).contains(error),
        "wanted {error:?} in {rep}"
    );
    env.assert_nothing_left(fleet);
    rep
}

#[test]
fn fleet_pve_faults() {
    let opts = GuestOptions::default().mode_for(|name| {
        if name.starts_with("fthang-") {
            GuestMode::HangBeforeStatus
        } else if name.starts_with("ftslow-") {
            GuestMode::NoBoot
        } else {
            GuestMode::Normal
        }
    });
    let mut env = PveFleet::new(0.0, opts);
    env.publish("1.0");
    env.publish("2.0");

    // A PVE lock timeout on clone is retried: the deploy succeeds.
    let lock_msg = "can't lock file '/var/lock/qemu-server/lock-100.conf' - got timeout";
    env.pve.fail("POST", "/clone", 500, lock_msg, Some(2));
    let (o, rep) = env.json(&[
        "deploy", "--fleet", "ftlock", "--count", "1", "--image", "1.0",
    ]);
    assert!(
        o.status.success(),
        "a retried lock timeout failed the deploy: {rep}"
    );
    assert_eq!(env.vms("ftlock").len(), 1);
    let (o, rep) = env.json(&["destroy", "--fleet", "ftlock"]);
    assert!(o.status.success(), "{rep}");
    env.assert_nothing_left("ftlock");

    // A lock that never frees: the VM step fails, its runner is rolled back.
    env.pve.fail("POST", "/clone", 500, lock_msg, None);
    let rep = deploy_fails(&mut env, "ftlock2", &[], "got timeout");
    assert!(cleaned(&rep).contains("runner"), "{rep}");
    env.pve
        .control_handle()
        .control("clear-failures", serde_json::json!({}));

    // The clone task fails (TASK ERROR).
    env.pve
        .fail_task("POST", "/clone", "clone failed: out of space", Some(1));
    let rep = deploy_fails(&mut env, "ftclone", &[], "clone failed");
    assert!(cleaned(&rep).contains("runner"), "{rep}");

    // The VM does not start: VM, seed and runner are rolled back.
    env.pve.fail_task(
        "POST",
        "/status/start",
        "start failed: QEMU exited with code 1",
        Some(1),
    );
    let rep = deploy_fails(&mut env, "ftstart", &[], "start failed");
    assert!(
        cleaned(&rep).contains("vm ") && cleaned(&rep).contains("runner"),
        "{rep}"
    );

    // GitLab answers 5xx when the runner is created: nothing is made.
    env.gl.fault("POST", "/user/runners", 500, 1);
    deploy_fails(&mut env, "ftgl", &[], "HTTP 500");

    // The agent reports failed (GitLab refuses its verify): rolled back after the real agent ran.
    env.gl.fault("POST", "/runners/verify", 403, 10);
    deploy_fails(&mut env, "ftagent", &[], "the agent failed");
    env.gl.clear_faults();
    assert!(
        env.guests
            .runs()
            .iter()
            .any(|r| r.name.starts_with("ftagent-") && r.exit_code.is_some_and(|c| c != 0)),
        "the emulated guest never ran the agent"
    );

    // The guest never writes a status: timeout, rolled back.
    deploy_fails(
        &mut env,
        "fthang",
        &["--timeout", "5"],
        "not registered within 5s",
    );

    // A failed rollout: the new VM does not start, the old ones keep serving.
    let (o, rep) = env.json(&[
        "deploy", "--fleet", "ftroll", "--count", "2", "--image", "1.0",
    ]);
    assert!(o.status.success(), "{rep}");
    let old = env.vms("ftroll");
    env.pve
        .fail_task("POST", "/status/start", "start failed: no memory", Some(1));
    let (o, rep) = env.json(&["deploy", "--fleet", "ftroll", "--image", "2.0"]);
    assert_eq!(o.status.code(), Some(1), "{rep}");
    assert!(
        rep["aborted"]
            .as_str()
            .is_some_and(|a| a.contains("keep serving")),
        "{rep}"
    );
    let mut now: Vec<u32> = env.vms("ftroll").iter().map(|v| v.vmid).collect();
    let mut was: Vec<u32> = old.iter().map(|v| v.vmid).collect();
    now.sort();
    was.sort();
    assert_eq!(
        now, was,
        "the old VMs keep serving, the failed new one is gone"
    );
    assert_eq!(env.runners("ftroll").len(), 2);
    assert!(env.seeds("ftroll").is_empty());
    let (o, rep) = env.json(&["destroy", "--fleet", "ftroll"]);
    assert!(o.status.success(), "{rep}");
    env.assert_nothing_left("ftroll");

    // Two deploys of one fleet at once: the second is refused by the lock held in Proxmox, and
    // creates nothing. (The first one's guest never boots; it times out and rolls back.)
    let first = env
        .command(&[
            "deploy",
            "--fleet",
            "ftslow",
            "--count",
            "1",
            "--image",
            "1.0",
            "--timeout",
            "8",
            "--output",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("first deploy");
    let until = Instant::now() + Duration::from_secs(60);
    while env.vms("ftslow").is_empty() {
        assert!(Instant::now() < until, "the first deploy never cloned");
        std::thread::sleep(Duration::from_millis(100));
    }
    let pools = env.pve.state().pools;
    assert!(
        pools.contains(&"imagectl-lock-ftslow".to_string()),
        "the running deploy holds its lock in Proxmox: {pools:?}"
    );
    let o = env.run(&[
        "deploy", "--fleet", "ftslow", "--count", "3", "--image", "1.0",
    ]);
    assert_ne!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("is locked by"), "{}", stderr(&o));
    let out = collect(first, &mut env.outputs);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.assert_nothing_left("ftslow");
    assert!(names(
        &serde_json::from_slice(&out.stdout).unwrap_or_default(),
        "created"
    )
    .is_empty());

    env.assert_no_tokens();
}

#[test]
fn fleet_pve_drain_vmid_retry_placement_and_ctrl_c() {
    let opts = GuestOptions::default().mode_for(|name| {
        if name.starts_with("ftint-") {
            GuestMode::NoBoot
        } else {
            GuestMode::Normal
        }
    });
    let mut env = PveFleet::new(0.0, opts);
    env.publish("1.0");

    // A VM id taken between allocation and clone: retried with another id.
    env.pve.fail(
        "POST",
        "/clone",
        500,
        "unable to create VM 100: config file already exists",
        Some(1),
    );
    let (o, rep) = env.json(&[
        "deploy", "--fleet", "ftdrain", "--count", "1", "--image", "1.0",
    ]);
    assert!(
        o.status.success(),
        "an id taken meanwhile failed the deploy: {rep}"
    );
    assert_eq!(env.vms("ftdrain").len(), 1);

    // Drain: a running job keeps the VM; after the drain timeout it stays, paused.
    let runner = env.runners("ftdrain")[0].clone();
    env.gl.add_running_job(runner.id);
    let (o, rep) = env.json(&[
        "deploy",
        "--fleet",
        "ftdrain",
        "--count",
        "0",
        "--drain-timeout",
        "2",
    ]);
    assert_eq!(o.status.code(), Some(1), "{rep}");
    assert_eq!(
        env.vms("ftdrain").len(),
        1,
        "a VM with a running job was deleted: {rep}"
    );
    let r = env.gl.runner(runner.id).expect("runner kept");
    assert!(r.paused, "the runner of a draining VM is paused");
    // The job finishes: the drain completes.
    env.gl.finish_jobs(runner.id);
    let (o, rep) = env.json(&[
        "deploy",
        "--fleet",
        "ftdrain",
        "--count",
        "0",
        "--drain-timeout",
        "30",
    ]);
    assert!(o.status.success(), "{rep}");
    env.assert_nothing_left("ftdrain");

    // --force: a job still running at the timeout does not keep the VM.
    let (o, rep) = env.json(&[
        "deploy", "--fleet", "ftforce", "--count", "1", "--image", "1.0",
    ]);
    assert!(o.status.success(), "{rep}");
    let runner = env.runners("ftforce")[0].clone();
    env.gl.add_running_job(runner.id);
    let (o, rep) = env.json(&[
        "destroy",
        "--fleet",
        "ftforce",
        "--drain-timeout",
        "2",
        "--force",
    ]);
    assert!(o.status.success(), "{rep}");
    env.assert_nothing_left("ftforce");

    // A template on one node's local storage: VMs only go where it is.
    let img = crate::publish::image(env.dir.path(), "3.0", &["bios"]);
    let o = crate::publish::publish(&env.pve, env.dir.path(), &img, &["--storage", "local-lvm"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (o, rep) = env.json(&[
        "deploy", "--fleet", "ftnode", "--count", "2", "--image", "3.0",
    ]);
    assert!(o.status.success(), "{rep}");
    let nodes: Vec<String> = env.vms("ftnode").iter().map(|v| v.node.clone()).collect();
    assert_eq!(nodes, ["pve1", "pve1"], "placed off the template's node");
    let (o, rep) = env.json(&["destroy", "--fleet", "ftnode"]);
    assert!(o.status.success(), "{rep}");
    env.assert_nothing_left("ftnode");

    // Ctrl-C while the VM boots: rolled back, exit non-zero.
    let child = env
        .command(&[
            "deploy", "--fleet", "ftint", "--count", "1", "--image", "1.0", "--output", "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("deploy");
    let until = Instant::now() + Duration::from_secs(60);
    while !env.vms("ftint").iter().any(|v| v.status == "running") {
        assert!(Instant::now() < until, "the VM never started");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = interrupt(child, &mut env.outputs);
    assert!(!out.status.success(), "an interrupted deploy succeeded");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("interrupted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.assert_nothing_left("ftint");
    env.assert_no_tokens();
}
