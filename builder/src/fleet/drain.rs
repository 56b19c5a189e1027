//! Taking one VM down without killing jobs: pause its runner (`paused=true`), wait until
//! it has no executing job (`running` or `canceling`, gitlabhq `app/models/concerns/ci/has_status.rb`
//! `EXECUTING_STATUSES`: a canceling job still runs its `after_script`), delete the runner, stop
//! the VM, destroy it.
//!
//! When jobs are still running after the drain timeout: with `--force` the VM goes anyway (the
//! jobs fail); without it the VM is left running with its runner paused (it picks no new jobs)
//! and the operation reports it, so a later run can finish the job.

use super::{Failure, Fleet};
use crate::provider::VmInfo;
use crate::provider::{Provider, VmState};
use anyhow::{bail, Context, Result};
use std::time::Instant;

/// Drains and deletes `vm`. `graceful = false` skips pause and wait (its VM is already broken).
pub async fn retire<P: Provider>(
    f: &Fleet<'_, P>,
    vm: &VmInfo,
    graceful: bool,
) -> std::result::Result<(), Failure> {
    match steps(f, vm, graceful).await {
        Ok(()) => {
            f.progress.done(&vm.name, "drained and deleted");
            Ok(())
        }
        Err(e) => {
            let error = format!("{e:#}");
            f.progress.done(&vm.name, &format!("not removed: {error}"));
            Err(Failure {
                vm: vm.name.clone(),
                error,
                cleaned: Vec::new(),
                left: vec![format!(
                    "vm {} (runner {}) still exists",
                    vm.name, vm.runner_id
                )],
            })
        }
    }
}

async fn steps<P: Provider>(f: &Fleet<'_, P>, vm: &VmInfo, graceful: bool) -> Result<()> {
    let id = vm.runner_id;
    let mut runner_exists = true;
    if graceful && vm.state == VmState::Running {
        f.progress.event(&vm.name, &format!("pausing runner {id}"));
        match f.gitlab.pause(id).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => runner_exists = false,
            Err(e) => return Err(e).context("pausing the runner"),
        }
        let deadline = Instant::now() + f.opts.drain_timeout;
        while runner_exists {
            let jobs = match f.gitlab.executing_jobs(id).await {
                Ok(j) => j,
                Err(e) if e.is_not_found() => {
                    runner_exists = false;
                    continue;
                }
                Err(e) => return Err(e).context("listing the runner's executing jobs"),
            };
            if jobs.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                if f.opts.force {
                    f.progress.event(
                        &vm.name,
                        &format!(
                            "{} job(s) still executing; --force: deleting anyway",
                            jobs.len()
                        ),
                    );
                    break;
                }
                bail!(
                    "{} job(s) still executing on runner {id} after {}s; left running with the runner \
                     paused (run again later, or pass --force to cut them off)",
                    jobs.len(),
                    f.opts.drain_timeout.as_secs()
                );
            }
            f.progress.event(
                &vm.name,
                &format!("draining: {} job(s) executing", jobs.len()),
            );
            if let Err(e) = f.cancel.sleep(f.opts.poll).await {
                return Err(e).context("interrupted while draining; the runner is left paused");
            }
        }
    }
    if runner_exists {
        f.gitlab
            .delete_runner(id)
            .await
            .context("deleting the runner")?;
    }
    f.progress.event(&vm.name, "stopping");
    f.provider
        .stop(vm, f.opts.stop_grace)
        .await
        .context("stopping the VM")?;
    f.provider.destroy(vm).await.context("destroying the VM")?;
    Ok(())
}
