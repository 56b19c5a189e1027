//! `imagectl fetch`: every locked .deb and artifact of a spec into a cache directory, each
//! verified by sha256, so that `imagectl build --locked --cache-dir DIR` rebuilds the same bytes
//! on a host that reaches no mirror (an air-gapped rebuild).
//!
//! The pins are found as a build finds them ([`super::origin`]): what `DIR` already holds with the
//! lock's sha256 is kept, the rest comes from the mirror or the snapshot archive at the lock's
//! timestamp, downloaded by apt (which checks each file against its signed index) and then
//! checked against the lock. Signing keys fetched by URL are kept in `DIR/keys`.

use super::{artifacts, origin, package_inputs, resolve, rootfs};
use crate::error::input;
use crate::progress::Progress;
use crate::spec::lock::{Lock, LockedPackage};
use crate::spec::Loaded;
use crate::store::Cache;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What `fetch` did.
#[derive(Debug, serde::Serialize)]
pub struct Fetched {
    /// The cache directory filled.
    pub into: PathBuf,
    /// The lock it followed.
    pub lock: PathBuf,
    /// Locked packages (locally built ones are not fetched: the build makes them).
    pub packages: usize,
    /// Of those, already in the directory with the lock's sha256.
    pub already_there: usize,
    /// Downloaded from the mirror.
    pub from_mirror: usize,
    /// Downloaded from the snapshot archive.
    pub from_snapshot: usize,
    /// Bytes of .deb files now in the directory for this lock.
    pub bytes: u64,
    /// Artifacts verified.
    pub artifacts: usize,
    /// Wall time.
    pub seconds: f64,
}

/// Fetches everything `l`'s lock pins into the cache at `into`.
pub fn fetch(
    l: &Loaded,
    lock_path: Option<PathBuf>,
    into: &Path,
    progress: &Progress,
) -> Result<Fetched> {
    let started = Instant::now();
    let s = &l.spec;
    let lock_path = lock_path.unwrap_or_else(|| l.default_lock_path());
    let lock = Lock::read(&lock_path)?.ok_or_else(|| {
        input(format!(
            "{} does not exist; build once to create the lock, then fetch what it pins",
            lock_path.display()
        ))
    })?;
    if lock.inputs != package_inputs(l)? || lock.spec != s.name {
        return Err(input(format!(
            "{} is out of date for this spec (packages, repositories or users changed); build \
             without --locked to update it, then fetch",
            lock_path.display()
        )));
    }
    if into.exists() && !into.is_dir() {
        return Err(input(format!("--into {}: not a directory", into.display())));
    }
    let cache = Cache::open(into).with_context(|| format!("creating {}", into.display()))?;
    let work = tempfile::Builder::new()
        .prefix(".imagectl-fetch-")
        .tempdir_in(into)
        .with_context(|| format!("creating a work directory in {}", into.display()))?;
    let st = progress.stage("sources");
    let base = rootfs::layer_inputs(l, lock.source_date_epoch, work.path(), &cache.keys())?;
    let wanted: Vec<LockedPackage> = lock
        .packages
        .iter()
        .filter(|p| !base.local_names.contains(&p.name))
        .cloned()
        .collect();
    let snapshot = s
        .base
        .fallback_snapshot(lock.snapshot.as_deref())
        .map(|(url, ts)| {
            (
                ts.clone(),
                super::sources::snapshots_of(&base.apt, &url, &ts),
            )
        });
    let debs = cache.debs(&s.base.suite);
    let located = origin::locate(&wanted, &debs, &base.apt, snapshot, work.path())?;
    st.done(located.summary());
    if !located.missing.is_empty() {
        return Err(resolve::refusal(&located, &lock_path));
    }
    let st = progress.stage("download");
    for (apt, pins) in [
        (&located.mirror, &located.from_mirror),
        (&located.snapshot, &located.from_snapshot),
    ] {
        if let (Some(apt), false) = (apt, pins.is_empty()) {
            st.message(format!("{} packages", pins.len()));
            apt.download(&pins.iter().collect::<Vec<_>>(), &debs)?;
        }
    }
    let mut bytes = 0;
    for p in &wanted {
        match origin::cached_deb(p, &debs)? {
            Some(path) => bytes += fs_err::metadata(&path)?.len(),
            None => {
                return Err(input(format!(
                    "{} {}: the downloaded .deb does not have the sha256 the lock records",
                    p.name, p.version
                )))
            }
        }
    }
    st.done(format!(
        "{} packages, {}",
        wanted.len(),
        crate::util::human_size(bytes)
    ));
    let st = progress.stage("artifacts");
    let arts = artifacts::resolve_all(&s.artifacts, Some(&lock), false, true, &cache, progress)?;
    st.done(format!("{} verified", arts.len()));
    Ok(Fetched {
        into: into.to_path_buf(),
        lock: lock_path,
        packages: wanted.len(),
        already_there: located.from_cache.len(),
        from_mirror: located.from_mirror.len(),
        from_snapshot: located.from_snapshot.len(),
        bytes,
        artifacts: arts.len(),
        seconds: started.elapsed().as_secs_f64(),
    })
}
