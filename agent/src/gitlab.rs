//! The two runner-authenticated GitLab calls the agent makes, with bounded retries.
//!
//! * `POST /api/v4/runners/verify` `{token, system_id}` — 200 → the runner's id; 403 (invalid
//!   token) and 422 (orphaned runner) are final; network errors, 5xx and 429 are retried.
//! * `POST /api/v4/runners/reset_authentication_token` `{token}` — 200/201 → a new token; the old one
//!   is dead. Retried on network errors, 5xx and 429 (a 429 was not processed, so retrying is safe).
//!
//! Retries use exponential backoff with jitter inside a total time budget. A TLS certificate that
//! does not verify (unknown issuer, wrong name, …) is not retried: it cannot start to verify
//! later, and retrying would only hold the boot for the whole budget. The exception is a
//! certificate outside its validity period, which a guest clock not yet synchronised at first
//! boot can cause; that is retried like a network error. Request bodies are never
//! logged; error texts carry the status and GitLab's short `message` at most, and pass through
//! [`crate::log::redact`] in case a server ever echoes the token.

use crate::log::redact;
use anyhow::{anyhow, bail, Context, Result};
use imagectl_proto::Secret;
use serde::Deserialize;
use std::io::Read;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The largest response body the agent reads.
const BODY_LIMIT: u64 = 64 * 1024;
/// Per-request ceiling (each attempt is also capped by the remaining budget).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest pause between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Retry policy: a total budget and the first backoff step.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Total time allowed for all attempts and pauses.
    pub budget: Duration,
    /// Pause after the first failed attempt; doubles each time, up to 30 s, with jitter.
    pub initial_backoff: Duration,
}

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
    /// The budget ran out while the call kept failing transiently.
    Exhausted {
        /// Attempts made.
        attempts: u32,
        /// The last transient error, redacted.
        last: String,
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
            CallError::Exhausted { attempts, last } => {
                write!(
                    f,
                    "gave up after {attempts} attempts within the time budget; last error: {last}"
                )
            }
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
    }

    /// `POST /runners/reset_authentication_token`.
    pub fn rotate(&self, token: &Secret, policy: RetryPolicy) -> Result<Rotated, CallError> {
        let body = serde_json::json!({ "token": token.expose() });
        let r: Rotated = self.call(
            "/runners/reset_authentication_token",
            &body,
            policy,
            &[200, 201],
        )?;
        if r.token.is_empty() {
            return Err(CallError::Final {
                status: 201,
                message: "GitLab returned an empty token".into(),
            });
        }
        crate::log::register_secret(r.token.expose());
        Ok(r)
    }

    fn call<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
        policy: RetryPolicy,
        ok: &[u16],
    ) -> Result<T, CallError> {
        let url = format!("{}/api/v4{path}", self.base);
        let payload = serde_json::to_vec(body).expect("a JSON value serialises");
        let deadline = Instant::now() + policy.budget;
        let mut backoff = policy.initial_backoff;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let outcome = self.attempt(
                &url,
                &payload,
                remaining.min(REQUEST_TIMEOUT).max(Duration::from_secs(1)),
            );
            let last = match outcome {
                Ok((status, text)) if ok.contains(&status) => {
                    crate::info!("POST {path}: {status} (attempt {attempts})");
                    return serde_json::from_str(&text).map_err(|e| CallError::Final {
                        status,
                        message: format!("unreadable response: {}", redact(&e.to_string())),
                    });
                }
                Ok((status, text)) if status >= 500 || status == 429 || status == 408 => {
                    format!("HTTP {status}: {}", message_of(&text))
                }
                Ok((status, text)) => {
                    crate::info!("POST {path}: {status} (attempt {attempts}, final)");
                    return Err(CallError::Final {
                        status,
                        message: message_of(&text),
                    });
                }
                Err(e) => {
                    let text = redact(&format!("{e:#}"));
                    if is_permanent_tls_failure(&text) {
                        crate::info!("POST {path}: {text} (attempt {attempts}, final)");
                        return Err(CallError::Certificate { message: text });
                    }
                    text
                }
            };
            let pause = jitter(backoff);
            if Instant::now() + pause >= deadline {
                crate::warn!("POST {path}: {last} (attempt {attempts}); time budget used up");
                return Err(CallError::Exhausted { attempts, last });
            }
            crate::warn!(
                "POST {path}: {last} (attempt {attempts}); retrying in {} ms",
                pause.as_millis()
            );
            std::thread::sleep(pause);
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One request: the status and (bounded) body text, or a transport error.
    fn attempt(&self, url: &str, payload: &[u8], timeout: Duration) -> Result<(u16, String)> {
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
        let mut text = String::new();
        resp.into_body()
            .into_reader()
            .take(BODY_LIMIT)
            .read_to_string(&mut text)
            .with_context(|| format!("reading the response to {url}"))?;
        Ok((status, text))
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

/// `d` scaled by a pseudo-random factor in [0.5, 1.0) ("equal jitter"), so a fleet booting together
/// does not retry in lock-step.
fn jitter(d: Duration) -> Duration {
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|t| t.subsec_nanos() as u64)
        .unwrap_or(0)
        ^ ((std::process::id() as u64) << 32);
    // splitmix64 step.
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let frac = 0.5 + (z % 1000) as f64 / 2000.0;
    d.mul_f64(frac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_is_extracted_and_redacted() {
        crate::log::register_secret("glrt-msg-test-SECRET");
        assert_eq!(
            message_of(r#"{"message":"403 Forbidden"}"#),
            "403 Forbidden"
        );
        assert_eq!(
            message_of(r#"{"message":"bad glrt-msg-test-SECRET"}"#),
            "bad [REDACTED]"
        );
        assert_eq!(
            message_of("<html>token glrt-msg-test-SECRET</html>"),
            "(no message)"
        );
        assert!(message_of(&format!(r#"{{"error":"{}"}}"#, "é".repeat(300))).ends_with('…'));
    }

    #[test]
    fn certificate_failures_are_classified() {
        assert!(is_permanent_tls_failure(
            "io: invalid peer certificate: Other(OtherError(CaUsedAsEndEntity))"
        ));
        assert!(is_permanent_tls_failure(
            "io: invalid peer certificate: UnknownIssuer"
        ));
        assert!(is_permanent_tls_failure(
            "io: invalid peer certificate: NotValidForName"
        ));
        assert!(!is_permanent_tls_failure(
            "io: invalid peer certificate: Expired"
        ));
        assert!(!is_permanent_tls_failure(
            "io: invalid peer certificate: NotValidYetContext { time: .. }"
        ));
        assert!(!is_permanent_tls_failure(
            "io: Connection refused (os error 111)"
        ));
    }

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..100 {
            let j = jitter(Duration::from_millis(1000));
            assert!(
                j >= Duration::from_millis(500) && j < Duration::from_millis(1000),
                "{j:?}"
            );
        }
    }

    #[test]
    fn network_errors_exhaust_the_budget() {
        // Port 9 on localhost: connection refused at once.
        let gl = Gitlab::new("http://127.0.0.1:9", None).unwrap();
        let policy = RetryPolicy {
            budget: Duration::from_millis(300),
            initial_backoff: Duration::from_millis(50),
        };
        let err = gl
            .verify(&Secret::new("glrt-x"), "s_000000000000", policy)
            .unwrap_err();
        match err {
            CallError::Exhausted { attempts, .. } => assert!(attempts >= 2, "{attempts}"),
            other => panic!("{other}"),
        }
    }
}
