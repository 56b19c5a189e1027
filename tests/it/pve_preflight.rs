//! The Proxmox VE preflight (`imagectl::remote::pve::access`) through the binary, against
//! fakepve with PVE's version answer and ACL checks: a cluster too old for a feature, and a token
//! missing privileges, both exit 2 before anything is uploaded or cloned, naming the version, or
//! every missing privilege with its path; a pool- and storage-scoped role is enough.

use crate::fleet_pve::PveFleet;
use crate::publish::{assert_clean, image, json_out, publish, run, stderr};
use imagectl_tests::fakepve::FakePve;
use imagectl_tests::pve_guest::GuestOptions;

/// `env` with the API token `id=secret` instead of the harness's root token.
fn with_token(pve: &FakePve, id: &str, secret: &str) -> Vec<(&'static str, String)> {
    pve.set_token(id, secret);
    let mut env = pve.env();
    for (k, v) in env.iter_mut() {
        if *k == "PROXMOX_VE_API_TOKEN" {
            *v = format!("{id}={secret}");
        }
    }
    env
}

#[test]
fn publish_refuses_a_cluster_too_old_for_qcow2_imports() {
    let pve = FakePve::start();
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "1.0", &["bios"]);
    pve.set_version("8.3.2");
    let o = publish(&pve, dir.path(), &img, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("8.3.2") && err.contains("8.4 or later"),
        "{err}"
    );
    assert_clean(&pve);
    pve.set_version("8.4.1");
    let o = publish(&pve, dir.path(), &img, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn publish_names_every_missing_privilege_and_needs_network_access_only_for_downloads() {
    let pve = FakePve::start();
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "1.0", &["bios"]);
    let user = "publisher@pve!imagectl";
    let env = with_token(&pve, user, "0b7cd9a4-3e2f-4f0e-9a51-2f8e0a1c4d11");
    pve.grant(
        user,
        "/storage/local",
        &["Datastore.AllocateTemplate", "Datastore.Audit"],
    );
    pve.grant(user, "/vms", &["VM.Allocate", "VM.Audit"]);
    let args = [
        "publish",
        img.to_str().unwrap(),
        "--node",
        "pve1",
        "-o",
        "json",
    ];
    let o = run(&pve, dir.path(), &env, &args);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    for (privilege, path) in [
        ("Datastore.Allocate", "/storage/local"),
        ("Datastore.AllocateSpace", "/storage/local-lvm"),
        ("VM.Config.Disk", "/vms"),
        ("VM.Config.Options", "/vms"),
    ] {
        assert!(
            err.contains(privilege) && err.contains(path),
            "{privilege} on {path}: {err}"
        );
    }
    assert!(
        !err.contains("Sys.AccessNetwork"),
        "an upload needs no network access: {err}"
    );
    assert!(
        !err.contains("0b7cd9a4"),
        "the token secret in an error: {err}"
    );
    assert_clean(&pve);

    // The rest of the role: publish works with it.
    pve.grant(user, "/storage/local", &["Datastore.Allocate"]);
    pve.grant(user, "/storage/local-lvm", &["Datastore.AllocateSpace"]);
    pve.grant(
        user,
        "/vms",
        &[
            "VM.Config.Disk",
            "VM.Config.CPU",
            "VM.Config.Memory",
            "VM.Config.Network",
            "VM.Config.HWType",
            "VM.Config.Options",
        ],
    );
    pve.grant(user, "/", &["Sys.Audit"]);
    pve.grant(user, "/sdn/zones/localnetwork/vmbr0", &["SDN.Use"]);
    let o = run(&pve, dir.path(), &env, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json_out(&o)["results"].as_array().map(Vec::len), Some(1));

    // --from-url: the node's network access too.
    let args = [
        "publish",
        img.to_str().unwrap(),
        "--node",
        "pve1",
        "--from-url",
        "https://images.example.invalid/x.qcow2",
    ];
    let o = run(&pve, dir.path(), &env, &args);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("Sys.AccessNetwork on /nodes/pve1"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn fleet_commands_check_version_and_the_guest_agent_privileges_of_that_version() {
    let mut env = PveFleet::new(0.0, GuestOptions::default());
    env.publish("1.0");
    let deploy = ["deploy", "--fleet", "pf", "--count", "1", "--image", "1.0"];
    // PVE 8.0 has no /pools?poolid=: the lock could never be released.
    env.pve.set_version("8.0.4");
    let o = env.run(&deploy);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("8.1 or later"), "{}", stderr(&o));
    env.assert_nothing_left("pf");

    // A token with a pool-scoped role that lacks the guest-agent privileges of PVE 9.
    env.pve.set_version("9.0.10");
    let user = "fleet@pve!imagectl";
    let secret = "5d1f3c2a-8b7e-4c6d-9e0f-1a2b3c4d5e6f";
    env.pve.set_token(user, secret);
    let vm_privs = [
        "VM.Allocate",
        "VM.Clone",
        "VM.Audit",
        "VM.Config.CDROM",
        "VM.Config.Options",
        "VM.PowerMgmt",
    ];
    env.pve.grant(user, "/pool/imagectl-pf", &vm_privs);
    env.pve
        .grant(user, "/pool/imagectl-pf", &["Pool.Audit", "Pool.Allocate"]);
    env.pve
        .grant(user, "/pool/imagectl-lock-pf", &["Pool.Allocate"]);
    env.pve.grant(
        user,
        "/storage/local",
        &[
            "Datastore.AllocateTemplate",
            "Datastore.Allocate",
            "Datastore.Audit",
        ],
    );
    let o = env
        .command(&deploy)
        .env("PROXMOX_VE_API_TOKEN", format!("{user}={secret}"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("VM.GuestAgent.Audit, VM.GuestAgent.FileRead on /pool/imagectl-pf or /vms"),
        "{err}"
    );
    assert!(
        !err.contains("VM.Monitor"),
        "PVE 9 has no VM.Monitor: {err}"
    );
    assert!(!err.contains(secret));
    // On PVE 8.4 the same calls need VM.Monitor instead.
    env.pve.set_version("8.4.1");
    let o = env
        .command(&deploy)
        .env("PROXMOX_VE_API_TOKEN", format!("{user}={secret}"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("VM.Monitor on /pool/imagectl-pf"),
        "{}",
        stderr(&o)
    );
    env.assert_nothing_left("pf");
}
