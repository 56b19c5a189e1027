//! deploy / replace / rollback / destroy, composed from [`create`](super::create) and
//! [`drain`](super::drain) under the fleet lock.
//!
//! Order inside one deploy: remove broken VMs → create the deficit → roll VMs on another image
//! (surge: `max_surge` new VMs online before as many old ones are drained; a failed new VM aborts
//! the rollout and leaves the old VMs serving) → retire the excess (oldest first).

use super::create::create_vm;
use super::drain::retire;
use super::plan::{self, VmView};
use super::{Failure, Fleet, Report};
use crate::error::input;
use crate::provider::{ImageInfo, Provider, VmInfo, VmState};
use anyhow::Result;
use futures_util::stream::{self, StreamExt};
use imagectl_proto::AgentState;

/// Which image new VMs get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageChoice {
    /// No `--image`: the fleet's newest version in use (latest for an empty fleet); existing VMs
    /// are not replaced for their version.
    Current,
    /// The newest image available; VMs on other versions are replaced.
    Latest,
    /// This version; VMs on other versions are replaced.
    Version(String),
}

impl ImageChoice {
    /// `latest`, a version, or `None` for [`ImageChoice::Current`].
    pub fn parse(s: Option<&str>) -> Self {
        match s.map(str::trim) {
            None | Some("") => ImageChoice::Current,
            Some("latest") => ImageChoice::Latest,
            Some(v) => ImageChoice::Version(v.to_string()),
        }
    }
}

fn find_version(images: &[ImageInfo], v: &str) -> Result<ImageInfo> {
    images
        .iter()
        .rev()
        .find(|i| i.version == v)
        .cloned()
        .ok_or_else(|| {
            let have: Vec<&str> = images.iter().map(|i| i.version.as_str()).collect();
            input(format!(
                "image version {v:?} is not available (available: {})",
                have.join(", ")
            ))
        })
}

/// Resolves the image and whether existing VMs must be on it.
async fn resolve<P: Provider>(
    f: &Fleet<'_, P>,
    choice: &ImageChoice,
    vms: &[VmInfo],
) -> Result<(ImageInfo, bool)> {
    let images = f.provider.images().await?;
    if images.is_empty() {
        return Err(input(format!(
            "no images available to the {} provider (bake one with `imagectl build`)",
            f.provider.kind()
        )));
    }
    Ok(match choice {
        ImageChoice::Latest => (images.last().cloned().expect("not empty"), true),
        ImageChoice::Version(v) => (find_version(&images, v)?, true),
        ImageChoice::Current => {
            let newest_in_use = images
                .iter()
                .rev()
                .find(|i| vms.iter().any(|v| v.image_version == i.version));
            (
                newest_in_use
                    .unwrap_or_else(|| images.last().expect("not empty"))
                    .clone(),
                false,
            )
        }
    })
}

/// Healthy = running, runner present at GitLab, seed gone (a leftover seed of a registered VM is
/// detached here). GitLab errors other than 404 count as healthy: an outage must not destroy VMs.
async fn views<P: Provider>(f: &Fleet<'_, P>, vms: &[VmInfo]) -> Vec<VmView> {
    let mut out = Vec::new();
    for v in vms {
        let mut healthy = v.state == VmState::Running;
        if healthy {
            if let Err(e) = f.gitlab.runner(v.runner_id).await {
                healthy = !e.is_not_found();
            }
        }
        if healthy && v.seed_attached {
            let registered = matches!(f.provider.agent_status(v).await, Ok(Some(s)) if s.state == AgentState::Registered);
            healthy = registered && f.provider.detach_seed(v).await.is_ok();
        }
        out.push(VmView {
            name: v.name.clone(),
            created_at: v.created_at.clone(),
            version: v.image_version.clone(),
            healthy,
        });
    }
    out
}

async fn create_many<P: Provider>(
    f: &Fleet<'_, P>,
    image: &ImageInfo,
    n: usize,
    existing: &[VmInfo],
) -> (Vec<VmInfo>, Vec<Failure>) {
    if n == 0 {
        return (Vec::new(), Vec::new());
    }
    let nodes = match f.provider.nodes().await {
        Ok(n) => n,
        Err(e) => {
            let fail = Failure {
                vm: "-".into(),
                error: format!("listing nodes: {e:#}"),
                cleaned: vec![],
                left: vec![],
            };
            return (Vec::new(), vec![fail]);
        }
    };
    // Templates on local storage can only be cloned on the nodes that hold them.
    let nodes: Vec<_> = nodes
        .into_iter()
        .filter(|n| image.nodes.is_empty() || image.nodes.contains(&n.name))
        .collect();
    let placed = plan::place(&nodes, existing, n, f.opts.memory_mib);
    let mut failed = Vec::new();
    if placed.len() < n {
        failed.push(Failure {
            vm: "-".into(),
            error: format!(
                "no node{} has {} MiB free for {} more VM(s)",
                if image.nodes.is_empty() {
                    String::new()
                } else {
                    format!(
                        " holding image {} ({})",
                        image.version,
                        image.nodes.join(", ")
                    )
                },
                f.opts.memory_mib,
                n - placed.len()
            ),
            cleaned: vec![],
            left: vec![],
        });
    }
    let mut taken: Vec<String> = existing.iter().map(|v| v.name.clone()).collect();
    let mut jobs = Vec::new();
    for node in placed {
        let name = plan::new_name(&f.opts.fleet, &taken);
        taken.push(name.clone());
        jobs.push((name, node));
    }
    let results: Vec<_> = stream::iter(jobs)
        .map(|(name, node)| create_vm(f, image, name, Some(node)))
        // With parallel waits the API work is bounded inside create_vm instead.
        .buffer_unordered(if f.provider.parallel_waits() {
            n.max(1)
        } else {
            f.opts.concurrency.max(1)
        })
        .collect()
        .await;
    let mut ok = Vec::new();
    for r in results {
        match r {
            Ok(v) => ok.push(v),
            Err(e) => failed.push(e),
        }
    }
    ok.sort_by(|a, b| a.name.cmp(&b.name));
    (ok, failed)
}

async fn retire_many<P: Provider>(
    f: &Fleet<'_, P>,
    vms: Vec<VmInfo>,
    graceful: bool,
    report: &mut Report,
) {
    let results: Vec<_> = stream::iter(vms)
        .map(|v| async move { (v.name.clone(), retire(f, &v, graceful).await) })
        .buffer_unordered(f.opts.concurrency.max(1))
        .collect()
        .await;
    for (name, r) in results {
        match r {
            Ok(()) => report.removed.push(name),
            Err(e) => report.failed.push(e),
        }
    }
}

/// Rolling replacement: for each batch of `max_surge + max_unavailable` old VMs, first drain
/// `max_unavailable` of them, then bring as many new VMs online as the batch had, then drain the
/// rest of the batch, one per new VM. A failure stops the rollout (the rest keep serving).
async fn roll<P: Provider>(f: &Fleet<'_, P>, olds: Vec<(VmInfo, ImageInfo)>, report: &mut Report) {
    let unavailable = f.opts.max_unavailable;
    let batch_size = (f.opts.max_surge + unavailable).max(1);
    let mut olds = olds.into_iter().peekable();
    while olds.peek().is_some() {
        if f.cancel.is_cancelled() {
            report.aborted = Some("interrupted".into());
            return;
        }
        let mut batch: Vec<(VmInfo, ImageInfo)> = olds.by_ref().take(batch_size).collect();
        let early: Vec<VmInfo> = batch
            .iter()
            .take(unavailable)
            .map(|(o, _)| o.clone())
            .collect();
        if !early.is_empty() {
            let before = report.failed.len();
            retire_many(f, early.clone(), true, report).await;
            if report.failed.len() > before {
                let kept: Vec<String> = batch
                    .iter()
                    .skip(early.len())
                    .map(|(o, _)| o.name.clone())
                    .chain(olds.map(|(o, _)| o.name))
                    .collect();
                report.aborted = Some(format!(
                    "draining an old VM failed; {} old VM(s) keep serving: {}",
                    kept.len(),
                    kept.join(", ")
                ));
                return;
            }
        }
        let mut existing = f.vms().await.unwrap_or_default();
        let mut made = Vec::new();
        let mut failed = false;
        // One new VM per old one, on the old one's target image (batches run concurrently).
        let mut by_image: Vec<(ImageInfo, usize)> = Vec::new();
        for (_, img) in &batch {
            match by_image.iter_mut().find(|(i, _)| i.version == img.version) {
                Some((_, n)) => *n += 1,
                None => by_image.push((img.clone(), 1)),
            }
        }
        for (img, n) in by_image {
            let (ok, bad) = create_many(f, &img, n, &existing).await;
            existing.extend(ok.iter().cloned());
            failed |= !bad.is_empty();
            report.failed.extend(bad);
            made.extend(ok);
        }
        let batch: Vec<(VmInfo, ImageInfo)> = batch.split_off(early.len().min(batch.len()));
        let drain: Vec<VmInfo> = batch
            .iter()
            .take(made.len().saturating_sub(early.len()))
            .map(|(o, _)| o.clone())
            .collect();
        let drained = drain.len();
        report.created.extend(made);
        retire_many(f, drain, true, report).await;
        if failed {
            let mut kept: Vec<String> = batch
                .iter()
                .skip(drained)
                .map(|(o, _)| o.name.clone())
                .collect();
            kept.extend(olds.map(|(o, _)| o.name));
            report.aborted = Some(format!(
                "a new VM failed; {} old VM(s) keep serving: {}",
                kept.len(),
                kept.join(", ")
            ));
            return;
        }
    }
}

fn new_report<P: Provider>(f: &Fleet<'_, P>, action: &str) -> Report {
    Report {
        fleet: f.opts.fleet.clone(),
        action: action.into(),
        ..Default::default()
    }
}

/// Reconciles the fleet to `count` healthy VMs of the chosen image (`None`: as many as it has).
///
/// `canary`: of the VMs not on the image, replace only one (surge first) and leave the rest, so
/// a pipeline can watch one VM of a new image before it rolls out the rest.
pub async fn deploy<P: Provider>(
    f: &mut Fleet<'_, P>,
    count: Option<usize>,
    choice: &ImageChoice,
    canary: bool,
) -> Result<Report> {
    let lock = f.lock().await?;
    let r = deploy_locked(f, count, choice, canary).await;
    f.unlock(&lock).await;
    f.progress.finish();
    r
}

async fn deploy_locked<P: Provider>(
    f: &mut Fleet<'_, P>,
    count: Option<usize>,
    choice: &ImageChoice,
    canary: bool,
) -> Result<Report> {
    let vms = f.vms().await?;
    let count = match count {
        Some(n) => n,
        None if !vms.is_empty() => vms.len(),
        None => {
            return Err(input(format!(
                "how many VMs? fleet {} has none yet: pass --count N (or set [fleet.{}] count)",
                f.opts.fleet, f.opts.fleet
            )))
        }
    };
    let (image, strict) = resolve(f, choice, &vms).await?;
    let views = views(f, &vms).await;
    let mut plan = plan::reconcile(&views, count, strict.then_some(image.version.as_str()));
    if canary {
        let rest = plan.replace.split_off(plan.replace.len().min(1));
        plan.keep.extend(rest);
    }
    let mut report = new_report(f, "deploy");
    report.image_version = Some(image.version.clone());
    report.unchanged = plan.keep.clone();
    if plan.is_noop() {
        return Ok(report);
    }
    let steps = plan.remove_broken.len() + plan.create + 2 * plan.replace.len() + plan.retire.len();
    f.progress
        .start(&format!("deploy {}", f.opts.fleet), steps as u64);
    let pick = |names: &[String]| -> Vec<VmInfo> {
        vms.iter()
            .filter(|v| names.contains(&v.name))
            .cloned()
            .collect()
    };
    retire_many(f, pick(&plan.remove_broken), false, &mut report).await;
    let keep: Vec<VmInfo> = vms
        .iter()
        .filter(|v| !plan.remove_broken.contains(&v.name))
        .cloned()
        .collect();
    let (ok, bad) = create_many(f, &image, plan.create, &keep).await;
    report.created.extend(ok);
    report.failed.extend(bad);
    let olds = pick(&plan.replace)
        .into_iter()
        .map(|v| (v, image.clone()))
        .collect();
    roll(f, olds, &mut report).await;
    retire_many(f, pick(&plan.retire), true, &mut report).await;
    Ok(report)
}

/// Replaces the named VMs one for one (on `image`, or each VM's own version).
pub async fn replace<P: Provider>(
    f: &mut Fleet<'_, P>,
    names: &[String],
    image: Option<&str>,
) -> Result<Report> {
    let lock = f.lock().await?;
    let r = async {
        let vms = f.vms().await?;
        let images = f.provider.images().await?;
        let mut olds = Vec::new();
        for n in names {
            let vm = vms
                .iter()
                .find(|v| &v.name == n || &v.id == n)
                .ok_or_else(|| {
                    input(format!(
                        "fleet {} has no VM {n:?} (see `imagectl status --fleet {}`)",
                        f.opts.fleet, f.opts.fleet
                    ))
                })?;
            let img = match image {
                Some("latest") => images
                    .last()
                    .cloned()
                    .ok_or_else(|| input("no images available"))?,
                Some(v) => find_version(&images, v)?,
                None => find_version(&images, &vm.image_version)?,
            };
            olds.push((vm.clone(), img));
        }
        let mut report = new_report(f, "replace");
        report.image_version = image.map(str::to_string);
        report.unchanged = vms
            .iter()
            .filter(|v| !names.contains(&v.name))
            .map(|v| v.name.clone())
            .collect();
        f.progress.start(
            &format!("replace in {}", f.opts.fleet),
            2 * olds.len() as u64,
        );
        roll(f, olds, &mut report).await;
        Ok(report)
    }
    .await;
    f.unlock(&lock).await;
    f.progress.finish();
    r
}

/// Replaces every VM not on `to` (default: the version before the newest one in use).
pub async fn rollback<P: Provider>(f: &mut Fleet<'_, P>, to: Option<&str>) -> Result<Report> {
    let lock = f.lock().await?;
    let r = async {
        let vms = f.vms().await?;
        if vms.is_empty() {
            return Err(input(format!("fleet {} has no VMs to roll back", f.opts.fleet)));
        }
        let images = f.provider.images().await?;
        let versions: Vec<String> = images.iter().map(|i| i.version.clone()).collect();
        let target = match to {
            Some(v) => find_version(&images, v)?,
            None => {
                let current = versions
                    .iter()
                    .rev()
                    .find(|v| vms.iter().any(|m| &&m.image_version == v))
                    .ok_or_else(|| input("the fleet's image versions are no longer available; pass --to VERSION"))?;
                let prev = plan::previous_version(&versions, current).ok_or_else(|| {
                    input(format!("there is no image version before {current} to roll back to; pass --to VERSION"))
                })?;
                find_version(&images, prev)?
            }
        };
        let views = views(f, &vms).await;
        let healthy = views.iter().filter(|v| v.healthy).count();
        let plan = plan::reconcile(&views, healthy, Some(&target.version));
        let mut report = new_report(f, "rollback");
        report.image_version = Some(target.version.clone());
        report.unchanged = plan.keep.clone();
        f.progress.start(&format!("rollback {} to {}", f.opts.fleet, target.version), 2 * plan.replace.len() as u64);
        let olds = vms
            .iter()
            .filter(|v| plan.replace.contains(&v.name))
            .map(|v| (v.clone(), target.clone()))
            .collect();
        roll(f, olds, &mut report).await;
        Ok(report)
    }
    .await;
    f.unlock(&lock).await;
    f.progress.finish();
    r
}

/// Drains and deletes every VM of the fleet, then its orphan runners and seeds.
pub async fn destroy<P: Provider>(f: &mut Fleet<'_, P>) -> Result<Report> {
    let lock = f.lock().await?;
    let r = async {
        let vms = f.vms().await?;
        let mut report = new_report(f, "destroy");
        f.progress
            .start(&format!("destroy {}", f.opts.fleet), vms.len() as u64);
        retire_many(f, vms, true, &mut report).await;
        let gc = super::gc::gc_fleet(f).await?;
        for r in gc.runners_deleted {
            report.removed.push(format!("orphan runner {r}"));
        }
        for s in gc.seeds_deleted {
            report.removed.push(format!("orphan seed {s}"));
        }
        report.failed.extend(gc.failed);
        report.unchecked.extend(gc.unchecked);
        Ok(report)
    }
    .await;
    f.unlock(&lock).await;
    f.progress.finish();
    r
}
