//! The GitLab fake's in-memory state and the rules it applies, independent of HTTP.
//!
//! Rules follow `shared/reference/gitlab-runner-api.md`: runners are created with a `glrt-` token,
//! verify records the caller's `system_id` as a runner manager, rotation kills the old token, a job
//! poll marks the runner and its manager contacted, and `status` is derived from `contacted_at`
//! (`online` within the online threshold — GitLab uses 2 hours —, `stale` after the stale threshold
//! — 7 days —, `never_contacted` when never polled).

use super::auth::ApiToken;
use imagectl_proto::Secret;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

/// GitLab's runner types.
pub const RUNNER_TYPES: [&str; 3] = ["instance_type", "group_type", "project_type"];

/// Job statuses (gitlabhq `app/models/concerns/ci/has_status.rb`, `AVAILABLE_STATUSES`).
pub const JOB_STATUSES: [&str; 13] = [
    "created",
    "waiting_for_resource",
    "preparing",
    "waiting_for_callback",
    "pending",
    "running",
    "success",
    "failed",
    "canceling",
    "canceled",
    "skipped",
    "manual",
    "scheduled",
];

/// A runner manager: one host (system_id) using the runner's token.
#[derive(Debug, Clone, PartialEq)]
pub struct Manager {
    /// The manager's system_id (`s_…`/`r_…`).
    pub system_id: String,
    /// When it first showed up (verify or job request).
    pub created_at: SystemTime,
    /// Its last job request.
    pub contacted_at: Option<SystemTime>,
}

/// A job on a runner (tests inject them).
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// Job id.
    pub id: u64,
    /// `running`, `success`, …
    pub status: String,
}

/// One runner as the fake knows it. `Debug` never shows tokens (they are [`Secret`]s).
#[derive(Debug, Clone)]
pub struct Runner {
    /// Runner id.
    pub id: u64,
    /// The live authentication token.
    pub token: Secret,
    /// Tokens that worked once and are dead now (rotated away).
    pub dead_tokens: Vec<Secret>,
    /// Token expiry (RFC 3339) or none.
    pub token_expires_at: Option<String>,
    /// `instance_type` | `group_type` | `project_type`.
    pub runner_type: String,
    /// Group of a group runner.
    pub group_id: Option<u64>,
    /// Project of a project runner.
    pub project_id: Option<u64>,
    /// Description.
    pub description: String,
    /// Paused runners get no jobs.
    pub paused: bool,
    /// Locked to its project.
    pub locked: bool,
    /// Picks untagged jobs.
    pub run_untagged: bool,
    /// Tags.
    pub tag_list: Vec<String>,
    /// `not_protected` | `ref_protected`.
    pub access_level: String,
    /// Maximum job timeout in seconds.
    pub maximum_timeout: Option<u64>,
    /// Maintenance note.
    pub maintenance_note: Option<String>,
    /// Creation time.
    pub created_at: SystemTime,
    /// Last job request with this runner's token.
    pub contacted_at: Option<SystemTime>,
    /// Managers by system_id.
    pub managers: BTreeMap<String, Manager>,
    /// Jobs, oldest first.
    pub jobs: Vec<Job>,
    /// Set by tests: verify answers 422 "Runner is orphaned".
    pub orphaned: bool,
    /// The user whose token created it (owner of its group or project in the fake).
    pub creator: Option<String>,
}

/// What the fake was asked, for assertions. Tokens are kept in memory only; `Debug` redacts them.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRecord {
    /// HTTP method.
    pub method: String,
    /// Path (without the query).
    pub path: String,
    /// Response status (0 while in flight).
    pub status: u16,
    /// The `system_id` parameter, if any.
    pub system_id: Option<String>,
    /// The runner `token` parameter, if any (never printed).
    pub token: Option<Secret>,
    /// True when the answer came from an injected fault.
    pub injected: bool,
}

/// An injected failure or delay.
#[derive(Debug, Clone)]
pub struct Fault {
    /// Method to match (`*` = any).
    pub method: String,
    /// Path prefix to match (with `/api/v4`).
    pub path_prefix: String,
    /// Status to answer with; `None` = only delay, then handle normally.
    pub status: Option<u16>,
    /// Delay before answering.
    pub delay: Duration,
    /// `Retry-After` seconds sent with the injected status (429 comes as GitLab's Rack::Attack
    /// throttle answers it: `text/plain` "Retry later" with `RateLimit-*` headers).
    pub retry_after: Option<u64>,
    /// How many more requests it applies to.
    pub remaining: u32,
}

/// Everything the fake holds.
#[derive(Debug)]
pub struct State {
    /// The admin's personal access token.
    pub admin_token: String,
    /// Next runner id.
    pub next_id: u64,
    /// Next job id.
    pub next_job_id: u64,
    /// Runners by id.
    pub runners: BTreeMap<u64, Runner>,
    /// Pending faults.
    pub faults: Vec<Fault>,
    /// Request log.
    pub requests: Vec<RequestRecord>,
    /// `online` when contacted within this.
    pub online_threshold: Duration,
    /// `stale` when not contacted (or, never contacted, created) longer ago than this.
    pub stale_threshold: Duration,
    /// Expiry given to new tokens (RFC 3339), if any.
    pub token_expiry: Option<String>,
    /// Personal access tokens by their secret text.
    pub tokens: BTreeMap<String, ApiToken>,
}

/// A new random personal access token (`glpat-`).
pub fn new_pat() -> String {
    format!("glpat-{}", &uuid::Uuid::new_v4().simple().to_string()[..20])
}

/// A new random token with GitLab's runner prefix.
pub fn new_token() -> Secret {
    Secret::new(format!(
        "glrt-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..20]
    ))
}

/// RFC 3339 text for a time.
pub fn iso(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl State {
    /// Empty state with a fresh admin token and GitLab's thresholds.
    pub fn new() -> Self {
        let admin_token = new_pat();
        let admin = ApiToken {
            id: 1,
            name: "admin".into(),
            user: "root".into(),
            scopes: vec!["api".into()],
            admin: true,
            active: true,
        };
        Self {
            tokens: BTreeMap::from([(admin_token.clone(), admin)]),
            admin_token,
            next_id: 1,
            next_job_id: 1000,
            runners: BTreeMap::new(),
            faults: Vec::new(),
            requests: Vec::new(),
            online_threshold: Duration::from_secs(2 * 3600),
            stale_threshold: Duration::from_secs(7 * 24 * 3600),
            token_expiry: None,
        }
    }

    /// The runner whose *live* token is `token`.
    pub fn by_token(&mut self, token: &str) -> Option<&mut Runner> {
        self.runners
            .values_mut()
            .find(|r| !token.is_empty() && r.token.expose() == token)
    }

    /// Creates a runner from validated parameters; returns it.
    pub fn create(&mut self, p: NewRunnerParams) -> &Runner {
        let id = self.next_id;
        self.next_id += 1;
        let r = Runner {
            id,
            token: new_token(),
            dead_tokens: Vec::new(),
            token_expires_at: self.token_expiry.clone(),
            runner_type: p.runner_type,
            group_id: p.group_id,
            project_id: p.project_id,
            description: p.description,
            paused: p.paused,
            locked: p.locked,
            run_untagged: p.run_untagged,
            tag_list: p.tag_list,
            access_level: p.access_level,
            maximum_timeout: p.maximum_timeout,
            maintenance_note: p.maintenance_note,
            created_at: SystemTime::now(),
            contacted_at: None,
            managers: BTreeMap::new(),
            jobs: Vec::new(),
            orphaned: false,
            creator: None,
        };
        self.runners.entry(id).or_insert(r)
    }

    /// Replaces the runner's token; the old one is dead from now on. Returns the new one.
    pub fn rotate(&mut self, id: u64) -> Option<Secret> {
        let expiry = self.token_expiry.clone();
        let r = self.runners.get_mut(&id)?;
        let old = std::mem::replace(&mut r.token, new_token());
        r.dead_tokens.push(old);
        r.token_expires_at = expiry;
        Some(r.token.clone())
    }

    /// `online` | `offline` | `stale` | `never_contacted`, as GitLab derives it.
    pub fn status(&self, r: &Runner) -> &'static str {
        let now = SystemTime::now();
        let age = |t: SystemTime| now.duration_since(t).unwrap_or_default();
        match r.contacted_at {
            None if age(r.created_at) > self.stale_threshold => "stale",
            None => "never_contacted",
            Some(t) if age(t) <= self.online_threshold => "online",
            Some(t) if age(t) > self.stale_threshold => "stale",
            Some(_) => "offline",
        }
    }

    /// GitLab's runner JSON (`GET /runners/:id`).
    pub fn runner_json(&self, r: &Runner) -> Value {
        let status = self.status(r);
        json!({
            "id": r.id,
            "description": r.description,
            "active": !r.paused,
            "paused": r.paused,
            "is_shared": r.runner_type == "instance_type",
            "runner_type": r.runner_type,
            "name": "gitlab-runner",
            "online": status == "online",
            "status": status,
            "contacted_at": r.contacted_at.map(iso),
            "created_at": iso(r.created_at),
            "tag_list": r.tag_list,
            "locked": r.locked,
            "run_untagged": r.run_untagged,
            "access_level": r.access_level,
            "maximum_timeout": r.maximum_timeout,
            "maintenance_note": r.maintenance_note,
            "token_expires_at": r.token_expires_at,
            "groups": r.group_id.map(|g| vec![json!({"id": g})]).unwrap_or_default(),
            "projects": r.project_id.map(|p| vec![json!({"id": p})]).unwrap_or_default(),
        })
    }

    /// The short list entry (`GET /runners/all`).
    pub fn runner_brief(&self, r: &Runner) -> Value {
        let status = self.status(r);
        json!({
            "id": r.id,
            "description": r.description,
            "active": !r.paused,
            "paused": r.paused,
            "is_shared": r.runner_type == "instance_type",
            "runner_type": r.runner_type,
            "name": "gitlab-runner",
            "online": status == "online",
            "status": status,
            "tag_list": r.tag_list,
        })
    }

    /// The first matching fault, consumed once.
    pub fn take_fault(&mut self, method: &str, path: &str) -> Option<Fault> {
        let i = self.faults.iter().position(|f| {
            f.remaining > 0
                && (f.method == "*" || f.method.eq_ignore_ascii_case(method))
                && path.starts_with(&f.path_prefix)
        })?;
        let f = &mut self.faults[i];
        f.remaining -= 1;
        let out = f.clone();
        if f.remaining == 0 {
            self.faults.remove(i);
        }
        Some(out)
    }
}

impl Default for State {
    fn default() -> Self {
        Self::new()
    }
}

/// Validated `POST /user/runners` parameters.
#[derive(Debug, Clone)]
pub struct NewRunnerParams {
    /// Runner type.
    pub runner_type: String,
    /// Group (group_type).
    pub group_id: Option<u64>,
    /// Project (project_type).
    pub project_id: Option<u64>,
    /// Description.
    pub description: String,
    /// Paused.
    pub paused: bool,
    /// Locked.
    pub locked: bool,
    /// Run untagged jobs.
    pub run_untagged: bool,
    /// Tags.
    pub tag_list: Vec<String>,
    /// Access level.
    pub access_level: String,
    /// Maximum timeout.
    pub maximum_timeout: Option<u64>,
    /// Maintenance note.
    pub maintenance_note: Option<String>,
}

impl Default for NewRunnerParams {
    fn default() -> Self {
        Self {
            runner_type: "instance_type".into(),
            group_id: None,
            project_id: None,
            description: String::new(),
            paused: false,
            locked: false,
            run_untagged: true,
            tag_list: Vec::new(),
            access_level: "not_protected".into(),
            maximum_timeout: None,
            maintenance_note: None,
        }
    }
}

impl NewRunnerParams {
    /// Checks the combination GitLab checks; the error is the 400 message.
    pub fn validate(&self) -> Result<(), String> {
        if !RUNNER_TYPES.contains(&self.runner_type.as_str()) {
            return Err("runner_type does not have a valid value".into());
        }
        if self.runner_type == "group_type" && self.group_id.is_none() {
            return Err("group_id is missing".into());
        }
        if self.runner_type == "project_type" && self.project_id.is_none() {
            return Err("project_id is missing".into());
        }
        if !["not_protected", "ref_protected"].contains(&self.access_level.as_str()) {
            return Err("access_level does not have a valid value".into());
        }
        if self
            .maintenance_note
            .as_ref()
            .is_some_and(|n| n.chars().count() > 1024)
        {
            return Err("maintenance_note is too long (maximum is 1024 characters)".into());
        }
        Ok(())
    }

    /// The model's own validations (gitlabhq `app/models/ci/runner.rb`), which
    /// `Ci::Runners::CreateRunnerService` turns into `400 Bad request - <errors>`
    /// (`lib/api/user_runners.rb`, `bad_request!(result.errors.to_sentence)`).
    pub fn model_errors(&self) -> Vec<String> {
        let mut errs = Vec::new();
        // `validates :maximum_timeout, … greater_than_or_equal_to: 600, message: 'needs to be at least 10 minutes'`
        if self.maximum_timeout.is_some_and(|t| t < 600) {
            errs.push("Maximum timeout needs to be at least 10 minutes".to_string());
        }
        // `validate :tag_constraints`
        if !self.run_untagged && self.tag_list.is_empty() {
            errs.push(
                "Tags list can not be empty when runner is not allowed to pick untagged jobs"
                    .to_string(),
            );
        }
        // `TAG_LIST_MAX_LENGTH = 50`
        if self.tag_list.len() > 50 {
            errs.push("Tag list is too long (maximum is 50 tags)".to_string());
        }
        // `validate :no_groups, unless: :group_type?` and `validate :no_projects, unless: :project_type?`
        if self.runner_type != "group_type" && self.group_id.is_some() {
            errs.push("Runner cannot have groups assigned".to_string());
        }
        if self.runner_type != "project_type" && self.project_id.is_some() {
            errs.push("Runner cannot have projects assigned".to_string());
        }
        errs
    }
}
