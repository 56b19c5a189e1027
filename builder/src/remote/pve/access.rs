//! The Proxmox VE preflight a command runs before it uploads or clones anything: the cluster's
//! version (`GET /version`) against what each feature needs, and the API token's privileges
//! (`GET /access/permissions?path=…`) on every path the command will touch. Anything missing is
//! bad input (exit 2), named with the version or the privilege and path it needs.
//!
//! Versions, from PVE's own code:
//! * `.qcow2` uploads and downloads with `content=import` (pve-manager
//!   `PVE/API2/Storage/Status.pm` `upload`/`download_url`, `UPLOAD_IMPORT_EXT_RE_1` in pve-storage
//!   `src/PVE/Storage.pm`) accept disk images from libpve-storage-perl 8.3.6 on, i.e. PVE 8.4.
//! * Pools addressed as `GET`/`DELETE /pools?poolid=` (pve-manager `PVE/API2/Pool.pm`, nested
//!   pools) exist from PVE 8.1; on 7.x and 8.0 the fleet lock could be taken but not released.
//! * The guest-agent calls are `VM.Monitor` up to PVE 8 and `VM.GuestAgent.Audit` /
//!   `VM.GuestAgent.FileRead` from PVE 9 (qemu-server `PVE/API2/Qemu/Agent.pm`).
//!
//! Privileges, as the API methods check them: `upload` needs `Datastore.AllocateTemplate` on the
//! storage, `download_url` that and `Sys.AccessNetwork` on the node (or `Sys.Audit` +
//! `Sys.Modify` on `/`) (pve-manager `PVE/API2/Storage/Status.pm`); a new VM needs `VM.Allocate`
//! on `/vms/<id>` or on the pool it joins (pve-access-control `PVE/RPCEnvironment.pm`
//! `check_vm_perm`). The full table is in docs/security.md.

use super::{params, PveClient};
use crate::error::input;
use anyhow::{Context, Result};
use std::collections::{BTreeMap, BTreeSet};

/// A PVE version (`GET /version` → `version`, e.g. `8.4.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PveVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Patch level.
    pub patch: u32,
}

impl PveVersion {
    /// `8.4.1`, `9.0`, `8.4.1-2` → the numbers; `None` for anything else.
    pub fn parse(text: &str) -> Option<Self> {
        let core = text.trim().split(['-', '~', '+']).next()?;
        let mut it = core.split('.').map(|p| p.parse::<u32>().ok());
        let major = it.next()??;
        let minor = it.next().unwrap_or(Some(0))?;
        let patch = it.next().unwrap_or(Some(0))?;
        Some(Self {
            major,
            minor,
            patch,
        })
    }

    /// The privileges that stand for the guest-agent calls on this version.
    pub fn guest_agent_privs(self) -> &'static [&'static str] {
        if self.major >= 9 {
            &["VM.GuestAgent.Audit", "VM.GuestAgent.FileRead"]
        } else {
            &["VM.Monitor"]
        }
    }
}

impl std::fmt::Display for PveVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// A feature a command uses, with the first PVE version that has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// `content=import` uploads/downloads of `.qcow2` images.
    ImportImage,
    /// `GET`/`DELETE /pools?poolid=` (the fleet pool and lock).
    PoolById,
}

impl Feature {
    fn needs(self) -> (PveVersion, &'static str) {
        let v = |major, minor| PveVersion {
            major,
            minor,
            patch: 0,
        };
        match self {
            Feature::ImportImage => (
                v(8, 4),
                "uploading a .qcow2 image to an import storage (libpve-storage-perl 8.3.6)",
            ),
            Feature::PoolById => (v(8, 1), "the fleet's pool and lock (/pools?poolid=)"),
        }
    }
}

/// Privileges a command needs: each held on any one of `paths`.
#[derive(Debug, Clone)]
pub struct Need {
    /// Privilege names.
    pub privs: Vec<String>,
    /// Paths any one of which may hold them (e.g. `/pool/ci` or `/vms`).
    pub paths: Vec<String>,
    /// What for, in words.
    pub why: String,
}

impl Need {
    /// `privs` on one of `paths`, for `why`.
    pub fn new(privs: &[&str], paths: &[&str], why: &str) -> Self {
        Self {
            privs: privs.iter().map(|s| s.to_string()).collect(),
            paths: paths.iter().map(|s| s.to_string()).collect(),
            why: why.into(),
        }
    }
}

/// `GET /version`.
pub async fn version(pve: &PveClient) -> Result<PveVersion> {
    #[derive(serde::Deserialize)]
    struct V {
        version: String,
    }
    let v: V = pve
        .get("/version", params::<&str, &str>([]))
        .await
        .context("asking the Proxmox VE version (GET /version)")?;
    PveVersion::parse(&v.version).ok_or_else(|| {
        input(format!(
            "Proxmox VE reported version {:?}, which is not a version number",
            v.version
        ))
    })
}

/// The privileges the token holds on `path` (`GET /access/permissions?path=`), including those
/// inherited from the paths above it.
async fn held_on(pve: &PveClient, path: &str) -> Result<BTreeSet<String>> {
    let map: BTreeMap<String, BTreeMap<String, serde_json::Value>> = pve
        .get("/access/permissions", params([("path", path)]))
        .await
        .with_context(|| format!("reading the token's privileges on {path}"))?;
    Ok(map
        .into_iter()
        .filter(|(p, _)| p == path || p == "/" || path.starts_with(&format!("{p}/")))
        .flat_map(|(_, privs)| {
            privs
                .into_iter()
                .filter(|(_, v)| v.as_u64() != Some(0) && v.as_bool() != Some(false))
                .map(|(k, _)| k)
        })
        .collect())
}

/// Checks `features` against the cluster's version and `needs` against the token's privileges;
/// an input error (exit 2) names every missing one. Returns the version.
pub async fn preflight(
    pve: &PveClient,
    cmd: &str,
    features: &[Feature],
    needs: impl FnOnce(PveVersion) -> Vec<Need>,
) -> Result<PveVersion> {
    let v = version(pve).await?;
    let too_old: Vec<String> = features
        .iter()
        .filter_map(|f| {
            let (min, what) = f.needs();
            (v < min).then(|| format!("{what} needs {}.{} or later", min.major, min.minor))
        })
        .collect();
    if !too_old.is_empty() {
        return Err(input(format!(
            "imagectl {cmd}: this cluster runs Proxmox VE {v}; {}",
            too_old.join("; ")
        )));
    }
    let needs = needs(v);
    let mut cache: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut missing = Vec::new();
    for n in &needs {
        for p in &n.paths {
            if !cache.contains_key(p) {
                cache.insert(p.clone(), held_on(pve, p).await?);
            }
        }
        let lacking: Vec<&str> = n
            .privs
            .iter()
            .filter(|pr| !n.paths.iter().any(|p| cache[p].contains(*pr)))
            .map(String::as_str)
            .collect();
        if !lacking.is_empty() {
            missing.push(format!(
                "{} on {} ({})",
                lacking.join(", "),
                n.paths.join(" or "),
                n.why
            ));
        }
    }
    if !missing.is_empty() {
        return Err(input(format!(
            "imagectl {cmd}: the Proxmox VE token lacks privileges (PVE {v}): {}; see docs/security.md for a role",
            missing.join("; ")
        )));
    }
    Ok(v)
}

/// What `publish` needs: the import storage, the template's storage, a new VM, and with
/// `--from-url` network access on the node.
pub fn publish_needs(
    import_storage: &str,
    storage: &str,
    nodes: &[String],
    from_url: bool,
) -> Vec<Need> {
    let import = format!("/storage/{import_storage}");
    let target = format!("/storage/{storage}");
    let mut out = vec![
        Need::new(
            &[
                "Datastore.AllocateTemplate",
                "Datastore.Allocate",
                "Datastore.Audit",
            ],
            &[&import],
            "put the image on the import storage and remove it afterwards",
        ),
        Need::new(
            &["Datastore.AllocateSpace"],
            &[&target],
            "the template's disks",
        ),
        Need::new(
            &[
                "VM.Allocate",
                "VM.Audit",
                "VM.Config.Disk",
                "VM.Config.CPU",
                "VM.Config.Memory",
                "VM.Config.Network",
                "VM.Config.HWType",
                "VM.Config.Options",
            ],
            &["/vms"],
            "create the template VM",
        ),
    ];
    if from_url {
        for n in nodes {
            out.push(Need::new(
                &["Sys.AccessNetwork"],
                &[&format!("/nodes/{n}")],
                "let the node download the image (--from-url)",
            ));
        }
    }
    out
}

/// True when the resource pool `id` exists (and the token may see it): `GET /pools?poolid=`
/// filters what it lists by `Pool.Audit` and refuses nobody (pve-manager `PVE/API2/Pool.pm`
/// `index`); any error counts as "missing".
pub async fn pool_exists(pve: &PveClient, id: &str) -> bool {
    pve.get_once::<Vec<serde_json::Value>>("/pools", params([("poolid", id)]))
        .await
        .is_ok_and(|v| !v.is_empty())
}

/// What the fleet commands need on the Proxmox provider; `pool`/`lock_pool` are `None` for a
/// command over every fleet (no one pool to check). `Pool.Allocate` on the fleet's pool
/// only when imagectl creates it (it is missing) or removes it once empty (its own
/// `imagectl-<fleet>`, not a `--pool` an administrator made): `create_pool` checks it before it
/// looks whether the pool exists (pve-manager `PVE/API2/Pool.pm`).
pub fn fleet_needs(
    v: PveVersion,
    pool: Option<&str>,
    lock_pool: Option<&str>,
    seed_storage: &str,
    allocate_pool: bool,
) -> Vec<Need> {
    let pool_path = pool.map(|p| format!("/pool/{p}"));
    let mut vm_privs = vec![
        "VM.Allocate",
        "VM.Clone",
        "VM.Audit",
        "VM.Config.CDROM",
        "VM.Config.Options",
        "VM.PowerMgmt",
    ];
    vm_privs.extend_from_slice(v.guest_agent_privs());
    let vm_paths: Vec<&str> = pool_path
        .iter()
        .map(String::as_str)
        .chain(["/vms"])
        .collect();
    let mut needs = vec![
        Need::new(
            &vm_privs,
            &vm_paths,
            "clone, start, watch and destroy the runner VMs",
        ),
        Need::new(
            &[
                "Datastore.AllocateTemplate",
                "Datastore.Allocate",
                "Datastore.Audit",
            ],
            &[&format!("/storage/{seed_storage}")],
            "upload and delete the per-VM seed ISOs",
        ),
    ];
    if let Some(p) = &pool_path {
        needs.push(Need::new(
            if allocate_pool {
                &["Pool.Audit", "Pool.Allocate"]
            } else {
                &["Pool.Audit"]
            },
            &[p],
            "the fleet's pool",
        ));
    }
    if let Some(l) = lock_pool {
        needs.push(Need::new(
            &["Pool.Allocate"],
            &[&format!("/pool/{l}")],
            "the fleet lock",
        ));
    }
    needs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_order() {
        let v = PveVersion::parse("8.4.1").unwrap();
        assert_eq!((v.major, v.minor, v.patch), (8, 4, 1));
        assert_eq!(PveVersion::parse("9.0").unwrap().to_string(), "9.0.0");
        assert!(PveVersion::parse("8.3.6-1").unwrap() < Feature::ImportImage.needs().0);
        assert!(PveVersion::parse("8.0.4").unwrap() < Feature::PoolById.needs().0);
        assert!(PveVersion::parse("nine").is_none());
        assert_eq!(
            PveVersion::parse("8.4").unwrap().guest_agent_privs(),
            ["VM.Monitor"]
        );
        assert!(PveVersion::parse("9.1")
            .unwrap()
            .guest_agent_privs()
            .contains(&"VM.GuestAgent.FileRead"));
    }

    #[test]
    fn publish_needs_network_access_only_for_downloads() {
        let up = publish_needs("local", "local-lvm", &["pve1".into()], false);
        assert!(!up
            .iter()
            .any(|n| n.privs.contains(&"Sys.AccessNetwork".to_string())));
        let down = publish_needs("local", "local-lvm", &["pve1".into()], true);
        assert!(down
            .iter()
            .any(|n| n.paths == ["/nodes/pve1"] && n.privs == ["Sys.AccessNetwork"]));
    }
}
