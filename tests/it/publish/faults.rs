//! Faults during publish: checksum, backing file, lock timeouts, TASK ERRORs, full storage,
//! refused tokens, bad settings, TLS trust. Each asserts that nothing is left behind.

use super::*;

#[test]
fn a_checksum_mismatch_fails_in_the_task_and_leaves_nothing() {
    let pve = FakePve::start();
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "1.0", &["bios"]);
    // Same size, one byte changed after the manifest was written.
    let mut data = std::fs::read(&img).unwrap();
    let last = data.len() - 1;
    data[last] ^= 0xff;
    std::fs::write(&img, data).unwrap();
    let o = publish(&pve, dir.path(), &img, &[]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("checksum mismatch"), "{e}");
    assert!(
        e.contains("TASK ERROR") || e.contains("task log"),
        "the task log is shown: {e}"
    );
    assert_clean(&pve);
    assert_eq!(pve.state().uploads[0].status, "failed");
}

#[test]
fn a_qcow2_with_a_backing_file_is_refused() {
    let pve = FakePve::start();
    let dir = tempfile::tempdir().unwrap();
    let base = image(dir.path(), "0.1", &["bios"]);
    let img = dir.path().join("gitlab-runner-1.0.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&img)
        .status()
        .unwrap();
    assert!(st.success());
    write_manifest(&img, "1.0", &["bios"]);
    let o = publish(&pve, dir.path(), &img, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("backing file"), "{}", stderr(&o));
    assert_clean(&pve);
}

#[test]
fn lock_timeouts_are_retried() {
    let pve = FakePve::start();
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "1.0", &["bios"]);
    pve.fail_named("POST", "/template", "config_lock_timeout", Some(2));
    let o = publish(&pve, dir.path(), &img, &[]);
    let v = json_out(&o);
    assert_eq!(v["results"][0]["action"], "created");
    let e = stderr(&o);
    assert!(e.contains("got timeout") && e.contains("retrying"), "{e}");
    let vms = pve.vms();
    assert_eq!(vms.len(), 1);
    assert!(vms[0].template);
    assert!(pve.import_volumes().is_empty());
}

#[test]
fn a_task_error_mid_publish_removes_the_vm_and_the_import_volume() {
    let pve = FakePve::start();
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "1.0", &["bios"]);
    pve.fail_task(
        "POST",
        "/template",
        "can't convert: injected failure",
        Some(1),
    );
    let o = publish(&pve, dir.path(), &img, &[]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("injected failure") && e.contains("TASK ERROR"),
        "{e}"
    );
    assert!(e.contains("cleaning up: removing VM"), "{e}");
    assert_clean(&pve);
    // And the next run succeeds.
    let v = json_out(&publish(&pve, dir.path(), &img, &[]));
    assert_eq!(v["results"][0]["action"], "created");
}

#[test]
fn a_half_made_template_of_a_failed_run_is_removed_but_clones_are_not() {
    let pve = FakePve::start();
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "1.0", &["bios"]);
    let m: Value =
        serde_json::from_slice(&std::fs::read(img.with_extension("manifest.json")).unwrap())
            .unwrap();
    let sha = m["sha256"].as_str().unwrap();
    let notes = |vmid: u32, marker: &str| {
        format!("imagectl template\n\n- imagectl-sha256: {sha}\n- imagectl-version: 1.0\n- imagectl-template: {vmid}\n{marker}")
    };
    // A crash after create: not a template, still marked publishing.
    pve.add_vm(120, "gitlab-runner-1.0", "pve1", json!({"tags": "imagectl;image-1.0",
        "description": notes(120, "- imagectl-publishing: 1\n"), "scsi0": "local-lvm:vm-120-disk-0,size=64M"}));
    // A user's full clone of an older template: copied notes name another VM; must survive.
    pve.add_vm(
        130,
        "my-runner",
        "pve1",
        json!({"tags": "imagectl;image-1.0",
        "description": notes(99, ""), "scsi0": "local-lvm:vm-130-disk-0,size=64M"}),
    );
    let v = json_out(&publish(&pve, dir.path(), &img, &[]));
    assert_eq!(v["results"][0]["action"], "created");
    assert_eq!(v["results"][0]["cleaned"], json!([120]));
    let mut ids: Vec<(u32, bool)> = pve.vms().iter().map(|v| (v.vmid, v.template)).collect();
    ids.sort();
    let new = v["results"][0]["vmid"].as_u64().unwrap() as u32;
    assert!(
        ids.contains(&(130, false)) && ids.contains(&(new, true)) && ids.len() == 2,
        "{ids:?}"
    );
}

#[test]
fn full_storage_fails_cleanly() {
    let pve = FakePve::start();
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "1.0", &["bios"]);
    pve.set_storage("local-lvm", json!({"avail": 1 << 20}));
    let o = publish(&pve, dir.path(), &img, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("No space left on device"),
        "{}",
        stderr(&o)
    );
    assert_clean(&pve);
    pve.set_storage("local-lvm", json!({"avail": 100u64 << 30}));
    pve.set_storage("local", json!({"avail": 4096}));
    let o = publish(&pve, dir.path(), &img, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("No space left on device"),
        "{}",
        stderr(&o)
    );
    assert_clean(&pve);
}

#[test]
fn a_refused_token_is_a_clear_input_error_and_never_echoed() {
    let pve = FakePve::start();
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "1.0", &["bios"]);
    let wrong = "imagectl@pve!ci=00000000-dead-beef-0000-000000000000";
    let mut env = pve.env();
    env[1].1 = wrong.to_string();
    let o = run(
        &pve,
        dir.path(),
        &env,
        &["publish", img.to_str().unwrap(), "--node", "pve1"],
    );
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.contains("401")
            && e.contains("authentication failure")
            && e.contains("PROXMOX_VE_API_TOKEN"),
        "{e}"
    );
    assert!(!e.contains("dead-beef"), "the wrong secret is echoed: {e}");
    // A token deleted (or expired) on the PVE side.
    pve.revoke_token("imagectl@pve!ci");
    let o = run(&pve, dir.path(), &pve.env(), &["images"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("authentication failure"),
        "{}",
        stderr(&o)
    );
    assert_clean(&pve);
}

#[test]
fn bad_settings_exit_2_with_a_clear_message() {
    let pve = FakePve::start();
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "1.0", &["bios"]);
    let path = img.to_str().unwrap();
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (vec![], "PROXMOX_VE_ENDPOINT"),
        (
            vec![("PROXMOX_VE_ENDPOINT", pve.endpoint())],
            "PROXMOX_VE_API_TOKEN",
        ),
        (
            vec![
                ("PROXMOX_VE_ENDPOINT", pve.endpoint()),
                ("PROXMOX_VE_API_TOKEN", pve.token().into()),
            ],
            "PROXMOX_VE_FINGERPRINT",
        ),
        (
            vec![
                ("PROXMOX_VE_ENDPOINT", pve.endpoint()),
                ("PROXMOX_VE_API_TOKEN", pve.token().into()),
                ("PROXMOX_VE_FINGERPRINT", "AB:CD:EF".into()),
            ],
            "malformed certificate fingerprint",
        ),
        (
            vec![
                ("PROXMOX_VE_ENDPOINT", pve.endpoint()),
                ("PROXMOX_VE_API_TOKEN", format!("{}x", pve.secret())),
                ("PROXMOX_VE_FINGERPRINT", pve.fingerprint().into()),
            ],
            "malformed",
        ),
    ];
    for (env, want) in cases {
        let o = run(&pve, dir.path(), &env, &["publish", path, "--node", "pve1"]);
        assert_eq!(o.status.code(), Some(2), "{want}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{want}: {}", stderr(&o));
    }
    let o = run(
        &pve,
        dir.path(),
        &pve.env(),
        &["publish", path, "--node", "nope"],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not in the cluster"), "{}", stderr(&o));
    let o = run(&pve, dir.path(), &pve.env(), &["publish", path]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "three nodes and no --node: {}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("--node"), "{}", stderr(&o));
    let o = run(
        &pve,
        dir.path(),
        &pve.env(),
        &["publish", path, "--node", "pve1", "--vmid-range", "5-1"],
    );
    assert_eq!(o.status.code(), Some(2));
    std::fs::write(
        dir.path().join("imagectl.toml"),
        "[proxmox]\nendpont = \"x\"\n",
    )
    .unwrap();
    let o = run(&pve, dir.path(), &pve.env(), &["images"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("endpont"), "{}", stderr(&o));
    assert_clean(&pve);
}

#[test]
fn pin_ca_file_and_insecure() {
    let pve = FakePve::start();
    let dir = tempfile::tempdir().unwrap();
    let mut env = pve.env();
    // A wrong pin: refused before anything is sent.
    env[2].1 = vec!["00"; 32].join(":");
    let o = run(&pve, dir.path(), &env, &["images"]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.contains("TLS") && e.contains(pve.fingerprint()) && e.contains("refusing to connect"),
        "{e}"
    );
    assert!(
        pve.state().requests.is_empty(),
        "no request may reach a server that fails the pin"
    );
    // The CA file path.
    let ca = vec![
        ("PROXMOX_VE_ENDPOINT", pve.endpoint()),
        ("PROXMOX_VE_API_TOKEN", pve.token().to_string()),
        ("PROXMOX_VE_CA_FILE", pve.ca_file().display().to_string()),
    ];
    let o = run(&pve, dir.path(), &ca, &["images"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // A CA that did not sign the node certificate.
    let mut other = ca.clone();
    other[2].1 = "/etc/ssl/certs/ca-certificates.crt".into();
    if Path::new(&other[2].1).is_file() {
        let o = run(&pve, dir.path(), &other, &["images"]);
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains("certificate"), "{}", stderr(&o));
    }
    // --insecure works and says so, every time.
    let bare = vec![ca[0].clone(), ca[1].clone()];
    for _ in 0..2 {
        let o = run(&pve, dir.path(), &bare, &["images", "--insecure"]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stderr(&o).contains("warning: --insecure"), "{}", stderr(&o));
    }
}

#[test]
fn token_ids_follow_pves_grammar() {
    let pve = FakePve::start();
    let dir = tempfile::tempdir().unwrap();
    let secret = "0b4f2a77-1c2d-4e5f-8a9b-0123456789ab";
    // pve-access-control allows any user name without whitespace, `:` or `/`.
    pve.set_token("ci+bot@pve!ci", secret);
    let mut env = pve.env();
    env[1].1 = format!("ci+bot@pve!ci={secret}");
    let o = run(&pve, dir.path(), &env, &["images", "-o", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for (id, why) in [
        ("ci bot@pve!ci", "user name"),
        ("ci/bot@pve!ci", "user name"),
        ("cibot@1pve!ci", "realm"),
        ("cibot@pve!c+i", "token id"),
        ("cibot@pve", "!TOKENID"),
    ] {
        env[1].1 = format!("{id}={secret}");
        let o = run(&pve, dir.path(), &env, &["images"]);
        assert_eq!(o.status.code(), Some(2), "{id}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(e.contains("malformed") && e.contains(why), "{id}: {e}");
        assert!(!e.contains(secret) && !e.contains("panicked"), "{e}");
    }
}
