//! The PVE client (`imagectl::remote::pve`) against fakepve: TLS trust modes, typed errors,
//! retries, task polling and timeouts, and that the token secret never shows.

use imagectl::remote::pve::api::Node;
use imagectl::remote::pve::{
    params, ApiToken, ClientOptions, Fingerprint, PveClient, PveError, Trust,
};
use imagectl_tests::fakepve::FakePve;
use std::time::Duration;

fn options(pve: &FakePve, trust: Trust) -> ClientOptions {
    ClientOptions {
        endpoint: pve.endpoint(),
        token: ApiToken::parse(pve.token()).unwrap(),
        trust,
        attempts: 4,
        backoff: Duration::from_millis(50),
        request_timeout: Duration::from_secs(30),
        task_timeout: Duration::from_secs(30),
    }
}

fn pinned(pve: &FakePve) -> PveClient {
    PveClient::new(options(
        pve,
        Trust::Pin(Fingerprint::parse(pve.fingerprint()).unwrap()),
    ))
    .unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn pin_and_ca_file_connect_and_a_wrong_pin_is_refused() {
    let pve = FakePve::start();
    let rt = rt();
    let nodes: Vec<Node> = rt.block_on(pinned(&pve).nodes()).unwrap();
    assert_eq!(nodes.len(), 3);
    assert!(nodes.iter().all(Node::online));
    let ca = PveClient::new(options(&pve, Trust::CaFile(pve.ca_file().to_path_buf()))).unwrap();
    assert_eq!(rt.block_on(ca.nodes()).unwrap().len(), 3);

    let wrong = PveClient::new(options(&pve, Trust::Pin(Fingerprint([7; 32])))).unwrap();
    let e = rt.block_on(wrong.nodes()).unwrap_err();
    assert!(matches!(e, PveError::PinMismatch { .. }), "{e:?}");
    assert!(e.to_string().contains(pve.fingerprint()), "{e}");
    assert_eq!(imagectl::error::exit_code(&anyhow::Error::new(e)), 2);
}

#[test]
fn errors_keep_pve_status_and_message_and_never_the_secret() {
    let pve = FakePve::start();
    let rt = rt();
    let c = pinned(&pve);
    // PVE's parameter verification: 400 with per-field errors.
    let e = rt
        .block_on(c.post::<serde_json::Value>("/nodes/pve1/qemu", params([("vmid", "abc")])))
        .unwrap_err();
    assert_eq!(e.status(), Some(400));
    assert!(e.to_string().contains("vmid"), "{e}");
    // A catalogued PVE error keeps its wording.
    pve.fail_named("GET", "/nodes/pve1/storage", "no_route_to_host", None);
    let e = rt.block_on(c.storages("pve1")).unwrap_err();
    assert!(
        e.is_node_unreachable() && e.message() == Some("No route to host"),
        "{e:?}"
    );
    // A 401 for a wrong secret.
    let mut o = options(
        &pve,
        Trust::Pin(Fingerprint::parse(pve.fingerprint()).unwrap()),
    );
    o.token = ApiToken::parse("imagectl@pve!ci=not-the-secret").unwrap();
    let bad = PveClient::new(o).unwrap();
    let e = rt.block_on(bad.nodes()).unwrap_err();
    assert!(e.is_auth(), "{e:?}");
    for text in [
        format!("{e}"),
        format!("{e:?}"),
        format!("{c:?}"),
        format!("{bad:?}"),
    ] {
        assert!(
            !text.contains(pve.secret()) && !text.contains("not-the-secret"),
            "{text}"
        );
    }
    // An answer that is not what the API documents is the input's fault (exit 2).
    let e = rt
        .block_on(c.get::<Vec<Node>>("/version", Vec::new()))
        .unwrap_err();
    assert!(matches!(e, PveError::Decode { .. }), "{e:?}");
    assert_eq!(imagectl::error::exit_code(&anyhow::Error::new(e)), 2);
}

#[test]
fn transient_failures_are_retried_with_backoff() {
    let pve = FakePve::start();
    let rt = rt();
    let c = pinned(&pve);
    pve.fail("GET", "/nodes", 503, "Service Unavailable", Some(2));
    assert_eq!(rt.block_on(c.nodes()).unwrap().len(), 3);
    // Writes retry lock timeouts but not a plain 500.
    pve.fail(
        "PUT",
        "/config",
        500,
        "can't lock file '/var/lock/qemu-server/lock-100.conf' - got timeout",
        Some(3),
    );
    pve.add_vm(100, "v", "pve1", serde_json::json!({}));
    rt.block_on(c.put::<serde_json::Value>(
        "/nodes/pve1/qemu/100/config",
        params([("description", "x")]),
    ))
    .unwrap();
    pve.fail("PUT", "/config", 500, "storage 'x' does not exist", Some(1));
    let e = rt
        .block_on(c.put::<serde_json::Value>(
            "/nodes/pve1/qemu/100/config",
            params([("description", "y")]),
        ))
        .unwrap_err();
    assert_eq!(e.message(), Some("storage 'x' does not exist"));
    let puts = pve
        .state()
        .requests
        .iter()
        .filter(|(m, p)| m == "PUT" && p.ends_with("/config"))
        .count();
    assert_eq!(puts, 5, "4 tries for the lock timeout, 1 for the plain 500");
    // Too many lock timeouts: the error after the last attempt.
    pve.fail(
        "PUT",
        "/config",
        500,
        "can't lock file '/var/lock/qemu-server/lock-100.conf' - got timeout",
        None,
    );
    let e = rt
        .block_on(c.put::<serde_json::Value>(
            "/nodes/pve1/qemu/100/config",
            params([("description", "z")]),
        ))
        .unwrap_err();
    assert!(e.is_lock_timeout(), "{e}");
}

#[test]
fn a_failed_task_reports_its_exit_status_and_log() {
    let pve = FakePve::start();
    let rt = rt();
    let c = pinned(&pve);
    pve.fail_task(
        "POST",
        "/nodes/pve1/qemu",
        "unable to create VM 777 - boom",
        Some(1),
    );
    let e = rt
        .block_on(c.run_task("/nodes/pve1/qemu", params([("vmid", "777")])))
        .unwrap_err();
    match &e {
        PveError::Task {
            exitstatus,
            log,
            node,
            ..
        } => {
            assert_eq!(exitstatus, "unable to create VM 777 - boom");
            assert_eq!(node, "pve1");
            assert!(
                log.iter()
                    .any(|l| l.contains("TASK ERROR: unable to create VM 777 - boom")),
                "{log:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("task log"), "{e}");
}

#[test]
fn a_task_that_runs_too_long_times_out() {
    let pve = FakePve::start_with(0.01);
    let rt = rt();
    let mut o = options(
        &pve,
        Trust::Pin(Fingerprint::parse(pve.fingerprint()).unwrap()),
    );
    o.task_timeout = Duration::from_secs(1);
    let c = PveClient::new(o).unwrap();
    pve.fail_task_after("POST", "/nodes/pve1/qemu", "too late", 5.0);
    let started = std::time::Instant::now();
    let e = rt
        .block_on(c.run_task("/nodes/pve1/qemu", params([("vmid", "778")])))
        .unwrap_err();
    assert!(matches!(e, PveError::TaskTimeout { .. }), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(e.to_string().contains("did not finish within 1s"), "{e}");
}
