//! `imagectl replace`.

use super::Global;

/// Arguments of `imagectl replace`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `imagectl replace`.
pub fn run(_g: &Global, _a: Args) -> anyhow::Result<i32> {
    Err(crate::error::input("imagectl replace is not available yet"))
}
