//! The local provider's state directory: one directory per VM with its facts (`vm.json`), its
//! overlay disk, its seed while attached, QEMU's pid file, sockets and logs; and one lock file per
//! fleet.
//!
//! ```text
//! $IMAGECTL_STATE_DIR/            (default $XDG_DATA_HOME/imagectl, ~/.local/share/imagectl)
//!   vms/<name>/vm.json            facts: fleet, image version, runner id, ports, pid (no secrets)
//!   vms/<name>/disk.qcow2         linked clone: an overlay backed by the image
//!   vms/<name>/seed.iso           the NoCloud seed while attached (0600)
//!   vms/<name>/{qemu.pid,qga.sock,qmp.sock,serial.log,qemu.stderr.log}
//!   locks/<fleet>.lock            the fleet lock (holder pid, host, expiry)
//!   seeds/                        private (0700) staging for seed ISOs before they are attached
//! ```

use crate::provider::lease::{self, LeaseStore, Taken};
use crate::provider::{now_rfc3339, parse_rfc3339, rfc3339, FleetLock, VmInfo};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::Permissions;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The state directory: `$IMAGECTL_STATE_DIR`, else `$XDG_DATA_HOME/imagectl`, else
/// `~/.local/share/imagectl`.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("IMAGECTL_STATE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("imagectl");
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".local/share/imagectl"))
        .unwrap_or_else(|| PathBuf::from("/var/lib/imagectl"))
}

/// A forwarded guest port as recorded in `vm.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forward {
    /// Port in the guest.
    pub guest: u16,
    /// Port on 127.0.0.1.
    pub host: u16,
}

/// `vm.json`: the VM's facts plus what the local provider needs to run it. Holds no secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocalVm {
    /// The provider-neutral facts.
    #[serde(flatten)]
    pub info: VmInfo,
    /// The image the overlay is backed by.
    pub image_path: PathBuf,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub cpus: u32,
    /// Accelerator QEMU was started with (`tcg`/`kvm`), once started.
    #[serde(default)]
    pub accel: Option<String>,
    /// QEMU's pid while it runs.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Guest ports forwarded to 127.0.0.1.
    #[serde(default)]
    pub forwards: Vec<Forward>,
    /// Host port the guest's GitLab relay (10.0.2.100) goes to, if any.
    #[serde(default)]
    pub gitlab_relay_port: Option<u16>,
    /// Whether the guest may open outbound connections.
    #[serde(default)]
    pub open_network: bool,
}

/// Paths under the state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Opens (creates, 0700) the state directory.
    pub fn open(root: &Path) -> Result<Self> {
        for d in [
            root.to_path_buf(),
            root.join("vms"),
            root.join("locks"),
            root.join("seeds"),
        ] {
            fs_err::create_dir_all(&d).context("creating the local state directory")?;
        }
        for d in [root.to_path_buf(), root.join("seeds"), root.join("vms")] {
            std::fs::set_permissions(&d, Permissions::from_mode(0o700))
                .with_context(|| format!("restricting {}", d.display()))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// The root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A VM's directory.
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.root.join("vms").join(name)
    }

    /// The private seed staging directory.
    pub fn seeds_dir(&self) -> PathBuf {
        self.root.join("seeds")
    }

    /// A fleet's lock file.
    pub fn lock_file(&self, fleet: &str) -> PathBuf {
        self.root.join("locks").join(format!("{fleet}.lock"))
    }

    /// Reads one VM's record.
    pub fn read_vm(&self, name: &str) -> Result<LocalVm> {
        let p = self.vm_dir(name).join("vm.json");
        let text = fs_err::read_to_string(&p)?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    }

    /// Writes one VM's record atomically (0600).
    pub fn write_vm(&self, vm: &LocalVm) -> Result<()> {
        let dir = self.vm_dir(&vm.info.name);
        let tmp = dir.join("vm.json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        serde_json::to_writer_pretty(&mut f, vm).context("serialising vm.json")?;
        drop(f);
        fs_err::rename(&tmp, dir.join("vm.json")).context("saving vm.json")
    }

    /// Every VM record (directories without a readable `vm.json` are skipped with a warning).
    pub fn all_vms(&self) -> Result<Vec<LocalVm>> {
        let mut out = Vec::new();
        for e in fs_err::read_dir(self.root.join("vms"))? {
            let e = e.context("listing VM directories")?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !e.path().is_dir() {
                continue;
            }
            match self.read_vm(&name) {
                Ok(v) => out.push(v),
                Err(err) => tracing::warn!("skipping VM directory {name}: {err:#}"),
            }
        }
        out.sort_by(|a, b| {
            (&a.info.created_at, &a.info.name).cmp(&(&b.info.created_at, &b.info.name))
        });
        Ok(out)
    }

    /// The lease store of the fleet locks (`locks/`).
    pub fn locks(&self) -> FileStore {
        FileStore {
            dir: self.root.join("locks"),
        }
    }

    /// Takes the fleet lock (a file created exclusively, see [`FileStore`]). A lock whose holder
    /// is dead (same host) or expired is taken over, by one taker only ([`lease`]).
    pub async fn lock(&self, fleet: &str, ttl: Duration) -> Result<FleetLock> {
        let path = self.lock_file(fleet);
        let now = time::OffsetDateTime::now_utc();
        let mine = FleetLock {
            fleet: fleet.to_string(),
            owner: uuid::Uuid::new_v4().simple().to_string(),
            host: hostname(),
            pid: std::process::id(),
            acquired_at: now_rfc3339(),
            expires_at: rfc3339(now + ttl),
        };
        match lease::acquire(&self.locks(), &lock_id(fleet), &mine).await? {
            Taken::Mine => Ok(mine),
            Taken::Held(h) | Taken::Busy { taker: h, .. } => bail!(
                "fleet {fleet} is locked by pid {} on {} since {} (another imagectl is \
                 changing it; if that process is gone, remove {})",
                h.pid,
                h.host,
                h.acquired_at,
                path.display()
            ),
            Taken::Foreign => bail!(
                "{} is not a readable fleet lock; remove it if no imagectl is changing fleet {fleet}",
                path.display()
            ),
        }
    }

    /// Removes the fleet lock if `lock` still owns it.
    pub async fn unlock(&self, lock: &FleetLock) -> Result<()> {
        lease::release(&self.locks(), &lock_id(&lock.fleet), &lock.owner).await?;
        Ok(())
    }
}

/// The lease id (file name under `locks/`) of a fleet's lock.
pub fn lock_id(fleet: &str) -> String {
    format!("{fleet}.lock")
}

/// Leases as files in one directory. A lease file appears with its content in one step: it is
/// written to a private temporary file, then hard-linked to its name (`link(2)` fails with
/// EEXIST when the name exists), so no reader sees a half-written lock. Renewal renames a new
/// file over it.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    fn path(&self, id: &str) -> Result<PathBuf> {
        if id.is_empty() || id.contains('/') || id.starts_with('.') {
            bail!("not a lock name: {id:?}");
        }
        Ok(self.dir.join(id))
    }

    /// Writes `l` to a new private temporary file in the directory.
    fn staged(&self, id: &str, l: &FleetLock) -> Result<PathBuf> {
        let tmp = self.dir.join(format!(
            ".{id}.{}.{}.tmp",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        let written = serde_json::to_writer(&mut f, l)
            .map_err(anyhow::Error::from)
            .and_then(|()| f.sync_all().map_err(anyhow::Error::from));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("writing {}", tmp.display()));
        }
        Ok(tmp)
    }
}

impl LeaseStore for FileStore {
    async fn create(&self, id: &str, l: &FleetLock) -> Result<bool> {
        let path = self.path(id)?;
        let tmp = self.staged(id, l)?;
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
        }
    }

    async fn read(&self, id: &str) -> Result<Option<Option<FleetLock>>> {
        let path = self.path(id)?;
        match std::fs::read_to_string(&path) {
            Ok(t) => Ok(Some(serde_json::from_str(&t).ok())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    async fn delete(&self, id: &str) -> Result<()> {
        let path = self.path(id)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }

    async fn replace(&self, id: &str, l: &FleetLock) -> Result<()> {
        let path = self.path(id)?;
        let tmp = self.staged(id, l)?;
        std::fs::rename(&tmp, &path).with_context(|| {
            let _ = std::fs::remove_file(&tmp);
            format!("renewing {}", path.display())
        })
    }

    fn live(&self, h: &FleetLock) -> bool {
        lock_is_live(h)
    }
}

/// True while a lock's holder may still be working: same host → its pid is alive (and is an
/// imagectl); another host → not expired.
pub fn lock_is_live(h: &FleetLock) -> bool {
    if h.host == hostname() {
        if h.pid == std::process::id() {
            return true;
        }
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", h.pid)).unwrap_or_default();
        return super::process::pid_alive(h.pid) && comm.trim().starts_with("imagectl");
    }
    parse_rfc3339(&h.expires_at).is_some_and(|t| t > time::OffsetDateTime::now_utc())
}

/// This machine's host name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn lock_is_exclusive_and_taken_over_when_stale() {
        let d = tempfile::tempdir().unwrap();
        let st = StateDir::open(d.path()).unwrap();
        let l = st.lock("ci", Duration::from_secs(60)).await.unwrap();
        let e = st.lock("ci", Duration::from_secs(60)).await.unwrap_err();
        assert!(e.to_string().contains("locked by pid"), "{e}");
        // Another fleet is independent.
        let other = st.lock("other", Duration::from_secs(60)).await.unwrap();
        st.unlock(&other).await.unwrap();
        st.unlock(&l).await.unwrap();
        // A dead holder on this host is stale.
        let dead = FleetLock {
            pid: 999_999_999,
            ..l.clone()
        };
        std::fs::write(st.lock_file("ci"), serde_json::to_vec(&dead).unwrap()).unwrap();
        let l2 = st.lock("ci", Duration::from_secs(60)).await.unwrap();
        assert_ne!(l2.owner, l.owner);
        // Unlock by a non-owner leaves it alone.
        st.unlock(&l).await.unwrap();
        assert!(st.lock_file("ci").exists());
        st.unlock(&l2).await.unwrap();
        assert!(!st.lock_file("ci").exists());
        // Nothing but the lock files was ever left in locks/ (no guard, no temporary file).
        assert_eq!(
            std::fs::read_dir(d.path().join("locks")).unwrap().count(),
            0
        );
        // Another host: live until it expires.
        let remote = FleetLock {
            host: "elsewhere".into(),
            expires_at: rfc3339(time::OffsetDateTime::now_utc() - Duration::from_secs(5)),
            ..l
        };
        assert!(!lock_is_live(&remote));
    }
}
