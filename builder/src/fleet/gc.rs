//! Orphan gc: runners without a VM, VMs without a runner, seeds nobody needs.
//!
//! * A runner is an orphan when its description is `imagectl/<fleet>/…`, no VM of the fleet
//!   names its id, and its maintenance note says it belongs to this installation
//!   ([`Provider::scope`]); runners of other installations (another state dir, another cluster)
//!   and hand-made ones are never touched, only reported as skipped.
//! * A VM is an orphan when GitLab answers 404 for its runner: it is destroyed (nothing to drain).
//! * Seeds: every seed still attached to a VM of the fleet (deploys delete them once the runner
//!   registered; the fleet lock guarantees none is in flight) and every staged `<fleet>-*.iso`.
//!
//! Each fleet is handled under its lock. [`gc_orphans`] is the library entry point for
//! `imagectl gc`.

use super::create::note_scope;
use super::{runner_prefix, Failure, Fleet};
use crate::provider::Provider;
use crate::remote::gitlab::{GitlabClient, RunnerInfo};
use anyhow::Result;
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

/// What gc did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Fleets looked at.
    pub fleets: Vec<String>,
    /// Orphan runners deleted.
    pub runners_deleted: Vec<u64>,
    /// Orphan VMs destroyed.
    pub vms_destroyed: Vec<String>,
    /// Seeds deleted.
    pub seeds_deleted: Vec<String>,
    /// Runners that look like ours but belong to another installation (or none).
    pub skipped: Vec<String>,
    /// What could not be removed.
    pub failed: Vec<Failure>,
    /// What could not be checked (GitLab refused a listing), and which scope would allow it.
    pub unchecked: Vec<String>,
    /// Nothing was changed.
    pub dry_run: bool,
}

impl GcReport {
    fn merge(&mut self, o: GcReport) {
        self.fleets.extend(o.fleets);
        self.runners_deleted.extend(o.runners_deleted);
        self.vms_destroyed.extend(o.vms_destroyed);
        self.seeds_deleted.extend(o.seeds_deleted);
        self.skipped.extend(o.skipped);
        self.failed.extend(o.failed);
        for u in o.unchecked {
            if !self.unchecked.contains(&u) {
                self.unchecked.push(u);
            }
        }
    }
}

/// Runners whose description starts with `prefix`, or why they could not be listed: the token
/// has no `read_api`/`api` scope (known from the preflight) or GitLab answered 403. Any other
/// failure is an error.
pub(super) async fn listed(
    gitlab: &GitlabClient,
    prefix: &str,
) -> Result<std::result::Result<Vec<RunnerInfo>, String>> {
    if let Some(why) = super::preflight::listing_refused(gitlab) {
        return Ok(Err(why));
    }
    match gitlab.runners_with_prefix(prefix).await {
        Ok(list) => Ok(Ok(list)),
        Err(e) if e.status() == Some(403) => Ok(Err(format!(
            "GitLab refused to list runners ({e}); a token with read_api (or api) can"
        ))),
        Err(e) => Err(e.into()),
    }
}

fn failure(what: String, e: anyhow::Error) -> Failure {
    Failure {
        vm: what.clone(),
        error: format!("{e:#}"),
        cleaned: vec![],
        left: vec![what],
    }
}

/// One fleet, lock already held.
async fn gc_one<P: Provider>(
    p: &P,
    gitlab: &GitlabClient,
    fleet: &str,
    seed_dir: Option<&Path>,
    dry_run: bool,
) -> Result<GcReport> {
    let mut rep = GcReport {
        fleets: vec![fleet.to_string()],
        dry_run,
        ..Default::default()
    };
    let vms = p.list(Some(fleet)).await?;
    let known: BTreeSet<u64> = vms.iter().map(|v| v.runner_id).collect();
    let scope = p.scope();
    let runners = match listed(gitlab, &runner_prefix(fleet)).await? {
        Ok(list) => list,
        Err(why) => {
            rep.unchecked
                .push(format!("orphan runners of fleet {fleet}: {why}"));
            Vec::new()
        }
    };
    for r in runners {
        if known.contains(&r.id) {
            continue;
        }
        let detail = match gitlab.runner(r.id).await {
            Ok(d) => d,
            Err(e) if e.is_not_found() => continue,
            Err(e) => {
                rep.failed
                    .push(failure(format!("runner {}", r.id), e.into()));
                continue;
            }
        };
        if detail.maintenance_note.as_deref().and_then(note_scope) != Some(scope.as_str()) {
            rep.skipped.push(format!(
                "runner {} ({}): not created by this installation",
                r.id,
                r.description.unwrap_or_default()
            ));
            continue;
        }
        if !dry_run {
            if let Err(e) = gitlab.delete_runner(r.id).await {
                rep.failed
                    .push(failure(format!("runner {}", r.id), e.into()));
                continue;
            }
        }
        rep.runners_deleted.push(r.id);
    }
    for v in &vms {
        match gitlab.runner(v.runner_id).await {
            Err(e) if e.is_not_found() => {
                if !dry_run {
                    let r = async {
                        p.stop(v, Duration::ZERO).await?;
                        p.destroy(v).await
                    }
                    .await;
                    if let Err(e) = r {
                        rep.failed.push(failure(format!("vm {}", v.name), e));
                        continue;
                    }
                }
                rep.vms_destroyed.push(v.name.clone());
            }
            _ => {}
        }
    }
    for s in p.seeds(Some(fleet)).await? {
        if rep.vms_destroyed.contains(&s.vm) {
            continue;
        }
        if !dry_run {
            let vm = vms.iter().find(|v| v.name == s.vm);
            let r = match vm {
                Some(vm) => p.detach_seed(vm).await,
                None => p.delete_seed(&s).await,
            };
            if let Err(e) = r {
                rep.failed.push(failure(format!("seed of {}", s.vm), e));
                continue;
            }
        }
        rep.seeds_deleted.push(s.location);
    }
    if let Some(dir) = seed_dir {
        let prefix = format!("{fleet}-");
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && name.ends_with(".iso") {
                if !dry_run {
                    if let Err(err) = std::fs::remove_file(e.path()) {
                        rep.failed
                            .push(failure(format!("seed {}", e.path().display()), err.into()));
                        continue;
                    }
                }
                rep.seeds_deleted.push(e.path().display().to_string());
            }
        }
    }
    Ok(rep)
}

/// gc of the fleet of `f` while `f` holds its lock (used by `destroy`).
pub(super) async fn gc_fleet<P: Provider>(f: &Fleet<'_, P>) -> Result<GcReport> {
    gc_one(
        f.provider,
        f.gitlab,
        &f.opts.fleet,
        Some(&f.seed_dir),
        false,
    )
    .await
}

/// Removes orphans of `fleet`, or of every fleet found (VMs of this provider and runners named
/// `imagectl/<fleet>/…`). Each fleet is locked while it is cleaned; a fleet whose lock is held
/// by a running deploy is reported as failed and left alone. `seed_dir` is where seeds are
/// staged (stale `<fleet>-*.iso` files there are removed).
pub async fn gc_orphans<P: Provider>(
    p: &P,
    gitlab: &GitlabClient,
    fleet: Option<&str>,
    seed_dir: Option<&Path>,
    dry_run: bool,
) -> Result<GcReport> {
    let mut unchecked = Vec::new();
    let fleets: BTreeSet<String> = match fleet {
        Some(f) => [f.to_string()].into(),
        None => {
            let mut s: BTreeSet<String> =
                p.list(None).await?.into_iter().map(|v| v.fleet).collect();
            let runners = match listed(gitlab, "imagectl/").await? {
                Ok(list) => list,
                Err(why) => {
                    unchecked.push(format!("fleets that have runners but no VM here: {why}"));
                    Vec::new()
                }
            };
            for r in runners {
                if let Some(f) = r
                    .description
                    .as_deref()
                    .and_then(|d| d.strip_prefix("imagectl/"))
                    .and_then(|d| d.split('/').next())
                {
                    if super::settings::validate_fleet_name(f).is_ok() {
                        s.insert(f.to_string());
                    }
                }
            }
            s
        }
    };
    let mut rep = GcReport {
        dry_run,
        unchecked,
        ..Default::default()
    };
    for f in fleets {
        let lock = match p.lock(&f, Duration::from_secs(3600)).await {
            Ok(l) => l,
            Err(e) => {
                rep.failed.push(failure(format!("fleet {f}"), e));
                continue;
            }
        };
        let r = gc_one(p, gitlab, &f, seed_dir, dry_run).await;
        if let Err(e) = p.unlock(&lock).await {
            tracing::warn!("releasing the lock of fleet {f}: {e:#}");
        }
        match r {
            Ok(one) => rep.merge(one),
            Err(e) => rep.failed.push(failure(format!("fleet {f}"), e)),
        }
    }
    Ok(rep)
}
