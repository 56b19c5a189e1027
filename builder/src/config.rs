//! Settings from `imagectl.toml`, the environment and flags (flags > env > file).
//!
//! The file is found at `--config FILE`, else `$IMAGECTL_CONFIG`, else `./imagectl.toml`, else
//! `$XDG_CONFIG_HOME/imagectl/imagectl.toml` (`~/.config/…`). Sections: `[proxmox]` (the API and
//! its trust), `[publish]` (template defaults); `[gitlab]` and `[fleet.NAME]` are reserved for the
//! fleet commands and accepted as-is until those read them. Unknown keys are errors (typos).
//! The reference is `docs/configuration.md`.

use crate::error::input;
use crate::remote::pve::{ApiToken, ClientOptions, Fingerprint, Trust};
use anyhow::{Context, Result};
use imagectl_proto::Secret;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Environment variable names.
pub mod env {
    /// `https://HOST:8006`.
    pub const ENDPOINT: &str = "PROXMOX_VE_ENDPOINT";
    /// `USER@REALM!TOKENID=SECRET`.
    pub const API_TOKEN: &str = "PROXMOX_VE_API_TOKEN";
    /// SHA-256 fingerprint to pin.
    pub const FINGERPRINT: &str = "PROXMOX_VE_FINGERPRINT";
    /// CA certificate file.
    pub const CA_FILE: &str = "PROXMOX_VE_CA_FILE";
    /// Settings file.
    pub const CONFIG: &str = "IMAGECTL_CONFIG";
}

/// `imagectl.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// `[proxmox]`.
    #[serde(default)]
    pub proxmox: ProxmoxSection,
    /// `[publish]`.
    #[serde(default)]
    pub publish: PublishSection,
    /// `[gitlab]`: reserved for the fleet commands (kept unparsed here).
    #[serde(default)]
    pub gitlab: Option<toml::Table>,
    /// `[fleet.NAME]`: reserved for the fleet commands (kept unparsed here).
    #[serde(default)]
    pub fleet: BTreeMap<String, toml::Table>,
}

/// `[proxmox]`: how to reach and trust the PVE API.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxmoxSection {
    /// `https://HOST:8006`.
    pub endpoint: Option<String>,
    /// The API token itself (prefer `token_file` or the environment).
    pub token: Option<Secret>,
    /// A file holding the API token.
    pub token_file: Option<PathBuf>,
    /// SHA-256 fingerprint of the node certificate.
    pub fingerprint: Option<String>,
    /// CA file (the cluster's `pve-root-ca.pem`).
    pub ca_file: Option<PathBuf>,
    /// Default node for `publish`.
    pub node: Option<String>,
    /// VM ids imagectl may allocate, `"9000-9999"`.
    pub vmid_range: Option<String>,
    /// Attempts per request on retryable failures (default 5).
    pub retries: Option<u32>,
    /// Seconds per API request (default 60).
    pub request_timeout: Option<u64>,
    /// Seconds to wait for one task (default 3600).
    pub task_timeout: Option<u64>,
}

/// `[publish]`: defaults of `imagectl publish`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishSection {
    /// Storage for template disks (default `local-lvm`).
    pub storage: Option<String>,
    /// File storage with `import` content for the upload (default `local`).
    pub import_storage: Option<String>,
    /// Bridge of the template's NIC (default `vmbr0`).
    pub bridge: Option<String>,
    /// VLAN tag of the template's NIC.
    pub vlan: Option<u16>,
    /// Publish to every online node when the storage is not shared.
    pub all_nodes: Option<bool>,
    /// vCPUs of the template (default 2).
    pub cores: Option<u32>,
    /// Memory of the template in MiB (default 2048).
    pub memory: Option<u32>,
}

/// Flags shared by the commands that talk to PVE (`publish`, `images`, `gc`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ProxmoxFlags {
    /// Settings file (default: $IMAGECTL_CONFIG, ./imagectl.toml, $XDG_CONFIG_HOME/imagectl/imagectl.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// PVE API endpoint, https://HOST:8006 (env PROXMOX_VE_ENDPOINT).
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
    /// File holding the API token USER@REALM!TOKENID=SECRET (env PROXMOX_VE_API_TOKEN holds the token itself).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// SHA-256 fingerprint of the node certificate to pin, AB:CD:… (env PROXMOX_VE_FINGERPRINT).
    #[arg(long, value_name = "SHA256")]
    pub fingerprint: Option<String>,
    /// CA certificate to trust, e.g. the cluster's pve-root-ca.pem (env PROXMOX_VE_CA_FILE).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Do not verify the PVE certificate at all (warns on every run; labs only).
    #[arg(long)]
    pub insecure: bool,
    /// VM ids imagectl may allocate, e.g. 9000-9999 (default: PVE's /cluster/nextid).
    #[arg(long, value_name = "FIRST-LAST")]
    pub vmid_range: Option<String>,
    /// Seconds to wait for one PVE task (upload check, import, template) before giving up.
    #[arg(long, value_name = "SECS")]
    pub task_timeout: Option<u64>,
}

/// An inclusive VM id range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct VmidRange {
    /// First id.
    pub first: u32,
    /// Last id.
    pub last: u32,
}

impl VmidRange {
    /// Parses `FIRST-LAST` (PVE ids are 100 … 999999999).
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || {
            input(format!(
                "VM id range {s:?} is malformed: expected FIRST-LAST with 100 <= FIRST <= LAST <= 999999999, e.g. 9000-9999"
            ))
        };
        let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
        let first: u32 = a.trim().parse().map_err(|_| bad())?;
        let last: u32 = b.trim().parse().map_err(|_| bad())?;
        if first < 100 || last > 999_999_999 || first > last {
            return Err(bad());
        }
        Ok(Self { first, last })
    }

    /// True if `id` is in the range.
    pub fn contains(&self, id: u32) -> bool {
        (self.first..=self.last).contains(&id)
    }
}

/// Everything resolved for one command that talks to PVE.
#[derive(Debug, Clone)]
pub struct PveSettings {
    /// For [`crate::remote::pve::PveClient::new`].
    pub client: ClientOptions,
    /// Default node.
    pub node: Option<String>,
    /// VM id range.
    pub vmid_range: Option<VmidRange>,
    /// `[publish]` defaults.
    pub publish: PublishSection,
    /// The settings file read, if any.
    pub file: Option<PathBuf>,
}

/// Where the settings file is, if there is one. `--config` and `$IMAGECTL_CONFIG` must exist.
pub fn locate(
    flag: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<PathBuf>> {
    if let Some(p) = flag {
        return exists(p, "--config").map(Some);
    }
    if let Some(p) = env(env::CONFIG).filter(|s| !s.is_empty()) {
        return exists(Path::new(&p), "$IMAGECTL_CONFIG").map(Some);
    }
    let local = PathBuf::from("imagectl.toml");
    if local.is_file() {
        return Ok(Some(local));
    }
    let xdg = env("XDG_CONFIG_HOME")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| Path::new(&h).join(".config")));
    Ok(xdg
        .map(|d| d.join("imagectl").join("imagectl.toml"))
        .filter(|p| p.is_file()))
}

fn exists(p: &Path, what: &str) -> Result<PathBuf> {
    if p.is_file() {
        Ok(p.to_path_buf())
    } else {
        Err(input(format!(
            "{what}: settings file {} does not exist",
            p.display()
        )))
    }
}

impl ConfigFile {
    /// Reads and parses a settings file; a syntax error or unknown key is the user's (exit 2).
    pub fn read(path: &Path) -> Result<Self> {
        let text = fs_err::read_to_string(path)
            .with_context(|| format!("reading settings {}", path.display()))?;
        toml::from_str(&text).map_err(|e| input(format!("{}: {e}", path.display())))
    }
}

/// Resolves the PVE settings from flags, environment and file (flags > env > file).
pub fn resolve(flags: &ProxmoxFlags, env: &dyn Fn(&str) -> Option<String>) -> Result<PveSettings> {
    let file_path = locate(flags.config.as_deref(), env)?;
    let file = match &file_path {
        Some(p) => ConfigFile::read(p)?,
        None => ConfigFile::default(),
    };
    let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    let px = &file.proxmox;
    let source = file_path.as_ref().map_or_else(
        || "no settings file".to_string(),
        |p| p.display().to_string(),
    );

    let endpoint = flags
        .endpoint
        .clone()
        .or_else(|| env(env::ENDPOINT))
        .or_else(|| px.endpoint.clone())
        .ok_or_else(|| {
            input(format!(
                "no PVE endpoint: set PROXMOX_VE_ENDPOINT=https://HOST:8006, pass --endpoint, or \
                 set [proxmox] endpoint in imagectl.toml ({source})"
            ))
        })?;

    let token_text = if let Some(p) = &flags.token_file {
        read_token_file(p)?
    } else if let Some(t) = env(env::API_TOKEN) {
        Secret::new(t)
    } else if let Some(p) = &px.token_file {
        read_token_file(p)?
    } else if let Some(t) = px.token.clone().filter(|t| !t.is_empty()) {
        if let Some(p) = &file_path {
            warn_if_readable(p);
        }
        t
    } else {
        return Err(input(format!(
            "no PVE API token: set PROXMOX_VE_API_TOKEN='USER@REALM!TOKENID=SECRET', pass \
             --token-file FILE, or set [proxmox] token_file in imagectl.toml ({source})"
        )));
    };
    let token = ApiToken::parse(token_text.expose()).map_err(input)?;

    let fingerprint = flags
        .fingerprint
        .clone()
        .or_else(|| env(env::FINGERPRINT))
        .or_else(|| px.fingerprint.clone());
    let ca_file = flags
        .ca_file
        .clone()
        .or_else(|| env(env::CA_FILE).map(PathBuf::from))
        .or_else(|| px.ca_file.clone());
    let trust = if flags.insecure {
        Trust::Insecure
    } else if let Some(fp) = fingerprint {
        Trust::Pin(Fingerprint::parse(&fp).map_err(input)?)
    } else if let Some(ca) = ca_file {
        if !ca.is_file() {
            return Err(input(format!("CA file {} does not exist", ca.display())));
        }
        Trust::CaFile(ca)
    } else {
        return Err(input(
            "no way to verify the PVE certificate: set PROXMOX_VE_FINGERPRINT (the node \
             certificate's SHA-256, see `pvenode cert info`) or PROXMOX_VE_CA_FILE (the cluster's \
             /etc/pve/pve-root-ca.pem); --insecure skips verification (labs only)",
        ));
    };

    let vmid_range = flags
        .vmid_range
        .as_deref()
        .or(px.vmid_range.as_deref())
        .map(VmidRange::parse)
        .transpose()?;
    let attempts = px.retries.unwrap_or(5).max(1);
    let task_timeout = flags.task_timeout.or(px.task_timeout).unwrap_or(3600);
    if task_timeout == 0 {
        return Err(input("the task timeout must be at least 1 second"));
    }
    Ok(PveSettings {
        client: ClientOptions {
            endpoint,
            token,
            trust,
            attempts,
            backoff: Duration::from_millis(500),
            request_timeout: Duration::from_secs(px.request_timeout.unwrap_or(60).max(1)),
            task_timeout: Duration::from_secs(task_timeout),
        },
        node: px.node.clone(),
        vmid_range,
        publish: file.publish.clone(),
        file: file_path,
    })
}

/// Resolves from the process environment.
pub fn resolve_from_env(flags: &ProxmoxFlags) -> Result<PveSettings> {
    resolve(flags, &|k| std::env::var(k).ok())
}

fn read_token_file(p: &Path) -> Result<Secret> {
    let text = fs_err::read_to_string(p)
        .with_context(|| format!("reading the API token file {}", p.display()))?;
    warn_if_readable(p);
    Ok(Secret::new(text.trim().to_string()))
}

fn warn_if_readable(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(p) {
        if m.permissions().mode() & 0o077 != 0 {
            eprintln!(
                "warning: {} holds the PVE API token but others can read it (chmod 600 it)",
                p.display()
            );
        }
    }
}

/// Checks an API token id `USER@REALM!TOKENID` against PVE's own grammar; the error says which
/// part is wrong without repeating the value.
///
/// The rules are pve-access-control's: `$user_regex = [^\s:/]+` and
/// `$realm_regex = [A-Za-z][A-Za-z0-9\.\-_]+` (`src/PVE/Auth/Plugin.pm`), a user id of 3 to 64
/// characters (`verify_username` there), and `$token_subid_regex = $realm_regex` inside
/// `$token_full_regex` (`src/PVE/AccessControl.pm`, used by `pve_verify_tokenid` and
/// `split_tokenid`). Because the realm and the token id hold neither `@` nor `!`, the last `!`
/// ends the user id and the last `@` in it starts the realm. `verify_token` there splits
/// `ID=SECRET` at the last `=`, which [`ApiToken::parse`] does too. One rule is ours: the id
/// travels in an HTTP header, so it must be ASCII.
pub fn check_token_id(id: &str) -> std::result::Result<(), String> {
    let realm_like = |s: &str| {
        let mut c = s.chars();
        c.next().is_some_and(|f| f.is_ascii_alphabetic())
            && s.len() >= 2
            && c.all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c))
    };
    let (userid, subid) = id
        .rsplit_once('!')
        .ok_or("it has no `!TOKENID` after the user")?;
    let (user, realm) = userid
        .rsplit_once('@')
        .ok_or("its user has no `@REALM` (PVE user ids are NAME@REALM)")?;
    if !id.is_ascii() {
        return Err("it is not ASCII (it is sent in an HTTP header)".into());
    }
    if user.is_empty() || user.contains(|c: char| c.is_ascii_whitespace() || ":/".contains(c)) {
        return Err("its user name is empty or holds whitespace, `:` or `/`".into());
    }
    if !(3..=64).contains(&userid.len()) {
        return Err("its user id NAME@REALM is not 3 to 64 characters long".into());
    }
    if !realm_like(realm) {
        return Err(
            "its realm is not a letter followed by at least one of A-Z a-z 0-9 . - _".into(),
        );
    }
    if !realm_like(subid) {
        return Err(
            "its token id (after `!`) is not a letter followed by at least one of A-Z a-z 0-9 . - _"
                .into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids_follow_pve_access_control() {
        for ok in [
            "imagectl@pve!ci",
            "ci+bot@pve!ci",
            "ci=bot@pve!ci",
            "a.b-c_d@pam!t1",
            "first.last@example.com@ad-corp!ci-2",
            "x@pve!ab",
            "runner!x@pve!ci",
        ] {
            assert_eq!(check_token_id(ok), Ok(()), "{ok}");
        }
        for bad in [
            "imagectl@pve",
            "imagectl!ci",
            "@pve!ci",
            "a b@pve!ci",
            "a:b@pve!ci",
            "a/b@pve!ci",
            "x@1pve!ci",
            "x@p!ci",
            "x@pve!c",
            "x@pve!1ci",
            "x@pve!c+i",
            "é@pve!ci",
            "x@pve!",
        ] {
            assert!(check_token_id(bad).is_err(), "{bad}");
        }
        let long = format!("{}@pve!ci", "u".repeat(61));
        assert!(check_token_id(&long).is_err());
        assert_eq!(
            check_token_id(&format!("{}@pve!ci", "u".repeat(60))),
            Ok(())
        );
    }
    use std::collections::HashMap;

    const TOKEN: &str = "imagectl@pve!ci=6f1e2d3c-aaaa-bbbb-cccc-000000000001";

    fn fp(b: &str) -> String {
        vec![b; 32].join(":")
    }

    fn run(flags: &ProxmoxFlags, vars: &[(&str, String)]) -> Result<PveSettings> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        resolve(flags, &move |k| map.get(k).cloned())
    }

    #[test]
    fn flags_beat_env_and_env_beats_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("imagectl.toml");
        std::fs::write(
            &cfg,
            format!(
                "[proxmox]\nendpoint = \"https://file:8006\"\nfingerprint = \"{}\"\nvmid_range = \"9000-9099\"\n\
                 node = \"pve2\"\n[publish]\nstorage = \"ceph-vm\"\n[gitlab]\nurl = \"x\"\n[fleet.ci]\ncount = 3\n",
                fp("AA")
            ),
        )
        .unwrap();
        let flags = ProxmoxFlags {
            config: Some(cfg.clone()),
            ..Default::default()
        };
        let s = run(&flags, &[(env::API_TOKEN, TOKEN.into())]).unwrap();
        assert_eq!(s.client.endpoint, "https://file:8006");
        assert_eq!(s.client.trust, Trust::Pin(Fingerprint([0xaa; 32])));
        assert_eq!(
            s.vmid_range,
            Some(VmidRange {
                first: 9000,
                last: 9099
            })
        );
        assert_eq!(s.publish.storage.as_deref(), Some("ceph-vm"));
        let vars = [
            (env::API_TOKEN, TOKEN.to_string()),
            (env::ENDPOINT, "https://env:8006".to_string()),
            (env::FINGERPRINT, fp("BB")),
        ];
        let s = run(&flags, &vars).unwrap();
        assert_eq!(s.client.endpoint, "https://env:8006");
        assert_eq!(s.client.trust, Trust::Pin(Fingerprint([0xbb; 32])));
        let flags = ProxmoxFlags {
            endpoint: Some("https://flag:8006".into()),
            fingerprint: Some(fp("CC")),
            vmid_range: Some("200-300".into()),
            ..flags
        };
        let s = run(&flags, &vars).unwrap();
        assert_eq!(s.client.endpoint, "https://flag:8006");
        assert_eq!(s.client.trust, Trust::Pin(Fingerprint([0xcc; 32])));
        assert_eq!(
            s.vmid_range,
            Some(VmidRange {
                first: 200,
                last: 300
            })
        );
    }

    #[test]
    fn missing_or_bad_settings_are_input_errors_without_the_secret() {
        let none = ProxmoxFlags {
            config: None,
            ..Default::default()
        };
        let e = run(
            &none,
            &[
                (env::API_TOKEN, TOKEN.into()),
                ("HOME", "/nonexistent".into()),
            ],
        )
        .unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 2);
        assert!(e.to_string().contains("PROXMOX_VE_ENDPOINT"), "{e}");
        let base = [
            (env::ENDPOINT, "https://h:8006".to_string()),
            ("HOME", "/nonexistent".to_string()),
        ];
        let e = run(&none, &base).unwrap_err();
        assert!(e.to_string().contains("PROXMOX_VE_API_TOKEN"), "{e}");
        let mut v = base.to_vec();
        v.push((env::API_TOKEN, "imagectl@pve=topsecretvalue".into()));
        let e = run(&none, &v).unwrap_err();
        assert!(!format!("{e:#}").contains("topsecretvalue"));
        assert_eq!(crate::error::exit_code(&e), 2);
        let mut v = base.to_vec();
        v.push((env::API_TOKEN, TOKEN.into()));
        let e = run(&none, &v).unwrap_err();
        assert!(e.to_string().contains("PROXMOX_VE_FINGERPRINT"), "{e}");
        v.push((env::FINGERPRINT, "AB:CD".into()));
        let e = run(&none, &v).unwrap_err();
        assert!(
            e.to_string().contains("malformed certificate fingerprint"),
            "{e}"
        );
        assert_eq!(crate::error::exit_code(&e), 2);
        for bad in ["9999-9000", "50-60", "x-y", "9000"] {
            assert!(VmidRange::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_keys_in_the_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("c.toml");
        std::fs::write(&cfg, "[proxmox]\nendpont = \"https://x\"\n").unwrap();
        let e = ConfigFile::read(&cfg).unwrap_err();
        assert!(e.to_string().contains("endpont"), "{e}");
        assert_eq!(crate::error::exit_code(&e), 2);
    }
}
