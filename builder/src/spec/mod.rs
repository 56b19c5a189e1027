//! The image spec: what a golden image is made of.
//!
//! A spec is YAML (`image-specs/gitlab-runner.yaml`), parsed with `yaml_serde` and
//! `deny_unknown_fields`, optionally patched by profiles (`image-specs/profiles/NAME.yaml`), then
//! validated. Every parse or validation error names the file and, for YAML errors, line and column
//! (else the field path, e.g. `users[0].shell`), and carries an [`crate::InputError`] so the process
//! exits with code 2. The spec as written and each profile as written are validated before a
//! profile is applied; [`grammar`] holds the rules for fields that reach a shell, apt or GRUB.

pub mod grammar;
mod load;
pub mod lock;
mod validate;

pub use load::{load, Loaded};
pub use validate::check_version;

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// A whole image spec, after profiles were applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Image name: `[a-z0-9][a-z0-9-]*`, used in file names and Proxmox template names.
    pub name: String,
    /// Image version prefix; the build adds the date and an input hash.
    pub version: String,
    /// One line for humans.
    #[serde(default)]
    pub description: String,
    /// Base distribution.
    pub base: Base,
    /// Debian packages to install (names, optionally `name/suite`).
    #[serde(default)]
    pub packages: Vec<String>,
    /// Extra apt repositories.
    #[serde(default)]
    pub apt_repositories: Vec<AptRepository>,
    /// Package trees in the repository that are built into .deb files and installed.
    #[serde(default)]
    pub local_packages: Vec<LocalPackage>,
    /// Files fetched by URL and pinned by sha256.
    #[serde(default)]
    pub artifacts: Vec<Artifact>,
    /// Files copied into the image.
    #[serde(default)]
    pub files: Vec<FileEntry>,
    /// systemd units to enable, disable or mask.
    #[serde(default)]
    pub units: Units,
    /// Groups to create.
    #[serde(default)]
    pub groups: Vec<Group>,
    /// Users to create.
    #[serde(default)]
    pub users: Vec<User>,
    /// The in-VM agent baked into the image.
    #[serde(default)]
    pub agent: Agent,
    /// Disk layout and boot.
    #[serde(default)]
    pub disk: Disk,
    /// Kernel command line.
    #[serde(default = "default_cmdline")]
    pub kernel_cmdline: String,
}

fn default_cmdline() -> String {
    "console=tty0 console=ttyS0,115200n8 quiet".into()
}

/// The base distribution the root filesystem is bootstrapped from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Base {
    /// Only `debian` is supported.
    pub distribution: String,
    /// Suite (codename), e.g. `bookworm`.
    pub suite: String,
    /// Mirror URL, or `host` (the default) for the build host's own apt mirror.
    #[serde(default = "default_mirror")]
    pub mirror: String,
    /// Archive components.
    #[serde(default = "default_components")]
    pub components: Vec<String>,
    /// The snapshot archive to fall back on when a pinned version is no longer served: `auto`
    /// (the lock records the time it was resolved) or a timestamp `YYYYMMDDTHHMMSSZ` (resolve
    /// against that snapshot instead of the mirror).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Base URL of the snapshot archive, laid out as `<url>/archive/<archive>/<timestamp>/`
    /// (default: Debian's snapshot archive; point it at a local mirror of that layout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_url: Option<String>,
    /// Signing key of the mirror and the snapshot archive (armored or binary OpenPGP), relative to
    /// the spec; default: the build host's trusted apt keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

/// Debian's snapshot archive.
pub const DEFAULT_SNAPSHOT_URL: &str = "https://snapshot.debian.org";

impl Base {
    /// The snapshot archive's base URL, without a trailing slash.
    pub fn snapshot_base(&self) -> String {
        self.snapshot_url
            .as_deref()
            .unwrap_or(DEFAULT_SNAPSHOT_URL)
            .trim_end_matches('/')
            .to_string()
    }

    /// The snapshot to fall back on for pins the mirror no longer serves: with `auto`, the
    /// timestamp the lock recorded, as (base URL, timestamp). A fixed snapshot is the mirror
    /// itself, so there is nothing to fall back on.
    pub fn fallback_snapshot(&self, locked: Option<&str>) -> Option<(String, String)> {
        match (self.snapshot.as_deref(), locked) {
            (Some("auto"), Some(ts)) => Some((self.snapshot_base(), ts.to_string())),
            _ => None,
        }
    }

    /// The fixed snapshot timestamp, when the spec names one (not `auto`).
    pub fn fixed_snapshot(&self) -> Option<&str> {
        self.snapshot.as_deref().filter(|s| *s != "auto")
    }
}

/// Whether `s` is a snapshot timestamp `YYYYMMDDTHHMMSSZ`.
pub fn is_snapshot_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 16
        && b[8] == b'T'
        && b[15] == b'Z'
        && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit)
}

/// The snapshot timestamp of a Unix time.
pub fn snapshot_timestamp(epoch: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(epoch)
        .map(|t| {
            format!(
                "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        })
        .unwrap_or_else(|_| "19700101T000000Z".into())
}

fn default_mirror() -> String {
    "host".into()
}
fn default_components() -> Vec<String> {
    vec!["main".into()]
}

/// An extra apt repository.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AptRepository {
    /// Name, used by profiles to remove or replace it.
    pub name: String,
    /// Repository URL, or `host` for the build host's Debian mirror (e.g. an older suite).
    pub url: String,
    /// Suite.
    pub suite: String,
    /// Components.
    #[serde(default = "default_components")]
    pub components: Vec<String>,
    /// Signing key (armored or binary OpenPGP), relative to the spec file. Omit for repositories
    /// signed by the base distribution's archive key.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Where to fetch the signing key when no `key_file` is given; it is checked against
    /// `key_fingerprint` before use.
    #[serde(default)]
    pub key_url: Option<String>,
    /// Full fingerprint the key file must have (40 hex digits); required with `key_file`.
    #[serde(default)]
    pub key_fingerprint: Option<String>,
    /// Packages to take from this repository (`name/suite`); all others prefer the base suite.
    #[serde(default)]
    pub packages: Vec<String>,
}

/// A package tree (`DEBIAN/control` + files) built with `dpkg-deb` and installed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalPackage {
    /// Name, used by profiles.
    pub name: String,
    /// Directory of the package tree, relative to the spec file.
    pub dir: PathBuf,
}

/// A file fetched by URL, pinned by sha256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// Name, used by profiles and the lock.
    pub name: String,
    /// Where to fetch it (https).
    pub url: String,
    /// The publisher's sha256 (64 hex digits), when it publishes one: the download must match it.
    /// Without it, `--refresh-lock` records the sha256 of the first download in the lock (trust on
    /// first use) and later builds verify against the lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Absolute destination path in the image.
    pub dest: String,
    /// Octal mode, e.g. `"0755"`.
    #[serde(default = "default_mode")]
    pub mode: String,
}

fn default_mode() -> String {
    "0644".into()
}

/// A file copied into the image, from a path or inline content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Source file, relative to the spec file (exclusive with `content`).
    #[serde(default)]
    pub src: Option<PathBuf>,
    /// Inline content (exclusive with `src`).
    #[serde(default)]
    pub content: Option<String>,
    /// Absolute destination path in the image.
    pub dest: String,
    /// Octal mode.
    #[serde(default = "default_mode")]
    pub mode: String,
}

/// systemd unit states set in the image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Units {
    /// Units to enable (their `[Install] WantedBy=` decides where).
    #[serde(default)]
    pub enable: Vec<String>,
    /// Units to disable (remove their `.wants` links).
    #[serde(default)]
    pub disable: Vec<String>,
    /// Units to mask.
    #[serde(default)]
    pub mask: Vec<String>,
}

/// A group created in the image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// Group name.
    pub name: String,
    /// A system group (gid below 1000).
    #[serde(default = "yes")]
    pub system: bool,
}

/// A user created in the image (locked password; log in with keys from cloud-init).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// User name.
    pub name: String,
    /// Supplementary groups.
    #[serde(default)]
    pub groups: Vec<String>,
    /// A system user.
    #[serde(default = "yes")]
    pub system: bool,
    /// Login shell.
    #[serde(default = "default_shell")]
    pub shell: String,
}

fn yes() -> bool {
    true
}
fn default_shell() -> String {
    "/usr/sbin/nologin".into()
}

/// Where the agent binary comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    /// Path to an `imagectl-agent` binary, relative to the spec; default: the one installed next
    /// to `imagectl`.
    #[serde(default)]
    pub binary: Option<PathBuf>,
    /// The unit file, relative to the spec.
    #[serde(default)]
    pub unit: Option<PathBuf>,
}

/// Disk size and boot mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// Virtual disk size, e.g. `4GiB` (the qcow2 is sparse; VMs can grow it).
    #[serde(default = "default_size")]
    pub size: String,
    /// `hybrid` (BIOS and UEFI), `bios` or `uefi`.
    #[serde(default)]
    pub boot: BootMode,
}

impl Default for Disk {
    fn default() -> Self {
        Self {
            size: default_size(),
            boot: BootMode::Hybrid,
        }
    }
}

fn default_size() -> String {
    "4GiB".into()
}

/// How the image boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BootMode {
    /// BIOS (bios_grub partition) and UEFI (ESP).
    #[default]
    Hybrid,
    /// BIOS only.
    Bios,
    /// UEFI only.
    Uefi,
}

impl BootMode {
    /// Firmware kinds this image boots with.
    pub fn firmwares(self) -> Vec<&'static str> {
        match self {
            BootMode::Hybrid => vec!["bios", "uefi"],
            BootMode::Bios => vec!["bios"],
            BootMode::Uefi => vec!["uefi"],
        }
    }
}

/// Parses a size like `4GiB`, `512MiB`, `2G` or a byte count.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_timestamps() {
        assert!(is_snapshot_timestamp("20261122T000000Z"));
        assert!(!is_snapshot_timestamp("20261122T000000"));
        assert!(!is_snapshot_timestamp("2026112xT000000Z"));
        assert!(!is_snapshot_timestamp("auto"));
        assert_eq!(snapshot_timestamp(1_795_440_370), "20261123T132610Z");
        assert!(is_snapshot_timestamp(&snapshot_timestamp(0)));
    }

    #[test]
    fn only_auto_falls_back_to_the_locked_snapshot() {
        let mut b = Base {
            distribution: "debian".into(),
            suite: "bookworm".into(),
            mirror: "host".into(),
            components: vec!["main".into()],
            snapshot: Some("auto".into()),
            snapshot_url: Some("http://127.0.0.1:1/".into()),
            key_file: None,
        };
        assert_eq!(
            b.fallback_snapshot(Some("20261122T000000Z")),
            Some(("http://127.0.0.1:1".into(), "20261122T000000Z".into()))
        );
        assert_eq!(b.fallback_snapshot(None), None);
        b.snapshot = Some("20261122T000000Z".into());
        assert_eq!(b.fallback_snapshot(Some("20261122T000000Z")), None);
        b.snapshot = None;
        assert_eq!(b.fallback_snapshot(Some("20261122T000000Z")), None);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4GiB"), Some(4 << 30));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("4 parsecs"), None);
        assert_eq!(parse_size("GiB"), None);
    }
}
