//! What parallel work does to the Proxmox provider, against fakepve with PVE's timing: a cloned
//! VM enters the cluster's list only when its task's worker writes the config (the harness's
//! `_clone_worker`, after qemu-server `clone_vm`), so `/cluster/nextid` hands one id to several
//! clones, exactly as PVE does.
//!
//! * `fleet_pve_parallel_clone_ids`: `deploy --count 20 --concurrency 8`, without and with
//!   `--vmid-range`, while another imagectl process clones into the same id space: 0 failures,
//!   distinct ids, and the races really happened (some clone tasks failed on a taken id and were
//!   retried); then nothing left.
//! * `fleet_pve_existing_pool_without_pool_allocate`: VMs join a `--pool` an administrator made,
//!   with a token that lacks `Pool.Allocate` on it (the provider reads before it creates).
//! * `fleet_pve_lock_takeover_race`: takers race for an expired fleet lock, round after round:
//!   exactly one wins each time; a held lock is renewed past its ttl while its holder works.

use super::{stderr, PveFleet};
use imagectl::provider::lease;
use imagectl::provider::proxmox::lock::{self, PoolStore};
use imagectl::provider::proxmox::{ProxmoxOptions, ProxmoxProvider};
use imagectl::provider::{FleetLock, Provider};
use imagectl::remote::pve::{params, ApiToken, ClientOptions, Fingerprint, PveClient, Trust};
use imagectl_tests::fakepve::FakePve;
use imagectl_tests::pve_guest::GuestOptions;
use serde_json::json;
use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// A PVE client of imagectl's own for fakepve.
fn client(pve: &FakePve) -> PveClient {
    PveClient::new(ClientOptions {
        endpoint: pve.endpoint(),
        token: ApiToken::parse(pve.token()).expect("token"),
        trust: Trust::Pin(Fingerprint::parse(pve.fingerprint()).expect("fingerprint")),
        attempts: 5,
        backoff: Duration::from_millis(50),
        request_timeout: Duration::from_secs(30),
        task_timeout: Duration::from_secs(120),
    })
    .expect("PVE client")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Clone tasks that failed because their id was taken meanwhile.
fn taken_id_failures(env: &PveFleet) -> usize {
    env.pve
        .state()
        .tasks
        .iter()
        .filter(|t| t.kind == "qmclone")
        .filter(|t| {
            t.exitstatus.as_deref().is_some_and(|e| {
                e.contains("config file already exists") || e.contains("File exists")
            })
        })
        .count()
}

#[test]
fn fleet_pve_parallel_clone_ids() {
    let mut env = PveFleet::new(0.0, GuestOptions::default());
    env.publish("1.0");
    // PVE-like timing: the worker writes the new config 0.1 s after the POST has returned.
    env.pve.control_handle().control(
        "task-secs",
        json!({"qmclone-worker": 2, "qmclone": 2, "qmstart": 1, "qmdestroy": 1}),
    );
    env.pve
        .control_handle()
        .control("time-scale", json!({"value": 0.05}));
    for (fleet, range) in [("idn", None), ("idr", Some("9000-9039"))] {
        let t = Instant::now();
        let mut args = vec![
            "deploy",
            "--fleet",
            fleet,
            "--count",
            "20",
            "--concurrency",
            "8",
            "--image",
            "1.0",
            "--memory",
            "256",
            "--quiet",
            "--output",
            "json",
        ];
        if let Some(r) = range {
            args.extend(["--vmid-range", r]);
        }
        // Another imagectl process clones into the same ids at the same time.
        let rival = format!("{fleet}x");
        let mut rival_args = vec![
            "deploy",
            "--fleet",
            &rival,
            "--count",
            "4",
            "--concurrency",
            "4",
            "--image",
            "1.0",
            "--memory",
            "256",
            "--quiet",
        ];
        if let Some(r) = range {
            rival_args.extend(["--vmid-range", r]);
        }
        let other = env
            .command(&rival_args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the rival deploy");
        let o = env.run(&args);
        let rival_out = other.wait_with_output().expect("rival deploy");
        let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        assert!(o.status.success(), "{rep}\n{}", stderr(&o));
        assert!(
            rival_out.status.success(),
            "rival: {}",
            String::from_utf8_lossy(&rival_out.stderr)
        );
        assert_eq!(
            rep["failed"].as_array().map(Vec::len),
            Some(0),
            "0 failures: {rep}"
        );
        let ids: BTreeSet<u32> = env
            .vms(fleet)
            .iter()
            .chain(env.vms(&rival).iter())
            .map(|v| v.vmid)
            .collect();
        assert_eq!(ids.len(), 24, "24 VMs with distinct ids: {ids:?}");
        if range.is_some() {
            assert!(ids.iter().all(|i| (9000..=9039).contains(i)), "{ids:?}");
        }
        println!(
            "{fleet}: 24 VMs in {:.1}s, {} clone tasks hit a taken id",
            t.elapsed().as_secs_f64(),
            taken_id_failures(&env)
        );
        for f in [fleet, rival.as_str()] {
            let (o, rep) = env.json(&["destroy", "--fleet", f, "--quiet"]);
            assert!(o.status.success(), "{rep}");
            env.assert_nothing_left(f);
        }
    }
    // Both processes started from the same free ids: PVE's race happened and was retried.
    assert!(
        taken_id_failures(&env) > 0,
        "no clone ever met a taken id: the harness hides PVE's race"
    );
    env.assert_no_tokens();
}

#[test]
fn fleet_pve_existing_pool_without_pool_allocate() {
    let env = PveFleet::new(0.0, GuestOptions::default());
    env.publish("1.0");
    let pve = client(&env.pve);
    let rt = runtime();
    rt.block_on(pve.post::<serde_json::Value>("/pools", params([("poolid", "team-a")])))
        .expect("the administrator makes the pool");
    // The token may use the pool and everything else, but not allocate pools.
    let user = env
        .pve
        .token()
        .split('=')
        .next()
        .unwrap_or_default()
        .to_string();
    let privs = [
        "VM.Allocate",
        "VM.Clone",
        "VM.Audit",
        "VM.Config.Options",
        "VM.Config.Memory",
        "VM.Config.CPU",
        "VM.Config.CDROM",
        "VM.PowerMgmt",
        "Datastore.AllocateSpace",
        "Datastore.Allocate",
        "Datastore.AllocateTemplate",
        "Datastore.Audit",
        "Sys.Audit",
        "Pool.Audit",
    ];
    env.pve.grant(&user, "/", &privs);
    let provider = ProxmoxProvider::new(
        pve.clone(),
        ProxmoxOptions {
            seed_storage: "local".into(),
            pool: Some("team-a".into()),
            full_storage: None,
            vmid_range: None,
            image_name: None,
        },
    );
    let made = rt.block_on(async {
        let image = provider
            .images()
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("no image"))?;
        provider
            .create(&imagectl::provider::CreateVm {
                fleet: "pl".into(),
                name: "pl-000001".into(),
                image,
                runner_id: 1,
                node: None,
                memory_mib: 512,
                cpus: 1,
                full_clone: false,
            })
            .await
    });
    let vm = made.expect("a VM joins the existing pool without Pool.Allocate");
    let st = env.pve.state();
    let v = st
        .vms
        .iter()
        .find(|v| v.name == "pl-000001")
        .expect("the VM");
    assert_eq!(v.vmid.to_string(), vm.id);
    let pools: Vec<String> = st.pools.clone();
    assert_eq!(pools, ["team-a"], "no other pool was made: {pools:?}");
    // A pool that does not exist still needs Pool.Allocate: a refusal says so.
    let err = rt
        .block_on(async {
            let image = provider.images().await?.remove(0);
            ProxmoxProvider::new(
                pve.clone(),
                ProxmoxOptions {
                    seed_storage: "local".into(),
                    pool: Some("team-b".into()),
                    full_storage: None,
                    vmid_range: None,
                    image_name: None,
                },
            )
            .create(&imagectl::provider::CreateVm {
                fleet: "pl".into(),
                name: "pl-000002".into(),
                image,
                runner_id: 2,
                node: None,
                memory_mib: 512,
                cpus: 1,
                full_clone: false,
            })
            .await
        })
        .expect_err("creating team-b needs Pool.Allocate");
    assert!(format!("{err:#}").contains("Pool.Allocate"), "{err:#}");
    rt.block_on(provider.destroy(&vm)).expect("destroy");
    assert!(env.vms("pl").is_empty());
    assert!(!env
        .pve
        .state()
        .vms
        .iter()
        .any(|v| v.name.starts_with("pl-")));
}

fn stale(fleet: &str) -> FleetLock {
    let mut l = lock::new_lease(fleet, Duration::from_secs(60));
    l.expires_at = "2000-01-01T00:00:00Z".into();
    l.host = "gone-runner".into();
    l
}

#[test]
fn fleet_pve_lock_takeover_race() {
    let pve_fake = FakePve::start_with(0.0);
    let pve = client(&pve_fake);
    let rt = runtime();
    let store = PoolStore::new(&pve);
    let id = lock::pool_id("race");
    for round in 0..8 {
        let dead = stale("race");
        rt.block_on(lease::LeaseStore::create(&store, &id, &dead))
            .expect("a stale lock");
        // Four imagectl runs see the expired lock at once.
        let results: Vec<anyhow::Result<FleetLock>> = rt.block_on(async {
            let tasks: Vec<_> = (0..4)
                .map(|_| {
                    let pve = pve.clone();
                    tokio::spawn(
                        async move { lock::lock(&pve, "race", Duration::from_secs(60)).await },
                    )
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.expect("taker"));
            }
            out
        });
        let winners: Vec<&FleetLock> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(
            winners.len(),
            1,
            "round {round}: exactly one taker wins: {:?}",
            results
                .iter()
                .map(|r| r
                    .as_ref()
                    .map(|l| l.owner.clone())
                    .map_err(|e| format!("{e:#}")))
                .collect::<Vec<_>>()
        );
        for e in results.iter().filter_map(|r| r.as_ref().err()) {
            let e = format!("{e:#}");
            assert!(e.contains("locked"), "a loser names the lock: {e}");
        }
        let held = rt
            .block_on(lease::LeaseStore::read(&store, &id))
            .expect("read");
        assert_eq!(
            held.flatten().map(|h| h.owner),
            Some(winners[0].owner.clone())
        );
        let pools = pve_fake.state().pools;
        assert_eq!(
            pools,
            std::slice::from_ref(&id),
            "no takeover guard left: {pools:?}"
        );
        rt.block_on(lock::unlock(&pve, winners[0])).expect("unlock");
    }
    assert!(pve_fake.state().pools.is_empty());

    // Renewal: a lock with a 2 s ttl, held for 4 s by a working provider, is never free.
    let provider = ProxmoxProvider::new(
        pve.clone(),
        ProxmoxOptions {
            seed_storage: "local".into(),
            pool: None,
            full_storage: None,
            vmid_range: None,
            image_name: None,
        },
    );
    rt.block_on(async {
        let l = provider
            .lock("renew", Duration::from_secs(2))
            .await
            .expect("lock");
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let e = lock::lock(&pve, "renew", Duration::from_secs(60))
                .await
                .expect_err("the holder renews its lock");
            assert!(format!("{e:#}").contains("is locked by"), "{e:#}");
        }
        let now = lease::LeaseStore::read(&PoolStore::new(&pve), &lock::pool_id("renew"))
            .await
            .expect("read")
            .flatten()
            .expect("held");
        assert!(now.expires_at > l.expires_at, "renewed: {now:?} vs {l:?}");
        provider.unlock(&l).await.expect("unlock");
        // Renewal stopped with the unlock: the lock is free and stays free.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let again = lock::lock(&pve, "renew", Duration::from_secs(60))
            .await
            .expect("free after unlock");
        lock::unlock(&pve, &again).await.expect("unlock");
    });
    assert!(pve_fake.state().pools.is_empty());
}
