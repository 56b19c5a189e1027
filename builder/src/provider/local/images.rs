//! The local image store: a directory of `<name>-<version>.qcow2` images with their manifests,
//! as `imagectl build --out DIR` writes them.

use crate::manifest::Manifest;
use crate::provider::ImageInfo;
use anyhow::{Context, Result};
use std::path::Path;

/// Every image in `dir` (by its manifest), oldest first; `name` filters by image name.
pub fn scan_images(dir: &Path, name: Option<&str>) -> Result<Vec<ImageInfo>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("listing images in {}", dir.display())),
    };
    for e in entries {
        let path = e.context("listing images")?.path();
        let Some(fname) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !fname.ends_with(".manifest.json") {
            continue;
        }
        let m = match Manifest::read(&path) {
            Ok(m) => m,
            Err(err) => {
                tracing::warn!("skipping {}: {err:#}", path.display());
                continue;
            }
        };
        if name.is_some_and(|n| n != m.name) {
            continue;
        }
        let image = dir.join(&m.image);
        if !image.is_file() {
            continue;
        }
        let image = std::fs::canonicalize(&image).unwrap_or(image);
        out.push(ImageInfo {
            name: m.name,
            version: m.version,
            sha256: m.sha256,
            built_at: m.built_at,
            location: image.to_string_lossy().into_owned(),
            nodes: Vec::new(),
        });
    }
    out.sort_by(|a, b| (&a.built_at, &a.version).cmp(&(&b.built_at, &b.version)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_found_by_manifest_and_ordered() {
        let d = tempfile::tempdir().unwrap();
        assert!(scan_images(&d.path().join("missing"), None)
            .unwrap()
            .is_empty());
        for (v, at) in [("2", "2025-02-01T00:00:00Z"), ("1", "2025-01-01T00:00:00Z")] {
            let img = format!("gitlab-runner-{v}.qcow2");
            std::fs::write(d.path().join(&img), b"x").unwrap();
            let m = serde_json::json!({
                "format": 1, "name": "gitlab-runner", "version": v, "image": img, "sha256": "ab",
                "size": 1, "virtual_size": 1, "spec_hash": "", "lock_hash": "", "inputs_hash": "",
                "profiles": [], "boot_modes": ["bios"], "kernel": "", "root_fs_uuid": "",
                "source_date_epoch": 0, "packages": [], "artifacts": [], "hygiene_removed": {},
                "layer_cached": true, "stage_seconds": {}, "build_seconds": 0.0, "built_at": at,
                "imagectl_version": "0"
            });
            std::fs::write(
                d.path().join(format!("gitlab-runner-{v}.manifest.json")),
                m.to_string(),
            )
            .unwrap();
        }
        let imgs = scan_images(d.path(), None).unwrap();
        let versions: Vec<&str> = imgs.iter().map(|i| i.version.as_str()).collect();
        assert_eq!(versions, ["1", "2"]);
        assert!(scan_images(d.path(), Some("other")).unwrap().is_empty());
    }
}
