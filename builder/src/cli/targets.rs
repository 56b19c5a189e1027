//! `imagectl targets`: Prometheus `file_sd` JSON for a fleet — per VM one target group per
//! metrics port (node_exporter 9100, cAdvisor 8080, gitlab-runner 9252), labelled with fleet,
//! vm, image_version, node and exporter.

use super::Global;
use crate::fleet::setup::{runtime, setup, FleetArgs, TuneArgs};
use anyhow::{Context, Result};
use std::io::Write;
use std::path::PathBuf;

/// Arguments of `imagectl targets`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Fleet, provider and image-store flags.
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// Write to FILE atomically (for Prometheus to reload) instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// Runs `imagectl targets`. The output is always JSON (file_sd's format).
pub fn run(_g: &Global, a: Args) -> Result<i32> {
    let (s, _) = setup(&a.fleet, &TuneArgs::default(), false, None)?;
    let groups = runtime()?.block_on(crate::fleet::targets(&s.provider, &a.fleet.fleet))?;
    let mut text = serde_json::to_string_pretty(&groups).context("serialising targets")?;
    text.push('\n');
    match a.out {
        Some(p) => {
            let dir = p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            let mut tmp = tempfile::NamedTempFile::new_in(dir)
                .with_context(|| format!("writing {}", p.display()))?;
            tmp.write_all(text.as_bytes())
                .with_context(|| format!("writing {}", p.display()))?;
            // Prometheus runs as its own user and must read the file (targets hold no secret).
            use std::os::unix::fs::PermissionsExt;
            tmp.as_file()
                .set_permissions(std::fs::Permissions::from_mode(0o644))
                .with_context(|| format!("making {} readable", p.display()))?;
            tmp.persist(&p)
                .with_context(|| format!("replacing {}", p.display()))?;
        }
        None => std::io::stdout()
            .lock()
            .write_all(text.as_bytes())
            .context("writing targets")?,
    }
    Ok(0)
}
