//! imagectl-agent: first-boot registration of the VM's GitLab runner.
//!
//! Runs once per VM as the systemd oneshot `imagectl-agent.service`. It reads the one-time runner
//! token from the NoCloud seed (`imagectl/agent.json`), verifies it with GitLab, rotates it so the
//! copy on the seed is dead, writes `/etc/gitlab-runner/config.toml` (0600) with the new token,
//! starts gitlab-runner, waits until gitlab-runner's own metrics show a successful job request
//! ([`runner_poll`]: GitLab also marks the runner online for the agent's verify and rotation, so
//! "online" alone proves nothing), and reports through `/var/lib/imagectl/status.json`, the
//! `/var/lib/imagectl/registered` marker and a node_exporter textfile.
//!
//! # The token
//!
//! The token is an [`imagectl_proto::Secret`] everywhere; it is written to config.toml and sent in
//! request bodies, nothing else. Every token the agent learns is registered with
//! [`log::register_secret`], and every log line, error text and status.json passes through
//! [`log::redact`]. Children (`mount`, `systemctl`) get a cleared environment and never see it.
//!
//! # State machine
//!
//! The state lives on disk and in GitLab: `M` = the marker exists; `C` = config.toml holds a runner
//! with the seed's id and URL; `T0` = the seed's token; `T1` = the rotated token.
//!
//! | at start        | what the agent does |
//! |-----------------|---------------------|
//! | `M`             | nothing, exit 0 (the unit's `ConditionPathExists=!…/registered` already skips it) |
//! | no `M`, no `C`  | **fresh**: verify `T0` (with the system_id) → write `ca.pem` and `.runner_system_id` → rotate `T0`→`T1` → commit `C(T1)` at once → start gitlab-runner → see it poll → status `registered` → `M` |
//! | no `M`, `C(T1)` | **recover** (an earlier run died or failed after committing `C`): verify `T1`; 200 → keep `C`, skip rotation, start gitlab-runner → see it poll → `registered` → `M`. 403/422 → `T1` is dead: fall back to **fresh** with `T0` |
//!
//! `C` may have been rewritten by gitlab-runner since (it rotates expiring tokens itself and
//! writes the file in its own style); [`config`] reads that too. `token_obtained_at` is GitLab's
//! `Date`, not the guest clock ([`clock`]).
//!
//! Crash and failure points on the fresh path:
//!
//! 1. *Before the rotation*: `T0` is still live and nothing is committed. On a handled failure the
//!    files this run created (`ca.pem`, `.runner_system_id`, temporary files) are removed; after a
//!    hard crash they are harmless and rewritten by the next run. A reboot runs the unit again.
//! 2. *Between GitLab performing the rotation and `C(T1)` being fsynced* (one HTTP response and one
//!    atomic write): `T1` is lost and `T0` is dead, so the next run's verify gets 403 and the agent
//!    fails saying so. GitLab's API gives the new token only in that response, so this window cannot
//!    be closed, only kept short; the controller replaces such a VM (it can delete the runner by id).
//!    A rotation whose response is lost to a network error is the same case: its retry gets 403.
//! 3. *After `C(T1)` is committed*: config.toml is kept even if a later step (starting gitlab-runner,
//!    seeing it poll, writing the status) fails, because it holds the only live token; the next run
//!    takes the **recover** path. "No partial config.toml" holds because it is only ever replaced
//!    atomically.
//!
//! Nothing is registered twice: the agent never creates runners (imagectl did, once), verify with the
//! same system_id names the same runner manager (the id is kept in `.runner_system_id` and derived
//! from the machine-id), and a finished run leaves `M`, after which the agent does nothing.

pub mod clock;
pub mod config;
pub mod fsx;
pub mod gitlab;
pub mod log;
pub mod paths;
pub mod runner_poll;
pub mod seed;
pub mod service;
pub mod status;
pub mod sys;
pub mod sysid;

use anyhow::{bail, Context, Result};
use gitlab::{CallError, Gitlab, RetryPolicy};
use imagectl_proto::{AgentSeed, AgentState, Secret};
use paths::Paths;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// What to do; the CLI maps onto this one to one.
#[derive(Debug, Clone)]
pub struct Options {
    /// Resolve every absolute path under this directory (`/` in the VM).
    pub root: PathBuf,
    /// Where the seed comes from.
    pub seed: seed::SeedSource,
    /// How long to wait for the seed device to appear.
    pub seed_wait: Duration,
    /// Start gitlab-runner through systemctl (off in tests).
    pub systemctl: bool,
    /// Overrides the seed's `verify_budget_secs` (for verify, and again for the rotation).
    pub budget: Option<Duration>,
    /// First retry pause; doubles up to `max_backoff`, with jitter.
    pub initial_backoff: Duration,
    /// Longest exponential retry pause (GitLab's `Retry-After` may ask for more, within budget).
    pub max_backoff: Duration,
    /// How long gitlab-runner may take to become active.
    pub active_timeout: Duration,
    /// How long gitlab-runner may take to make its first successful job request, seen in its
    /// metrics; `None` = do not wait for that (tests and manual runs without gitlab-runner).
    pub runner_poll: Option<Duration>,
    /// Where to read gitlab-runner's metrics instead of the seed's `metrics_listen` (a harness
    /// that runs several runners on one host gives each its own port).
    pub metrics_url: Option<String>,
    /// How long to wait for the clock to synchronise when GitLab's answer had no `Date` and the
    /// token expires (see [`clock`]).
    pub time_sync_wait: Duration,
    /// The local clock (tests inject a wrong one).
    pub local_clock: clock::LocalClock,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/"),
            seed: seed::SeedSource::Device(None),
            seed_wait: Duration::from_secs(30),
            systemctl: true,
            budget: None,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            active_timeout: Duration::from_secs(30),
            runner_poll: Some(Duration::from_secs(120)),
            metrics_url: None,
            time_sync_wait: Duration::from_secs(30),
            local_clock: SystemTime::now,
        }
    }
}

/// How a successful run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The marker was there: nothing done.
    AlreadyRegistered,
    /// The runner is registered (now, or recovered from an earlier run's config.toml).
    Registered {
        /// Runner id.
        runner_id: u64,
        /// The runner manager's system_id.
        system_id: String,
        /// True when an earlier run's rotated token was reused.
        recovered: bool,
    },
}

/// Runs the agent. On failure status.json says `failed` with the (redacted) reason, and the error
/// is returned, also redacted.
pub fn run(opts: &Options) -> Result<Outcome> {
    let paths = Paths::new(&opts.root);
    if paths.marker.exists() {
        info!(
            "{} exists: the runner is already registered; nothing to do",
            paths.marker.display()
        );
        return Ok(Outcome::AlreadyRegistered);
    }
    let mut rec = status::Recorder::start();
    if let Err(e) = status::write_status(&paths, &rec.status) {
        warn!("writing the initial status: {e:#}");
    }
    let mut created = Vec::new();
    let result = register(opts, &paths, &mut rec, &mut created).and_then(|(id, sid, recovered)| {
        rec.finish(AgentState::Registered, None);
        status::write_status(&paths, &rec.status)?;
        // Monitoring only: a missing textfile directory must not fail registration.
        if let Err(e) = status::write_textfile(&paths, true) {
            warn!("writing the node_exporter textfile: {e:#}");
        }
        status::write_marker(&paths, id)?;
        Ok(Outcome::Registered {
            runner_id: id,
            system_id: sid,
            recovered,
        })
    });
    match result {
        Ok(outcome) => {
            if opts.systemctl {
                info!("registered; {} is active", service::RUNNER_UNIT);
            } else {
                info!("registered");
            }
            Ok(outcome)
        }
        Err(e) => {
            let text = log::redact(&format!("{e:#}"));
            for f in created.iter().rev() {
                match std::fs::remove_file(f) {
                    Ok(()) => info!("removed {} (written by this failed run)", f.display()),
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                    Err(err) => warn!("removing {}: {err}", f.display()),
                }
            }
            rec.finish(AgentState::Failed, Some(text.clone()));
            if let Err(e2) = status::write_status(&paths, &rec.status) {
                error!("writing status.json: {e2:#}");
            }
            if let Err(e2) = status::write_textfile(&paths, false) {
                warn!("writing the node_exporter textfile: {e2:#}");
            }
            bail!("{text}")
        }
    }
}

/// The registration itself: returns (runner id, system_id, recovered). `created` collects files
/// this run created that must go if it fails before config.toml is committed; once it is committed
/// the list is emptied (see the state machine).
fn register(
    opts: &Options,
    paths: &Paths,
    rec: &mut status::Recorder,
    created: &mut Vec<PathBuf>,
) -> Result<(u64, String, bool)> {
    rec.step("seed");
    let seed = seed::load(&opts.seed, paths, opts.seed_wait)?;
    rec.status.runner_id = Some(seed.runner_id);
    info!(
        "seed: runner {} ({}) at {}",
        seed.runner_id, seed.runner_name, seed.gitlab_url
    );

    rec.step("machine_id");
    let (machine_id, _) = sysid::ensure_machine_id(&paths.machine_id)?;
    let system_id = match sysid::read_stored(&paths.system_id)? {
        Some(id) => {
            info!("using the stored system_id {id}");
            id
        }
        None => sysid::system_id(&machine_id),
    };
    rec.status.system_id = Some(system_id.clone());

    let budget = opts
        .budget
        .unwrap_or(Duration::from_secs(seed.verify_budget_secs));
    let policy = RetryPolicy {
        initial: opts.initial_backoff,
        max: opts.max_backoff,
        budget,
    };
    let gl = Gitlab::new(&seed.gitlab_url, seed.ca_bundle.as_deref())?;

    // Recover path: an earlier run committed config.toml with a rotated token.
    if let Some(token) = existing_token(paths, &seed)? {
        rec.step("verify");
        info!(
            "config.toml already holds a token for runner {}; verifying it",
            seed.runner_id
        );
        match gl.verify(&token, &system_id, policy) {
            Ok(v) => {
                check_id(&seed, v.id)?;
                info!("the token in config.toml works; reusing it (no rotation)");
                write_side_files(paths, &seed, &system_id, &mut Vec::new())?;
                start(opts, rec, &seed, &system_id)?;
                return Ok((seed.runner_id, system_id, true));
            }
            Err(CallError::Final { status, message }) => {
                warn!("the token in config.toml was rejected (HTTP {status}: {message}); trying the seed's token");
            }
            Err(e) => return Err(e).context("verifying the token in config.toml"),
        }
    }

    rec.step("verify");
    let verified = gl.verify(&seed.runner_token, &system_id, policy).map_err(|e| match e {
        CallError::Final { status: 403, .. } => anyhow::anyhow!(
            "{e}: GitLab rejected the seed's runner token. It is invalid, or an earlier run already \
             rotated it and its config.toml is gone; the runner must be recreated"
        ),
        CallError::Final { status: 422, .. } => anyhow::anyhow!(
            "{e}: GitLab says the runner is orphaned (no project or group); it must be recreated"
        ),
        other => anyhow::Error::new(other),
    });
    let verified = verified.context("verifying the runner token")?;
    check_id(&seed, verified.id)?;

    rec.step("config");
    let ca_file = write_side_files(paths, &seed, &system_id, created)?;

    rec.step("rotate");
    let rotated = gl
        .rotate(&seed.runner_token, &system_id, policy)
        .context("rotating the runner token (the seed's copy may be dead now; if so the runner must be recreated)")?;
    let rotated_at = std::time::Instant::now();
    let obtained = clock::token_obtained_at(
        rotated.server_date,
        opts.local_clock,
        rotated.server_date.is_none() && clock::clock_synced(paths),
    )?;
    let mut cfg = config::build(
        &seed,
        &rotated.token,
        obtained.at,
        rotated.token_expires_at.as_deref(),
        ca_file,
    )?;
    config::write(&paths.config, &cfg).context("writing config.toml with the rotated token")?;
    // Committed: from here on the files stay (config.toml holds the only live token).
    created.clear();
    info!(
        "token rotated; config.toml written (token_obtained_at {} from {:?})",
        obtained.at, obtained.source
    );
    let expires = rotated
        .token_expires_at
        .as_deref()
        .is_some_and(|e| !e.is_empty());
    if obtained.source == clock::Source::Unknown && expires {
        rec.step("time_sync");
        let synced = clock::wait_for_sync(
            opts.time_sync_wait,
            opts.local_clock,
            || clock::clock_synced(paths),
            rotated_at,
        )?;
        if let (Some(at), Some(r)) = (synced, cfg.runners.first_mut()) {
            r.token_obtained_at = Some(at);
            config::write(&paths.config, &cfg)
                .context("rewriting config.toml with the synchronised token_obtained_at")?;
            info!("token_obtained_at set to {at} from the synchronised clock");
        }
    }

    start(opts, rec, &seed, &system_id)?;
    Ok((seed.runner_id, system_id, false))
}

/// The token of the seed's runner in an existing config.toml, unless it is the seed's own token.
fn existing_token(paths: &Paths, seed: &AgentSeed) -> Result<Option<Secret>> {
    let Some(cfg) = config::read_existing(&paths.config)? else {
        return Ok(None);
    };
    match config::runner_for(&cfg, seed) {
        Some(r) if r.token != seed.runner_token => Ok(Some(r.token.clone())),
        Some(_) => Ok(None),
        None => {
            warn!(
                "{} describes another runner; it will be replaced",
                paths.config.display()
            );
            Ok(None)
        }
    }
}

fn check_id(seed: &AgentSeed, id: u64) -> Result<()> {
    if id != seed.runner_id {
        bail!(
            "the token belongs to runner {id}, but the seed names runner {}; refusing to continue",
            seed.runner_id
        );
    }
    Ok(())
}

/// Creates /etc/gitlab-runner (0700) and writes `ca.pem` (when the seed has a CA bundle) and
/// `.runner_system_id` (when missing). Files that did not exist before go into `created`. Returns
/// the `tls-ca-file` value for config.toml.
fn write_side_files(
    paths: &Paths,
    seed: &AgentSeed,
    system_id: &str,
    created: &mut Vec<PathBuf>,
) -> Result<Option<String>> {
    fsx::create_dir_all(&paths.config_dir, 0o700)?;
    if !paths.system_id.exists() {
        created.push(paths.system_id.clone());
        fsx::write_atomic(&paths.system_id, system_id.as_bytes(), 0o600)?;
    }
    match &seed.ca_bundle {
        Some(pem) => {
            if !paths.ca_file.exists() {
                created.push(paths.ca_file.clone());
            }
            fsx::write_atomic(&paths.ca_file, pem.as_bytes(), 0o644)?;
            Ok(Some(
                paths
                    .in_system(&paths.ca_file)
                    .to_string_lossy()
                    .into_owned(),
            ))
        }
        None => Ok(None),
    }
}

/// Starts gitlab-runner and, unless told not to, waits until its metrics show a successful job
/// request from this runner manager.
fn start(
    opts: &Options,
    rec: &mut status::Recorder,
    seed: &AgentSeed,
    system_id: &str,
) -> Result<()> {
    rec.step("systemctl");
    if opts.systemctl {
        service::start_runner(opts.active_timeout).context("starting gitlab-runner")?;
    } else {
        info!("--no-systemctl: not starting {}", service::RUNNER_UNIT);
    }
    if let Some(timeout) = opts.runner_poll {
        rec.step("runner_poll");
        let url = match &opts.metrics_url {
            Some(u) => u.clone(),
            None => runner_poll::metrics_url(&seed.metrics_listen)?,
        };
        info!(
            "waiting up to {} s for gitlab-runner's first job request ({url})",
            timeout.as_secs()
        );
        runner_poll::wait_for_job_request(&url, system_id, timeout, Duration::from_millis(500))
            .context(
            "gitlab-runner is not polling GitLab (config.toml is kept: it holds the live token; \
                 the next boot checks again)",
        )?;
    } else {
        info!("not waiting for gitlab-runner's first job request (--no-poll-check)");
    }
    rec.end_step();
    Ok(())
}
