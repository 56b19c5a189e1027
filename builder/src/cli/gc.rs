//! `imagectl gc`.

use super::Global;

/// Arguments of `imagectl gc`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `imagectl gc`.
pub fn run(_g: &Global, _a: Args) -> anyhow::Result<i32> {
    Err(crate::error::input("imagectl gc is not available yet"))
}
