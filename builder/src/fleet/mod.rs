//! Fleet logic (deploy, replace, rollback, drain, destroy, status, targets, gc), written once
//! over the [`Provider`] trait.
//!
//! * [`Fleet`] bundles what every operation needs: the provider, the GitLab client and
//!   settings, the options, a cancellation flag and a progress reporter.
//! * [`plan`] is the pure reconcile planner; [`create`] brings one VM up (runner → seed →
//!   clone → attach → start → registered → online → detach) and rolls back exactly what it made
//!   on any failure; [`drain`] takes one down (pause → wait for jobs → delete runner → stop →
//!   destroy); [`ops`] composes them into deploy / replace / rollback / destroy; [`status`]
//!   reports and writes Prometheus targets; [`gc`] removes orphans.
//! * Every operation that changes a fleet holds the fleet lock ([`Provider::lock`]).

pub mod cancel;
pub mod create;
pub mod drain;
pub mod gc;
pub mod ops;
pub mod plan;
pub mod preflight;
pub mod settings;
pub mod setup;
pub mod status;

pub use cancel::Cancel;
pub use gc::{gc_orphans, GcReport};
pub use ops::{deploy, destroy, replace, rollback, ImageChoice};
pub use status::{status, targets, VmStatus};

use crate::provider::{FleetLock, Provider, VmInfo};
use crate::remote::gitlab::GitlabClient;
use anyhow::Result;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use settings::{FleetOptions, GitlabSettings};
use std::io::IsTerminal;

/// Everything a fleet operation needs.
pub struct Fleet<'a, P: Provider> {
    /// Where VMs run.
    pub provider: &'a P,
    /// The GitLab client.
    pub gitlab: &'a GitlabClient,
    /// Runner settings (token, tags, executor).
    pub gl: &'a GitlabSettings,
    /// Behaviour.
    pub opts: &'a FleetOptions,
    /// Private (0700) directory where seed ISOs are staged before they are attached.
    pub seed_dir: std::path::PathBuf,
    /// Ctrl-C.
    pub cancel: Cancel,
    /// Progress on stderr.
    pub progress: Reporter,
    /// `--concurrency` slots for the API work of providers with parallel waits.
    pub slots: tokio::sync::Semaphore,
}

impl<P: Provider> Fleet<'_, P> {
    /// The description prefix of this fleet's runners: `imagectl/<fleet>/`.
    pub fn runner_prefix(&self) -> String {
        runner_prefix(&self.opts.fleet)
    }

    /// Takes the fleet lock.
    pub async fn lock(&self) -> Result<FleetLock> {
        self.provider
            .lock(&self.opts.fleet, self.opts.lock_ttl)
            .await
    }

    /// Gives the lock back (errors are logged: the lock expires or is taken over when stale).
    pub async fn unlock(&self, lock: &FleetLock) {
        if let Err(e) = self.provider.unlock(lock).await {
            tracing::warn!("releasing the lock of fleet {}: {e:#}", lock.fleet);
        }
    }

    /// The fleet's VMs, oldest first.
    pub async fn vms(&self) -> Result<Vec<VmInfo>> {
        let mut v = self.provider.list(Some(&self.opts.fleet)).await?;
        v.sort_by(|a, b| (&a.created_at, &a.name).cmp(&(&b.created_at, &b.name)));
        Ok(v)
    }
}

/// `imagectl/<fleet>/`.
pub fn runner_prefix(fleet: &str) -> String {
    format!("imagectl/{fleet}/")
}

/// One VM that could not be brought up or taken down, and what was done about it.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    /// VM name.
    pub vm: String,
    /// What failed (without secrets).
    pub error: String,
    /// What was rolled back (`runner 12`, `vm ci-ab12cd`, `seed`).
    pub cleaned: Vec<String>,
    /// What could not be cleaned up (run `imagectl gc`).
    pub left: Vec<String>,
}

/// The result of a fleet operation.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    /// Fleet.
    pub fleet: String,
    /// `deploy`, `replace`, `rollback`, `destroy`.
    pub action: String,
    /// The target image version, if the operation had one.
    pub image_version: Option<String>,
    /// VMs created and online.
    pub created: Vec<VmInfo>,
    /// VMs drained and deleted.
    pub removed: Vec<String>,
    /// VMs left as they were.
    pub unchanged: Vec<String>,
    /// Failures, each with its cleanup.
    pub failed: Vec<Failure>,
    /// Set when a rollout stopped early (the old VMs keep serving).
    pub aborted: Option<String>,
    /// What could not be checked (a listing GitLab refused), with the scope that would allow it.
    pub unchecked: Vec<String>,
}

impl Report {
    /// 0 when everything succeeded, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        i32::from(!self.failed.is_empty() || self.aborted.is_some())
    }

    /// A summary for humans.
    pub fn text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} fleet {}{}: {} created, {} removed, {} unchanged, {} failed",
            self.action,
            self.fleet,
            self.image_version
                .as_ref()
                .map(|v| format!(" (image {v})"))
                .unwrap_or_default(),
            self.created.len(),
            self.removed.len(),
            self.unchanged.len(),
            self.failed.len()
        );
        for v in &self.created {
            let _ = writeln!(
                s,
                "  + {} runner {} on {} (image {})",
                v.name, v.runner_id, v.node, v.image_version
            );
        }
        for v in &self.removed {
            let _ = writeln!(s, "  - {v}");
        }
        for f in &self.failed {
            let _ = writeln!(s, "  ! {}: {}", f.vm, f.error);
            if !f.cleaned.is_empty() {
                let _ = writeln!(s, "    cleaned: {}", f.cleaned.join(", "));
            }
            if !f.left.is_empty() {
                let _ = writeln!(
                    s,
                    "    LEFT BEHIND (run `imagectl gc`): {}",
                    f.left.join(", ")
                );
            }
        }
        if let Some(a) = &self.aborted {
            let _ = writeln!(s, "  rollout aborted: {a}");
        }
        for u in &self.unchecked {
            let _ = writeln!(s, "  not checked: {u}");
        }
        s
    }
}

/// Progress on stderr: a bar of VMs done on a terminal, one line per event otherwise.
#[derive(Clone)]
pub struct Reporter {
    bar: Option<ProgressBar>,
    quiet: bool,
}

impl Reporter {
    /// A reporter; `quiet` prints nothing.
    pub fn new(quiet: bool) -> Self {
        Self { bar: None, quiet }
    }

    /// Starts a bar of `total` steps (on a terminal).
    pub fn start(&mut self, what: &str, total: u64) {
        if self.quiet || total == 0 {
            return;
        }
        if std::io::stderr().is_terminal() {
            let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            pb.set_style(
                ProgressStyle::with_template(
                    "{spinner:.cyan} {prefix:.bold} [{bar:25}] {pos}/{len} {wide_msg} {elapsed}",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            pb.set_prefix(what.to_string());
            pb.enable_steady_tick(std::time::Duration::from_millis(120));
            self.bar = Some(pb);
        } else {
            eprintln!("==> {what}: {total} step(s)");
        }
    }

    /// One event for one VM.
    pub fn event(&self, vm: &str, msg: &str) {
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(pb) => {
                pb.set_message(format!("{vm}: {msg}"));
            }
            None => eprintln!("    {vm}: {msg}"),
        }
    }

    /// A finished step (prints `msg` above the bar).
    pub fn done(&self, vm: &str, msg: &str) {
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(pb) => {
                pb.println(format!("    {vm}: {msg}"));
                pb.inc(1);
            }
            None => eprintln!("    {vm}: {msg}"),
        }
    }

    /// Clears the bar.
    pub fn finish(&self) {
        if let Some(pb) = &self.bar {
            pb.finish_and_clear();
        }
    }
}
