//! `imagectl status`: every VM of a fleet with its provider id, node, image version, runner id,
//! GitLab status, agent state and node_exporter reachability.
//!
//! Exit code 0 when every VM is running, online, registered and its node_exporter answers;
//! 1 otherwise (so scripts and monitors can use it); 2 for bad input.

use super::Global;
use crate::fleet::setup::{runtime, setup, FleetArgs, TuneArgs};
use crate::fleet::VmStatus;
use anyhow::Result;
use serde::Serialize;

/// Arguments of `imagectl status`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Fleet, provider, GitLab and image-store flags.
    #[command(flatten)]
    pub fleet: FleetArgs,
}

#[derive(Serialize)]
struct Out {
    fleet: String,
    healthy: bool,
    vms: Vec<VmStatus>,
}

fn healthy(v: &VmStatus) -> bool {
    v.state == "running"
        && v.gitlab_status == "online"
        && v.agent_state == "registered"
        && v.node_exporter == "up"
}

fn table(o: &Out) -> String {
    use std::fmt::Write as _;
    let mut s = format!(
        "{:<14} {:<10} {:<12} {:<22} {:>7} {:<16} {:<11} {:<9}\n",
        "VM", "ID", "NODE", "IMAGE", "RUNNER", "GITLAB", "AGENT", "NODE_EXP"
    );
    for v in &o.vms {
        let gl = match v.paused {
            Some(true) => format!("{} (paused)", v.gitlab_status),
            _ => v.gitlab_status.clone(),
        };
        let _ = writeln!(
            s,
            "{:<14} {:<10} {:<12} {:<22} {:>7} {:<16} {:<11} {:<9}",
            v.name, v.id, v.node, v.image_version, v.runner_id, gl, v.agent_state, v.node_exporter
        );
        if let Some(e) = &v.agent_error {
            let _ = writeln!(s, "    agent error: {e}");
        }
    }
    let _ = writeln!(
        s,
        "{} VM(s); {}",
        o.vms.len(),
        if o.healthy {
            "all healthy"
        } else {
            "NOT all healthy"
        }
    );
    s
}

/// Runs `imagectl status`.
pub fn run(g: &Global, a: Args) -> Result<i32> {
    let (s, _) = setup(&a.fleet, &TuneArgs::default(), false, None)?;
    let gitlab = s.gitlab.as_ref().map(|(c, _)| c);
    let vms = runtime()?.block_on(async {
        s.preflight(crate::fleet::preflight::Command::Status)
            .await?;
        crate::fleet::status(&s.provider, gitlab, &a.fleet.fleet).await
    })?;
    let out = Out {
        fleet: a.fleet.fleet.clone(),
        healthy: vms.iter().all(healthy),
        vms,
    };
    g.emit(&out, table)?;
    Ok(i32::from(!out.healthy))
}
