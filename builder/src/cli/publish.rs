//! `imagectl publish`: put a baked image into Proxmox VE as a versioned template (HTTP API only).

use super::Global;
use crate::config::{self, ProxmoxFlags, PveSettings};
use crate::manifest::Manifest;
use crate::publish::{Firmware, PublishReport, PublishRequest};
use crate::remote::pve::PveClient;
use anyhow::{Context, Result};
use std::path::PathBuf;

/// Arguments of `imagectl publish`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The baked qcow2 (its `<image>.manifest.json` must be beside it), or the manifest itself.
    pub image: PathBuf,
    /// Node to publish on (default: [proxmox] node, else the cluster's only node).
    #[arg(long)]
    pub node: Option<String>,
    /// Storage for the template's disks (default: [publish] storage, else local-lvm).
    #[arg(long)]
    pub storage: Option<String>,
    /// File storage with `import` content that receives the image (default: [publish] import_storage, else local).
    #[arg(long)]
    pub import_storage: Option<String>,
    /// Bridge of the template's network card (default: [publish] bridge, else vmbr0).
    #[arg(long)]
    pub bridge: Option<String>,
    /// VLAN tag of the template's network card (default: [publish] vlan, else untagged).
    #[arg(long)]
    pub vlan: Option<u16>,
    /// Firmware of the template (default: from the manifest; bios when the image boots both).
    #[arg(long, value_enum)]
    pub firmware: Option<Firmware>,
    /// Publish on every online node when the storage is not shared (templates on local storage
    /// can only be cloned on their own node).
    #[arg(long)]
    pub all_nodes: bool,
    /// Let the node download the image from this URL instead of uploading it (IMAGE still names
    /// the manifest).
    #[arg(long, value_name = "URL")]
    pub from_url: Option<String>,
    /// With --from-url: the node does not verify the URL's TLS certificate.
    #[arg(long, requires = "from_url")]
    pub from_url_insecure: bool,
    /// vCPUs of the template (default: [publish] cores, else 2).
    #[arg(long)]
    pub cores: Option<u32>,
    /// Memory of the template in MiB (default: [publish] memory, else 2048).
    #[arg(long)]
    pub memory: Option<u32>,
    #[command(flatten)]
    pub pve: ProxmoxFlags,
}

/// Resolves the settings and connects (no request is made yet).
pub(super) fn connect(flags: &ProxmoxFlags) -> Result<(PveSettings, PveClient)> {
    let settings = config::resolve_from_env(flags)?;
    let client = PveClient::new(settings.client.clone())?;
    Ok((settings, client))
}

/// A runtime for one command (the CLI is synchronous; the PVE client is async).
pub(super) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn read_manifest(image: &std::path::Path) -> Result<(Option<PathBuf>, Manifest)> {
    let name = image
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if name.ends_with(".manifest.json") {
        let m = Manifest::read(image)?;
        let img = image.with_file_name(&m.image);
        return Ok((img.is_file().then_some(img), m));
    }
    let mpath = Manifest::path_for(image);
    if !mpath.is_file() {
        return Err(crate::error::input(format!(
            "{}: no manifest beside it ({} is missing); publish images made by `imagectl build`",
            image.display(),
            mpath.display()
        )));
    }
    let m = Manifest::read(&mpath)?;
    Ok((Some(image.to_path_buf()), m))
}

/// Runs `imagectl publish`.
pub fn run(g: &Global, a: Args) -> Result<i32> {
    let (image, manifest) = read_manifest(&a.image)?;
    if a.from_url.is_none() {
        match &image {
            Some(p) if p.is_file() => {
                let size = fs_err::metadata(p)?.len();
                if manifest.size != 0 && size != manifest.size {
                    return Err(crate::error::input(format!(
                        "{} is {size} bytes but its manifest says {}; rebuild or fix the manifest",
                        p.display(),
                        manifest.size
                    )));
                }
            }
            _ => {
                return Err(crate::error::input(format!(
                    "{} does not exist (or pass --from-url URL to let the node download it)",
                    a.image.display()
                )))
            }
        }
    }
    if let Some(u) = &a.from_url {
        if !(u.starts_with("https://") || u.starts_with("http://")) {
            return Err(crate::error::input(format!(
                "--from-url {u:?}: expected an http(s) URL"
            )));
        }
    }
    if manifest.sha256.len() != 64 || !manifest.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(crate::error::input(
            "the manifest's sha256 is not a SHA-256 hex digest",
        ));
    }
    let firmware = Firmware::choose(&manifest.boot_modes, a.firmware)?;
    let (settings, client) = connect(&a.pve)?;
    let p = &settings.publish;
    let req = PublishRequest {
        image,
        manifest,
        from_url: a.from_url.clone(),
        from_url_verify: !a.from_url_insecure,
        node: a.node.clone().or(settings.node.clone()),
        all_nodes: a.all_nodes || p.all_nodes.unwrap_or(false),
        storage: a
            .storage
            .clone()
            .or(p.storage.clone())
            .unwrap_or_else(|| "local-lvm".into()),
        import_storage: a
            .import_storage
            .clone()
            .or(p.import_storage.clone())
            .unwrap_or_else(|| "local".into()),
        bridge: a
            .bridge
            .clone()
            .or(p.bridge.clone())
            .unwrap_or_else(|| "vmbr0".into()),
        vlan: a.vlan.or(p.vlan),
        firmware,
        cores: a.cores.or(p.cores).unwrap_or(2),
        memory: a.memory.or(p.memory).unwrap_or(2048),
        vmid_range: settings.vmid_range,
    };
    check_pve_names(&req)?;
    if let Some(v) = req.vlan {
        if !(1..=4094).contains(&v) {
            return Err(crate::error::input(format!(
                "--vlan {v}: a VLAN tag is 1..4094"
            )));
        }
    }
    let progress = g.progress();
    let rt = runtime()?;
    rt.block_on(publish_preflight(&client, &req))?;
    let report = rt.block_on(crate::publish::publish(&client, &req, &progress))?;
    g.emit(&report, text)?;
    Ok(0)
}

/// Names and sizes go into PVE parameters (`net0=virtio,bridge=…`, storage ids, node paths), so
/// each must have PVE's own form (pve-common `src/PVE/JSONSchema.pm`: `parse_id` for storage
/// ids, `pve_verify_node_name`, the `pve-bridge-id` format) before anything is sent: a comma in
/// a bridge would add options to `net0`, a `/` in a storage or node would change the API path.
fn check_pve_names(req: &PublishRequest) -> Result<()> {
    use crate::error::input;
    let storage_id = |s: &str| {
        let b = s.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphabetic()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(c))
    };
    for (flag, v) in [
        ("--storage", &req.storage),
        ("--import-storage", &req.import_storage),
    ] {
        if !storage_id(v) {
            return Err(input(format!(
                "{flag} {v:?} is not a Proxmox storage id (a letter, then letters, digits, - _ .)"
            )));
        }
    }
    if let Some(n) = &req.node {
        let ok = !n.is_empty()
            && n.len() <= 63
            && !n.starts_with('-')
            && !n.ends_with('-')
            && n.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-');
        if !ok {
            return Err(input(format!(
                "--node {n:?} is not a Proxmox node name (letters, digits and -)"
            )));
        }
    }
    let bridge = &req.bridge;
    if bridge.is_empty()
        || !bridge
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
    {
        return Err(input(format!(
            "--bridge {bridge:?} is not a bridge name (letters, digits, - _ .)"
        )));
    }
    if !(1..=512).contains(&req.cores) {
        return Err(input(format!("--cores {}: use 1 to 512", req.cores)));
    }
    if !(256..=4_194_304).contains(&req.memory) {
        return Err(input(format!(
            "--memory {} MiB: use 256 to 4194304",
            req.memory
        )));
    }
    Ok(())
}

/// Version and privileges before anything is uploaded ([`crate::remote::pve::access`]).
async fn publish_preflight(
    client: &crate::remote::pve::PveClient,
    req: &PublishRequest,
) -> Result<()> {
    use crate::remote::pve::access::{preflight, publish_needs, Feature};
    let nodes: Vec<String> = match (&req.node, req.from_url.is_some()) {
        (_, false) => Vec::new(),
        (Some(n), true) => vec![n.clone()],
        (None, true) => client
            .nodes()
            .await
            .context("listing the cluster's nodes")?
            .into_iter()
            .filter(|n| n.online())
            .map(|n| n.node)
            .collect(),
    };
    preflight(client, "publish", &[Feature::ImportImage], |_| {
        publish_needs(
            &req.import_storage,
            &req.storage,
            &nodes,
            req.from_url.is_some(),
        )
    })
    .await?;
    Ok(())
}

fn text(r: &PublishReport) -> String {
    let mut s = String::new();
    for n in &r.results {
        let what = if n.action == "exists" {
            "already published as"
        } else {
            "published as"
        };
        s.push_str(&format!(
            "{} {} {what} template {} ({}) on {}/{}\n",
            r.image, r.version, n.vmid, n.name, n.node, n.storage
        ));
        if !n.cleaned.is_empty() {
            s.push_str(&format!(
                "  removed half-made VMs of failed runs: {:?}\n",
                n.cleaned
            ));
        }
    }
    for k in &r.skipped {
        s.push_str(&format!("skipped {}: {}\n", k.node, k.reason));
    }
    for w in &r.warnings {
        s.push_str(&format!("warning: {w}\n"));
    }
    s
}
