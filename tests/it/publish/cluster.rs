//! Cluster-wide behaviour: settings from the file, VM id allocation, several nodes, shared
//! storage, and `images`/`gc` with templates in use.

use super::*;

#[test]
fn settings_come_from_the_file_when_env_and_flags_are_silent() {
    let pve = FakePve::start();
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "1.0", &["bios"]);
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, pve.token()).unwrap();
    std::fs::write(
        dir.path().join("imagectl.toml"),
        format!(
            "[proxmox]\nendpoint = \"{}\"\ntoken_file = \"{}\"\nfingerprint = \"{}\"\nnode = \"pve2\"\nvmid_range = \"9100-9199\"\n\n[publish]\nbridge = \"vmbr7\"\n",
            pve.endpoint(),
            token_file.display(),
            pve.fingerprint()
        ),
    )
    .unwrap();
    let o = run(
        &pve,
        dir.path(),
        &[],
        &[
            "publish",
            img.to_str().unwrap(),
            "-o",
            "json",
            "--bridge",
            "vmbr9",
        ],
    );
    let v = json_out(&o);
    assert_eq!(v["results"][0]["node"], "pve2");
    assert_eq!(v["results"][0]["vmid"], 9100);
    assert!(
        pve.vms()[0].config["net0"].contains("bridge=vmbr9"),
        "the flag beats the file"
    );
}

#[test]
fn vmid_taken_meanwhile_is_retried_with_another_id_in_range() {
    let pve = FakePve::start();
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "1.0", &["bios"]);
    pve.add_vm(9000, "other", "pve2", json!({}));
    pve.fail(
        "POST",
        "/nodes/pve1/qemu",
        500,
        "unable to create VM 9001: config file already exists",
        Some(1),
    );
    let v = json_out(&publish(
        &pve,
        dir.path(),
        &img,
        &["--vmid-range", "9000-9010"],
    ));
    assert_eq!(v["results"][0]["vmid"], 9002);
    // A range with no free id left: the upload is removed again.
    let img2 = image(dir.path(), "2.0", &["bios"]);
    let o = publish(&pve, dir.path(), &img2, &["--vmid-range", "9000-9000"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no free VM id"), "{}", stderr(&o));
    assert!(pve.import_volumes().is_empty());
    assert_eq!(pve.vms().len(), 2);
}

#[test]
fn all_nodes_publishes_per_node_skips_offline_ones_and_shared_storage_once() {
    let pve = FakePve::start();
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "1.0", &["bios"]);
    pve.set_node_online("pve3", false);
    let o = run(
        &pve,
        dir.path(),
        &pve.env(),
        &[
            "publish",
            img.to_str().unwrap(),
            "--all-nodes",
            "-o",
            "json",
        ],
    );
    let v = json_out(&o);
    let nodes: Vec<&str> = v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, vec!["pve1", "pve2"]);
    assert_eq!(v["skipped"][0]["node"], "pve3");
    assert!(stderr(&o).contains("pve3"), "{}", stderr(&o));
    let mut on: Vec<String> = pve
        .vms()
        .iter()
        .filter(|v| v.template)
        .map(|v| v.node.clone())
        .collect();
    on.sort();
    assert_eq!(on, vec!["pve1", "pve2"]);
    assert!(pve.import_volumes().is_empty());
    // An offline node named explicitly is an error, and nothing is made.
    let o = run(
        &pve,
        dir.path(),
        &pve.env(),
        &["publish", img.to_str().unwrap(), "--node", "pve3"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("pve3 is offline"), "{}", stderr(&o));
    // Shared storage: once, whatever --all-nodes says.
    let v = json_out(&run(
        &pve,
        dir.path(),
        &pve.env(),
        &[
            "publish",
            img.to_str().unwrap(),
            "--all-nodes",
            "--storage",
            "ceph-vm",
            "-o",
            "json",
        ],
    ));
    assert_eq!(v["results"].as_array().unwrap().len(), 1);
    assert!(pve.vms().iter().any(|v| v
        .config
        .get("scsi0")
        .is_some_and(|d| d.starts_with("ceph-vm:"))));
}

#[test]
fn images_counts_users_and_gc_never_deletes_a_template_in_use() {
    let pve = FakePve::start();
    let dir = tempfile::tempdir().unwrap();
    let mut ids = Vec::new();
    for v in ["1.0", "2.0", "3.0", "4.0"] {
        let img = image(dir.path(), v, &["bios"]);
        let out = json_out(&publish(&pve, dir.path(), &img, &[]));
        ids.push(out["results"][0]["vmid"].as_u64().unwrap() as u32);
    }
    // 1.0 is used by a runner VM (tag); 2.0 by a disk whose volume id names its base volume (the
    // ZFS/RBD form; real LVM-thin clones are `vm-N-disk-0`: see clones.rs).
    pve.add_vm(
        500,
        "runner-a",
        "pve1",
        json!({"tags": "fleet-ci;image-1.0;imagectl"}),
    );
    pve.add_vm(
        501,
        "linked",
        "pve1",
        json!({"scsi0": format!("local-lvm:base-{}-disk-0/vm-501-disk-0,size=64M", ids[1])}),
    );
    let v = json_out(&run(
        &pve,
        dir.path(),
        &pve.env(),
        &["images", "-o", "json"],
    ));
    let used: Vec<(String, usize)> = v["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["version"].as_str().unwrap().to_string(),
                r["used_by"].as_array().unwrap().len(),
            )
        })
        .collect();
    assert_eq!(
        used,
        vec![
            ("4.0".into(), 0),
            ("3.0".into(), 0),
            ("2.0".into(), 1),
            ("1.0".into(), 1)
        ]
    );

    let dry = json_out(&run(
        &pve,
        dir.path(),
        &pve.env(),
        &["gc", "--keep", "1", "--dry-run", "-o", "json"],
    ));
    let would: Vec<u32> = dry["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["vmid"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(would, vec![ids[2]]);
    assert_eq!(pve.vms().len(), 6, "a dry run deletes nothing");
    let done = json_out(&run(
        &pve,
        dir.path(),
        &pve.env(),
        &["gc", "--keep", "1", "-o", "json"],
    ));
    assert_eq!(done["deleted"].as_array().unwrap().len(), 1);
    let left: Vec<u32> = pve.vms().iter().map(|v| v.vmid).collect();
    assert!(
        !left.contains(&ids[2])
            && left.contains(&ids[0])
            && left.contains(&ids[1])
            && left.contains(&ids[3]),
        "{left:?}"
    );
    let reasons = done["kept"].to_string();
    assert!(
        reasons.contains("in use by VM 500") && reasons.contains("in use by VM 501"),
        "{reasons}"
    );

    // With a VM whose config cannot be read (its node is offline), usage is unknown: 4.0 would
    // go once 5.0 is out, but nothing is deleted.
    pve.add_vm(502, "elsewhere", "pve3", json!({}));
    let img5 = image(dir.path(), "5.0", &["bios"]);
    json_out(&publish(&pve, dir.path(), &img5, &[]));
    pve.set_node_online("pve3", false);
    let o = run(
        &pve,
        dir.path(),
        &pve.env(),
        &["gc", "--keep", "1", "-o", "json"],
    );
    let v = json_out(&o);
    assert!(v["deleted"].as_array().unwrap().is_empty(), "{v}");
    assert!(v["kept"].to_string().contains("usage unknown"), "{v}");
    assert!(stderr(&o).contains("VM 502"), "{}", stderr(&o));
    assert!(pve.vms().iter().any(|v| v.vmid == ids[3]));
}
