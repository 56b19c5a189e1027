//! `imagectl build`: bake a golden qcow2 from an image spec.

use super::Global;
use crate::bake::{self, Options};
use crate::util::human_size;
use std::path::PathBuf;

/// Arguments of `imagectl build`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The image spec (YAML), e.g. image-specs/gitlab-runner.yaml.
    pub spec: PathBuf,
    /// Profiles to apply, by name (profiles/NAME.yaml beside the spec) or path; repeatable.
    #[arg(long = "profile", short = 'p')]
    pub profiles: Vec<String>,
    /// Output directory for the image and its manifest.
    #[arg(long, default_value = "out")]
    pub out: PathBuf,
    /// Cache directory (rootfs layers, packages, artifacts).
    #[arg(long, env = "IMAGECTL_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Lock file (default: the spec's name with .lock).
    #[arg(long)]
    pub lock: Option<PathBuf>,
    /// Fail (exit 2) if the lock is missing, stale, or the resolution would change it.
    #[arg(long)]
    pub locked: bool,
    /// Ignore the lock's pins, resolve the newest packages and rewrite the lock.
    #[arg(long, conflicts_with = "locked")]
    pub refresh_lock: bool,
    /// Rebuild the rootfs layer even when a cached one matches.
    #[arg(long)]
    pub no_cache: bool,
    /// Image version (default: spec version, date and input hash).
    #[arg(long)]
    pub version: Option<String>,
    /// The imagectl-agent binary to bake in (default: the one beside imagectl).
    #[arg(long)]
    pub agent_binary: Option<PathBuf>,
    /// Resolve sources, packages and the cache key, print the plan, build nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Write a Markdown package changelog to FILE: packages added, removed, upgraded and
    /// downgraded (old → new version) and artifacts changed since the previous lock, or "No
    /// package changes".
    #[arg(long, value_name = "FILE", conflicts_with = "dry_run")]
    pub changelog: Option<PathBuf>,
}

/// Runs `imagectl build`.
pub fn run(g: &Global, a: Args) -> anyhow::Result<i32> {
    let loaded = crate::spec::load(&a.spec, &a.profiles)?;
    if let Some(v) = &a.version {
        // The whole version names files (`out/<name>-<version>.qcow2`) and templates: the same
        // rule as the spec's own `version`.
        crate::spec::check_version(v, "--version")?;
    }
    let opt = Options {
        out_dir: a.out,
        cache_dir: a.cache_dir.unwrap_or_else(crate::store::default_cache_dir),
        lock_path: a.lock,
        locked: a.locked,
        refresh_lock: a.refresh_lock,
        no_cache: a.no_cache,
        version: a.version,
        agent_binary: a.agent_binary,
        dry_run: a.dry_run,
        changelog: a.changelog,
    };
    if opt.dry_run {
        let plan = bake::plan(&loaded, &opt)?;
        g.emit(&plan, |p| {
            let mut s = format!(
                "layer {} ({})\nlock {} ({})\nsources:\n",
                &p.layer_key[..16],
                if p.layer_cached { "cached" } else { "to build" },
                p.lock.display(),
                if p.pinned {
                    "versions pinned"
                } else {
                    "resolving afresh"
                }
            );
            for src in &p.sources {
                s.push_str(&format!("  {src}\n"));
            }
            s.push_str(&format!("packages: {}\n", p.includes.join(" ")));
            s
        })?;
        return Ok(0);
    }
    let built = bake::build(&loaded, &opt, &g.progress())?;
    let value = serde_json::json!({
        "image": built.image,
        "manifest": built.manifest_path,
        "lock": built.lock_path,
        "lock_changes": built.lock_changes,
        "drift": built.drift,
        "origins": built.origins,
        "changelog": built.changelog,
        "name": built.manifest.name,
        "version": built.manifest.version,
        "sha256": built.manifest.sha256,
        "size": built.manifest.size,
        "layer_cached": built.manifest.layer_cached,
        "layer_key": built.manifest.layer_key,
        "build_seconds": built.manifest.build_seconds,
    });
    g.emit(&value, |_| {
        let m = &built.manifest;
        let mut s = format!(
            "built {} ({}, sha256 {}) in {:.1}s{}\n",
            built.image.display(),
            human_size(m.size),
            &m.sha256[..16],
            m.build_seconds,
            if m.layer_cached {
                ", rootfs layer from cache"
            } else {
                ""
            }
        );
        if !built.drift.is_empty() {
            s.push_str("re-resolved (pinned versions no longer served):\n");
            for d in &built.drift {
                s.push_str(&format!("  {d}\n"));
            }
        }
        if !built.lock_changes.is_empty() {
            s.push_str(&format!("lock {} updated:\n", built.lock_path.display()));
            for c in built.lock_changes.iter().take(40) {
                s.push_str(&format!("  {c}\n"));
            }
            if built.lock_changes.len() > 40 {
                s.push_str(&format!("  … and {} more\n", built.lock_changes.len() - 40));
            }
        }
        s
    })?;
    Ok(0)
}
