//! Which image versions are published where, which VMs use each, and what `gc` may delete.
//!
//! A VM uses a template when (first) its tags or notes say so: the `image-<version>` tag, the
//! image's sha256 in its notes, or `imagectl-template: <vmid>` in them — `clone_vm` (qemu-server
//! `src/PVE/API2/Qemu.pm`) copies tags and notes into a clone. Then by its disks: see
//! [`clone_of`]. When the config of some VM cannot be read, usage is unknown and `gc` deletes
//! nothing.

use super::{version_tag, Notes};
use crate::remote::pve::api::{Guest, VmConfig};
use crate::remote::pve::PveClient;
use anyhow::{Context, Result};
use futures_util::stream::{self, StreamExt};
use serde::Serialize;
use std::collections::BTreeMap;

/// One published template.
#[derive(Debug, Clone, Serialize)]
pub struct ImageRow {
    /// Image name.
    pub name: String,
    /// Image version.
    pub version: String,
    /// Image sha256.
    pub sha256: String,
    /// Build date.
    pub built_at: Option<String>,
    /// Node of the template.
    pub node: String,
    /// Storage of its disk.
    pub storage: Option<String>,
    /// VM id.
    pub vmid: u32,
    /// VM name.
    pub template: String,
    /// Disk size in bytes.
    pub size: Option<u64>,
    /// `ready`, `publishing` (another run is making it) or `half-made` (a failed run's).
    pub state: &'static str,
    /// VMs that use it.
    pub used_by: Vec<u32>,
}

/// The published templates and any VM whose usage could not be read.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    /// Templates, by name, version, node.
    pub images: Vec<ImageRow>,
    /// Problems reading the cluster (usage may be incomplete).
    pub problems: Vec<String>,
}

fn parse_size(s: &str) -> Option<u64> {
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = num.parse().ok()?;
    let mult = match unit {
        "" => 1u64,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => return None,
    };
    Some((n * mult as f64) as u64)
}

fn boot_disk(cfg: &VmConfig) -> Option<(String, Option<u64>)> {
    let v = cfg.get("scsi0").or_else(|| cfg.get("virtio0"))?;
    let storage = v.split(',').next()?.split_once(':')?.0.to_string();
    let size = v
        .split(',')
        .find_map(|p| p.strip_prefix("size="))
        .and_then(parse_size);
    Some((storage, size))
}

/// Lists the templates imagectl published and the VMs using each.
pub async fn list_images(pve: &PveClient) -> Result<Listing> {
    let guests = pve.guests().await.context("listing the cluster's VMs")?;
    let configs: Vec<(Guest, Result<VmConfig, String>)> = stream::iter(guests)
        .map(|g| async move {
            if g.kind != "qemu" {
                return (g, Ok(VmConfig::new()));
            }
            let c = pve
                .vm_config(&g.node, g.vmid)
                .await
                .map_err(|e| e.to_string());
            (g, c)
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let mut problems = Vec::new();
    let mut templates = Vec::new();
    for (g, cfg) in &configs {
        match cfg {
            Ok(cfg) if g.has_tag("imagectl") => {
                let notes = Notes::parse(cfg.get("description").map_or("", String::as_str));
                if notes.template_vmid == Some(g.vmid) {
                    templates.push((g, cfg, notes));
                }
            }
            Ok(_) => {}
            Err(e) => problems.push(format!("VM {} on {}: {e}", g.vmid, g.node)),
        }
    }
    let ours: Vec<u32> = templates.iter().map(|(g, _, _)| g.vmid).collect();
    let mut images = Vec::new();
    for (g, cfg, notes) in &templates {
        let version = notes.version.clone().unwrap_or_default();
        let sha = notes.sha256.clone().unwrap_or_default();
        let tag = version_tag(&version);
        let mut used_by: Vec<u32> = configs
            .iter()
            .filter(|(u, _)| u.vmid != g.vmid && !ours.contains(&u.vmid))
            .filter(|(u, ucfg)| {
                u.has_tag(&tag)
                    || ucfg.as_ref().is_ok_and(|c| {
                        let d = c.get("description").map_or("", String::as_str);
                        (!sha.is_empty() && d.contains(&sha))
                            || Notes::parse(d).template_vmid == Some(g.vmid)
                            || clone_of(&g.node, cfg, &u.node, c)
                    })
            })
            .map(|(u, _)| u.vmid)
            .collect();
        used_by.sort_unstable();
        let disk = boot_disk(cfg);
        let state = if !notes.half_made(g.template) {
            "ready"
        } else if notes.publishing.is_some() && !notes.stale() {
            "publishing"
        } else {
            "half-made"
        };
        images.push(ImageRow {
            name: notes.image.clone().unwrap_or_default(),
            version,
            sha256: sha,
            built_at: notes.built_at.clone(),
            node: g.node.clone(),
            storage: disk.as_ref().map(|d| d.0.clone()),
            vmid: g.vmid,
            template: g.name.clone().unwrap_or_default(),
            size: disk.and_then(|d| d.1).or(g.maxdisk),
            state,
            used_by,
        });
    }
    images.sort_by(|a, b| {
        (&a.name, &b.built_at, &a.node, a.vmid).cmp(&(&b.name, &a.built_at, &b.node, b.vmid))
    });
    Ok(Listing { images, problems })
}

/// The volume ids of a VM's disks (no CD-ROMs).
fn disk_volids(cfg: &VmConfig) -> Vec<&str> {
    cfg.iter()
        .filter(|(k, v)| super::node::is_disk_key(k) && !v.contains("media=cdrom"))
        .filter_map(|(_, v)| v.split(',').next())
        .filter(|v| v.contains(':'))
        .collect()
}

/// True when the disks of VM `cfg` (on `node`) show it to be a clone of template `tcfg` (on
/// `tnode`), for VMs whose tags and notes were changed.
///
/// * Where a linked clone's volume id names its base — pve-storage `clone_image` of
///   `src/PVE/Storage/Plugin.pm` (dir, NFS, CIFS, qcow2 on BTRFS:
///   `STORE:100/base-100-disk-0.qcow2/101/vm-101-disk-0.qcow2`), `ZFSPoolPlugin.pm` and
///   `RBDPlugin.pm` (`STORE:base-100-disk-0/vm-101-disk-0`) — it starts with the template's
///   volume id and a `/`.
/// * On LVM-thin it does not: `LvmThinPlugin.pm` `clone_image` returns a plain
///   `vm-101-disk-0`, a thin snapshot whose origin only LVM itself knows (`lvs -o origin`): its
///   `list_images` reports no parent and `Storage.pm` `vdisk_free` notes that "LVM-thin allows
///   deletion of still referenced base volumes". Raw images on BTRFS (`BTRFSPlugin.pm`) and RBD
///   clones of a snapshot are alike. What the API does show is the `meta` option
///   (`creation-qemu=…,ctime=…`), which qemu-server's create worker writes once
///   (`src/PVE/API2/Qemu.pm`, `MetaInfo.pm` `new_meta_info_string`) and `clone_vm` copies as it
///   is: a VM on the template's node with the template's `meta` and a disk on a storage of the
///   template's disks is taken for its clone. This errs on keeping: a full clone counts too,
///   and so does every template created on that node in the same second (`ctime` has seconds).
pub fn clone_of(tnode: &str, tcfg: &VmConfig, node: &str, cfg: &VmConfig) -> bool {
    let bases = disk_volids(tcfg);
    let disks = disk_volids(cfg);
    let names_base = disks.iter().any(|d| {
        bases
            .iter()
            .any(|b| d.strip_prefix(b).is_some_and(|rest| rest.starts_with('/')))
    });
    if names_base {
        return true;
    }
    let meta = |c: &VmConfig| c.get("meta").filter(|m| m.contains("ctime=")).cloned();
    let storage = |v: &str| v.split(':').next().unwrap_or_default().to_string();
    tnode == node
        && meta(tcfg).is_some()
        && meta(tcfg) == meta(cfg)
        && disks
            .iter()
            .any(|d| bases.iter().any(|b| storage(b) == storage(d)))
}

/// What `gc` will do.
#[derive(Debug, Clone, Serialize)]
pub struct GcPlan {
    /// Templates to delete.
    pub delete: Vec<ImageRow>,
    /// Templates kept, with the reason.
    pub keep: Vec<(ImageRow, String)>,
}

/// Keeps the newest `keep` ready templates per (image, node, storage), anything in use, anything
/// being published; deletes the rest. With `problems` (usage unknown) it deletes nothing.
pub fn gc_plan(listing: &Listing, keep: usize, only: Option<&str>, problems_block: bool) -> GcPlan {
    let mut groups: BTreeMap<(String, String, String), Vec<&ImageRow>> = BTreeMap::new();
    let mut plan = GcPlan {
        delete: Vec::new(),
        keep: Vec::new(),
    };
    for r in &listing.images {
        if only.is_some_and(|n| n != r.name) {
            continue;
        }
        groups
            .entry((
                r.name.clone(),
                r.node.clone(),
                r.storage.clone().unwrap_or_default(),
            ))
            .or_default()
            .push(r);
    }
    let blocked = problems_block && !listing.problems.is_empty();
    for rows in groups.values_mut() {
        rows.sort_by(|a, b| (&b.built_at, b.vmid).cmp(&(&a.built_at, a.vmid)));
        let mut ready_seen = 0;
        for r in rows.iter() {
            let reason = if r.state == "publishing" {
                Some("being published by another run".to_string())
            } else if r.state == "ready" && ready_seen < keep {
                ready_seen += 1;
                Some(format!("among the newest {keep}"))
            } else if !r.used_by.is_empty() {
                let ids: Vec<String> = r.used_by.iter().map(u32::to_string).collect();
                Some(format!("in use by VM {}", ids.join(", ")))
            } else if blocked {
                Some("usage unknown (some VM configs could not be read)".to_string())
            } else {
                None
            };
            match reason {
                Some(why) => plan.keep.push(((*r).clone(), why)),
                None => plan.delete.push((*r).clone()),
            }
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(vmid: u32, built: &str, used: &[u32], state: &'static str) -> ImageRow {
        ImageRow {
            name: "gr".into(),
            version: built.into(),
            sha256: format!("{vmid:064}"),
            built_at: Some(built.into()),
            node: "pve1".into(),
            storage: Some("local-lvm".into()),
            vmid,
            template: format!("gr-{built}"),
            size: Some(1 << 30),
            state,
            used_by: used.to_vec(),
        }
    }

    #[test]
    fn gc_keeps_newest_in_use_and_in_progress() {
        let l = Listing {
            images: vec![
                row(9000, "2025-01-01", &[], "ready"),
                row(9001, "2025-01-02", &[120], "ready"),
                row(9002, "2025-01-03", &[], "ready"),
                row(9003, "2025-01-04", &[], "ready"),
                row(9004, "2025-01-05", &[], "publishing"),
            ],
            problems: vec![],
        };
        let p = gc_plan(&l, 1, None, true);
        let del: Vec<u32> = p.delete.iter().map(|r| r.vmid).collect();
        assert_eq!(del, vec![9002, 9000]);
        let kept: Vec<(u32, &str)> = p.keep.iter().map(|(r, w)| (r.vmid, w.as_str())).collect();
        assert!(kept.contains(&(9003, "among the newest 1")));
        assert!(kept.contains(&(9001, "in use by VM 120")));
        assert!(kept.iter().any(|(v, _)| *v == 9004));
        let blocked = Listing {
            problems: vec!["VM 5: 595".into()],
            ..l
        };
        assert!(gc_plan(&blocked, 1, None, true).delete.is_empty());
    }

    fn cfg(pairs: &[(&str, &str)]) -> VmConfig {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn linked_clones_are_found_by_volume_name_or_by_meta() {
        let meta = "creation-qemu=9.2.0,ctime=1750000000";
        let lvm = cfg(&[
            ("scsi0", "local-lvm:base-100-disk-0,size=2G"),
            ("efidisk0", "local-lvm:base-100-disk-1,size=4M"),
            ("meta", meta),
        ]);
        // LVM-thin: the clone's volume names no base; meta (copied by clone_vm) does the work.
        let clone = cfg(&[("scsi0", "local-lvm:vm-101-disk-0,size=2G"), ("meta", meta)]);
        assert!(clone_of("pve1", &lvm, "pve1", &clone));
        assert!(!clone_of("pve1", &lvm, "pve2", &clone), "another node's VM");
        let other = cfg(&[
            ("scsi0", "local-lvm:vm-102-disk-0,size=2G"),
            ("meta", "creation-qemu=9.2.0,ctime=1750000001"),
        ]);
        assert!(!clone_of("pve1", &lvm, "pve1", &other));
        let elsewhere = cfg(&[("scsi0", "ceph-vm:vm-103-disk-0"), ("meta", meta)]);
        assert!(!clone_of("pve1", &lvm, "pve1", &elsewhere));
        // dir/NFS (Plugin.pm), ZFS and RBD: the volume id starts with the base's.
        let dir = cfg(&[("scsi0", "local:100/base-100-disk-0.qcow2,size=2G")]);
        let dir_clone = cfg(&[(
            "scsi0",
            "local:100/base-100-disk-0.qcow2/101/vm-101-disk-0.qcow2,size=2G",
        )]);
        assert!(clone_of("pve1", &dir, "pve2", &dir_clone));
        let rbd = cfg(&[("virtio0", "ceph-vm:base-100-disk-0,size=2G")]);
        let rbd_clone = cfg(&[("virtio0", "ceph-vm:base-100-disk-0/vm-101-disk-0")]);
        assert!(clone_of("pve1", &rbd, "pve3", &rbd_clone));
        let not = cfg(&[("scsi0", "ceph-vm:base-1000-disk-0/vm-101-disk-0")]);
        assert!(
            !clone_of("pve1", &rbd, "pve1", &not),
            "base-1000 is not base-100"
        );
        let cdrom = cfg(&[("ide2", "ceph-vm:base-100-disk-0/x,media=cdrom")]);
        assert!(!clone_of("pve1", &rbd, "pve1", &cdrom));
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("x"), None);
    }
}
