//! `imagectl rollback`.

use super::Global;

/// Arguments of `imagectl rollback`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `imagectl rollback`.
pub fn run(_g: &Global, _a: Args) -> anyhow::Result<i32> {
    Err(crate::error::input("imagectl rollback is not available yet"))
}
