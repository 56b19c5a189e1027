//! `imagectl rollback`: replace every VM not on the previous image version (or `--to VERSION`),
//! rolling: a failed new VM aborts the rollout and leaves the old VMs serving.

use super::Global;
use crate::fleet::preflight::Command;
use crate::fleet::setup::{runtime, setup, FleetArgs, TuneArgs};
use anyhow::Result;

/// Arguments of `imagectl rollback`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Fleet, provider, GitLab and image-store flags.
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Version to roll back to (default: the one before the newest version in use).
    #[arg(long, value_name = "VERSION")]
    pub to: Option<String>,
    /// Sizing, timeouts and drain behaviour.
    #[command(flatten)]
    pub tune: TuneArgs,
}

/// Runs `imagectl rollback`.
pub fn run(g: &Global, a: Args) -> Result<i32> {
    let (s, _) = setup(&a.fleet, &a.tune, true, None)?;
    let report = runtime()?.block_on(async {
        s.preflight(Command::Rollback).await?;
        let mut f = s.fleet(g.quiet)?;
        crate::fleet::rollback(&mut f, a.to.as_deref()).await
    })?;
    g.emit(&report, |r| r.text())?;
    Ok(report.exit_code())
}
