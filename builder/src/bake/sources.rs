//! Where packages come from: the apt sources an image is made from (and keeps in its
//! `/etc/apt/sources.list`), the snapshot archive's copy of each Debian archive among them, and a
//! local repository of cached .deb files already checked against the lock.
//!
//! The snapshot archive's layout is Debian's: `<base>/archive/<archive>/<YYYYMMDDTHHMMSSZ>/`, with
//! `debian` and `debian-security` as archives. Its Release files carry a Valid-Until that has long
//! passed, so its lines say `check-valid-until=no`; apt still checks every signature and hash.

use crate::error::input;
use crate::spec::Loaded;
use crate::util::{run, sha256_file};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Which of Debian's archives a source is, when it is one (the snapshot archive mirrors those).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Archive {
    /// `debian`: the suite, its -updates, and older suites from the same mirror.
    Debian,
    /// `debian-security`.
    Security,
}

impl Archive {
    fn dir(self) -> &'static str {
        match self {
            Archive::Debian => "debian",
            Archive::Security => "debian-security",
        }
    }
}

/// A signing key: the file on this host, and where the image keeps a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    /// The key file on the build host.
    pub host: PathBuf,
    /// Its path inside the image (`/etc/apt/keyrings/imagectl-NAME.{asc,gpg}`).
    pub image: String,
    /// sha256 of the key file.
    pub sha256: String,
}

impl Key {
    /// A key named `name`, stored in the image under a name whose extension tells apt its format.
    pub fn new(name: &str, host: PathBuf) -> Result<Self> {
        let bytes = fs_err::read(&host)?;
        let ext = if bytes.starts_with(b"-----BEGIN") {
            "asc"
        } else {
            "gpg"
        };
        Ok(Self {
            image: format!("/etc/apt/keyrings/imagectl-{name}.{ext}"),
            sha256: sha256_file(&host)?,
            host,
        })
    }
}

/// One `deb` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AptSource {
    /// Repository URI (with a trailing slash for flat repositories).
    pub uri: String,
    /// Suite, or `./` for a flat repository.
    pub suite: String,
    /// Components (empty for a flat repository).
    pub components: Vec<String>,
    /// Its signing key, when it is not one of the host's trusted keys.
    pub key: Option<Key>,
    /// Which Debian archive it is, if any.
    pub archive: Option<Archive>,
    /// A snapshot: its Release files have expired (`check-valid-until=no`).
    pub expired_ok: bool,
    /// Unsigned (only the local repository of verified .debs).
    pub trusted: bool,
}

impl AptSource {
    fn line(&self, key_path: Option<String>) -> String {
        let mut opts = Vec::new();
        if let Some(k) = key_path {
            opts.push(format!("signed-by={k}"));
        }
        if self.expired_ok {
            opts.push("check-valid-until=no".to_string());
        }
        if self.trusted {
            opts.push("trusted=yes".to_string());
        }
        let opts = if opts.is_empty() {
            String::new()
        } else {
            format!("[{}] ", opts.join(" "))
        };
        let mut line = format!("deb {opts}{} {}", self.uri, self.suite);
        for c in &self.components {
            line.push(' ');
            line.push_str(c);
        }
        line
    }

    /// The line apt uses on this host (the key as a host path).
    pub fn host_line(&self) -> String {
        self.line(
            self.key
                .as_ref()
                .map(|k| k.host.to_string_lossy().into_owned()),
        )
    }

    /// The line the image keeps (the key at its path inside the image).
    pub fn image_line(&self) -> String {
        self.line(self.key.as_ref().map(|k| k.image.clone()))
    }

    /// The line with the key staged in `dir` under its image file name (see `rootfs::bootstrap`).
    pub fn staged_line(&self, dir: &Path) -> String {
        self.line(self.key.as_ref().map(|k| {
            let name = Path::new(&k.image).file_name().unwrap_or_default();
            dir.join(name).to_string_lossy().into_owned()
        }))
    }

    /// The same suite in the snapshot archive at `timestamp`, for a Debian archive.
    pub fn snapshot(&self, base: &str, timestamp: &str) -> Option<AptSource> {
        let archive = self.archive?;
        Some(AptSource {
            uri: format!("{base}/archive/{}/{timestamp}/", archive.dir()),
            expired_ok: true,
            ..self.clone()
        })
    }

    /// A short name for messages: `URI SUITE`.
    pub fn describe(&self) -> String {
        format!("{} {}", self.uri.trim_end_matches('/'), self.suite)
    }
}

/// The snapshot archive's copies of the Debian archives among `sources`, at `timestamp`.
pub fn snapshots_of(sources: &[AptSource], base: &str, timestamp: &str) -> Vec<AptSource> {
    sources
        .iter()
        .filter_map(|a| a.snapshot(base, timestamp))
        .collect()
}

/// The build host's Debian mirror and security mirror, from its apt sources.
pub fn host_mirrors() -> Result<(String, Option<String>)> {
    let mut uris: Vec<(String, Vec<String>)> = Vec::new();
    let dir = Path::new("/etc/apt/sources.list.d");
    if let Ok(rd) = std::fs::read_dir(dir) {
        let mut files: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for f in files {
            if f.extension().and_then(|e| e.to_str()) == Some("sources") {
                let text = fs_err::read_to_string(&f)?;
                uris.extend(parse_deb822(&text));
            }
        }
    }
    if let Ok(text) = std::fs::read_to_string("/etc/apt/sources.list") {
        for line in text.lines() {
            let mut w = line.split_whitespace();
            if w.next() != Some("deb") {
                continue;
            }
            let rest: Vec<&str> = w
                .filter(|x| !x.starts_with('[') && !x.ends_with(']'))
                .collect();
            if rest.len() >= 2 {
                uris.push((rest[0].to_string(), vec![rest[1].to_string()]));
            }
        }
    }
    let main = uris
        .iter()
        .find(|(_, suites)| suites.iter().any(|s| !s.contains('-')))
        .map(|(u, _)| u.clone())
        .ok_or_else(|| {
            input("cannot find the build host's Debian mirror in /etc/apt/sources.list(.d); set base.mirror in the spec")
        })?;
    let security = uris
        .iter()
        .find(|(_, suites)| suites.iter().any(|s| s.ends_with("-security")))
        .map(|(u, _)| u.clone());
    Ok((main, security))
}

fn parse_deb822(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for para in text.split("\n\n") {
        let mut types = "";
        let mut uri = None;
        let mut suites = Vec::new();
        let mut enabled = true;
        for line in para.lines() {
            if let Some(v) = line.strip_prefix("Types:") {
                types = v.trim();
            } else if let Some(v) = line.strip_prefix("URIs:") {
                uri = v.split_whitespace().next().map(str::to_string);
            } else if let Some(v) = line.strip_prefix("Suites:") {
                suites = v.split_whitespace().map(str::to_string).collect();
            } else if let Some(v) = line.strip_prefix("Enabled:") {
                enabled = v.trim() != "no";
            }
        }
        if enabled && types.split_whitespace().any(|t| t == "deb") {
            if let Some(u) = uri {
                out.push((u, suites));
            }
        }
    }
    out
}

/// The fingerprint(s) of an OpenPGP key file's primary keys, via gpg in a private, empty home.
pub fn key_fingerprints(key: &Path) -> Result<Vec<String>> {
    let home = tempfile::tempdir().context("creating a private GnuPG home")?;
    let out = crate::util::run_output(
        Command::new("gpg")
            .args(["--no-options", "--batch", "--with-colons", "--show-keys"])
            .arg(key)
            .env("GNUPGHOME", home.path()),
    )
    .with_context(|| format!("reading key {}", key.display()))?;
    let mut fps = Vec::new();
    let mut primary = false;
    for line in out.lines() {
        if line.starts_with("pub:") {
            primary = true;
        } else if line.starts_with("sub:") {
            primary = false;
        } else if primary && line.starts_with("fpr:") {
            if let Some(fp) = line.split(':').nth(9) {
                fps.push(fp.to_uppercase());
            }
        }
    }
    Ok(fps)
}

/// Fetches a repository signing key, keeping a copy in `keys` (the cache) named by its pinned
/// fingerprint, so that a host without the network (an air-gapped rebuild) uses the cached copy.
fn fetch_key(url: &str, name: &str, fingerprint: &str, keys: &Path) -> Result<PathBuf> {
    let cached = keys.join(format!("{fingerprint}.key"));
    if cached.is_file() {
        return Ok(std::path::absolute(cached)?);
    }
    let client = crate::bake::artifacts::http_client()?;
    let resp = client
        .get(url)
        .timeout(std::time::Duration::from_secs(20))
        .send()
        .and_then(|r| r.error_for_status())
        .map_err(|e| {
            anyhow::anyhow!(
                "fetching the signing key of apt repository {name:?} from {url}: {e}\n\
                 hint: this host cannot reach that source; build with `--profile offline` \
                 where GitLab and GitHub are unreachable"
            )
        })?;
    let bytes = resp.bytes().with_context(|| format!("reading {url}"))?;
    fs_err::create_dir_all(keys)?;
    let part = keys.join(format!("{fingerprint}.part"));
    fs_err::write(&part, &bytes)?;
    let have = key_fingerprints(&part)?;
    if !have.iter().any(|f| f == fingerprint) {
        let _ = fs_err::remove_file(&part);
        return Err(input(format!(
            "apt repository {name:?}: the key from {url} has fingerprint {} but the spec pins \
             {fingerprint}",
            have.join(", ")
        )));
    }
    fs_err::rename(&part, &cached)?;
    Ok(std::path::absolute(cached)?)
}

/// The apt sources of a spec on this host: the base suite, its -updates and (for the host's
/// mirror) -security, then each extra repository, keys checked against their pins.
pub fn for_spec(l: &Loaded, keys_cache: &Path) -> Result<Vec<AptSource>> {
    let s = &l.spec;
    let (host_main, host_sec) = host_mirrors()?;
    let base_key = match &s.base.key_file {
        Some(k) => {
            let path = std::path::absolute(l.resolve(k))?;
            if key_fingerprints(&path)
                .map(|f| f.is_empty())
                .unwrap_or(true)
            {
                return Err(input(format!(
                    "base.key_file {}: not an OpenPGP public key (give the mirror's signing key, \
                     armored or binary)",
                    path.display()
                )));
            }
            Some(Key::new("base", path)?)
        }
        None => None,
    };
    let debian = |uri: &str, suite: String, components: &[String], archive| AptSource {
        uri: uri.to_string(),
        suite,
        components: components.to_vec(),
        key: base_key.clone(),
        archive: Some(archive),
        expired_ok: false,
        trusted: false,
    };
    let mut out = Vec::new();
    let suite = &s.base.suite;
    let comps = &s.base.components;
    match s.base.fixed_snapshot() {
        // A fixed snapshot: resolve against it, not against the mirror.
        Some(ts) => {
            let base = s.base.snapshot_base();
            for (suite, archive) in [
                (suite.clone(), Archive::Debian),
                (format!("{suite}-updates"), Archive::Debian),
                (format!("{suite}-security"), Archive::Security),
            ] {
                let src = debian("", suite, comps, archive);
                out.extend(src.snapshot(&base, ts));
            }
        }
        None => {
            let mirror = if s.base.mirror == "host" {
                host_main.clone()
            } else {
                s.base.mirror.clone()
            };
            out.push(debian(&mirror, suite.clone(), comps, Archive::Debian));
            out.push(debian(
                &mirror,
                format!("{suite}-updates"),
                comps,
                Archive::Debian,
            ));
            if s.base.mirror == "host" {
                if let Some(sec) = &host_sec {
                    out.push(debian(
                        sec,
                        format!("{suite}-security"),
                        comps,
                        Archive::Security,
                    ));
                }
            }
        }
    }
    for r in &s.apt_repositories {
        let on_debian = r.url == "host";
        let url = if on_debian {
            host_main.clone()
        } else {
            r.url.clone()
        };
        let key = match &r.key_fingerprint {
            Some(fp) => {
                let want = fp.replace(' ', "").to_uppercase();
                let host = match (&r.key_file, &r.key_url) {
                    (Some(k), _) => std::path::absolute(l.resolve(k))?,
                    (None, Some(u)) => fetch_key(u, &r.name, &want, keys_cache)?,
                    (None, None) => unreachable!("validated"),
                };
                let have = key_fingerprints(&host)?;
                if !have.contains(&want) {
                    return Err(input(format!(
                        "apt repository {:?}: key {} has fingerprint {} but the spec pins {want}",
                        r.name,
                        host.display(),
                        have.join(", ")
                    )));
                }
                Some(Key::new(&r.name, host)?)
            }
            None if on_debian => base_key.clone(),
            None => None,
        };
        let mut src = AptSource {
            uri: url,
            suite: r.suite.clone(),
            components: r.components.clone(),
            key,
            archive: on_debian.then_some(Archive::Debian),
            expired_ok: false,
            trusted: false,
        };
        if let (true, Some(ts)) = (on_debian, s.base.fixed_snapshot()) {
            src = src
                .snapshot(&s.base.snapshot_base(), ts)
                .expect("a Debian archive");
        }
        out.push(src);
    }
    Ok(out)
}

/// A local flat repository of .deb files (already checked against the lock), for apt to install
/// from without the network: `Packages` and a `Release` naming the base suite, so mmdebstrap's
/// selection of the suite's required packages sees them.
pub fn local_repo(debs: &[PathBuf], dir: &Path, suite: &str) -> Result<AptSource> {
    fs_err::create_dir_all(dir)?;
    for deb in debs {
        let name = deb.file_name().context("a .deb file name")?;
        let to = dir.join(name);
        if fs_err::hard_link(deb, &to).is_err() {
            fs_err::copy(deb, &to)?;
        }
    }
    let packages = crate::util::run_output(
        Command::new("apt-ftparchive")
            .args(["packages", "."])
            .current_dir(dir),
    )
    .context("indexing the cached packages (apt-get install apt-utils)")?;
    fs_err::write(dir.join("Packages"), packages)?;
    let release = crate::util::run_output(
        Command::new("apt-ftparchive")
            .arg("-o")
            .arg(format!("APT::FTPArchive::Release::Suite={suite}"))
            .arg("-o")
            .arg(format!("APT::FTPArchive::Release::Codename={suite}"))
            .args(["-o", "APT::FTPArchive::Release::Origin=imagectl-cache"])
            .args(["release", "."])
            .current_dir(dir),
    )
    .context("indexing the cached packages (apt-get install apt-utils)")?;
    fs_err::write(dir.join("Release"), release)?;
    Ok(AptSource {
        uri: format!("copy://{}/", std::path::absolute(dir)?.display()),
        suite: "./".into(),
        components: vec![],
        key: None,
        archive: None,
        expired_ok: false,
        trusted: true,
    })
}

/// Checks that a tool the sources need is there, naming its package.
pub fn check_tool(tool: &str, package: &str) -> Result<()> {
    run(Command::new(tool).arg("--version"))
        .with_context(|| format!("{tool} is needed (apt-get install {package})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb822_sources_are_parsed() {
        let t = "Types: deb\nURIs: http://m.invalid/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: http://m.invalid/debian-security\nSuites: bookworm-security\n\nTypes: deb-src\nURIs: http://src.invalid\nSuites: bookworm\n";
        let v = parse_deb822(t);
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].0, "http://m.invalid/debian");
        assert_eq!(v[1].1, vec!["bookworm-security"]);
    }

    fn src(archive: Option<Archive>) -> AptSource {
        AptSource {
            uri: "http://m.invalid/debian".into(),
            suite: "bookworm".into(),
            components: vec!["main".into()],
            key: Some(Key {
                host: "/host/k.asc".into(),
                image: "/etc/apt/keyrings/imagectl-base.asc".into(),
                sha256: "x".into(),
            }),
            archive,
            expired_ok: false,
            trusted: false,
        }
    }

    #[test]
    fn lines_name_the_key_where_it_is_and_snapshots_skip_valid_until() {
        let s = src(Some(Archive::Security));
        assert_eq!(
            s.host_line(),
            "deb [signed-by=/host/k.asc] http://m.invalid/debian bookworm main"
        );
        assert_eq!(
            s.image_line(),
            "deb [signed-by=/etc/apt/keyrings/imagectl-base.asc] http://m.invalid/debian bookworm main"
        );
        let snap = s
            .snapshot("http://127.0.0.1:1", "20261122T000000Z")
            .unwrap();
        assert_eq!(
            snap.host_line(),
            "deb [signed-by=/host/k.asc check-valid-until=no] \
             http://127.0.0.1:1/archive/debian-security/20261122T000000Z/ bookworm main"
        );
        assert!(
            src(None).snapshot("x", "y").is_none(),
            "not a Debian archive"
        );
    }
}
