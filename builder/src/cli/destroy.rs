//! `imagectl destroy`.

use super::Global;

/// Arguments of `imagectl destroy`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `imagectl destroy`.
pub fn run(_g: &Global, _a: Args) -> anyhow::Result<i32> {
    Err(crate::error::input("imagectl destroy is not available yet"))
}
