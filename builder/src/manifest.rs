//! The manifest written beside every image: what is in it and how it was made.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One package in the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
}

/// One artifact in the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactInfo {
    /// Name.
    pub name: String,
    /// Source URL.
    pub url: String,
    /// sha256.
    pub sha256: String,
    /// Destination in the image.
    pub dest: String,
}

/// `<image>.manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version.
    pub format: u32,
    /// Image name.
    pub name: String,
    /// Image version.
    pub version: String,
    /// File name of the qcow2, beside the manifest.
    pub image: String,
    /// sha256 of the qcow2 file.
    pub sha256: String,
    /// Size of the qcow2 file in bytes.
    pub size: u64,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// sha256 of the spec after profiles (canonical JSON).
    pub spec_hash: String,
    /// sha256 of the lock file.
    pub lock_hash: String,
    /// sha256 of all inputs (spec, lock, files, artifacts, agent).
    pub inputs_hash: String,
    /// Profiles applied.
    pub profiles: Vec<String>,
    /// Firmware the image boots with: `bios`, `uefi`.
    pub boot_modes: Vec<String>,
    /// Kernel version.
    pub kernel: String,
    /// Root filesystem UUID.
    pub root_fs_uuid: String,
    /// SOURCE_DATE_EPOCH used.
    pub source_date_epoch: i64,
    /// Installed packages.
    pub packages: Vec<Package>,
    /// Artifacts.
    pub artifacts: Vec<ArtifactInfo>,
    /// Hygiene: what the build removed, by rule.
    pub hygiene_removed: BTreeMap<String, usize>,
    /// The snapshot archive timestamp the lock was resolved against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Pins re-resolved because no source served them any more, one line each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drift: Vec<String>,
    /// Whether the root layer came from the cache.
    pub layer_cached: bool,
    /// The root layer's cache key.
    #[serde(default)]
    pub layer_key: String,
    /// Seconds per build stage.
    pub stage_seconds: BTreeMap<String, f64>,
    /// Total build seconds.
    pub build_seconds: f64,
    /// When it was built (RFC 3339, wall clock; not part of the image).
    pub built_at: String,
    /// imagectl version.
    pub imagectl_version: String,
}

impl Manifest {
    /// The manifest path for an image path: `x.qcow2` → `x.manifest.json`.
    pub fn path_for(image: &Path) -> PathBuf {
        image.with_extension("manifest.json")
    }

    /// Reads a manifest.
    pub fn read(path: &Path) -> Result<Manifest> {
        let text = fs_err::read_to_string(path)?;
        serde_json::from_str(&text).map_err(|e| {
            crate::error::input(format!("{}: not an imagectl manifest: {e}", path.display()))
        })
    }

    /// Writes a manifest atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::util::write_atomic(path, &serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }
}
