//! Where each pinned version comes from, tried in order: the local .deb cache (checked against
//! the lock's sha256), the spec's mirror, then the snapshot archive at the lock's timestamp. What
//! none of them serves has drifted: a plain build re-resolves it, `--locked` refuses.
//!
//! The mirror and the snapshot are asked with apt itself, in a private configuration (its own
//! sources, lists and caches; the host's trusted keys), so signatures, hashes and Valid-Until are
//! checked exactly as in the bootstrap. The same configuration downloads for `imagectl fetch`.

use super::sources::AptSource;
use crate::spec::lock::LockedPackage;
use crate::util::sha256_file;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// apt, configured to see only some sources, with state kept in a private directory.
pub struct PrivateApt {
    dir: tempfile::TempDir,
    conf: PathBuf,
    /// What it was asked to read.
    pub sources: Vec<AptSource>,
}

impl PrivateApt {
    /// Sets up a private apt for `sources` in a new directory under `parent`.
    pub fn new(sources: &[AptSource], parent: &Path) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("apt-")
            .tempdir_in(parent)
            .with_context(|| format!("creating a directory in {}", parent.display()))?;
        let d = std::path::absolute(dir.path())?;
        for sub in [
            "lists/partial",
            "archives/partial",
            "parts",
            "sources.list.d",
            "preferences.d",
        ] {
            fs_err::create_dir_all(d.join(sub))?;
        }
        let list: String = sources.iter().map(|s| s.host_line() + "\n").collect();
        fs_err::write(d.join("sources.list"), list)?;
        fs_err::write(d.join("status"), "")?;
        let p = |x: &str| d.join(x).to_string_lossy().into_owned();
        let conf = format!(
            "Dir::State \"{state}\";\n\
             Dir::State::Lists \"{lists}\";\n\
             Dir::State::status \"{status}\";\n\
             Dir::Cache \"{cache}\";\n\
             Dir::Cache::Archives \"{archives}\";\n\
             Dir::Cache::pkgcache \"\";\n\
             Dir::Cache::srcpkgcache \"\";\n\
             Dir::Etc::SourceList \"{list}\";\n\
             Dir::Etc::SourceParts \"{parts_src}\";\n\
             Dir::Etc::Parts \"{parts}\";\n\
             Dir::Etc::Preferences \"{prefs}\";\n\
             Dir::Etc::PreferencesParts \"{prefs_d}\";\n\
             APT::Architecture \"amd64\";\n\
             APT::Architectures {{ \"amd64\"; }};\n\
             APT::Sandbox::User \"root\";\n\
             Acquire::Languages \"none\";\n\
             Acquire::Retries \"3\";\n\
             Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled \"false\";\n\
             Debug::NoLocking \"true\";\n",
            state = p(""),
            lists = p("lists"),
            status = p("status"),
            cache = p(""),
            archives = p("archives"),
            list = p("sources.list"),
            parts_src = p("sources.list.d"),
            parts = p("parts"),
            prefs = p("preferences"),
            prefs_d = p("preferences.d"),
        );
        let conf_path = d.join("apt.conf");
        fs_err::write(&conf_path, conf)?;
        Ok(Self {
            dir,
            conf: conf_path,
            sources: sources.to_vec(),
        })
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("APT_CONFIG", &self.conf)
            .env("LC_ALL", "C.UTF-8")
            .stdin(Stdio::null());
        c
    }

    /// `apt-get update`; returns the sources that could not be read, with apt's reason. Never
    /// fails for an unreachable source: the caller decides what a missing index means.
    pub fn update(&self) -> Result<Vec<String>> {
        let mut cmd = self.command("apt-get");
        cmd.args(["-q", "update"]);
        tracing::debug!(
            "running apt-get update for {}",
            self.sources
                .iter()
                .map(AptSource::describe)
                .collect::<Vec<_>>()
                .join(", ")
        );
        let out = cmd
            .output()
            .context("running apt-get update (is apt installed?)")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        tracing::debug!("apt-get update: {}", crate::util::tail(&text, 30));
        let mut failed = Vec::new();
        for line in text.lines() {
            let l = line.trim();
            if l.starts_with("Err:") || l.starts_with("E: Failed") || l.starts_with("W: Failed") {
                failed.push(l.to_string());
            }
        }
        if !out.status.success() && failed.is_empty() {
            failed.push(crate::util::tail(&text, 3));
        }
        Ok(failed)
    }

    /// Every (package, version) in the indexes read, with its .deb's sha256.
    pub fn index(&self) -> Result<BTreeMap<(String, String), String>> {
        super::rootfs::index_sha256(&self.dir.path().join("lists"))
    }

    /// Downloads `pkgs` (exact versions) into `into`; apt checks each file against its index.
    pub fn download(&self, pkgs: &[&LockedPackage], into: &Path) -> Result<()> {
        if pkgs.is_empty() {
            return Ok(());
        }
        fs_err::create_dir_all(into)?;
        let mut cmd = self.command("apt-get");
        // `--`: the pins (checked when the lock is read) can never be taken as options.
        cmd.args(["-q", "download", "--"]).current_dir(into);
        for p in pkgs {
            cmd.arg(format!("{}={}", p.name, p.version));
        }
        crate::util::run(&mut cmd).context("downloading packages with apt-get download")
    }
}

/// Why a pinned version was not found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    /// The pin.
    pub package: LockedPackage,
    /// A source had that version, but with another sha256.
    pub sha256_differs: bool,
}

/// Where every pin was found.
pub struct Located {
    /// Verified .deb files in the cache.
    pub cached: Vec<PathBuf>,
    /// Pins the cache had.
    pub from_cache: Vec<LockedPackage>,
    /// Pins the mirror serves (and the private apt that read it).
    pub from_mirror: Vec<LockedPackage>,
    /// Pins the snapshot archive serves.
    pub from_snapshot: Vec<LockedPackage>,
    /// Pins no source serves.
    pub missing: Vec<Missing>,
    /// What was tried, for messages: one line a source.
    pub tried: Vec<String>,
    /// apt for the mirror, when it was asked.
    pub mirror: Option<PrivateApt>,
    /// apt for the snapshot, when it was asked.
    pub snapshot: Option<PrivateApt>,
}

impl Located {
    /// One line for the progress output.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} from the .deb cache, {} from the mirror, {} from the snapshot archive",
            self.from_cache.len(),
            self.from_mirror.len(),
            self.from_snapshot.len()
        );
        if !self.missing.is_empty() {
            s.push_str(&format!(", {} no longer served", self.missing.len()));
        }
        s
    }
}

/// The cached .deb of a pin, if it is there with the lock's sha256.
pub fn cached_deb(p: &LockedPackage, deb_cache: &Path) -> Result<Option<PathBuf>> {
    let path = deb_cache.join(p.deb_file_name());
    if path.is_file() && sha256_file(&path)? == p.sha256 {
        return Ok(Some(path));
    }
    Ok(None)
}

/// Finds a source for every pin in `pins`: the cache first, then `mirror` (asked only for what
/// the cache lacks), then `snapshot` (likewise).
pub fn locate(
    pins: &[LockedPackage],
    deb_cache: &Path,
    mirror: &[AptSource],
    snapshot: Option<(String, Vec<AptSource>)>,
    work: &Path,
) -> Result<Located> {
    let mut located = Located {
        cached: Vec::new(),
        from_cache: Vec::new(),
        from_mirror: Vec::new(),
        from_snapshot: Vec::new(),
        missing: Vec::new(),
        tried: vec![format!("the .deb cache {}", deb_cache.display())],
        mirror: None,
        snapshot: None,
    };
    let mut rest = Vec::new();
    for p in pins {
        match cached_deb(p, deb_cache)? {
            Some(path) => {
                located.cached.push(path);
                located.from_cache.push(p.clone());
            }
            None => rest.push(p.clone()),
        }
    }
    let mut differs = std::collections::BTreeSet::new();
    if !rest.is_empty() && !mirror.is_empty() {
        let apt = PrivateApt::new(mirror, work)?;
        let failed = apt.update()?;
        located
            .tried
            .push(tried_line("the mirror", mirror, &failed));
        let index = apt.index()?;
        let (found, left) = split_served(rest, &index, &mut differs);
        located.from_mirror = found;
        rest = left;
        located.mirror = Some(apt);
    }
    match snapshot {
        Some((ts, sources)) if !rest.is_empty() && !sources.is_empty() => {
            let apt = PrivateApt::new(&sources, work)?;
            let failed = apt.update()?;
            located.tried.push(tried_line(
                &format!("the snapshot archive at {ts}"),
                &sources,
                &failed,
            ));
            let index = apt.index()?;
            let (found, left) = split_served(rest, &index, &mut differs);
            located.from_snapshot = found;
            rest = left;
            located.snapshot = Some(apt);
        }
        Some(_) => {}
        None if !rest.is_empty() => located.tried.push(
            "no snapshot archive (the spec has no base.snapshot, or the lock records no \
             timestamp)"
                .into(),
        ),
        None => {}
    }
    located.missing = rest
        .into_iter()
        .map(|p| Missing {
            sha256_differs: differs.contains(&p.name),
            package: p,
        })
        .collect();
    Ok(located)
}

fn tried_line(what: &str, sources: &[AptSource], failed: &[String]) -> String {
    let names: Vec<String> = sources.iter().map(AptSource::describe).collect();
    let mut s = format!("{what} ({})", names.join(", "));
    if !failed.is_empty() {
        s.push_str(&format!(
            ": {} unreadable ({})",
            failed.len(),
            failed.first().map(String::as_str).unwrap_or_default()
        ));
    }
    s
}

/// Splits pins into those `index` serves with the lock's sha256 and the rest.
fn split_served(
    pins: Vec<LockedPackage>,
    index: &BTreeMap<(String, String), String>,
    differs: &mut std::collections::BTreeSet<String>,
) -> (Vec<LockedPackage>, Vec<LockedPackage>) {
    pins.into_iter()
        .partition(|p| match index.get(&(p.name.clone(), p.version.clone())) {
            Some(sha) if *sha == p.sha256 => true,
            Some(_) => {
                differs.insert(p.name.clone());
                false
            }
            None => false,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin(name: &str, version: &str, sha: &str) -> LockedPackage {
        LockedPackage {
            name: name.into(),
            version: version.into(),
            arch: "amd64".into(),
            sha256: sha.into(),
        }
    }

    #[test]
    fn served_means_same_version_and_same_sha256() {
        let mut index = BTreeMap::new();
        index.insert(("a".into(), "1".into()), "aa".into());
        index.insert(("b".into(), "1".into()), "xx".into());
        let mut differs = Default::default();
        let (found, left) = split_served(
            vec![
                pin("a", "1", "aa"),
                pin("b", "1", "bb"),
                pin("c", "1", "cc"),
            ],
            &index,
            &mut differs,
        );
        assert_eq!(found, vec![pin("a", "1", "aa")]);
        assert_eq!(left.len(), 2);
        assert!(differs.contains("b") && !differs.contains("c"));
    }

    #[test]
    fn the_cache_is_checked_against_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let p = pin("a", "1:2", &crate::util::sha256_bytes(b"deb"));
        std::fs::write(dir.path().join("a_1%3a2_amd64.deb"), b"deb").unwrap();
        assert!(cached_deb(&p, dir.path()).unwrap().is_some());
        std::fs::write(dir.path().join("a_1%3a2_amd64.deb"), b"tampered").unwrap();
        assert!(cached_deb(&p, dir.path()).unwrap().is_none());
        let located = locate(&[p], dir.path(), &[], None, dir.path()).unwrap();
        assert_eq!(located.missing.len(), 1);
        assert!(located.tried.iter().any(|t| t.contains("no snapshot")));
    }
}
