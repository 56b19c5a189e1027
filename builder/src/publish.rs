//! Publishing a baked image to Proxmox VE as a versioned template, listing the published versions,
//! and collecting old ones — over the HTTP API only.
//!
//! A template carries its facts in PVE itself: tags `imagectl;image-<version>` and notes (the VM
//! description) with the image's name, version, sha256, spec/lock hashes, build date and
//! `imagectl-template: <its own vmid>`. While it is being made the notes also hold
//! `imagectl-publishing: <unix time>`; a VM whose notes name itself and still hold that marker,
//! or that is not a template, is a half-made one from a failed run and is removed on the next
//! publish. A clone copies the notes but not the VM id, so it is never mistaken for one.
//! Publishing is idempotent: a ready template with the same sha256 and version on the same
//! storage (and node, unless the storage is shared) means there is nothing to do.

mod import;
mod node;
mod notes;
mod usage;

pub use node::{allocate_vmid, disk_storages};
pub use notes::Notes;
pub use usage::{gc_plan, list_images, GcPlan, ImageRow, Listing};

use crate::config::VmidRange;
use crate::manifest::Manifest;
use crate::progress::Progress;
use crate::remote::pve::api::Storage;
use crate::remote::pve::PveClient;
use anyhow::{anyhow, Context, Result};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Mutex;

/// Firmware of the template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// SeaBIOS (PVE's default).
    Bios,
    /// OVMF, with an EFI vars disk.
    Uefi,
}

impl Firmware {
    /// The firmware for an image's boot modes and the user's choice: bios when the image boots
    /// both (PVE's default), unless asked otherwise.
    pub fn choose(boot_modes: &[String], wanted: Option<Firmware>) -> Result<Firmware> {
        let has = |m: &str| boot_modes.iter().any(|b| b.eq_ignore_ascii_case(m));
        match wanted {
            Some(Firmware::Bios) if !has("bios") => Err(crate::error::input(
                "--firmware bios: the image does not boot with BIOS (its manifest lists only uefi)",
            )),
            Some(Firmware::Uefi) if !has("uefi") => Err(crate::error::input(
                "--firmware uefi: the image does not boot with UEFI (its manifest lists only bios)",
            )),
            Some(f) => Ok(f),
            None if has("bios") => Ok(Firmware::Bios),
            None if has("uefi") => Ok(Firmware::Uefi),
            None => Err(crate::error::input(
                "the image manifest lists no boot mode (bios/uefi)",
            )),
        }
    }
}

/// What to publish, and where.
#[derive(Debug, Clone)]
pub struct PublishRequest {
    /// The local qcow2 (uploaded unless `from_url`).
    pub image: Option<PathBuf>,
    /// Its manifest.
    pub manifest: Manifest,
    /// Let the node download the image from here instead.
    pub from_url: Option<String>,
    /// With `from_url`: verify the URL's certificate on the node.
    pub from_url_verify: bool,
    /// The node (None: the only node, or the first online one with `all_nodes`).
    pub node: Option<String>,
    /// Publish on every online node when `storage` is not shared.
    pub all_nodes: bool,
    /// Storage of the template's disks.
    pub storage: String,
    /// File storage with `import` content that receives the image.
    pub import_storage: String,
    /// Bridge of net0.
    pub bridge: String,
    /// VLAN tag of net0.
    pub vlan: Option<u16>,
    /// Firmware.
    pub firmware: Firmware,
    /// vCPUs.
    pub cores: u32,
    /// Memory in MiB.
    pub memory: u32,
    /// VM ids to allocate from (None: `/cluster/nextid`).
    pub vmid_range: Option<VmidRange>,
}

/// What happened on one node.
#[derive(Debug, Clone, Serialize)]
pub struct NodeResult {
    /// Node.
    pub node: String,
    /// Storage of the template's disks.
    pub storage: String,
    /// VM id of the template.
    pub vmid: u32,
    /// Its name.
    pub name: String,
    /// `created`, or `exists` when this image was already published there.
    pub action: &'static str,
    /// Half-made VMs of failed runs that were removed.
    pub cleaned: Vec<u32>,
    /// Bytes uploaded (0 when nothing was sent).
    pub uploaded_bytes: u64,
    /// Seconds the upload (or download) took.
    pub upload_seconds: f64,
}

/// A node that was left out.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// Node.
    pub node: String,
    /// Why.
    pub reason: String,
}

/// The result of `imagectl publish`.
#[derive(Debug, Clone, Serialize)]
pub struct PublishReport {
    /// Image name.
    pub image: String,
    /// Image version.
    pub version: String,
    /// Image sha256.
    pub sha256: String,
    /// Firmware of the template(s).
    pub firmware: Firmware,
    /// One entry per node published on.
    pub results: Vec<NodeResult>,
    /// Nodes skipped (offline).
    pub skipped: Vec<Skipped>,
    /// Problems that did not stop the publish (e.g. an import volume that could not be removed).
    pub warnings: Vec<String>,
}

/// What this run created and must remove if it fails.
#[derive(Debug, Default)]
pub struct Created {
    /// (node, vmid) of a VM being made.
    pub vm: Option<(String, u32)>,
    /// (node, volid) of an uploaded import volume.
    pub import: Option<(String, String)>,
}

/// A PVE VM name (a DNS name) for `<image-name>-<version>`.
pub fn template_name(name: &str, version: &str) -> String {
    let raw = format!("{name}-{version}");
    let mut out = String::new();
    for c in raw.chars() {
        let c = if c.is_ascii_alphanumeric() || c == '.' {
            c
        } else {
            '-'
        };
        if (c == '-' || c == '.') && (out.is_empty() || out.ends_with(['-', '.'])) {
            continue;
        }
        out.push(c);
    }
    let out = out.trim_end_matches(['-', '.']).to_string();
    if out.is_empty() {
        "imagectl-image".into()
    } else {
        out
    }
}

/// A PVE tag (`[a-z0-9_][a-z0-9_+.-]*`) for a value.
pub fn tag_value(v: &str) -> String {
    let t: String = v
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+.-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    if t.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
        t
    } else {
        format!("_{t}")
    }
}

/// The `image-<version>` tag.
pub fn version_tag(version: &str) -> String {
    format!("image-{}", tag_value(version))
}

/// The import file name for an image, `imagectl-<name>-<version>.qcow2`, exactly as PVE will
/// store it (pve-storage `src/PVE/Storage.pm` `normalize_content_filename`: `+`, `=`, `~`, `:` …
/// become `_`), so that the name sent is the name stored.
pub fn import_filename(name: &str, version: &str) -> String {
    crate::remote::pve::upload::content_filename(&format!("imagectl-{name}-{version}.qcow2"))
}

/// Publishes; on failure removes what this run made (the VM and the import volume).
pub async fn publish(
    pve: &PveClient,
    req: &PublishRequest,
    progress: &Progress,
) -> Result<PublishReport> {
    let created = Mutex::new(Created::default());
    let result = tokio::select! {
        r = publish_inner(pve, req, progress, &created) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    match result {
        Ok(r) => Ok(r),
        Err(e) => {
            let taken = std::mem::take(&mut *created.lock().unwrap_or_else(|p| p.into_inner()));
            let problems = cleanup(pve, &taken).await;
            if problems.is_empty() {
                Err(e)
            } else {
                Err(e.context(format!(
                    "cleaning up after the failure also failed: {}",
                    problems.join("; ")
                )))
            }
        }
    }
}

/// Removes the VM and import volume of a failed run; returns what could not be removed.
pub async fn cleanup(pve: &PveClient, c: &Created) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some((node, vmid)) = &c.vm {
        eprintln!("cleaning up: removing VM {vmid} on {node}");
        if let Err(e) = pve.destroy_vm(node, *vmid).await {
            if !e.is_not_found() {
                problems.push(format!("removing VM {vmid} on {node}: {e}"));
            }
        }
    }
    if let Some((node, volid)) = &c.import {
        eprintln!("cleaning up: removing {volid} on {node}");
        if let Err(e) = import::remove(pve, node, volid).await {
            problems.push(e);
        }
    }
    problems
}

pub(super) fn set<T>(created: &Mutex<Created>, f: impl FnOnce(&mut Created) -> T) -> T {
    f(&mut created.lock().unwrap_or_else(|p| p.into_inner()))
}

async fn publish_inner(
    pve: &PveClient,
    req: &PublishRequest,
    progress: &Progress,
    created: &Mutex<Created>,
) -> Result<PublishReport> {
    let m = &req.manifest;
    let nodes = pve.nodes().await.context("listing the cluster's nodes")?;
    let names: Vec<&str> = nodes.iter().map(|n| n.node.as_str()).collect();
    let first = match &req.node {
        Some(n) => nodes.iter().find(|x| &x.node == n).ok_or_else(|| {
            crate::error::input(format!(
                "node {n:?} is not in the cluster (nodes: {})",
                names.join(", ")
            ))
        })?,
        None if nodes.len() == 1 => &nodes[0],
        None if req.all_nodes => nodes
            .iter()
            .find(|n| n.online())
            .ok_or_else(|| anyhow!("no node of the cluster is online"))?,
        None => {
            return Err(crate::error::input(format!(
                "the cluster has {} nodes ({}); pass --node NAME or --all-nodes",
                nodes.len(),
                names.join(", ")
            )))
        }
    };
    if !first.online() && !req.all_nodes {
        return Err(anyhow!(
            "node {} is {} (not online); nothing was published",
            first.node,
            first.status
        ));
    }
    let first_store = find_storage(pve, &first.node, &req.storage, "images").await?;
    let mut targets = vec![first.node.clone()];
    let mut skipped = Vec::new();
    if req.all_nodes && !first_store.shared {
        targets.clear();
        for n in &nodes {
            if n.online() {
                if n.node != first.node {
                    if let Err(e) = find_storage(pve, &n.node, &req.storage, "images").await {
                        eprintln!("warning: skipping node {}: {e:#}", n.node);
                        skipped.push(Skipped {
                            node: n.node.clone(),
                            reason: format!("{e:#}"),
                        });
                        continue;
                    }
                }
                targets.push(n.node.clone());
            } else {
                eprintln!("warning: node {} is {}; skipping it", n.node, n.status);
                skipped.push(Skipped {
                    node: n.node.clone(),
                    reason: format!("node is {}", n.status),
                });
            }
        }
    } else if req.all_nodes {
        eprintln!(
            "storage {} is shared: publishing once, on {}",
            req.storage, first.node
        );
    }
    let mut report = PublishReport {
        image: m.name.clone(),
        version: m.version.clone(),
        sha256: m.sha256.clone(),
        firmware: req.firmware,
        results: Vec::new(),
        skipped,
        warnings: Vec::new(),
    };
    for node in &targets {
        let r = node::publish_on(
            pve,
            req,
            node,
            first_store.shared,
            progress,
            created,
            &mut report.warnings,
        )
        .await
        .with_context(|| {
            format!(
                "publishing {} {} on {node}/{}",
                m.name, m.version, req.storage
            )
        })?;
        report.results.push(r);
    }
    Ok(report)
}

pub(super) async fn find_storage(
    pve: &PveClient,
    node: &str,
    storage: &str,
    content: &str,
) -> Result<Storage> {
    let list = pve
        .storages(node)
        .await
        .with_context(|| format!("listing the storages of {node}"))?;
    let names: Vec<&str> = list.iter().map(|s| s.storage.as_str()).collect();
    let s = list.iter().find(|s| s.storage == storage).ok_or_else(|| {
        crate::error::input(format!(
            "storage {storage:?} is not available on node {node} (there: {})",
            names.join(", ")
        ))
    })?;
    if !s.allows(content) {
        let hint = if content == "import" {
            format!(
                "; add `import` to its content types (Datacenter → Storage → {storage} → Content, \
                 or `pvesm set {storage} --content {},import`)",
                s.content
            )
        } else {
            String::new()
        };
        return Err(crate::error::input(format!(
            "storage {storage:?} on {node} does not take {content} content (it has: {}){hint}",
            s.content
        )));
    }
    Ok(s.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_names_and_tags_use_pve_charset() {
        assert_eq!(
            template_name("gitlab-runner", "2024.06.01-3"),
            "gitlab-runner-2024.06.01-3"
        );
        assert_eq!(
            template_name("gitlab_runner", "1.0+b2~rc1"),
            "gitlab-runner-1.0-b2-rc1"
        );
        assert_eq!(template_name("x", "--"), "x");
        assert_eq!(version_tag("1.0+B2~rc1"), "image-1.0+b2-rc1");
        assert_eq!(import_filename("g r", "1:2"), "imagectl-g_r-1_2.qcow2");
        assert_eq!(
            import_filename("gitlab-runner", "2.0+b1=x~y"),
            "imagectl-gitlab-runner-2.0_b1_x_y.qcow2"
        );
        assert!(crate::remote::pve::upload::valid_import_name(
            &import_filename("g r", "1:2~x")
        ));
    }

    #[test]
    fn firmware_follows_the_manifest() {
        let both = vec!["bios".to_string(), "uefi".to_string()];
        assert_eq!(Firmware::choose(&both, None).unwrap(), Firmware::Bios);
        assert_eq!(
            Firmware::choose(&both, Some(Firmware::Uefi)).unwrap(),
            Firmware::Uefi
        );
        let uefi = vec!["uefi".to_string()];
        assert_eq!(Firmware::choose(&uefi, None).unwrap(), Firmware::Uefi);
        let e = Firmware::choose(&uefi, Some(Firmware::Bios)).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 2);
    }

    #[test]
    fn disks_name_their_storage() {
        let mut cfg = crate::remote::pve::api::VmConfig::new();
        cfg.insert("scsi0".into(), "local-lvm:base-9000-disk-1,size=2G".into());
        cfg.insert("ide2".into(), "local:iso/seed.iso,media=cdrom".into());
        cfg.insert("net0".into(), "virtio=AA,bridge=vmbr0".into());
        assert_eq!(disk_storages(&cfg), vec!["local-lvm".to_string()]);
    }
}
