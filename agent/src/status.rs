//! What the agent reports: `/var/lib/imagectl/status.json` (read by imagectl through the guest
//! agent), the `registered` marker, and a node_exporter textfile.

use crate::fsx;
use crate::paths::Paths;
use anyhow::Result;
use imagectl_proto::{AgentState, AgentStatus};
use std::collections::BTreeMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Collects the status while the agent runs.
#[derive(Debug)]
pub struct Recorder {
    /// The status as it stands.
    pub status: AgentStatus,
    step_started: Option<(String, Instant)>,
}

impl Recorder {
    /// A `running` status, stamped with the current uptime.
    pub fn start() -> Self {
        Self {
            status: AgentStatus {
                state: AgentState::Running,
                runner_id: None,
                system_id: None,
                started_uptime_s: crate::sys::uptime(),
                finished_uptime_s: None,
                timings_ms: BTreeMap::new(),
                error: None,
                agent_version: Some(env!("CARGO_PKG_VERSION").into()),
            },
            step_started: None,
        }
    }

    /// Starts timing `name` (ending any step still open).
    pub fn step(&mut self, name: &str) {
        self.end_step();
        crate::info!("step {name}");
        self.step_started = Some((name.to_owned(), Instant::now()));
    }

    /// Ends the open step, recording its duration.
    pub fn end_step(&mut self) {
        if let Some((name, t0)) = self.step_started.take() {
            let ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
            *self.status.timings_ms.entry(name).or_default() += ms;
        }
    }

    /// Marks the run finished with `state` and (for failures) a redacted error text.
    pub fn finish(&mut self, state: AgentState, error: Option<String>) {
        self.end_step();
        self.status.state = state;
        self.status.error = error.map(|e| crate::log::redact(&e));
        self.status.finished_uptime_s = crate::sys::uptime();
        if let (Some(a), Some(b)) = (self.status.started_uptime_s, self.status.finished_uptime_s) {
            self.status
                .timings_ms
                .insert("total".into(), ((b - a).max(0.0) * 1000.0).round() as u64);
        }
    }
}

/// Writes status.json (0644, atomically).
pub fn write_status(paths: &Paths, status: &AgentStatus) -> Result<()> {
    fsx::create_dir_all(&paths.state_dir, 0o755)?;
    let mut json = serde_json::to_vec_pretty(status)?;
    json.push(b'\n');
    // Belt and braces: status.json must never hold a secret.
    let json = crate::log::redact(&String::from_utf8_lossy(&json)).into_bytes();
    fsx::write_atomic(&paths.status, &json, 0o644)
}

/// Writes the `registered` marker that keeps the unit from running again.
pub fn write_marker(paths: &Paths, runner_id: u64) -> Result<()> {
    fsx::create_dir_all(&paths.state_dir, 0o755)?;
    fsx::write_atomic(
        &paths.marker,
        format!("runner {runner_id}\n").as_bytes(),
        0o644,
    )
}

/// Writes the node_exporter textfile (`imagectl_agent_registered`, last-run timestamp).
pub fn write_textfile(paths: &Paths, registered: bool) -> Result<()> {
    if let Some(dir) = paths.textfile.parent() {
        fsx::create_dir_all(dir, 0o755)?;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let text = format!(
        "# HELP imagectl_agent_registered 1 when imagectl-agent registered this VM's GitLab runner.\n\
         # TYPE imagectl_agent_registered gauge\n\
         imagectl_agent_registered {}\n\
         # HELP imagectl_agent_last_run_timestamp_seconds When imagectl-agent last finished, Unix time.\n\
         # TYPE imagectl_agent_last_run_timestamp_seconds gauge\n\
         imagectl_agent_last_run_timestamp_seconds {now:.3}\n",
        u8::from(registered)
    );
    fsx::write_atomic(&paths.textfile, text.as_bytes(), 0o644)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_steps_and_writes_files() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        let mut r = Recorder::start();
        r.step("seed");
        r.step("verify");
        r.finish(AgentState::Failed, Some("boom".into()));
        assert!(r.status.timings_ms.contains_key("seed"));
        assert!(r.status.timings_ms.contains_key("verify"));
        write_status(&paths, &r.status).unwrap();
        let back: AgentStatus =
            serde_json::from_slice(&std::fs::read(&paths.status).unwrap()).unwrap();
        assert_eq!(back.state, AgentState::Failed);
        write_textfile(&paths, false).unwrap();
        let prom = std::fs::read_to_string(&paths.textfile).unwrap();
        assert!(prom.contains("imagectl_agent_registered 0\n"), "{prom}");
    }
}
