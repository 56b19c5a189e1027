//! Reading `imagectl/agent.json` from the NoCloud seed.
//!
//! The seed is found by filesystem label (`/dev/disk/by-label/cidata`, or `CIDATA` as vfat seeds
//! spell it), mounted read-only with `nosuid,nodev,noexec` on a private directory under the `/run`
//! tmpfs (`/run/imagectl/seed`, mode 0700), read, and unmounted again — also when reading fails.
//! `--seed-dir` reads the file from a plain directory instead (tests, manual runs).

use crate::fsx;
use crate::log::register_secret;
use crate::paths::Paths;
use crate::sys;
use anyhow::{bail, Context, Result};
use imagectl_proto::{AgentSeed, SEED_AGENT_PATH, SEED_LABEL};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Upper bound on the size of agent.json (a CA bundle fits easily).
const SEED_LIMIT: u64 = 1 << 20;

/// Where the seed comes from.
#[derive(Debug, Clone)]
pub enum SeedSource {
    /// A directory that contains `imagectl/agent.json`.
    Dir(PathBuf),
    /// A block device to mount; `None` = find it by label.
    Device(Option<PathBuf>),
}

/// The default label path of the seed device.
pub fn default_device() -> PathBuf {
    PathBuf::from(format!("/dev/disk/by-label/{SEED_LABEL}"))
}

/// Loads and validates the seed.
pub fn load(source: &SeedSource, paths: &Paths, wait: Duration) -> Result<AgentSeed> {
    let raw = match source {
        SeedSource::Dir(dir) => {
            let p = dir.join(SEED_AGENT_PATH);
            fsx::read_limited(&p, SEED_LIMIT)?
        }
        SeedSource::Device(dev) => read_from_device(dev.as_deref(), paths, wait)?,
    };
    parse(&raw)
}

/// Parses and validates agent.json. The token is registered for redaction before anything can
/// format an error that might quote it.
pub fn parse(raw: &[u8]) -> Result<AgentSeed> {
    // serde errors may quote values ("invalid type: string \"…\""): learn the token first.
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(raw) {
        if let Some(t) = v.get("runner_token").and_then(|t| t.as_str()) {
            register_secret(t);
        }
    }
    let seed: AgentSeed = serde_json::from_slice(raw)
        .map_err(|e| anyhow::anyhow!("{}", crate::log::redact(&e.to_string())))
        .with_context(|| format!("parsing {SEED_AGENT_PATH}"))?;
    register_secret(seed.runner_token.expose());
    validate(&seed)?;
    Ok(seed)
}

fn validate(seed: &AgentSeed) -> Result<()> {
    if seed.version != 1 {
        bail!(
            "{SEED_AGENT_PATH}: unsupported version {} (this agent reads version 1)",
            seed.version
        );
    }
    let url = seed.gitlab_url.as_str();
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        bail!("{SEED_AGENT_PATH}: gitlab_url must be an http(s) URL, got {url:?}");
    }
    if seed.runner_token.is_empty() {
        bail!("{SEED_AGENT_PATH}: runner_token is empty");
    }
    if seed.runner_id == 0 {
        bail!("{SEED_AGENT_PATH}: runner_id must be set");
    }
    if seed.runner_name.trim().is_empty() {
        bail!("{SEED_AGENT_PATH}: runner_name is empty");
    }
    if seed.concurrent == 0 {
        bail!("{SEED_AGENT_PATH}: concurrent must be at least 1");
    }
    Ok(())
}

/// Waits for the device, mounts it, reads agent.json, unmounts.
fn read_from_device(dev: Option<&Path>, paths: &Paths, wait: Duration) -> Result<Vec<u8>> {
    let dev = wait_for_device(dev, wait)?;
    fsx::create_dir_all(&paths.runtime_dir, 0o700)?;
    fsx::create_dir_all(&paths.seed_mount, 0o700)?;
    let mnt = paths.seed_mount.to_string_lossy().into_owned();
    let dev_s = dev.to_string_lossy().into_owned();
    sys::run(
        "mount",
        &["-o", "ro,nosuid,nodev,noexec", "--", &dev_s, &mnt],
    )
    .with_context(|| format!("mounting seed {dev_s} on {mnt}"))?;
    // Unmount on every path out of here, including errors and panics.
    let _guard = Unmount(mnt);
    fsx::read_limited(&paths.seed_mount.join(SEED_AGENT_PATH), SEED_LIMIT)
        .context("the seed has no usable imagectl/agent.json")
}

struct Unmount(String);

impl Drop for Unmount {
    fn drop(&mut self) {
        if let Err(e) = sys::run("umount", &["--", &self.0]) {
            crate::warn!("unmounting the seed at {}: {e:#}", self.0);
        }
    }
}

/// The device to mount: the given one, or the label path (either spelling). Waits up to `wait` for
/// udev to create it.
fn wait_for_device(dev: Option<&Path>, wait: Duration) -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = match dev {
        Some(d) => vec![d.to_path_buf()],
        None => vec![
            default_device(),
            PathBuf::from(format!("/dev/disk/by-label/{}", SEED_LABEL.to_uppercase())),
        ],
    };
    let deadline = Instant::now() + wait;
    loop {
        if let Some(found) = candidates.iter().find(|c| c.exists()) {
            return Ok(found.clone());
        }
        if Instant::now() >= deadline {
            let list: Vec<_> = candidates.iter().map(|c| c.display().to_string()).collect();
            bail!(
                "no seed device: none of {} appeared within {} s",
                list.join(", "),
                wait.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"{"version":1,"gitlab_url":"http://gl","runner_token":"glrt-seedtest-XYZ","runner_id":7,"runner_name":"n"}"#;

    #[test]
    fn parses_and_validates() {
        let s = parse(OK.as_bytes()).unwrap();
        assert_eq!(s.runner_id, 7);
        let bad = OK.replace("http://gl", "ftp://gl");
        assert!(parse(bad.as_bytes()).is_err());
    }

    #[test]
    fn parse_errors_do_not_quote_the_token() {
        // runner_id holding the token: serde would quote it in "invalid type".
        let bad = r#"{"version":1,"gitlab_url":"http://gl","runner_token":"glrt-quoted-SECRET1","runner_id":"glrt-quoted-SECRET1","runner_name":"n"}"#;
        let err = format!("{:#}", parse(bad.as_bytes()).unwrap_err());
        assert!(!err.contains("glrt-quoted-SECRET1"), "{err}");
    }

    #[test]
    fn missing_device_times_out() {
        let err = wait_for_device(Some(Path::new("/nonexistent/dev")), Duration::ZERO).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/dev"));
    }
}
