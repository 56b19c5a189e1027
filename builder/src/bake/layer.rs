//! Composing the final root filesystem as a tar stream, without extracting or mounting anything.
//!
//! The cached rootfs layer (a tar from mmdebstrap) is streamed entry by entry into a new tar:
//! hygiene rules drop host- and instance-specific files, the spec's files, artifacts and the agent
//! are added on top, and systemd units are enabled, disabled or masked by writing the same links
//! `systemctl enable` would. `mkfs.ext4 -d` then reads the tar directly. Every entry keeps the
//! ownership and mode from the tar headers, so no root privileges or loop devices are involved,
//! and the output is a pure function of the inputs (times are clamped to SOURCE_DATE_EPOCH).
//! Every entry written also goes through [`ServiceCheck`]: an image with an active SysV script
//! for gitlab-runner, its unit enabled or missing, or traces of it having run is refused.

use super::runner::{Kind, ServiceCheck};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufWriter, Read};
use std::path::{Path, PathBuf};
use tar::{EntryType, Header};

/// Content of an added file.
#[derive(Debug, Clone)]
pub enum Content {
    /// Bytes held in memory.
    Bytes(Vec<u8>),
    /// A file on the build host.
    File(PathBuf),
}

/// An entry the overlay adds or replaces.
#[derive(Debug, Clone)]
pub enum Add {
    /// A regular file.
    File {
        /// Its content.
        content: Content,
        /// Mode bits.
        mode: u32,
    },
    /// A symbolic link.
    Symlink(String),
    /// A directory.
    Dir(u32),
}

/// Everything the build changes on top of the cached layer.
#[derive(Debug, Default)]
pub struct Overlay {
    /// Entries added or replaced, by absolute path.
    pub add: BTreeMap<String, Add>,
    /// Units to enable.
    pub enable: Vec<String>,
    /// Units to disable.
    pub disable: Vec<String>,
    /// Units to mask.
    pub mask: Vec<String>,
}

/// What composing did, for the manifest.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Report {
    /// Entries written.
    pub entries: u64,
    /// Paths dropped by hygiene rules, by rule.
    pub removed: BTreeMap<String, Vec<String>>,
    /// Kernel versions found under /boot.
    pub kernels: Vec<String>,
}

/// The hygiene rule that drops `path` (relative, no leading `/` or `./`), if any.
pub fn hygiene_rule(path: &str) -> Option<&'static str> {
    let p = path.trim_end_matches('/');
    let name = p.rsplit('/').next().unwrap_or(p);
    if p.starts_with("etc/ssh/") && name.starts_with("ssh_host_") {
        return Some("ssh host keys");
    }
    if p.starts_with("var/lib/cloud/")
        || (p.starts_with("var/log/") && name.starts_with("cloud-init"))
    {
        return Some("cloud-init state");
    }
    if p == "etc/gitlab-runner/config.toml"
        || name == ".runner_system_id"
        || p.starts_with("root/.gitlab-runner/")
        || p.starts_with("home/gitlab-runner/.gitlab-runner/")
    {
        return Some("gitlab-runner registration");
    }
    if p.starts_with("etc/apt/auth.conf") || name == ".bash_history" || p.starts_with("root/.ssh/")
    {
        return Some("build host secrets");
    }
    if (p.starts_with("tmp/") || p.starts_with("var/tmp/")) && !p.ends_with("tmp") {
        return Some("temporary files");
    }
    if p.starts_with("var/cache/apt/") && name.ends_with(".bin") {
        return Some("apt caches");
    }
    None
}

/// Files the build always replaces, and with what.
fn fixed_entries(add: &mut BTreeMap<String, Add>) {
    let empty = || Add::File {
        content: Content::Bytes(Vec::new()),
        mode: 0o644,
    };
    add.insert("/etc/machine-id".into(), empty());
    add.insert(
        "/var/lib/dbus/machine-id".into(),
        Add::Symlink("/etc/machine-id".into()),
    );
    add.insert("/etc/resolv.conf".into(), empty());
    add.insert(
        "/etc/hostname".into(),
        Add::File {
            content: Content::Bytes(b"localhost\n".to_vec()),
            mode: 0o644,
        },
    );
}

fn norm(path: &Path) -> String {
    let s = path.to_string_lossy();
    let s = s.trim_start_matches("./").trim_start_matches('/');
    s.trim_end_matches('/').to_string()
}

fn header_for(kind: EntryType, mode: u32, size: u64, epoch: i64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(size);
    h.set_mtime(epoch.max(0) as u64);
    h
}

fn unit_dirs(unit: &str) -> [String; 4] {
    [
        format!("etc/systemd/system/{unit}"),
        format!("usr/lib/systemd/system/{unit}"),
        format!("lib/systemd/system/{unit}"),
        format!("usr/local/lib/systemd/system/{unit}"),
    ]
}

/// `[Install]` targets of a unit file: (kind, target) with kind `wants` or `requires`.
pub fn install_targets(unit_text: &str) -> Vec<(String, String)> {
    let mut in_install = false;
    let mut out = Vec::new();
    for line in unit_text.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            in_install = l == "[Install]";
            continue;
        }
        if !in_install {
            continue;
        }
        if let Some((k, v)) = l.split_once('=') {
            let kind = match k.trim() {
                "WantedBy" => "wants",
                "RequiredBy" => "requires",
                _ => continue,
            };
            for t in v.split_whitespace() {
                out.push((kind.to_string(), t.to_string()));
            }
        }
    }
    out
}

/// Streams `base` into `out`, applying hygiene and the overlay.
pub fn compose(base: &Path, out: &Path, overlay: &Overlay, epoch: i64) -> Result<Report> {
    let mut add = overlay.add.clone();
    fixed_entries(&mut add);
    let add: BTreeMap<String, Add> = add
        .into_iter()
        .map(|(k, v)| (norm(Path::new(&k)), v))
        .collect();
    let disable: BTreeSet<&str> = overlay
        .disable
        .iter()
        .chain(&overlay.mask)
        .map(String::as_str)
        .collect();
    let wanted_units: BTreeSet<String> = overlay.enable.iter().flat_map(|u| unit_dirs(u)).collect();

    let mut report = Report::default();
    let mut runner = ServiceCheck::default();
    let mut unit_texts: BTreeMap<String, String> = BTreeMap::new();
    let mut seen: BTreeSet<String> = BTreeSet::new();

    let input = fs_err::File::open(base)?;
    let mut archive = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, input));
    let output = fs_err::File::create(out)?;
    let mut builder = tar::Builder::new(BufWriter::with_capacity(1 << 20, output));
    builder.mode(tar::HeaderMode::Complete);

    for entry in archive
        .entries()
        .with_context(|| format!("reading {}", base.display()))?
    {
        let mut entry = entry.with_context(|| format!("reading {}", base.display()))?;
        let path = norm(&entry.path()?);
        if path.is_empty() {
            continue;
        }
        if let Some(rule) = hygiene_rule(&path) {
            report
                .removed
                .entry(rule.to_string())
                .or_default()
                .push(format!("/{path}"));
            continue;
        }
        if add.contains_key(&path) {
            continue;
        }
        // Links that enable a unit we disable or mask.
        if path.starts_with("etc/systemd/system/")
            && (path.contains(".wants/") || path.contains(".requires/"))
        {
            let name = path.rsplit('/').next().unwrap_or("");
            if disable.contains(name) {
                report
                    .removed
                    .entry("disabled units".into())
                    .or_default()
                    .push(format!("/{path}"));
                continue;
            }
        }
        if let Some(k) = path.strip_prefix("boot/vmlinuz-") {
            report.kernels.push(k.to_string());
        }
        let mut header = entry.header().clone();
        if header.mtime().unwrap_or(0) as i64 > epoch {
            header.set_mtime(epoch.max(0) as u64);
        }
        match header.entry_type() {
            EntryType::Link | EntryType::Symlink => {
                let target = entry
                    .link_name()?
                    .with_context(|| format!("link without target: /{path}"))?
                    .into_owned();
                let kind = if header.entry_type() == EntryType::Symlink {
                    Kind::Symlink
                } else {
                    Kind::Other
                };
                runner.observe(&path, kind, target.to_str());
                builder.append_link(&mut header, &path, target)?;
            }
            EntryType::Regular | EntryType::Continuous if wanted_units.contains(&path) => {
                let mut text = String::new();
                entry.read_to_string(&mut text)?;
                builder.append_data(&mut header, &path, text.as_bytes())?;
                unit_texts.insert(path.clone(), text);
            }
            _ => {
                builder.append_data(&mut header, &path, &mut entry)?;
            }
        }
        if !matches!(header.entry_type(), EntryType::Link | EntryType::Symlink) {
            let kind = match header.entry_type() {
                EntryType::Regular | EntryType::Continuous => Kind::File,
                EntryType::Directory => Kind::Dir,
                _ => Kind::Other,
            };
            runner.observe(&path, kind, None);
        }
        seen.insert(path);
        report.entries += 1;
    }

    // Added entries: parents first (BTreeMap order puts "a" before "a/b").
    for (path, a) in &add {
        let mut parent = String::new();
        for comp in path.split('/').take(path.split('/').count() - 1) {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(comp);
            if seen.insert(parent.clone()) {
                let mut h = header_for(EntryType::Directory, 0o755, 0, epoch);
                builder.append_data(&mut h, format!("{parent}/"), std::io::empty())?;
                report.entries += 1;
            }
        }
        match a {
            Add::File { .. } => runner.observe(path, Kind::File, None),
            Add::Symlink(target) => runner.observe(path, Kind::Symlink, Some(target)),
            Add::Dir(_) => runner.observe(path, Kind::Dir, None),
        }
        match a {
            Add::File { content, mode } => match content {
                Content::Bytes(b) => {
                    let mut h = header_for(EntryType::Regular, *mode, b.len() as u64, epoch);
                    if wanted_units.contains(path) {
                        unit_texts.insert(path.clone(), String::from_utf8_lossy(b).into_owned());
                    }
                    builder.append_data(&mut h, path, b.as_slice())?;
                }
                Content::File(src) => {
                    let f = fs_err::File::open(src)?;
                    let len = f.metadata()?.len();
                    if wanted_units.contains(path) {
                        unit_texts.insert(path.clone(), fs_err::read_to_string(src)?);
                    }
                    let mut h = header_for(EntryType::Regular, *mode, len, epoch);
                    builder.append_data(&mut h, path, f)?;
                }
            },
            Add::Symlink(target) => {
                let mut h = header_for(EntryType::Symlink, 0o777, 0, epoch);
                builder.append_link(&mut h, path, target)?;
            }
            Add::Dir(mode) => {
                let mut h = header_for(EntryType::Directory, *mode, 0, epoch);
                builder.append_data(&mut h, format!("{path}/"), std::io::empty())?;
            }
        }
        seen.insert(path.clone());
        report.entries += 1;
    }

    // Unit links, as `systemctl enable` / `mask` would write them.
    let mut links: BTreeMap<String, String> = BTreeMap::new();
    for unit in &overlay.enable {
        let Some((file, text)) = unit_dirs(unit)
            .into_iter()
            .find_map(|d| unit_texts.get(&d).map(|t| (d, t)))
        else {
            bail!("cannot enable {unit}: no unit file for it in the image");
        };
        let targets = install_targets(text);
        if targets.is_empty() {
            bail!("cannot enable {unit}: its unit file has no [Install] WantedBy= or RequiredBy=");
        }
        for (kind, target) in targets {
            links.insert(
                format!("etc/systemd/system/{target}.{kind}/{unit}"),
                format!("/{file}"),
            );
        }
    }
    for unit in &overlay.mask {
        links.insert(format!("etc/systemd/system/{unit}"), "/dev/null".into());
    }
    for (path, target) in links {
        let dir = path
            .rsplit_once('/')
            .map(|(d, _)| d.to_string())
            .unwrap_or_default();
        if seen.insert(dir.clone()) {
            let mut h = header_for(EntryType::Directory, 0o755, 0, epoch);
            builder.append_data(&mut h, format!("{dir}/"), std::io::empty())?;
        }
        if seen.contains(&path) {
            continue;
        }
        runner.observe(&path, Kind::Symlink, Some(&target));
        let mut h = header_for(EntryType::Symlink, 0o777, 0, epoch);
        builder.append_link(&mut h, &path, &target)?;
        report.entries += 2;
    }
    runner.finish()?;
    builder
        .into_inner()
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .with_context(|| format!("writing {}", out.display()))?
        .sync_all()?;
    report.kernels.sort();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hygiene_rules_catch_instance_state() {
        assert_eq!(
            hygiene_rule("etc/ssh/ssh_host_ed25519_key"),
            Some("ssh host keys")
        );
        assert_eq!(hygiene_rule("etc/ssh/sshd_config"), None);
        assert_eq!(
            hygiene_rule("var/lib/cloud/instances/x/user-data.txt"),
            Some("cloud-init state")
        );
        assert_eq!(
            hygiene_rule("etc/gitlab-runner/config.toml"),
            Some("gitlab-runner registration")
        );
        assert_eq!(
            hygiene_rule("etc/gitlab-runner/.runner_system_id"),
            Some("gitlab-runner registration")
        );
        assert_eq!(hygiene_rule("tmp"), None);
        assert_eq!(hygiene_rule("tmp/x"), Some("temporary files"));
    }

    #[test]
    fn install_section_is_read() {
        let t = "[Unit]\nDescription=x\n[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target other.target\nRequiredBy=a.target\n";
        assert_eq!(
            install_targets(t),
            vec![
                ("wants".to_string(), "multi-user.target".to_string()),
                ("wants".to_string(), "other.target".to_string()),
                ("requires".to_string(), "a.target".to_string())
            ]
        );
    }

    fn entries(tar_path: &Path) -> BTreeMap<String, (EntryType, Vec<u8>, String)> {
        let mut a = tar::Archive::new(fs_err::File::open(tar_path).unwrap());
        let mut m = BTreeMap::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let p = norm(&e.path().unwrap());
            let link = e
                .link_name()
                .unwrap()
                .map(|l| l.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            m.insert(p, (e.header().entry_type(), data, link));
        }
        m
    }

    #[test]
    fn compose_applies_hygiene_overlay_and_units() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.tar");
        {
            let mut b = tar::Builder::new(fs_err::File::create(&base).unwrap());
            let mut add = |p: &str, data: &[u8]| {
                let mut h = header_for(EntryType::Regular, 0o644, data.len() as u64, 2_000_000_000);
                b.append_data(&mut h, p, data).unwrap();
            };
            add("./etc/machine-id", b"0123456789abcdef0123456789abcdef\n");
            add("./etc/ssh/ssh_host_rsa_key", b"PRIVATE");
            add("./etc/hostname", b"buildhost\n");
            add(
                "./lib/systemd/system/foo.service",
                b"[Service]\nExecStart=/x\n[Install]\nWantedBy=multi-user.target\n",
            );
            add(
                "./etc/systemd/system/multi-user.target.wants/bar.service",
                b"",
            );
            add("./boot/vmlinuz-6.1.0-1-amd64", b"kernel");
            b.finish().unwrap();
        }
        let out = dir.path().join("out.tar");
        let mut ov = Overlay::default();
        ov.add.insert(
            "/usr/local/bin/agent".into(),
            Add::File {
                content: Content::Bytes(b"bin".to_vec()),
                mode: 0o755,
            },
        );
        ov.enable.push("foo.service".into());
        ov.disable.push("bar.service".into());
        ov.mask.push("baz.service".into());
        let rep = compose(&base, &out, &ov, 1_700_000_000).unwrap();
        let e = entries(&out);
        assert_eq!(e["etc/machine-id"].1, b"", "machine-id must be empty");
        assert!(!e.contains_key("etc/ssh/ssh_host_rsa_key"));
        assert_eq!(e["etc/hostname"].1, b"localhost\n");
        assert_eq!(e["usr/local/bin/agent"].1, b"bin");
        assert!(e.contains_key("usr/local/bin"), "parent dirs are created");
        assert_eq!(
            e["etc/systemd/system/multi-user.target.wants/foo.service"].2,
            "/lib/systemd/system/foo.service"
        );
        assert!(!e.contains_key("etc/systemd/system/multi-user.target.wants/bar.service"));
        assert_eq!(e["etc/systemd/system/baz.service"].2, "/dev/null");
        assert_eq!(rep.kernels, vec!["6.1.0-1-amd64"]);
        assert_eq!(
            rep.removed["ssh host keys"],
            vec!["/etc/ssh/ssh_host_rsa_key"]
        );
        // Times are clamped to the epoch.
        let mut a = tar::Archive::new(fs_err::File::open(&out).unwrap());
        for en in a.entries().unwrap() {
            assert!(en.unwrap().header().mtime().unwrap() <= 1_700_000_000);
        }
        // Same inputs, same bytes.
        let out2 = dir.path().join("out2.tar");
        compose(&base, &out2, &ov, 1_700_000_000).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&out2).unwrap());
    }

    #[test]
    fn compose_refuses_an_active_gitlab_runner() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.tar");
        let unit = b"[Service]\nExecStart=/usr/bin/gitlab-runner run\n[Install]\nWantedBy=multi-user.target\n";
        let layer = |sysv: bool| {
            let mut b = tar::Builder::new(fs_err::File::create(&base).unwrap());
            let mut add = |p: &str, data: &[u8]| {
                let mut h = header_for(EntryType::Regular, 0o755, data.len() as u64, 1);
                b.append_data(&mut h, p, data).unwrap();
            };
            add("./usr/bin/gitlab-runner", b"bin");
            add("./etc/systemd/system/gitlab-runner.service", unit);
            if sysv {
                add("./etc/init.d/gitlab-runner", b"#!/bin/sh\n");
            }
            b.finish().unwrap();
        };
        let out = dir.path().join("o.tar");
        layer(false);
        let mut ov = Overlay::default();
        ov.disable.push("gitlab-runner.service".into());
        compose(&base, &out, &ov, 1).unwrap();
        // A spec that enables it.
        ov.enable.push("gitlab-runner.service".into());
        let err = compose(&base, &out, &ov, 1).unwrap_err().to_string();
        assert!(
            err.contains("multi-user.target.wants/gitlab-runner.service")
                && err.contains("is enabled"),
            "{err}"
        );
        // A layer with a SysV script.
        layer(true);
        let err = compose(&base, &out, &Overlay::default(), 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/etc/init.d/gitlab-runner: a SysV init script"),
            "{err}"
        );
    }

    #[test]
    fn enabling_a_unit_without_install_section_fails() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.tar");
        {
            let mut b = tar::Builder::new(fs_err::File::create(&base).unwrap());
            let data = b"[Service]\nExecStart=/x\n";
            let mut h = header_for(EntryType::Regular, 0o644, data.len() as u64, 1);
            b.append_data(&mut h, "lib/systemd/system/q.service", &data[..])
                .unwrap();
            b.finish().unwrap();
        }
        let mut ov = Overlay::default();
        ov.enable.push("q.service".into());
        let err = compose(&base, &dir.path().join("o.tar"), &ov, 1).unwrap_err();
        assert!(err.to_string().contains("no [Install]"), "{err}");
        ov.enable = vec!["missing.service".into()];
        let err = compose(&base, &dir.path().join("o.tar"), &ov, 1).unwrap_err();
        assert!(err.to_string().contains("no unit file"), "{err}");
    }
}
