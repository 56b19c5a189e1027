//! `imagectl status`.

use super::Global;

/// Arguments of `imagectl status`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `imagectl status`.
pub fn run(_g: &Global, _a: Args) -> anyhow::Result<i32> {
    Err(crate::error::input("imagectl status is not available yet"))
}
