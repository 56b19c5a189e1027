//! Shared support for imagectl's integration tests: fakes, fixtures and helpers.
pub mod fakepve;
pub mod gitlab_fake;
pub mod pve_guest;
