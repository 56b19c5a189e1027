//! `imagectl destroy`: drain and delete every VM of a fleet, its runners and its seeds, then
//! any orphan runner or seed of the fleet.

use super::Global;
use crate::fleet::preflight::Command;
use crate::fleet::setup::{runtime, setup, FleetArgs, TuneArgs};
use anyhow::Result;

/// Arguments of `imagectl destroy`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Fleet, provider, GitLab and image-store flags.
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Drain timeout, --force and concurrency.
    #[command(flatten)]
    pub tune: TuneArgs,
}

/// Runs `imagectl destroy`.
pub fn run(g: &Global, a: Args) -> Result<i32> {
    let (s, _) = setup(&a.fleet, &a.tune, true, None)?;
    let report = runtime()?.block_on(async {
        s.preflight(Command::Destroy).await?;
        let mut f = s.fleet(g.quiet)?;
        crate::fleet::destroy(&mut f).await
    })?;
    g.emit(&report, |r| r.text())?;
    Ok(report.exit_code())
}
