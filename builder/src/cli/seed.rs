//! `imagectl seed`: write a NoCloud seed ISO.

use super::Global;

/// Arguments of `imagectl seed`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where to write the ISO.
    #[arg(long)]
    pub out: std::path::PathBuf,
}

/// Runs `imagectl seed`.
pub fn run(_g: &Global, _a: Args) -> anyhow::Result<i32> {
    anyhow::bail!("imagectl seed is not available yet")
}
