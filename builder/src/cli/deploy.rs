//! `imagectl deploy`: reconcile a fleet to N healthy runner VMs of an image.
//!
//! Exit code 0 when every VM came up (or nothing needed doing), 1 when any VM failed (each
//! failure is rolled back and listed with what was cleaned), 2 for bad input.

use super::Global;
use crate::fleet::preflight::Command;
use crate::fleet::setup::{runtime, setup, FleetArgs, TuneArgs};
use anyhow::Result;

/// Arguments of `imagectl deploy`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Fleet, provider, GitLab and image-store flags.
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Number of healthy VMs wanted (default: [fleet.NAME] count, else as many as the fleet has).
    #[arg(long, value_name = "N")]
    pub count: Option<usize>,
    /// Image: latest, a VERSION, or a path to a .qcow2 with its manifest. Given, VMs on other
    /// versions are replaced (rolling); omitted, new VMs get the fleet's current version.
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<String>,
    /// Replace only one VM that is not on --image (new one online first) and leave the rest:
    /// the canary step of a rollout. Without --image it changes nothing.
    #[arg(long)]
    pub canary: bool,
    /// Sizing, timeouts and drain behaviour.
    #[command(flatten)]
    pub tune: TuneArgs,
}

/// Runs `imagectl deploy`.
pub fn run(g: &Global, a: Args) -> Result<i32> {
    let (s, choice) = setup(&a.fleet, &a.tune, true, a.image.as_deref())?;
    let count = a.count.or(s.file.fleet.count);
    let max = s
        .file
        .fleet
        .max_count
        .unwrap_or(crate::fleet::settings::DEFAULT_MAX_COUNT);
    if let Some(n) = count.filter(|n| *n > max) {
        return Err(crate::error::input(format!(
            "--count {n} is more than this fleet's maximum of {max} VMs; raise [fleet.{}] \
             max_count in imagectl.toml if you mean it",
            a.fleet.fleet
        )));
    }
    let report = runtime()?.block_on(async {
        s.preflight(Command::Deploy).await?;
        let mut f = s.fleet(g.quiet)?;
        crate::fleet::deploy(&mut f, count, &choice, a.canary).await
    })?;
    g.emit(&report, |r| r.text())?;
    Ok(report.exit_code())
}
