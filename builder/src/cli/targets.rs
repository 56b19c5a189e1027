//! `imagectl targets`.

use super::Global;

/// Arguments of `imagectl targets`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `imagectl targets`.
pub fn run(_g: &Global, _a: Args) -> anyhow::Result<i32> {
    Err(crate::error::input("imagectl targets is not available yet"))
}
