//! Where imagectl keeps things on the build host: the cache (rootfs layers, .deb files,
//! artifacts) and the output directory of images.

use anyhow::Result;
use std::path::{Path, PathBuf};

/// The cache directory: `$IMAGECTL_CACHE_DIR`, else `$XDG_CACHE_HOME/imagectl`, else
/// `~/.cache/imagectl`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("IMAGECTL_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("imagectl");
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/imagectl"))
        .unwrap_or_else(|| PathBuf::from("/var/cache/imagectl"))
}

/// The cache's parts.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// Opens (creates) a cache at `root`.
    pub fn open(root: &Path) -> Result<Self> {
        for d in ["layers", "debs", "artifacts", "keys"] {
            fs_err::create_dir_all(root.join(d))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// The root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A cached rootfs layer tar by key.
    pub fn layer(&self, key: &str) -> PathBuf {
        self.root.join("layers").join(format!("{key}.tar"))
    }

    /// The metadata file of a layer.
    pub fn layer_meta(&self, key: &str) -> PathBuf {
        self.root.join("layers").join(format!("{key}.json"))
    }

    /// Downloaded .deb files for a suite.
    pub fn debs(&self, suite: &str) -> PathBuf {
        self.root.join("debs").join(suite)
    }

    /// Signing keys fetched by URL, by pinned fingerprint.
    pub fn keys(&self) -> PathBuf {
        self.root.join("keys")
    }

    /// A downloaded artifact by sha256.
    pub fn artifact(&self, sha256: &str) -> PathBuf {
        self.root.join("artifacts").join(sha256)
    }
}
