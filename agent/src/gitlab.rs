//! The two runner-authenticated GitLab calls the agent makes, with bounded retries.
//!
//! * `POST /api/v4/runners/verify` `{token, system_id}` — 200 → the runner's id; 403 (invalid
//!   token) and 422 (orphaned runner) are final; network errors, 408, 429 and 5xx are retried.
//! * `POST /api/v4/runners/reset_authentication_token` `{token, system_id}` — 200/201 → a new
//!   token; the old one is dead. Retried like verify (a 429 was not processed, so retrying is
//!   safe). The response's `Date` header is kept: it dates the new token (see [`crate::clock`]).
//!
//! Retries follow [`imagectl_proto::retry`], the policy the builder uses too: jittered exponential
//! back-off inside a total time budget, and on 429/503 never sooner than GitLab's `Retry-After`
//! (or `RateLimit-ResetTime`) — giving up at once, with that reason, when the asked wait does not
//! fit in the budget. A TLS certificate that does not verify (unknown issuer, wrong name, …) is not
//! retried: it cannot start to verify later, and retrying would only hold the boot for the whole
//! budget. The exception is a certificate outside its validity period, which a guest clock not yet
//! synchronised at first boot can cause; that is retried like a network error. Request bodies are
//! never logged; error texts carry the status and GitLab's short `message` at most, and pass
//! through [`crate::log::redact`] in case a server ever echoes the token.

use crate::log::redact;
use anyhow::{anyhow, bail, Context, Result};
use imagectl_proto::retry::{self, Backoff, GiveUp, Pause};
use imagectl_proto::Secret;
use serde::Deserialize;
use std::io::Read;
use std::time::{Duration, SystemTime};

/// The retry policy (first pause, longest pause, total budget), shared with the builder.
pub use imagectl_proto::retry::Policy as RetryPolicy;

/// The largest response body the agent reads.
const BODY_LIMIT: u64 = 64 * 1024;
/// Per-request ceiling (each attempt is also capped by the remaining budget).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Shortest per-request timeout, even right before the budget ends.
const MIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// `POST /runners/verify` → 200.
#[derive(Debug, Clone, Deserialize)]
pub struct Verified {
    /// The runner's id.
    pub id: u64,
    /// When the token expires (RFC 3339), if it does.
    #[serde(default)]
    pub token_expires_at: Option<String>,
}

/// `POST /runners/reset_authentication_token` → 201.
#[derive(Clone, Deserialize)]
pub struct Rotated {
    /// The new token; the old one is dead.
    pub token: Secret,
    /// When the new token expires (RFC 3339), if it does.
    #[serde(default)]
    pub token_expires_at: Option<String>,
    /// GitLab's clock when it answered: the response's `Date` header, if it had a valid one.
    #[serde(skip)]
    pub server_date: Option<SystemTime>,
}

/// One answered request.
struct Reply {
    status: u16,
    text: String,
    /// What the server asked to wait (429/503 with `Retry-After` or `RateLimit-ResetTime`).
    server_wait: Option<Duration>,
    /// The `Date` header.
    date: Option<SystemTime>,
}

/// How a failed call ended.
#[derive(Debug)]
pub enum CallError {
    /// GitLab rejected the call for good (403, 422, other 4xx): retrying cannot help.
    Final {
        /// HTTP status.
        status: u16,
        /// What went wrong, redacted.
        message: String,
    },
    /// The server's TLS certificate was rejected for a reason retrying cannot fix.
    Certificate {
        /// The TLS error, redacted.
        message: String,
    },
    /// The budget ran out (or could not cover the wait GitLab asked for) while the call kept
    /// failing transiently.
    Exhausted {
        /// Attempts made.
        attempts: u32,
        /// The last transient error, redacted.
        last: String,
        /// Why no further attempt was made.
        why: GiveUp,
    },
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Final { status, message } => write!(f, "HTTP {status}: {message}"),
            CallError::Certificate { message } => write!(
                f,
                "the server's TLS certificate was rejected (not retried; check gitlab_url and the seed's ca_bundle): {message}"
            ),
            CallError::Exhausted {
                attempts,
                last,
                why,
            } => write!(
                f,
                "gave up after {attempts} attempt(s): {why}; last error: {last}"
            ),
        }
    }
}

impl std::error::Error for CallError {}

/// A GitLab instance, reached with ureq + rustls (ring).
pub struct Gitlab {
    agent: ureq::Agent,
    base: String,
}

impl Gitlab {
    /// A client for `url` (without `/api/v4`). With `ca_bundle` (PEM) only those CAs are trusted;
    /// otherwise the bundled Mozilla (webpki) roots.
    pub fn new(url: &str, ca_bundle: Option<&str>) -> Result<Self> {
        use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig, TlsProvider};
        let roots = match ca_bundle {
            None => RootCerts::WebPki,
            Some(pem) => {
                let mut certs: Vec<Certificate<'static>> = Vec::new();
                for item in ureq::tls::parse_pem(pem.as_bytes()) {
                    if let PemItem::Certificate(c) = item.context("parsing the seed's ca_bundle")? {
                        certs.push(c);
                    }
                }
                if certs.is_empty() {
                    bail!("the seed's ca_bundle holds no certificate");
                }
                RootCerts::new_with_certs(&certs)
            }
        };
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .root_certs(roots)
            .build();
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .tls_config(tls)
            .timeout_connect(Some(Duration::from_secs(10)))
            .user_agent(concat!("imagectl-agent/", env!("CARGO_PKG_VERSION")))
            // Redirects would turn POST into GET and may leave the instance: refuse them.
            .max_redirects(0)
            .build()
            .new_agent();
        Ok(Self {
            agent,
            base: url.trim_end_matches('/').to_owned(),
        })
    }

    /// `POST /runners/verify`.
    pub fn verify(
        &self,
        token: &Secret,
        system_id: &str,
        policy: RetryPolicy,
    ) -> Result<Verified, CallError> {
        let body = serde_json::json!({ "token": token.expose(), "system_id": system_id });
        self.call("/runners/verify", &body, policy, &[200])
            .map(|(v, _)| v)
    }

    /// `POST /runners/reset_authentication_token`, naming this runner manager: GitLab's
    /// `authenticate_runner!` files the call under `params.fetch(:system_id, LEGACY_SYSTEM_XID)`
    /// (gitlabhq `lib/api/ci/helpers/runner.rb`, `current_runner_manager`), so without it a stray
    /// `<legacy>` manager would appear. (gitlab-runner's own `ResetTokenRequest` sends the token
    /// only: gitlab-org/gitlab-runner `common/network.go`.)
    pub fn rotate(
        &self,
        token: &Secret,
        system_id: &str,
        policy: RetryPolicy,
    ) -> Result<Rotated, CallError> {
        let body = serde_json::json!({ "token": token.expose(), "system_id": system_id });
        let (mut r, date): (Rotated, _) = self.call(
            "/runners/reset_authentication_token",
            &body,
            policy,
            &[200, 201],
        )?;
        r.server_date = date;
        if r.token.is_empty() {
            return Err(CallError::Final {
                status: 201,
                message: "GitLab returned an empty token".into(),
            });
        }
        crate::log::register_secret(r.token.expose());
        Ok(r)
    }

    /// POSTs `body` to `path` until an `ok` status, a final answer or the end of the budget.
    /// Returns the parsed body and the response's `Date`.
    fn call<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
        policy: RetryPolicy,
        ok: &[u16],
    ) -> Result<(T, Option<SystemTime>), CallError> {
        let url = format!("{}/api/v4{path}", self.base);
        let payload = serde_json::to_vec(body).map_err(|e| CallError::Final {
            status: 0,
            message: format!("encoding the request: {}", redact(&e.to_string())),
        })?;
        let mut backoff = Backoff::new(policy);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let timeout = backoff.attempt_timeout(REQUEST_TIMEOUT, MIN_REQUEST_TIMEOUT);
            let (last, server_wait) = match self.attempt(&url, &payload, timeout) {
                Ok(r) if ok.contains(&r.status) => {
                    crate::info!("POST {path}: {} (attempt {attempts})", r.status);
                    let parsed = serde_json::from_str(&r.text).map_err(|e| CallError::Final {
                        status: r.status,
                        message: format!("unreadable response: {}", redact(&e.to_string())),
                    })?;
                    return Ok((parsed, r.date));
                }
                Ok(r) if retry::is_retryable(r.status) => {
                    let asked = r
                        .server_wait
                        .map(|w| format!(" (Retry-After {} s)", w.as_secs_f64().ceil()))
                        .unwrap_or_default();
                    (
                        format!("HTTP {}{asked}: {}", r.status, message_of(&r.text)),
                        r.server_wait,
                    )
                }
                Ok(r) => {
                    crate::info!("POST {path}: {} (attempt {attempts}, final)", r.status);
                    return Err(CallError::Final {
                        status: r.status,
                        message: message_of(&r.text),
                    });
                }
                Err(e) => {
                    let text = redact(&format!("{e:#}"));
                    if is_permanent_tls_failure(&text) {
                        crate::info!("POST {path}: {text} (attempt {attempts}, final)");
                        return Err(CallError::Certificate { message: text });
                    }
                    (text, None)
                }
            };
            match backoff.next_pause(server_wait) {
                Pause::Wait(pause) => {
                    crate::warn!(
                        "POST {path}: {last} (attempt {attempts}); retrying in {} ms",
                        pause.as_millis()
                    );
                    std::thread::sleep(pause);
                }
                Pause::GiveUp(why) => {
                    crate::warn!("POST {path}: {last} (attempt {attempts}); {why}");
                    return Err(CallError::Exhausted {
                        attempts,
                        last,
                        why,
                    });
                }
            }
        }
    }

    /// One request: the status, (bounded) body text and retry headers, or a transport error.
    fn attempt(&self, url: &str, payload: &[u8], timeout: Duration) -> Result<Reply> {
        let resp = self
            .agent
            .post(url)
            .config()
            .timeout_global(Some(timeout))
            .build()
            .content_type("application/json")
            .header("Accept", "application/json")
            .send(payload)
            .map_err(|e| anyhow!("{}", redact(&e.to_string())))?;
        let status = resp.status().as_u16();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let server_wait = retry::server_wait(status, header, SystemTime::now());
        let date = header("Date").and_then(|d| retry::parse_http_date(&d));
        let mut text = String::new();
        resp.into_body()
            .into_reader()
            .take(BODY_LIMIT)
            .read_to_string(&mut text)
            .with_context(|| format!("reading the response to {url}"))?;
        Ok(Reply {
            status,
            text,
            server_wait,
            date,
        })
    }
}

/// True for a certificate verification failure that cannot go away by itself: anything rustls
/// reports as an invalid peer certificate except `Expired*`/`NotValidYet*` (the guest clock may be
/// wrong right after boot). Matched on the text because ureq wraps the rustls error in an
/// `io::Error`.
fn is_permanent_tls_failure(text: &str) -> bool {
    let Some(at) = text.find("invalid peer certificate") else {
        return false;
    };
    let reason = &text[at..];
    !(reason.contains("Expired") || reason.contains("NotValidYet"))
}

/// GitLab's short error `message` (or `error`) from a response body, redacted and truncated; never
/// the raw body.
fn message_of(body: &str) -> String {
    let v: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let msg = v
        .as_ref()
        .and_then(|v| v.get("message").or_else(|| v.get("error")))
        .map(|m| match m {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .unwrap_or_else(|| "(no message)".into());
    let mut msg = redact(&msg);
    if msg.len() > 200 {
        let cut = (0..=200)
            .rev()
            .find(|i| msg.is_char_boundary(*i))
            .unwrap_or(0);
        msg.truncate(cut);
        msg.push('…');
    }
    msg
}

#[cfg(test)]
mod tests;
