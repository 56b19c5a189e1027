//! `imagectl test`: boot an image and check it.

use super::Global;

/// Arguments of `imagectl test`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The qcow2 image to boot.
    pub image: std::path::PathBuf,
}

/// Runs `imagectl test`.
pub fn run(_g: &Global, _a: Args) -> anyhow::Result<i32> {
    anyhow::bail!("imagectl test is not available yet")
}
