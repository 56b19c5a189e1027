//! `imagectl publish`, `images` and `gc` against fakepve (tests/fakepve/harness.py): real TLS with
//! a pinned certificate, streamed uploads that PVE checks, faults injected with `fail()`.
//!
//! Every run goes through [`run`], which asserts that the API token secret appears in neither
//! stdout nor stderr. Every fault test asserts that no VM and no import volume is left behind.

use crate::imagectl_bin;
use imagectl_tests::fakepve::FakePve;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

mod clones;
mod cluster;
mod faults;
mod names;

/// A small qcow2 and its manifest in `dir`; returns the qcow2 path.
pub(crate) fn image(dir: &Path, version: &str, boot_modes: &[&str]) -> PathBuf {
    let p = dir.join(format!("gitlab-runner-{version}.qcow2"));
    // Distinct versions get distinct bytes (and sha256): 1.x is 64 MiB, 2.x 65 MiB, …
    let mib = 63
        + version
            .chars()
            .next()
            .and_then(|c| c.to_digit(10))
            .unwrap_or(1);
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&p)
        .arg(format!("{mib}M"))
        .status()
        .expect("running qemu-img");
    assert!(st.success());
    write_manifest(&p, version, boot_modes);
    p
}

/// Writes `<image>.manifest.json` for an existing image file.
pub(crate) fn write_manifest(p: &Path, version: &str, boot_modes: &[&str]) {
    let out = Command::new("sha256sum")
        .arg(p)
        .output()
        .expect("sha256sum");
    let sha = String::from_utf8_lossy(&out.stdout)[..64].to_string();
    let size = std::fs::metadata(p).unwrap().len();
    let m = json!({
        "format": 1, "name": "gitlab-runner", "version": version,
        "image": p.file_name().unwrap().to_string_lossy(), "sha256": sha, "size": size,
        "virtual_size": 64 << 20, "spec_hash": "spec-0123", "lock_hash": "lock-4567", "inputs_hash": "in",
        "profiles": [], "boot_modes": boot_modes, "kernel": "6.1.0", "root_fs_uuid": "u",
        "source_date_epoch": 0, "packages": [], "artifacts": [], "hygiene_removed": {},
        "layer_cached": false, "stage_seconds": {}, "build_seconds": 1.0,
        "built_at": format!("2025-01-0{}T00:00:00Z", version.chars().next().unwrap_or('1')),
        "imagectl_version": "0.1.0"
    });
    std::fs::write(
        p.with_extension("manifest.json"),
        serde_json::to_vec_pretty(&m).unwrap(),
    )
    .unwrap();
}

/// The imagectl command with a clean environment (no settings file, no inherited PVE variables)
/// plus `env`.
pub(crate) fn command(cwd: &Path, env: &[(&str, String)], args: &[&str]) -> Command {
    let mut cmd = Command::new(imagectl_bin());
    cmd.current_dir(cwd)
        .env_remove("PROXMOX_VE_ENDPOINT")
        .env_remove("PROXMOX_VE_API_TOKEN")
        .env_remove("PROXMOX_VE_FINGERPRINT")
        .env_remove("PROXMOX_VE_CA_FILE")
        .env_remove("IMAGECTL_CONFIG")
        .env_remove("IMAGECTL_LOG")
        .env("HOME", cwd)
        .env("XDG_CONFIG_HOME", cwd.join(".config"))
        .args(args)
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs imagectl; asserts the token secret is in neither output.
pub(crate) fn run(pve: &FakePve, cwd: &Path, env: &[(&str, String)], args: &[&str]) -> Output {
    let out = command(cwd, env, args).output().expect("running imagectl");
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        !so.contains(pve.secret()) && !se.contains(pve.secret()),
        "the API token secret leaked into the output of {args:?}"
    );
    out
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub(crate) fn json_out(o: &Output) -> Value {
    assert!(o.status.success(), "imagectl failed: {}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "JSON on stdout: {e}: {}",
            String::from_utf8_lossy(&o.stdout)
        )
    })
}

pub(crate) fn publish(pve: &FakePve, dir: &Path, img: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "publish",
        img.to_str().unwrap(),
        "--node",
        "pve1",
        "-o",
        "json",
    ];
    args.extend_from_slice(extra);
    run(pve, dir, &pve.env(), &args)
}

/// Nothing left: no VM at all, no import volume.
pub(crate) fn assert_clean(pve: &FakePve) {
    let vms = pve.vms();
    assert!(vms.is_empty(), "VMs left behind: {vms:?}");
    let imports = pve.import_volumes();
    assert!(
        imports.is_empty(),
        "import volumes left behind: {imports:?}"
    );
}

#[test]
fn publish_makes_a_template_and_republishing_is_a_no_op() {
    let pve = FakePve::start();
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "1.0", &["bios", "uefi"]);
    let v = json_out(&publish(&pve, dir.path(), &img, &[]));
    let r = &v["results"][0];
    assert_eq!(r["action"], "created");
    assert_eq!(v["firmware"], "bios", "hybrid images default to BIOS");
    let vmid = r["vmid"].as_u64().unwrap() as u32;
    let vms = pve.vms();
    assert_eq!(vms.len(), 1);
    let t = &vms[0];
    assert_eq!(
        (t.vmid, t.template, t.name.as_str()),
        (vmid, true, "gitlab-runner-1.0")
    );
    assert_eq!(t.tags, "image-1.0;imagectl");
    let c = &t.config;
    assert_eq!(c["scsihw"], "virtio-scsi-single");
    assert_eq!(c["agent"], "1");
    assert_eq!(c["serial0"], "socket");
    assert_eq!(c["boot"], "order=scsi0;net0");
    assert!(
        c["net0"].contains("bridge=vmbr0") && !c["net0"].contains("tag="),
        "{}",
        c["net0"]
    );
    assert!(
        c["scsi0"].starts_with("local-lvm:base-") && c["scsi0"].contains("size=64M"),
        "{}",
        c["scsi0"]
    );
    assert!(!c.contains_key("bios") && !c.contains_key("efidisk0"));
    let sha = v["sha256"].as_str().unwrap();
    for needle in [
        sha,
        "spec-0123",
        "lock-4567",
        "2025-01-01T00:00:00Z",
        &format!("imagectl-template: {vmid}"),
    ] {
        assert!(
            t.description.contains(needle),
            "notes lack {needle}: {}",
            t.description
        );
    }
    assert!(
        !t.description.contains("imagectl-publishing"),
        "{}",
        t.description
    );
    assert!(
        pve.import_volumes().is_empty(),
        "the import volume is removed after import"
    );
    let st = pve.state();
    assert_eq!(st.uploads.len(), 1);
    assert_eq!(st.uploads[0].status, "stored");
    assert!(
        st.tasks
            .iter()
            .all(|t| t.exitstatus.as_deref() == Some("OK")),
        "{:?}",
        st.tasks
    );

    let again = json_out(&publish(&pve, dir.path(), &img, &[]));
    assert_eq!(again["results"][0]["action"], "exists");
    assert_eq!(again["results"][0]["vmid"], vmid);
    assert_eq!(pve.vms().len(), 1);
    assert_eq!(pve.state().uploads.len(), 1, "a re-publish uploads nothing");

    // Text output, and `images` sees it.
    let o = run(&pve, dir.path(), &pve.env(), &["images"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("gitlab-runner") && text.contains(&sha[..12]) && text.contains("ready"),
        "{text}"
    );
}

#[test]
fn uefi_images_get_ovmf_an_efi_disk_and_the_asked_network() {
    let pve = FakePve::start();
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "1.0", &["uefi"]);
    let v = json_out(&publish(
        &pve,
        dir.path(),
        &img,
        &["--bridge", "vmbr1", "--vlan", "42"],
    ));
    assert_eq!(v["firmware"], "uefi");
    let c = &pve.vms()[0].config;
    assert_eq!(c["bios"], "ovmf");
    assert!(
        c["efidisk0"].contains("efitype=4m") && c["efidisk0"].starts_with("local-lvm:"),
        "{}",
        c["efidisk0"]
    );
    assert!(
        c["net0"].contains("bridge=vmbr1") && c["net0"].contains("tag=42"),
        "{}",
        c["net0"]
    );
    let o = publish(&pve, dir.path(), &img, &["--firmware", "bios"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "a UEFI-only image cannot be published for BIOS"
    );
}

#[test]
fn from_url_lets_the_node_download_the_image() {
    let pve = FakePve::start();
    let dir = tempfile::tempdir().unwrap();
    // A `+` in the version: PVE stores the download as `…1.0_b1.qcow2`.
    let img = image(dir.path(), "1.0+b1", &["bios"]);
    let mut server = Command::new("python3")
        .args([
            "-u",
            "-m",
            "http.server",
            "0",
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let port = line
        .split("port ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("http.server port");
    let url = format!(
        "http://127.0.0.1:{port}/{}",
        img.file_name().unwrap().to_string_lossy()
    );
    let o = publish(&pve, dir.path(), &img, &["--from-url", &url]);
    let _ = server.kill();
    let _ = server.wait();
    let v = json_out(&o);
    assert_eq!(v["results"][0]["action"], "created");
    assert_eq!(v["results"][0]["uploaded_bytes"], 0);
    let st = pve.state();
    assert_eq!(st.uploads.len(), 1);
    assert_eq!(st.uploads[0].status, "stored");
    assert_eq!(
        st.uploads[0].filename,
        "imagectl-gitlab-runner-1.0_b1.qcow2"
    );
    assert!(pve.import_volumes().is_empty());
    assert!(pve.vms()[0].template);
}

#[test]
fn verbose_logs_never_show_the_secret() {
    let pve = FakePve::start();
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "1.0", &["bios"]);
    pve.fail(
        "GET",
        "/cluster/resources",
        503,
        "Service Unavailable",
        Some(1),
    );
    let o = run(
        &pve,
        dir.path(),
        &pve.env(),
        &["-vv", "publish", img.to_str().unwrap(), "--node", "pve1"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("retrying"), "{}", stderr(&o));
}

/// Peak RSS of a child (VmHWM, sampled until it exits), in KiB.
fn peak_rss_kib(child: &mut std::process::Child) -> (std::process::ExitStatus, u64) {
    let mut peak = 0;
    loop {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{}/status", child.id())) {
            if let Some(kb) = s.lines().find_map(|l| l.strip_prefix("VmHWM:")) {
                peak = peak.max(kb.trim().trim_end_matches("kB").trim().parse().unwrap_or(0));
            }
        }
        if let Some(st) = child.try_wait().unwrap() {
            return (st, peak);
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
}

#[test]
fn a_multi_gib_sparse_image_uploads_with_flat_memory() {
    let pve = FakePve::start();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("gitlab-runner-1.0.qcow2");
    // preallocation=metadata: a qcow2 whose file is as long as the disk, and sparse.
    let st = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
        ])
        .arg(&img)
        .arg("3G")
        .status()
        .unwrap();
    assert!(st.success());
    let len = std::fs::metadata(&img).unwrap().len();
    assert!(len > 3 << 30, "{len}");
    write_manifest(&img, "1.0", &["bios"]);
    let mut child = command(
        dir.path(),
        &pve.env(),
        &["publish", img.to_str().unwrap(), "--node", "pve1", "-q"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let (status, peak) = peak_rss_kib(&mut child);
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{err}");
    assert!(!err.contains(pve.secret()));
    eprintln!(
        "peak RSS of imagectl while uploading {} MiB: {} KiB",
        len >> 20,
        peak
    );
    assert!(
        peak > 0 && peak <= 64 * 1024,
        "peak RSS {peak} KiB > 64 MiB"
    );
    let st = pve.state();
    assert_eq!(st.uploads[0].bytes, len);
    assert_eq!(st.uploads[0].status, "stored");
    assert!(pve.import_volumes().is_empty());
}
