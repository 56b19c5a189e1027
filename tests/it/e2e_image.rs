//! e2e: the offline image of `image-specs/gitlab-runner.yaml`, baked once per run, boots under
//! SeaBIOS and under OVMF with `imagectl test` and every check passes; `imagectl inspect` finds it
//! clean, flat, zstd-compressed and matching its manifest; gitlab-runner's package scripts (the
//! double's, which take the real package's steps) left a disabled systemd unit, no SysV script,
//! the gitlab-runner user, and nothing started.
//!
//! Heavy: takes the `heavy()` lock, bakes on first use (minutes when the package cache is cold)
//! and boots twice under TCG (a few minutes).

use crate::imagectl_bin;
use crate::support::{heavy, offline_image, workspace};
use serde_json::Value;
use std::process::Command;

/// The checks `imagectl test` must report as passed in every boot (no agent seed is given, so
/// there is no agent-status check here; e2e_agent covers registration).
const CHECKS: [&str; 5] = [
    "node_exporter",
    "cadvisor",
    "docker",
    "agent-unit",
    "cloud-init",
];

fn run_json(cmd: &mut Command) -> (i32, Value, String) {
    let o = cmd.output().expect("running imagectl");
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "imagectl printed no JSON ({e}); stdout: {}\nstderr: {stderr}",
            String::from_utf8_lossy(&o.stdout)
        )
    });
    (o.status.code().unwrap_or(-1), v, stderr)
}

#[test]
fn e2e_image_boots_under_bios_and_uefi_and_inspects_clean() {
    let _g = heavy();
    let image = offline_image();
    eprintln!("e2e_image: image {}", image.display());

    // --- inspect: hygiene, flat, zstd, manifest sha256 ---------------------------------------
    let (code, v, stderr) = run_json(
        Command::new(imagectl_bin())
            .arg("inspect")
            .arg(image)
            .args(["--output", "json", "--quiet"]),
    );
    let hygiene = v["hygiene"].as_array().expect("hygiene list");
    assert!(!hygiene.is_empty(), "no hygiene checks reported: {v:#}");
    let failed: Vec<&Value> = hygiene
        .iter()
        .filter(|c| c["ok"] != Value::Bool(true))
        .collect();
    assert!(failed.is_empty(), "hygiene checks failed: {failed:#?}");
    assert_eq!(
        v["qcow2"]["has_backing_file"], false,
        "qcow2 not flat: {}",
        v["qcow2"]
    );
    assert_eq!(v["qcow2"]["compression"], "zstd", "{}", v["qcow2"]);
    assert_eq!(v["qcow2"]["version"], 3, "{}", v["qcow2"]);
    assert_eq!(
        v["manifest_sha256_matches"], true,
        "manifest sha256 differs"
    );
    assert_eq!(
        v["manifest"]["sha256"], v["sha256"],
        "manifest and image sha256"
    );
    // Checked independently of imagectl's own hashing.
    let bytes_sha = imagectl::util::sha256_file(image).expect("hashing the image");
    assert_eq!(v["sha256"].as_str(), Some(bytes_sha.as_str()));
    let modes: Vec<&str> = v["manifest"]["boot_modes"]
        .as_array()
        .expect("boot_modes")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        modes.contains(&"bios") && modes.contains(&"uefi"),
        "the spec asks for a hybrid image; manifest says {modes:?}"
    );
    assert_eq!(v["ok"], true, "inspect not ok");
    assert_eq!(code, 0, "inspect exit code; stderr: {stderr}");

    // --- boot under SeaBIOS and OVMF -----------------------------------------------------------
    let serial = tempfile::tempdir().expect("tempdir");
    let serial_base = serial.path().join("serial.log");
    let (code, v, stderr) = run_json(
        Command::new(imagectl_bin())
            .current_dir(workspace())
            .arg("test")
            .arg(image)
            .args(["--firmware", "both", "--accel", "tcg", "--timeout", "600"])
            .args(["--output", "json", "--quiet", "--serial-log"])
            .arg(&serial_base),
    );
    let boots = v["boots"].as_array().expect("boots");
    let firmwares: Vec<&str> = boots
        .iter()
        .filter_map(|b| b["firmware"].as_str())
        .collect();
    assert_eq!(firmwares, ["bios", "uefi"], "{v:#}");
    for b in boots {
        let fw = b["firmware"].as_str().unwrap_or("?");
        let checks = b["checks"].as_array().expect("checks");
        for want in CHECKS {
            let c = checks
                .iter()
                .find(|c| c["name"] == want)
                .unwrap_or_else(|| panic!("{fw}: no {want} check in {b:#}"));
            assert_eq!(
                c["passed"],
                true,
                "{fw}: check {want} failed: {}\nserial tail:\n{}",
                c["detail"],
                b["serial_tail"].as_str().unwrap_or("")
            );
        }
        let failed: Vec<&Value> = checks.iter().filter(|c| c["passed"] != true).collect();
        assert!(failed.is_empty(), "{fw}: failed checks {failed:#?}");
        assert_eq!(b["passed"], true, "{fw}: boot not passed");
        let timing: Vec<String> = checks
            .iter()
            .map(|c| {
                format!(
                    "{}={:.1}",
                    c["name"].as_str().unwrap_or("?"),
                    c["seconds"].as_f64().unwrap_or(f64::NAN)
                )
            })
            .collect();
        eprintln!(
            "E2E-IMAGE-TIMING firmware={fw} accel={} {}",
            b["accel"].as_str().unwrap_or("?"),
            timing.join(" ")
        );
        let log = serial.path().join(format!("serial.log.{fw}"));
        let console = std::fs::read(&log).unwrap_or_default();
        assert!(
            String::from_utf8_lossy(&console).contains("Linux version"),
            "{fw}: serial console copy {} has no kernel output",
            log.display()
        );
    }
    assert_eq!(v["passed"], true, "report not passed");
    assert_eq!(code, 0, "imagectl test exit code; stderr: {stderr}");
}

/// What gitlab-runner's postinst left in the baked image (read with debugfs, no boot) and in the
/// cached rootfs layer it came from (before hygiene): the bake ran the package's post-install at
/// the end, as on a systemd host, so `install` wrote the systemd unit; the unit is not enabled; no
/// SysV script or rc link exists; the user is GitLab's; nothing was started.
#[test]
fn e2e_image_has_gitlab_runner_installed_disabled_and_never_started() {
    let _g = heavy();
    let image = offline_image();
    let fs = imagectl::inspect::RootFs::open(image).expect("reading the image");
    let read = |p: &str| {
        fs.read(p)
            .unwrap_or_else(|e| panic!("reading {p}: {e:#}"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    };
    let list = |d: &str| fs.list(d).unwrap_or_else(|e| panic!("listing {d}: {e:#}"));

    // The unit `gitlab-runner install` writes under systemd, with the real command line.
    let unit = read("/etc/systemd/system/gitlab-runner.service").expect("the unit install writes");
    assert!(
        unit.contains(
            "ExecStart=/usr/bin/gitlab-runner \"run\" \"--config\" \"/etc/gitlab-runner/config.toml\" \
             \"--working-directory\" \"/home/gitlab-runner\" \"--service\" \"gitlab-runner\" \
             \"--user\" \"gitlab-runner\""
        ) && unit.contains("WantedBy=multi-user.target"),
        "{unit}"
    );
    assert_eq!(
        read("/lib/systemd/system/gitlab-runner.service"),
        None,
        "the package ships none"
    );
    // Not enabled: the agent enables and starts it after writing config.toml.
    let wants = list("/etc/systemd/system/multi-user.target.wants");
    assert!(!wants.is_empty(), "no unit is enabled at all?");
    assert!(
        !wants.iter().any(|n| n == "gitlab-runner.service"),
        "{wants:?}"
    );
    // No SysV script, no rc links.
    let init_d = list("/etc/init.d");
    assert!(!init_d.is_empty(), "no /etc/init.d at all?");
    assert!(!init_d.iter().any(|n| n == "gitlab-runner"), "{init_d:?}");
    for rc in ["0", "1", "2", "3", "4", "5", "6", "S"] {
        // (a runlevel directory may not exist at all)
        let links = fs.list(&format!("/etc/rc{rc}.d")).unwrap_or_default();
        assert!(
            !links.iter().any(|n| n.ends_with("gitlab-runner")),
            "/etc/rc{rc}.d: {links:?}"
        );
    }
    // GitLab's user: a system account, home /home/gitlab-runner, bash.
    let passwd = read("/etc/passwd").expect("/etc/passwd");
    let user: Vec<&str> = passwd
        .lines()
        .find(|l| l.starts_with("gitlab-runner:"))
        .unwrap_or_else(|| panic!("no gitlab-runner user:\n{passwd}"))
        .split(':')
        .collect();
    assert!(user[2].parse::<u32>().is_ok_and(|u| u < 1000), "{user:?}");
    assert_eq!((user[5], user[6]), ("/home/gitlab-runner", "/bin/bash"));
    assert!(
        fs.size("/home/gitlab-runner").unwrap().is_some(),
        "no home directory"
    );
    // The deferral is undone: the package's own hook is back, no diversion is left.
    let ours = std::fs::read_to_string(
        workspace().join("tests/gitlab-runner-double/pkg/usr/share/gitlab-runner/post-install"),
    )
    .unwrap();
    assert_eq!(
        read("/usr/share/gitlab-runner/post-install").as_deref(),
        Some(ours.as_str())
    );
    assert!(!list("/usr/share/gitlab-runner")
        .iter()
        .any(|n| n.contains("imagectl")));
    let diversions = read("/var/lib/dpkg/diversions").unwrap_or_default();
    assert!(!diversions.contains("imagectl"), "{diversions}");
    // Nothing started: no log of the init script kardianos/service writes, no registration.
    let logs = list("/var/log");
    assert!(
        !logs.iter().any(|n| n.starts_with("gitlab-runner")),
        "{logs:?}"
    );

    // The cached layer, before hygiene: `install` saved config.toml (hygiene drops it from the
    // image), and the runner never ran (`run` writes .runner_system_id beside config.toml).
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(imagectl::manifest::Manifest::path_for(image)).expect("the manifest"),
    )
    .unwrap();
    let key = manifest["layer_key"].as_str().expect("layer_key");
    let layer = crate::support::cache_dir()
        .join("layers")
        .join(format!("{key}.tar"));
    let o = Command::new("tar")
        .arg("-tvf")
        .arg(&layer)
        .output()
        .unwrap();
    assert!(o.status.success(), "listing {}", layer.display());
    let listing = String::from_utf8_lossy(&o.stdout);
    let names: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|n| n.trim_start_matches("./"))
        .collect();
    assert!(
        names.contains(&"etc/gitlab-runner/config.toml"),
        "install ran in the bake"
    );
    for absent in [
        "etc/gitlab-runner/.runner_system_id",
        "etc/init.d/gitlab-runner",
        "run/gitlab-runner.pid",
        "usr/share/gitlab-runner/post-install.imagectl-deferred",
    ] {
        assert!(!names.contains(&absent), "{absent} in the layer");
    }
    assert!(
        !names
            .iter()
            .any(|n| n.ends_with(".wants/gitlab-runner.service")),
        "the layer has the unit enabled"
    );
}

/// A manifest beside the image with `boot_modes` (every other field a placeholder).
fn write_manifest(image: &std::path::Path, modes: &[&str]) {
    let m = serde_json::json!({
        "format": 1, "name": "blank", "version": "0", "image": "blank.qcow2",
        "sha256": "0".repeat(64), "size": 0, "virtual_size": 0,
        "spec_hash": "0".repeat(64), "lock_hash": "0".repeat(64), "inputs_hash": "0".repeat(64),
        "profiles": [], "boot_modes": modes, "kernel": "none", "root_fs_uuid": "none",
        "source_date_epoch": 0, "packages": [], "artifacts": [], "hygiene_removed": {},
        "layer_cached": false, "stage_seconds": {}, "build_seconds": 0.0,
        "built_at": "1970-01-01T00:00:00Z", "imagectl_version": "0",
    });
    std::fs::write(
        imagectl::manifest::Manifest::path_for(image),
        serde_json::to_vec_pretty(&m).unwrap(),
    )
    .unwrap();
}

/// Without `--firmware`, `imagectl test` boots with the firmwares the manifest beside the image
/// lists (a hybrid image: SeaBIOS, then OVMF), SeaBIOS alone without a manifest, and the flag
/// still overrides. A blank disk and a one-second timeout keep this cheap: only which boots were
/// made is looked at (their checks fail, so the exit code is 1).
#[test]
fn imagectl_test_defaults_to_the_manifest_boot_modes() {
    let _g = heavy();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("blank.qcow2");
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("64M")
        .status()
        .unwrap();
    assert!(st.success());
    let boots = |extra: &[&str]| -> Vec<String> {
        let (code, v, stderr) = run_json(
            Command::new(imagectl_bin())
                .arg("test")
                .arg(&image)
                .args([
                    "--timeout",
                    "1",
                    "--accel",
                    "tcg",
                    "--memory",
                    "128",
                    "--cpus",
                    "1",
                ])
                .args(["--output", "json", "--quiet"])
                .args(extra),
        );
        assert_eq!(code, 1, "a blank disk cannot pass; stderr: {stderr}");
        v["boots"]
            .as_array()
            .expect("boots")
            .iter()
            .map(|b| b["firmware"].as_str().unwrap_or("?").to_owned())
            .collect()
    };
    assert_eq!(boots(&[]), ["bios"], "no manifest: SeaBIOS");
    write_manifest(&image, &["bios", "uefi"]);
    assert_eq!(boots(&[]), ["bios", "uefi"], "hybrid manifest: both");
    assert_eq!(
        boots(&["--firmware", "uefi"]),
        ["uefi"],
        "the flag overrides"
    );
    write_manifest(&image, &["uefi"]);
    assert_eq!(boots(&[]), ["uefi"], "UEFI-only manifest");
}
