//! `imagectl build`.

use super::Global;

/// Arguments of `imagectl build`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The image spec (YAML).
    pub spec: std::path::PathBuf,
}

/// Runs `imagectl build`.
pub fn run(_g: &Global, _a: Args) -> anyhow::Result<i32> {
    anyhow::bail!("not yet")
}
