//! NoCloud seed ISO writer (volume id `cidata`): user-data, meta-data, network-config and the
//! agent's `imagectl/agent.json`.
//!
//! [`render`] turns a [`SeedConfig`] into the seed's files (pure, testable); [`write_iso`] stages
//! them in a private (0700) temporary directory and packs them with `xorriso` into an ISO9660 image
//! with Rock Ridge and Joliet. The ISO is reproducible: owners are 0:0, modes are fixed
//! (`agent.json` is 0400, the rest 0444), and every date comes from `SOURCE_DATE_EPOCH` (or a fixed
//! default), so the same config gives the same bytes.
//!
//! The runner token lives only in `imagectl/agent.json`, which cloud-init ignores; user-data never
//! carries it (cloud-init keeps user-data on the VM's disk). Nothing here logs the token.

use anyhow::{bail, Context, Result};
use serde_yaml::{Mapping, Value};
use std::fs::Permissions;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

pub use imagectl_proto::{AgentSeed, Secret, SEED_AGENT_PATH, SEED_LABEL};

use crate::error::input;

const USER_DATA_TEMPLATE: &str = include_str!("../../cloud-init/user-data.yaml");
const NETWORK_DHCP: &str = include_str!("../../cloud-init/network-config.yaml");
const NETWORK_STATIC_TEMPLATE: &str = include_str!("../../cloud-init/network-config-static.yaml");

/// Volume and file dates when `SOURCE_DATE_EPOCH` is not set (2023-11-14T22:13:20Z).
pub const DEFAULT_SOURCE_DATE_EPOCH: i64 = 1_700_000_000;

/// How the VM's network is configured.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Network {
    /// DHCP on the first NIC (`eth0`: images boot with `net.ifnames=0`).
    #[default]
    Dhcp,
    /// A fixed address on the first ethernet interface.
    Static(StaticNet),
}

/// A static IP configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticNet {
    /// Address with prefix length, e.g. `192.0.2.10/24`.
    pub address: String,
    /// Default gateway.
    pub gateway: Option<IpAddr>,
    /// DNS servers.
    pub dns: Vec<IpAddr>,
}

impl StaticNet {
    /// Validates the address (CIDR) and that the gateway is of the same family.
    pub fn validate(&self) -> Result<()> {
        let addr = parse_cidr(&self.address)?;
        if let Some(gw) = self.gateway {
            if gw.is_ipv4() != addr.is_ipv4() {
                return Err(input(format!(
                    "gateway {gw} and address {} are of different IP families",
                    self.address
                )));
            }
        }
        Ok(())
    }
}

/// An admin login created by cloud-init (key-only, passwordless sudo).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminUser {
    /// User name.
    pub name: String,
    /// `authorized_keys` lines.
    pub ssh_authorized_keys: Vec<String>,
}

/// Everything that goes onto one VM's seed.
#[derive(Debug, Clone)]
pub struct SeedConfig {
    /// Host name (a DNS label, or a dotted name whose first label becomes the host name).
    pub hostname: String,
    /// cloud-init instance id; a new id makes cloud-init treat the VM as a new instance.
    pub instance_id: String,
    /// Optional admin user with SSH keys.
    pub admin: Option<AdminUser>,
    /// Network configuration.
    pub network: Network,
    /// The agent's configuration (with the runner token); `None` writes no `agent.json`.
    pub agent: Option<AgentSeed>,
}

impl SeedConfig {
    /// A DHCP seed without admin user or agent, with a freshly generated instance id.
    pub fn new(hostname: &str) -> Result<Self> {
        validate_hostname(hostname)?;
        Ok(Self {
            hostname: hostname.to_string(),
            instance_id: generate_instance_id(hostname),
            admin: None,
            network: Network::Dhcp,
            agent: None,
        })
    }

    /// Checks every field; errors are input errors (exit code 2).
    pub fn validate(&self) -> Result<()> {
        validate_hostname(&self.hostname)?;
        validate_instance_id(&self.instance_id)?;
        if let Some(admin) = &self.admin {
            validate_user_name(&admin.name)?;
            if admin.ssh_authorized_keys.is_empty() {
                return Err(input(format!("admin user {} has no SSH keys", admin.name)));
            }
            for k in &admin.ssh_authorized_keys {
                validate_ssh_key_line(k)?;
            }
        }
        if let Network::Static(s) = &self.network {
            s.validate()?;
        }
        if let Some(agent) = &self.agent {
            validate_agent(agent)?;
        }
        Ok(())
    }
}

/// The rendered files of a seed. `Debug` leaves out `agent.json` (it holds the token).
#[derive(Clone)]
pub struct SeedFiles {
    /// `user-data` (`#cloud-config`).
    pub user_data: String,
    /// `meta-data`.
    pub meta_data: String,
    /// `network-config` (v2).
    pub network_config: String,
    agent_json: Option<Secret>,
}

impl SeedFiles {
    /// The `imagectl/agent.json` text, if the seed has one. It contains the runner token.
    pub fn agent_json(&self) -> Option<&str> {
        self.agent_json.as_ref().map(Secret::expose)
    }
}

impl std::fmt::Debug for SeedFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeedFiles")
            .field("user_data", &self.user_data)
            .field("meta_data", &self.meta_data)
            .field("network_config", &self.network_config)
            .field("agent_json", &self.agent_json.as_ref().map(|_| "***"))
            .finish()
    }
}

/// What [`write_iso`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SeedInfo {
    /// Path of the ISO.
    pub path: PathBuf,
    /// SHA-256 of the ISO, hex.
    pub sha256: String,
    /// The instance id in meta-data.
    pub instance_id: String,
    /// Whether `imagectl/agent.json` is on the seed.
    pub agent: bool,
}

/// `iid-<host>-<8 random hex>`: unique per call.
pub fn generate_instance_id(hostname: &str) -> String {
    let short = hostname.split('.').next().unwrap_or(hostname);
    let rand = uuid::Uuid::new_v4().simple().to_string();
    format!("iid-{short}-{}", &rand[..8])
}

/// A host name: dot-separated DNS labels of `[a-z0-9-]`, 1–63 chars each, no leading or trailing
/// `-`, at most 253 chars in all.
pub fn validate_hostname(name: &str) -> Result<()> {
    let bad = |why: &str| input(format!("invalid hostname {name:?}: {why}"));
    if name.is_empty() || name.len() > 253 {
        return Err(bad("must be 1 to 253 characters"));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(bad("each dot-separated label must be 1 to 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(bad("use only lowercase letters, digits and '-'"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad("a label may not start or end with '-'"));
        }
    }
    Ok(())
}

/// An instance id: 1–128 chars of `[A-Za-z0-9._-]`.
pub fn validate_instance_id(id: &str) -> Result<()> {
    if id.is_empty()
        || id.len() > 128
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(input(format!(
            "invalid instance id {id:?}: use 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', '-'"
        )));
    }
    Ok(())
}

fn validate_user_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !ok || name == "root" {
        return Err(input(format!(
            "invalid admin user name {name:?}: use a lowercase POSIX user name other than root"
        )));
    }
    Ok(())
}

const SSH_KEY_TYPES: &[&str] = &["ssh-", "ecdsa-sha2-", "sk-ssh-", "sk-ecdsa-"];

fn validate_ssh_key_line(line: &str) -> Result<()> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let ok = fields.windows(2).any(|w| {
        SSH_KEY_TYPES.iter().any(|t| w[0].starts_with(t))
            && w[1].len() >= 16
            && w[1]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
    });
    if !ok || line.contains('\n') {
        return Err(input(
            "an SSH key line is not an OpenSSH public key (expected e.g. 'ssh-ed25519 AAAA… comment')",
        ));
    }
    Ok(())
}

/// Public keys from an `authorized_keys`-style text: one per line, `#` comments and blanks skipped.
/// Private keys are refused.
pub fn parse_ssh_keys(text: &str) -> Result<Vec<String>> {
    if text.contains("PRIVATE KEY") {
        return Err(input(
            "this looks like a private SSH key; pass the public key (.pub) instead",
        ));
    }
    let keys: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    for k in &keys {
        validate_ssh_key_line(k)?;
    }
    if keys.is_empty() {
        return Err(input("no SSH public key found"));
    }
    Ok(keys)
}

fn parse_cidr(s: &str) -> Result<IpAddr> {
    let bad = || {
        input(format!(
            "invalid address {s:?}: expected ADDRESS/PREFIX, e.g. 192.0.2.10/24"
        ))
    };
    let (addr, prefix) = s.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if prefix == 0 || prefix > max {
        return Err(bad());
    }
    Ok(addr)
}

fn validate_agent(agent: &AgentSeed) -> Result<()> {
    if agent.version != 1 {
        bail!("agent seed version {} is not supported", agent.version);
    }
    let url = agent.gitlab_url.as_str();
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"));
    match rest {
        Some(host) if !host.is_empty() && !host.contains(char::is_whitespace) => {}
        _ => {
            return Err(input(format!(
                "invalid GitLab URL {url:?}: expected http(s)://host[:port][/path]"
            )))
        }
    }
    if url.trim_end_matches('/').ends_with("/api/v4") {
        return Err(input(format!(
            "GitLab URL {url:?} should be the base URL, without /api/v4"
        )));
    }
    let token = agent.runner_token.expose();
    if token.is_empty() {
        return Err(input("the runner token is empty"));
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(input("the runner token contains whitespace"));
    }
    if agent.runner_id == 0 {
        return Err(input("the runner id must be a positive number"));
    }
    if agent.runner_name.trim().is_empty() {
        return Err(input("the runner name is empty"));
    }
    Ok(())
}

fn yaml_str(s: &str) -> Value {
    Value::String(s.to_string())
}

fn template_mapping(text: &str, what: &str) -> Mapping {
    match serde_yaml::from_str::<Value>(text) {
        Ok(Value::Mapping(m)) => m,
        _ => panic!("embedded template {what} is not a YAML mapping"),
    }
}

fn render_user_data(cfg: &SeedConfig) -> Result<String> {
    let mut doc = template_mapping(USER_DATA_TEMPLATE, "cloud-init/user-data.yaml");
    let short = cfg.hostname.split('.').next().unwrap_or(&cfg.hostname);
    doc.insert(yaml_str("hostname"), yaml_str(short));
    if cfg.hostname.contains('.') {
        doc.insert(yaml_str("fqdn"), yaml_str(&cfg.hostname));
    }
    if let Some(admin) = &cfg.admin {
        let mut user = Mapping::new();
        user.insert(yaml_str("name"), yaml_str(&admin.name));
        user.insert(yaml_str("gecos"), yaml_str("imagectl admin"));
        user.insert(yaml_str("groups"), yaml_str("sudo"));
        user.insert(yaml_str("shell"), yaml_str("/bin/bash"));
        user.insert(yaml_str("sudo"), yaml_str("ALL=(ALL) NOPASSWD:ALL"));
        user.insert(yaml_str("lock_passwd"), Value::Bool(true));
        user.insert(
            yaml_str("ssh_authorized_keys"),
            Value::Sequence(
                admin
                    .ssh_authorized_keys
                    .iter()
                    .map(|k| yaml_str(k))
                    .collect(),
            ),
        );
        doc.insert(
            yaml_str("users"),
            Value::Sequence(vec![Value::Mapping(user)]),
        );
    }
    let body = serde_yaml::to_string(&Value::Mapping(doc)).context("rendering user-data")?;
    Ok(format!(
        "#cloud-config\n# Written by imagectl {}. Holds no secrets.\n{body}",
        env!("CARGO_PKG_VERSION")
    ))
}

fn render_network(net: &Network) -> Result<String> {
    let s = match net {
        Network::Dhcp => return Ok(NETWORK_DHCP.to_string()),
        Network::Static(s) => s,
    };
    let mut doc = template_mapping(
        NETWORK_STATIC_TEMPLATE,
        "cloud-init/network-config-static.yaml",
    );
    let eth = doc
        .get_mut("ethernets")
        .and_then(|e| e.get_mut("eth0"))
        .and_then(Value::as_mapping_mut)
        .expect("static network template has ethernets.eth0");
    eth.insert(
        yaml_str("addresses"),
        Value::Sequence(vec![yaml_str(&s.address)]),
    );
    let routes = match s.gateway {
        Some(gw) => {
            let mut r = Mapping::new();
            let to = if gw.is_ipv4() { "0.0.0.0/0" } else { "::/0" };
            r.insert(yaml_str("to"), yaml_str(to));
            r.insert(yaml_str("via"), yaml_str(&gw.to_string()));
            vec![Value::Mapping(r)]
        }
        None => Vec::new(),
    };
    eth.insert(yaml_str("routes"), Value::Sequence(routes));
    let mut ns = Mapping::new();
    ns.insert(
        yaml_str("addresses"),
        Value::Sequence(s.dns.iter().map(|d| yaml_str(&d.to_string())).collect()),
    );
    eth.insert(yaml_str("nameservers"), Value::Mapping(ns));
    let body = serde_yaml::to_string(&Value::Mapping(doc)).context("rendering network-config")?;
    Ok(format!("# Written by imagectl (static address).\n{body}"))
}

/// Renders the seed's files. Validates the config first.
pub fn render(cfg: &SeedConfig) -> Result<SeedFiles> {
    cfg.validate()?;
    let meta_data = format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        cfg.instance_id, cfg.hostname
    );
    let agent_json = match &cfg.agent {
        Some(a) => {
            let mut j = serde_json::to_string_pretty(a).context("serialising agent.json")?;
            j.push('\n');
            Some(Secret::new(j))
        }
        None => None,
    };
    Ok(SeedFiles {
        user_data: render_user_data(cfg)?,
        meta_data,
        network_config: render_network(&cfg.network)?,
        agent_json,
    })
}

/// `SOURCE_DATE_EPOCH` from the environment, or [`DEFAULT_SOURCE_DATE_EPOCH`].
pub fn source_date_epoch() -> Result<i64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| {
                input(format!(
                    "SOURCE_DATE_EPOCH={v:?} is not a number of seconds since 1970"
                ))
            }),
        _ => Ok(DEFAULT_SOURCE_DATE_EPOCH),
    }
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes the seed ISO to `out` (mode 0600, replaced atomically) and returns its hash.
pub fn write_iso(cfg: &SeedConfig, out: &Path) -> Result<SeedInfo> {
    let files = render(cfg)?;
    let epoch = source_date_epoch()?;
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(input(format!(
            "output directory {} does not exist",
            dir.display()
        )));
    }

    let staging = tempfile::Builder::new()
        .prefix("imagectl-seed-")
        .tempdir()
        .context("creating seed staging directory")?;
    std::fs::set_permissions(staging.path(), Permissions::from_mode(0o700))
        .context("restricting seed staging directory")?;
    let root = staging.path().join("root");
    std::fs::create_dir(&root).context("creating seed staging root")?;
    write_file(&root.join("user-data"), files.user_data.as_bytes(), 0o600)?;
    write_file(&root.join("meta-data"), files.meta_data.as_bytes(), 0o600)?;
    write_file(
        &root.join("network-config"),
        files.network_config.as_bytes(),
        0o600,
    )?;
    if let Some(agent) = files.agent_json() {
        let p = root.join(SEED_AGENT_PATH);
        std::fs::create_dir(p.parent().expect("agent path has a parent"))
            .context("creating seed imagectl directory")?;
        write_file(&p, agent.as_bytes(), 0o600)?;
    }

    let iso = staging.path().join("seed.iso");
    let date = format!("={epoch}");
    let mut cmd = Command::new("xorriso");
    cmd.env("SOURCE_DATE_EPOCH", epoch.to_string())
        .args(["-no_rc", "-report_about", "SORRY", "-abort_on", "FAILURE"])
        .arg("-outdev")
        .arg(format!("stdio:{}", iso.display()))
        .args(["-volid", SEED_LABEL, "-joliet", "on", "-rockridge", "on"])
        .arg("-map")
        .arg(&root)
        .arg("/")
        .args(["-find", "/", "-type", "f", "-exec", "chmod", "0444", "--"])
        .args(["-find", "/", "-type", "d", "-exec", "chmod", "0555", "--"]);
    if files.agent_json.is_some() {
        cmd.args(["-chmod", "0400", &format!("/{SEED_AGENT_PATH}"), "--"]);
    }
    cmd.args(["-chown_r", "0", "/", "--", "-chgrp_r", "0", "/", "--"])
        .args(["-alter_date_r", "b-c", &date, "/", "--"])
        .args(["-alter_date_r", "c", &date, "/", "--"])
        .arg("-commit");
    crate::util::run(&mut cmd).context("packing seed ISO with xorriso")?;

    let sha256 = crate::util::sha256_file(&iso)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".imagectl-seed-")
        .tempfile_in(dir)
        .with_context(|| format!("creating temporary file in {}", dir.display()))?;
    let mut src = std::fs::File::open(&iso).context("opening packed seed ISO")?;
    std::io::copy(&mut src, tmp.as_file_mut())
        .with_context(|| format!("writing {}", out.display()))?;
    tmp.as_file()
        .set_permissions(Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", out.display()))?;
    tmp.persist(out)
        .with_context(|| format!("moving seed ISO into place at {}", out.display()))?;
    staging.close().context("removing seed staging directory")?;

    tracing::debug!(
        "wrote seed {} (instance-id {}, agent.json: {})",
        out.display(),
        cfg.instance_id,
        cfg.agent.is_some()
    );
    Ok(SeedInfo {
        path: out.to_path_buf(),
        sha256,
        instance_id: cfg.instance_id.clone(),
        agent: cfg.agent.is_some(),
    })
}

#[cfg(test)]
mod tests;
