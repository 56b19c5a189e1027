//! `imagectl inspect`: what is in an image (or its manifest), and whether it is clean.

use super::Global;
use crate::inspect::{qcow2_header, RootFs};
use crate::manifest::Manifest;
use crate::util::{human_size, sha256_file};
use anyhow::Result;
use std::path::PathBuf;

/// Arguments of `imagectl inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A baked qcow2 image or its `.manifest.json`.
    pub path: PathBuf,
    /// List every installed package in text output.
    #[arg(long)]
    pub packages: bool,
}

/// Runs `imagectl inspect`; exit code 1 when a hygiene check fails.
pub fn run(g: &Global, a: Args) -> Result<i32> {
    match std::fs::metadata(&a.path) {
        Err(_) => {
            return Err(crate::error::input(format!(
                "{} does not exist",
                a.path.display()
            )))
        }
        Ok(m) if m.is_dir() => {
            return Err(crate::error::input(format!(
                "{} is a directory; inspect takes a .qcow2 image or its .manifest.json",
                a.path.display()
            )))
        }
        Ok(m) if !m.is_file() => {
            return Err(crate::error::input(format!(
                "{} is not a regular file (a pipe or device); inspect takes a .qcow2 image",
                a.path.display()
            )))
        }
        Ok(_) => {}
    }
    if a.path.extension().and_then(|e| e.to_str()) == Some("json") {
        let m = Manifest::read(&a.path)?;
        g.emit(&m, |m| manifest_text(m, a.packages))?;
        return Ok(0);
    }
    let header = qcow2_header(&a.path)?;
    let manifest_path = Manifest::path_for(&a.path);
    let manifest = manifest_path
        .is_file()
        .then(|| Manifest::read(&manifest_path))
        .transpose()?;
    let sha = sha256_file(&a.path)?;
    let st = g.progress().stage("inspect");
    let root = RootFs::open(&a.path)?;
    let hygiene = root.hygiene()?;
    let packages = root.packages()?;
    let image_info: Option<serde_json::Value> = root
        .read("/etc/imagectl/image.json")?
        .and_then(|b| serde_json::from_slice(&b).ok());
    st.done(format!("{} packages", packages.len()));
    let sha_matches = manifest.as_ref().map(|m| m.sha256 == sha);
    let ok = hygiene.iter().all(|c| c.ok) && !header.has_backing_file && sha_matches != Some(false);
    let value = serde_json::json!({
        "image": a.path,
        "sha256": sha,
        "size": fs_err::metadata(&a.path)?.len(),
        "qcow2": header,
        "image_info": image_info,
        "manifest": manifest,
        "manifest_sha256_matches": sha_matches,
        "hygiene": hygiene,
        "packages": packages.iter().map(|(n, v)| serde_json::json!({"name": n, "version": v})).collect::<Vec<_>>(),
        "ok": ok,
    });
    g.emit(&value, |_| {
        let mut s = format!("image     {}\n", a.path.display());
        s.push_str(&format!("sha256    {sha}\n"));
        if let Some(info) = &image_info {
            s.push_str(&format!(
                "version   {}\n",
                info.get("version").and_then(|v| v.as_str()).unwrap_or("?")
            ));
        }
        s.push_str(&format!(
            "qcow2     v{} {} virtual, {} clusters, {} compression, {}\n",
            header.version,
            human_size(header.virtual_size),
            human_size(header.cluster_size),
            header.compression,
            if header.has_backing_file {
                "HAS A BACKING FILE"
            } else {
                "flat"
            }
        ));
        match sha_matches {
            Some(true) => s.push_str("manifest  matches\n"),
            Some(false) => s.push_str("manifest  DOES NOT MATCH the image's sha256\n"),
            None => s.push_str("manifest  none beside the image\n"),
        }
        if let Some(m) = &manifest {
            s.push_str(&manifest_text(m, false));
        }
        s.push_str(&format!("packages  {} installed\n", packages.len()));
        if a.packages {
            for (n, v) in &packages {
                s.push_str(&format!("  {n} {v}\n"));
            }
        }
        s.push_str("hygiene\n");
        for c in &hygiene {
            s.push_str(&format!(
                "  [{}] {}{}\n",
                if c.ok { "ok" } else { "FAIL" },
                c.name,
                if c.ok {
                    String::new()
                } else {
                    format!(": {}", c.detail)
                }
            ));
        }
        s
    })?;
    Ok(if ok { 0 } else { 1 })
}

fn manifest_text(m: &Manifest, all_packages: bool) -> String {
    let mut s = format!(
        "name      {} {}\nboot      {}\nkernel    {}\nsize      {} (virtual {})\nspec      {}\nlock      {}\nbuilt     {} in {:.1}s{}\n",
        m.name,
        m.version,
        m.boot_modes.join(", "),
        m.kernel,
        human_size(m.size),
        human_size(m.virtual_size),
        &m.spec_hash[..16],
        &m.lock_hash[..16],
        m.built_at,
        m.build_seconds,
        if m.profiles.is_empty() { String::new() } else { format!(" (profiles: {})", m.profiles.join(", ")) }
    );
    for a in &m.artifacts {
        s.push_str(&format!(
            "artifact  {} {} sha256 {}\n",
            a.name,
            a.dest,
            &a.sha256[..16]
        ));
    }
    if all_packages {
        for p in &m.packages {
            s.push_str(&format!("  {} {}\n", p.name, p.version));
        }
    }
    s
}
