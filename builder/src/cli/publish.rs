//! `imagectl publish`.

use super::Global;

/// Arguments of `imagectl publish`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `imagectl publish`.
pub fn run(_g: &Global, _a: Args) -> anyhow::Result<i32> {
    Err(crate::error::input("imagectl publish is not available yet"))
}
