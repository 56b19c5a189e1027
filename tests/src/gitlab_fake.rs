//! A stateful fake of the GitLab API a runner fleet uses. Its rules follow GitLab's own code
//! (gitlabhq), and each names the file it comes from, in this module and in `auth.rs`,
//! `handlers.rs` and `state.rs`:
//!
//! ```no_run
//! use imagectl_tests::gitlab_fake::{GitlabFake, NewRunnerParams};
//! let gl = GitlabFake::start();
//! let r = gl.create_runner(NewRunnerParams { tag_list: vec!["docker".into()], ..Default::default() });
//! // … point the code under test at gl.url() …
//! assert_eq!(gl.status(r.id).as_deref(), Some("never_contacted"));
//! ```
//!
//! It serves `/api/v4` on `127.0.0.1:<free port>` from its own thread and tokio runtime, so plain
//! synchronous tests can use it, and stops when dropped.
//!
//! * Personal access tokens with scopes and an administrator flag ([`GitlabFake::add_token`];
//!   the built-in [`GitlabFake::admin_token`] has `api` and is an administrator): scopes per
//!   route, `403 insufficient_scope`, `401` (`auth.rs`); `GET /personal_access_tokens/self`,
//!   `GET /user` (`is_admin` for administrators only).
//! * Runners: `POST /user/runners` (`create_runner`; instance runners for administrators only;
//!   the model's validations: `maximum_timeout` ≥ 600, tags when `run_untagged` is false, ≤ 50
//!   tags, no group/project on other types), `GET|PUT|DELETE /runners/:id`,
//!   `POST /runners/:id/reset_authentication_token`, `GET /runners/:id/jobs` (status validated
//!   against GitLab's 13 job statuses), `GET /runners/:id/managers`, `GET /runners/all`
//!   (administrators), `GET /runners` (the user's own group/project runners), with filters
//!   `type`, `paused`, `status`, `tag_list` and pagination headers.
//! * Runner-token calls: `POST /runners/verify`, `POST /runners/reset_authentication_token` and
//!   `POST /jobs/request` (always 204: no jobs) each heartbeat the runner and its manager
//!   (`system_id`, or `<legacy>` when none is sent), `DELETE /runners`,
//!   `DELETE /runners/managers`, and the legacy `POST /runners` answering 410 Gone.
//! * Fault injection: any status (a 429 as GitLab's throttle answers it, with `Retry-After` and
//!   `RateLimit-*`), delays and hangs ([`GitlabFake::fault`], [`GitlabFake::fault_retry_after`]).
//!   Parameters may come as JSON, form or query.
//!
//! Tokens are kept in memory only: [`Runner`] and [`RequestRecord`] hold them as
//! [`imagectl_proto::Secret`], so printing either with `{:?}` never shows one.

mod auth;
mod handlers;
mod state;

pub use auth::ApiToken;

pub use state::{Fault, Job, Manager, NewRunnerParams, RequestRecord, Runner};

use handlers::{lock, Shared};
use imagectl_proto::Secret;
use state::State;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A running fake. Dropping it stops the server.
pub struct GitlabFake {
    addr: SocketAddr,
    admin_token: String,
    state: Shared,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What `create_runner` returns (like `POST /user/runners`).
#[derive(Debug, Clone)]
pub struct CreatedRunner {
    /// Runner id.
    pub id: u64,
    /// Its `glrt-` token.
    pub token: Secret,
}

impl GitlabFake {
    /// Starts on `127.0.0.1:0`.
    pub fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().expect("a valid address"))
            .expect("starting the GitLab fake")
    }

    /// Starts on `addr`.
    pub fn start_on(addr: SocketAddr) -> std::io::Result<Self> {
        let std_listener = std::net::TcpListener::bind(addr)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let state: Shared = Arc::new(Mutex::new(State::new()));
        let admin_token = lock(&state).admin_token.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = handlers::router(state.clone());
        let thread = std::thread::Builder::new()
            .name("gitlab-fake".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("a tokio runtime");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(std_listener).expect("a tokio listener");
                    tokio::select! {
                        r = axum::serve(listener, app) => { if let Err(e) = r { eprintln!("gitlab-fake: {e}"); } }
                        _ = rx => {}
                    }
                });
                // Do not wait for hung (delayed) connections.
                rt.shutdown_background();
            })?;
        Ok(Self {
            addr,
            admin_token,
            state,
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    /// Base URL, e.g. `http://127.0.0.1:41234` (without `/api/v4`, as the seed carries it).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin's `PRIVATE-TOKEN`.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// Creates a runner directly (the same rules as `POST /user/runners`). Panics on parameters
    /// GitLab would reject.
    pub fn create_runner(&self, params: NewRunnerParams) -> CreatedRunner {
        params.validate().expect("valid runner parameters");
        let mut s = lock(&self.state);
        let r = s.create(params);
        CreatedRunner {
            id: r.id,
            token: r.token.clone(),
        }
    }

    /// A snapshot of one runner.
    pub fn runner(&self, id: u64) -> Option<Runner> {
        lock(&self.state).runners.get(&id).cloned()
    }

    /// Snapshots of all runners.
    pub fn runners(&self) -> Vec<Runner> {
        lock(&self.state).runners.values().cloned().collect()
    }

    /// The runner's derived status (`online`, `offline`, `stale`, `never_contacted`).
    pub fn status(&self, id: u64) -> Option<String> {
        let s = lock(&self.state);
        s.runners.get(&id).map(|r| s.status(r).to_owned())
    }

    /// Deletes a runner behind the client's back (as an admin in the UI would); true if it existed.
    pub fn delete_runner(&self, id: u64) -> bool {
        lock(&self.state).runners.remove(&id).is_some()
    }

    /// The runner's live token.
    pub fn token(&self, id: u64) -> Option<Secret> {
        self.runner(id).map(|r| r.token)
    }

    /// `online` means contacted within this (GitLab: 2 hours).
    pub fn set_online_threshold(&self, d: Duration) {
        lock(&self.state).online_threshold = d;
    }

    /// `stale` means not contacted for this long (GitLab: 7 days).
    pub fn set_stale_threshold(&self, d: Duration) {
        lock(&self.state).stale_threshold = d;
    }

    /// Expiry (RFC 3339) given to tokens created or rotated from now on. Panics on text that is
    /// not RFC 3339 (GitLab always sends ISO 8601 times, `Entities::Ci::ResetTokenResult`).
    pub fn set_token_expiry(&self, rfc3339: Option<&str>) {
        if let Some(t) = rfc3339 {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .expect("an RFC 3339 expiry");
        }
        lock(&self.state).token_expiry = rfc3339.map(str::to_owned);
    }

    /// Makes verify answer 422 "Runner is orphaned" for this runner.
    pub fn set_orphaned(&self, id: u64, orphaned: bool) {
        if let Some(r) = lock(&self.state).runners.get_mut(&id) {
            r.orphaned = orphaned;
        }
    }

    /// Adds a running job to the runner; returns the job id.
    pub fn add_running_job(&self, runner_id: u64) -> u64 {
        self.add_job_with_status(runner_id, "running")
    }

    /// Adds a job in `status` (one of GitLab's job statuses, e.g. `canceling`: still executing
    /// its `after_script`); returns the job id. Panics on a status GitLab does not have.
    pub fn add_job_with_status(&self, runner_id: u64, status: &str) -> u64 {
        assert!(
            state::JOB_STATUSES.contains(&status),
            "GitLab has no job status {status:?}"
        );
        let mut s = lock(&self.state);
        let id = s.next_job_id;
        s.next_job_id += 1;
        let r = s.runners.get_mut(&runner_id).expect("no such runner");
        r.jobs.push(Job {
            id,
            status: status.into(),
        });
        id
    }

    /// Ends the runner's executing jobs: `running` → `success`, `canceling` → `canceled`.
    pub fn finish_jobs(&self, runner_id: u64) {
        if let Some(r) = lock(&self.state).runners.get_mut(&runner_id) {
            for j in r.jobs.iter_mut() {
                match j.status.as_str() {
                    "running" => j.status = "success".into(),
                    "canceling" => j.status = "canceled".into(),
                    _ => {}
                }
            }
        }
    }

    /// Adds a personal access token of `user` with `scopes`; `admin`: the user is an
    /// administrator. Returns the token text (for `PRIVATE-TOKEN`).
    pub fn add_token(&self, user: &str, scopes: &[&str], admin: bool) -> String {
        for sc in scopes {
            assert!(auth::ALL_SCOPES.contains(sc), "GitLab has no scope {sc:?}");
        }
        let text = state::new_pat();
        let mut s = lock(&self.state);
        let id = s.tokens.len() as u64 + 1;
        s.tokens.insert(
            text.clone(),
            ApiToken {
                id,
                name: format!("{user}-{id}"),
                user: user.into(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                admin,
                active: true,
            },
        );
        text
    }

    /// Revokes a token added with [`add_token`](Self::add_token) (or the admin's).
    pub fn revoke_token(&self, text: &str) {
        if let Some(t) = lock(&self.state).tokens.get_mut(text) {
            t.active = false;
        }
    }

    /// The next `times` requests with `method` (`*` = any) whose path starts with `path_prefix`
    /// (`/api/v4` may be left out) are answered with `status` and a JSON message.
    pub fn fault(&self, method: &str, path_prefix: &str, status: u16, times: u32) {
        self.push_fault(
            method,
            path_prefix,
            Some(status),
            Duration::ZERO,
            None,
            times,
        );
    }

    /// Like [`fault`](Self::fault), with a `Retry-After: secs` header. A 429 is answered as
    /// GitLab's throttle answers it (`lib/gitlab/rack_attack.rb`, `throttled_responder`):
    /// `text/plain` "Retry later" with `Retry-After` and the `RateLimit-*` headers.
    pub fn fault_retry_after(
        &self,
        method: &str,
        path_prefix: &str,
        status: u16,
        secs: u64,
        times: u32,
    ) {
        self.push_fault(
            method,
            path_prefix,
            Some(status),
            Duration::ZERO,
            Some(secs),
            times,
        );
    }

    /// The next `times` matching requests wait `delay` before being handled normally.
    pub fn delay(&self, method: &str, path_prefix: &str, delay: Duration, times: u32) {
        self.push_fault(method, path_prefix, None, delay, None, times);
    }

    /// The next `times` matching requests never get an answer (until the fake is dropped).
    pub fn hang(&self, method: &str, path_prefix: &str, times: u32) {
        self.push_fault(
            method,
            path_prefix,
            None,
            Duration::from_secs(24 * 3600),
            None,
            times,
        );
    }

    /// Drops all pending faults.
    pub fn clear_faults(&self) {
        lock(&self.state).faults.clear();
    }

    fn push_fault(
        &self,
        method: &str,
        path_prefix: &str,
        status: Option<u16>,
        delay: Duration,
        retry_after: Option<u64>,
        times: u32,
    ) {
        let prefix = if path_prefix.starts_with("/api/v4") {
            path_prefix.to_owned()
        } else {
            format!("/api/v4{path_prefix}")
        };
        lock(&self.state).faults.push(Fault {
            method: method.to_owned(),
            path_prefix: prefix,
            status,
            delay,
            retry_after,
            remaining: times,
        });
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.state).requests.clone()
    }

    /// The requests to exactly `path` (`/api/v4` may be left out).
    pub fn requests_to(&self, path: &str) -> Vec<RequestRecord> {
        let full = if path.starts_with("/api/v4") {
            path.to_owned()
        } else {
            format!("/api/v4{path}")
        };
        self.requests()
            .into_iter()
            .filter(|r| r.path == full)
            .collect()
    }
}

impl Drop for GitlabFake {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod rules_tests;
#[cfg(test)]
mod tests;
