//! Uploading an image to a storage's `import` content, streamed: the multipart body is built by
//! hand (preamble bytes, the file in 256 KiB chunks, epilogue) so that its exact Content-Length is
//! known and memory stays flat whatever the image size. PVE verifies the sha256 `checksum` in
//! the upload task. The node can also pull the image itself (`download-url`).

use super::{params, seg, PveClient, PveError};
use bytes::{Bytes, BytesMut};
use futures_util::stream::{self, StreamExt};
use indicatif::ProgressBar;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::Method;
use std::path::Path;
use tokio::io::AsyncReadExt;

/// Size of one read from the image file.
pub const CHUNK: usize = 256 * 1024;

/// The parts of a multipart/form-data body around the file.
#[derive(Debug)]
pub struct Multipart {
    /// The boundary (without leading dashes).
    pub boundary: String,
    /// Form fields and the file part's header.
    pub preamble: Bytes,
    /// The closing boundary.
    pub epilogue: Bytes,
}

impl Multipart {
    /// Fields first, then the file part named `filename` (PVE reads the file last).
    pub fn new(fields: &[(&str, &str)], filename: &str) -> Self {
        let boundary = format!("imagectl-{}", uuid::Uuid::new_v4().simple());
        let mut pre = String::new();
        for (k, v) in fields {
            pre.push_str(&format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"
            ));
        }
        pre.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"filename\"; filename=\"{filename}\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        ));
        let epilogue = format!("\r\n--{boundary}--\r\n");
        Self {
            boundary,
            preamble: Bytes::from(pre),
            epilogue: Bytes::from(epilogue),
        }
    }

    /// Total body length for a file of `file_len` bytes.
    pub fn content_length(&self, file_len: u64) -> u64 {
        self.preamble.len() as u64 + file_len + self.epilogue.len() as u64
    }
}

/// The name PVE stores an uploaded or downloaded file under: pve-storage `src/PVE/Storage.pm`
/// `normalize_content_filename` (called by `upload` and `download_url` in
/// `src/PVE/API2/Storage/Status.pm` before anything else) drops a trailing newline and everything
/// up to the last `/` or `\\`, then turns every character outside `[a-zA-Z0-9_.-]` into `_`.
/// A volume is then `STORAGE:import/<this name>` (or `iso/…`), whatever name was sent.
pub fn content_filename(name: &str) -> String {
    let name = name.strip_suffix('\n').unwrap_or(name);
    let name = name.rsplit(['/', '\\']).next().unwrap_or(name);
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// True for a (normalised, see [`content_filename`]) file name PVE accepts for `content=import`:
/// `$SAFE_CHAR_CLASS_RE+$UPLOAD_IMPORT_EXT_RE_1` (pve-storage `src/PVE/Storage.pm`, checked in
/// `upload`/`download_url` of `src/PVE/API2/Storage/Status.pm`).
pub fn valid_import_name(name: &str) -> bool {
    let Some((stem, ext)) = name.rsplit_once('.') else {
        return false;
    };
    !stem.is_empty()
        && matches!(ext, "qcow2" | "raw" | "vmdk" | "ova")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.+=_".contains(c))
}

impl PveClient {
    /// Uploads `file` as `STORAGE:import/NAME` on `node`, NAME being [`content_filename`] of
    /// `filename`, and returns the upload task's UPID (not waited for). `bar` counts the bytes
    /// sent.
    pub async fn upload_import(
        &self,
        node: &str,
        storage: &str,
        filename: &str,
        file: &Path,
        sha256: &str,
        bar: &ProgressBar,
    ) -> Result<String, anyhow::Error> {
        self.upload(node, storage, "import", filename, file, sha256, bar)
            .await
    }

    /// Uploads `file` as `STORAGE:iso/NAME` on `node`, NAME being [`content_filename`] of
    /// `filename` (checksum verified by PVE), and returns the upload task's UPID (not waited for).
    pub async fn upload_iso(
        &self,
        node: &str,
        storage: &str,
        filename: &str,
        file: &Path,
        sha256: &str,
    ) -> Result<String, anyhow::Error> {
        let bar = ProgressBar::hidden();
        self.upload(node, storage, "iso", filename, file, sha256, &bar)
            .await
    }

    /// Streams `file` to `POST /nodes/{node}/storage/{storage}/upload` with `content`.
    #[allow(clippy::too_many_arguments)]
    async fn upload(
        &self,
        node: &str,
        storage: &str,
        content: &str,
        filename: &str,
        file: &Path,
        sha256: &str,
        bar: &ProgressBar,
    ) -> Result<String, anyhow::Error> {
        use anyhow::Context;
        let stored = content_filename(filename);
        if stored != filename {
            tracing::warn!(
                "PVE stores the upload {filename:?} as {content}/{stored} (it normalises file names)"
            );
        }
        let path = format!("/nodes/{}/storage/{}/upload", seg(node), seg(storage));
        let mut attempt = 0;
        loop {
            let f = tokio::fs::File::open(file)
                .await
                .with_context(|| format!("opening {}", file.display()))?;
            let len = f
                .metadata()
                .await
                .with_context(|| format!("reading the size of {}", file.display()))?
                .len();
            let mp = Multipart::new(
                &[
                    ("content", content),
                    ("checksum-algorithm", "sha256"),
                    ("checksum", sha256),
                ],
                filename,
            );
            bar.set_length(len);
            bar.set_position(0);
            let total = mp.content_length(len);
            let body = body_stream(
                mp.preamble.clone(),
                f,
                len,
                mp.epilogue.clone(),
                bar.clone(),
            );
            let resp = self
                .http
                .request(Method::POST, self.url(&path))
                .header(AUTHORIZATION, self.opts.token.header())
                .header(
                    CONTENT_TYPE,
                    HeaderValue::from_str(&format!(
                        "multipart/form-data; boundary={}",
                        mp.boundary
                    ))?,
                )
                .header(CONTENT_LENGTH, total)
                .body(reqwest::Body::wrap_stream(body))
                .send()
                .await;
            let result = match resp {
                Ok(resp) => self.answer(&Method::POST, &path, resp).await,
                Err(e) => Err(self.transport(&Method::POST, &path, e)),
            };
            match result {
                Ok(v) => {
                    return v
                        .as_str()
                        .filter(|u| u.starts_with("UPID:"))
                        .map(str::to_string)
                        .ok_or_else(|| {
                            PveError::decode("POST", &path, "expected a task id (UPID)").into()
                        })
                }
                Err(e) if attempt + 1 < self.opts.attempts && upload_retryable(&e) => {
                    let delay = self.backoff(attempt);
                    tracing::warn!("{e}; uploading again in {:.1}s", delay.as_secs_f64());
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Asks `node` to fetch `url` into `STORAGE:import/NAME`, NAME being [`content_filename`] of
    /// `filename` (PVE verifies the checksum); returns the UPID.
    pub async fn download_import(
        &self,
        node: &str,
        storage: &str,
        url: &str,
        filename: &str,
        sha256: &str,
        verify_certificates: bool,
    ) -> Result<String, PveError> {
        let path = format!("/nodes/{}/storage/{}/download-url", seg(node), seg(storage));
        self.post_task(
            &path,
            params([
                ("content", "import"),
                ("url", url),
                ("filename", filename),
                ("checksum", sha256),
                ("checksum-algorithm", "sha256"),
                (
                    "verify-certificates",
                    if verify_certificates { "1" } else { "0" },
                ),
            ]),
        )
        .await
    }
}

/// Lock timeouts, proxy errors and failed connects: the whole body is sent again.
fn upload_retryable(e: &PveError) -> bool {
    match e {
        PveError::Api { status, .. } => e.is_lock_timeout() || matches!(status, 502..=504),
        PveError::Transport { source, .. } => source.is_connect(),
        _ => false,
    }
}

/// preamble, then exactly `len` bytes of `file` (an error if it is shorter), then the epilogue.
fn body_stream(
    preamble: Bytes,
    file: tokio::fs::File,
    len: u64,
    epilogue: Bytes,
    bar: ProgressBar,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    let file_part = stream::try_unfold((file, 0u64, bar), move |(mut f, sent, bar)| async move {
        if sent >= len {
            return Ok(None);
        }
        let want = CHUNK.min((len - sent) as usize);
        let mut buf = BytesMut::with_capacity(want);
        while buf.len() < want {
            let n = f.read_buf(&mut buf).await?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "the image file shrank during the upload ({} of {len} bytes)",
                        sent + buf.len() as u64
                    ),
                ));
            }
        }
        bar.inc(buf.len() as u64);
        let next = sent + buf.len() as u64;
        Ok(Some((buf.freeze(), (f, next, bar))))
    });
    stream::once(async move { Ok(preamble) })
        .chain(file_part)
        .chain(stream::once(async move { Ok(epilogue) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn body_has_exactly_the_announced_length() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.qcow2");
        let data: Vec<u8> = (0..(CHUNK * 2 + 17)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let mp = Multipart::new(&[("content", "import")], "x.qcow2");
        let f = tokio::fs::File::open(&p).await.unwrap();
        let chunks: Vec<Bytes> = body_stream(
            mp.preamble.clone(),
            f,
            data.len() as u64,
            mp.epilogue.clone(),
            ProgressBar::hidden(),
        )
        .map(|c| c.unwrap())
        .collect()
        .await;
        let body: Vec<u8> = chunks.concat();
        assert_eq!(body.len() as u64, mp.content_length(data.len() as u64));
        let text = String::from_utf8_lossy(&body);
        assert!(text.starts_with(&format!("--{}\r\n", mp.boundary)));
        assert!(text.ends_with(&format!("\r\n--{}--\r\n", mp.boundary)));
        assert!(chunks
            .iter()
            .all(|c| c.len() <= CHUNK.max(mp.preamble.len())));
    }

    #[test]
    fn import_names_follow_pve_rules() {
        assert!(valid_import_name("gitlab-runner-1.2.3+b4.qcow2"));
        assert!(!valid_import_name("a b.qcow2"));
        assert!(!valid_import_name("x.iso"));
        assert!(!valid_import_name(".qcow2"));
    }

    #[test]
    fn stored_names_are_normalised_as_pve_does() {
        assert_eq!(
            content_filename("imagectl-gitlab-runner-2.0+b1.qcow2"),
            "imagectl-gitlab-runner-2.0_b1.qcow2"
        );
        assert_eq!(content_filename("a=b c~d:e.qcow2\n"), "a_b_c_d_e.qcow2");
        assert_eq!(content_filename("dir/sub\\x.y_z-1.iso"), "x.y_z-1.iso");
        let n = content_filename("imagectl-g r-1:2+3=4.qcow2");
        assert_eq!(content_filename(&n), n, "normalising is idempotent");
        assert!(valid_import_name(&n));
    }
}
