//! gitlab-runner's `/etc/gitlab-runner/config.toml`, written with the `toml` crate.
//!
//! The file is the one place the live runner token is allowed to be: mode 0600 from creation,
//! root-owned (the agent runs as root), replaced atomically. The layout matches what
//! `gitlab-runner register` writes (`token_obtained_at`/`token_expires_at` are TOML datetimes,
//! `0001-01-01T00:00:00Z` meaning "no expiry").
//!
//! # Reading a file gitlab-runner rewrote
//!
//! gitlab-runner rewrites config.toml itself, e.g. when it rotates an expiring token
//! (gitlab-org/gitlab-runner `common/config.go` `SaveConfig`, BurntSushi/toml encoder). The field
//! names and TOML keys are those of `common/config.go`: `RunnerCredentials` (`url`, `id`, `token`,
//! `token_obtained_at`, `token_expires_at` as `time.Time`, zero = `0001-01-01T00:00:00Z`,
//! `tls-ca-file,omitempty`), `RunnerConfig`/`RunnerSettings` (`name`, `executor`, …) and
//! `DockerConfig`, whose `privileged`/`disable_cache` are `omitzero`, `volumes`/`allowed_images`/
//! `allowed_services`/`pull_policy`/`shm_size` `omitempty`, and `pull_policy` a `StringOrArray` (a
//! string or a list). So when the agent reads the file back (the recover path), **every** field
//! has a serde default, unknown keys and tables (`[session_server]`, `[runners.cache]`,
//! `connection_max_age`, …) are ignored, and `pull_policy` takes either form.

use crate::fsx;
use anyhow::{Context, Result};
use imagectl_proto::{AgentSeed, DockerExecutor, Secret};
use serde::{Deserialize, Serialize};
use std::path::Path;
use toml::value::Datetime;

/// gitlab-runner's "no expiry" timestamp.
pub const NO_EXPIRY: &str = "0001-01-01T00:00:00Z";

/// The whole file.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct RunnerConfig {
    /// Jobs run at once across all runners.
    #[serde(default)]
    pub concurrent: u32,
    /// Seconds between job polls.
    #[serde(default)]
    pub check_interval: u32,
    /// Metrics listen address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_address: Option<String>,
    /// The runners (the agent writes exactly one).
    #[serde(default)]
    pub runners: Vec<Runner>,
}

/// One `[[runners]]` entry.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Runner {
    /// Runner name.
    #[serde(default)]
    pub name: String,
    /// GitLab base URL.
    #[serde(default)]
    pub url: String,
    /// Runner id.
    #[serde(default)]
    pub id: u64,
    /// The runner authentication token.
    #[serde(default)]
    pub token: Secret,
    /// When the token was obtained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_obtained_at: Option<Datetime>,
    /// When the token expires (`0001-01-01T00:00:00Z` = never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expires_at: Option<Datetime>,
    /// Executor (always `docker` here).
    #[serde(default)]
    pub executor: String,
    /// CA bundle to trust for `url`.
    #[serde(
        rename = "tls-ca-file",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub tls_ca_file: Option<String>,
    /// Docker executor settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<Docker>,
}

/// `[runners.docker]`.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Docker {
    /// Default job image.
    pub image: String,
    /// Privileged job containers.
    pub privileged: bool,
    /// Volumes.
    pub volumes: Vec<String>,
    /// `/dev/shm` size in bytes.
    pub shm_size: u64,
    /// Pull policies (gitlab-runner accepts one string or a list).
    #[serde(deserialize_with = "string_or_list")]
    pub pull_policy: Vec<String>,
    /// Allowed job images.
    pub allowed_images: Vec<String>,
    /// Allowed services.
    pub allowed_services: Vec<String>,
    /// Disable the cache volume.
    pub disable_cache: bool,
}

/// `"x"` or `["x", "y"]` (gitlab-runner's `StringOrArray`).
fn string_or_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

impl From<&DockerExecutor> for Docker {
    fn from(d: &DockerExecutor) -> Self {
        Self {
            image: d.image.clone(),
            privileged: d.privileged,
            volumes: d.volumes.clone(),
            shm_size: d.shm_size,
            pull_policy: d.pull_policy.clone(),
            allowed_images: d.allowed_images.clone(),
            allowed_services: d.allowed_services.clone(),
            disable_cache: d.disable_cache,
        }
    }
}

/// A TOML datetime from an RFC 3339 text; GitLab's `null`/missing expiry becomes [`NO_EXPIRY`].
pub fn datetime(rfc3339: Option<&str>) -> Result<Datetime> {
    let s = rfc3339.filter(|s| !s.is_empty()).unwrap_or(NO_EXPIRY);
    // Normalise through `time` so fractional seconds and offsets are accepted.
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("parsing the timestamp {s:?}"))?
        .to_offset(time::UtcOffset::UTC);
    let text = t
        .replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .context("formatting a timestamp")?;
    text.parse::<Datetime>()
        .with_context(|| format!("converting {text:?} to a TOML datetime"))
}

/// Builds the configuration for the seed's runner with `token`, obtained at `obtained_at` (see
/// [`crate::clock`]: GitLab's `Date`, not the guest's clock).
pub fn build(
    seed: &AgentSeed,
    token: &Secret,
    obtained_at: Datetime,
    expires_at: Option<&str>,
    tls_ca_file: Option<String>,
) -> Result<RunnerConfig> {
    Ok(RunnerConfig {
        concurrent: seed.concurrent,
        check_interval: 3,
        listen_address: Some(seed.metrics_listen.clone()).filter(|s| !s.is_empty()),
        runners: vec![Runner {
            name: seed.runner_name.clone(),
            url: seed.gitlab_url.trim_end_matches('/').to_owned(),
            id: seed.runner_id,
            token: token.clone(),
            token_obtained_at: Some(obtained_at),
            token_expires_at: Some(datetime(expires_at)?),
            executor: "docker".into(),
            tls_ca_file,
            docker: Some(Docker::from(&seed.docker)),
        }],
    })
}

/// Writes `cfg` to `path`: 0600, atomically.
pub fn write(path: &Path, cfg: &RunnerConfig) -> Result<()> {
    let text = toml::to_string(cfg).context("serialising config.toml")?;
    let header = "# Written by imagectl-agent. Holds the runner's live token: keep it 0600.\n";
    fsx::write_atomic(path, format!("{header}{text}").as_bytes(), 0o600)
}

/// Reads an existing config.toml, if there is one. A file that does not parse is reported as
/// `Ok(None)` with a warning: it is replaced.
pub fn read_existing(path: &Path) -> Result<Option<RunnerConfig>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    match toml::from_str::<RunnerConfig>(&text) {
        Ok(c) => {
            for r in &c.runners {
                crate::log::register_secret(r.token.expose());
            }
            Ok(Some(c))
        }
        Err(_) => {
            // The parse error may quote the file, token included: do not print it.
            crate::warn!(
                "{} does not parse as a runner configuration; it will be replaced",
                path.display()
            );
            Ok(None)
        }
    }
}

/// The runner in `cfg` that belongs to the seed (same id and URL), if any.
pub fn runner_for<'a>(cfg: &'a RunnerConfig, seed: &AgentSeed) -> Option<&'a Runner> {
    let url = seed.gitlab_url.trim_end_matches('/');
    cfg.runners.iter().find(|r| {
        r.id == seed.runner_id && r.url.trim_end_matches('/') == url && !r.token.is_empty()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed() -> AgentSeed {
        serde_json::from_str(
            r#"{"version":1,"gitlab_url":"https://gl.example/","runner_token":"glrt-old","runner_id":42,"runner_name":"imagectl/ci/vm1"}"#,
        )
        .unwrap()
    }

    #[test]
    fn renders_like_gitlab_runner_register() {
        let cfg = build(
            &seed(),
            &Secret::new("glrt-new"),
            datetime(Some("2026-05-01T10:00:00Z")).unwrap(),
            None,
            Some("/etc/gitlab-runner/ca.pem".into()),
        )
        .unwrap();
        let text = toml::to_string(&cfg).unwrap();
        assert!(text.contains("check_interval = 3"), "{text}");
        assert!(text.contains("listen_address = \":9252\""), "{text}");
        assert!(text.contains("[[runners]]"), "{text}");
        assert!(
            text.contains("token_expires_at = 0001-01-01T00:00:00Z"),
            "{text}"
        );
        assert!(
            text.contains("token_obtained_at = 2026-05-01T10:00:00Z"),
            "{text}"
        );
        assert!(
            text.contains("tls-ca-file = \"/etc/gitlab-runner/ca.pem\""),
            "{text}"
        );
        assert!(text.contains("[runners.docker]"), "{text}");
        assert!(text.contains("url = \"https://gl.example\""), "{text}");
        let back: RunnerConfig = toml::from_str(&text).unwrap();
        assert_eq!(back.runners[0].token.expose(), "glrt-new");
        assert!(runner_for(&back, &seed()).is_some());
    }

    /// config.toml as gitlab-runner 17.x/18.x rewrites it after rotating the token itself
    /// (BurntSushi/toml, key order and tags of gitlab-org/gitlab-runner `common/config.go`):
    /// nanosecond `token_obtained_at`, zero `token_expires_at`, `omitzero` booleans and an empty
    /// `shm_size` left out, `pull_policy` as one string, tables the agent never writes.
    pub(crate) const REWRITTEN_BY_RUNNER: &str = r#"listen_address = ":9252"
concurrent = 2
check_interval = 3
connection_max_age = "15m0s"
shutdown_timeout = 0

[session_server]
  session_timeout = 1800

[[runners]]
  name = "imagectl/ci/vm1"
  url = "https://gl.example"
  id = 42
  token = "glrt-rewritten-by-runner"
  token_obtained_at = 2026-03-01T10:20:30.123456789Z
  token_expires_at = 0001-01-01T00:00:00Z
  tls-ca-file = "/etc/gitlab-runner/ca.pem"
  executor = "docker"
  [runners.custom_build_dir]
  [runners.cache]
    MaxUploadedArchiveSize = 0
    [runners.cache.s3]
    [runners.cache.gcs]
    [runners.cache.azure]
  [runners.docker]
    tls_verify = false
    image = "docker:stable"
    volumes = ["/cache"]
    pull_policy = "if-not-present"
    network_mtu = 0
"#;

    #[test]
    fn reads_a_config_rewritten_by_gitlab_runner() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("config.toml");
        std::fs::write(&p, REWRITTEN_BY_RUNNER).unwrap();
        let cfg = read_existing(&p).unwrap().expect("parses");
        let r = runner_for(&cfg, &seed()).expect("the seed's runner");
        assert_eq!(r.token.expose(), "glrt-rewritten-by-runner");
        assert_eq!(
            r.token_obtained_at.unwrap().to_string(),
            "2026-03-01T10:20:30.123456789Z"
        );
        assert_eq!(r.token_expires_at.unwrap().to_string(), NO_EXPIRY);
        let docker = r.docker.as_ref().unwrap();
        assert_eq!(docker.pull_policy, vec!["if-not-present".to_owned()]);
        assert!(!docker.privileged && !docker.disable_cache && docker.shm_size == 0);
        assert_eq!(cfg.listen_address.as_deref(), Some(":9252"));
    }

    #[test]
    fn every_field_may_be_missing() {
        // No times, no docker section, no check_interval, no listen_address, no name.
        let cfg: RunnerConfig = toml::from_str(
            "concurrent = 1\n[[runners]]\nurl = \"https://gl.example/\"\nid = 42\ntoken = \"glrt-min\"\n",
        )
        .unwrap();
        let r = runner_for(&cfg, &seed()).unwrap();
        assert!(r.token_obtained_at.is_none() && r.token_expires_at.is_none());
        assert!(r.docker.is_none() && r.executor.is_empty());
        assert_eq!(cfg.check_interval, 0);
        let cfg: RunnerConfig = toml::from_str("").unwrap();
        assert!(cfg.runners.is_empty());
        let d: Docker = toml::from_str("pull_policy = [\"always\", \"if-not-present\"]").unwrap();
        assert_eq!(d.pull_policy.len(), 2);
        // A runner without a token is never "the seed's runner".
        let cfg: RunnerConfig =
            toml::from_str("[[runners]]\nurl = \"https://gl.example\"\nid = 42\n").unwrap();
        assert!(runner_for(&cfg, &seed()).is_none());
    }

    #[test]
    fn expiry_is_normalised() {
        assert_eq!(
            datetime(Some("2026-05-01T10:00:00.123+02:00"))
                .unwrap()
                .to_string(),
            "2026-05-01T08:00:00Z"
        );
        assert_eq!(datetime(None).unwrap().to_string(), NO_EXPIRY);
    }
}
