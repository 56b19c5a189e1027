//! Loading a spec: YAML parsing with file:line:col errors, profiles, validation.
//!
//! A profile (`profiles/NAME.yaml` beside the spec, or a path) removes entries by name (or by
//! destination, for files) and adds new ones. Paths in a profile are relative to the profile file;
//! they are rewritten relative to the spec so that hashes do not depend on where the checkout is.

use super::{
    is_snapshot_timestamp, parse_size, AptRepository, Artifact, FileEntry, LocalPackage, Spec,
    Units,
};
use crate::error::input;
use anyhow::{Context, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// A loaded, validated spec with where it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The merged spec; relative paths are relative to `dir`.
    pub spec: Spec,
    /// The spec file.
    pub path: PathBuf,
    /// Its directory.
    pub dir: PathBuf,
    /// Profiles applied, in order (names as given).
    pub profiles: Vec<String>,
}

impl Loaded {
    /// Resolves a spec-relative path.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        self.dir.join(p)
    }

    /// The lock file that belongs to this spec and its profiles: `NAME.lock` beside `NAME.yaml`,
    /// or `NAME.PROFILE[+PROFILE].lock` when profiles change what gets installed.
    pub fn default_lock_path(&self) -> PathBuf {
        if self.profiles.is_empty() {
            return self.path.with_extension("lock");
        }
        let names: Vec<String> = self
            .profiles
            .iter()
            .map(|p| {
                Path::new(p)
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| p.clone())
            })
            .collect();
        self.path
            .with_extension(format!("{}.lock", names.join("+")))
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Profile {
    #[serde(default)]
    #[allow(dead_code)]
    description: String,
    #[serde(default)]
    remove: Removals,
    #[serde(default)]
    add: Additions,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Removals {
    #[serde(default)]
    packages: Vec<String>,
    #[serde(default)]
    apt_repositories: Vec<String>,
    #[serde(default)]
    local_packages: Vec<String>,
    #[serde(default)]
    artifacts: Vec<String>,
    #[serde(default)]
    files: Vec<String>,
    #[serde(default)]
    units: Units,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Additions {
    #[serde(default)]
    packages: Vec<String>,
    #[serde(default)]
    apt_repositories: Vec<AptRepository>,
    #[serde(default)]
    local_packages: Vec<LocalPackage>,
    #[serde(default)]
    artifacts: Vec<Artifact>,
    #[serde(default)]
    files: Vec<FileEntry>,
    #[serde(default)]
    units: Units,
}

/// Reads and parses YAML, turning errors into `file:line:col: message` input errors.
fn parse_yaml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = fs_err::read_to_string(path).map_err(|e| input(e.to_string()))?;
    serde_yaml::from_str(&text).map_err(|e| {
        let loc = e
            .location()
            .map(|l| format!(":{}:{}", l.line(), l.column()))
            .unwrap_or_default();
        input(format!("{}{loc}: {e}", path.display()))
    })
}

/// Loads a spec and applies profiles (names resolve to `profiles/NAME.yaml` beside the spec).
pub fn load(path: &Path, profiles: &[String]) -> Result<Loaded> {
    let mut spec: Spec = parse_yaml(path)?;
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    for name in profiles {
        let (ppath, rel_dir) = profile_path(&dir, name);
        if !ppath.is_file() {
            return Err(input(format!(
                "profile {name:?} not found (looked for {})",
                ppath.display()
            )));
        }
        let profile: Profile = parse_yaml(&ppath)?;
        apply(&mut spec, profile, &rel_dir)
            .with_context(|| format!("applying profile {}", ppath.display()))?;
    }
    let loaded = Loaded {
        spec,
        path: path.to_path_buf(),
        dir,
        profiles: profiles.to_vec(),
    };
    validate(&loaded).with_context(|| format!("validating {}", path.display()))?;
    Ok(loaded)
}

/// Where a profile lives, and its directory relative to the spec's.
fn profile_path(spec_dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    if name.ends_with(".yaml") || name.contains('/') {
        let p = PathBuf::from(name);
        let parent = p.parent().map(Path::to_path_buf).unwrap_or_default();
        // A path given on the command line is relative to the working directory; express it
        // relative to the spec when it lives below it, else keep it absolute.
        let abs_parent = std::path::absolute(&parent).unwrap_or(parent);
        let abs_spec = std::path::absolute(spec_dir).unwrap_or_else(|_| spec_dir.to_path_buf());
        let rel = abs_parent
            .strip_prefix(&abs_spec)
            .map(Path::to_path_buf)
            .unwrap_or(abs_parent);
        (p, rel)
    } else {
        let rel = PathBuf::from("profiles");
        (spec_dir.join(&rel).join(format!("{name}.yaml")), rel)
    }
}

fn apply(spec: &mut Spec, p: Profile, rel: &Path) -> Result<()> {
    let r = p.remove;
    remove_named(&mut spec.packages, &r.packages, |x| x.as_str(), "package")?;
    remove_named(
        &mut spec.apt_repositories,
        &r.apt_repositories,
        |x| &x.name,
        "apt repository",
    )?;
    remove_named(
        &mut spec.local_packages,
        &r.local_packages,
        |x| &x.name,
        "local package",
    )?;
    remove_named(&mut spec.artifacts, &r.artifacts, |x| &x.name, "artifact")?;
    remove_named(&mut spec.files, &r.files, |x| &x.dest, "file")?;
    remove_named(
        &mut spec.units.enable,
        &r.units.enable,
        |x| x.as_str(),
        "enabled unit",
    )?;
    remove_named(
        &mut spec.units.disable,
        &r.units.disable,
        |x| x.as_str(),
        "disabled unit",
    )?;
    remove_named(
        &mut spec.units.mask,
        &r.units.mask,
        |x| x.as_str(),
        "masked unit",
    )?;

    let a = p.add;
    spec.packages.extend(a.packages);
    for mut repo in a.apt_repositories {
        repo.key_file = repo.key_file.map(|k| rel.join(k));
        spec.apt_repositories.push(repo);
    }
    for mut lp in a.local_packages {
        lp.dir = rel.join(&lp.dir);
        spec.local_packages.push(lp);
    }
    spec.artifacts.extend(a.artifacts);
    for mut f in a.files {
        f.src = f.src.map(|s| rel.join(s));
        spec.files.push(f);
    }
    spec.units.enable.extend(a.units.enable);
    spec.units.disable.extend(a.units.disable);
    spec.units.mask.extend(a.units.mask);
    Ok(())
}

fn remove_named<T>(
    list: &mut Vec<T>,
    names: &[String],
    key: impl Fn(&T) -> &str,
    what: &str,
) -> Result<()> {
    for name in names {
        let before = list.len();
        list.retain(|x| key(x) != name);
        if list.len() == before {
            return Err(input(format!(
                "cannot remove {what} {name:?}: the spec has none"
            )));
        }
    }
    Ok(())
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 48
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.chars().all(|c| c.is_ascii_hexdigit())
}

fn check_mode(mode: &str, what: &str) -> Result<()> {
    if u32::from_str_radix(mode, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .is_none()
    {
        return Err(input(format!(
            "{what}: mode {mode:?} is not an octal mode like \"0644\""
        )));
    }
    Ok(())
}

fn check_dest(dest: &str, what: &str) -> Result<()> {
    if !dest.starts_with('/') || dest.split('/').any(|c| c == "..") || dest.ends_with('/') {
        return Err(input(format!(
            "{what}: dest {dest:?} must be an absolute file path without '..'"
        )));
    }
    if let Some(rule) = crate::bake::layer::hygiene_rule(dest.trim_start_matches('/')) {
        return Err(input(format!(
            "{what}: dest {dest:?} would break image hygiene ({rule} must not be baked into a golden image)"
        )));
    }
    if dest == "/etc/machine-id"
        || dest == "/usr/local/bin/imagectl-agent"
        || dest == crate::bake::IMAGE_PROM
        || dest == "/etc/imagectl/image.json"
    {
        return Err(input(format!(
            "{what}: dest {dest:?} is managed by imagectl"
        )));
    }
    Ok(())
}

fn validate(l: &Loaded) -> Result<()> {
    let s = &l.spec;
    if !is_name(&s.name) {
        return Err(input(format!(
            "name {:?}: use lowercase letters, digits and '-' (at most 48)",
            s.name
        )));
    }
    if s.version.is_empty()
        || !s
            .version
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
    {
        return Err(input(format!(
            "version {:?}: use letters, digits, '.' and '-'",
            s.version
        )));
    }
    if s.base.distribution != "debian" {
        return Err(input(format!(
            "base.distribution {:?}: only \"debian\" is supported",
            s.base.distribution
        )));
    }
    if !is_name(&s.base.suite) {
        return Err(input(format!(
            "base.suite {:?} is not a suite name",
            s.base.suite
        )));
    }
    if s.base.mirror != "host"
        && !s.base.mirror.starts_with("http")
        && !s.base.mirror.starts_with("file:")
    {
        return Err(input(format!(
            "base.mirror {:?}: give a URL or \"host\" (the build host's mirror)",
            s.base.mirror
        )));
    }
    if let Some(t) = &s.base.snapshot {
        if t != "auto" && !is_snapshot_timestamp(t) {
            return Err(input(format!(
                "base.snapshot {t:?}: give \"auto\" or a timestamp like \"20261122T000000Z\""
            )));
        }
    }
    if let Some(u) = &s.base.snapshot_url {
        if !u.starts_with("https://") && !u.starts_with("http://") && !u.starts_with("file:") {
            return Err(input(format!(
                "base.snapshot_url {u:?}: give an http(s) or file: URL"
            )));
        }
    }
    if let Some(k) = &s.base.key_file {
        if !l.resolve(k).is_file() {
            return Err(input(format!(
                "base.key_file {} not found",
                l.resolve(k).display()
            )));
        }
    }
    for p in &s.packages {
        if p.is_empty() || p.contains(|c: char| c.is_whitespace() || c == ',') {
            return Err(input(format!("package {p:?} is not a package name")));
        }
    }
    for r in &s.apt_repositories {
        let what = format!("apt repository {:?}", r.name);
        if r.url != "host" && !r.url.starts_with("http") {
            return Err(input(format!(
                "{what}: url {:?} is not a URL or \"host\"",
                r.url
            )));
        }
        let has_key = r.key_file.is_some() || r.key_url.is_some();
        if r.key_file.is_some() && r.key_url.is_some() {
            return Err(input(format!("{what}: give key_file or key_url, not both")));
        }
        match &r.key_fingerprint {
            Some(fp) if has_key && is_hex(&fp.replace(' ', ""), 40) => {}
            Some(_) if has_key => {
                return Err(input(format!(
                    "{what}: key_fingerprint must be the key's full 40-hex-digit fingerprint"
                )))
            }
            Some(_) => return Err(input(format!("{what}: key_fingerprint without key_file or key_url"))),
            None if has_key => {
                return Err(input(format!("{what}: key_file/key_url need key_fingerprint to pin the key")))
            }
            None if r.url != "host" => {
                return Err(input(format!(
                    "{what}: a repository outside the base mirror needs a signing key (key_url or key_file) and key_fingerprint"
                )))
            }
            None => {}
        }
        if let Some(k) = &r.key_file {
            if !l.resolve(k).is_file() {
                return Err(input(format!(
                    "{what}: key_file {} not found",
                    l.resolve(k).display()
                )));
            }
        }
    }
    for lp in &s.local_packages {
        let control = l.resolve(&lp.dir).join("DEBIAN/control");
        if !control.is_file() {
            return Err(input(format!(
                "local package {:?}: {} not found",
                lp.name,
                control.display()
            )));
        }
    }
    for a in &s.artifacts {
        let what = format!("artifact {:?}", a.name);
        if a.sha256.as_deref().is_some_and(|h| !is_hex(h, 64)) {
            return Err(input(format!("{what}: sha256 must be 64 hex digits")));
        }
        if !a.url.starts_with("https://")
            && !a.url.starts_with("http://")
            && !a.url.starts_with("file://")
        {
            return Err(input(format!(
                "{what}: url {:?} must be http(s) or file://",
                a.url
            )));
        }
        check_dest(&a.dest, &what)?;
        check_mode(&a.mode, &what)?;
    }
    for f in &s.files {
        let what = format!("file {:?}", f.dest);
        check_dest(&f.dest, &what)?;
        check_mode(&f.mode, &what)?;
        match (&f.src, &f.content) {
            (Some(src), None) => {
                if !l.resolve(src).is_file() {
                    return Err(input(format!(
                        "{what}: src {} not found",
                        l.resolve(src).display()
                    )));
                }
            }
            (None, Some(_)) => {}
            _ => {
                return Err(input(format!(
                    "{what}: give exactly one of src and content"
                )))
            }
        }
    }
    for u in s
        .units
        .enable
        .iter()
        .chain(&s.units.disable)
        .chain(&s.units.mask)
    {
        let ok = [
            ".service", ".timer", ".socket", ".path", ".target", ".mount",
        ]
        .iter()
        .any(|sfx| u.ends_with(sfx));
        if !ok || u.contains('/') {
            return Err(input(format!("unit {u:?} is not a systemd unit name")));
        }
    }
    for u in &s.users {
        if !is_name(&u.name) {
            return Err(input(format!("user {:?} is not a valid user name", u.name)));
        }
    }
    for g in &s.groups {
        if !is_name(&g.name) {
            return Err(input(format!(
                "group {:?} is not a valid group name",
                g.name
            )));
        }
    }
    match parse_size(&s.disk.size) {
        Some(n) if n >= 1 << 30 => {}
        _ => {
            return Err(input(format!(
                "disk.size {:?}: give a size of at least 1GiB, like \"4GiB\"",
                s.disk.size
            )))
        }
    }
    Ok(())
}
