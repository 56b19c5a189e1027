//! gitlab-runner's package scripts in the bake: run them as they would run on the booted image,
//! keep the unit disabled, and refuse an image where a SysV script is active, the unit is enabled
//! or missing, or the runner was started.
//!
//! What GitLab's package does (read in gitlab-org/gitlab-runner and kardianos/service, the library
//! its `install` uses; gitlab-runner's `go.mod` pins kardianos/service v1.3.0):
//!
//! - `packaging/scripts/postinst.deb` runs `/usr/share/gitlab-runner/post-install` on `configure`,
//!   then `clear-docker-cache prune || :` unless `NO_DOCKER_PRUNE` is set.
//! - `packaging/root/usr/share/gitlab-runner/post-install` creates the system user
//!   `gitlab-runner` (`useradd --system --shell /bin/bash --create-home --skel /dev/null`, so home
//!   `/home/gitlab-runner`) and `/etc/gitlab-runner` (0700); skips the service steps when
//!   `gitlab-runner status` fails with "executable file not found"; stops and uninstalls an old
//!   service; runs `gitlab-runner install --user=gitlab-runner
//!   --working-directory=/home/gitlab-runner`, then `gitlab-runner start || :`.
//! - `commands/service.go`: `install` saves an empty `/etc/gitlab-runner/config.toml` when none
//!   loads; the service runs `gitlab-runner run --config … --working-directory … --service
//!   gitlab-runner --user gitlab-runner` (`commands/service_linux.go` adds `After=network.target`
//!   and `Restart=always` under systemd).
//! - kardianos/service `service_linux.go` tries systemd, upstart, OpenRC, rcS, procd, then SysV;
//!   `service_systemd_linux.go` `isSystemd()` is true when `rpm-ostree` is on PATH, when
//!   `/run/systemd/system` exists, or when `systemctl` is on PATH and `/proc/1/comm` is `systemd`.
//!   Under systemd, `Install` writes `/etc/systemd/system/gitlab-runner.service`, then
//!   `systemctl enable` and `daemon-reload`; `Start` is `systemctl start`. Under SysV
//!   (`service_sysv_linux.go`) it writes `/etc/init.d/gitlab-runner`, links `S50gitlab-runner`
//!   into rc2-5.d and `K02gitlab-runner` into rc0,1,6.d, and `Start` is `service gitlab-runner
//!   start` (which ignores policy-rc.d). The package itself ships no unit file.
//!
//! In mmdebstrap's build root neither systemd test holds (no `/run/systemd/system`; PID 1 is not
//! systemd), so the postinst as is would leave an active SysV script — systemd's sysv-generator
//! would start the runner at every boot, before imagectl-agent has written `config.toml` — and
//! no unit for the agent to start. It may also run before `systemctl` is unpacked, since the
//! package does not depend on systemd. So:
//!
//! 1. **essential stage** ([`ESSENTIAL_HOOK`]): `dpkg-divert` the package's
//!    `/usr/share/gitlab-runner/post-install` and put a stub in its place, so the postinst run by
//!    apt sets nothing up (mmdebstrap's policy-rc.d and start-stop-daemon stubs are in place too).
//! 2. **customize stage** ([`CUSTOMIZE_HOOK`], every package installed): remove the diversion and
//!    run the package's own post-install with `/run/systemd/system` present (so `install` writes
//!    the systemd unit, as on the booted image) and `SYSTEMD_OFFLINE=1` (systemd
//!    `docs/ENVIRONMENT.md`: systemctl does not talk to a service manager, so `start` is a no-op),
//!    then `systemctl disable gitlab-runner.service`; then check, in the build root, that no SysV
//!    script or rc link exists, the unit exists and is not enabled, and no pid file or
//!    `gitlab-runner run` process is there. A violation fails the bake.
//! 3. **compose** ([`ServiceCheck`]): the final image is checked again (the spec's files and units
//!    are applied there), so a spec cannot enable the unit or add an init script either.
//!
//! The hooks run for every spec; without a `gitlab-runner` package they only undo the diversion.
//! The test double in `tests/gitlab-runner-double` ships the same hook path and takes the same
//! steps, so the offline profile exercises all of this.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// The essential-stage hook (inside the build root).
pub const ESSENTIAL_HOOK: &str = include_str!("runner/essential.sh");

/// The customize-stage hook (inside the build root).
pub const CUSTOMIZE_HOOK: &str = include_str!("runner/customize.sh");

/// The unit imagectl-agent starts.
pub const UNIT: &str = "gitlab-runner.service";

const ESSENTIAL_IN_ROOT: &str = "/tmp/imagectl-gitlab-runner-essential.sh";
const CUSTOMIZE_IN_ROOT: &str = "/tmp/imagectl-gitlab-runner-customize.sh";

/// The mmdebstrap arguments that run the hooks: `(essential, customize)`. The scripts are written
/// into `work` and uploaded, so a failure names a short command, not the script.
pub fn hook_args(work: &Path) -> Result<(Vec<String>, Vec<String>)> {
    let args = |stage: &str, script: &str, in_root: &str| -> Result<Vec<String>> {
        let name = Path::new(in_root).file_name().unwrap_or_default();
        let host = work.join(name);
        fs_err::write(&host, script).context("writing a bake hook")?;
        Ok(vec![
            format!(
                "--{stage}-hook=upload '{}' {in_root}",
                host.display().to_string().replace('\'', "'\\''")
            ),
            format!("--{stage}-hook=chroot \"$1\" sh {in_root}"),
        ])
    };
    Ok((
        args("essential", ESSENTIAL_HOOK, ESSENTIAL_IN_ROOT)?,
        args("customize", CUSTOMIZE_HOOK, CUSTOMIZE_IN_ROOT)?,
    ))
}

/// What the final image must (not) contain for gitlab-runner, checked entry by entry.
#[derive(Debug, Default)]
pub struct ServiceCheck {
    binary: bool,
    unit: bool,
    problems: Vec<String>,
}

/// The kind of an image entry, as far as the check cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (its target is passed along).
    Symlink,
    /// Anything else (hard links, devices…).
    Other,
}

impl ServiceCheck {
    /// Looks at one entry: `path` relative to the root (no leading `/`), `target` for symlinks.
    pub fn observe(&mut self, path: &str, kind: Kind, target: Option<&str>) {
        let path = path.trim_start_matches("./").trim_start_matches('/');
        let path = path.trim_end_matches('/');
        let name = path.rsplit('/').next().unwrap_or(path);
        let dir = path.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        if path == "usr/bin/gitlab-runner" && kind != Kind::Dir {
            self.binary = true;
        }
        if path == "etc/init.d/gitlab-runner" {
            self.problem(format!(
                "/{path}: a SysV init script; systemd's sysv-generator would start gitlab-runner \
                 at boot before imagectl-agent has configured it"
            ));
        }
        let rc_dir = dir.len() == 9
            && dir.starts_with("etc/rc")
            && dir.ends_with(".d")
            && matches!(dir.as_bytes()[6], b'0'..=b'6' | b'S');
        if rc_dir
            && (name.starts_with('S') || name.starts_with('K'))
            && name.ends_with("gitlab-runner")
        {
            self.problem(format!("/{path}: a SysV rc link for gitlab-runner"));
        }
        if path == "etc/init/gitlab-runner.conf" {
            self.problem(format!("/{path}: an upstart job for gitlab-runner"));
        }
        if name == UNIT
            && dir.starts_with("etc/systemd/system/")
            && (dir.ends_with(".wants") || dir.ends_with(".requires"))
        {
            self.problem(format!(
                "/{path}: {UNIT} is enabled; it must stay disabled until imagectl-agent has \
                 written config.toml and starts it (remove it from units.enable)"
            ));
        }
        let unit_path = [
            "etc/systemd/system",
            "lib/systemd/system",
            "usr/lib/systemd/system",
        ]
        .iter()
        .any(|d| path == format!("{d}/{UNIT}"));
        if unit_path {
            match (kind, target) {
                (Kind::Symlink, Some("/dev/null")) => self.problem(format!(
                    "/{path}: {UNIT} is masked; imagectl-agent could not start it"
                )),
                (Kind::File | Kind::Symlink, _) => self.unit = true,
                _ => {}
            }
        }
        if matches!(
            path,
            "run/gitlab-runner.pid"
                | "var/run/gitlab-runner.pid"
                | "var/log/gitlab-runner.log"
                | "var/log/gitlab-runner.err"
        ) {
            self.problem(format!(
                "/{path}: left by a gitlab-runner started during the bake"
            ));
        }
    }

    fn problem(&mut self, p: String) {
        if !self.problems.contains(&p) {
            self.problems.push(p);
        }
    }

    /// The verdict once every entry was seen.
    pub fn finish(mut self) -> Result<()> {
        if self.binary && !self.unit {
            self.problem(format!(
                "/usr/bin/gitlab-runner is installed but no {UNIT} exists; gitlab-runner's \
                 post-install did not install the service, so imagectl-agent could not start it"
            ));
        }
        if self.problems.is_empty() {
            return Ok(());
        }
        bail!(
            "the image breaks how gitlab-runner must be installed (no SysV script, unit present \
             and disabled, nothing started; see docs/architecture.md):\n  {}",
            self.problems.join("\n  ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(entries: &[(&str, Kind, Option<&str>)]) -> Result<()> {
        let mut c = ServiceCheck::default();
        for (p, k, t) in entries {
            c.observe(p, *k, *t);
        }
        c.finish()
    }

    const GOOD: [(&str, Kind, Option<&str>); 4] = [
        ("./usr/bin/gitlab-runner", Kind::File, None),
        (
            "./etc/systemd/system/gitlab-runner.service",
            Kind::File,
            None,
        ),
        ("./etc/init.d/", Kind::Dir, None),
        ("./etc/init.d/ssh", Kind::File, None),
    ];

    #[test]
    fn a_disabled_systemd_unit_passes() {
        verdict(&GOOD).unwrap();
        // No runner at all: nothing to check.
        verdict(&[("etc/init.d/ssh", Kind::File, None)]).unwrap();
    }

    #[test]
    fn sysv_scripts_and_rc_links_fail() {
        let mut v = GOOD.to_vec();
        v.push(("./etc/init.d/gitlab-runner", Kind::File, None));
        v.push((
            "./etc/rc2.d/S50gitlab-runner",
            Kind::Symlink,
            Some("/etc/init.d/gitlab-runner"),
        ));
        v.push((
            "./etc/rc0.d/K02gitlab-runner",
            Kind::Symlink,
            Some("/etc/init.d/gitlab-runner"),
        ));
        let e = verdict(&v).unwrap_err().to_string();
        assert!(
            e.contains("/etc/init.d/gitlab-runner: a SysV init script"),
            "{e}"
        );
        assert!(e.contains("/etc/rc2.d/S50gitlab-runner"), "{e}");
        assert!(e.contains("/etc/rc0.d/K02gitlab-runner"), "{e}");
        // Other services' rc links are not gitlab-runner's business.
        let mut v = GOOD.to_vec();
        v.push(("etc/rc2.d/S01ssh", Kind::Symlink, Some("../init.d/ssh")));
        verdict(&v).unwrap();
    }

    #[test]
    fn an_enabled_masked_or_missing_unit_fails() {
        let mut v = GOOD.to_vec();
        v.push((
            "etc/systemd/system/multi-user.target.wants/gitlab-runner.service",
            Kind::Symlink,
            Some("/etc/systemd/system/gitlab-runner.service"),
        ));
        let e = verdict(&v).unwrap_err().to_string();
        assert!(
            e.contains("is enabled") && e.contains("units.enable"),
            "{e}"
        );

        let e = verdict(&[
            ("usr/bin/gitlab-runner", Kind::File, None),
            (
                "etc/systemd/system/gitlab-runner.service",
                Kind::Symlink,
                Some("/dev/null"),
            ),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("masked"), "{e}");

        let e = verdict(&[("usr/bin/gitlab-runner", Kind::File, None)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no gitlab-runner.service exists"), "{e}");
        // A unit shipped under /lib (a package that ships one) counts.
        verdict(&[
            ("usr/bin/gitlab-runner", Kind::File, None),
            ("lib/systemd/system/gitlab-runner.service", Kind::File, None),
        ])
        .unwrap();
    }

    #[test]
    fn traces_of_a_started_runner_fail() {
        for trace in ["run/gitlab-runner.pid", "var/log/gitlab-runner.err"] {
            let mut v = GOOD.to_vec();
            v.push((trace, Kind::File, None));
            let e = verdict(&v).unwrap_err().to_string();
            assert!(e.contains("started during the bake"), "{trace}: {e}");
        }
    }

    #[test]
    fn hook_arguments_upload_and_run_the_scripts() {
        let d = tempfile::tempdir().unwrap();
        let (ess, cust) = hook_args(d.path()).unwrap();
        assert!(ess[0].starts_with("--essential-hook=upload '"), "{ess:?}");
        assert_eq!(
            ess[1],
            "--essential-hook=chroot \"$1\" sh /tmp/imagectl-gitlab-runner-essential.sh"
        );
        assert_eq!(
            cust[1],
            "--customize-hook=chroot \"$1\" sh /tmp/imagectl-gitlab-runner-customize.sh"
        );
        let written =
            std::fs::read_to_string(d.path().join("imagectl-gitlab-runner-customize.sh")).unwrap();
        assert_eq!(written, CUSTOMIZE_HOOK);
    }

    #[test]
    fn hook_scripts_are_valid_sh() {
        for (name, script) in [("essential", ESSENTIAL_HOOK), ("customize", CUSTOMIZE_HOOK)] {
            let out = std::process::Command::new("sh")
                .args(["-n", "-c", script])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
