//! Fleet settings: flags > environment > `imagectl.toml` (`[gitlab]` and `[fleet.NAME]`).
//!
//! The file is found the way [`crate::config::locate`] finds it (`--config`, `$IMAGECTL_CONFIG`,
//! `./imagectl.toml`, `$XDG_CONFIG_HOME/imagectl/imagectl.toml`). Environment: `GITLAB_URL`,
//! `GITLAB_TOKEN` (scopes `create_runner`, `manage_runner`, `read_api`), `IMAGECTL_STATE_DIR`.
//!
//! ```toml
//! [gitlab]
//! url = "https://gitlab.example.com"
//! token_file = "/etc/imagectl/gitlab-token"   # or GITLAB_TOKEN
//! runner_type = "group_type"                  # instance_type | group_type | project_type
//! group_id = 42
//! tags = ["docker", "linux"]
//! run_untagged = false
//! locked = true
//! access_level = "not_protected"              # or ref_protected
//! maximum_timeout = 3600
//! ca_file = "/etc/ssl/certs/corp-ca.pem"      # trusted by imagectl and by the agent
//! concurrent = 2                              # gitlab-runner `concurrent`
//! retry_budget = 120                          # seconds one GitLab call may spend retrying
//! [gitlab.docker]                             # [runners.docker] of every VM
//! image = "debian:bookworm"
//! privileged = false
//!
//! [fleet.ci]
//! provider = "local"                          # or proxmox
//! count = 3
//! max_count = 100                             # the largest --count accepted
//! image = "latest"
//! memory = 1024                               # MiB per VM
//! cpus = 2
//! concurrency = 4
//! timeout = 900                               # seconds per VM to registered + online
//! drain_timeout = 3600
//! max_surge = 1
//! max_unavailable = 0                         # old VMs drained before their replacements are up
//! network = "restricted"                      # local: or "open" (runners can pull images)
//! images_dir = "out"                          # local image store
//! seed_storage = "local"                      # proxmox: iso storage for the per-VM seeds
//! pool = "ci-runners"                         # proxmox: resource pool of the VMs
//! full_storage = "local-lvm"                  # proxmox: storage of --full clones
//! ```

use crate::error::input;
use crate::remote::gitlab::normalize_url;
use anyhow::Result;
use imagectl_proto::{DockerExecutor, Secret};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Environment variable with the GitLab base URL.
pub const ENV_GITLAB_URL: &str = "GITLAB_URL";
/// Environment variable with the GitLab token.
pub const ENV_GITLAB_TOKEN: &str = "GITLAB_TOKEN";

/// `[gitlab]` in the settings file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitlabSection {
    /// Base URL.
    pub url: Option<String>,
    /// The token itself (prefer `token_file` or `GITLAB_TOKEN`).
    pub token: Option<Secret>,
    /// A file holding the token.
    pub token_file: Option<PathBuf>,
    /// `instance_type` | `group_type` | `project_type`.
    pub runner_type: Option<String>,
    /// Group of group runners.
    pub group_id: Option<u64>,
    /// Project of project runners.
    pub project_id: Option<u64>,
    /// Runner tags.
    pub tags: Option<Vec<String>>,
    /// Pick untagged jobs.
    pub run_untagged: Option<bool>,
    /// Lock runners to their project.
    pub locked: Option<bool>,
    /// `not_protected` | `ref_protected`.
    pub access_level: Option<String>,
    /// Maximum job timeout (seconds).
    pub maximum_timeout: Option<u64>,
    /// CA bundle for the GitLab URL.
    pub ca_file: Option<PathBuf>,
    /// gitlab-runner `concurrent`.
    pub concurrent: Option<u32>,
    /// `[runners.docker]` settings.
    pub docker: Option<DockerExecutor>,
    /// Seconds one GitLab call may spend on retries (back-off and `Retry-After` waits).
    pub retry_budget: Option<u64>,
}

/// The largest fleet `deploy --count` accepts unless `[fleet.NAME] max_count` raises it.
pub const DEFAULT_MAX_COUNT: usize = 100;

/// `[fleet.NAME]` in the settings file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSection {
    /// `local` or `proxmox`.
    pub provider: Option<String>,
    /// Default `--count`.
    pub count: Option<usize>,
    /// The largest `--count` accepted (default [`DEFAULT_MAX_COUNT`]).
    pub max_count: Option<usize>,
    /// Default `--image`.
    pub image: Option<String>,
    /// Memory per VM (MiB).
    pub memory: Option<u32>,
    /// vCPUs per VM.
    pub cpus: Option<u32>,
    /// VMs created at once.
    pub concurrency: Option<usize>,
    /// Seconds per VM to registered + online.
    pub timeout: Option<u64>,
    /// Seconds to wait for running jobs when draining.
    pub drain_timeout: Option<u64>,
    /// New VMs brought up before old ones are drained in a rollout.
    pub max_surge: Option<usize>,
    /// Old VMs drained before their replacements are up in a rollout.
    pub max_unavailable: Option<usize>,
    /// `restricted` or `open` (local provider).
    pub network: Option<String>,
    /// Local image store.
    pub images_dir: Option<PathBuf>,
    /// Only images of this name.
    pub image_name: Option<String>,
    /// `tcg`, `kvm` or `auto` (local provider).
    pub accel: Option<String>,
    /// State directory (local provider).
    pub state_dir: Option<PathBuf>,
    /// Storage for the per-VM seed ISOs (Proxmox; default `local`).
    pub seed_storage: Option<String>,
    /// Resource pool of the VMs (Proxmox).
    pub pool: Option<String>,
    /// Storage of full clones (Proxmox; default: the template's).
    pub full_storage: Option<String>,
}

/// What the settings file says for one fleet.
#[derive(Debug, Default, Clone)]
pub struct FileSettings {
    /// `[gitlab]`.
    pub gitlab: GitlabSection,
    /// `[fleet.NAME]`.
    pub fleet: FleetSection,
    /// The file, if one was read.
    pub path: Option<PathBuf>,
}

/// Reads `[gitlab]` and `[fleet.NAME]` from the settings file, if there is one.
pub fn read_file(
    flag: Option<&Path>,
    fleet: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<FileSettings> {
    let Some(path) = crate::config::locate(flag, env)? else {
        return Ok(FileSettings::default());
    };
    let file = crate::config::ConfigFile::read(&path)?;
    let bad = |what: &str, e: toml::de::Error| input(format!("{}: {what}: {e}", path.display()));
    let gitlab = match file.gitlab {
        Some(t) => GitlabSection::deserialize(t).map_err(|e| bad("[gitlab]", e))?,
        None => GitlabSection::default(),
    };
    let fleet = match file.fleet.get(fleet) {
        Some(t) => {
            FleetSection::deserialize(t.clone()).map_err(|e| bad(&format!("[fleet.{fleet}]"), e))?
        }
        None => FleetSection::default(),
    };
    Ok(FileSettings {
        gitlab,
        fleet,
        path: Some(path),
    })
}

/// Everything resolved about the GitLab side of a fleet.
#[derive(Debug, Clone)]
pub struct GitlabSettings {
    /// Base URL (normalised).
    pub url: String,
    /// Token (`PRIVATE-TOKEN`).
    pub token: Secret,
    /// Runner type.
    pub runner_type: String,
    /// Group id.
    pub group_id: Option<u64>,
    /// Project id.
    pub project_id: Option<u64>,
    /// Tags.
    pub tags: Vec<String>,
    /// Run untagged jobs.
    pub run_untagged: bool,
    /// Locked.
    pub locked: bool,
    /// Access level.
    pub access_level: String,
    /// Maximum timeout.
    pub maximum_timeout: Option<u64>,
    /// CA bundle (PEM text).
    pub ca_pem: Option<String>,
    /// gitlab-runner `concurrent`.
    pub concurrent: u32,
    /// Docker executor settings.
    pub docker: DockerExecutor,
    /// Time one GitLab call may spend on retries.
    pub retry_budget: std::time::Duration,
}

/// GitLab flags the fleet commands share.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct GitlabFlags {
    /// GitLab base URL, e.g. https://gitlab.example.com (env GITLAB_URL; [gitlab] url).
    #[arg(long, value_name = "URL")]
    pub gitlab_url: Option<String>,
    /// File holding the GitLab token: scopes create_runner, manage_runner and read_api; each command's --help says what it needs (env GITLAB_TOKEN holds the token itself).
    #[arg(long, value_name = "FILE")]
    pub gitlab_token_file: Option<PathBuf>,
    /// Runner type: instance_type, group_type or project_type (default instance_type).
    #[arg(long, value_name = "TYPE")]
    pub runner_type: Option<String>,
    /// Group id for group_type runners.
    #[arg(long, value_name = "ID")]
    pub group_id: Option<u64>,
    /// Project id for project_type runners.
    #[arg(long, value_name = "ID")]
    pub project_id: Option<u64>,
    /// Runner tag (repeatable; replaces the file's tags).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Seconds one GitLab call may spend retrying 408/429/5xx and transport errors, with
    /// jittered back-off and honouring Retry-After (default 120; [gitlab] retry_budget).
    #[arg(long, value_name = "SECS")]
    pub gitlab_retry_budget: Option<u64>,
}

fn read_secret_file(p: &Path) -> Result<Secret> {
    let text = crate::util::read_text_input(p, "--gitlab-token-file", 4096)?;
    use std::os::unix::fs::PermissionsExt;
    if std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o077 != 0) {
        eprintln!(
            "warning: {} holds the GitLab token but others can read it (chmod 600 it)",
            p.display()
        );
    }
    Ok(Secret::new(text.trim().to_string()))
}

/// Resolves the GitLab settings (flags > env > file).
pub fn resolve_gitlab(
    flags: &GitlabFlags,
    file: &FileSettings,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<GitlabSettings> {
    let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    let g = &file.gitlab;
    let source = file.path.as_ref().map_or_else(
        || "no settings file".to_string(),
        |p| p.display().to_string(),
    );
    let url = flags
        .gitlab_url
        .clone()
        .or_else(|| env(ENV_GITLAB_URL))
        .or_else(|| g.url.clone())
        .ok_or_else(|| {
            input(format!(
                "no GitLab URL: set GITLAB_URL, pass --gitlab-url, or set [gitlab] url in imagectl.toml ({source})"
            ))
        })?;
    let url = normalize_url(&url).map_err(input)?;
    let token = if let Some(p) = &flags.gitlab_token_file {
        read_secret_file(p)?
    } else if let Some(t) = env(ENV_GITLAB_TOKEN) {
        Secret::new(t.trim())
    } else if let Some(p) = &g.token_file {
        read_secret_file(p)?
    } else if let Some(t) = g.token.clone().filter(|t| !t.is_empty()) {
        t
    } else {
        return Err(input(format!(
            "no GitLab token: set GITLAB_TOKEN (scopes create_runner, manage_runner, read_api), pass \
             --gitlab-token-file FILE, or set [gitlab] token_file in imagectl.toml ({source})"
        )));
    };
    if token.expose().is_empty() || token.expose().contains(char::is_whitespace) {
        return Err(input("the GitLab token is empty or contains whitespace"));
    }
    let runner_type = flags
        .runner_type
        .clone()
        .or_else(|| g.runner_type.clone())
        .unwrap_or_else(|| "instance_type".into());
    let group_id = flags.group_id.or(g.group_id);
    let project_id = flags.project_id.or(g.project_id);
    match runner_type.as_str() {
        "instance_type" => {}
        "group_type" if group_id.is_none() => {
            return Err(input(
                "group_type runners need --group-id (or [gitlab] group_id)",
            ))
        }
        "project_type" if project_id.is_none() => {
            return Err(input(
                "project_type runners need --project-id (or [gitlab] project_id)",
            ))
        }
        "group_type" | "project_type" => {}
        other => {
            return Err(input(format!(
                "unknown runner type {other:?}: use instance_type, group_type or project_type"
            )))
        }
    }
    let access_level = g
        .access_level
        .clone()
        .unwrap_or_else(|| "not_protected".into());
    if !["not_protected", "ref_protected"].contains(&access_level.as_str()) {
        return Err(input(format!(
            "[gitlab] access_level {access_level:?}: use not_protected or ref_protected"
        )));
    }
    let tags = if flags.tags.is_empty() {
        g.tags.clone().unwrap_or_default()
    } else {
        flags.tags.clone()
    };
    let run_untagged = g.run_untagged.unwrap_or(tags.is_empty());
    check_runner_params(
        &runner_type,
        group_id.or(project_id).is_some(),
        &tags,
        run_untagged,
        g.maximum_timeout,
    )?;
    let retry_budget = match flags.gitlab_retry_budget.or(g.retry_budget) {
        None => std::time::Duration::from_secs(120),
        Some(s @ 1..=86_400) => std::time::Duration::from_secs(s),
        Some(s) => {
            return Err(input(format!(
                "GitLab retry budget {s}: use 1 to 86400 seconds (--gitlab-retry-budget, [gitlab] retry_budget)"
            )))
        }
    };
    let ca_pem = match &g.ca_file {
        Some(p) => Some(
            fs_err::read_to_string(p)
                .map_err(|e| input(format!("cannot read [gitlab] ca_file: {e}")))?,
        ),
        None => None,
    };
    Ok(GitlabSettings {
        url,
        token,
        run_untagged,
        runner_type,
        group_id,
        project_id,
        tags,
        locked: g.locked.unwrap_or(false),
        access_level,
        maximum_timeout: g.maximum_timeout,
        ca_pem,
        concurrent: g.concurrent.unwrap_or(1).max(1),
        docker: g.docker.clone().unwrap_or_default(),
        retry_budget,
    })
}

/// The runner's own rules, checked as GitLab checks them (gitlabhq `app/models/ci/runner.rb`)
/// before any call, so a bad setting exits 2 instead of failing every create:
/// `maximum_timeout` ≥ 600 ("needs to be at least 10 minutes"), no empty tag list when
/// `run_untagged` is false (`tag_constraints`), at most 50 tags (`TAG_LIST_MAX_LENGTH`), and
/// no group or project for an instance runner (`no_groups`, `no_projects`).
pub fn check_runner_params(
    runner_type: &str,
    has_scope_id: bool,
    tags: &[String],
    run_untagged: bool,
    maximum_timeout: Option<u64>,
) -> Result<()> {
    if let Some(t) = maximum_timeout.filter(|t| *t < 600) {
        return Err(input(format!(
            "[gitlab] maximum_timeout = {t}: GitLab needs at least 600 seconds (10 minutes)"
        )));
    }
    if !run_untagged && tags.is_empty() {
        return Err(input(
            "[gitlab] run_untagged = false needs at least one tag (--tag or [gitlab] tags): GitLab \
             refuses a runner that can pick no job",
        ));
    }
    if tags.len() > 50 {
        return Err(input(format!(
            "{} runner tags: GitLab allows at most 50",
            tags.len()
        )));
    }
    if let Some(t) = tags
        .iter()
        .find(|t| t.trim().is_empty() || t.contains(',') || t.chars().count() > 255)
    {
        return Err(input(format!(
            "runner tag {t:?}: tags are 1 to 255 characters without commas"
        )));
    }
    if runner_type == "instance_type" && has_scope_id {
        return Err(input(
            "instance_type runners take no --group-id or --project-id (GitLab assigns an instance \
             runner to no group or project); use group_type or project_type",
        ));
    }
    Ok(())
}

/// How the fleet commands behave (the provider-neutral part).
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Fleet name.
    pub fleet: String,
    /// Memory per VM (MiB).
    pub memory_mib: u32,
    /// vCPUs per VM.
    pub cpus: u32,
    /// VMs created (or drained) at once.
    pub concurrency: usize,
    /// Per VM: power-on to registered and online.
    pub timeout: Duration,
    /// Drain: how long to wait for running jobs.
    pub drain_timeout: Duration,
    /// After the drain timeout: delete anyway (true) or give up and leave the VM running.
    pub force: bool,
    /// New VMs brought up before old ones are drained.
    pub max_surge: usize,
    /// Old VMs drained before their replacements are online, per rollout batch.
    pub max_unavailable: usize,
    /// Graceful power-off time before a hard stop.
    pub stop_grace: Duration,
    /// Full clones (PVE).
    pub full_clone: bool,
    /// How long a fleet lock is honoured when its holder cannot be checked.
    pub lock_ttl: Duration,
    /// How often to poll the agent and GitLab.
    pub poll: Duration,
}

impl FleetOptions {
    /// Defaults for `fleet` (1024 MiB, 2 vCPUs, concurrency 4, 15 min timeout, 1 h drain).
    pub fn new(fleet: &str) -> Self {
        Self {
            fleet: fleet.to_string(),
            memory_mib: 1024,
            cpus: 2,
            concurrency: 4,
            timeout: Duration::from_secs(900),
            drain_timeout: Duration::from_secs(3600),
            force: false,
            max_surge: 1,
            max_unavailable: 0,
            stop_grace: Duration::from_secs(10),
            full_clone: false,
            lock_ttl: Duration::from_secs(4 * 3600),
            poll: Duration::from_secs(3),
        }
    }
}

/// A fleet name: 1–24 of `[a-z0-9-]`, starting with a letter (it prefixes VM host names).
pub fn validate_fleet_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 24
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(input(format!(
            "invalid fleet name {name:?}: use 1 to 24 of a-z, 0-9 and '-', starting with a letter"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn flags_beat_env_beat_file() {
        let d = tempfile::tempdir().unwrap();
        let cfg = d.path().join("imagectl.toml");
        std::fs::write(
            &cfg,
            "[gitlab]\nurl = \"https://file.example\"\ntoken = \"glpat-file\"\ntags = [\"a\"]\n\
             runner_type = \"group_type\"\ngroup_id = 7\n[gitlab.docker]\nimage = \"alpine\"\n\
             [fleet.ci]\ncount = 3\nmemory = 2048\n",
        )
        .unwrap();
        let env = env_of(&[("HOME", "/nonexistent")]);
        let file = read_file(Some(&cfg), "ci", &env).unwrap();
        assert_eq!(file.fleet.count, Some(3));
        assert_eq!(file.fleet.memory, Some(2048));
        let g = resolve_gitlab(&GitlabFlags::default(), &file, &env).unwrap();
        assert_eq!(g.url, "https://file.example");
        assert_eq!(g.token.expose(), "glpat-file");
        assert_eq!(
            (g.runner_type.as_str(), g.group_id),
            ("group_type", Some(7))
        );
        assert!(
            !g.run_untagged,
            "tagged runners do not run untagged jobs by default"
        );
        assert_eq!(g.docker.image, "alpine");
        let env = env_of(&[
            (ENV_GITLAB_URL, "http://127.0.0.1:9/api/v4"),
            (ENV_GITLAB_TOKEN, "glpat-env"),
        ]);
        let g = resolve_gitlab(&GitlabFlags::default(), &file, &env).unwrap();
        assert_eq!(g.url, "http://127.0.0.1:9");
        assert_eq!(g.token.expose(), "glpat-env");
        let flags = GitlabFlags {
            gitlab_url: Some("https://flag.example".into()),
            tags: vec!["b".into()],
            ..Default::default()
        };
        let g = resolve_gitlab(&flags, &file, &env).unwrap();
        assert_eq!(g.url, "https://flag.example");
        assert_eq!(g.tags, ["b"]);
        // Another fleet's table is not this one's.
        assert_eq!(
            read_file(Some(&cfg), "other", &env_of(&[]))
                .unwrap()
                .fleet
                .count,
            None
        );
    }

    #[test]
    fn bad_settings_are_input_errors_without_secrets() {
        let none = FileSettings::default();
        let e = resolve_gitlab(&GitlabFlags::default(), &none, &env_of(&[])).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 2);
        assert!(e.to_string().contains("GITLAB_URL"), "{e}");
        let env = env_of(&[
            (ENV_GITLAB_URL, "https://x.example"),
            (ENV_GITLAB_TOKEN, "glpat-topsecret"),
        ]);
        let flags = GitlabFlags {
            runner_type: Some("group_type".into()),
            ..Default::default()
        };
        let e = resolve_gitlab(&flags, &none, &env).unwrap_err();
        assert!(e.to_string().contains("--group-id"), "{e}");
        assert!(!format!("{e:#}").contains("topsecret"));
        let d = tempfile::tempdir().unwrap();
        let cfg = d.path().join("c.toml");
        std::fs::write(&cfg, "[fleet.ci]\ncuont = 3\n").unwrap();
        let e = read_file(Some(&cfg), "ci", &env_of(&[])).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 2);
        assert!(e.to_string().contains("cuont"), "{e}");
        for bad in ["", "CI", "1ci", "ci-", "a_b", "averyveryverylongfleetname"] {
            assert!(validate_fleet_name(bad).is_err(), "{bad}");
        }
        validate_fleet_name("ci-2").unwrap();
    }

    #[test]
    fn runner_params_are_checked_as_gitlab_checks_them() {
        let tags = vec!["docker".to_string()];
        check_runner_params("group_type", true, &tags, false, Some(600)).unwrap();
        check_runner_params("instance_type", false, &[], true, None).unwrap();
        let err = |r: Result<()>| {
            let e = r.unwrap_err();
            assert_eq!(crate::error::exit_code(&e), 2);
            e.to_string()
        };
        assert!(err(check_runner_params(
            "instance_type",
            false,
            &tags,
            true,
            Some(599)
        ))
        .contains("600"));
        assert!(err(check_runner_params(
            "instance_type",
            false,
            &[],
            false,
            None
        ))
        .contains("at least one tag"));
        assert!(err(check_runner_params(
            "instance_type",
            true,
            &tags,
            true,
            None
        ))
        .contains("--group-id"));
        let many: Vec<String> = (0..51).map(|i| format!("t{i}")).collect();
        assert!(err(check_runner_params("group_type", true, &many, true, None)).contains("50"));
        assert!(err(check_runner_params(
            "group_type",
            true,
            &["a,b".into()],
            true,
            None
        ))
        .contains("commas"));
    }
}
