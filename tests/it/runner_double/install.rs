//! The double's package scripts and the bake's handling of them, without a bake: the double's
//! .deb is installed with `dpkg` into a throwaway root (an overlay over this host's `/`, in a
//! private mount and PID namespace, with a fresh `/run` and `/proc`), like mmdebstrap's build
//! root, and the result is read from the overlay's upper directory.
//!
//! - Without the bake's hooks the postinst does what GitLab's does in a build root: it finds no
//!   systemd, so it writes a SysV script and rc links — and the bake's checks refuse that.
//! - With the bake's essential and customize hooks (`imagectl::bake::runner`) the postinst's
//!   service setup waits until the customize stage and then installs the systemd unit, which is
//!   left disabled, nothing is started and the diversion is gone.
//!
//! Needs root, `unshare`, overlayfs, `dpkg`, `useradd` and `systemctl` on the host; without them
//! the tests say so and pass.

use super::double_dir;
use imagectl::bake::runner::{Kind, ServiceCheck, CUSTOMIZE_HOOK, ESSENTIAL_HOOK};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Mounts the throwaway root and runs `/tmp/$5` in it (`$4` is mounted on its `/tmp`).
const ENTER: &str = r#"set -e
u=$1 w=$2 m=$3 s=$4
mount -t overlay overlay -o "lowerdir=/,upperdir=$u,workdir=$w" "$m"
mount -t proc proc "$m/proc"
mount --rbind /dev "$m/dev"
mount -t tmpfs tmpfs "$m/run"
mount --bind "$s" "$m/tmp"
exec chroot "$m" /usr/bin/env -i LC_ALL=C HOME=/root \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin sh "/tmp/$5"
"#;

/// What mmdebstrap puts in its build root while packages install: a policy-rc.d that refuses
/// every start and a start-stop-daemon that does nothing.
const MMDEBSTRAP_GUARDS: &str = r#"set -e
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 0755 /usr/sbin/policy-rc.d
ssd=$(command -v start-stop-daemon)
mv "$ssd" "$ssd.REAL"
printf '#!/bin/sh\necho "Warning: Fake start-stop-daemon called, doing nothing" >&2\n' > "$ssd"
chmod 0755 "$ssd"
"#;

struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    /// A fresh root, or `None` (with the reason printed) when this host cannot make one.
    fn new(test: &str) -> Option<Root> {
        let uid = Command::new("id").arg("-u").output().ok()?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            eprintln!("{test}: SKIPPED (needs root for overlayfs and chroot)");
            return None;
        }
        for tool in ["unshare", "dpkg", "dpkg-deb", "useradd", "systemctl"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success());
            if !found {
                eprintln!("{test}: SKIPPED ({tool} is not installed)");
                return None;
            }
        }
        let dir = tempfile::tempdir().expect("tempdir");
        for d in ["upper", "work", "merged", "share"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        let root = Root { dir };
        let probe = root.run("probe.sh", "true");
        if !probe.status.success() {
            eprintln!(
                "{test}: SKIPPED (cannot mount an overlay root here: {})",
                String::from_utf8_lossy(&probe.stderr).trim()
            );
            return None;
        }
        Some(root)
    }

    fn upper(&self) -> PathBuf {
        self.dir.path().join("upper")
    }

    fn share(&self) -> PathBuf {
        self.dir.path().join("share")
    }

    /// Runs `script` (sh) inside the root.
    fn run(&self, name: &str, script: &str) -> Output {
        std::fs::write(self.share().join(name), script).unwrap();
        let p = |d: &str| self.dir.path().join(d);
        Command::new("unshare")
            .args(["--mount", "--pid", "--fork", "sh", "-c", ENTER, "sh"])
            .args([p("upper"), p("work"), p("merged"), p("share")])
            .arg(name)
            .output()
            .expect("running unshare")
    }

    /// Runs `script` and asserts it succeeded; returns stdout + stderr.
    fn ok(&self, name: &str, script: &str) -> String {
        let o = self.run(name, script);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.status.success(), "{name} failed ({}):\n{text}", o.status);
        text
    }

    /// The double's .deb, built into the shared directory (`/tmp/double.deb` inside).
    fn double_deb(&self) {
        let o = Command::new("dpkg-deb")
            .args(["--root-owner-group", "--build"])
            .arg(double_dir().join("pkg"))
            .arg(self.share().join("double.deb"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }

    fn file(&self, path: &str) -> Option<String> {
        std::fs::read_to_string(self.upper().join(path)).ok()
    }

    fn exists(&self, path: &str) -> bool {
        std::fs::symlink_metadata(self.upper().join(path)).is_ok()
    }

    /// The bake's image check over everything the steps changed.
    fn service_check(&self) -> anyhow::Result<()> {
        fn walk(dir: &Path, base: &Path, c: &mut ServiceCheck) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
                let m = std::fs::symlink_metadata(&p).unwrap();
                let t = m.file_type();
                if t.is_symlink() {
                    let target = std::fs::read_link(&p).unwrap();
                    c.observe(&rel, Kind::Symlink, target.to_str());
                } else if t.is_dir() {
                    c.observe(&rel, Kind::Dir, None);
                    walk(&p, base, c);
                } else if t.is_file() {
                    c.observe(&rel, Kind::File, None);
                } else if !t.is_char_device() {
                    // (character devices are the overlay's whiteouts)
                    c.observe(&rel, Kind::Other, None);
                }
            }
        }
        let mut c = ServiceCheck::default();
        walk(&self.upper(), &self.upper(), &mut c);
        c.finish()
    }
}

fn passwd_line(root: &Root) -> String {
    let passwd = root.file("etc/passwd").expect("/etc/passwd was changed");
    passwd
        .lines()
        .find(|l| l.starts_with("gitlab-runner:"))
        .unwrap_or_else(|| panic!("no gitlab-runner user in\n{passwd}"))
        .to_string()
}

#[test]
fn bake_hooks_install_the_double_as_a_disabled_systemd_unit() {
    let Some(root) = Root::new("bake_hooks_install_the_double_as_a_disabled_systemd_unit") else {
        return;
    };
    root.double_deb();
    root.ok("guards.sh", MMDEBSTRAP_GUARDS);

    // Essential stage: the hook path is diverted to a stub.
    root.ok("essential.sh", ESSENTIAL_HOOK);
    assert!(
        root.file("var/lib/dpkg/diversions")
            .is_some_and(|d| d.contains("/usr/share/gitlab-runner/post-install.imagectl-deferred")),
        "no diversion recorded"
    );

    // apt's install: the postinst runs, the service setup waits.
    let out = root.ok("install.sh", "dpkg --force-depends -i /tmp/double.deb\n");
    assert!(
        out.contains("deferring /usr/share/gitlab-runner/post-install"),
        "{out}"
    );
    let ours =
        std::fs::read_to_string(double_dir().join("pkg/usr/share/gitlab-runner/post-install"))
            .unwrap();
    assert_eq!(
        root.file("usr/share/gitlab-runner/post-install.imagectl-deferred")
            .as_deref(),
        Some(ours.as_str()),
        "dpkg put the package's post-install aside"
    );
    assert!(
        !root
            .file("etc/passwd")
            .unwrap_or_default()
            .contains("gitlab-runner:"),
        "the user is created by the deferred post-install, not before"
    );
    assert!(!root.exists("etc/systemd/system/gitlab-runner.service"));

    // Customize stage: the package's post-install runs as on the booted image, then checks.
    let out = root.ok("customize.sh", CUSTOMIZE_HOOK);
    assert!(
        out.contains("installed by the package's post-install, disabled, not started"),
        "{out}"
    );
    assert!(!out.contains("E: imagectl"), "{out}");

    // The unit `install` writes under systemd, with the real package's command line.
    let unit = root
        .file("etc/systemd/system/gitlab-runner.service")
        .expect("the unit");
    assert!(
        unit.contains(
            "ExecStart=/usr/bin/gitlab-runner \"run\" \"--config\" \"/etc/gitlab-runner/config.toml\" \
             \"--working-directory\" \"/home/gitlab-runner\" \"--service\" \"gitlab-runner\" \
             \"--user\" \"gitlab-runner\""
        ) && unit.contains("WantedBy=multi-user.target"),
        "{unit}"
    );
    // Disabled, no SysV script, nothing started.
    assert!(!root.exists("etc/systemd/system/multi-user.target.wants/gitlab-runner.service"));
    assert!(!root.exists("etc/init.d/gitlab-runner"));
    for l in ["etc/rc2.d/S50gitlab-runner", "etc/rc0.d/K02gitlab-runner"] {
        assert!(!root.exists(l), "{l}");
    }
    assert!(
        !root.exists("etc/gitlab-runner/.runner_system_id"),
        "gitlab-runner ran"
    );
    // The user, as GitLab's post-install makes it: system account, home, bash, empty skeleton.
    let user = passwd_line(&root);
    let f: Vec<&str> = user.split(':').collect();
    let uid: u32 = f[2].parse().unwrap();
    assert!(uid < 1000, "a system account: {user}");
    assert_eq!((f[5], f[6]), ("/home/gitlab-runner", "/bin/bash"), "{user}");
    let home = root.upper().join("home/gitlab-runner");
    assert!(home.is_dir(), "home directory");
    assert_eq!(
        std::fs::read_dir(&home).unwrap().count(),
        0,
        "--skel /dev/null"
    );
    let mode = |p: &str| {
        std::fs::metadata(root.upper().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("etc/gitlab-runner"), 0o700);
    assert_eq!(
        mode("etc/gitlab-runner/config.toml"),
        0o600,
        "install saves an empty config"
    );
    // The diversion is undone and leaves no record.
    assert_eq!(
        root.file("usr/share/gitlab-runner/post-install").as_deref(),
        Some(ours.as_str())
    );
    assert!(!root.exists("usr/share/gitlab-runner/post-install.imagectl-deferred"));
    for f in ["var/lib/dpkg/diversions", "var/lib/dpkg/diversions-old"] {
        assert!(
            !root
                .file(f)
                .unwrap_or_default()
                .contains("imagectl-deferred"),
            "{f} still names the bake's diversion"
        );
    }
    // The compose-time check agrees.
    root.service_check().unwrap();
}

#[test]
fn without_the_hooks_the_postinst_writes_sysv_and_the_bake_refuses_it() {
    let Some(root) =
        Root::new("without_the_hooks_the_postinst_writes_sysv_and_the_bake_refuses_it")
    else {
        return;
    };
    root.double_deb();
    root.ok("guards.sh", MMDEBSTRAP_GUARDS);
    // A build root has no /run/systemd/system and PID 1 is not systemd: GitLab's `install`
    // (kardianos/service) and the double both fall back to SysV.
    let out = root.ok("install.sh", "dpkg --force-depends -i /tmp/double.deb\n");
    assert!(
        root.file("etc/init.d/gitlab-runner")
            .is_some_and(|s| s.contains("start-stop-daemon --start")),
        "no SysV script:\n{out}"
    );
    assert_eq!(
        std::fs::read_link(root.upper().join("etc/rc2.d/S50gitlab-runner")).unwrap(),
        Path::new("/etc/init.d/gitlab-runner")
    );
    assert!(root.exists("etc/rc0.d/K02gitlab-runner"));
    assert!(!root.exists("etc/systemd/system/gitlab-runner.service"));
    // `start` reached the init script; only mmdebstrap's fake start-stop-daemon kept it from
    // running anything.
    assert!(out.contains("Fake start-stop-daemon called"), "{out}");
    let e = root.service_check().unwrap_err().to_string();
    assert!(
        e.contains("/etc/init.d/gitlab-runner: a SysV init script"),
        "{e}"
    );
    assert!(e.contains("/etc/rc2.d/S50gitlab-runner"), "{e}");

    // The customize hook alone (nothing deferred) finds the script and fails the bake.
    let o = root.run("customize.sh", CUSTOMIZE_HOOK);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("E: imagectl: gitlab-runner: a SysV init script /etc/init.d/gitlab-runner"),
        "{err}"
    );
}

#[test]
fn bake_hooks_leave_no_trace_without_gitlab_runner() {
    let Some(root) = Root::new("bake_hooks_leave_no_trace_without_gitlab_runner") else {
        return;
    };
    root.ok("essential.sh", ESSENTIAL_HOOK);
    let out = root.ok("customize.sh", CUSTOMIZE_HOOK);
    assert!(!out.contains("E: imagectl"), "{out}");
    assert!(
        !root.exists("usr/share/gitlab-runner"),
        "the stub's directory is removed"
    );
    for f in ["var/lib/dpkg/diversions", "var/lib/dpkg/diversions-old"] {
        assert!(
            !root.file(f).unwrap_or_default().contains("gitlab-runner"),
            "{f} still names the bake's diversion"
        );
    }
    root.service_check().unwrap();
}
