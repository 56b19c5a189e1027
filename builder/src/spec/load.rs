//! Loading a spec: YAML parsing with file:line:col errors, profiles, validation.
//!
//! A profile (`profiles/NAME.yaml` beside the spec, or a path) removes entries by name (or by
//! destination, for files) and adds new ones. Paths in a profile are relative to the profile file;
//! they are rewritten relative to the spec so that hashes do not depend on where the checkout is.

use super::validate::{self, validate};
use super::{AptRepository, Artifact, FileEntry, LocalPackage, Spec, Units};
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
    // A spec or profile is a few KiB; 1 MiB bounds what a wrong path (a FIFO, /dev/zero, an
    // image) can make the loader read.
    let text = crate::util::read_text_input(path, "spec", 1 << 20)?;
    super::grammar::check_aliases(&text, path)?;
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
    let spec: Spec = parse_yaml(path)?;
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    let mut loaded = Loaded {
        spec,
        path: path.to_path_buf(),
        dir,
        profiles: profiles.to_vec(),
    };
    // The spec as written is checked before any profile touches it, so that a profile removing
    // an entry cannot hide the entry's errors; each profile is checked as written too.
    validate(&loaded).with_context(|| format!("validating {}", path.display()))?;
    normalize_dests(&mut loaded.spec);
    if profiles.is_empty() {
        return Ok(loaded);
    }
    for name in profiles {
        let (ppath, rel_dir) = profile_path(&loaded.dir, name);
        if !ppath.is_file() {
            return Err(input(format!(
                "profile {name:?} not found (looked for {})",
                ppath.display()
            )));
        }
        let profile: Profile = parse_yaml(&ppath)?;
        validate_profile(&loaded, &profile, &rel_dir)
            .with_context(|| format!("validating profile {}", ppath.display()))?;
        apply(&mut loaded.spec, profile, &rel_dir)
            .with_context(|| format!("applying profile {}", ppath.display()))?;
    }
    normalize_dests(&mut loaded.spec);
    validate(&loaded).with_context(|| format!("validating {}", path.display()))?;
    Ok(loaded)
}

/// Writes every destination in its normal form (`/etc//x/` is `/etc/x`), as validated.
fn normalize_dests(spec: &mut Spec) {
    let norm = |d: &mut String| {
        if let Some(n) = super::grammar::normalize_dest(d) {
            *d = n;
        }
    };
    spec.files.iter_mut().for_each(|f| norm(&mut f.dest));
    spec.artifacts.iter_mut().for_each(|a| norm(&mut a.dest));
}

/// Checks what a profile adds, with its paths resolved as they will be once it is applied.
fn validate_profile(l: &Loaded, p: &Profile, rel: &Path) -> Result<()> {
    let a = &p.add;
    for (i, pkg) in a.packages.iter().enumerate() {
        validate::check_package(pkg, &format!("add.packages[{i}]"))?;
    }
    for (i, r) in a.apt_repositories.iter().enumerate() {
        let mut r = r.clone();
        r.key_file = r.key_file.map(|k| rel.join(k));
        validate::check_repository(l, &r, &format!("add.apt_repositories[{i}]"))?;
    }
    for (i, lp) in a.local_packages.iter().enumerate() {
        let mut lp = lp.clone();
        lp.dir = rel.join(&lp.dir);
        validate::check_local_package(l, &lp, &format!("add.local_packages[{i}]"))?;
    }
    for (i, art) in a.artifacts.iter().enumerate() {
        validate::check_artifact(art, &format!("add.artifacts[{i}]"))?;
    }
    for (i, f) in a.files.iter().enumerate() {
        let mut f = f.clone();
        f.src = f.src.map(|s| rel.join(s));
        validate::check_file(l, &f, &format!("add.files[{i}]"))?;
    }
    validate::check_units(&a.units, "add.units")
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
    let files: Vec<String> = r
        .files
        .iter()
        .map(|d| super::grammar::normalize_dest(d).unwrap_or_else(|| d.clone()))
        .collect();
    remove_named(&mut spec.files, &files, |x| &x.dest, "file")?;
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
