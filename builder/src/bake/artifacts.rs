//! Fetching URL artifacts into the cache, verified by sha256 before anything uses them.

use crate::progress::Progress;
use crate::spec::Artifact;
use crate::store::Cache;
use crate::util::sha256_file;
use anyhow::{bail, Context, Result};
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

/// Returns the cached path of an artifact, downloading and verifying it if needed.
pub fn fetch(a: &Artifact, cache: &Cache, progress: &Progress) -> Result<PathBuf> {
    let dest = cache.artifact(&a.sha256);
    if dest.is_file() && sha256_file(&dest)? == a.sha256 {
        return Ok(dest);
    }
    let tmp = dest.with_extension("part");
    if let Some(path) = a.url.strip_prefix("file://") {
        fs_err::copy(path, &tmp)?;
    } else {
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
            bail!(
                "fetching artifact {:?} from {}: HTTP {}",
                a.name,
                a.url,
                resp.status()
            );
        }
        let bar = progress.bytes(&a.name, resp.content_length().unwrap_or(0));
        let mut out = fs_err::File::create(&tmp)?;
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
    }
    let got = sha256_file(&tmp)?;
    if got != a.sha256 {
        let _ = fs_err::remove_file(&tmp);
        bail!(
            "artifact {:?} from {} has sha256 {got}, but the spec pins {}",
            a.name,
            a.url,
            a.sha256
        );
    }
    fs_err::rename(&tmp, &dest)?;
    Ok(dest)
}
