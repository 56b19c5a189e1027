//! The one GitLab client (REST API v4), used by the fleet commands: create a runner per VM, read
//! its status, pause it, list its running jobs, delete it, and list runners for orphan gc.
//!
//! Auth is the `PRIVATE-TOKEN` header, marked sensitive (which scopes each call needs, and the
//! preflight that checks them, are in [`token`]);
//! the token is held as [`Secret`] and appears in no error, log line or `Debug` output. Runner
//! tokens returned by `POST /user/runners` are [`Secret`]s too.
//!
//! Retries ([`imagectl_proto::retry`], shared with the agent): idempotent calls (GET, PUT, DELETE)
//! are retried on transport errors, 408, 429 and 5xx with jittered exponential back-off inside a
//! time budget (`[gitlab] retry_budget`), never sooner than a 429's or 503's `Retry-After` (or
//! GitLab's `RateLimit-ResetTime`) asks, and not at all when that wait does not fit in the
//! budget. `POST /user/runners` is retried **only** when the connection could not be made or
//! GitLab's throttle refused it (429: Rack::Attack answers before the request is processed):
//! once a request may have reached GitLab, a retry could create a second runner that nobody knows
//! about (an orphan), so the error is returned instead and `imagectl gc` finds any runner a lost
//! answer created (its description is `imagectl/<fleet>/<vm>`).

pub mod token;

use imagectl_proto::retry::{self, Pause, Policy};
use imagectl_proto::Secret;
use reqwest::header::{HeaderValue, ACCEPT};
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use token::{Access, TokenInfo, UserInfo};

/// The statuses of a job that is still executing on its runner (gitlabhq
/// `app/models/concerns/ci/has_status.rb`, `EXECUTING_STATUSES`): a drain waits for both.
pub const EXECUTING_STATUSES: [&str; 2] = ["running", "canceling"];

/// What went wrong talking to GitLab. Messages never contain the token.
#[derive(Debug, thiserror::Error)]
pub enum GitlabError {
    /// GitLab answered with an error status.
    #[error("GitLab {method} {path}: HTTP {status}: {message}")]
    Status {
        /// HTTP method.
        method: String,
        /// API path (below `/api/v4`).
        path: String,
        /// HTTP status code.
        status: u16,
        /// GitLab's `message`/`error` text (or the start of the body).
        message: String,
        /// The wait a 429 or 503 asked for (`Retry-After`, `RateLimit-ResetTime`).
        server_wait: Option<Duration>,
    },
    /// No answer: connection refused, reset, timed out.
    #[error("GitLab {method} {path}: {detail}")]
    Transport {
        /// HTTP method.
        method: String,
        /// API path.
        path: String,
        /// True when the connection was never made (the request cannot have been processed).
        connect: bool,
        /// What happened.
        detail: String,
    },
    /// An answer that is not what the API documents.
    #[error("GitLab {method} {path}: unexpected answer: {detail}")]
    Decode {
        /// HTTP method.
        method: String,
        /// API path.
        path: String,
        /// What did not parse.
        detail: String,
    },
}

impl GitlabError {
    /// The HTTP status, when GitLab answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            GitlabError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// True for 404 (the runner does not exist).
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }

    /// True when GitLab refused the token's scopes (`403 insufficient_scope`, `lib/api/api_guard.rb`).
    pub fn is_insufficient_scope(&self) -> bool {
        matches!(self, GitlabError::Status { status: 403, message, .. } if message.starts_with("insufficient_scope"))
    }

    /// True when the request cannot have made anything: GitLab answered and refused it (4xx
    /// other than 408; a 429 is refused before it is processed), or the connection was never
    /// made. Then there is nothing to look for afterwards.
    pub fn made_nothing(&self) -> bool {
        match self {
            GitlabError::Transport { connect, .. } => *connect,
            _ => matches!(self.status(), Some(s) if (400..500).contains(&s) && s != 408),
        }
    }

    /// The same error with `(note)` added to its message or detail.
    fn noted(self, note: &str) -> Self {
        match self {
            GitlabError::Status {
                method,
                path,
                status,
                message,
                server_wait,
            } => GitlabError::Status {
                method,
                path,
                status,
                message: format!("{message} ({note})"),
                server_wait,
            },
            GitlabError::Transport {
                method,
                path,
                connect,
                detail,
            } => GitlabError::Transport {
                method,
                path,
                connect,
                detail: format!("{detail} ({note})"),
            },
            other => other,
        }
    }

    /// True for failures worth retrying on an idempotent call.
    pub fn is_transient(&self) -> bool {
        match self {
            GitlabError::Status { status, .. } => {
                *status == 408 || *status == 429 || *status >= 500
            }
            GitlabError::Transport { .. } => true,
            GitlabError::Decode { .. } => false,
        }
    }
}

/// Retry and timeout settings.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Back-off and time budget of each retried call.
    pub retry: Policy,
    /// Timeout of one request.
    pub request_timeout: Duration,
    /// Extra CA certificates (PEM bundle) to trust besides the system's roots.
    pub ca_pem: Option<String>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            retry: Policy {
                initial: Duration::from_millis(500),
                max: Duration::from_secs(30),
                budget: Duration::from_secs(120),
            },
            request_timeout: Duration::from_secs(30),
            ca_pem: None,
        }
    }
}

/// `POST /user/runners` parameters.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NewRunner {
    /// `instance_type` | `group_type` | `project_type`.
    pub runner_type: String,
    /// Group of a group runner.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_id: Option<u64>,
    /// Project of a project runner.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project_id: Option<u64>,
    /// `imagectl/<fleet>/<vm>`.
    pub description: String,
    /// Tags.
    pub tag_list: Vec<String>,
    /// Pick jobs without tags.
    pub run_untagged: bool,
    /// Lock to the current projects.
    pub locked: bool,
    /// `not_protected` | `ref_protected`.
    pub access_level: String,
    /// Maximum job timeout in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maximum_timeout: Option<u64>,
    /// Free text shown in GitLab (≤ 1024 chars).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maintenance_note: Option<String>,
}

/// The answer to `POST /user/runners`.
#[derive(Debug, Clone, Deserialize)]
pub struct CreatedRunner {
    /// Runner id.
    pub id: u64,
    /// Its `glrt-` authentication token (cannot be read again later).
    pub token: Secret,
    /// Token expiry, if the instance sets one.
    #[serde(default)]
    pub token_expires_at: Option<String>,
}

/// A runner as `GET /runners/:id` (or a list) describes it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct RunnerInfo {
    /// Runner id.
    pub id: u64,
    /// Description.
    #[serde(default)]
    pub description: Option<String>,
    /// `online` | `offline` | `stale` | `never_contacted`.
    #[serde(default)]
    pub status: Option<String>,
    /// Paused runners pick no jobs.
    #[serde(default)]
    pub paused: Option<bool>,
    /// Tags (detail view only on some versions).
    #[serde(default)]
    pub tag_list: Vec<String>,
    /// Last contact (RFC 3339).
    #[serde(default)]
    pub contacted_at: Option<String>,
    /// Creation time (RFC 3339; detail view).
    #[serde(default)]
    pub created_at: Option<String>,
    /// Maintenance note (detail view).
    #[serde(default)]
    pub maintenance_note: Option<String>,
}

/// One job of a runner.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct JobInfo {
    /// Job id.
    pub id: u64,
    /// `running`, `success`, …
    #[serde(default)]
    pub status: Option<String>,
    /// Job name.
    #[serde(default)]
    pub name: Option<String>,
}

/// The GitLab API client. Cheap to clone.
#[derive(Clone)]
pub struct GitlabClient {
    http: reqwest::Client,
    base: String,
    token: Secret,
    opts: ClientOptions,
    /// Whether the token's user is an administrator, once [`GitlabClient::whoami`] found out.
    admin: Arc<OnceLock<bool>>,
    /// The token's scopes, once [`GitlabClient::token_info`] read them.
    scopes: Arc<OnceLock<TokenInfo>>,
}

impl fmt::Debug for GitlabClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GitlabClient")
            .field("base", &self.base)
            .field("token", &self.token)
            .finish()
    }
}

/// Normalises a GitLab base URL: `http(s)://host[:port][/path]`, no trailing `/` or `/api/v4`.
pub fn normalize_url(url: &str) -> Result<String, String> {
    let u = url.trim().trim_end_matches('/');
    let u = u.strip_suffix("/api/v4").unwrap_or(u);
    let parsed =
        reqwest::Url::parse(u).map_err(|e| format!("GitLab URL {u:?} is not a URL ({e})"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(format!(
            "GitLab URL {u:?} must be http(s)://HOST[:PORT][/PATH]"
        ));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("the GitLab URL must not carry credentials; use GITLAB_TOKEN".into());
    }
    Ok(u.to_string())
}

impl GitlabClient {
    /// A client for the GitLab at `url` (the base URL; `/api/v4` is added).
    pub fn new(url: &str, token: Secret, opts: ClientOptions) -> anyhow::Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let base = normalize_url(url).map_err(crate::error::input)?;
        if token.is_empty() {
            return Err(crate::error::input("the GitLab token is empty"));
        }
        let mut b = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(opts.request_timeout)
            .user_agent(concat!("imagectl/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &opts.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes()).map_err(|e| {
                crate::error::input(format!("the GitLab CA bundle is not PEM: {e}"))
            })?;
            b = b.tls_certs_merge(certs);
        }
        let http = b
            .build()
            .map_err(|e| anyhow::anyhow!("creating the GitLab HTTP client: {e}"))?;
        Ok(Self {
            http,
            base: format!("{base}/api/v4"),
            token,
            opts,
            admin: Arc::new(OnceLock::new()),
            scopes: Arc::new(OnceLock::new()),
        })
    }

    /// The base URL without `/api/v4`.
    pub fn url(&self) -> &str {
        self.base.trim_end_matches("/api/v4")
    }

    fn auth(&self) -> HeaderValue {
        let mut v = HeaderValue::from_str(self.token.expose())
            .unwrap_or_else(|_| HeaderValue::from_static("invalid"));
        v.set_sensitive(true);
        v
    }

    /// After a failed attempt: the pause before the next one, or the error to return (with why
    /// no further attempt is made).
    fn retry_pause(backoff: &mut retry::Backoff, e: GitlabError) -> Result<Duration, GitlabError> {
        let wait = match &e {
            GitlabError::Status { server_wait, .. } => *server_wait,
            _ => None,
        };
        match backoff.next_pause(wait) {
            Pause::Wait(d) => {
                tracing::warn!("{e}; retrying in {:.1}s", d.as_secs_f64());
                Ok(d)
            }
            Pause::GiveUp(why) => Err(e.noted(&format!("not retried: {why}"))),
        }
    }

    async fn once(
        &self,
        method: &Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<(Value, reqwest::header::HeaderMap), GitlabError> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .header("PRIVATE-TOKEN", self.auth())
            .header(ACCEPT, "application/json");
        if !query.is_empty() {
            req = req.query(query);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let transport = |e: reqwest::Error| GitlabError::Transport {
            method: method.to_string(),
            path: path.to_string(),
            connect: e.is_connect(),
            detail: transport_detail(e, self.url()),
        };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.map_err(transport)?;
        if !(200..300).contains(&status) {
            let server_wait = retry::server_wait(
                status,
                |name| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                },
                std::time::SystemTime::now(),
            );
            return Err(GitlabError::Status {
                method: method.to_string(),
                path: path.to_string(),
                status,
                message: error_message(&bytes),
                server_wait,
            });
        }
        if bytes.is_empty() {
            return Ok((Value::Null, headers));
        }
        let v = serde_json::from_slice(&bytes).map_err(|e| GitlabError::Decode {
            method: method.to_string(),
            path: path.to_string(),
            detail: format!("{e}"),
        })?;
        Ok((v, headers))
    }

    /// One idempotent call with retries on transient failures.
    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<(Value, reqwest::header::HeaderMap), GitlabError> {
        self.call_with(self.opts.retry, method, path, query, body)
            .await
    }

    /// [`call`](Self::call) under `policy`.
    async fn call_with(
        &self,
        policy: Policy,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
    ) -> Result<(Value, reqwest::header::HeaderMap), GitlabError> {
        let mut backoff = policy.start();
        loop {
            match self.once(&method, path, query, body).await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() => {
                    tokio::time::sleep(Self::retry_pause(&mut backoff, e)?).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn decode<T: DeserializeOwned>(method: &str, path: &str, v: Value) -> Result<T, GitlabError> {
        serde_json::from_value(v).map_err(|e| GitlabError::Decode {
            method: method.to_string(),
            path: path.to_string(),
            detail: e.to_string(),
        })
    }

    /// `GET /personal_access_tokens/self`: the token's own scopes (any scope may ask). A token that
    /// is not a personal, group or project access token gets 400 from GitLab.
    pub async fn token_info(&self) -> Result<TokenInfo, GitlabError> {
        let path = "/personal_access_tokens/self";
        // The first call of every command: a GitLab that is down or refuses the connection fails
        // it in seconds, not after the whole retry budget (a 429's Retry-After still counts).
        let first = Policy {
            budget: self.opts.retry.budget.min(Duration::from_secs(10)),
            ..self.opts.retry
        };
        let (v, _) = self.call_with(first, Method::GET, path, &[], None).await?;
        let info: TokenInfo = Self::decode("GET", path, v)?;
        let _ = self.scopes.set(info.clone());
        Ok(info)
    }

    /// Whether the token's scopes grant `access`; `None` before [`token_info`](Self::token_info).
    pub fn may(&self, access: Access) -> Option<bool> {
        self.scopes.get().map(|t| t.allows(access))
    }

    /// `GET /user`, remembering whether the user is an administrator (only then is
    /// `GET /runners/all` used). `None` when the token may not read it (no `read_user`,
    /// `read_api` or `api`): then the user is taken to be no administrator.
    pub async fn whoami(&self) -> Result<Option<UserInfo>, GitlabError> {
        match self.call(Method::GET, "/user", &[], None).await {
            Ok((v, _)) => {
                let u: UserInfo = Self::decode("GET", "/user", v)?;
                let _ = self.admin.set(u.is_admin);
                Ok(Some(u))
            }
            Err(e) if e.status() == Some(403) => {
                let _ = self.admin.set(false);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// True once [`whoami`](Self::whoami) found an administrator.
    pub fn is_admin(&self) -> bool {
        self.admin.get().copied().unwrap_or(false)
    }

    /// `POST /user/runners`: creates a runner and returns its id and token. Retried only when
    /// the connection could not be made (see the module docs).
    pub async fn create_runner(&self, req: &NewRunner) -> Result<CreatedRunner, GitlabError> {
        let body = serde_json::to_value(req).map_err(|e| GitlabError::Decode {
            method: "POST".into(),
            path: "/user/runners".into(),
            detail: e.to_string(),
        })?;
        let mut backoff = self.opts.retry.start();
        loop {
            match self
                .once(&Method::POST, "/user/runners", &[], Some(&body))
                .await
            {
                Ok((v, _)) => {
                    let made: CreatedRunner = Self::decode("POST", "/user/runners", v)?;
                    check_expiry(made.token_expires_at.as_deref()).map_err(|detail| {
                        GitlabError::Decode {
                            method: "POST".into(),
                            path: "/user/runners".into(),
                            detail,
                        }
                    })?;
                    return Ok(made);
                }
                Err(e @ GitlabError::Transport { connect: true, .. }) => {
                    tokio::time::sleep(Self::retry_pause(&mut backoff, e)?).await;
                }
                Err(e @ GitlabError::Status { status: 429, .. }) => {
                    tokio::time::sleep(Self::retry_pause(&mut backoff, e)?).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `GET /runners/:id`.
    pub async fn runner(&self, id: u64) -> Result<RunnerInfo, GitlabError> {
        let path = format!("/runners/{id}");
        let (v, _) = self.call(Method::GET, &path, &[], None).await?;
        Self::decode("GET", &path, v)
    }

    /// `PUT /runners/:id paused=true`: the runner picks no new jobs.
    pub async fn pause(&self, id: u64) -> Result<(), GitlabError> {
        let path = format!("/runners/{id}");
        let body = serde_json::json!({ "paused": true });
        self.call(Method::PUT, &path, &[], Some(&body)).await?;
        Ok(())
    }

    /// The runner's executing jobs: `GET /runners/:id/jobs?status=S` for each of
    /// [`EXECUTING_STATUSES`] (the endpoint takes one status).
    pub async fn executing_jobs(&self, id: u64) -> Result<Vec<JobInfo>, GitlabError> {
        let path = format!("/runners/{id}/jobs");
        let mut out = Vec::new();
        for status in EXECUTING_STATUSES {
            let q = [
                ("status", status.to_string()),
                ("per_page", "100".to_string()),
            ];
            let (v, _) = self.call(Method::GET, &path, &q, None).await?;
            let jobs: Vec<JobInfo> = Self::decode("GET", &path, v)?;
            out.extend(jobs);
        }
        Ok(out)
    }

    /// `DELETE /runners/:id`. Returns false when the runner did not exist (already deleted).
    pub async fn delete_runner(&self, id: u64) -> Result<bool, GitlabError> {
        let path = format!("/runners/{id}");
        match self.call(Method::DELETE, &path, &[], None).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every runner the token can see, optionally filtered by tags, all pages: `GET /runners/all`
    /// for an administrator (see [`whoami`](Self::whoami)), else `GET /runners` (the runners of
    /// the user's groups and projects). Both need `read_api` or `api`.
    pub async fn list_runners(&self, tags: &[String]) -> Result<Vec<RunnerInfo>, GitlabError> {
        let path = if self.is_admin() {
            "/runners/all"
        } else {
            "/runners"
        };
        self.list_from(path, tags).await
    }

    async fn list_from(&self, path: &str, tags: &[String]) -> Result<Vec<RunnerInfo>, GitlabError> {
        let mut out = Vec::new();
        let mut page = 1u32;
        loop {
            let mut q = vec![("per_page", "100".to_string()), ("page", page.to_string())];
            if !tags.is_empty() {
                q.push(("tag_list", tags.join(",")));
            }
            let (v, headers) = self.call(Method::GET, path, &q, None).await?;
            let items: Vec<RunnerInfo> = Self::decode("GET", path, v)?;
            let n = items.len();
            out.extend(items);
            let next = headers
                .get("x-next-page")
                .and_then(|h| h.to_str().ok())
                .and_then(|s| s.trim().parse::<u32>().ok());
            match next {
                Some(p) if p > page && n > 0 => page = p,
                _ => return Ok(out),
            }
            if page > 1000 {
                return Ok(out);
            }
        }
    }

    /// Runners whose description starts with `prefix` (e.g. `imagectl/ci/`).
    pub async fn runners_with_prefix(&self, prefix: &str) -> Result<Vec<RunnerInfo>, GitlabError> {
        Ok(self
            .list_runners(&[])
            .await?
            .into_iter()
            .filter(|r| {
                r.description
                    .as_deref()
                    .is_some_and(|d| d.starts_with(prefix))
            })
            .collect())
    }
}

/// What went wrong on the wire, with the GitLab it was meant for and every cause reqwest keeps
/// (e.g. `error sending request to https://gitlab.example.com: client error (Connect): tcp connect
/// error: Connection refused (os error 111)`). The URL is the base URL: it holds no secret.
fn transport_detail(e: reqwest::Error, base: &str) -> String {
    let e = e.without_url();
    let mut out = format!("{e} to {base}");
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// A `token_expires_at` GitLab sent must be an RFC 3339 time (or absent/null: no expiry).
fn check_expiry(v: Option<&str>) -> Result<(), String> {
    match v {
        None => Ok(()),
        Some(t) => time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
            .map(|_| ())
            .map_err(|_| format!("token_expires_at {t:?} is not an RFC 3339 time")),
    }
}

/// GitLab's error text: `message` or `error` from a JSON body, else the body's start. For
/// `insufficient_scope` the scopes GitLab would accept are added.
fn error_message(body: &[u8]) -> String {
    let text = match serde_json::from_slice::<Value>(body) {
        Ok(v) if v.get("error").and_then(Value::as_str) == Some("insufficient_scope") => {
            match v.get("scope").and_then(Value::as_str) {
                Some(scope) => format!("insufficient_scope (GitLab accepts: {scope})"),
                None => "insufficient_scope".into(),
            }
        }
        Ok(v) => match v.get("message").or_else(|| v.get("error")) {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => v.to_string(),
        },
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    let text = text.trim();
    if text.is_empty() {
        return "(no message)".into();
    }
    let mut s: String = text.chars().take(300).collect();
    if s.len() < text.len() {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_normalised_and_checked() {
        assert_eq!(
            normalize_url("https://gl.example/").unwrap(),
            "https://gl.example"
        );
        assert_eq!(
            normalize_url("http://127.0.0.1:8080/api/v4").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            normalize_url("https://x.example/gitlab").unwrap(),
            "https://x.example/gitlab"
        );
        assert!(normalize_url("ftp://x").is_err());
        assert!(normalize_url("gitlab.example").is_err());
        assert!(normalize_url("https://u:p@x.example").is_err());
    }

    #[test]
    fn error_text_comes_from_message_or_error() {
        assert_eq!(
            error_message(br#"{"message":"403 Forbidden"}"#),
            "403 Forbidden"
        );
        assert_eq!(
            error_message(br#"{"error":"runner_type is missing"}"#),
            "runner_type is missing"
        );
        assert_eq!(error_message(b""), "(no message)");
        assert_eq!(
            error_message(
                br#"{"error":"insufficient_scope","error_description":"x","scope":"api read_api"}"#
            ),
            "insufficient_scope (GitLab accepts: api read_api)"
        );
        assert_eq!(error_message(&[b'x'; 500]).chars().count(), 301);
    }

    #[test]
    fn transient_errors_are_5xx_429_and_transport() {
        let st = |status| GitlabError::Status {
            method: "GET".into(),
            path: "/x".into(),
            status,
            message: String::new(),
            server_wait: None,
        };
        assert!(st(502).is_transient() && st(429).is_transient());
        assert!(!st(404).is_transient() && !st(403).is_transient());
        assert!(st(404).is_not_found());
        assert!(st(400).made_nothing() && st(403).made_nothing() && st(429).made_nothing());
        assert!(!st(408).made_nothing() && !st(500).made_nothing());
    }

    #[test]
    fn token_expiry_must_be_a_time() {
        check_expiry(None).unwrap();
        check_expiry(Some("2027-01-01T00:00:00.000Z")).unwrap();
        assert!(check_expiry(Some("next tuesday")).is_err());
    }

    #[test]
    fn debug_hides_the_token() {
        let c = GitlabClient::new(
            "http://127.0.0.1:1",
            Secret::new("glpat-verysecret"),
            ClientOptions::default(),
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("verysecret"));
    }
}
