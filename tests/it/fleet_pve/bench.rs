//! The fleet benchmark behind `tests/bench/fleet.sh` (ignored in the normal suite): deploying N
//! VMs (`BENCH_VMS`, default 10) against deploying 1 VM on fakepve with realistic task times, side
//! by side in one run, and the PVE API calls per VM deployed (deploy only, from fakepve's request
//! log).
//!
//! Timing model (PVE seconds at time scale 1, per task): linked clone 3 s, seed upload 1 s, start
//! 3 s, shutdown 3 s, stop 1 s, destroy 2 s, volume delete 1 s, and a clone's VM registered in
//! the cluster only 1 s into its worker (as PVE does: `nextid` does not see it before); the
//! emulated guest boots for
//! `BENCH_BOOT_SECS` (default 30 s, a KVM Debian boot to a registered runner) before its agent
//! runs. Default `--concurrency 4`. Prints one `FLEET-BENCH` line per round and a summary line
//! with the medians and the ratio (goals: 10 VMs ≤ 2 × 1 VM; 50 VMs ≤ 2.5 × 1 VM with 0 failed
//! clones and ≤ 25 PVE API calls per VM).

use super::PveFleet;
use imagectl_tests::pve_guest::GuestOptions;
use serde_json::json;
use std::time::{Duration, Instant};

/// Deploys `n` VMs of `fleet`, then destroys them; (deploy seconds, PVE API calls of the deploy).
fn deploy(env: &mut PveFleet, fleet: &str, n: usize) -> (f64, usize) {
    let before = env.pve.state().requests.len();
    let t = Instant::now();
    let (o, rep) = env.json(&[
        "deploy",
        "--fleet",
        fleet,
        "--count",
        &n.to_string(),
        "--image",
        "1.0",
        // fakepve's three nodes have 8 GiB each: 256 MiB VMs let 50 fit.
        "--memory",
        "256",
        "--quiet",
    ]);
    let secs = t.elapsed().as_secs_f64();
    let calls = env.pve.state().requests.len() - before;
    assert!(o.status.success(), "{rep}");
    assert_eq!(env.vms(fleet).len(), n, "{rep}");
    assert!(
        rep["failed"].as_array().is_some_and(Vec::is_empty),
        "0 failures: {rep}"
    );
    let (o, rep) = env.json(&["destroy", "--fleet", fleet, "--quiet"]);
    assert!(o.status.success(), "{rep}");
    env.assert_nothing_left(fleet);
    (secs, calls)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
#[ignore = "benchmark: run tests/bench/fleet.sh"]
fn fleet_pve_bench() {
    let boot: u64 = std::env::var("BENCH_BOOT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let mut env = PveFleet::new(
        0.0,
        GuestOptions::default().boot_delay(Duration::from_secs(boot)),
    );
    env.publish("1.0");
    env.pve.control_handle().control(
        "task-secs",
        json!({"qmclone": 3, "qmclone-worker": 1, "imgcopy": 1, "qmstart": 3, "qmshutdown": 3,
               "qmstop": 1, "qmdestroy": 2, "imgdel": 1}),
    );
    env.pve
        .control_handle()
        .control("time-scale", json!({"value": 1.0}));
    let n: usize = std::env::var("BENCH_VMS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let goal = if n >= 50 { 2.5 } else { 2.0 };
    let (mut one, mut many, mut per_vm) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..rounds {
        let (a, _) = deploy(&mut env, &format!("bone{r}"), 1);
        let (b, calls) = deploy(&mut env, &format!("bmany{r}"), n);
        let c = calls as f64 / n as f64;
        println!(
            "FLEET-BENCH round={r} one_vm_s={a:.1} vms={n} many_vm_s={b:.1} ratio={:.2} api_calls_per_vm={c:.1}",
            b / a
        );
        one.push(a);
        many.push(b);
        per_vm.push(c);
    }
    let (a, b, c) = (median(&mut one), median(&mut many), median(&mut per_vm));
    println!(
        "FLEET-BENCH median one_vm_s={a:.1} vms={n} many_vm_s={b:.1} ratio={:.2} (goal <= {goal}) api_calls_per_vm={c:.1} (goal <= 25) boot_s={boot} rounds={rounds}",
        b / a
    );
    env.assert_no_tokens();
}
