//! `imagectl test`: boot a baked image in QEMU with a fresh seed and check that it comes up.
//!
//! Each boot gets its own seed ISO (no `agent.json` unless agent settings are given) and a
//! throwaway overlay, so the image is never modified. All checks are polled together every couple
//! of seconds; each records the seconds from power-on until it first passed. Checks:
//! node_exporter and cAdvisor answer `/metrics` through host-forwarded ports, and through the
//! guest agent: cloud-init finished, Docker is active, the agent unit is installed, and (with an
//! agent seed) the agent's status file says `registered`.

use crate::error::input;
use crate::progress::{Progress, Stage};
use crate::seed::{AgentSeed, SeedConfig};
use crate::vm::{self, Accel, Firmware, GuestForward, NetPolicy, QemuVm, Qga};
use anyhow::{Context, Result};
use serde::Serialize;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod checks;
pub use checks::{checks, sanitize_console, Check};
use checks::{poll_one, Poll};

/// Guest address the GitLab forward listens on (`http://10.0.2.100` inside the VM).
pub const GITLAB_GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 100);

/// What to boot and how.
#[derive(Debug, Clone)]
pub struct TestOptions {
    /// The qcow2 image.
    pub image: PathBuf,
    /// Firmwares to boot with, one boot each, in order.
    pub firmwares: Vec<Firmware>,
    /// Accelerator (`IMAGECTL_ACCEL` overrides).
    pub accel: Accel,
    /// Time per boot for all checks to pass.
    pub timeout: Duration,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Guest CPUs.
    pub cpus: u32,
    /// Keep each boot's work directory (serial log, overlay).
    pub keep: bool,
    /// Copy the serial console here (suffixed `.bios`/`.uefi` when booting more than once).
    pub serial_log: Option<PathBuf>,
    /// Agent configuration to put on the seed (adds the agent-status check).
    pub agent: Option<AgentSeed>,
    /// Relay the guest's `10.0.2.100:80` to this host port (e.g. a GitLab fake).
    pub gitlab_forward: Option<u16>,
    /// Outbound network policy.
    pub net: NetPolicy,
}

/// The outcome of one check in one boot.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    /// Check name.
    pub name: String,
    /// Whether it passed.
    pub passed: bool,
    /// Seconds from power-on until it passed.
    pub seconds: Option<f64>,
    /// What was seen (or the last error).
    pub detail: String,
}

/// One boot.
#[derive(Debug, Clone, Serialize)]
pub struct BootReport {
    /// Firmware used.
    pub firmware: Firmware,
    /// Accelerator actually used.
    pub accel: Accel,
    /// All checks passed.
    pub passed: bool,
    /// Check results in order.
    pub checks: Vec<CheckResult>,
    /// Where the serial console was copied to, if asked.
    pub serial_log: Option<PathBuf>,
    /// The kept work directory, if `keep`.
    pub work_dir: Option<PathBuf>,
    /// Last lines of the serial console when a check failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serial_tail: Option<String>,
}

/// All boots of one image.
#[derive(Debug, Clone, Serialize)]
pub struct TestReport {
    /// The image tested.
    pub image: PathBuf,
    /// Every boot passed.
    pub passed: bool,
    /// One entry per firmware.
    pub boots: Vec<BootReport>,
}

/// Checks that `image` exists and is a qcow2 image (input error otherwise).
pub fn validate_image(image: &Path) -> Result<()> {
    if !image.is_file() {
        return Err(input(format!("image {} does not exist", image.display())));
    }
    let format = vm::qemu::image_format(image)?;
    if format != "qcow2" {
        return Err(input(format!(
            "{} is a {format} image; imagectl test boots qcow2 images",
            image.display()
        )));
    }
    Ok(())
}

/// Boots the image once per firmware and runs the checks.
pub fn run(opts: &TestOptions, progress: &Progress) -> Result<TestReport> {
    validate_image(&opts.image)?;
    if opts.firmwares.is_empty() {
        return Err(input("no firmware to boot with"));
    }
    let mut boots = Vec::new();
    for fw in &opts.firmwares {
        boots.push(boot_once(opts, *fw, progress).with_context(|| format!("testing with {fw}"))?);
    }
    Ok(TestReport {
        image: opts.image.clone(),
        passed: boots.iter().all(|b| b.passed),
        boots,
    })
}

fn serial_copy_path(opts: &TestOptions, fw: Firmware) -> Option<PathBuf> {
    let base = opts.serial_log.as_ref()?;
    if opts.firmwares.len() == 1 {
        return Some(base.clone());
    }
    let mut s = base.clone().into_os_string();
    s.push(format!(".{fw}"));
    Some(PathBuf::from(s))
}

fn boot_once(opts: &TestOptions, fw: Firmware, progress: &Progress) -> Result<BootReport> {
    let seed_dir = tempfile::Builder::new()
        .prefix("imagectl-test-seed-")
        .tempdir()
        .context("creating seed directory")?;
    let mut seed = SeedConfig::new(&format!("imagectl-test-{fw}"))?;
    seed.agent = opts.agent.clone();
    let iso = seed_dir.path().join("seed.iso");
    crate::seed::write_iso(&seed, &iso).context("writing test seed")?;

    let stage = progress.stage(&format!("boot ({fw})"));
    let mut b = QemuVm::builder(&opts.image)
        .name(&format!("test-{fw}"))
        .firmware(fw)
        .accel(opts.accel)
        .memory_mib(opts.memory_mib)
        .cpus(opts.cpus)
        .seed_iso(&iso)
        .network(opts.net)
        .keep_files(opts.keep);
    if let Some(port) = opts.gitlab_forward {
        b = b.guest_forward(GuestForward {
            guest_ip: GITLAB_GUEST_IP,
            guest_port: 80,
            host_port: port,
        });
    }
    let mut vm = b
        .start()
        .with_context(|| format!("starting the VM ({fw})"))?;
    stage.done(format!(
        "qemu running ({}, pid {})",
        vm.accel(),
        vm.pid().unwrap_or(0)
    ));

    let list = checks(opts.agent.is_some());
    let results = poll_checks(&mut vm, &list, opts.timeout, progress, fw);
    let passed = results.iter().all(|r| r.passed);
    let serial_log = match serial_copy_path(opts, fw) {
        Some(dest) => {
            std::fs::copy(vm.serial_log(), &dest)
                .with_context(|| format!("copying the serial log to {}", dest.display()))?;
            Some(dest)
        }
        None => None,
    };
    let serial_tail = (!passed).then(|| {
        let clean = sanitize_console(&vm.serial_tail(200));
        let lines: Vec<&str> = clean.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    });
    let work_dir = opts.keep.then(|| vm.work_dir().to_path_buf());
    let accel = vm.accel();
    vm.stop()?;
    Ok(BootReport {
        firmware: fw,
        accel,
        passed,
        checks: results,
        serial_log,
        work_dir,
        serial_tail,
    })
}

struct Pending {
    result: Option<CheckResult>,
    last: String,
}

fn poll_checks(
    vm: &mut QemuVm,
    list: &[Check],
    timeout: Duration,
    progress: &Progress,
    fw: Firmware,
) -> Vec<CheckResult> {
    let mut state: Vec<Pending> = list
        .iter()
        .map(|_| Pending {
            result: None,
            last: "not tried yet".into(),
        })
        .collect();
    let mut qga: Option<Qga> = None;
    let mut stage: Option<(usize, Stage)> = None;
    let mut deadline = vm.started() + timeout;
    loop {
        let round = Instant::now();
        match vm.fall_back_if_kvm_failed() {
            Ok(true) => {
                for s in state.iter_mut() {
                    *s = Pending {
                        result: None,
                        last: "restarted with TCG".into(),
                    };
                }
                qga = None;
                stage = None;
                deadline = vm.started() + timeout;
            }
            Ok(false) => {}
            Err(e) => tracing::warn!("restarting with TCG failed: {e:#}"),
        }
        let dead = vm.check_running().err().map(|e| format!("{e:#}"));
        let wants_qga = list
            .iter()
            .zip(&state)
            .any(|(c, s)| s.result.is_none() && c.uses_qga());
        if dead.is_none() && wants_qga && qga.is_none() {
            qga = Qga::connect(vm.qga_socket(), Duration::from_secs(2)).ok();
        }
        for (check, st) in list.iter().zip(state.iter_mut()) {
            if st.result.is_some() {
                continue;
            }
            let poll = match &dead {
                Some(e) => Poll::Fail(e.clone()),
                None => poll_one(vm, check, &mut qga),
            };
            let secs = vm.started().elapsed().as_secs_f64();
            match poll {
                Poll::Pass(d) => {
                    st.result = Some(CheckResult {
                        name: check.name.into(),
                        passed: true,
                        seconds: Some(secs),
                        detail: d,
                    })
                }
                Poll::Fail(d) => {
                    st.result = Some(CheckResult {
                        name: check.name.into(),
                        passed: false,
                        seconds: None,
                        detail: d,
                    })
                }
                Poll::Wait(d) => st.last = d,
            }
        }
        // Finish the spinner of the current check once it is decided; start the next one.
        if let Some((i, _)) = &stage {
            if let Some(r) = &state[*i].result {
                let (_, s) = stage.take().expect("stage present");
                let summary = match r.seconds {
                    Some(t) => format!("ok at {t:.1}s after power-on"),
                    None => format!("FAILED: {}", crate::util::tail(&r.detail, 1)),
                };
                s.done(summary);
            }
        }
        if stage.is_none() {
            if let Some(i) = state.iter().position(|s| s.result.is_none()) {
                stage = Some((i, progress.stage(&format!("{} ({fw})", list[i].name))));
            }
        }
        if let Some((i, s)) = &stage {
            s.message(crate::util::tail(&state[*i].last, 1));
        }
        if state.iter().all(|s| s.result.is_some()) {
            break;
        }
        if Instant::now() >= deadline {
            for (check, st) in list.iter().zip(state.iter_mut()) {
                if st.result.is_none() {
                    st.result = Some(CheckResult {
                        name: check.name.into(),
                        passed: false,
                        seconds: None,
                        detail: format!("timed out after {}s: {}", timeout.as_secs(), st.last),
                    });
                }
            }
            if let Some((_, s)) = stage.take() {
                s.done("FAILED: timed out");
            }
            break;
        }
        std::thread::sleep(Duration::from_secs(2).saturating_sub(round.elapsed()));
    }
    state.into_iter().filter_map(|s| s.result).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        let missing = validate_image(&dir.path().join("nope.qcow2")).unwrap_err();
        assert_eq!(crate::error::exit_code(&missing), 2);
        let raw = dir.path().join("disk.raw");
        std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
        let e = validate_image(&raw).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 2);
        assert!(e.to_string().contains("raw"), "{e}");
        let q = dir.path().join("disk.qcow2");
        crate::util::run(
            std::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&q)
                .arg("16M"),
        )
        .unwrap();
        validate_image(&q).unwrap();
    }

    #[test]
    fn serial_copies_get_a_suffix_when_booting_twice() {
        let mut o = TestOptions {
            image: "i.qcow2".into(),
            firmwares: vec![Firmware::Bios],
            accel: Accel::Tcg,
            timeout: Duration::from_secs(1),
            memory_mib: 512,
            cpus: 1,
            keep: false,
            serial_log: Some("/x/serial.log".into()),
            agent: None,
            gitlab_forward: None,
            net: NetPolicy::Restricted,
        };
        assert_eq!(
            serial_copy_path(&o, Firmware::Bios),
            Some("/x/serial.log".into())
        );
        o.firmwares = vec![Firmware::Bios, Firmware::Uefi];
        assert_eq!(
            serial_copy_path(&o, Firmware::Uefi),
            Some("/x/serial.log.uefi".into())
        );
    }
}
