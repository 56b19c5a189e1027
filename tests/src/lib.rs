//! Shared support for imagectl's integration tests: fakes, fixtures and helpers.
pub mod gitlab_fake;
