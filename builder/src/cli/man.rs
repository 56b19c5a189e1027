//! `imagectl man`.

use super::Global;

/// Arguments of `imagectl man`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `imagectl man`.
pub fn run(_g: &Global, _a: Args) -> anyhow::Result<i32> {
    Err(crate::error::input("imagectl man is not available yet"))
}
