//! `imagectl seed`: write a NoCloud seed ISO.
//!
//! The runner token is read from `--token-file` or the `IMAGECTL_RUNNER_TOKEN` environment
//! variable, never from a flag value: process arguments are visible to every user of the machine.

use super::Global;
use crate::error::input;
use crate::seed::{self, AdminUser, AgentSeed, Network, SeedConfig, StaticNet};
use anyhow::{Context, Result};
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Environment variable that may carry the runner token instead of `--token-file`.
pub const TOKEN_ENV: &str = "IMAGECTL_RUNNER_TOKEN";

/// Arguments of `imagectl seed`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where to write the ISO (written with mode 0600; replaced if it exists).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Host name of the VM (a DNS label or a fully qualified name).
    #[arg(long, value_name = "NAME")]
    pub hostname: String,
    /// cloud-init instance id (default: iid-<host>-<random>).
    #[arg(long, value_name = "ID")]
    pub instance_id: Option<String>,
    /// The agent's runner (writes imagectl/agent.json).
    #[command(flatten)]
    pub agent: AgentSeedArgs,
    /// Runner name for config.toml (default: imagectl/manual/<hostname>).
    #[arg(long, value_name = "NAME")]
    pub runner_name: Option<String>,
    /// PEM CA bundle the agent trusts for the GitLab URL.
    #[arg(long, value_name = "FILE")]
    pub ca_bundle: Option<PathBuf>,
    /// SSH public key file(s) for the admin user (repeatable).
    #[arg(long = "ssh-key", value_name = "FILE")]
    pub ssh_keys: Vec<PathBuf>,
    /// Name of the admin user that gets the SSH keys.
    #[arg(long, value_name = "NAME", default_value = "admin")]
    pub admin_user: String,
    /// Static address with prefix length instead of DHCP, e.g. 192.0.2.10/24.
    #[arg(long, value_name = "CIDR")]
    pub static_ip: Option<String>,
    /// Default gateway for --static-ip.
    #[arg(long, value_name = "IP", requires = "static_ip")]
    pub gateway: Option<IpAddr>,
    /// DNS server for --static-ip (repeatable).
    #[arg(long, value_name = "IP", requires = "static_ip")]
    pub dns: Vec<IpAddr>,
}

/// The runner an agent seed registers (shared by `imagectl seed` and `imagectl test`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct AgentSeedArgs {
    /// GitLab base URL for the agent (writes imagectl/agent.json; needs --runner-id and a token).
    #[arg(long, value_name = "URL")]
    pub gitlab_url: Option<String>,
    /// Id of the runner created for this VM.
    #[arg(long, value_name = "N")]
    pub runner_id: Option<u64>,
    /// File holding the runner token (glrt-…); or set IMAGECTL_RUNNER_TOKEN.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
}

/// Reads the runner token from `file` or, without one, from [`TOKEN_ENV`]. Never echoes it.
pub fn read_token(file: Option<&Path>) -> Result<seed::Secret> {
    let raw = match file {
        Some(p) => {
            let meta = std::fs::metadata(p)
                .map_err(|e| input(format!("cannot read token file {}: {e}", p.display())))?;
            if !meta.is_file() {
                return Err(input(format!(
                    "--token-file {} is not a regular file; pass the file that holds the runner token",
                    p.display()
                )));
            }
            if meta.len() > 4096 {
                return Err(input(format!(
                    "--token-file {} is {} bytes; a runner token file holds one short line",
                    p.display(),
                    meta.len()
                )));
            }
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    "token file {} is readable by group or others; chmod 600 it",
                    p.display()
                );
            }
            crate::util::read_text_input(p, "--token-file", 4096)?
        }
        None => std::env::var(TOKEN_ENV).map_err(|_| {
            input(format!(
                "no runner token: pass --token-file PATH or set {TOKEN_ENV}"
            ))
        })?,
    };
    let token = raw.trim();
    if token.is_empty() {
        return Err(input("the runner token is empty"));
    }
    if token.lines().count() > 1 {
        return Err(input("the token file must hold the token on a single line"));
    }
    // Only the runner's own authentication token may go into a VM (GitLab's
    // `Ci::Runner::CREATED_RUNNER_TOKEN_PREFIX`, app/models/ci/runner.rb); a personal, group or
    // project access token there would hand the whole account to every job.
    if !token.starts_with("glrt-") {
        let kind = if token.starts_with("glpat-") {
            "a personal, group or project access token (glpat-)"
        } else {
            "not a runner authentication token"
        };
        return Err(input(format!(
            "the runner token is {kind}; a seed takes the token of a runner created in GitLab (glrt-…)"
        )));
    }
    Ok(seed::Secret::new(token))
}

/// The agent seed the flags ask for, or `None` when no agent flag is given.
pub fn agent_from_flags(
    hostname: &str,
    gitlab_url: Option<&str>,
    runner_id: Option<u64>,
    token_file: Option<&Path>,
    runner_name: Option<&str>,
    ca_bundle: Option<&Path>,
) -> Result<Option<AgentSeed>> {
    if gitlab_url.is_none() && runner_id.is_none() && token_file.is_none() {
        return Ok(None);
    }
    let url =
        gitlab_url.ok_or_else(|| input("--runner-id/--token-file need --gitlab-url as well"))?;
    let url = crate::remote::gitlab::normalize_url(url)
        .map_err(|e| input(format!("--gitlab-url: invalid GitLab URL: {e}")))?;
    let url = url.as_str();
    let id = runner_id.ok_or_else(|| input("--gitlab-url needs --runner-id as well"))?;
    let token = read_token(token_file)?;
    let ca = match ca_bundle {
        Some(p) => {
            let pem = std::fs::read_to_string(p)
                .map_err(|e| input(format!("cannot read CA bundle {}: {e}", p.display())))?;
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                return Err(input(format!("{} holds no PEM certificate", p.display())));
            }
            Some(pem)
        }
        None => None,
    };
    let mut seed: AgentSeed = serde_json::from_value(serde_json::json!({
        "version": 1,
        "gitlab_url": url.trim_end_matches('/'),
        "runner_token": "",
        "runner_id": id,
        "runner_name": runner_name.map(str::to_string)
            .unwrap_or_else(|| format!("imagectl/manual/{hostname}")),
    }))
    .context("building agent seed")?;
    seed.runner_token = token;
    seed.ca_bundle = ca;
    Ok(Some(seed))
}

fn config_from_args(a: &Args) -> Result<SeedConfig> {
    let mut cfg = SeedConfig::new(&a.hostname)?;
    if let Some(id) = &a.instance_id {
        cfg.instance_id = id.clone();
    }
    if !a.ssh_keys.is_empty() {
        let mut keys = Vec::new();
        for p in &a.ssh_keys {
            let text = std::fs::read_to_string(p)
                .map_err(|e| input(format!("cannot read SSH key {}: {e}", p.display())))?;
            keys.extend(
                seed::parse_ssh_keys(&text).with_context(|| format!("reading {}", p.display()))?,
            );
        }
        cfg.admin = Some(AdminUser {
            name: a.admin_user.clone(),
            ssh_authorized_keys: keys,
        });
    }
    if let Some(addr) = &a.static_ip {
        cfg.network = Network::Static(StaticNet {
            address: addr.clone(),
            gateway: a.gateway,
            dns: a.dns.clone(),
        });
    }
    cfg.agent = agent_from_flags(
        &a.hostname,
        a.agent.gitlab_url.as_deref(),
        a.agent.runner_id,
        a.agent.token_file.as_deref(),
        a.runner_name.as_deref(),
        a.ca_bundle.as_deref(),
    )?;
    cfg.validate()?;
    Ok(cfg)
}

/// Runs `imagectl seed`.
pub fn run(g: &Global, a: Args) -> Result<i32> {
    let cfg = config_from_args(&a)?;
    let info = seed::write_iso(&cfg, &a.out)
        .with_context(|| format!("writing seed ISO {}", a.out.display()))?;
    g.emit(&info, |i| {
        format!(
            "wrote {} (instance-id {}, agent.json: {}, sha256 {})\n",
            i.path.display(),
            i.instance_id,
            if i.agent { "yes" } else { "no" },
            i.sha256
        )
    })?;
    Ok(0)
}
