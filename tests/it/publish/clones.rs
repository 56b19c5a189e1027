//! Which VMs use a template, on storages whose linked clones do not name their base.
//!
//! pve-storage `LvmThinPlugin.pm` `clone_image` names a linked clone `vm-<id>-disk-N` (a thin
//! snapshot whose origin only LVM knows); `RBDPlugin.pm`/`ZFSPoolPlugin.pm` name it
//! `<base>/vm-<id>-disk-N`. Clones made through the fake's API, as PVE makes them: tags and
//! notes first, then the volume name, then qemu-server's `meta` (copied by `clone_vm`).

use super::names::{client, rt};
use super::*;
use imagectl::remote::pve::params;
use std::time::Duration;

/// Clones template `vmid` on pve1 as `newid` (linked: PVE's default for a template).
fn linked_clone(pve: &FakePve, vmid: u32, newid: u32) {
    let c = client(pve);
    let rt = rt();
    let upid = rt
        .block_on(c.post_task(
            &format!("/nodes/pve1/qemu/{vmid}/clone"),
            params([
                ("newid", newid.to_string()),
                ("name", format!("clone-{newid}")),
            ]),
        ))
        .unwrap();
    rt.block_on(c.wait_task(&upid, Duration::from_secs(30)))
        .unwrap();
}

/// What a user may do to a clone: drop its tags and notes.
fn forget_origin(pve: &FakePve, newid: u32) {
    let c = client(pve);
    rt().block_on(c.put::<Value>(
        &format!("/nodes/pve1/qemu/{newid}/config"),
        params([("delete", "tags,description")]),
    ))
    .unwrap();
}

fn used_by(pve: &FakePve, dir: &Path) -> Vec<(String, Vec<u64>)> {
    let v = json_out(&run(pve, dir, &pve.env(), &["images", "-o", "json"]));
    v["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let ids = r["used_by"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap())
                .collect();
            (r["version"].as_str().unwrap().to_string(), ids)
        })
        .collect()
}

#[test]
fn linked_clones_on_lvm_thin_are_users_with_or_without_tags_and_notes() {
    let pve = FakePve::start();
    let dir = tempfile::tempdir().unwrap();
    let mut ids = Vec::new();
    for v in ["1.0", "2.0", "3.0"] {
        // PVE's `meta` ctime has whole seconds and a real create takes longer than one; a VM
        // whose meta matches two templates counts for both (see `clone_of`).
        std::thread::sleep(Duration::from_millis(1100));
        let img = image(dir.path(), v, &["bios"]);
        let out = json_out(&publish(&pve, dir.path(), &img, &[]));
        ids.push(out["results"][0]["vmid"].as_u64().unwrap() as u32);
    }
    linked_clone(&pve, ids[0], 601);
    linked_clone(&pve, ids[1], 602);
    forget_origin(&pve, 602);
    let vms = pve.vms();
    let vm = |id: u32| vms.iter().find(|v| v.vmid == id).unwrap().clone();
    // As LvmThinPlugin names them: no base in the volume id.
    for id in [601, 602] {
        assert!(
            vm(id).config["scsi0"].starts_with(&format!("local-lvm:vm-{id}-disk-0")),
            "{}",
            vm(id).config["scsi0"]
        );
    }
    // 601 keeps the notes clone_vm copied (naming its template); 602 has none.
    assert!(vm(601)
        .description
        .contains(&format!("imagectl-template: {}", ids[0])));
    assert!(vm(602).description.is_empty() && vm(602).tags.is_empty());
    assert_eq!(vm(602).config["meta"], vm(ids[1]).config["meta"]);
    assert_eq!(
        used_by(&pve, dir.path()),
        vec![
            ("3.0".to_string(), vec![]),
            ("2.0".to_string(), vec![602]),
            ("1.0".to_string(), vec![601]),
        ]
    );
    let done = json_out(&run(
        &pve,
        dir.path(),
        &pve.env(),
        &["gc", "--keep", "1", "-o", "json"],
    ));
    assert!(done["deleted"].as_array().unwrap().is_empty(), "{done}");
    let kept = done["kept"].to_string();
    assert!(
        kept.contains("in use by VM 601") && kept.contains("in use by VM 602"),
        "{kept}"
    );
    // Once the clone is gone, its template may go.
    rt().block_on(client(&pve).destroy_vm("pve1", 602)).unwrap();
    let done = json_out(&run(
        &pve,
        dir.path(),
        &pve.env(),
        &["gc", "--keep", "1", "-o", "json"],
    ));
    let gone: Vec<u64> = done["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["vmid"].as_u64().unwrap())
        .collect();
    assert_eq!(gone, vec![ids[1] as u64]);
}

#[test]
fn linked_clones_on_rbd_name_their_base() {
    let pve = FakePve::start();
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "1.0", &["bios"]);
    let out = json_out(&publish(&pve, dir.path(), &img, &["--storage", "ceph-vm"]));
    let id = out["results"][0]["vmid"].as_u64().unwrap() as u32;
    linked_clone(&pve, id, 701);
    forget_origin(&pve, 701);
    let vms = pve.vms();
    let clone = vms.iter().find(|v| v.vmid == 701).unwrap();
    assert!(
        clone.config["scsi0"].starts_with(&format!("ceph-vm:base-{id}-disk-0/vm-701-disk-0")),
        "RBDPlugin clone_image names the base: {}",
        clone.config["scsi0"]
    );
    assert_eq!(
        used_by(&pve, dir.path()),
        vec![("1.0".to_string(), vec![701])]
    );
}
