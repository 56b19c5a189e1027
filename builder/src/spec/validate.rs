//! Validating a spec (and what a profile adds): every field against its grammar
//! ([`super::grammar`]), every path against the spec's tree. Errors name the field path
//! (`users[0].shell`) and carry an [`crate::InputError`] (exit 2).

use super::grammar::{self, check_confined, is_account_name, is_url};
use super::{is_snapshot_timestamp, parse_size, AptRepository, Artifact, FileEntry, LocalPackage};
use super::{Loaded, Units};
use crate::error::input;
use anyhow::Result;
use std::path::Path;

/// URL schemes of a mirror or repository. Plain http stays allowed because apt checks the signed
/// Release file: the base mirror against the host's archive keys or `base.key_file`, an extra
/// repository against its pinned `key_fingerprint` (required for every repository but `host`).
const APT_SCHEMES: &[&str] = &["https://", "http://", "file:"];

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

/// The rule of a version: letters, digits, `.` and `-` (the spec's `version` and `build
/// --version`).
pub fn check_version(v: &str, what: &str) -> Result<()> {
    if v.is_empty()
        || v.len() > 64
        || v.starts_with(['.', '-'])
        || !v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
    {
        return Err(input(format!(
            "{what} {v:?}: use letters, digits, '.' and '-'"
        )));
    }
    Ok(())
}

fn check_mode(mode: &str, what: &str) -> Result<()> {
    if u32::from_str_radix(mode, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .is_none()
    {
        return Err(input(format!(
            "{what}.mode {mode:?} is not an octal mode like \"0644\""
        )));
    }
    Ok(())
}

/// A destination in the image: absolute, no `..`; after normalising (`//`, `.`, trailing `/`) not
/// a path the hygiene guard drops nor one imagectl manages.
fn check_dest(dest: &str, what: &str) -> Result<()> {
    let Some(norm) = grammar::normalize_dest(dest) else {
        return Err(input(format!(
            "{what}.dest {dest:?} must be an absolute file path without '..'"
        )));
    };
    if let Some(rule) = crate::bake::layer::hygiene_rule(norm.trim_start_matches('/')) {
        return Err(input(format!(
            "{what}.dest {dest:?} would break image hygiene ({rule} must not be baked into a golden image)"
        )));
    }
    if norm == "/etc/machine-id"
        || norm == "/usr/local/bin/imagectl-agent"
        || norm == crate::bake::IMAGE_PROM
        || norm == "/etc/imagectl/image.json"
    {
        return Err(input(format!(
            "{what}.dest {dest:?} is managed by imagectl"
        )));
    }
    Ok(())
}

/// A package request (see [`grammar::is_package`]).
pub fn check_package(p: &str, what: &str) -> Result<()> {
    if !grammar::is_package(p) {
        return Err(input(format!(
            "{what} {p:?} is not a package name: give a Debian package name ([a-z0-9][a-z0-9+.-]+), \
             optionally =VERSION or /SUITE; no options, paths or patterns"
        )));
    }
    Ok(())
}

/// An extra apt repository.
pub fn check_repository(l: &Loaded, r: &AptRepository, what: &str) -> Result<()> {
    if !is_name(&r.name) {
        return Err(input(format!(
            "{what}.name {:?}: use lowercase letters, digits and '-'",
            r.name
        )));
    }
    if r.url != "host" && !is_url(&r.url, APT_SCHEMES) {
        return Err(input(format!(
            "{what}.url {:?} is not a URL (https://, http:// or file:, no spaces) or \"host\"",
            r.url
        )));
    }
    if !grammar::is_suite(&r.suite) {
        return Err(input(format!(
            "{what}.suite {:?} is not a suite name",
            r.suite
        )));
    }
    for (i, c) in r.components.iter().enumerate() {
        if !grammar::is_component(c) {
            return Err(input(format!(
                "{what}.components[{i}] {c:?} is not a component name"
            )));
        }
    }
    for (i, p) in r.packages.iter().enumerate() {
        check_package(p, &format!("{what}.packages[{i}]"))?;
    }
    if let Some(u) = &r.key_url {
        if !is_url(u, &["https://", "http://", "file:"]) {
            return Err(input(format!("{what}.key_url {u:?} is not a URL")));
        }
    }
    let has_key = r.key_file.is_some() || r.key_url.is_some();
    if r.key_file.is_some() && r.key_url.is_some() {
        return Err(input(format!("{what}: give key_file or key_url, not both")));
    }
    match &r.key_fingerprint {
        Some(fp) if has_key && is_hex(&fp.replace(' ', ""), 40) => {}
        Some(_) if has_key => {
            return Err(input(format!(
                "{what}.key_fingerprint must be the key's full 40-hex-digit fingerprint"
            )))
        }
        Some(_) => {
            return Err(input(format!(
                "{what}: key_fingerprint without key_file or key_url"
            )))
        }
        None if has_key => {
            return Err(input(format!(
                "{what}: key_file/key_url need key_fingerprint to pin the key"
            )))
        }
        None if r.url != "host" => {
            return Err(input(format!(
                "{what} {:?}: a repository outside the base mirror needs a signing key (key_url or key_file) and key_fingerprint",
                r.name
            )))
        }
        None => {}
    }
    if let Some(k) = &r.key_file {
        if !l.resolve(k).is_file() {
            return Err(input(format!(
                "{what}.key_file {} not found",
                l.resolve(k).display()
            )));
        }
    }
    Ok(())
}

/// A local package tree inside the spec's repository.
pub fn check_local_package(l: &Loaded, lp: &LocalPackage, what: &str) -> Result<()> {
    if !is_name(&lp.name) {
        return Err(input(format!(
            "{what}.name {:?}: use lowercase letters, digits and '-'",
            lp.name
        )));
    }
    let control = l.resolve(&lp.dir).join("DEBIAN/control");
    if !control.is_file() {
        return Err(input(format!(
            "local package {:?}: {} not found",
            lp.name,
            control.display()
        )));
    }
    let root = grammar::confinement_root(&l.dir)?;
    check_confined(&l.resolve(&lp.dir), &root, &format!("{what}.dir"))
}

/// An artifact.
pub fn check_artifact(a: &Artifact, what: &str) -> Result<()> {
    if !is_name(&a.name) {
        return Err(input(format!(
            "{what}.name {:?}: use lowercase letters, digits and '-'",
            a.name
        )));
    }
    if a.sha256.as_deref().is_some_and(|h| !is_hex(h, 64)) {
        return Err(input(format!(
            "{what} {:?}: sha256 must be 64 hex digits",
            a.name
        )));
    }
    if !is_url(&a.url, &["https://", "http://", "file://"]) {
        return Err(input(format!(
            "{what}.url {:?} must be http(s) or file://",
            a.url
        )));
    }
    check_dest(&a.dest, what)?;
    check_mode(&a.mode, what)
}

/// A file: its source inside the spec's repository (symlinks resolved), or inline content.
pub fn check_file(l: &Loaded, f: &FileEntry, what: &str) -> Result<()> {
    check_dest(&f.dest, what)?;
    check_mode(&f.mode, what)?;
    match (&f.src, &f.content) {
        (Some(src), None) => {
            let path = l.resolve(src);
            if !path.is_file() {
                return Err(input(format!("{what}.src {} not found", path.display())));
            }
            check_confined(
                &path,
                &grammar::confinement_root(&l.dir)?,
                &format!("{what}.src"),
            )
        }
        (None, Some(_)) => Ok(()),
        _ => Err(input(format!(
            "{what}: give exactly one of src and content"
        ))),
    }
}

/// Unit names.
pub fn check_units(u: &Units, what: &str) -> Result<()> {
    for (list, names) in [
        ("enable", &u.enable),
        ("disable", &u.disable),
        ("mask", &u.mask),
    ] {
        for (i, n) in names.iter().enumerate() {
            let ok = [
                ".service", ".timer", ".socket", ".path", ".target", ".mount",
            ]
            .iter()
            .any(|sfx| n.ends_with(sfx))
                && n.len() <= 255
                && n.chars().all(|c| {
                    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@' | ':' | '\\')
                })
                && !n.starts_with(['-', '.']);
            if !ok {
                return Err(input(format!(
                    "{what}.{list}[{i}] unit {n:?} is not a systemd unit name"
                )));
            }
        }
    }
    Ok(())
}

fn check_path_field(l: &Loaded, p: Option<&Path>, what: &str) -> Result<()> {
    if let Some(p) = p {
        check_confined(&l.resolve(p), &grammar::confinement_root(&l.dir)?, what)?;
    }
    Ok(())
}

/// Validates a whole spec.
pub fn validate(l: &Loaded) -> Result<()> {
    let s = &l.spec;
    if !is_name(&s.name) {
        return Err(input(format!(
            "name {:?}: use lowercase letters, digits and '-' (at most 48)",
            s.name
        )));
    }
    check_version(&s.version, "version")?;
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
    if s.base.mirror != "host" && !is_url(&s.base.mirror, APT_SCHEMES) {
        return Err(input(format!(
            "base.mirror {:?}: give a URL (https://, http:// or file:, no spaces) or \"host\" (the build host's mirror)",
            s.base.mirror
        )));
    }
    for (i, c) in s.base.components.iter().enumerate() {
        if !grammar::is_component(c) {
            return Err(input(format!(
                "base.components[{i}] {c:?} is not a component name"
            )));
        }
    }
    if let Some(t) = &s.base.snapshot {
        if t != "auto" && !is_snapshot_timestamp(t) {
            return Err(input(format!(
                "base.snapshot {t:?}: give \"auto\" or a timestamp like \"20261122T000000Z\""
            )));
        }
    }
    if let Some(u) = &s.base.snapshot_url {
        if !is_url(u, APT_SCHEMES) {
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
    for (i, p) in s.packages.iter().enumerate() {
        check_package(p, &format!("packages[{i}]"))?;
    }
    for (i, r) in s.apt_repositories.iter().enumerate() {
        check_repository(l, r, &format!("apt_repositories[{i}]"))?;
    }
    for (i, lp) in s.local_packages.iter().enumerate() {
        check_local_package(l, lp, &format!("local_packages[{i}]"))?;
    }
    for (i, a) in s.artifacts.iter().enumerate() {
        check_artifact(a, &format!("artifacts[{i}]"))?;
    }
    for (i, f) in s.files.iter().enumerate() {
        check_file(l, f, &format!("files[{i}]"))?;
    }
    check_units(&s.units, "units")?;
    for (i, g) in s.groups.iter().enumerate() {
        if !is_account_name(&g.name) {
            return Err(input(format!(
                "groups[{i}].name {:?} is not a valid group name ([a-z_][-a-z0-9_]*, at most 32)",
                g.name
            )));
        }
    }
    for (i, u) in s.users.iter().enumerate() {
        if !is_account_name(&u.name) {
            return Err(input(format!(
                "users[{i}].name {:?} is not a valid user name ([a-z_][-a-z0-9_]*, at most 32)",
                u.name
            )));
        }
        for (j, g) in u.groups.iter().enumerate() {
            if !is_account_name(g) {
                return Err(input(format!(
                    "users[{i}].groups[{j}] {g:?} is not a valid group name ([a-z_][-a-z0-9_]*, at most 32)"
                )));
            }
        }
        grammar::check_shell(&u.shell, &format!("users[{i}].shell"))?;
    }
    check_path_field(l, s.agent.unit.as_deref(), "agent.unit")?;
    if !grammar::is_cmdline(&s.kernel_cmdline) {
        return Err(input(format!(
            "kernel_cmdline {:?}: use letters, digits, spaces and ._,:=/+@%~- only (at most 1024)",
            s.kernel_cmdline
        )));
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
