//! The root filesystem layer: `mmdebstrap` into a tar, cached by the sha256 of everything that
//! decides its content.
//!
//! What goes into the key: the image's apt sources (as the image keeps them) and their keys'
//! sha256, the package list, the pinned versions from the lock, the sha256 of each locally built
//! .deb, users and groups, SOURCE_DATE_EPOCH and the mmdebstrap version. Where the packages are
//! fetched from (the .deb cache, the mirror, the snapshot archive: see [`super::origin`]) is *not*
//! in it: the same pins give the same bytes from any of them. Files, units, artifacts and the
//! agent are not in it either: they are added on top at compose time, so changing them reuses the
//! layer. The hooks that handle gitlab-runner's package scripts ([`super::runner`]) are part of
//! the recipe (`recipe` in the key).

use super::sources::{self, AptSource};
use crate::spec::lock::LockedPackage;
use crate::spec::Loaded;
use crate::util::{run, run_output, sha256_file};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What the layer needs, resolved on this host.
#[derive(Debug, Clone, Serialize)]
pub struct LayerInputs {
    /// Layer format version (bump when the recipe changes).
    pub recipe: u32,
    /// Base suite.
    pub suite: String,
    /// The image's apt sources, as written into its `/etc/apt/sources.list`.
    pub sources: Vec<String>,
    /// The signing keys the image keeps: (path in the image, sha256).
    pub keys: Vec<(String, String)>,
    /// `--include` arguments (package names or pinned `name=version`).
    pub includes: Vec<String>,
    /// Locally built .deb files: (name, sha256).
    pub local_debs: Vec<(String, String)>,
    /// Extra repository pins, by suite or origin, then the lock's versions.
    pub preferences: String,
    /// mmdebstrap `--customize-hook`s run in the chroot (users, groups): fixed scripts whose
    /// spec values are positional parameters (see [`user_hook`]).
    pub chroot_commands: Vec<String>,
    /// SOURCE_DATE_EPOCH.
    pub epoch: i64,
    /// mmdebstrap version.
    pub mmdebstrap: String,
    /// The sources themselves (their lines are in the key).
    #[serde(skip)]
    pub apt: Vec<AptSource>,
    /// Paths of the local debs (not part of the key: their sha256 is).
    #[serde(skip)]
    pub local_deb_paths: Vec<PathBuf>,
    /// Package names of the local debs.
    #[serde(skip)]
    pub local_names: Vec<String>,
    #[serde(skip)]
    spec_packages: Vec<String>,
    #[serde(skip)]
    repo_packages: Vec<String>,
    #[serde(skip)]
    repo_preferences: String,
}

impl LayerInputs {
    /// The cache key.
    pub fn key(&self) -> String {
        crate::util::sha256_bytes(&serde_json::to_vec(self).expect("serialisable"))
    }

    /// The same inputs with the lock's versions pinned (`None`: resolve afresh). Packages of the
    /// spec that the pins leave out are asked for by name, so dropping a pin re-resolves it.
    pub fn pinned(&self, pins: Option<&[LockedPackage]>) -> LayerInputs {
        let mut includes: Vec<String> = Vec::new();
        let mut preferences = self.repo_preferences.clone();
        match pins {
            Some(pkgs) => {
                for p in pkgs {
                    if !self.local_names.contains(&p.name) {
                        includes.push(format!("{}={}", p.name, p.version));
                        preferences.push_str(&format!(
                            "Package: {}\nPin: version {}\nPin-Priority: 1001\n\n",
                            p.name, p.version
                        ));
                    }
                }
                for p in &self.spec_packages {
                    let bare = p.split(['/', '=']).next().unwrap_or(p);
                    if !pkgs.iter().any(|x| x.name == bare) {
                        includes.push(p.clone());
                    }
                }
            }
            None => includes.extend(self.spec_packages.iter().cloned()),
        }
        for p in &self.repo_packages {
            if !includes
                .iter()
                .any(|i| i == p || i.starts_with(&format!("{p}=")))
            {
                includes.push(p.clone());
            }
        }
        for name in &self.local_names {
            if !includes.contains(name) {
                includes.push(name.clone());
            }
        }
        LayerInputs {
            includes,
            preferences,
            ..self.clone()
        }
    }
}

/// Metadata stored next to a cached layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerMeta {
    /// Installed packages with .deb sha256s.
    pub packages: Vec<LockedPackage>,
    /// Seconds mmdebstrap took.
    pub seconds: f64,
}

/// Builds a local package tree into a .deb (reproducible: SOURCE_DATE_EPOCH, root owner).
pub fn build_local_deb(dir: &Path, out_dir: &Path, name: &str, epoch: i64) -> Result<PathBuf> {
    fs_err::create_dir_all(out_dir)?;
    let out = out_dir.join(format!("{name}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(dir)
        .arg(&out)
        .env("SOURCE_DATE_EPOCH", epoch.to_string()))
    .with_context(|| format!("building package {name} from {}", dir.display()))?;
    Ok(out)
}

/// Resolves the layer inputs of a spec on this host, unpinned (see [`LayerInputs::pinned`]).
/// Signing keys fetched by URL are kept in `keys_cache`.
pub fn layer_inputs(l: &Loaded, epoch: i64, work: &Path, keys_cache: &Path) -> Result<LayerInputs> {
    let s = &l.spec;
    let apt = sources::for_spec(l, keys_cache)?;
    let mut repo_preferences = String::new();
    let mut repo_packages = Vec::new();
    for (r, src) in s
        .apt_repositories
        .iter()
        .zip(apt.iter().skip(apt.len() - s.apt_repositories.len()))
    {
        let pin = if r.suite != s.base.suite {
            format!("release n={}", r.suite)
        } else {
            let host = src.uri.split('/').nth(2).unwrap_or_default();
            format!("origin \"{host}\"")
        };
        repo_preferences.push_str(&format!("Package: *\nPin: {pin}\nPin-Priority: 100\n\n"));
        if !r.packages.is_empty() {
            repo_preferences.push_str(&format!(
                "Package: {}\nPin: {pin}\nPin-Priority: 990\n\n",
                r.packages.join(" ")
            ));
        }
        repo_packages.extend(r.packages.iter().cloned());
    }
    let mut keys: Vec<(String, String)> = apt
        .iter()
        .filter_map(|a| a.key.as_ref().map(|k| (k.image.clone(), k.sha256.clone())))
        .collect();
    keys.sort();
    keys.dedup();
    let mut local_debs = Vec::new();
    let mut local_deb_paths = Vec::new();
    let mut local_names = Vec::new();
    for lp in &s.local_packages {
        let deb = build_local_deb(&l.resolve(&lp.dir), &work.join("debs"), &lp.name, epoch)?;
        let control = fs_err::read_to_string(l.resolve(&lp.dir).join("DEBIAN/control"))?;
        if let Some(pkg) = control.lines().find_map(|x| x.strip_prefix("Package:")) {
            let pkg = pkg.trim();
            // It becomes an `--include` item like the spec's packages: the same grammar.
            if !crate::spec::grammar::is_package_name(pkg) {
                return Err(crate::error::input(format!(
                    "local package {:?}: Package {pkg:?} in DEBIAN/control is not a Debian package name",
                    lp.name
                )));
            }
            local_names.push(pkg.to_string());
        }
        local_debs.push((lp.name.clone(), sha256_file(&deb)?));
        local_deb_paths.push(std::path::absolute(deb)?);
    }
    let mut chroot_commands = Vec::new();
    for g in &s.groups {
        chroot_commands.push(group_hook(&g.name, g.system));
    }
    for u in &s.users {
        chroot_commands.push(user_hook(&u.name, u.system, &u.groups, &u.shell));
    }
    let mmdebstrap = run_output(Command::new("mmdebstrap").arg("--version"))
        .context("mmdebstrap is needed to build the root filesystem (apt-get install mmdebstrap)")?
        .trim()
        .to_string();
    Ok(LayerInputs {
        recipe: 5,
        suite: s.base.suite.clone(),
        sources: apt.iter().map(AptSource::image_line).collect(),
        keys,
        includes: s.packages.clone(),
        local_debs,
        preferences: repo_preferences.clone(),
        chroot_commands,
        epoch,
        mmdebstrap,
        apt,
        local_deb_paths,
        local_names,
        spec_packages: s.packages.clone(),
        repo_packages,
        repo_preferences,
    }
    .pinned(None))
}

/// Creates a group unless it exists. The name is validated ([`crate::spec::grammar`]) and passed
/// as a quoted positional parameter of a fixed script, never spliced into the script's text.
const GROUP_SCRIPT: &str = r#"getent group "$1" >/dev/null && exit 0
if [ "$2" = system ]; then exec groupadd --system -- "$1"; else exec groupadd -- "$1"; fi"#;

/// Creates a user unless it exists; `$1` name, `$2` `system` or `normal`, `$3` comma-separated
/// groups (may be empty), `$4` shell, which must exist in the built root filesystem.
const USER_SCRIPT: &str = r#"getent passwd "$1" >/dev/null && exit 0
if [ ! -x "$4" ]; then echo "E: imagectl: shell $4 of user $1 is not in the image (install the package that provides it)" >&2; exit 1; fi
if [ "$2" = system ]; then k=--system; else k=--create-home; fi
if [ -n "$3" ]; then exec useradd "$k" --groups "$3" --shell "$4" -- "$1"; fi
exec useradd "$k" --shell "$4" -- "$1""#;

/// The mmdebstrap customize hook that creates group `name`.
fn group_hook(name: &str, system: bool) -> String {
    let kind = if system { "system" } else { "normal" };
    format!(
        "chroot \"$1\" sh -c {} imagectl-group {} {kind}",
        quote(GROUP_SCRIPT),
        quote(name)
    )
}

/// The mmdebstrap customize hook that creates user `name`. mmdebstrap runs a hook through
/// `sh -c` (with `$1` the root), so each spec value is one single-quoted word there and a
/// positional parameter of [`USER_SCRIPT`] in the chroot; the values were validated at load time.
fn user_hook(name: &str, system: bool, groups: &[String], shell: &str) -> String {
    let kind = if system { "system" } else { "normal" };
    format!(
        "chroot \"$1\" sh -c {} imagectl-user {} {kind} {} {}",
        quote(USER_SCRIPT),
        quote(name),
        quote(&groups.join(",")),
        quote(shell)
    )
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Installed packages as (name, version, arch).
pub type Installed = Vec<(String, String, String)>;

/// apt could not satisfy the request (a pin that is gone, or pins that no longer fit together):
/// the caller may re-resolve.
#[derive(Debug)]
pub struct AptRefused(pub String);

impl std::fmt::Display for AptRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AptRefused {}

/// Runs mmdebstrap into `out` (a tar), fetching from `fetch` (in that order), and returns the
/// installed packages (without sha256s yet) and the directory holding apt's package lists. The
/// image keeps `inputs.sources` as its `/etc/apt/sources.list`, whatever it was fetched from.
pub fn bootstrap(
    inputs: &LayerInputs,
    fetch: &[AptSource],
    out: &Path,
    deb_cache: &Path,
    work: &Path,
) -> Result<(Installed, PathBuf)> {
    fs_err::create_dir_all(deb_cache)?;
    let lists = work.join("lists");
    fs_err::create_dir_all(&lists)?;
    let prefs = work.join("imagectl.pref");
    fs_err::write(&prefs, &inputs.preferences)?;
    let image_sources = work.join("image-sources.list");
    fs_err::write(
        &image_sources,
        inputs
            .sources
            .iter()
            .map(|l| l.clone() + "\n")
            .collect::<String>(),
    )?;
    let installed = work.join("imagectl-installed.tsv");
    let q = |p: &Path| quote(&p.to_string_lossy());
    let mut cmd = Command::new("mmdebstrap");
    cmd.arg("--variant=minbase")
        .arg("--format=tar")
        .arg("--skip=essential/unlink")
        .arg(format!("--mode={}", if is_root() { "root" } else { "unshare" }))
        .arg("--aptopt=Acquire::Retries \"3\"")
        .arg("--aptopt=APT::Install-Recommends \"false\"")
        .arg("--dpkgopt=force-unsafe-io")
        .arg(format!(
            "--setup-hook=mkdir -p \"$1\"/etc/apt/preferences.d \"$1\"/var/cache/apt/archives && cp {} \"$1\"/etc/apt/preferences.d/imagectl.pref",
            q(&prefs)
        ))
        .arg(format!("--setup-hook=sync-in {} /var/cache/apt/archives/", q(deb_cache)))
        .arg(format!("--customize-hook=sync-out /var/cache/apt/archives {}", q(deb_cache)))
        .arg(format!("--customize-hook=sync-out /var/lib/apt/lists {}", q(&lists)));
    // mmdebstrap hands `--include` items to `apt-get install` after its own options and has no
    // `--` of its own (an item starting with `/` or `./` is even taken as a local .deb): there is
    // no way to end options here, so the grammar is the guard. Every item is a package name,
    // `name=version` or `name/suite` checked at load time ([`crate::spec::grammar::is_package`]),
    // and the lock's pins are checked when the lock is read.
    if !inputs.includes.is_empty() {
        cmd.arg(format!("--include={}", inputs.includes.join(",")));
    }
    // gitlab-runner's postinst: deferred past apt, then run as on the booted image and checked
    // (see [`super::runner`]); the hooks are fixed text, no spec field reaches them.
    let (essential, customize) = super::runner::hook_args(work)?;
    cmd.args(essential).args(customize);
    for c in &inputs.chroot_commands {
        cmd.arg(format!("--customize-hook={c}"));
    }
    // mmdebstrap runs apt on this host, which verifies signatures as its unprivileged `_apt`
    // user, while apt inside the chroot reads the same `signed-by` path: so the keys are staged
    // in a new world-readable directory (random name) at the same path on both sides, and removed
    // from the image again; the image keeps them under /etc/apt/keyrings.
    let stage = tempfile::Builder::new()
        .prefix("imagectl-keys-")
        .tempdir()
        .context("creating a directory for the signing keys")?;
    {
        use std::os::unix::fs::PermissionsExt;
        fs_err::set_permissions(stage.path(), std::fs::Permissions::from_mode(0o755))?;
    }
    let stage_dir = stage.path().to_string_lossy().into_owned();
    let mut keys_done = Vec::new();
    for k in inputs.apt.iter().filter_map(|a| a.key.as_ref()) {
        if keys_done.contains(&k.image) {
            continue;
        }
        keys_done.push(k.image.clone());
        let name = Path::new(&k.image).file_name().unwrap_or_default();
        let staged = stage.path().join(name);
        fs_err::copy(&k.host, &staged)?;
        {
            use std::os::unix::fs::PermissionsExt;
            fs_err::set_permissions(&staged, std::fs::Permissions::from_mode(0o644))?;
        }
        cmd.arg(format!("--setup-hook=mkdir -p \"$1\"{}", quote(&stage_dir)))
            .arg(format!("--setup-hook=upload {} {}", q(&staged), q(&staged)))
            .arg("--customize-hook=mkdir -p \"$1\"/etc/apt/keyrings")
            .arg(format!(
                "--customize-hook=upload {} {}",
                q(&staged),
                quote(&k.image)
            ))
            .arg(format!(
                "--customize-hook=chmod 0644 \"$1\"{}",
                quote(&k.image)
            ));
    }
    if !keys_done.is_empty() {
        cmd.arg(format!(
            "--customize-hook=rm -rf \"$1\"{}",
            quote(&stage_dir)
        ));
    }
    cmd.arg(format!(
        "--customize-hook=upload {} /etc/apt/sources.list",
        q(&image_sources)
    ));
    cmd.arg(
        "--customize-hook=chroot \"$1\" dpkg-query -W -f='${Package}\\t${Version}\\t${Architecture}\\n' > \"$1\"/tmp/imagectl-installed.tsv",
    )
    .arg(format!("--customize-hook=copy-out /tmp/imagectl-installed.tsv {}", q(work)))
    // apt's auto/manual marks differ between a fresh resolution and a pinned one (every pinned
    // package is asked for by name); an immutable image never autoremoves, so drop them and both
    // ways give the same bytes.
    .arg("--customize-hook=rm -f \"$1\"/tmp/imagectl-installed.tsv \"$1\"/etc/apt/preferences.d/imagectl.pref \"$1\"/var/lib/apt/extended_states")
    .arg(&inputs.suite)
    .arg(out);
    for s in fetch {
        cmd.arg(s.staged_line(stage.path()));
    }
    cmd.env("SOURCE_DATE_EPOCH", inputs.epoch.to_string());
    // gitlab-runner's postinst.deb would otherwise run `clear-docker-cache prune` in the build
    // root, where no Docker daemon runs.
    cmd.env("NO_DOCKER_PRUNE", "1");
    let log = work.join("mmdebstrap.log");
    let logf = fs_err::File::create(&log)?;
    tracing::debug!("running {:?}", cmd);
    let status = cmd
        .stdout(logf.try_clone()?.into_parts().0)
        .stderr(logf.into_parts().0)
        .status()
        .context("starting mmdebstrap (apt-get install mmdebstrap)")?;
    if !status.success() {
        let text = fs_err::read_to_string(&log).unwrap_or_default();
        tracing::debug!("mmdebstrap log:\n{}", crate::util::tail(&text, 200));
        return Err(failure(&text, &status.to_string()));
    }
    let text = fs_err::read_to_string(&installed)?;
    let pkgs = text
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            Some((
                f.next()?.to_string(),
                f.next()?.to_string(),
                f.next()?.to_string(),
            ))
        })
        .collect();
    Ok((pkgs, lists))
}

/// The error for a failed mmdebstrap: apt's own complaints, never its (kilobytes long) command
/// line; `-v` logs the whole tail.
fn failure(log: &str, status: &str) -> anyhow::Error {
    let mut said: Vec<String> = Vec::new();
    for line in log.lines() {
        let l = line.trim();
        let complaint = l.starts_with("E: ")
            || l.contains("Depends:")
            || l.contains("but it is not going to be installed")
            || l.starts_with("Err:");
        if !complaint || l.contains("--include") || l.contains("apt-get --yes") {
            continue;
        }
        let short: String = l.chars().take(240).collect();
        if !said.contains(&short) {
            said.push(short);
        }
    }
    let refused = log.contains("Unable to correct problems")
        || log.contains("unmet dependencies")
        || log.contains("Unmet dependencies")
        || log.contains("was not found")
        || log.contains("has no installation candidate")
        || log.contains("Unable to locate package");
    let hint = if log.contains("Unable to locate package")
        || log.contains("has no installation candidate")
    {
        "\nhint: a package is not in the configured sources; check the spec's packages and repositories"
    } else if log.contains("Could not resolve")
        || log.contains("Failed to fetch")
        || log.contains("Unable to connect")
    {
        "\nhint: a package source is unreachable from this host; without network access to GitLab's \
         repository and GitHub releases, build with `--profile offline`"
    } else {
        ""
    };
    let shown = if said.is_empty() {
        "(no message from apt; run with -v for mmdebstrap's log)".to_string()
    } else {
        let n = said.len();
        let mut v: Vec<String> = said.into_iter().take(12).collect();
        if n > 12 {
            v.push(format!("… and {} more", n - 12));
        }
        v.join("\n  ")
    };
    let msg = format!("mmdebstrap failed ({status}):\n  {shown}{hint}");
    if refused {
        anyhow::Error::new(AptRefused(msg))
    } else {
        anyhow::anyhow!(msg)
    }
}

/// sha256 of each (package, version, arch) from apt's Packages indexes.
pub fn index_sha256(lists: &Path) -> Result<BTreeMap<(String, String), String>> {
    let mut map = BTreeMap::new();
    for e in fs_err::read_dir(lists)? {
        let p = e?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if !name.ends_with("_Packages") {
            continue;
        }
        let text = fs_err::read_to_string(&p)?;
        for stanza in text.split("\n\n") {
            let (mut pkg, mut ver, mut sha) = (None, None, None);
            for line in stanza.lines() {
                if let Some(v) = line.strip_prefix("Package: ") {
                    pkg = Some(v.trim());
                } else if let Some(v) = line.strip_prefix("Version: ") {
                    ver = Some(v.trim());
                } else if let Some(v) = line.strip_prefix("SHA256: ") {
                    sha = Some(v.trim());
                }
            }
            if let (Some(p), Some(v), Some(s)) = (pkg, ver, sha) {
                map.insert((p.to_string(), v.to_string()), s.to_string());
            }
        }
    }
    Ok(map)
}

fn is_root() -> bool {
    run_output(Command::new("id").arg("-u"))
        .map(|s| s.trim() == "0")
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_hook_passes_spec_values_as_words_not_code() {
        // Stub `chroot` (drops the root), `getent` (nothing exists) and `useradd` (records argv).
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path();
        let log = bin.join("argv");
        let stub = |name: &str, body: &str| {
            use std::os::unix::fs::PermissionsExt;
            let p = bin.join(name);
            fs_err::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            fs_err::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        stub("chroot", "shift; exec \"$@\"");
        stub("getent", "exit 2");
        stub(
            "useradd",
            &format!(
                "for a in \"$@\"; do echo \"[$a]\"; done > {}",
                log.display()
            ),
        );
        let hook = user_hook(
            "ops",
            false,
            &["docker".into(), "a$(touch pwned)".into()],
            "/bin/sh",
        );
        let st = Command::new("sh")
            .arg("-c")
            .arg(&hook)
            .arg("sh")
            .arg("/nonexistent-root")
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .current_dir(bin)
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(
            fs_err::read_to_string(&log).unwrap(),
            "[--create-home]\n[--groups]\n[docker,a$(touch pwned)]\n[--shell]\n[/bin/sh]\n[--]\n[ops]\n"
        );
        assert!(!bin.join("pwned").exists());
        // A shell missing from the root filesystem fails the bake, naming it.
        let hook = user_hook("ops", true, &[], "/nonexistent/shell");
        let out = Command::new("sh")
            .arg("-c")
            .arg(&hook)
            .arg("sh")
            .arg("/")
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("shell /nonexistent/shell"));
    }

    #[test]
    fn failures_quote_apt_not_its_command_line() {
        let log = "I: running apt-get --yes -oApt::Get::Download-Only=true install foo=1 bar=2 --include x\n\
                   E: Version '6.1.192-2' for 'linux-image-cloud-amd64' was not found\n\
                   E: apt-get --yes install failed\n";
        let e = failure(log, "exit status: 1");
        let msg = e.to_string();
        assert!(msg.contains("Version '6.1.192-2'"), "{msg}");
        assert!(!msg.contains("Download-Only"), "{msg}");
        assert!(e.downcast_ref::<AptRefused>().is_some());
        let e = failure(
            "E: Failed to fetch http://x/y  Could not resolve 'x'\n",
            "exit status: 1",
        );
        assert!(e.downcast_ref::<AptRefused>().is_none());
        assert!(e.to_string().contains("--profile offline"));
    }

    #[test]
    fn index_lookup_reads_packages_files() {
        let d = tempfile::tempdir().unwrap();
        fs_err::write(
            d.path().join("x_dists_bookworm_main_binary-amd64_Packages"),
            "Package: a\nVersion: 1.0\nSHA256: aa\n\nPackage: b\nVersion: 2\nSHA256: bb\n",
        )
        .unwrap();
        let m = index_sha256(d.path()).unwrap();
        assert_eq!(m[&("b".to_string(), "2".to_string())], "bb");
    }
}
