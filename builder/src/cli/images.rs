//! `imagectl images`.

use super::Global;

/// Arguments of `imagectl images`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `imagectl images`.
pub fn run(_g: &Global, _a: Args) -> anyhow::Result<i32> {
    Err(crate::error::input("imagectl images is not available yet"))
}
