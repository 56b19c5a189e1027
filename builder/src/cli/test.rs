//! `imagectl test`: boot an image in QEMU and check its services.
//!
//! Exit code 0 when every check of every boot passed, 1 when a check failed, 2 for bad input.

use super::seed::agent_from_flags;
use super::Global;
use crate::imagetest::{self, TestOptions, TestReport};
use crate::manifest::Manifest;
use crate::vm::{Accel, Firmware, NetPolicy};
use anyhow::Result;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Which firmware(s) to boot with.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FirmwareChoice {
    /// SeaBIOS only.
    Bios,
    /// OVMF (UEFI) only.
    Uefi,
    /// SeaBIOS, then OVMF.
    Both,
}

/// Accelerator choice on the command line.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoice {
    /// KVM when it works, else TCG.
    Auto,
    /// Software emulation.
    Tcg,
    /// KVM only.
    Kvm,
}

/// Arguments of `imagectl test`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The qcow2 image to boot (it is never modified: the VM writes to an overlay).
    pub image: PathBuf,
    /// Firmware to boot with. Default: the boot modes in the manifest beside the image (a hybrid
    /// image boots with both), else SeaBIOS.
    #[arg(long, value_enum)]
    pub firmware: Option<FirmwareChoice>,
    /// CPU accelerator (the IMAGECTL_ACCEL environment variable overrides it).
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    pub accel: AccelChoice,
    /// Seconds per boot for all checks to pass.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub timeout: u64,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 2048,
          value_parser = clap::value_parser!(u32).range(64..=1_048_576))]
    pub memory: u32,
    /// Guest CPUs.
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub cpus: u32,
    /// Keep each boot's work directory (serial log, overlay disk) and print where it is.
    #[arg(long)]
    pub keep: bool,
    /// Copy the serial console to FILE (FILE.bios / FILE.uefi with --firmware both).
    #[arg(long, value_name = "FILE")]
    pub serial_log: Option<PathBuf>,
    /// An agent seed for the boot (adds the agent-status check).
    #[command(flatten)]
    pub agent: super::seed::AgentSeedArgs,
    /// Relay the guest's 10.0.2.100:80 to 127.0.0.1:PORT (e.g. a GitLab fake; use --gitlab-url http://10.0.2.100).
    #[arg(long, value_name = "PORT")]
    pub gitlab_forward: Option<u16>,
    /// Let the guest open outbound connections (never in CI; default: restricted to forwarded ports).
    #[arg(long)]
    pub open_network: bool,
}

/// Runs `imagectl test`.
pub fn run(g: &Global, a: Args) -> Result<i32> {
    let agent = agent_from_flags(
        "imagectl-test",
        a.agent.gitlab_url.as_deref(),
        a.agent.runner_id,
        a.agent.token_file.as_deref(),
        None,
        None,
    )?;
    if a.timeout == 0 {
        return Err(crate::error::input("--timeout must be at least 1 second"));
    }
    let firmwares = match a.firmware {
        Some(FirmwareChoice::Bios) => vec![Firmware::Bios],
        Some(FirmwareChoice::Uefi) => vec![Firmware::Uefi],
        Some(FirmwareChoice::Both) => vec![Firmware::Bios, Firmware::Uefi],
        None => manifest_firmwares(&a.image)?,
    };
    let opts = TestOptions {
        image: a.image,
        firmwares,
        accel: match a.accel {
            AccelChoice::Auto => Accel::Auto,
            AccelChoice::Tcg => Accel::Tcg,
            AccelChoice::Kvm => Accel::Kvm,
        },
        timeout: Duration::from_secs(a.timeout),
        memory_mib: a.memory,
        cpus: a.cpus,
        keep: a.keep,
        serial_log: a.serial_log,
        agent,
        gitlab_forward: a.gitlab_forward,
        net: if a.open_network {
            NetPolicy::Open
        } else {
            NetPolicy::Restricted
        },
    };
    let report = imagetest::run(&opts, &g.progress())?;
    g.emit(&report, render_table)?;
    Ok(if report.passed { 0 } else { 1 })
}

/// The firmwares the image's manifest (beside it) says it boots with, in order BIOS then UEFI;
/// SeaBIOS alone when there is no manifest. A manifest that exists but cannot be read, or names
/// no known boot mode, is an input error (pass `--firmware` to override).
pub fn manifest_firmwares(image: &Path) -> Result<Vec<Firmware>> {
    let path = Manifest::path_for(image);
    if !path.is_file() {
        tracing::debug!(
            "no manifest at {}; booting with SeaBIOS (use --firmware to choose)",
            path.display()
        );
        return Ok(vec![Firmware::Bios]);
    }
    let m = Manifest::read(&path)?;
    firmwares_for_modes(&m.boot_modes).ok_or_else(|| {
        crate::error::input(format!(
            "{}: boot_modes {:?} name no firmware imagectl test knows (bios, uefi, hybrid); pass --firmware",
            path.display(),
            m.boot_modes
        ))
    })
}

/// `["bios","uefi"]` / `["hybrid"]` → both, in the order BIOS, UEFI; `None` when nothing is known.
fn firmwares_for_modes(modes: &[String]) -> Option<Vec<Firmware>> {
    let has = |w: &str| modes.iter().any(|m| m.eq_ignore_ascii_case(w));
    let hybrid = has("hybrid");
    let mut v = Vec::new();
    if hybrid || has("bios") {
        v.push(Firmware::Bios);
    }
    if hybrid || has("uefi") {
        v.push(Firmware::Uefi);
    }
    (!v.is_empty()).then_some(v)
}

/// The human-readable report: one table per boot.
pub fn render_table(r: &TestReport) -> String {
    let mut s = String::new();
    for b in &r.boots {
        let _ = writeln!(s, "{} — {} ({})", r.image.display(), b.firmware, b.accel);
        let _ = writeln!(s, "  {:<14} {:<6} {:>8}  detail", "check", "result", "at");
        for c in &b.checks {
            let at = c.seconds.map_or("-".to_string(), |t| format!("{t:.1}s"));
            let res = if c.passed { "ok" } else { "FAIL" };
            let detail = crate::util::tail(&c.detail, 1);
            let _ = writeln!(s, "  {:<14} {:<6} {:>8}  {}", c.name, res, at, detail);
        }
        if let Some(p) = &b.serial_log {
            let _ = writeln!(s, "  serial log: {}", p.display());
        }
        if let Some(p) = &b.work_dir {
            let _ = writeln!(s, "  work dir kept: {}", p.display());
        }
        if let Some(t) = &b.serial_tail {
            let _ = writeln!(s, "  last serial console lines:");
            for l in t.lines() {
                let _ = writeln!(s, "    | {l}");
            }
        }
    }
    let _ = writeln!(s, "{}", if r.passed { "PASSED" } else { "FAILED" });
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modes(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn boot_modes_map_to_firmwares() {
        let both = Some(vec![Firmware::Bios, Firmware::Uefi]);
        assert_eq!(firmwares_for_modes(&modes(&["bios", "uefi"])), both);
        assert_eq!(firmwares_for_modes(&modes(&["uefi", "bios"])), both);
        assert_eq!(firmwares_for_modes(&modes(&["hybrid"])), both);
        assert_eq!(
            firmwares_for_modes(&modes(&["uefi"])),
            Some(vec![Firmware::Uefi])
        );
        assert_eq!(
            firmwares_for_modes(&modes(&["bios"])),
            Some(vec![Firmware::Bios])
        );
        assert_eq!(firmwares_for_modes(&modes(&["arm"])), None);
        assert_eq!(firmwares_for_modes(&[]), None);
    }

    #[test]
    fn no_manifest_means_seabios() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("x.qcow2");
        assert_eq!(manifest_firmwares(&img).unwrap(), vec![Firmware::Bios]);
    }
}
