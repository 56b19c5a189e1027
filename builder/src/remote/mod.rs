//! Clients for the remote APIs imagectl talks to: one client per remote, each with a base URL that
//! tests can point anywhere.

pub mod gitlab;
pub mod pve;
