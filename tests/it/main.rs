//! imagectl integration tests: one binary, one module per area.
mod agent;
mod agent_cli;
mod runner_double;
mod seed;
mod vm;

mod support;

pub use support::{agent_bin, imagectl_bin};
