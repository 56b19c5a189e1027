//! `imagectl completions`.

use super::Global;

/// Arguments of `imagectl completions`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `imagectl completions`.
pub fn run(_g: &Global, _a: Args) -> anyhow::Result<i32> {
    Err(crate::error::input("imagectl completions is not available yet"))
}
