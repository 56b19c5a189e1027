//! URL artifacts: where each one's sha256 comes from, and fetching it into the cache, verified
//! before anything uses it.
//!
//! The expected sha256 is the publisher's (the spec's `sha256`) when there is one, else the one the
//! lock recorded. With neither (a new artifact, or `--refresh-lock`) the first download is hashed
//! and its sha256 is recorded in the lock: trust on first use, said on the progress output.

use crate::error::input;
use crate::progress::Progress;
use crate::spec::lock::{Lock, LockedArtifact};
use crate::spec::Artifact;
use crate::store::Cache;
use crate::util::sha256_file;
use anyhow::{Context, Result};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

/// An HTTP client with rustls (ring) and the system's roots.
pub fn http_client() -> Result<reqwest::blocking::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(15))
        .timeout(Duration::from_secs(600))
        .user_agent(concat!("imagectl/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("creating the HTTP client")
}

/// An artifact with its verified file in the cache.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// What the spec says.
    pub artifact: Artifact,
    /// Its sha256 (verified).
    pub sha256: String,
    /// The cached file.
    pub path: PathBuf,
}

impl Resolved {
    /// Its lock entry.
    pub fn locked(&self) -> LockedArtifact {
        LockedArtifact {
            name: self.artifact.name.clone(),
            url: self.artifact.url.clone(),
            sha256: self.sha256.clone(),
        }
    }
}

/// The sha256 an artifact must have: the spec's, else the lock's (same name and URL) unless the
/// lock is being refreshed. `None`: trust on first use. `--locked` refuses an artifact the lock
/// does not cover.
pub fn expected(
    a: &Artifact,
    lock: Option<&Lock>,
    refresh: bool,
    locked: bool,
) -> Result<Option<String>> {
    if let Some(sha) = &a.sha256 {
        return Ok(Some(sha.clone()));
    }
    let from_lock = lock
        .filter(|_| !refresh)
        .and_then(|l| {
            l.artifacts
                .iter()
                .find(|x| x.name == a.name && x.url == a.url)
        })
        .map(|x| x.sha256.clone());
    if from_lock.is_none() && locked {
        return Err(input(format!(
            "--locked: the lock records no sha256 for artifact {:?} ({}); build without --locked \
             (or with --refresh-lock) to record it",
            a.name, a.url
        )));
    }
    Ok(from_lock)
}

/// Fetches every artifact of a spec, verified against [`expected`].
pub fn resolve_all(
    artifacts: &[Artifact],
    lock: Option<&Lock>,
    refresh: bool,
    locked: bool,
    cache: &Cache,
    progress: &Progress,
) -> Result<Vec<Resolved>> {
    let mut out = Vec::new();
    for a in artifacts {
        let want = expected(a, lock, refresh, locked)?;
        let (path, sha256) = fetch(a, want.as_deref(), cache, progress)?;
        if want.is_none() {
            progress.note(format!(
                "artifact {}: recorded sha256 {sha256} of this download in the lock (trust on \
                 first use: the spec gives no published sha256)",
                a.name
            ));
        }
        out.push(Resolved {
            artifact: a.clone(),
            sha256,
            path,
        });
    }
    Ok(out)
}

/// Returns the cached path and sha256 of an artifact, downloading it if needed. With `expect`, the
/// download must have that sha256 (a mismatch is refused, exit code 2).
pub fn fetch(
    a: &Artifact,
    expect: Option<&str>,
    cache: &Cache,
    progress: &Progress,
) -> Result<(PathBuf, String)> {
    if let Some(sha) = expect {
        let dest = cache.artifact(sha);
        if dest.is_file() && sha256_file(&dest)? == sha {
            return Ok((dest, sha.to_string()));
        }
    }
    let dir = cache.artifact("x");
    let dir = dir.parent().expect("artifact dir");
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a download file in {}", dir.display()))?;
    if let Some(path) = a.url.strip_prefix("file://") {
        let mut src = fs_err::File::open(path)?;
        std::io::copy(&mut src, tmp.as_file_mut()).with_context(|| format!("copying {}", a.url))?;
    } else {
        download(a, tmp.as_file_mut(), progress)?;
    }
    tmp.as_file_mut().flush()?;
    let got = sha256_file(tmp.path())?;
    if let Some(want) = expect {
        if got != want {
            let whose = if a.sha256.is_some() {
                "the spec pins"
            } else {
                "the lock records"
            };
            return Err(input(format!(
                "artifact {:?} from {} has sha256 {got}, but {whose} {want}",
                a.name, a.url
            )));
        }
    }
    let dest = cache.artifact(&got);
    tmp.persist(&dest)
        .map_err(|e| e.error)
        .with_context(|| format!("storing {}", dest.display()))?;
    Ok((dest, got))
}

fn download(a: &Artifact, out: &mut std::fs::File, progress: &Progress) -> Result<()> {
    let client = http_client()?;
    let mut resp = client.get(&a.url).send().map_err(|e| {
        anyhow::anyhow!(
            "fetching artifact {:?} from {}: {e}\nhint: this host cannot reach that source; \
             build with `--profile offline` where GitHub and GitLab are unreachable",
            a.name,
            a.url
        )
    })?;
    if !resp.status().is_success() {
        anyhow::bail!(
            "fetching artifact {:?} from {}: HTTP {}",
            a.name,
            a.url,
            resp.status()
        );
    }
    let bar = progress.bytes(&a.name, resp.content_length().unwrap_or(0));
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = resp
            .read(&mut buf)
            .with_context(|| format!("downloading {}", a.url))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn art(sha: Option<&str>) -> Artifact {
        Artifact {
            name: "tool".into(),
            url: "file:///nonexistent/tool".into(),
            sha256: sha.map(str::to_string),
            dest: "/usr/local/bin/tool".into(),
            mode: "0755".into(),
        }
    }

    fn lock_with(sha: &str) -> Lock {
        Lock {
            version: crate::spec::lock::LOCK_VERSION,
            spec: "t".into(),
            inputs: "x".into(),
            source_date_epoch: 1,
            snapshot: None,
            packages: vec![],
            artifacts: vec![LockedArtifact {
                name: "tool".into(),
                url: "file:///nonexistent/tool".into(),
                sha256: sha.into(),
            }],
        }
    }

    #[test]
    fn the_spec_beats_the_lock_which_beats_first_use() {
        let l = lock_with("bb");
        assert_eq!(
            expected(&art(Some("aa")), Some(&l), false, false).unwrap(),
            Some("aa".into())
        );
        assert_eq!(
            expected(&art(None), Some(&l), false, false).unwrap(),
            Some("bb".into())
        );
        assert_eq!(expected(&art(None), Some(&l), true, false).unwrap(), None);
        assert_eq!(expected(&art(None), None, false, false).unwrap(), None);
        let e = expected(&art(None), None, false, true).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 2);
        assert!(e.to_string().contains("records no sha256"), "{e}");
    }

    #[test]
    fn first_use_records_and_a_changed_download_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(&dir.path().join("cache")).unwrap();
        let src = dir.path().join("tool");
        std::fs::write(&src, b"v1").unwrap();
        let mut a = art(None);
        a.url = format!("file://{}", src.display());
        let p = Progress::new(true);
        let (path, sha) = fetch(&a, None, &cache, &p).unwrap();
        assert_eq!(sha, crate::util::sha256_bytes(b"v1"));
        assert_eq!(std::fs::read(path).unwrap(), b"v1");
        std::fs::write(&src, b"v2").unwrap();
        // Cached under its sha256: the lock's value is served from the cache.
        assert!(fetch(&a, Some(&sha), &cache, &p).is_ok());
        std::fs::remove_file(cache.artifact(&sha)).unwrap();
        let e = fetch(&a, Some(&sha), &cache, &p).unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 2);
        assert!(e.to_string().contains("the lock records"), "{e}");
    }
}
