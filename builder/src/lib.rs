//! imagectl: bake golden GitLab-runner images from a YAML spec, publish them to Proxmox VE as
//! versioned templates, and run fleets of runner VMs that are replaced, never patched.
//!
//! The binary in `main.rs` is a thin shell over this library; every subcommand lives in [`cli`].

pub mod bake;
pub mod cli;
pub mod config;
pub mod error;
pub mod fleet;
pub mod imagetest;
pub mod inspect;
pub mod manifest;
pub mod progress;
pub mod provider;
pub mod publish;
pub mod remote;
pub mod seed;
pub mod spec;
pub mod store;
pub mod util;
pub mod vm;

pub use error::InputError;
