//! Local VM tests with real QEMU but without a baked image: a blank qcow2 boots into firmware,
//! which is enough to check the overlay, forwards, serial console, cleanup and process hygiene.
//! The end-to-end boot of a baked image is tested elsewhere once an image exists.

use crate::imagectl_bin;
use imagectl::vm::{self, Accel, Firmware, QemuVm};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn blank_image(dir: &Path) -> PathBuf {
    let p = dir.join("blank.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&p)
        .arg("64M")
        .status()
        .unwrap();
    assert!(st.success());
    p
}

fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.contains(") Z "),
        Err(_) => false,
    }
}

fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    f()
}

/// Children of `parent` whose command line mentions qemu.
fn qemu_children(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
        let ppid = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .map(str::trim);
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if ppid == Some(&parent.to_string())
            && String::from_utf8_lossy(&cmdline).contains("qemu-system")
        {
            out.push(pid);
        }
    }
    out
}

#[test]
fn uefi_vm_runs_on_an_overlay_and_is_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    let image = blank_image(dir.path());
    let before = imagectl::util::sha256_file(&image).unwrap();
    let mut cfg = imagectl::seed::SeedConfig::new("vm-it").unwrap();
    cfg.instance_id = "iid-vm-it".into();
    let iso = dir.path().join("seed.iso");
    imagectl::seed::write_iso(&cfg, &iso).unwrap();

    let mut vm = QemuVm::builder(&image)
        .name("it-uefi")
        .firmware(Firmware::Uefi)
        .accel(Accel::Auto)
        .memory_mib(256)
        .cpus(1)
        .seed_iso(&iso)
        .qmp(true)
        .start()
        .unwrap();
    let pid = vm.pid().unwrap();
    let work = vm.work_dir().to_path_buf();
    assert!(matches!(vm.accel(), Accel::Tcg | Accel::Kvm));
    assert!(
        vm.plan().disk.starts_with(&work) && vm.plan().disk.is_file(),
        "overlay in work dir"
    );
    assert!(work.join("OVMF_VARS.fd").is_file());
    assert_eq!(vm.forwards().len(), vm::DEFAULT_GUEST_PORTS.len());
    for g in vm::DEFAULT_GUEST_PORTS {
        let host = vm.host_port(g).unwrap();
        vm::wait_for_port(host, Duration::from_secs(10)).unwrap();
    }
    assert!(vm::args::netdev_arg(vm.plan()).contains("restrict=on"));
    // OVMF writes to the serial console within a minute even under TCG.
    let serial = vm.serial_log().to_path_buf();
    assert!(
        wait_until(Duration::from_secs(90), || std::fs::read_to_string(&serial)
            .unwrap_or_default()
            .contains("BdsDxe")),
        "no firmware output on the serial console; qemu stderr: {}",
        vm.stderr_tail(10)
    );
    assert!(vm.plan().qmp_socket.as_ref().unwrap().exists());
    vm.check_running().unwrap();
    assert!(vm.fall_back_if_kvm_failed().is_ok());
    drop(vm);
    assert!(!alive(pid), "qemu {pid} survived drop");
    assert!(!work.exists(), "work dir {} left behind", work.display());
    assert_eq!(
        imagectl::util::sha256_file(&image).unwrap(),
        before,
        "image was modified"
    );
}

#[test]
fn kept_files_survive_stop() {
    let dir = tempfile::tempdir().unwrap();
    let image = blank_image(dir.path());
    let vm = QemuVm::builder(&image)
        .name("it-keep")
        .accel(Accel::Tcg)
        .memory_mib(128)
        .cpus(1)
        .guest_ports(&[9100])
        .keep_files(true)
        .start()
        .unwrap();
    let work = vm.work_dir().to_path_buf();
    vm.stop().unwrap();
    assert!(work.join("serial.log").exists());
    std::fs::remove_dir_all(&work).unwrap();
}

#[test]
fn bad_images_are_input_errors() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    for (img, want) in [
        (raw.as_path(), "raw image"),
        (&dir.path().join("missing.qcow2"), "does not exist"),
    ] {
        let o = Command::new(imagectl_bin())
            .arg("test")
            .arg(img)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(want), "{err}");
    }
    let e = QemuVm::builder(dir.path().join("missing.qcow2"))
        .start()
        .err()
        .unwrap();
    assert_eq!(imagectl::error::exit_code(&e), 2);
}

#[test]
fn failing_checks_exit_1_with_a_json_report() {
    let dir = tempfile::tempdir().unwrap();
    let image = blank_image(dir.path());
    let serial = dir.path().join("console.log");
    let o = Command::new(imagectl_bin())
        .args([
            "test",
            "--timeout",
            "6",
            "--accel",
            "tcg",
            "--memory",
            "256",
            "-o",
            "json",
            "-q",
            "--serial-log",
        ])
        .arg(&serial)
        .arg(&image)
        .env("TMPDIR", dir.path())
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["passed"], false);
    let boot = &r["boots"][0];
    assert_eq!(boot["firmware"], "bios");
    assert_eq!(boot["accel"], "tcg");
    let names: Vec<&str> = boot["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "node_exporter",
            "cadvisor",
            "cloud-init",
            "docker",
            "agent-unit"
        ]
    );
    assert!(boot["checks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["passed"] == false));
    assert!(serial.is_file(), "serial log copied out");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("imagectl-"))
        .collect();
    assert!(leftovers.is_empty(), "temp dirs left: {leftovers:?}");
}

#[test]
fn qemu_dies_with_imagectl_on_sigterm_and_sigkill() {
    for signal in ["TERM", "KILL"] {
        let dir = tempfile::tempdir().unwrap();
        let image = blank_image(dir.path());
        let mut child = Command::new(imagectl_bin())
            .args([
                "test",
                "--timeout",
                "120",
                "--accel",
                "tcg",
                "--memory",
                "128",
                "-q",
            ])
            .arg(&image)
            .env("TMPDIR", dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut qemu = Vec::new();
        assert!(
            wait_until(Duration::from_secs(30), || {
                qemu = qemu_children(child.id());
                !qemu.is_empty()
            }),
            "qemu never started"
        );
        let st = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(st.success());
        let status = child.wait().unwrap();
        if signal == "TERM" {
            assert_eq!(status.code(), Some(128 + 15), "imagectl exit after SIGTERM");
        }
        for pid in &qemu {
            assert!(
                wait_until(Duration::from_secs(10), || !alive(*pid)),
                "qemu {pid} outlived SIGTERM/SIGKILL of imagectl"
            );
        }
        if signal == "TERM" {
            let vm_dirs = std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("imagectl-vm-"))
                .count();
            assert_eq!(vm_dirs, 0, "VM work dir left after SIGTERM");
        }
    }
}
