//! Bringing one VM up, or leaving nothing behind.
//!
//! Steps: create the runner (`POST /user/runners`, description `imagectl/<fleet>/<vm>`) → write
//! the seed ISO (token inside, in the private seed directory) → clone the VM (facts: fleet, image
//! version, runner id) → attach the seed (and delete the local copy) → start → wait for the
//! agent's `registered` (guest agent read of status.json) → wait for GitLab `online` → detach and
//! delete the seed.
//!
//! Every step records what it made in [`Made`]; on any failure — provider or GitLab error, agent
//! `failed`, timeout, Ctrl-C — [`rollback`] removes exactly that (VM with its seed, local seed
//! file, runner), and the [`Failure`] says what was cleaned and what, if anything, was left.

use super::{Failure, Fleet};
use crate::provider::{CreateVm, ImageInfo, Provider, VmInfo};
use crate::remote::gitlab::NewRunner;
use crate::seed::{AgentSeed, SeedConfig};
use anyhow::{bail, Context, Result};
use imagectl_proto::AgentState;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What one attempt has made so far (for rollback).
#[derive(Debug, Default)]
pub struct Made {
    /// The runner id.
    pub runner: Option<u64>,
    /// Description of a runner whose create call was sent but not answered with an id: GitLab
    /// may have made it anyway (a lost answer, a 5xx after commit), so rollback looks for it.
    pub runner_unconfirmed: Option<String>,
    /// The seed ISO on this machine.
    pub seed_file: Option<PathBuf>,
    /// The VM.
    pub vm: Option<VmInfo>,
}

/// Brings up VM `name` on `image` (on `node`), or rolls back and returns the failure.
pub async fn create_vm<P: Provider>(
    f: &Fleet<'_, P>,
    image: &ImageInfo,
    name: String,
    node: Option<String>,
) -> std::result::Result<VmInfo, Failure> {
    let mut made = Made::default();
    let started = Instant::now();
    match steps(f, image, &name, node, &mut made).await {
        Ok(vm) => {
            f.progress.done(
                &name,
                &format!(
                    "online as runner {} ({:.0}s)",
                    vm.runner_id,
                    started.elapsed().as_secs_f64()
                ),
            );
            Ok(vm)
        }
        Err(e) => {
            let error = format!("{e:#}");
            f.progress
                .event(&name, &format!("failed ({error}); rolling back"));
            let (cleaned, left) = rollback(f, &made).await;
            f.progress
                .done(&name, &format!("failed and rolled back: {error}"));
            Err(Failure {
                vm: name,
                error,
                cleaned,
                left,
            })
        }
    }
}

async fn steps<P: Provider>(
    f: &Fleet<'_, P>,
    image: &ImageInfo,
    name: &str,
    node: Option<String>,
    made: &mut Made,
) -> Result<VmInfo> {
    let gl = f.gl;
    let deadline = Instant::now() + f.opts.timeout;
    // With parallel waits, only the API work (runner, seed, clone, start) takes a slot.
    let slot = if f.provider.parallel_waits() {
        Some(f.slots.acquire().await.context("waiting for a slot")?)
    } else {
        None
    };
    f.cancel.check()?;
    let description = format!("{}{name}", f.runner_prefix());
    f.progress.event(name, "creating runner");
    made.runner_unconfirmed = Some(description.clone());
    let runner = f
        .gitlab
        .create_runner(&NewRunner {
            runner_type: gl.runner_type.clone(),
            group_id: gl.group_id,
            project_id: gl.project_id,
            description: description.clone(),
            tag_list: gl.tags.clone(),
            run_untagged: gl.run_untagged,
            locked: gl.locked,
            access_level: gl.access_level.clone(),
            maximum_timeout: gl.maximum_timeout,
            maintenance_note: Some(maintenance_note(
                f.provider.scope().as_str(),
                &image.version,
            )),
        })
        .await;
    let runner = match runner {
        Ok(r) => r,
        Err(e) => {
            if e.made_nothing() {
                // GitLab answered and refused (4xx): no runner exists to look for.
                made.runner_unconfirmed = None;
            }
            return Err(e).context("creating the runner");
        }
    };
    made.runner = Some(runner.id);
    made.runner_unconfirmed = None;
    f.cancel.check()?;

    f.progress
        .event(name, &format!("runner {} created; writing seed", runner.id));
    let mut cfg = SeedConfig::new(name)?;
    cfg.agent = Some(AgentSeed {
        version: 1,
        gitlab_url: f.provider.guest_gitlab_url(&gl.url),
        runner_token: runner.token,
        runner_id: runner.id,
        runner_name: description,
        ca_bundle: gl.ca_pem.clone(),
        concurrent: gl.concurrent,
        tags: gl.tags.clone(),
        docker: gl.docker.clone(),
        metrics_listen: ":9252".into(),
        // The agent may spend this on verify and again on the rotation, then up to 120 s waiting
        // for gitlab-runner's first job request: all of it must fit in the deploy's timeout.
        verify_budget_secs: (f.opts.timeout.as_secs().saturating_sub(150) / 2).clamp(30, 600),
    });
    let seed_path = f.seed_dir.join(format!("{name}.iso"));
    made.seed_file = Some(seed_path.clone());
    let p = seed_path.clone();
    tokio::task::spawn_blocking(move || crate::seed::write_iso(&cfg, &p))
        .await
        .context("joining the seed writer")?
        .context("writing the seed ISO")?;
    f.cancel.check()?;

    f.progress.event(name, "cloning");
    let vm = f
        .provider
        .create(&CreateVm {
            fleet: f.opts.fleet.clone(),
            name: name.to_string(),
            image: image.clone(),
            runner_id: runner.id,
            node,
            memory_mib: f.opts.memory_mib,
            cpus: f.opts.cpus,
            full_clone: f.opts.full_clone,
        })
        .await
        .context("creating the VM")?;
    made.vm = Some(vm.clone());
    f.provider
        .attach_seed(&vm, &seed_path)
        .await
        .context("attaching the seed")?;
    remove_file(&seed_path)?;
    made.seed_file = None;
    f.cancel.check()?;

    f.progress.event(name, "starting");
    f.provider.start(&vm).await.context("starting the VM")?;
    drop(slot);
    f.progress.event(name, "booting; waiting for the agent");
    loop {
        let st = f
            .provider
            .agent_status(&vm)
            .await
            .context("reading the agent's status")?;
        match st {
            Some(s) if s.state == AgentState::Registered => {
                if s.runner_id.is_some_and(|id| id != runner.id) {
                    bail!(
                        "the agent registered runner {:?}, not {}",
                        s.runner_id,
                        runner.id
                    );
                }
                break;
            }
            Some(s) if s.state == AgentState::Failed => {
                bail!(
                    "the agent failed: {}",
                    s.error.as_deref().unwrap_or("no reason given")
                );
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            bail!("not registered within {}s", f.opts.timeout.as_secs());
        }
        f.cancel.sleep(f.opts.poll).await?;
    }
    f.progress
        .event(name, "registered; waiting for GitLab to see it online");
    loop {
        match f.gitlab.runner(runner.id).await {
            Ok(r) if r.status.as_deref() == Some("online") => break,
            Ok(_) => {}
            Err(e) if e.is_not_found() => bail!("runner {} vanished at GitLab", runner.id),
            Err(e) => tracing::warn!("{e}"),
        }
        if Instant::now() >= deadline {
            bail!(
                "runner {} not online within {}s",
                runner.id,
                f.opts.timeout.as_secs()
            );
        }
        f.cancel.sleep(f.opts.poll).await?;
    }
    f.provider
        .detach_seed(&vm)
        .await
        .context("detaching the seed")?;
    let mut vm = vm;
    vm.seed_attached = false;
    vm.state = crate::provider::VmState::Running;
    Ok(vm)
}

/// The runner's maintenance note: who manages it (gc uses it to stay within its own scope).
pub fn maintenance_note(scope: &str, version: &str) -> String {
    format!("managed by imagectl; scope={scope}; image={version}")
}

/// The scope in a maintenance note, if it is one of ours.
pub fn note_scope(note: &str) -> Option<&str> {
    note.split("; ").find_map(|p| p.strip_prefix("scope="))
}

fn remove_file(p: &std::path::Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting {}", p.display())),
    }
}

/// Removes what `made` lists: the VM (with its seed), the local seed, the runner. Each is tried
/// a few times; returns (cleaned, left behind).
pub async fn rollback<P: Provider>(f: &Fleet<'_, P>, made: &Made) -> (Vec<String>, Vec<String>) {
    let mut cleaned = Vec::new();
    let mut left = Vec::new();
    if let Some(vm) = &made.vm {
        match retry(|| f.provider.destroy(vm)).await {
            Ok(()) => cleaned.push(format!("vm {}", vm.name)),
            Err(e) => left.push(format!("vm {} ({e:#})", vm.name)),
        }
    }
    if let Some(p) = &made.seed_file {
        match remove_file(p) {
            Ok(()) => cleaned.push("seed".into()),
            Err(e) => left.push(format!("seed {} ({e:#})", p.display())),
        }
    }
    if let Some(id) = made.runner {
        match retry(|| async {
            f.gitlab
                .delete_runner(id)
                .await
                .map_err(anyhow::Error::from)
        })
        .await
        {
            Ok(_) => cleaned.push(format!("runner {id}")),
            Err(e) => left.push(format!("runner {id} ({e:#})")),
        }
    }
    if let (None, Some(desc)) = (made.runner, &made.runner_unconfirmed) {
        // The create call failed, but may have created a runner: find it by its description.
        // A token that may not list (no read_api, or GitLab's 403) is said so, not retried.
        let found = retry(|| super::gc::listed(f.gitlab, desc)).await;
        let found = match found {
            Ok(Err(why)) => {
                left.push(format!("maybe a runner {desc:?} (could not check: {why})"));
                return (cleaned, left);
            }
            Ok(Ok(list)) => Ok(list
                .into_iter()
                .filter(|r| r.description.as_deref() == Some(desc.as_str()))
                .collect::<Vec<_>>()),
            Err(e) => Err(e),
        };
        match found {
            Ok(list) => {
                for r in list {
                    match retry(|| async {
                        f.gitlab
                            .delete_runner(r.id)
                            .await
                            .map_err(anyhow::Error::from)
                    })
                    .await
                    {
                        Ok(_) => {
                            cleaned.push(format!("runner {} (created despite the error)", r.id))
                        }
                        Err(e) => left.push(format!("runner {} ({e:#})", r.id)),
                    }
                }
            }
            Err(e) => left.push(format!("maybe a runner {desc:?} (could not check: {e:#})")),
        }
    }
    (cleaned, left)
}

async fn retry<T, Fut: std::future::Future<Output = Result<T>>>(
    mut op: impl FnMut() -> Fut,
) -> Result<T> {
    let mut last = None;
    for i in 0..3u32 {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                tracing::warn!("cleanup attempt {} failed: {e:#}", i + 1);
                last = Some(e);
                tokio::time::sleep(Duration::from_secs(1 << i)).await;
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("cleanup failed")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_carry_the_scope() {
        let n = maintenance_note("local:h:/var/lib/imagectl", "1.2");
        assert_eq!(note_scope(&n), Some("local:h:/var/lib/imagectl"));
        assert_eq!(note_scope("hand-made runner"), None);
        assert!(n.chars().count() <= 1024);
    }
}
