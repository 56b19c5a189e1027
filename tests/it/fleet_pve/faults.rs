//! The fault matrix of the Proxmox fleet: every injected fault ends with a non-zero exit, a
//! summary naming what failed and what was cleaned, and 0 orphan VMs, runners and seeds.

use super::{names, stderr, PveFleet};
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
    let out = first.wait_with_output().expect("first deploy output");
    env.outputs.extend_from_slice(&out.stdout);
    env.outputs.extend_from_slice(&out.stderr);
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
