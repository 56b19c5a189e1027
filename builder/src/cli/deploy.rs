//! `imagectl deploy`.

use super::Global;

/// Arguments of `imagectl deploy`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `imagectl deploy`.
pub fn run(_g: &Global, _a: Args) -> anyhow::Result<i32> {
    Err(crate::error::input("imagectl deploy is not available yet"))
}
