//! imagectl integration tests: one binary, one module per area.
mod agent;
mod bake;
mod agent_cli;
mod e2e_agent;
mod e2e_image;
mod runner_double;
mod seed;
mod vm;

mod support;

pub use support::{agent_bin, imagectl_bin};
