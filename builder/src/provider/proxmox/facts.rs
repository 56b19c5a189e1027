//! What the Proxmox provider keeps with each VM: tags (`imagectl`, `fleet-<name>`,
//! `image-<version>`) and `- imagectl-KEY: value` lines in the notes (the VM description), and
//! the name of its seed ISO. Everything [`super::ProxmoxProvider::list`] needs is read back from
//! these, so the cluster is the only state.

use crate::provider::{ImageInfo, VmInfo, VmState};
use crate::publish::{tag_value, version_tag};

/// Tag every VM (and template) imagectl made carries.
pub const OUR_TAG: &str = "imagectl";

/// The tag of a fleet's VMs.
pub fn fleet_tag(fleet: &str) -> String {
    format!("fleet-{}", tag_value(fleet))
}

/// The fleet named by a tag, if it is a fleet tag.
pub fn fleet_of_tag(tag: &str) -> Option<&str> {
    tag.strip_prefix("fleet-")
}

/// `imagectl;fleet-<fleet>;image-<version>`.
pub fn tags(fleet: &str, version: &str) -> String {
    format!("{OUR_TAG};{};{}", fleet_tag(fleet), version_tag(version))
}

/// File name of a VM's seed ISO on the seed storage (`STORAGE:iso/<this>`).
pub fn seed_filename(vm: &str) -> String {
    format!("imagectl-seed-{vm}.iso")
}

/// The VM name in a seed ISO's volume id or file name, if it is one of ours.
pub fn seed_vm(volid: &str) -> Option<&str> {
    let file = volid.rsplit('/').next()?;
    file.strip_prefix("imagectl-seed-")?.strip_suffix(".iso")
}

/// The fleet of a VM name `<fleet>-<6 hex>`.
pub fn fleet_of_vm(vm: &str) -> Option<&str> {
    let (fleet, suffix) = vm.rsplit_once('-')?;
    (suffix.len() == 6 && suffix.chars().all(|c| c.is_ascii_hexdigit())).then_some(fleet)
}

/// The facts of one fleet VM, as written into its notes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmFacts {
    /// Fleet.
    pub fleet: String,
    /// VM name.
    pub vm: String,
    /// Image name.
    pub image: String,
    /// Image version.
    pub version: String,
    /// Image sha256 (also what `imagectl images` uses to see the template is in use).
    pub sha256: String,
    /// Runner id.
    pub runner: u64,
    /// Created (RFC 3339).
    pub created_at: String,
    /// The template it was cloned from.
    pub cloned_from: u32,
}

impl VmFacts {
    /// The facts of a VM about to be cloned from `image` (template `from`).
    pub fn new(fleet: &str, vm: &str, image: &ImageInfo, runner: u64, from: u32) -> Self {
        Self {
            fleet: fleet.into(),
            vm: vm.into(),
            image: image.name.clone(),
            version: image.version.clone(),
            sha256: image.sha256.clone(),
            runner,
            created_at: crate::provider::now_rfc3339(),
            cloned_from: from,
        }
    }

    /// Markdown for the PVE notes: a readable line, then the machine-readable list.
    pub fn render(&self) -> String {
        format!(
            "imagectl runner VM of fleet **{}**: GitLab runner {}, image `{}` `{}`.\n\
             Replace it, never change it: `imagectl replace --fleet {} {}`\n\n\
             - imagectl-fleet: {}\n- imagectl-vm: {}\n- imagectl-image: {}\n\
             - imagectl-version: {}\n- imagectl-sha256: {}\n- imagectl-runner: {}\n\
             - imagectl-created-at: {}\n- imagectl-cloned-from: {}\n",
            self.fleet,
            self.runner,
            self.image,
            self.version,
            self.fleet,
            self.vm,
            self.fleet,
            self.vm,
            self.image,
            self.version,
            self.sha256,
            self.runner,
            self.created_at,
            self.cloned_from
        )
    }

    /// Reads the facts back; `None` unless fleet, vm, version and runner are all there.
    pub fn parse(text: &str) -> Option<Self> {
        let mut f = VmFacts::default();
        for l in text.lines() {
            let l = l.trim().trim_start_matches(['-', '*']).trim();
            let Some((k, v)) = l.split_once(':') else {
                continue;
            };
            let v = v.trim().trim_matches('`').to_string();
            match k.trim() {
                "imagectl-fleet" => f.fleet = v,
                "imagectl-vm" => f.vm = v,
                "imagectl-image" => f.image = v,
                "imagectl-version" => f.version = v,
                "imagectl-sha256" => f.sha256 = v.to_ascii_lowercase(),
                "imagectl-runner" => f.runner = v.parse().unwrap_or(0),
                "imagectl-created-at" => f.created_at = v,
                "imagectl-cloned-from" => f.cloned_from = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        (!f.fleet.is_empty() && !f.vm.is_empty() && !f.version.is_empty() && f.runner != 0)
            .then_some(f)
    }

    /// The [`VmInfo`] of a VM with these facts.
    pub fn info(&self, vmid: u32, node: &str, state: VmState, seed_attached: bool) -> VmInfo {
        VmInfo {
            id: vmid.to_string(),
            name: self.vm.clone(),
            node: node.into(),
            fleet: self.fleet.clone(),
            image_version: self.version.clone(),
            image_sha256: (!self.sha256.is_empty()).then(|| self.sha256.clone()),
            runner_id: self.runner,
            created_at: self.created_at.clone(),
            state,
            seed_attached,
        }
    }
}

/// Template locations of one image version: `node/vmid` pairs, comma separated (the
/// [`ImageInfo::location`] of the Proxmox provider).
pub fn render_locations(locs: &[(String, u32)]) -> String {
    locs.iter()
        .map(|(n, id)| format!("{n}/{id}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses [`render_locations`] text.
pub fn parse_locations(s: &str) -> Vec<(String, u32)> {
    s.split(',')
        .filter_map(|p| {
            let (n, id) = p.trim().rsplit_once('/')?;
            Some((n.to_string(), id.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_round_trip_and_need_the_essentials() {
        let f = VmFacts {
            fleet: "ci".into(),
            vm: "ci-0a1b2c".into(),
            image: "gitlab-runner".into(),
            version: "2025.01.02-1".into(),
            sha256: "AB".repeat(32),
            runner: 42,
            created_at: "2025-01-02T03:04:05Z".into(),
            cloned_from: 9000,
        };
        let back = VmFacts::parse(&f.render()).unwrap();
        assert_eq!(back.sha256, "ab".repeat(32));
        assert_eq!(
            VmFacts {
                sha256: f.sha256.to_ascii_lowercase(),
                ..f.clone()
            },
            back
        );
        assert!(VmFacts::parse("hand-written notes\n- imagectl-fleet: ci\n").is_none());
        // A template's notes are not a fleet VM's.
        let tmpl =
            "- imagectl-image: gitlab-runner\n- imagectl-version: 1\n- imagectl-template: 9000\n";
        assert!(VmFacts::parse(tmpl).is_none());
    }

    #[test]
    fn names_tags_and_locations() {
        assert_eq!(tags("ci", "1.2"), "imagectl;fleet-ci;image-1.2");
        assert_eq!(fleet_of_tag("fleet-ci"), Some("ci"));
        assert_eq!(
            seed_vm("local:iso/imagectl-seed-ci-0a1b2c.iso"),
            Some("ci-0a1b2c")
        );
        assert_eq!(seed_vm("local:iso/debian.iso"), None);
        assert_eq!(fleet_of_vm("ci-prod-0a1b2c"), Some("ci-prod"));
        assert_eq!(fleet_of_vm("ci-prod"), None);
        let locs = vec![("pve1".to_string(), 9000), ("pve2".to_string(), 9001)];
        assert_eq!(parse_locations(&render_locations(&locs)), locs);
        assert!(parse_locations("garbage").is_empty());
    }
}
