//! `imagectl inspect`.

use super::Global;

/// Arguments of `imagectl inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The image or manifest.
    pub path: std::path::PathBuf,
}

/// Runs `imagectl inspect`.
pub fn run(_g: &Global, _a: Args) -> anyhow::Result<i32> {
    anyhow::bail!("not yet")
}
