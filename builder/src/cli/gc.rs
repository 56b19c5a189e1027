//! `imagectl gc`: orphans first — runners without a VM, VMs without a runner, seeds nobody
//! needs — then, with `--keep N`, old Proxmox templates that no VM uses (never one in use).
//!
//! Orphans need GitLab settings; without them only the templates are looked at (and the report
//! says so). The provider is `--provider`, else Proxmox when a PVE endpoint is configured or
//! `--keep` is given, else local.

use super::publish::runtime;
use super::Global;
use crate::config::ProxmoxFlags;
use crate::error::input;
use crate::fleet::settings::GitlabFlags;
use crate::fleet::setup::{setup_all_fleets, FleetArgs, ProviderKind, PveArgs};
use crate::fleet::GcReport;
use crate::provider::AnyProvider;
use crate::publish::{gc_plan, list_images, ImageRow};
use crate::remote::pve::PveClient;
use anyhow::Context;
use serde::Serialize;
use std::path::PathBuf;

/// Arguments of `imagectl gc`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Also delete old templates (Proxmox), keeping this many of each image, node and storage (the newest).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub keep: Option<u32>,
    /// Templates: only this image name.
    #[arg(long)]
    pub name: Option<String>,
    /// Orphans: only this fleet (default: every fleet found).
    #[arg(long, value_name = "NAME")]
    pub fleet: Option<String>,
    /// Where the VMs run (default: proxmox when a PVE endpoint is set or --keep is given, else local).
    #[arg(long, value_enum)]
    pub provider: Option<ProviderKind>,
    /// Show what would be deleted; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Local provider: state directory (env IMAGECTL_STATE_DIR; default ~/.local/share/imagectl).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// GitLab settings (for orphan runners).
    #[command(flatten)]
    pub gitlab: GitlabFlags,
    /// Proxmox connection.
    #[command(flatten)]
    pub pve: ProxmoxFlags,
}

#[derive(Debug, Serialize)]
struct Kept {
    #[serde(flatten)]
    image: ImageRow,
    reason: String,
}

#[derive(Debug, Serialize)]
struct Report {
    dry_run: bool,
    /// Orphans removed; `null` when they were not looked at.
    orphans: Option<GcReport>,
    /// Why orphans were not looked at.
    orphans_skipped: Option<String>,
    deleted: Vec<ImageRow>,
    kept: Vec<Kept>,
    failed: Vec<String>,
}

/// A PVE endpoint from the flag, the environment or `[proxmox] endpoint` of the settings file.
fn pve_configured(a: &Args) -> anyhow::Result<bool> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    if a.pve.endpoint.is_some() || env(crate::config::env::ENDPOINT).is_some() {
        return Ok(true);
    }
    Ok(
        match crate::config::locate(a.pve.config.as_deref(), &env)? {
            Some(p) => crate::config::ConfigFile::read(&p)?
                .proxmox
                .endpoint
                .is_some(),
            None => false,
        },
    )
}

/// Runs `imagectl gc`.
pub fn run(g: &Global, a: Args) -> anyhow::Result<i32> {
    let kind = match a.provider {
        Some(k) => k,
        None if a.keep.is_some() || pve_configured(&a)? => ProviderKind::Proxmox,
        None => ProviderKind::Local,
    };
    if a.keep.is_some() && kind == ProviderKind::Local {
        return Err(input(
            "--keep deletes Proxmox templates; it needs --provider proxmox",
        ));
    }
    let fa = FleetArgs {
        fleet: a.fleet.clone().unwrap_or_default(),
        provider: Some(kind),
        gitlab: a.gitlab.clone(),
        state_dir: a.state_dir.clone(),
        images_dir: None,
        pve: a.pve.clone(),
        pve_fleet: PveArgs::default(),
    };
    let s = setup_all_fleets(&fa, false)?;
    let rt = runtime()?;
    let mut report = Report {
        dry_run: a.dry_run,
        orphans: None,
        orphans_skipped: None,
        deleted: Vec::new(),
        kept: Vec::new(),
        failed: Vec::new(),
    };
    rt.block_on(s.preflight(crate::fleet::preflight::Command::Gc))?;
    match &s.gitlab {
        Some((gitlab, _)) => {
            let r = rt.block_on(crate::fleet::gc_orphans(
                &s.provider,
                gitlab,
                a.fleet.as_deref(),
                Some(&s.seed_dir),
                a.dry_run,
            ))?;
            report.orphans = Some(r);
        }
        None => {
            let why =
                "no GitLab settings (GITLAB_URL, GITLAB_TOKEN): orphan runners and VMs not checked";
            report.orphans_skipped = Some(why.into());
        }
    }
    if let (Some(keep), AnyProvider::Proxmox(p)) = (a.keep, &s.provider) {
        rt.block_on(templates(p.client(), keep, a.name.as_deref(), &mut report))?;
    }
    g.emit(&report, text)?;
    let orphan_failures = report
        .orphans
        .as_ref()
        .is_some_and(|o| !o.failed.is_empty());
    Ok(if report.failed.is_empty() && !orphan_failures {
        0
    } else {
        1
    })
}

async fn templates(
    client: &PveClient,
    keep: u32,
    name: Option<&str>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let listing = list_images(client).await?;
    for p in &listing.problems {
        eprintln!("warning: cannot tell which VMs use the templates: {p}");
    }
    let plan = gc_plan(&listing, keep as usize, name, true);
    report.kept = plan
        .keep
        .into_iter()
        .map(|(image, reason)| Kept { image, reason })
        .collect();
    if report.dry_run {
        report.deleted = plan.delete;
        return Ok(());
    }
    // Check usage again right before deleting: a clone may have started meanwhile.
    let fresh = list_images(client).await.context("re-reading VM usage")?;
    for r in plan.delete {
        let now = fresh.images.iter().find(|x| x.vmid == r.vmid);
        if let Some(now) = now.filter(|x| !x.used_by.is_empty()) {
            report.kept.push(Kept {
                reason: format!("in use by VM {:?} (since the plan)", now.used_by),
                image: r,
            });
            continue;
        }
        eprintln!(
            "deleting template {} ({} {}) on {}",
            r.vmid, r.name, r.version, r.node
        );
        match client.destroy_vm(&r.node, r.vmid).await {
            Ok(()) => report.deleted.push(r),
            Err(e) => report
                .failed
                .push(format!("deleting template {} on {}: {e}", r.vmid, r.node)),
        }
    }
    Ok(())
}

fn text(r: &Report) -> String {
    let mut s = String::new();
    let verb = if r.dry_run { "would delete" } else { "deleted" };
    match (&r.orphans, &r.orphans_skipped) {
        (Some(o), _) => {
            for id in &o.runners_deleted {
                s.push_str(&format!("{verb} orphan runner {id}\n"));
            }
            for v in &o.vms_destroyed {
                s.push_str(&format!("{verb} orphan VM {v}\n"));
            }
            for v in &o.seeds_deleted {
                s.push_str(&format!("{verb} orphan seed {v}\n"));
            }
            for v in &o.skipped {
                s.push_str(&format!("skipped {v}\n"));
            }
            for f in &o.failed {
                s.push_str(&format!("failed: {}: {}\n", f.vm, f.error));
            }
            for u in &o.unchecked {
                s.push_str(&format!("not checked: {u}\n"));
            }
            if o.runners_deleted.is_empty()
                && o.vms_destroyed.is_empty()
                && o.seeds_deleted.is_empty()
            {
                s.push_str(&format!("no orphans in {} fleet(s)\n", o.fleets.len()));
            }
        }
        (None, Some(why)) => s.push_str(&format!("orphans: {why}\n")),
        (None, None) => {}
    }
    for d in &r.deleted {
        s.push_str(&format!(
            "{verb} template {} {} (VM {} on {})\n",
            d.name, d.version, d.vmid, d.node
        ));
    }
    for k in &r.kept {
        s.push_str(&format!(
            "kept {} {} (VM {} on {}): {}\n",
            k.image.name, k.image.version, k.image.vmid, k.image.node, k.reason
        ));
    }
    for f in &r.failed {
        s.push_str(&format!("failed: {f}\n"));
    }
    s
}
