//! imagectl integration tests: one binary, one module per area.
mod agent;
mod agent_cli;
mod bad_input;
mod bake;
mod docs;
mod drift;
mod e2e_agent;
mod e2e_image;
mod fleet_gitlab;
mod fleet_local;
mod fleet_pve;
mod monitoring;
mod pipeline;
mod publish;
mod pve;
mod pve_guest;
mod pve_preflight;
mod runner_double;
mod seed;
mod spec_grammar;
mod vm;

mod support;

pub use support::{agent_bin, imagectl_bin};
