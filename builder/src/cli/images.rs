//! `imagectl images`: the image versions published on the cluster, where, and how many VMs use each.

use super::publish::{connect, runtime};
use super::Global;
use crate::config::ProxmoxFlags;
use crate::publish::Listing;
use crate::util::human_size;

/// Arguments of `imagectl images`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Only this image name.
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub pve: ProxmoxFlags,
}

/// Runs `imagectl images`.
pub fn run(g: &Global, a: Args) -> anyhow::Result<i32> {
    let (_settings, client) = connect(&a.pve)?;
    let mut listing = runtime()?.block_on(crate::publish::list_images(&client))?;
    if let Some(n) = &a.name {
        listing.images.retain(|r| &r.name == n);
    }
    for p in &listing.problems {
        eprintln!("warning: usage may be incomplete: {p}");
    }
    g.emit(&listing, text)?;
    Ok(0)
}

/// The listing as a table.
pub(super) fn text(l: &Listing) -> String {
    if l.images.is_empty() {
        return "no imagectl templates on this cluster\n".into();
    }
    let mut rows = vec![[
        "IMAGE", "VERSION", "NODE", "STORAGE", "VMID", "SIZE", "BUILT", "SHA256", "USED BY",
        "STATE",
    ]
    .map(String::from)];
    for r in &l.images {
        rows.push([
            r.name.clone(),
            r.version.clone(),
            r.node.clone(),
            r.storage.clone().unwrap_or_default(),
            r.vmid.to_string(),
            r.size.map(human_size).unwrap_or_default(),
            r.built_at.clone().unwrap_or_default(),
            r.sha256.chars().take(12).collect(),
            r.used_by.len().to_string(),
            r.state.to_string(),
        ]);
    }
    let mut widths = [0usize; 10];
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut s = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        s.push_str(line.join("  ").trim_end());
        s.push('\n');
    }
    s
}
