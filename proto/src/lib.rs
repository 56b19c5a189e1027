//! The contract between `imagectl` (which writes the seed and reads the status) and
//! `imagectl-agent` (which reads the seed and writes the status).
//!
//! * [`AgentSeed`] is `imagectl/agent.json` on the NoCloud seed ISO. It carries the one-time runner
//!   token, so its `Debug` output redacts it.
//! * [`AgentStatus`] is `/var/lib/imagectl/status.json` in the VM, read through the guest agent.
//! * [`retry`] is the retry policy both sides use for GitLab calls (`Retry-After`, back-off, budget).

use serde::{Deserialize, Serialize};
use std::fmt;

pub mod retry;

/// Path of the agent configuration inside the seed ISO.
pub const SEED_AGENT_PATH: &str = "imagectl/agent.json";
/// Filesystem label of the NoCloud seed.
pub const SEED_LABEL: &str = "cidata";
/// Where the agent writes its status inside the VM.
pub const STATUS_PATH: &str = "/var/lib/imagectl/status.json";
/// Marker written once registration succeeded; the unit is conditioned on its absence.
pub const REGISTERED_MARKER: &str = "/var/lib/imagectl/registered";

/// A secret string: serialised as-is, never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself; call only where it is sent or written to its one allowed place.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// True when no secret is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Docker executor settings for the runner's `[runners.docker]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerExecutor {
    /// Default job image.
    pub image: String,
    /// Run job containers privileged (needed for Docker-in-Docker).
    #[serde(default)]
    pub privileged: bool,
    /// Images jobs may name (`allowed_images`).
    #[serde(default)]
    pub allowed_images: Vec<String>,
    /// Services jobs may name (`allowed_services`).
    #[serde(default)]
    pub allowed_services: Vec<String>,
    /// Volumes mounted into job containers.
    #[serde(default)]
    pub volumes: Vec<String>,
    /// Pull policies, in order.
    #[serde(default)]
    pub pull_policy: Vec<String>,
    /// `/dev/shm` size in bytes (0 = Docker's default).
    #[serde(default)]
    pub shm_size: u64,
    /// Disable the local cache volume.
    #[serde(default)]
    pub disable_cache: bool,
}

impl Default for DockerExecutor {
    fn default() -> Self {
        Self {
            image: "docker:stable".into(),
            privileged: false,
            allowed_images: Vec::new(),
            allowed_services: Vec::new(),
            volumes: vec!["/cache".into()],
            pull_policy: vec!["if-not-present".into()],
            shm_size: 0,
            disable_cache: false,
        }
    }
}

/// `imagectl/agent.json` on the seed ISO: everything the agent needs to register the runner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSeed {
    /// Schema version of this file (currently 1).
    pub version: u32,
    /// GitLab base URL, e.g. `https://gitlab.example.com` (without `/api/v4`).
    pub gitlab_url: String,
    /// The runner authentication token (`glrt-…`) created for this VM. One-time: the agent rotates it.
    pub runner_token: Secret,
    /// The runner id GitLab returned when imagectl created the runner.
    pub runner_id: u64,
    /// Runner name written into config.toml (`imagectl/<fleet>/<vm>`).
    pub runner_name: String,
    /// Optional PEM CA bundle to trust for the GitLab URL (written as `tls-ca-file`).
    #[serde(default)]
    pub ca_bundle: Option<String>,
    /// Global `concurrent` jobs.
    #[serde(default = "default_concurrent")]
    pub concurrent: u32,
    /// Tags, informational (server-side tags are set when imagectl creates the runner).
    #[serde(default)]
    pub tags: Vec<String>,
    /// Docker executor settings.
    #[serde(default)]
    pub docker: DockerExecutor,
    /// gitlab-runner metrics listen address (`listen_address`).
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: String,
    /// Total seconds the agent may spend on one GitLab call (`verify`, then the rotation) with its
    /// retries: network errors, 408, 429 and 5xx, jittered back-off, `Retry-After` honoured.
    #[serde(default = "default_verify_budget")]
    pub verify_budget_secs: u64,
}

fn default_concurrent() -> u32 {
    1
}
fn default_metrics_listen() -> String {
    ":9252".into()
}
fn default_verify_budget() -> u64 {
    600
}

/// The agent's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    /// Still working.
    Running,
    /// The runner is registered and gitlab-runner is active.
    Registered,
    /// Registration failed; see `error`.
    Failed,
}

/// `/var/lib/imagectl/status.json`, written by the agent, read through the guest agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// Outcome.
    pub state: AgentState,
    /// Runner id (from the seed, confirmed by verify).
    #[serde(default)]
    pub runner_id: Option<u64>,
    /// The runner manager's system_id (`s_` + 12 hex).
    #[serde(default)]
    pub system_id: Option<String>,
    /// Seconds since boot (CLOCK_BOOTTIME) when the agent started.
    #[serde(default)]
    pub started_uptime_s: Option<f64>,
    /// Seconds since boot when the agent finished.
    #[serde(default)]
    pub finished_uptime_s: Option<f64>,
    /// Per-step durations in milliseconds, by step name.
    #[serde(default)]
    pub timings_ms: std::collections::BTreeMap<String, u64>,
    /// Error text for `failed`; never contains a secret.
    #[serde(default)]
    pub error: Option<String>,
    /// Agent version.
    #[serde(default)]
    pub agent_version: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_redacted_in_debug_but_serialised() {
        let s = Secret::new("glrt-abc");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"glrt-abc\"");
    }

    #[test]
    fn seed_rejects_unknown_keys() {
        let j = r#"{"version":1,"gitlab_url":"http://x","runner_token":"t","runner_id":1,"runner_name":"n","bogus":1}"#;
        let err = serde_json::from_str::<AgentSeed>(j)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus"), "{err}");
    }
}
