//! Reading a baked image without booting or mounting it: the qcow2 header, the GPT, and files in
//! the ext4 root (through `debugfs` on a sparse raw copy), plus the hygiene checks.
//!
//! The qcow2 header is parsed here directly: the fields needed (version, virtual size, backing
//! file, compression type) sit in its first 112 bytes, and the async, io_uring-based qcow2-rs crate
//! would be a heavy way to read them.

use crate::util::{run, run_output};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::io::Read;
use std::path::Path;
use std::process::Command;

/// What the qcow2 header says.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Qcow2Header {
    /// qcow2 version (2 or 3).
    pub version: u32,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Whether a backing file is named (a published image must be flat).
    pub has_backing_file: bool,
    /// `zlib` or `zstd`.
    pub compression: String,
}

/// Parses the qcow2 header of a file; an error (exit 2) if it is not a qcow2.
pub fn qcow2_header(path: &Path) -> Result<Qcow2Header> {
    let mut f = fs_err::File::open(path)?;
    let mut h = [0u8; 112];
    let n = f.read(&mut h)?;
    if n < 72 || &h[..4] != b"QFI\xfb" {
        return Err(crate::error::input(format!(
            "{} is not a qcow2 image",
            path.display()
        )));
    }
    let be32 = |o: usize| u32::from_be_bytes(h[o..o + 4].try_into().expect("4 bytes"));
    let be64 = |o: usize| u64::from_be_bytes(h[o..o + 8].try_into().expect("8 bytes"));
    let version = be32(4);
    let cluster_bits = be32(20);
    // QEMU's limits (block/qcow2.h: MIN_CLUSTER_BITS 9, MAX_CLUSTER_BITS 21).
    if !(2..=3).contains(&version) || !(9..=21).contains(&cluster_bits) {
        return Err(crate::error::input(format!(
            "{} is not a usable qcow2 image (version {version}, cluster bits {cluster_bits}); \
             it may be truncated or damaged",
            path.display()
        )));
    }
    let header_len = if version >= 3 { be32(100) as usize } else { 72 };
    let incompatible = if version >= 3 { be64(72) } else { 0 };
    let compression = if incompatible & (1 << 3) != 0 && header_len > 104 && n > 104 {
        match h[104] {
            0 => "zlib",
            1 => "zstd",
            _ => "unknown",
        }
    } else {
        "zlib"
    };
    Ok(Qcow2Header {
        version,
        virtual_size: be64(24),
        cluster_size: 1u64 << cluster_bits,
        has_backing_file: be64(8) != 0,
        compression: compression.into(),
    })
}

/// One hygiene check's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What is checked.
    pub name: String,
    /// Whether it holds.
    pub ok: bool,
    /// Details when it does not.
    pub detail: String,
}

/// A view of the root filesystem inside an image, through debugfs.
pub struct RootFs {
    _dir: tempfile::TempDir,
    spec: String,
}

impl RootFs {
    /// Opens the root filesystem of a qcow2 (converted to a sparse raw file in a temp dir).
    pub fn open(image: &Path) -> Result<Self> {
        let dir = tempfile::tempdir().context("creating a temp dir")?;
        let raw = dir.path().join("disk.raw");
        run(Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(image)
            .arg(&raw))
        .with_context(|| format!("reading {}", image.display()))?;
        let disk = gpt::GptConfig::new()
            .writable(false)
            .open(&raw)
            .with_context(|| format!("reading the partition table of {}", image.display()))?;
        let root = disk
            .partitions()
            .values()
            .find(|p| p.part_type_guid == gpt::partition_types::LINUX_FS)
            .context("the image has no Linux root partition")?;
        let offset = root.first_lba * 512;
        Ok(Self {
            spec: format!("{}?offset={offset}", raw.display()),
            _dir: dir,
        })
    }

    fn debugfs(&self, request: &str) -> Result<String> {
        run_output(
            Command::new("debugfs")
                .arg("-R")
                .arg(request)
                .arg(&self.spec),
        )
        .with_context(|| format!("debugfs {request}"))
    }

    /// Reads a file; `None` when it does not exist.
    pub fn read(&self, path: &str) -> Result<Option<Vec<u8>>> {
        let out = Command::new("debugfs")
            .arg("-R")
            .arg(format!("cat {path}"))
            .arg(&self.spec)
            .output()
            .context("starting debugfs (apt-get install e2fsprogs)")?;
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("File not found") {
            return Ok(None);
        }
        Ok(Some(out.stdout))
    }

    /// Size of a file, `None` when missing.
    pub fn size(&self, path: &str) -> Result<Option<u64>> {
        let out = Command::new("debugfs")
            .arg("-R")
            .arg(format!("stat {path}"))
            .arg(&self.spec)
            .output()
            .context("starting debugfs")?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .split_whitespace()
            .skip_while(|w| *w != "Size:")
            .nth(1)
            .and_then(|s| s.parse().ok()))
    }

    /// Names in a directory (empty when missing).
    pub fn list(&self, dir: &str) -> Result<Vec<String>> {
        let out = self.debugfs(&format!("ls -p {dir}"))?;
        Ok(out
            .lines()
            .filter_map(|l| l.split('/').nth(5).map(str::to_string))
            .filter(|n| !n.is_empty() && n != "." && n != "..")
            .collect())
    }

    /// Installed packages from dpkg's status file: (name, version).
    pub fn packages(&self) -> Result<Vec<(String, String)>> {
        let Some(status) = self.read("/var/lib/dpkg/status")? else {
            bail!("the image has no /var/lib/dpkg/status");
        };
        let text = String::from_utf8_lossy(&status);
        let mut out = Vec::new();
        for stanza in text.split("\n\n") {
            let (mut name, mut ver, mut installed) = (None, None, false);
            for l in stanza.lines() {
                if let Some(v) = l.strip_prefix("Package: ") {
                    name = Some(v.to_string());
                } else if let Some(v) = l.strip_prefix("Version: ") {
                    ver = Some(v.to_string());
                } else if l.starts_with("Status: ") && l.ends_with(" installed") {
                    installed = true;
                }
            }
            if let (Some(n), Some(v), true) = (name, ver, installed) {
                out.push((n, v));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The golden-image hygiene checks.
    pub fn hygiene(&self) -> Result<Vec<Check>> {
        let mut checks = Vec::new();
        let mut check = |name: &str, ok: bool, detail: String| {
            checks.push(Check {
                name: name.into(),
                ok,
                detail,
            });
        };
        match self.size("/etc/machine-id")? {
            Some(0) => check("/etc/machine-id is empty", true, String::new()),
            Some(n) => check("/etc/machine-id is empty", false, format!("{n} bytes")),
            None => check(
                "/etc/machine-id is empty",
                false,
                "missing (must exist, empty)".into(),
            ),
        }
        let keys: Vec<String> = self
            .list("/etc/ssh")?
            .into_iter()
            .filter(|n| n.starts_with("ssh_host_"))
            .collect();
        check("no SSH host keys", keys.is_empty(), keys.join(", "));
        let cloud = self.list("/var/lib/cloud")?;
        check(
            "cloud-init state cleaned",
            cloud.is_empty(),
            cloud.join(", "),
        );
        let cloud_logs: Vec<String> = self
            .list("/var/log")?
            .into_iter()
            .filter(|n| n.starts_with("cloud-init"))
            .collect();
        check(
            "no cloud-init logs",
            cloud_logs.is_empty(),
            cloud_logs.join(", "),
        );
        let runner: Vec<String> = self
            .list("/etc/gitlab-runner")?
            .into_iter()
            .filter(|n| n == "config.toml" || n == ".runner_system_id")
            .collect();
        check(
            "no gitlab-runner registration",
            runner.is_empty(),
            runner.join(", "),
        );
        let dbus = self.size("/var/lib/dbus/machine-id")?;
        check(
            "no D-Bus machine id",
            matches!(dbus, None | Some(0) | Some(15)),
            format!("{dbus:?}"),
        );
        let auth = self
            .list("/etc/apt")?
            .into_iter()
            .filter(|n| n.starts_with("auth.conf"))
            .collect::<Vec<_>>();
        check("no apt credentials", auth.is_empty(), auth.join(", "));
        let resolv = self.size("/etc/resolv.conf")?.unwrap_or(0);
        check(
            "no build host resolv.conf",
            resolv == 0,
            format!("{resolv} bytes"),
        );
        Ok(checks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_of_a_real_qcow2() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.qcow2");
        run(Command::new("qemu-img")
            .args(["create", "-f", "qcow2", "-o", "compression_type=zstd"])
            .arg(&p)
            .arg("64M"))
        .unwrap();
        let h = qcow2_header(&p).unwrap();
        assert_eq!(h.virtual_size, 64 << 20);
        assert_eq!(h.compression, "zstd");
        assert!(!h.has_backing_file);
        assert_eq!(h.version, 3);
        let not = d.path().join("x.txt");
        std::fs::write(
            &not,
            b"hello, not an image at all; long enough to be read whole......................",
        )
        .unwrap();
        assert_eq!(crate::error::exit_code(&qcow2_header(&not).unwrap_err()), 2);
    }
}
