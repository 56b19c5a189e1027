//! The local provider's fleet lock file under races: takers of a stale lock (its holder's pid is
//! dead, or it expired on another host) race round after round and exactly one wins each time;
//! the holder renews the expiry while it works and stops when it unlocks. No QEMU is started.

use imagectl::provider::local::state::{lock_id, StateDir};
use imagectl::provider::local::{LocalOptions, LocalProvider};
use imagectl::provider::{rfc3339, FleetLock, Provider};
use std::sync::{Arc, Barrier};
use std::time::Duration;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn stale(fleet: &str, other_host: bool) -> FleetLock {
    FleetLock {
        fleet: fleet.into(),
        owner: format!("{:032x}", 7),
        host: if other_host {
            "gone-runner".into()
        } else {
            imagectl::provider::local::state::hostname()
        },
        // No such process on this host.
        pid: 999_999_999,
        acquired_at: "2000-01-01T00:00:00Z".into(),
        expires_at: "2000-01-01T04:00:00Z".into(),
    }
}

#[test]
fn fleet_local_lock_takeover_race() {
    let dir = tempfile::tempdir().expect("tempdir");
    let st = StateDir::open(dir.path()).expect("state dir");
    for round in 0..40 {
        let dead = stale("race", round % 2 == 1);
        std::fs::write(st.lock_file("race"), serde_json::to_vec(&dead).unwrap()).unwrap();
        let start = Arc::new(Barrier::new(6));
        let takers: Vec<_> = (0..6)
            .map(|_| {
                let (st, start) = (st.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    runtime().block_on(st.lock("race", Duration::from_secs(60)))
                })
            })
            .collect();
        let results: Vec<_> = takers
            .into_iter()
            .map(|t| t.join().expect("taker"))
            .collect();
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
            assert!(format!("{e:#}").contains("locked by pid"), "{e:#}");
        }
        let held: FleetLock =
            serde_json::from_slice(&std::fs::read(st.lock_file("race")).unwrap()).unwrap();
        assert_eq!(held.owner, winners[0].owner);
        let files: Vec<String> = std::fs::read_dir(dir.path().join("locks"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            files,
            [lock_id("race")],
            "no takeover guard or temporary file left"
        );
        runtime().block_on(st.unlock(winners[0])).expect("unlock");
        assert!(!st.lock_file("race").exists());
    }
}

#[test]
fn fleet_local_lock_is_renewed_while_held() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = LocalProvider::new(LocalOptions {
        state_dir: dir.path().join("state"),
        images_dir: dir.path().join("images"),
        image_name: None,
        net: Default::default(),
        gitlab_url: "http://127.0.0.1:9".into(),
        accel: imagectl::vm::Accel::Tcg,
        firmware: Default::default(),
        qemu: "qemu-system-x86_64".into(),
    })
    .expect("local provider");
    let path = dir.path().join("state/locks/ci.lock");
    let read = || -> FleetLock { serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap() };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let l = p.lock("ci", Duration::from_secs(2)).await.expect("lock");
        tokio::time::sleep(Duration::from_millis(2600)).await;
        let now = read();
        assert_eq!(now.owner, l.owner);
        assert!(
            now.expires_at > l.expires_at,
            "the expiry moved on: {now:?} vs {l:?}"
        );
        assert!(now.expires_at > rfc3339(time::OffsetDateTime::now_utc()));
        p.unlock(&l).await.expect("unlock");
        assert!(!path.exists());
        // Renewal stopped with the unlock: nothing writes the lock back.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(!path.exists(), "a renewal after unlock recreated the lock");
    });
}
