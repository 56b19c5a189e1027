//! Baking: spec → cached rootfs layer → composed tar → raw disk → qcow2 → manifest.
//!
//! Stages, each reported on the progress line:
//! 1. **lock**: decide between the locked versions and a fresh resolution (`--locked` refuses a
//!    change with exit code 2).
//! 2. **sources**, **rootfs**: reuse the cached layer for the same inputs, or find where each
//!    pinned version comes from (see [`origin`]; drift is handled in [`resolve`]) and run
//!    mmdebstrap.
//! 3. **compose**: stream the layer into the final tar with hygiene, files, artifacts, the agent,
//!    unit links, fstab and the GRUB config.
//! 4. **disk**: GPT + GRUB (BIOS and UEFI) + ESP + `mkfs.ext4 -d`.
//! 5. **qcow2**: `qemu-img convert` with zstd compression, flattened.

pub mod artifacts;
pub mod changelog;
pub mod disk;
pub mod fetch;
pub mod layer;
pub mod origin;
pub mod resolve;
pub mod rootfs;
pub mod runner;
pub mod sources;

use crate::error::input;
use crate::manifest::{ArtifactInfo, Manifest, Package};
use crate::progress::Progress;
use crate::spec::lock::{Lock, LockedPackage, LOCK_VERSION};
use crate::spec::{parse_size, snapshot_timestamp, Loaded};
use crate::store::Cache;
use crate::util::{run, sha256_bytes, sha256_file};
use anyhow::{bail, Context, Result};
use layer::{Add, Content, Overlay};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// How to build.
#[derive(Debug, Clone)]
pub struct Options {
    /// Output directory for the image and its manifest.
    pub out_dir: PathBuf,
    /// Cache directory.
    pub cache_dir: PathBuf,
    /// Lock file path (default: beside the spec).
    pub lock_path: Option<PathBuf>,
    /// Refuse to change the lock.
    pub locked: bool,
    /// Ignore the lock's pins and resolve afresh.
    pub refresh_lock: bool,
    /// Do not reuse a cached rootfs layer (it is still written).
    pub no_cache: bool,
    /// Version override.
    pub version: Option<String>,
    /// Agent binary override.
    pub agent_binary: Option<PathBuf>,
    /// Resolve and report the plan, build nothing.
    pub dry_run: bool,
    /// Write the package changelog (Markdown, see [`changelog`]) here.
    pub changelog: Option<PathBuf>,
}

/// What a build would do (`--dry-run`).
#[derive(Debug, serde::Serialize)]
pub struct Plan {
    /// The rootfs layer's cache key.
    pub layer_key: String,
    /// Whether that layer is cached.
    pub layer_cached: bool,
    /// apt sources (resolved).
    pub sources: Vec<String>,
    /// Packages passed to mmdebstrap.
    pub includes: Vec<String>,
    /// Locally built packages.
    pub local_debs: Vec<PathBuf>,
    /// Whether the lock's versions are used.
    pub pinned: bool,
    /// The lock file.
    pub lock: PathBuf,
    /// SOURCE_DATE_EPOCH.
    pub source_date_epoch: i64,
}

/// The sha256 of the spec inputs that decide the package set (no host-specific values).
pub fn package_inputs(l: &Loaded) -> Result<String> {
    let s = &l.spec;
    let mut local = Vec::new();
    for lp in &s.local_packages {
        let dir = l.resolve(&lp.dir);
        local.push((lp.name.clone(), tree_hash(&dir)?));
    }
    let mut keys = Vec::new();
    for r in &s.apt_repositories {
        if let Some(k) = &r.key_file {
            keys.push(sha256_file(&l.resolve(k))?);
        }
    }
    let base_key = match &s.base.key_file {
        Some(k) => Some(sha256_file(&l.resolve(k))?),
        None => None,
    };
    // Where pins are fetched from (the snapshot archive's URL, `auto`) does not decide the package
    // set; a fixed snapshot does, like the mirror.
    let v = serde_json::json!({
        "base": {
            "distribution": s.base.distribution, "suite": s.base.suite, "mirror": s.base.mirror,
            "components": s.base.components, "snapshot": s.base.fixed_snapshot(), "key": base_key,
        },
        "packages": s.packages,
        "apt_repositories": s.apt_repositories.iter().map(|r| serde_json::json!({
            "name": r.name, "url": r.url, "suite": r.suite, "components": r.components,
            "fingerprint": r.key_fingerprint, "packages": r.packages,
        })).collect::<Vec<_>>(),
        "keys": keys,
        "local_packages": local,
        "users": s.users,
        "groups": s.groups,
    });
    Ok(sha256_bytes(&serde_json::to_vec(&v)?))
}

/// sha256 over a directory tree's relative paths, modes and contents.
fn tree_hash(dir: &Path) -> Result<String> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<(String, u32, String)>) -> Result<()> {
        let mut entries: Vec<_> = fs_err::read_dir(dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let meta = fs_err::symlink_metadata(&p)?;
            let rel = p
                .strip_prefix(base)
                .unwrap_or(&p)
                .to_string_lossy()
                .into_owned();
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o7777;
            if meta.is_dir() {
                out.push((rel, mode, String::new()));
                walk(&p, base, out)?;
            } else if meta.file_type().is_symlink() {
                out.push((
                    rel,
                    0o777,
                    fs_err::read_link(&p)?.to_string_lossy().into_owned(),
                ));
            } else {
                out.push((rel, mode, sha256_file(&p)?));
            }
        }
        Ok(())
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v)?;
    Ok(sha256_bytes(&serde_json::to_vec(&v)?))
}

/// Locates the agent binary: the spec's, the flag's, or `imagectl-agent` beside this executable.
fn agent_binary(l: &Loaded, opt: &Options) -> Result<PathBuf> {
    if let Some(p) = &opt.agent_binary {
        return Ok(p.clone());
    }
    if let Some(p) = &l.spec.agent.binary {
        return Ok(l.resolve(p));
    }
    let exe = std::env::current_exe().context("finding the imagectl executable")?;
    let sibling = exe.with_file_name("imagectl-agent");
    if sibling.is_file() {
        return Ok(sibling);
    }
    Err(input(format!(
        "no imagectl-agent binary found beside {}; build it (cargo build --release) or pass --agent-binary",
        exe.display()
    )))
}

fn now_epoch() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn env_epoch() -> Result<Option<i64>> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.is_empty() => v.trim().parse().map(Some).map_err(|_| {
            input(format!(
                "SOURCE_DATE_EPOCH={v:?} is not a number of seconds"
            ))
        }),
        _ => Ok(None),
    }
}

fn parse_mode(m: &str) -> u32 {
    u32::from_str_radix(m, 8).unwrap_or(0o644)
}

/// Result of a build.
#[derive(Debug)]
pub struct Built {
    /// The image.
    pub image: PathBuf,
    /// Its manifest path.
    pub manifest_path: PathBuf,
    /// The manifest.
    pub manifest: Manifest,
    /// Lock changes (empty when unchanged).
    pub lock_changes: Vec<String>,
    /// Pins re-resolved because no source served them any more.
    pub drift: Vec<String>,
    /// Where the pins came from, when the layer was bootstrapped from a lock.
    pub origins: Option<String>,
    /// The lock file.
    pub lock_path: PathBuf,
    /// The package changelog written (`--changelog`).
    pub changelog: Option<PathBuf>,
}

/// Resolves what a build would do without building (`--dry-run`).
pub fn plan(l: &Loaded, opt: &Options) -> Result<Plan> {
    fs_err::create_dir_all(&opt.out_dir)?;
    let work = tempfile::Builder::new()
        .prefix(".imagectl-plan-")
        .tempdir_in(&opt.out_dir)
        .with_context(|| format!("creating a work directory in {}", opt.out_dir.display()))?;
    let cache = Cache::open(&opt.cache_dir)?;
    let p = prepare(l, opt, &cache, work.path())?;
    Ok(Plan {
        layer_cached: !opt.no_cache
            && cache.layer(&p.key).is_file()
            && cache.layer_meta(&p.key).is_file(),
        layer_key: p.key,
        sources: p.inputs.sources.clone(),
        includes: p.inputs.includes,
        local_debs: p.inputs.local_deb_paths,
        pinned: p.pins.is_some(),
        lock: p.lock_path,
        source_date_epoch: p.epoch,
    })
}

/// The lock decision and the layer inputs.
struct Prepared {
    lock_path: PathBuf,
    old: Option<Lock>,
    pkg_inputs: String,
    pins: Option<Vec<LockedPackage>>,
    epoch: i64,
    /// The snapshot timestamp to record in the lock.
    snapshot: Option<String>,
    base: rootfs::LayerInputs,
    inputs: rootfs::LayerInputs,
    key: String,
}

fn prepare(l: &Loaded, opt: &Options, cache: &Cache, work: &Path) -> Result<Prepared> {
    let s = &l.spec;
    let lock_path = opt
        .lock_path
        .clone()
        .unwrap_or_else(|| l.default_lock_path());
    let old = Lock::read(&lock_path)?;
    let pkg_inputs = package_inputs(l)?;
    let usable = old
        .as_ref()
        .filter(|o| o.inputs == pkg_inputs && o.spec == s.name);
    if opt.locked {
        if opt.refresh_lock {
            return Err(input("--locked and --refresh-lock contradict each other"));
        }
        match &old {
            None => {
                return Err(input(format!(
                    "--locked: {} does not exist; build once without --locked to create it",
                    lock_path.display()
                )))
            }
            Some(_) if usable.is_none() => {
                return Err(input(format!(
                    "--locked: {} is out of date for this spec (packages, repositories or users \
                     changed); build without --locked to update it",
                    lock_path.display()
                )))
            }
            _ => {}
        }
    }
    let pinned = if opt.refresh_lock { None } else { usable };
    let epoch = match env_epoch()? {
        Some(e) => e,
        None => pinned
            .map(|p| p.source_date_epoch)
            .unwrap_or_else(now_epoch),
    };
    let snapshot = match (&s.base.snapshot, pinned) {
        (None, _) => None,
        (Some(_), _) if s.base.fixed_snapshot().is_some() => {
            s.base.fixed_snapshot().map(str::to_string)
        }
        (Some(_), Some(p)) => p.snapshot.clone(),
        (Some(_), None) => Some(snapshot_timestamp(now_epoch())),
    };
    let base = rootfs::layer_inputs(l, epoch, work, &cache.keys())?;
    let pins = pinned.map(|p| p.packages.clone());
    let inputs = base.pinned(pins.as_deref());
    let key = inputs.key();
    Ok(Prepared {
        lock_path,
        old,
        pkg_inputs,
        pins,
        epoch,
        snapshot,
        base,
        inputs,
        key,
    })
}

/// Bakes an image.
pub fn build(l: &Loaded, opt: &Options, progress: &Progress) -> Result<Built> {
    let started = Instant::now();
    let mut stages: BTreeMap<String, f64> = BTreeMap::new();
    let s = &l.spec;
    let cache = Cache::open(&opt.cache_dir)?;
    fs_err::create_dir_all(&opt.out_dir)?;
    let work = tempfile::Builder::new()
        .prefix(".imagectl-build-")
        .tempdir_in(&opt.out_dir)
        .with_context(|| format!("creating a work directory in {}", opt.out_dir.display()))?;
    let work = work.path();

    // 1. Lock, and what the layer needs.
    let st = progress.stage("lock");
    let Prepared {
        lock_path,
        old,
        pkg_inputs,
        pins,
        epoch,
        mut snapshot,
        base,
        inputs: _,
        key: _,
    } = prepare(l, opt, &cache, work)?;
    st.done(if pins.is_some() {
        format!("versions pinned by {}", lock_path.display())
    } else {
        "resolving afresh".to_string()
    });

    // 2. Rootfs layer (drift is re-resolved, or refused with --locked).
    let fallback = s.base.fallback_snapshot(snapshot.as_deref());
    let t = Instant::now();
    let outcome = resolve::ensure_layer(
        &resolve::Request {
            base: &base,
            pins: pins.as_deref(),
            snapshot: fallback,
            locked: opt.locked,
            no_cache: opt.no_cache,
            lock_path: &lock_path,
        },
        &cache,
        work,
        progress,
    )?;
    if outcome.cached {
        progress.note(format!("rootfs: reused layer {}", &outcome.key[..12]));
    }
    if outcome.drifted() && s.base.snapshot.as_deref() == Some("auto") {
        // The re-resolved versions are the mirror's of today.
        snapshot = Some(snapshot_timestamp(now_epoch()));
    }
    stages.insert("rootfs".into(), t.elapsed().as_secs_f64());
    let cached = outcome.cached;
    let key = outcome.key.clone();
    let meta = outcome.meta.clone();

    // Artifacts: the spec's sha256, else the lock's, else recorded on first use.
    let st = progress.stage("artifacts");
    let resolved_artifacts = artifacts::resolve_all(
        &s.artifacts,
        old.as_ref(),
        opt.refresh_lock,
        opt.locked,
        &cache,
        progress,
    )?;
    st.done(format!("{} verified", resolved_artifacts.len()));

    // The resolution, compared with the lock.
    let resolved = Lock {
        version: LOCK_VERSION,
        spec: s.name.clone(),
        inputs: pkg_inputs.clone(),
        source_date_epoch: epoch,
        snapshot: snapshot.clone(),
        packages: meta.packages.clone(),
        artifacts: resolved_artifacts.iter().map(|a| a.locked()).collect(),
    };
    let lock_changes = match &old {
        Some(o) => {
            let mut d = o.diff(&resolved);
            if d.is_empty() && o.inputs != resolved.inputs {
                d.push("~ spec inputs".into());
            }
            d
        }
        None => vec![format!(
            "+ new lock with {} packages",
            resolved.packages.len()
        )],
    };
    if opt.locked && !lock_changes.is_empty() {
        return Err(input(format!(
            "--locked: the resolution differs from {}:\n  {}",
            lock_path.display(),
            lock_changes.join("\n  ")
        )));
    }
    if !lock_changes.is_empty() {
        resolved.write(&lock_path)?;
    }
    let lock_hash = resolved.hash()?;

    // 3. Compose.
    let st = progress.stage("compose");
    let agent = agent_binary(l, opt)?;
    let mut overlay = Overlay {
        enable: s.units.enable.clone(),
        disable: s.units.disable.clone(),
        mask: s.units.mask.clone(),
        ..Default::default()
    };
    let mut file_hashes = Vec::new();
    for f in &s.files {
        let content = match (&f.src, &f.content) {
            (Some(src), _) => {
                let p = l.resolve(src);
                file_hashes.push((f.dest.clone(), sha256_file(&p)?));
                Content::File(p)
            }
            (None, Some(c)) => {
                file_hashes.push((f.dest.clone(), sha256_bytes(c.as_bytes())));
                Content::Bytes(c.clone().into_bytes())
            }
            _ => unreachable!("validated"),
        };
        overlay.add.insert(
            f.dest.clone(),
            Add::File {
                content,
                mode: parse_mode(&f.mode),
            },
        );
    }
    let mut artifacts = Vec::new();
    for a in &resolved_artifacts {
        overlay.add.insert(
            a.artifact.dest.clone(),
            Add::File {
                content: Content::File(a.path.clone()),
                mode: parse_mode(&a.artifact.mode),
            },
        );
        artifacts.push(ArtifactInfo {
            name: a.artifact.name.clone(),
            url: a.artifact.url.clone(),
            sha256: a.sha256.clone(),
            dest: a.artifact.dest.clone(),
        });
    }
    let agent_sha =
        sha256_file(&agent).with_context(|| format!("reading agent binary {}", agent.display()))?;
    overlay.add.insert(
        "/usr/local/bin/imagectl-agent".into(),
        Add::File {
            content: Content::File(agent.clone()),
            mode: 0o755,
        },
    );
    if let Some(unit) = &s.agent.unit {
        let p = l.resolve(unit);
        file_hashes.push(("agent-unit".into(), sha256_file(&p)?));
        overlay.add.insert(
            "/etc/systemd/system/imagectl-agent.service".into(),
            Add::File {
                content: Content::File(p),
                mode: 0o644,
            },
        );
        if !overlay.enable.iter().any(|u| u == "imagectl-agent.service") {
            overlay.enable.push("imagectl-agent.service".into());
        }
    }
    let spec_json = serde_json::to_vec(&s)?;
    let spec_hash = sha256_bytes(&spec_json);
    let inputs_hash = sha256_bytes(
        serde_json::to_string(&serde_json::json!({
            "spec": spec_hash, "lock": lock_hash, "files": file_hashes,
            "agent": agent_sha, "profiles": l.profiles, "recipe": 1,
        }))?
        .as_bytes(),
    );
    let version = match &opt.version {
        Some(v) => v.clone(),
        None => {
            let date = time::OffsetDateTime::from_unix_timestamp(epoch)
                .map(|t| format!("{:04}{:02}{:02}", t.year(), u8::from(t.month()), t.day()))
                .unwrap_or_else(|_| "0".into());
            format!("{}-{date}-{}", s.version, &inputs_hash[..8])
        }
    };
    let ids = disk::DiskIds::derive(&inputs_hash);
    let modes = s.disk.boot.firmwares();
    let uefi = modes.contains(&"uefi");
    let bios = modes.contains(&"bios");
    // The kernel: find it in the layer listing via compose's report, so do a first pass for it.
    let kernel = meta
        .packages
        .iter()
        .find(|p| p.name.starts_with("linux-image-") && p.name.chars().any(|c| c.is_ascii_digit()))
        .map(|p| p.name.trim_start_matches("linux-image-").to_string())
        .ok_or_else(|| input("the package set installs no kernel: add linux-image-cloud-amd64 (or another linux-image-*)"))?;
    overlay.add.insert(
        "/boot/grub/grub.cfg".into(),
        Add::File {
            content: Content::Bytes(disk::grub_cfg(&ids, &kernel, &s.kernel_cmdline).into_bytes()),
            mode: 0o644,
        },
    );
    overlay.add.insert(
        "/etc/fstab".into(),
        Add::File {
            content: Content::Bytes(disk::fstab(&ids, uefi).into_bytes()),
            mode: 0o644,
        },
    );
    if uefi {
        overlay.add.insert("/boot/efi".into(), Add::Dir(0o700));
    }
    let info = serde_json::json!({
        "name": s.name, "version": version, "inputs_hash": inputs_hash,
        "spec_hash": spec_hash, "lock_hash": lock_hash, "source_date_epoch": epoch,
    });
    overlay.add.insert(
        "/etc/imagectl/image.json".into(),
        Add::File {
            content: Content::Bytes(serde_json::to_vec_pretty(&info)?),
            mode: 0o644,
        },
    );
    // For the node_exporter textfile collector: which image this VM came from, and how old its
    // package set is (monitoring/README, contract 2). The qcow2's own sha256 cannot be inside it,
    // so `sha256` is the inputs hash.
    overlay.add.insert(
        IMAGE_PROM.into(),
        Add::File {
            content: Content::Bytes(
                image_prom(&s.name, &version, &inputs_hash, epoch).into_bytes(),
            ),
            mode: 0o644,
        },
    );
    let root_tar = work.join("root.tar");
    let report = layer::compose(&cache.layer(&key), &root_tar, &overlay, epoch)?;
    if !report.kernels.contains(&kernel) {
        bail!("kernel {kernel} is installed but /boot/vmlinuz-{kernel} is missing from the root filesystem");
    }
    stages.insert(
        "compose".into(),
        st.done(format!("{} entries", report.entries)).as_secs_f64(),
    );

    // 4. Disk.
    let st = progress.stage("disk");
    let size = parse_size(&s.disk.size).expect("validated");
    let raw = work.join("disk.raw");
    disk::build_raw(&disk::RawDisk {
        raw: &raw,
        size,
        root_tar: &root_tar,
        ids: &ids,
        bios,
        uefi,
        epoch,
        work,
    })?;
    let _ = fs_err::remove_file(&root_tar);
    stages.insert(
        "disk".into(),
        st.done(format!("{} raw", crate::util::human_size(size)))
            .as_secs_f64(),
    );

    // 5. qcow2.
    let st = progress.stage("qcow2");
    let name = format!("{}-{version}.qcow2", s.name);
    let image = opt.out_dir.join(&name);
    let tmp = work.join(&name);
    qcow2_convert(&raw, &tmp)?;
    let _ = fs_err::remove_file(&raw);
    let sha = sha256_file(&tmp)?;
    let file_size = fs_err::metadata(&tmp)?.len();
    fs_err::rename(&tmp, &image)?;
    stages.insert(
        "qcow2".into(),
        st.done(crate::util::human_size(file_size)).as_secs_f64(),
    );

    let manifest = Manifest {
        format: 1,
        name: s.name.clone(),
        version,
        image: name,
        sha256: sha,
        size: file_size,
        virtual_size: size / (1 << 20) * (1 << 20),
        spec_hash,
        lock_hash,
        inputs_hash,
        profiles: l.profiles.clone(),
        boot_modes: modes.iter().map(|m| m.to_string()).collect(),
        kernel,
        root_fs_uuid: ids.root_fs.to_string(),
        source_date_epoch: epoch,
        packages: meta
            .packages
            .iter()
            .map(|p| Package {
                name: p.name.clone(),
                version: p.version.clone(),
            })
            .collect(),
        artifacts,
        hygiene_removed: report
            .removed
            .iter()
            .map(|(k, v)| (k.clone(), v.len()))
            .collect(),
        snapshot,
        drift: outcome.drift.clone(),
        layer_cached: cached,
        layer_key: key.clone(),
        stage_seconds: stages,
        build_seconds: started.elapsed().as_secs_f64(),
        built_at: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        imagectl_version: env!("CARGO_PKG_VERSION").into(),
    };
    let manifest_path = Manifest::path_for(&image);
    manifest.write(&manifest_path)?;
    if let Some(path) = &opt.changelog {
        let md = changelog::render_with_drift(
            &s.name,
            &manifest.version,
            old.as_ref(),
            &resolved,
            &outcome.drift,
        );
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs_err::create_dir_all(dir)?;
        }
        fs_err::write(path, md)?;
    }
    Ok(Built {
        image,
        manifest_path,
        manifest,
        lock_changes,
        drift: outcome.drift,
        origins: outcome.origins,
        lock_path,
        changelog: opt.changelog.clone(),
    })
}

/// Where the image's textfile metrics live.
pub const IMAGE_PROM: &str = "/var/lib/prometheus/node-exporter/imagectl-image.prom";

/// The image's textfile metrics.
pub fn image_prom(name: &str, version: &str, inputs_hash: &str, epoch: i64) -> String {
    format!(
        "# HELP imagectl_image_info The imagectl golden image this VM was cloned from (always 1).\n\
         # TYPE imagectl_image_info gauge\n\
         imagectl_image_info{{name=\"{name}\",version=\"{version}\",sha256=\"{inputs_hash}\"}} 1\n\
         # HELP imagectl_image_build_timestamp_seconds SOURCE_DATE_EPOCH of the image: when its package set was resolved, Unix time.\n\
         # TYPE imagectl_image_build_timestamp_seconds gauge\n\
         imagectl_image_build_timestamp_seconds {epoch}\n"
    )
}

/// Converts a raw disk into a flattened, zstd-compressed qcow2.
///
/// Eight coroutines compress in parallel, but writes stay in order (no `-W`): out-of-order writes
/// are ~30% faster here and make the cluster layout, and so the file's sha256, differ run to run.
pub fn qcow2_convert(raw: &Path, out: &Path) -> Result<()> {
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2", "-c", "-m", "8"])
        .args(["-o", "compression_type=zstd"])
        .arg(raw)
        .arg(out))
    .context("converting to qcow2 (apt-get install qemu-utils)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_textfile_matches_the_monitoring_contract() {
        let readme = include_str!("../../../monitoring/README");
        let block = readme
            .split("BEGIN imagectl-image.prom\n")
            .nth(1)
            .and_then(|r| r.split("END imagectl-image.prom").next())
            .expect("the contract block in monitoring/README");
        let ours = image_prom(
            "gitlab-runner",
            "1.0-20250601-3f2a9c1e",
            "9f2c1b7e0d4a5c6b8e3f1a2d4c6b8e0f1a3c5e7d9b1f3a5c7e9d1b3f5a7c9e1d",
            1_748_736_000,
        );
        assert_eq!(ours, block);
    }
}
