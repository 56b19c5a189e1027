//! `status` (one row per VM: provider facts, GitLab status, agent state, node_exporter
//! reachability) and `targets` (Prometheus `file_sd` JSON).

use crate::provider::{Endpoint, Provider, VmInfo};
use crate::remote::gitlab::GitlabClient;
use anyhow::Result;
use futures_util::stream::{self, StreamExt};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// One VM as `imagectl status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct VmStatus {
    /// VM name.
    pub name: String,
    /// Provider id (PVE VMID; local: the name).
    pub id: String,
    /// Node.
    pub node: String,
    /// Image version.
    pub image_version: String,
    /// Runner id.
    pub runner_id: u64,
    /// Created (RFC 3339).
    pub created_at: String,
    /// Provider state: running, stopped, dead.
    pub state: String,
    /// GitLab's status (`online`, `offline`, `stale`, `never_contacted`), `missing` (404), or
    /// `unknown` (GitLab not asked or not answering).
    pub gitlab_status: String,
    /// Paused at GitLab.
    pub paused: Option<bool>,
    /// The agent's state (`registered`, `failed`, `running`) or `unreachable`.
    pub agent_state: String,
    /// The agent's error, if it failed.
    pub agent_error: Option<String>,
    /// The runner manager's system_id.
    pub system_id: Option<String>,
    /// node_exporter (9100) answers `/metrics`: `up` or `down`.
    pub node_exporter: String,
    /// Where the metrics ports are reachable from here.
    pub endpoints: Vec<Endpoint>,
}

async fn node_exporter_up(http: &reqwest::Client, ep: Option<&Endpoint>) -> bool {
    let Some(ep) = ep else { return false };
    let url = format!("http://{}:{}/metrics", ep.host, ep.port);
    match http.get(url).send().await {
        Ok(r) if r.status().is_success() => r.text().await.is_ok_and(|t| t.contains("node_")),
        _ => false,
    }
}

async fn one<P: Provider>(
    p: &P,
    gitlab: Option<&GitlabClient>,
    http: &reqwest::Client,
    v: VmInfo,
) -> VmStatus {
    let (gitlab_status, paused) = match gitlab {
        None => ("unknown".to_string(), None),
        Some(g) => match g.runner(v.runner_id).await {
            Ok(r) => (r.status.unwrap_or_else(|| "unknown".into()), r.paused),
            Err(e) if e.is_not_found() => ("missing".into(), None),
            Err(e) => {
                tracing::warn!("{e}");
                ("unknown".into(), None)
            }
        },
    };
    let agent = if v.state == crate::provider::VmState::Running {
        p.agent_status(&v).await.ok().flatten()
    } else {
        None
    };
    let endpoints = p.endpoints(&v).await.unwrap_or_default();
    let up = v.state == crate::provider::VmState::Running
        && node_exporter_up(http, endpoints.iter().find(|e| e.guest_port == 9100)).await;
    VmStatus {
        agent_state: agent
            .as_ref()
            .map(|a| {
                serde_json::to_value(a.state)
                    .ok()
                    .and_then(|s| s.as_str().map(str::to_string))
                    .unwrap_or_default()
            })
            .unwrap_or_else(|| "unreachable".into()),
        agent_error: agent.as_ref().and_then(|a| a.error.clone()),
        system_id: agent.and_then(|a| a.system_id),
        name: v.name,
        id: v.id,
        node: v.node,
        image_version: v.image_version,
        runner_id: v.runner_id,
        created_at: v.created_at,
        state: v.state.to_string(),
        gitlab_status,
        paused,
        node_exporter: if up { "up" } else { "down" }.into(),
        endpoints,
    }
}

/// Status of every VM of `fleet`, oldest first. Without a GitLab client the GitLab column is
/// `unknown`.
pub async fn status<P: Provider>(
    p: &P,
    gitlab: Option<&GitlabClient>,
    fleet: &str,
) -> Result<Vec<VmStatus>> {
    let mut vms = p.list(Some(fleet)).await?;
    vms.sort_by(|a, b| (&a.created_at, &a.name).cmp(&(&b.created_at, &b.name)));
    // A full node_exporter scrape of a busy VM (or one under software emulation) can take
    // several seconds; a slow answer is still an answer.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .map_err(|e| anyhow::anyhow!("creating an HTTP client: {e}"))?;
    let mut rows: Vec<VmStatus> = stream::iter(vms)
        .map(|v| one(p, gitlab, &http, v))
        .buffer_unordered(8)
        .collect()
        .await;
    rows.sort_by(|a, b| (&a.created_at, &a.name).cmp(&(&b.created_at, &b.name)));
    Ok(rows)
}

/// One Prometheus `file_sd` target group.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TargetGroup {
    /// `host:port`.
    pub targets: Vec<String>,
    /// Labels: fleet, vm, image_version, exporter.
    pub labels: BTreeMap<String, String>,
}

/// Which exporter listens on a guest port.
pub fn exporter_name(port: u16) -> &'static str {
    match port {
        9100 => "node",
        8080 => "cadvisor",
        9252 => "gitlab-runner",
        _ => "other",
    }
}

/// `file_sd` groups for `fleet`: per VM one group per metrics port (9100, 8080, 9252).
pub async fn targets<P: Provider>(p: &P, fleet: &str) -> Result<Vec<TargetGroup>> {
    let mut vms = p.list(Some(fleet)).await?;
    vms.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = Vec::new();
    for v in vms {
        let mut eps = p.endpoints(&v).await.unwrap_or_default();
        eps.sort_by_key(|e| e.guest_port);
        for e in eps {
            let mut labels = BTreeMap::new();
            labels.insert("fleet".to_string(), v.fleet.clone());
            labels.insert("vm".to_string(), v.name.clone());
            labels.insert("image_version".to_string(), v.image_version.clone());
            labels.insert("node".to_string(), v.node.clone());
            labels.insert(
                "exporter".to_string(),
                exporter_name(e.guest_port).to_string(),
            );
            out.push(TargetGroup {
                targets: vec![format!("{}:{}", e.host, e.port)],
                labels,
            });
        }
    }
    Ok(out)
}
