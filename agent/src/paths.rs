//! Every path the agent touches, resolved under `--root` (default `/`).

use std::path::{Path, PathBuf};

/// Where gitlab-runner's configuration lives.
pub const CONFIG_DIR: &str = "/etc/gitlab-runner";
/// The node_exporter textfile collector directory (Debian's prometheus-node-exporter default).
pub const TEXTFILE_DIR: &str = "/var/lib/prometheus/node-exporter";
/// The private runtime directory (on the `/run` tmpfs) under which the seed is mounted.
pub const RUNTIME_DIR: &str = "/run/imagectl";

/// Resolved paths.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The root everything is resolved under.
    pub root: PathBuf,
    /// `/etc/machine-id`.
    pub machine_id: PathBuf,
    /// `/etc/gitlab-runner`.
    pub config_dir: PathBuf,
    /// `/etc/gitlab-runner/config.toml`.
    pub config: PathBuf,
    /// `/etc/gitlab-runner/.runner_system_id`.
    pub system_id: PathBuf,
    /// `/etc/gitlab-runner/ca.pem` (the seed's CA bundle, when it has one).
    pub ca_file: PathBuf,
    /// `/var/lib/imagectl`.
    pub state_dir: PathBuf,
    /// `/var/lib/imagectl/status.json`.
    pub status: PathBuf,
    /// `/var/lib/imagectl/registered`.
    pub marker: PathBuf,
    /// `/var/lib/prometheus/node-exporter/imagectl.prom`.
    pub textfile: PathBuf,
    /// `/run/imagectl`.
    pub runtime_dir: PathBuf,
    /// `/run/imagectl/seed`, the seed's mount point.
    pub seed_mount: PathBuf,
    /// `/run/systemd/timesync/synchronized`: systemd-timesyncd creates it once the clock is
    /// synchronised.
    pub timesync_marker: PathBuf,
}

impl Paths {
    /// Resolves every path under `root`.
    pub fn new(root: &Path) -> Self {
        let r = |p: &str| resolve(root, p);
        Self {
            root: root.to_path_buf(),
            machine_id: r("/etc/machine-id"),
            config_dir: r(CONFIG_DIR),
            config: r(&format!("{CONFIG_DIR}/config.toml")),
            system_id: r(&format!("{CONFIG_DIR}/.runner_system_id")),
            ca_file: r(&format!("{CONFIG_DIR}/ca.pem")),
            state_dir: r("/var/lib/imagectl"),
            status: r(imagectl_proto::STATUS_PATH),
            marker: r(imagectl_proto::REGISTERED_MARKER),
            textfile: r(&format!("{TEXTFILE_DIR}/imagectl.prom")),
            runtime_dir: r(RUNTIME_DIR),
            seed_mount: r(&format!("{RUNTIME_DIR}/seed")),
            timesync_marker: r("/run/systemd/timesync/synchronized"),
        }
    }

    /// The path the *running system* sees for `p` (what goes into config.toml, e.g. `tls-ca-file`):
    /// `p` with the root prefix removed.
    pub fn in_system(&self, p: &Path) -> PathBuf {
        match p.strip_prefix(&self.root) {
            Ok(rel) => Path::new("/").join(rel),
            Err(_) => p.to_path_buf(),
        }
    }
}

/// `abs` (an absolute path) under `root`.
pub fn resolve(root: &Path, abs: &str) -> PathBuf {
    root.join(abs.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_under_root_and_back() {
        let p = Paths::new(Path::new("/tmp/r"));
        assert_eq!(p.config, Path::new("/tmp/r/etc/gitlab-runner/config.toml"));
        assert_eq!(
            p.in_system(&p.ca_file),
            Path::new("/etc/gitlab-runner/ca.pem")
        );
        let p = Paths::new(Path::new("/"));
        assert_eq!(p.marker, Path::new("/var/lib/imagectl/registered"));
        assert_eq!(
            p.in_system(&p.ca_file),
            Path::new("/etc/gitlab-runner/ca.pem")
        );
    }
}
