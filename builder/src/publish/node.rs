//! Publishing on one node: find an existing template or a half-made one, upload (or let the
//! node download) the image, create the VM from it, convert it to a template, remove the upload.

use super::{
    find_storage, import_filename, set, template_name, version_tag, Created, Firmware, NodeResult,
    Notes, PublishRequest,
};
use crate::config::VmidRange;
use crate::progress::Progress;
use crate::remote::pve::api::Guest;
use crate::remote::pve::{params, seg, PveClient, PveError};
use anyhow::{anyhow, Context, Result};
use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

/// Disk storage ids in a VM config (`scsi0: local-lvm:base-9000-disk-0,…`).
pub fn disk_storages(cfg: &crate::remote::pve::api::VmConfig) -> Vec<String> {
    cfg.iter()
        .filter(|(k, v)| is_disk_key(k) && !v.contains("media=cdrom"))
        .filter_map(|(_, v)| {
            v.split(',')
                .next()?
                .split_once(':')
                .map(|(s, _)| s.to_string())
        })
        .collect()
}

pub(super) fn is_disk_key(k: &str) -> bool {
    let base = k.trim_end_matches(|c: char| c.is_ascii_digit());
    base.len() < k.len()
        && matches!(
            base,
            "scsi" | "virtio" | "sata" | "ide" | "efidisk" | "tpmstate" | "unused"
        )
}

pub(super) async fn publish_on(
    pve: &PveClient,
    req: &PublishRequest,
    node: &str,
    shared: bool,
    progress: &Progress,
    created: &Mutex<Created>,
    warnings: &mut Vec<String>,
) -> Result<NodeResult> {
    let m = &req.manifest;
    let name = template_name(&m.name, &m.version);
    let stage = progress.stage(&format!("publish {node}"));
    stage.message("looking for an existing template");
    let guests = pve.guests().await.context("listing the cluster's VMs")?;
    let mut cleaned = Vec::new();
    for g in guests
        .iter()
        .filter(|g| g.kind == "qemu" && g.has_tag("imagectl"))
    {
        if !shared && g.node != node {
            continue;
        }
        let cfg = match pve.vm_config(&g.node, g.vmid).await {
            Ok(c) => c,
            Err(e) if e.is_not_found() => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("reading the config of VM {}", g.vmid))
            }
        };
        let notes = Notes::parse(cfg.get("description").map_or("", String::as_str));
        if notes.template_vmid != Some(g.vmid) {
            continue; // not a template of ours (a clone, a runner VM)
        }
        if notes.half_made(g.template) {
            if notes.sha256.as_deref() == Some(m.sha256.as_str()) || notes.stale() {
                stage.message(format!("removing half-made VM {} of a failed run", g.vmid));
                eprintln!(
                    "removing VM {} on {}: a half-made template left by a failed publish",
                    g.vmid, g.node
                );
                pve.destroy_vm(&g.node, g.vmid).await.with_context(|| {
                    format!("removing the half-made VM {} on {}", g.vmid, g.node)
                })?;
                cleaned.push(g.vmid);
            }
            continue;
        }
        if notes.sha256.as_deref() == Some(m.sha256.as_str())
            && notes.version.as_deref() == Some(m.version.as_str())
            && disk_storages(&cfg).iter().any(|s| s == &req.storage)
        {
            stage.done(format!(
                "{} already published as VM {} ({})",
                m.version, g.vmid, g.node
            ));
            return Ok(NodeResult {
                node: g.node.clone(),
                storage: req.storage.clone(),
                vmid: g.vmid,
                name: g.name.clone().unwrap_or(name),
                action: "exists",
                cleaned,
                uploaded_bytes: 0,
                upload_seconds: 0.0,
            });
        }
    }

    find_storage(pve, node, &req.import_storage, "import").await?;
    // The name PVE stores it under (normalised); the volume id PVE reports replaces it below.
    let filename = import_filename(&m.name, &m.version);
    let expected = super::import::expected_volid(&req.import_storage, &filename);
    let started = std::time::Instant::now();
    let mut uploaded_bytes = 0;
    let upid = if let Some(url) = &req.from_url {
        stage.message(format!("{node} downloads {url}"));
        pve.download_import(
            node,
            &req.import_storage,
            url,
            &filename,
            &m.sha256,
            req.from_url_verify,
        )
        .await
        .with_context(|| format!("asking {node} to download {url}"))?
    } else {
        let image = req
            .image
            .as_ref()
            .ok_or_else(|| anyhow!("no image file to upload"))?;
        let size = fs_err::metadata(image)?.len();
        drop(stage);
        let bar = progress.bytes(&format!("upload {node}"), size);
        let upid = pve
            .upload_import(node, &req.import_storage, &filename, image, &m.sha256, &bar)
            .await
            .with_context(|| {
                format!(
                    "uploading {} to {node}/{}",
                    image.display(),
                    req.import_storage
                )
            })?;
        bar.finish_and_clear();
        uploaded_bytes = size;
        upid
    };
    // From here the task may store the file even if this run stops waiting: clean it up then.
    set(created, |c| {
        c.import = Some((node.to_string(), expected.clone()))
    });
    let stage = progress.stage(&format!("template {node}"));
    stage.message("PVE verifies the image checksum");
    pve.wait_task(&upid, pve.options().task_timeout)
        .await
        .with_context(|| {
            format!("storing {expected} on {node} (PVE checks the sha256 and the image)")
        })?;
    let upload_seconds = started.elapsed().as_secs_f64();
    let volid =
        super::import::stored_volid(pve, node, &req.import_storage, &upid, &filename).await?;
    set(created, |c| {
        c.import = Some((node.to_string(), volid.clone()))
    });
    let transfer = if uploaded_bytes > 0 {
        format!(
            "; uploaded {} in {upload_seconds:.1}s ({}/s)",
            crate::util::human_size(uploaded_bytes),
            crate::util::human_size((uploaded_bytes as f64 / upload_seconds.max(0.001)) as u64)
        )
    } else {
        format!("; downloaded by the node in {upload_seconds:.1}s")
    };

    stage.message("creating the VM");
    let vmid = create_vm(pve, req, node, &name, &volid, created).await?;
    stage.message(format!("converting VM {vmid} to a template"));
    pve.run_task(
        &format!("/nodes/{}/qemu/{vmid}/template", seg(node)),
        Vec::new(),
    )
    .await
    .with_context(|| format!("converting VM {vmid} on {node} to a template"))?;
    let final_notes = Notes::for_image(m, vmid, req.firmware, None).render();
    pve.put::<serde_json::Value>(
        &format!("/nodes/{}/qemu/{vmid}/config", seg(node)),
        params([("description", final_notes)]),
    )
    .await
    .with_context(|| format!("marking template {vmid} on {node} as complete"))?;
    set(created, |c| c.vm = None);

    stage.message(format!("removing {volid}"));
    let removed = super::import::remove(pve, node, &volid).await;
    set(created, |c| c.import = None);
    if let Err(e) = removed {
        let w = format!("the template is ready, but the import volume stays: {e}");
        eprintln!("warning: {w}");
        warnings.push(w);
    }
    stage.done(format!("{name} is template {vmid}{transfer}"));
    Ok(NodeResult {
        node: node.into(),
        storage: req.storage.clone(),
        vmid,
        name,
        action: "created",
        cleaned,
        uploaded_bytes,
        upload_seconds,
    })
}

/// Creates the VM (import-from the uploaded volume), retrying with another id when PVE says the
/// id is taken (`/cluster/nextid` does not reserve). Returns its id once the create task is done.
async fn create_vm(
    pve: &PveClient,
    req: &PublishRequest,
    node: &str,
    name: &str,
    volid: &str,
    created: &Mutex<Created>,
) -> Result<u32> {
    let m = &req.manifest;
    let mut tried = HashSet::new();
    for _ in 0..8 {
        let vmid = allocate_vmid(pve, req.vmid_range, &tried).await?;
        tried.insert(vmid);
        let notes = Notes::for_image(m, vmid, req.firmware, Some(now_unix())).render();
        let mut net = format!("virtio,bridge={}", req.bridge);
        if let Some(v) = req.vlan {
            net.push_str(&format!(",tag={v}"));
        }
        let mut form = params([
            ("vmid", vmid.to_string()),
            ("name", name.to_string()),
            ("description", notes),
            ("tags", format!("imagectl;{}", version_tag(&m.version))),
            ("ostype", "l26".into()),
            ("scsihw", "virtio-scsi-single".into()),
            (
                "scsi0",
                format!(
                    "{}:0,import-from={volid},discard=on,iothread=1",
                    req.storage
                ),
            ),
            ("agent", "1".into()),
            ("serial0", "socket".into()),
            ("net0", net),
            ("boot", "order=scsi0;net0".into()),
            ("cores", req.cores.to_string()),
            ("memory", req.memory.to_string()),
        ]);
        // UEFI stays on PVE's default i440fx machine: on q35 a seed on ide2 sits behind AHCI,
        // which Debian's cloud kernel does not have, so the VM would never see its seed.
        if req.firmware == Firmware::Uefi {
            form.extend(params([
                ("bios", "ovmf".to_string()),
                (
                    "efidisk0",
                    format!("{}:1,efitype=4m,pre-enrolled-keys=0", req.storage),
                ),
            ]));
        }
        let path = format!("/nodes/{}/qemu", seg(node));
        let upid = match pve.post_task(&path, form).await {
            Ok(u) => u,
            Err(e) if e.is_already_exists() => {
                eprintln!(
                    "VM id {vmid} was taken meanwhile ({}); trying another",
                    e.message().unwrap_or("")
                );
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("creating VM {vmid} on {node}")),
        };
        set(created, |c| c.vm = Some((node.to_string(), vmid)));
        match pve.wait_task(&upid, pve.options().task_timeout).await {
            Ok(()) => return Ok(vmid),
            Err(e @ PveError::Task { .. }) if e.is_already_exists() => {
                // Somebody else's VM: it must not be cleaned up as ours.
                set(created, |c| c.vm = None);
                eprintln!("VM id {vmid} was taken meanwhile; trying another");
                continue;
            }
            Err(e) => {
                return Err(e).with_context(|| format!("creating VM {vmid} on {node} from {volid}"))
            }
        }
    }
    Err(anyhow!(
        "could not find a free VM id after {} attempts",
        tried.len()
    ))
}

/// A VM id that looks free: in the range (lowest free), else PVE's `/cluster/nextid`.
pub async fn allocate_vmid(
    pve: &PveClient,
    range: Option<VmidRange>,
    tried: &HashSet<u32>,
) -> Result<u32> {
    match range {
        None => {
            let id = pve
                .next_id()
                .await
                .context("asking PVE for the next free VM id")?;
            Ok(id)
        }
        Some(r) => {
            let taken: HashSet<u32> = pve
                .guests()
                .await
                .context("listing the cluster's VM ids")?
                .iter()
                .map(|g: &Guest| g.vmid)
                .collect();
            (r.first..=r.last)
                .find(|id| !taken.contains(id) && !tried.contains(id))
                .ok_or_else(|| anyhow!("no free VM id left in {}-{} (vmid_range)", r.first, r.last))
        }
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}
