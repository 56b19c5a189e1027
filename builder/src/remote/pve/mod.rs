//! The one Proxmox VE API client: API-token auth, TLS pin / CA file / explicit insecure, typed
//! errors, retries with backoff on 5xx and lock timeouts, task polling, streamed uploads.
//!
//! It is async (tokio + reqwest, rustls with ring) so that fleet code can run clones in parallel;
//! synchronous CLI commands create a runtime for the command. The token secret is held as
//! [`Secret`], sent only in the `Authorization` header (marked sensitive), and appears in no
//! error, log line or `Debug` output.

pub mod access;
pub mod api;
pub mod error;
pub mod tasks;
pub mod tls;
pub mod upload;

pub use error::PveError;
pub use tls::{Fingerprint, Trust};

use imagectl_proto::Secret;
use reqwest::header::{HeaderValue, AUTHORIZATION};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tls::Observed;

/// An API token `USER@REALM!TOKENID=SECRET`; only the id is ever shown.
#[derive(Clone)]
pub struct ApiToken {
    id: String,
    secret: Secret,
}

impl ApiToken {
    /// Parses `USER@REALM!TOKENID=SECRET`. The error never repeats the value.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let malformed = || {
            "the API token is malformed: expected USER@REALM!TOKENID=SECRET \
             (e.g. imagectl@pve!ci=xxxxxxxx-xxxx-…)"
                .to_string()
        };
        // PVE splits at the last `=` (pve-access-control `src/PVE/AccessControl.pm`
        // `verify_token`); the id's grammar is in `crate::config::check_token_id`.
        let (id, secret) = text.rsplit_once('=').ok_or_else(malformed)?;
        if secret.is_empty() {
            return Err(malformed());
        }
        if let Err(why) = crate::config::check_token_id(id) {
            return Err(format!("{} — the token id: {why}", malformed()));
        }
        if secret.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(malformed());
        }
        Ok(Self {
            id: id.to_string(),
            secret: Secret::new(secret),
        })
    }

    /// `USER@REALM!TOKENID` (no secret).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The secret part (for tests that must check it never leaks).
    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    fn header(&self) -> HeaderValue {
        let mut v =
            HeaderValue::from_str(&format!("PVEAPIToken={}={}", self.id, self.secret.expose()))
                .unwrap_or_else(|_| HeaderValue::from_static("PVEAPIToken=invalid"));
        v.set_sensitive(true);
        v
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiToken({}=***)", self.id)
    }
}

/// Everything the client needs; built by [`crate::config`] from flags, env and file.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// `https://host:8006` (a path is ignored; `/api2/json` is added).
    pub endpoint: String,
    /// The API token.
    pub token: ApiToken,
    /// How the server certificate is trusted.
    pub trust: Trust,
    /// Attempts per request for retryable failures (≥ 1).
    pub attempts: u32,
    /// First backoff delay; doubles per attempt, capped at 10 s.
    pub backoff: Duration,
    /// Timeout of one API request (uploads have none: they take as long as the image).
    pub request_timeout: Duration,
    /// How long to wait for a task (UPID) to finish.
    pub task_timeout: Duration,
}

/// The PVE API client. Cheap to clone.
#[derive(Clone)]
pub struct PveClient {
    http: reqwest::Client,
    base: String,
    opts: Arc<ClientOptions>,
    observed: Arc<Observed>,
}

impl fmt::Debug for PveClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PveClient")
            .field("base", &self.base)
            .field("token", &self.opts.token)
            .field("trust", &self.opts.trust)
            .finish()
    }
}

/// Request parameters: name, value (form body for POST/PUT, query for GET/DELETE).
pub type Params = Vec<(String, String)>;

/// Builds [`Params`] from pairs of anything string-like.
pub fn params<K: Into<String>, V: ToString>(pairs: impl IntoIterator<Item = (K, V)>) -> Params {
    pairs
        .into_iter()
        .map(|(k, v)| (k.into(), v.to_string()))
        .collect()
}

/// Percent-encodes one path segment (a node, storage, volume id or UPID).
pub fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl PveClient {
    /// Builds a client. With [`Trust::Insecure`] it warns on stderr, every time.
    pub fn new(opts: ClientOptions) -> anyhow::Result<Self> {
        let endpoint = opts.endpoint.trim().trim_end_matches('/');
        let url = reqwest::Url::parse(endpoint).map_err(|e| {
            crate::error::input(format!(
                "PVE endpoint {endpoint:?} is not a URL ({e}); expected https://HOST:8006"
            ))
        })?;
        if url.scheme() != "https" || url.host_str().is_none() {
            return Err(crate::error::input(format!(
                "PVE endpoint {endpoint:?} must be https://HOST[:PORT] (the PVE API is served over TLS)"
            )));
        }
        let port = url.port().unwrap_or(8006);
        let base = format!(
            "https://{}:{port}/api2/json",
            url.host_str().unwrap_or_default()
        );
        if opts.trust == Trust::Insecure {
            eprintln!(
                "warning: --insecure: the certificate of {} is NOT verified; anyone on the network \
                 path can impersonate the node and read the API token. Pin its fingerprint instead \
                 (PROXMOX_VE_FINGERPRINT, see `pvenode cert info`).",
                url.host_str().unwrap_or_default()
            );
        }
        let observed = Arc::new(Observed::default());
        let tls = tls::client_config(&opts.trust, observed.clone()).map_err(crate::error::input)?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .http1_only()
            .connect_timeout(Duration::from_secs(15))
            .user_agent(concat!("imagectl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| anyhow::anyhow!("creating the PVE HTTP client: {e}"))?;
        Ok(Self {
            http,
            base,
            opts: Arc::new(opts),
            observed,
        })
    }

    /// The options the client was built with.
    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    /// The fingerprint of the certificate the server presented last (pin and insecure modes).
    pub fn seen_fingerprint(&self) -> Option<Fingerprint> {
        *self.observed.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `GET path` → `data`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str, query: Params) -> Result<T, PveError> {
        self.typed(Method::GET, path, query).await
    }

    /// `GET path` once, without retries: for polls that ask again anyway (guest agent reads).
    pub async fn get_once<T: DeserializeOwned>(
        &self,
        path: &str,
        query: Params,
    ) -> Result<T, PveError> {
        let data = self.once(Method::GET, path, &query).await?;
        serde_json::from_value(data.clone())
            .map_err(|e| PveError::decode("GET", path, format!("{e} in {}", short_json(&data))))
    }

    /// `POST path` (form) → `data`.
    pub async fn post<T: DeserializeOwned>(&self, path: &str, form: Params) -> Result<T, PveError> {
        self.typed(Method::POST, path, form).await
    }

    /// `PUT path` (form) → `data`.
    pub async fn put<T: DeserializeOwned>(&self, path: &str, form: Params) -> Result<T, PveError> {
        self.typed(Method::PUT, path, form).await
    }

    /// `DELETE path?query` → `data`.
    pub async fn delete<T: DeserializeOwned>(
        &self,
        path: &str,
        query: Params,
    ) -> Result<T, PveError> {
        self.typed(Method::DELETE, path, query).await
    }

    async fn typed<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        params: Params,
    ) -> Result<T, PveError> {
        let data = self.request(method.clone(), path, &params).await?;
        serde_json::from_value(data.clone()).map_err(|e| {
            PveError::decode(
                method.as_str(),
                path,
                format!("{e} in {}", short_json(&data)),
            )
        })
    }

    /// One API call with retries; returns `data`.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        params: &[(String, String)],
    ) -> Result<Value, PveError> {
        let mut attempt = 0;
        loop {
            match self.once(method.clone(), path, params).await {
                Ok(v) => return Ok(v),
                Err(e) if attempt + 1 < self.opts.attempts && retryable(&method, &e) => {
                    let delay = self.backoff(attempt);
                    tracing::warn!(
                        "{e}; retrying in {:.1}s (attempt {}/{})",
                        delay.as_secs_f64(),
                        attempt + 2,
                        self.opts.attempts
                    );
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The backoff before retry number `attempt + 1`: doubling, capped, with a little jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let base = self.opts.backoff.as_millis() as u64;
        let ms = base.saturating_mul(1 << attempt.min(10)).min(10_000);
        let jitter = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64 % (ms / 4 + 1))
            .unwrap_or(0);
        Duration::from_millis(ms + jitter)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn once(
        &self,
        method: Method,
        path: &str,
        params: &[(String, String)],
    ) -> Result<Value, PveError> {
        let mut req = self
            .http
            .request(method.clone(), self.url(path))
            .header(AUTHORIZATION, self.opts.token.header())
            .timeout(self.opts.request_timeout);
        req = if method == Method::GET || method == Method::DELETE {
            req.query(params)
        } else {
            req.form(params)
        };
        tracing::debug!("{method} {path}");
        let resp = req
            .send()
            .await
            .map_err(|e| self.transport(&method, path, e))?;
        self.answer(&method, path, resp).await
    }

    /// Reads an answer: `data` on success, a [`PveError::Api`] with PVE's message otherwise.
    async fn answer(
        &self,
        method: &Method,
        path: &str,
        resp: reqwest::Response,
    ) -> Result<Value, PveError> {
        let status = resp.status();
        let reason = resp
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
            .or_else(|| status.canonical_reason().map(str::to_string))
            .unwrap_or_default();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| self.transport(method, path, e))?;
        let body: Option<Value> = serde_json::from_slice(&bytes).ok();
        if status.is_success() {
            let body = body.ok_or_else(|| {
                PveError::decode(
                    method.as_str(),
                    path,
                    format!("not JSON: {}", short_text(&bytes)),
                )
            })?;
            return match body {
                Value::Object(mut m) if m.contains_key("data") => {
                    Ok(m.remove("data").unwrap_or(Value::Null))
                }
                other => Err(PveError::decode(
                    method.as_str(),
                    path,
                    format!("no `data` in {}", short_json(&other)),
                )),
            };
        }
        let message = body
            .as_ref()
            .and_then(|b| b.get("message"))
            .and_then(Value::as_str)
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| reason.trim().to_string());
        let mut errors = BTreeMap::new();
        if let Some(Value::Object(errs)) = body.as_ref().and_then(|b| b.get("errors")) {
            for (k, v) in errs {
                let text = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                errors.insert(k.clone(), text.trim().to_string());
            }
        }
        Err(PveError::api(
            method.as_str(),
            path,
            status.as_u16(),
            message,
            errors,
        ))
    }

    fn transport(&self, method: &Method, path: &str, e: reqwest::Error) -> PveError {
        if let (Some(got), Trust::Pin(pin)) = (self.observed.pin_mismatch(), &self.opts.trust) {
            return PveError::PinMismatch {
                method: method.to_string(),
                path: path.into(),
                expected: pin.to_string(),
                got: got.to_string(),
                input: crate::error::InputError("certificate fingerprint mismatch".into()),
            };
        }
        let mut detail = if e.is_timeout() {
            "timed out".to_string()
        } else if e.is_connect() {
            "cannot connect".to_string()
        } else {
            "request failed".to_string()
        };
        // The innermost cause is the useful one (TLS: "invalid peer certificate: …").
        let mut cause: &dyn std::error::Error = &e;
        while let Some(next) = cause.source() {
            cause = next;
        }
        detail.push_str(&format!(": {cause}"));
        if let Trust::CaFile(path) = &self.opts.trust {
            if detail.contains("certificate") {
                detail.push_str(&format!(
                    " (TLS: the server certificate does not verify against {})",
                    path.display()
                ));
            }
        }
        PveError::Transport {
            method: method.to_string(),
            path: path.into(),
            detail,
            source: e,
        }
    }
}

/// Whether a failed request may be repeated: any 5xx or connection failure for reads; for writes
/// only lock timeouts, lost quorum, proxy errors (502–504) and failed connects. PVE answers most
/// deterministic failures (missing storage, bad config) with a plain 500, so a write is not
/// repeated on a 500 it will only get again.
pub fn retryable(method: &Method, e: &PveError) -> bool {
    let read = *method == Method::GET;
    match e {
        PveError::Api {
            status, message, ..
        } => {
            e.is_lock_timeout()
                || message.contains("no quorum")
                || matches!(status, 502..=504)
                || (read && *status >= 500 && *status != 501 && *status != 595)
        }
        PveError::Transport { source, .. } => read || source.is_connect(),
        _ => false,
    }
}

fn short_text(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
    if bytes.len() > 200 {
        format!("{s}…")
    } else {
        s
    }
}

fn short_json(v: &Value) -> String {
    short_text(v.to_string().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_and_never_show_their_secret() {
        let t = ApiToken::parse("imagectl@pve!ci=0b4f-secret-value").unwrap();
        assert_eq!(t.id(), "imagectl@pve!ci");
        let dbg = format!("{t:?}");
        assert!(!dbg.contains("0b4f-secret-value"), "{dbg}");
        assert!(t.header().is_sensitive());
        for bad in [
            "",
            "imagectl@pve",
            "imagectl@pve!ci",
            "imagectl!ci=x",
            "imagectl@pve!=x",
            "a@b!c=",
        ] {
            let e = ApiToken::parse(bad).unwrap_err();
            assert!(e.contains("malformed"), "{e}");
        }
        let e = ApiToken::parse("imagectl@pve=ci=topsecret").unwrap_err();
        assert!(!e.contains("topsecret"));
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(seg("local:import/x.qcow2"), "local%3Aimport%2Fx.qcow2");
        assert_eq!(seg("pve1"), "pve1");
    }

    #[test]
    fn writes_retry_only_on_transient_failures() {
        let e = |status, m: &str| PveError::api("POST", "/x", status, m.into(), BTreeMap::new());
        let lock = e(
            500,
            "can't lock file '/var/lock/qemu-server/lock-100.conf' - got timeout",
        );
        assert!(retryable(&Method::POST, &lock));
        assert!(retryable(&Method::POST, &e(503, "Service Unavailable")));
        assert!(!retryable(
            &Method::POST,
            &e(500, "storage 'x' does not exist")
        ));
        assert!(retryable(&Method::GET, &e(500, "something")));
        assert!(!retryable(&Method::GET, &e(401, "authentication failure")));
    }
}
