//! The rootfs stage: reuse a cached layer, or find where each pinned version comes from and
//! bootstrap. A pin that no source serves any more has drifted: a plain build drops just those
//! pins and lets apt resolve them (and, when the remaining pins no longer fit together, resolves
//! every package afresh); `--locked` refuses, naming the packages, the sources tried and the
//! remedies.

use super::origin::{self, Located};
use super::rootfs::{self, AptRefused, LayerInputs, LayerMeta};
use super::sources::{self, AptSource};
use crate::error::input;
use crate::progress::Progress;
use crate::spec::lock::LockedPackage;
use crate::store::Cache;
use anyhow::{Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// What the rootfs stage is asked for.
pub struct Request<'a> {
    /// The unpinned layer inputs.
    pub base: &'a LayerInputs,
    /// The lock's pins (`None`: resolve afresh).
    pub pins: Option<&'a [LockedPackage]>,
    /// The snapshot archive to fall back on: (base URL, timestamp).
    pub snapshot: Option<(String, String)>,
    /// `--locked`: refuse drift.
    pub locked: bool,
    /// `--no-cache`: bootstrap even when the layer is cached.
    pub no_cache: bool,
    /// The lock file, for messages.
    pub lock_path: &'a Path,
}

/// What the rootfs stage did.
pub struct Outcome {
    /// The layer's cache key.
    pub key: String,
    /// Its metadata (installed packages with sha256s).
    pub meta: LayerMeta,
    /// Whether the layer came from the cache.
    pub cached: bool,
    /// One line a pin that no source served any more.
    pub drift: Vec<String>,
    /// Where the pins came from, when that was asked.
    pub origins: Option<String>,
}

impl Outcome {
    /// Whether some pins were re-resolved.
    pub fn drifted(&self) -> bool {
        !self.drift.is_empty()
    }
}

fn load_cached(cache: &Cache, key: &str, no_cache: bool) -> Result<Option<LayerMeta>> {
    if no_cache || !cache.layer(key).is_file() || !cache.layer_meta(key).is_file() {
        return Ok(None);
    }
    let meta = serde_json::from_slice(&fs_err::read(cache.layer_meta(key))?)
        .context("reading the layer metadata")?;
    Ok(Some(meta))
}

/// Reuses or builds the rootfs layer for `req`.
pub fn ensure_layer(
    req: &Request<'_>,
    cache: &Cache,
    work: &Path,
    progress: &Progress,
) -> Result<Outcome> {
    let base = req.base;
    let deb_cache = cache.debs(&base.suite);
    let mut inputs = base.pinned(req.pins);
    let mut key = inputs.key();
    if let Some(meta) = load_cached(cache, &key, req.no_cache)? {
        return Ok(Outcome {
            key,
            meta,
            cached: true,
            drift: vec![],
            origins: None,
        });
    }
    let mut repo_debs: Vec<PathBuf> = base.local_deb_paths.clone();
    let mut missing = Vec::new();
    let mut origins = None;
    let (mut need_mirror, mut need_snapshot) = (req.pins.is_none(), false);
    let mut snapshot_sources: Vec<AptSource> = Vec::new();
    if let Some(pins) = req.pins {
        let st = progress.stage("sources");
        let wanted: Vec<LockedPackage> = pins
            .iter()
            .filter(|p| !base.local_names.contains(&p.name))
            .cloned()
            .collect();
        let snap = req
            .snapshot
            .as_ref()
            .map(|(url, ts)| (ts.clone(), sources::snapshots_of(&base.apt, url, ts)));
        let located = origin::locate(&wanted, &deb_cache, &base.apt, snap, work)?;
        origins = Some(located.summary());
        st.done(located.summary());
        if !located.missing.is_empty() {
            if req.locked {
                return Err(refusal(&located, req.lock_path));
            }
            let gone: BTreeSet<&str> = located
                .missing
                .iter()
                .map(|m| m.package.name.as_str())
                .collect();
            let kept: Vec<LockedPackage> = pins
                .iter()
                .filter(|p| !gone.contains(p.name.as_str()))
                .cloned()
                .collect();
            progress.note(format!(
                "{} pinned versions are no longer served by any source; re-resolving them",
                located.missing.len()
            ));
            inputs = base.pinned(Some(&kept));
            key = inputs.key();
            need_mirror = true;
            missing = located.missing.clone();
        }
        need_mirror |= !located.from_mirror.is_empty();
        need_snapshot = !located.from_snapshot.is_empty();
        if let Some(apt) = &located.snapshot {
            snapshot_sources = apt.sources.clone();
        }
        repo_debs.extend(located.cached.iter().cloned());
        if !missing.is_empty() {
            if let Some(meta) = load_cached(cache, &key, req.no_cache)? {
                let drift = drift_lines(&missing, &meta.packages);
                return Ok(Outcome {
                    key,
                    meta,
                    cached: true,
                    drift,
                    origins,
                });
            }
        }
    }
    let repo = if repo_debs.is_empty() {
        None
    } else {
        sources::check_tool("apt-ftparchive", "apt-utils")?;
        Some(sources::local_repo(
            &repo_debs,
            &work.join("repo"),
            &base.suite,
        )?)
    };
    let fetch = |mirror: bool, snapshot: bool| -> Vec<AptSource> {
        let mut v: Vec<AptSource> = repo.iter().cloned().collect();
        if mirror {
            v.extend(base.apt.iter().cloned());
        }
        if snapshot {
            v.extend(snapshot_sources.iter().cloned());
        }
        v
    };
    let st = progress.stage("rootfs");
    st.message("mmdebstrap (this takes a minute or two)");
    let started = Instant::now();
    let tmp = cache.layer(&key).with_extension("tar.part");
    let sources = fetch(need_mirror, need_snapshot);
    let (installed, lists) = match rootfs::bootstrap(&inputs, &sources, &tmp, &deb_cache, work) {
        Ok(x) => x,
        Err(e) if !missing.is_empty() && e.downcast_ref::<AptRefused>().is_some() => {
            tracing::debug!("partial re-resolution refused: {e:#}");
            progress.note(
                "the remaining pins do not fit the re-resolved packages; resolving every \
                     package afresh",
            );
            inputs = base.pinned(None);
            key = inputs.key();
            let tmp2 = cache.layer(&key).with_extension("tar.part");
            let r = rootfs::bootstrap(&inputs, &fetch(true, false), &tmp2, &deb_cache, work)?;
            fs_err::rename(&tmp2, &tmp)?;
            r
        }
        Err(e) => return Err(e),
    };
    let meta = record(base, installed, &lists, started)?;
    let layer_path = cache.layer(&key);
    let meta_path = cache.layer_meta(&key);
    fs_err::rename(&tmp, &layer_path)?;
    crate::util::write_atomic(&meta_path, &serde_json::to_vec_pretty(&meta)?)?;
    if req.pins.is_none() || !missing.is_empty() {
        // A resolution gives the same bytes as a build pinned to it, so the next (pinned) build
        // of this lock reuses this layer instead of bootstrapping again.
        let alias = base.pinned(Some(&meta.packages)).key();
        if alias != key {
            for (from, to) in [
                (&layer_path, cache.layer(&alias)),
                (&meta_path, cache.layer_meta(&alias)),
            ] {
                let _ = fs_err::remove_file(&to);
                fs_err::hard_link(from, &to).or_else(|_| fs_err::copy(from, &to).map(|_| ()))?;
            }
        }
    }
    st.done(format!("bootstrapped {} packages", meta.packages.len()));
    let drift = drift_lines(&missing, &meta.packages);
    for d in &drift {
        progress.note(d);
    }
    Ok(Outcome {
        key,
        meta,
        cached: false,
        drift,
        origins,
    })
}

/// The installed packages with their .debs' sha256: from apt's indexes, or of the local .debs.
fn record(
    base: &LayerInputs,
    installed: rootfs::Installed,
    lists: &Path,
    started: Instant,
) -> Result<LayerMeta> {
    let shas = rootfs::index_sha256(lists)?;
    let local: BTreeMap<String, String> = base
        .local_deb_paths
        .iter()
        .zip(&base.local_debs)
        .filter_map(|(p, (_, sha))| Some((deb_field(p, "Package").ok()?, sha.clone())))
        .collect();
    let mut packages = Vec::new();
    for (name, version, arch) in installed {
        let sha = local
            .get(&name)
            .or_else(|| shas.get(&(name.clone(), version.clone())))
            .cloned()
            .unwrap_or_default();
        packages.push(LockedPackage {
            name,
            version,
            arch,
            sha256: sha,
        });
    }
    packages.sort();
    Ok(LayerMeta {
        packages,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn deb_field(deb: &Path, field: &str) -> Result<String> {
    let out = crate::util::run_output(Command::new("dpkg-deb").arg("--field").arg(deb).arg(field))?;
    Ok(out.trim().to_string())
}

/// One line a drifted pin: `name old → new (pinned version no longer served)`.
pub fn drift_lines(missing: &[origin::Missing], now: &[LockedPackage]) -> Vec<String> {
    missing
        .iter()
        .map(|m| {
            let p = &m.package;
            let new = now
                .iter()
                .find(|x| x.name == p.name)
                .map(|x| x.version.clone())
                .unwrap_or_else(|| "(removed)".into());
            let why = if m.sha256_differs {
                "the served .deb's sha256 differs from the lock"
            } else {
                "pinned version no longer served"
            };
            format!("{} {} → {new} ({why})", p.name, p.version)
        })
        .collect()
}

/// `--locked` and drift: a few lines naming the packages, the sources tried and the remedies.
pub fn refusal(located: &Located, lock_path: &Path) -> anyhow::Error {
    let names: Vec<String> = located
        .missing
        .iter()
        .map(|m| {
            let p = &m.package;
            if m.sha256_differs {
                format!("{} {} (sha256 differs)", p.name, p.version)
            } else {
                format!("{} {}", p.name, p.version)
            }
        })
        .collect();
    let n = names.len();
    let mut shown = names.into_iter().take(8).collect::<Vec<_>>().join(", ");
    if n > 8 {
        shown.push_str(&format!(" and {} more", n - 8));
    }
    input(format!(
        "--locked: {n} pinned version(s) in {} are no longer served by any source: {shown}\n\
         tried: {}\n\
         remedies: a snapshot archive that still holds them (base.snapshot; base.snapshot_url for \
         a local mirror of it), a cache that holds the .debs (`imagectl fetch SPEC --locked --into \
         DIR` where they are served, then `--cache-dir DIR`), or `--refresh-lock` to move to what \
         is served today",
        lock_path.display(),
        located.tried.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin(name: &str, v: &str) -> LockedPackage {
        LockedPackage {
            name: name.into(),
            version: v.into(),
            arch: "amd64".into(),
            sha256: "x".into(),
        }
    }

    #[test]
    fn drift_lines_say_old_new_and_why() {
        let missing = vec![
            origin::Missing {
                package: pin("linux-image-cloud-amd64", "6.1.192-2"),
                sha256_differs: false,
            },
            origin::Missing {
                package: pin("linux-image-6.1.0-43-cloud-amd64", "6.1.192-2"),
                sha256_differs: false,
            },
        ];
        let now = vec![
            pin("linux-image-cloud-amd64", "6.1.192-3"),
            pin("linux-image-6.1.0-44-cloud-amd64", "6.1.192-3"),
        ];
        assert_eq!(
            drift_lines(&missing, &now),
            vec![
                "linux-image-cloud-amd64 6.1.192-2 → 6.1.192-3 (pinned version no longer served)",
                "linux-image-6.1.0-43-cloud-amd64 6.1.192-2 → (removed) (pinned version no longer served)",
            ]
        );
    }

    #[test]
    fn refusal_is_short_and_names_sources_and_remedies() {
        let located = Located {
            cached: vec![],
            from_cache: vec![],
            from_mirror: vec![],
            from_snapshot: vec![],
            missing: (0..12)
                .map(|i| origin::Missing {
                    package: pin(&format!("p{i}"), "1"),
                    sha256_differs: false,
                })
                .collect(),
            tried: vec!["the .deb cache /c".into(), "the mirror (m bookworm)".into()],
            mirror: None,
            snapshot: None,
        };
        let e = refusal(&located, Path::new("x.lock"));
        assert_eq!(crate::error::exit_code(&e), 2);
        let msg = e.to_string();
        assert!(msg.contains("p0 1") && msg.contains("and 4 more"), "{msg}");
        assert!(msg.contains("the mirror (m bookworm)"), "{msg}");
        assert!(
            msg.contains("--refresh-lock") && msg.contains("imagectl fetch"),
            "{msg}"
        );
        assert!(msg.lines().count() <= 4, "{msg}");
    }
}
