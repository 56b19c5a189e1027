//! Reconcile planning, as pure functions: what exists + what is wanted → what to do.
//!
//! Rules (documented in `docs/fleet.md`):
//! * Unhealthy VMs (QEMU/VM not running, runner gone at GitLab, agent failed) are removed and do
//!   not count towards N.
//! * Scaling down retires **oldest first**, VMs on another image version before VMs on the
//!   target version: the fleet converges on the target image while it shrinks.
//! * VMs on another image version than the target are replaced one for one (rolling, surge).
//! * The deficit (N − kept) is created on the target image.

use crate::provider::{NodeInfo, VmInfo};
use serde::Serialize;
use std::collections::BTreeMap;

/// What the planner needs to know about one existing VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmView {
    /// VM name.
    pub name: String,
    /// Creation time (RFC 3339; sorts chronologically).
    pub created_at: String,
    /// Image version.
    pub version: String,
    /// Running and registered, with its runner present at GitLab.
    pub healthy: bool,
}

/// What to do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Unhealthy VMs to remove (do not count towards N).
    pub remove_broken: Vec<String>,
    /// New VMs to create on the target image (the deficit).
    pub create: usize,
    /// Healthy VMs on another version, to replace one for one (oldest first).
    pub replace: Vec<String>,
    /// Healthy VMs to drain and delete (scale down; oldest first).
    pub retire: Vec<String>,
    /// Healthy VMs kept as they are.
    pub keep: Vec<String>,
}

impl Plan {
    /// True when nothing needs doing.
    pub fn is_noop(&self) -> bool {
        self.remove_broken.is_empty()
            && self.create == 0
            && self.replace.is_empty()
            && self.retire.is_empty()
    }
}

/// Plans a fleet of `desired` healthy VMs on `target_version`. With `target_version = None`
/// existing VMs are never replaced for their version (plain scaling).
pub fn reconcile(current: &[VmView], desired: usize, target_version: Option<&str>) -> Plan {
    let mut plan = Plan::default();
    let mut healthy: Vec<&VmView> = Vec::new();
    for v in current {
        if v.healthy {
            healthy.push(v);
        } else {
            plan.remove_broken.push(v.name.clone());
        }
    }
    let off = |v: &VmView| target_version.is_some_and(|t| t != v.version);
    // Retire order: other versions first, then oldest first.
    healthy
        .sort_by(|a, b| (!off(a), &a.created_at, &a.name).cmp(&(!off(b), &b.created_at, &b.name)));
    let excess = healthy.len().saturating_sub(desired);
    plan.retire = healthy[..excess].iter().map(|v| v.name.clone()).collect();
    let mut kept: Vec<&VmView> = healthy[excess..].to_vec();
    kept.sort_by(|a, b| (&a.created_at, &a.name).cmp(&(&b.created_at, &b.name)));
    for v in &kept {
        if off(v) {
            plan.replace.push(v.name.clone());
        } else {
            plan.keep.push(v.name.clone());
        }
    }
    plan.create = desired.saturating_sub(kept.len());
    plan
}

/// Picks nodes for `n` new VMs: spread (fewest VMs of the fleet first), then most free memory;
/// nodes that are offline or lack `memory_mib` are skipped. Returns fewer than `n` names when
/// the nodes are full.
pub fn place(nodes: &[NodeInfo], fleet_vms: &[VmInfo], n: usize, memory_mib: u32) -> Vec<String> {
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for v in fleet_vms {
        *count.entry(v.node.as_str()).or_default() += 1;
    }
    let mut free: BTreeMap<&str, u64> = nodes
        .iter()
        .filter(|n| n.online)
        .map(|n| (n.name.as_str(), n.free_memory_mib))
        .collect();
    let mut out = Vec::new();
    for _ in 0..n {
        let best = free
            .iter()
            .filter(|(_, &f)| f >= u64::from(memory_mib))
            .min_by(|(a, fa), (b, fb)| {
                let ca = count.get(*a).copied().unwrap_or(0);
                let cb = count.get(*b).copied().unwrap_or(0);
                ca.cmp(&cb).then(fb.cmp(fa)).then(a.cmp(b))
            })
            .map(|(name, _)| *name);
        let Some(name) = best else { break };
        *count.entry(name).or_default() += 1;
        if let Some(f) = free.get_mut(name) {
            *f -= u64::from(memory_mib);
        }
        out.push(name.to_string());
    }
    out
}

/// A new VM name `<fleet>-<6 hex>` that is not in `taken`.
pub fn new_name(fleet: &str, taken: &[String]) -> String {
    loop {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("{fleet}-{}", &id[..6]);
        if !taken.contains(&name) {
            return name;
        }
    }
}

/// The version before `current` in `versions` (oldest first), if any.
pub fn previous_version<'a>(versions: &'a [String], current: &str) -> Option<&'a str> {
    let i = versions.iter().position(|v| v == current)?;
    i.checked_sub(1).map(|j| versions[j].as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::VmState;

    fn vm(name: &str, t: u32, version: &str, healthy: bool) -> VmView {
        VmView {
            name: name.into(),
            created_at: format!("2025-01-01T00:00:{t:02}Z"),
            version: version.into(),
            healthy,
        }
    }

    #[test]
    fn same_count_is_a_noop() {
        let cur = [vm("a", 1, "1", true), vm("b", 2, "1", true)];
        let p = reconcile(&cur, 2, Some("1"));
        assert!(p.is_noop(), "{p:?}");
        assert_eq!(p.keep, ["a", "b"]);
        assert!(reconcile(&cur, 2, None).is_noop());
        assert!(reconcile(&[], 0, Some("1")).is_noop());
    }

    #[test]
    fn scale_up_creates_the_deficit_and_replaces_broken() {
        let cur = [vm("a", 1, "1", true), vm("b", 2, "1", false)];
        let p = reconcile(&cur, 3, Some("1"));
        assert_eq!(p.remove_broken, ["b"]);
        assert_eq!(p.create, 2);
        assert!(p.retire.is_empty() && p.replace.is_empty());
    }

    #[test]
    fn scale_down_retires_oldest_first_and_other_versions_before_that() {
        let cur = [
            vm("new", 3, "1", true),
            vm("old", 1, "1", true),
            vm("mid", 2, "1", true),
        ];
        let p = reconcile(&cur, 1, Some("1"));
        assert_eq!(p.retire, ["old", "mid"]);
        assert_eq!(p.keep, ["new"]);
        assert_eq!(p.create, 0);
        let cur = [
            vm("old", 1, "2", true),
            vm("mid", 2, "1", true),
            vm("new", 3, "2", true),
        ];
        let p = reconcile(&cur, 2, Some("2"));
        assert_eq!(p.retire, ["mid"], "the off-version VM goes first");
        assert_eq!(p.keep, ["old", "new"]);
        let p = reconcile(&cur, 0, Some("2"));
        assert_eq!(p.retire.len(), 3);
    }

    #[test]
    fn version_change_replaces_one_for_one() {
        let cur = [
            vm("a", 1, "1", true),
            vm("b", 2, "1", true),
            vm("c", 3, "2", true),
        ];
        let p = reconcile(&cur, 3, Some("2"));
        assert_eq!(p.replace, ["a", "b"]);
        assert_eq!(p.keep, ["c"]);
        assert_eq!(p.create, 0);
        // Plain scaling never replaces for the version.
        assert!(reconcile(&cur, 3, None).is_noop());
        // Scale up and roll at once.
        let p = reconcile(&cur, 4, Some("2"));
        assert_eq!((p.create, p.replace.len()), (1, 2));
    }

    fn node(name: &str, free: u64) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            free_memory_mib: free,
            online: true,
        }
    }

    fn on(node: &str) -> VmInfo {
        VmInfo {
            id: "1".into(),
            name: "x".into(),
            node: node.into(),
            fleet: "ci".into(),
            image_version: "1".into(),
            image_sha256: None,
            runner_id: 1,
            created_at: String::new(),
            state: VmState::Running,
            seed_attached: false,
        }
    }

    #[test]
    fn placement_spreads_then_prefers_free_memory() {
        let nodes = [node("pve1", 8000), node("pve2", 16000), node("pve3", 4000)];
        let got = place(&nodes, &[on("pve2")], 4, 2048);
        assert_eq!(got, ["pve1", "pve3", "pve2", "pve1"]);
        // Full nodes and offline nodes are skipped.
        let mut off = node("pve4", 64000);
        off.online = false;
        let got = place(&[node("a", 3000), off], &[], 3, 2048);
        assert_eq!(got, ["a"]);
    }

    #[test]
    fn names_and_previous_versions() {
        let n = new_name("ci", &[]);
        assert!(n.starts_with("ci-") && n.len() == 9, "{n}");
        crate::seed::validate_hostname(&n).unwrap();
        let v: Vec<String> = ["1", "2", "3"].iter().map(|s| s.to_string()).collect();
        assert_eq!(previous_version(&v, "3"), Some("2"));
        assert_eq!(previous_version(&v, "1"), None);
        assert_eq!(previous_version(&v, "9"), None);
    }
}
