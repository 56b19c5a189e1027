//! `imagectl gc`: delete old templates that no VM uses; never one in use.

use super::publish::{connect, runtime};
use super::Global;
use crate::config::ProxmoxFlags;
use crate::publish::{gc_plan, list_images, ImageRow};
use anyhow::Context;
use serde::Serialize;

/// Arguments of `imagectl gc`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Templates to keep per image, node and storage (the newest), whether used or not.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub keep: u32,
    /// Only this image name.
    #[arg(long)]
    pub name: Option<String>,
    /// Show what would be deleted; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
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
    deleted: Vec<ImageRow>,
    kept: Vec<Kept>,
    failed: Vec<String>,
}

/// Runs `imagectl gc`.
pub fn run(g: &Global, a: Args) -> anyhow::Result<i32> {
    let (_settings, client) = connect(&a.pve)?;
    let rt = runtime()?;
    let report = rt.block_on(async {
        let listing = list_images(&client).await?;
        for p in &listing.problems {
            eprintln!("warning: cannot tell which VMs use the templates: {p}");
        }
        let plan = gc_plan(&listing, a.keep as usize, a.name.as_deref(), true);
        let mut report = Report {
            dry_run: a.dry_run,
            deleted: Vec::new(),
            kept: plan
                .keep
                .into_iter()
                .map(|(image, reason)| Kept { image, reason })
                .collect(),
            failed: Vec::new(),
        };
        if a.dry_run {
            report.deleted = plan.delete;
            return anyhow::Ok(report);
        }
        // Check usage again right before deleting: a clone may have started meanwhile.
        let fresh = list_images(&client).await.context("re-reading VM usage")?;
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
        anyhow::Ok(report)
    })?;
    g.emit(&report, text)?;
    Ok(if report.failed.is_empty() { 0 } else { 1 })
}

fn text(r: &Report) -> String {
    let mut s = String::new();
    let verb = if r.dry_run { "would delete" } else { "deleted" };
    for d in &r.deleted {
        s.push_str(&format!(
            "{verb} {} {} (VM {} on {})\n",
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
    if r.deleted.is_empty() && r.kept.is_empty() {
        s.push_str("no imagectl templates found\n");
    }
    s
}
