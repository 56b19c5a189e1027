//! `imagectl replace`: replace VMs one for one, each new VM online before its old one is
//! drained (paused, running jobs finished, runner deleted, VM destroyed).

use super::Global;
use crate::fleet::preflight::Command;
use crate::fleet::setup::{runtime, setup, FleetArgs, TuneArgs};
use anyhow::Result;

/// Arguments of `imagectl replace`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Fleet, provider, GitLab and image-store flags.
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// The VMs to replace (names or provider ids, see `imagectl status`).
    #[arg(value_name = "VM", required = true)]
    pub vms: Vec<String>,
    /// Image for the new VMs: latest or a VERSION (default: each old VM's own version).
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<String>,
    /// Sizing, timeouts and drain behaviour.
    #[command(flatten)]
    pub tune: TuneArgs,
}

/// Runs `imagectl replace`.
pub fn run(g: &Global, a: Args) -> Result<i32> {
    let (s, _) = setup(&a.fleet, &a.tune, true, None)?;
    let report = runtime()?.block_on(async {
        s.preflight(Command::Replace).await?;
        let mut f = s.fleet(g.quiet)?;
        crate::fleet::replace(&mut f, &a.vms, a.image.as_deref()).await
    })?;
    g.emit(&report, |r| r.text())?;
    Ok(report.exit_code())
}
