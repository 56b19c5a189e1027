//! Upload names: PVE stores an upload under `normalize_content_filename` of the name sent
//! (pve-storage `src/PVE/Storage.pm`), so imagectl sends that name, imports the volume PVE
//! reports and, when a publish fails, removes the upload that really exists.

use super::*;
use imagectl::remote::pve::{params, ApiToken, ClientOptions, Fingerprint, PveClient, Trust};
use std::time::Duration;

/// A client for the fake, as imagectl builds it.
pub(crate) fn client(pve: &FakePve) -> PveClient {
    PveClient::new(ClientOptions {
        endpoint: pve.endpoint(),
        token: ApiToken::parse(pve.token()).unwrap(),
        trust: Trust::Pin(Fingerprint::parse(pve.fingerprint()).unwrap()),
        attempts: 2,
        backoff: Duration::from_millis(50),
        request_timeout: Duration::from_secs(30),
        task_timeout: Duration::from_secs(30),
    })
    .unwrap()
}

pub(crate) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

const STORED: &str = "imagectl-gitlab-runner-2.0_b1.qcow2";

#[test]
fn a_plus_version_is_published_under_pves_name_and_a_failed_run_leaves_no_upload() {
    let pve = FakePve::start();
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "2.0+b1", &["bios"]);
    // A failure after the upload: the cleanup must remove the volume PVE stored.
    pve.fail_task("POST", "/template", "injected failure", Some(1));
    let o = publish(&pve, dir.path(), &img, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains(&format!("cleaning up: removing local:import/{STORED}")),
        "{e}"
    );
    assert_clean(&pve);
    let st: Value = serde_json::from_str(&pve.state_text()).unwrap();
    assert_eq!(st["uploads"][0]["status"], "stored");
    assert_eq!(st["uploads"][0]["filename"], STORED);
    assert_eq!(
        st["uploads"][0]["sent_filename"], STORED,
        "imagectl sends the name PVE stores"
    );

    let v = json_out(&publish(&pve, dir.path(), &img, &[]));
    assert_eq!(v["results"][0]["action"], "created");
    let vms = pve.vms();
    assert_eq!(vms.len(), 1);
    let t = &vms[0];
    assert!(t.template);
    assert_eq!(t.tags, "image-2.0+b1;imagectl");
    assert!(
        t.description.contains("imagectl-version: 2.0+b1"),
        "{}",
        t.description
    );
    assert!(
        t.config["scsi0"].starts_with("local-lvm:base-") && t.config["scsi0"].contains("size=65M"),
        "imported from the stored volume: {}",
        t.config["scsi0"]
    );
    assert!(
        pve.import_volumes().is_empty(),
        "{:?}",
        pve.import_volumes()
    );
    let st = pve.state();
    assert!(
        st.requests
            .iter()
            .any(|(m, p)| m == "DELETE" && p.contains(STORED)),
        "the stored volume is deleted: {:?}",
        st.requests
    );
    assert!(
        !st.requests
            .iter()
            .any(|(_, p)| p.contains("2.0+b1") || p.contains("2.0%2Bb1")),
        "no request names a volume that does not exist: {:?}",
        st.requests
    );
    let o = run(&pve, dir.path(), &pve.env(), &["images", "-o", "json"]);
    assert_eq!(json_out(&o)["images"][0]["version"], "2.0+b1");
}

#[test]
fn the_fake_stores_uploads_as_pve_does_and_import_from_a_missing_volume_fails_the_task() {
    let pve = FakePve::start();
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "1.0", &["bios"]);
    let sha = {
        let m: Value =
            serde_json::from_slice(&std::fs::read(img.with_extension("manifest.json")).unwrap())
                .unwrap();
        m["sha256"].as_str().unwrap().to_string()
    };
    let c = client(&pve);
    let rt = rt();
    let bar = imagectl::progress::Progress::new(true).bytes("upload", 0);
    let upid = rt
        .block_on(c.upload_import("pve1", "local", "x-1.0+b=1.qcow2", &img, &sha, &bar))
        .unwrap();
    rt.block_on(c.wait_task(&upid, Duration::from_secs(30)))
        .unwrap();
    let vols: Vec<String> = rt
        .block_on(c.volumes("pve1", "local", Some("import")))
        .unwrap()
        .into_iter()
        .map(|v| v.volid)
        .collect();
    assert_eq!(vols, vec!["local:import/x-1.0_b_1.qcow2".to_string()]);
    // What imagectl did before: import from the name it sent (qemu-server fails in the task).
    let upid = rt
        .block_on(c.post_task(
            "/nodes/pve1/qemu",
            params([
                ("vmid", "150"),
                (
                    "scsi0",
                    "local-lvm:0,import-from=local:import/x-1.0+b=1.qcow2",
                ),
            ]),
        ))
        .unwrap();
    let e = rt
        .block_on(c.wait_task(&upid, Duration::from_secs(30)))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unable to create VM 150")
            && e.contains("could not get size of local:import/x-1.0+b=1.qcow2"),
        "{e}"
    );
    assert!(pve.vms().is_empty());
    // PVE answers a delete of a volume that does not exist with success (a warning only): the
    // stored upload stays, which is why imagectl deletes the volume id PVE reported.
    rt.block_on(c.delete_volume("pve1", "local:import/x-1.0+b=1.qcow2"))
        .unwrap();
    assert_eq!(pve.import_volumes().len(), 1);
    rt.block_on(c.delete_volume("pve1", "local:import/x-1.0_b_1.qcow2"))
        .unwrap();
    assert!(pve.import_volumes().is_empty());
}
