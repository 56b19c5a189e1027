//! `imagectl test`: boot an image in QEMU and check its services.
//!
//! Exit code 0 when every check of every boot passed, 1 when a check failed, 2 for bad input.

use super::seed::agent_from_flags;
use super::Global;
use crate::imagetest::{self, TestOptions, TestReport};
use crate::vm::{Accel, Firmware, NetPolicy};
use anyhow::Result;
use std::fmt::Write as _;
use std::path::PathBuf;
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
    /// Firmware to boot with.
    #[arg(long, value_enum, default_value_t = FirmwareChoice::Bios)]
    pub firmware: FirmwareChoice,
    /// CPU accelerator (the IMAGECTL_ACCEL environment variable overrides it).
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    pub accel: AccelChoice,
    /// Seconds per boot for all checks to pass.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub timeout: u64,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 2048)]
    pub memory: u32,
    /// Guest CPUs.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub cpus: u32,
    /// Keep each boot's work directory (serial log, overlay disk) and print where it is.
    #[arg(long)]
    pub keep: bool,
    /// Copy the serial console to FILE (FILE.bios / FILE.uefi with --firmware both).
    #[arg(long, value_name = "FILE")]
    pub serial_log: Option<PathBuf>,
    /// GitLab URL for an agent seed (adds the agent-status check; needs --runner-id and a token).
    #[arg(long, value_name = "URL")]
    pub gitlab_url: Option<String>,
    /// Runner id for the agent seed.
    #[arg(long, value_name = "N")]
    pub runner_id: Option<u64>,
    /// File holding the runner token; or set IMAGECTL_RUNNER_TOKEN.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
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
        a.gitlab_url.as_deref(),
        a.runner_id,
        a.token_file.as_deref(),
        None,
        None,
    )?;
    if a.timeout == 0 {
        return Err(crate::error::input("--timeout must be at least 1 second"));
    }
    let opts = TestOptions {
        image: a.image,
        firmwares: match a.firmware {
            FirmwareChoice::Bios => vec![Firmware::Bios],
            FirmwareChoice::Uefi => vec![Firmware::Uefi],
            FirmwareChoice::Both => vec![Firmware::Bios, Firmware::Uefi],
        },
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
