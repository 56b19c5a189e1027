//! Tasks: PVE writes that take time answer with a UPID; poll its status until it stops, and fail
//! with its exit status and the last lines of its log.

use super::{params, seg, PveClient, PveError};
use serde::Deserialize;
use std::time::{Duration, Instant};

/// Lines of the task log kept in a [`PveError::Task`].
pub const LOG_TAIL: usize = 12;

#[derive(Debug, Deserialize)]
struct TaskStatus {
    status: String,
    #[serde(default)]
    exitstatus: Option<String>,
}

#[derive(Debug, Deserialize)]
struct LogLine {
    #[serde(default)]
    t: String,
}

/// The node a UPID names (`UPID:node:pid:pstart:starttime:type:id:user:`).
pub fn upid_node(upid: &str) -> Option<&str> {
    let mut parts = upid.split(':');
    (parts.next() == Some("UPID"))
        .then(|| parts.next())
        .flatten()
        .filter(|n| !n.is_empty())
}

/// True for an exit status that means success (`OK`, or `WARNINGS: n`).
pub fn task_ok(exitstatus: &str) -> bool {
    exitstatus == "OK" || exitstatus.starts_with("WARNINGS")
}

impl PveClient {
    /// POSTs and returns the UPID the write started.
    pub async fn post_task(&self, path: &str, form: super::Params) -> Result<String, PveError> {
        let upid: Option<String> = self.post(path, form).await?;
        upid.filter(|u| u.starts_with("UPID:"))
            .ok_or_else(|| PveError::decode("POST", path, "expected a task id (UPID)"))
    }

    /// POSTs, then waits for the task with the client's task timeout.
    pub async fn run_task(&self, path: &str, form: super::Params) -> Result<String, PveError> {
        let upid = self.post_task(path, form).await?;
        self.wait_task(&upid, self.options().task_timeout).await?;
        Ok(upid)
    }

    /// Waits until the task stops; an exit status other than OK is a [`PveError::Task`], running
    /// longer than `timeout` a [`PveError::TaskTimeout`] (the task is asked to stop).
    pub async fn wait_task(&self, upid: &str, timeout: Duration) -> Result<(), PveError> {
        let node = upid_node(upid)
            .ok_or_else(|| {
                PveError::decode("GET", "/nodes/…/tasks", format!("not a UPID: {upid}"))
            })?
            .to_string();
        let path = format!("/nodes/{}/tasks/{}/status", seg(&node), seg(upid));
        let start = Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            match self.get::<TaskStatus>(&path, Vec::new()).await {
                Ok(s) if s.status == "stopped" => {
                    let exit = s.exitstatus.unwrap_or_else(|| "unknown".into());
                    if task_ok(&exit) {
                        return Ok(());
                    }
                    return Err(PveError::Task {
                        log: self.task_log_tail(&node, upid, LOG_TAIL).await,
                        node,
                        upid: upid.into(),
                        exitstatus: exit,
                    });
                }
                Ok(_) => {}
                // Just after start the task may not be visible yet (PVE answers 400/500).
                Err(e @ PveError::Api { .. })
                    if start.elapsed() < Duration::from_secs(10)
                        && matches!(e.status(), Some(400) | Some(500)) => {}
                Err(e) => return Err(e),
            }
            if start.elapsed() >= timeout {
                let log = self.task_log_tail(&node, upid, LOG_TAIL).await;
                let stop = format!("/nodes/{}/tasks/{}", seg(&node), seg(upid));
                if let Err(e) = self.delete::<serde_json::Value>(&stop, Vec::new()).await {
                    tracing::warn!("stopping task {upid} after its timeout: {e}");
                }
                return Err(PveError::TaskTimeout {
                    node,
                    upid: upid.into(),
                    waited: start.elapsed(),
                    log,
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// The last `n` lines of a task's log (empty when the log cannot be read).
    pub async fn task_log_tail(&self, node: &str, upid: &str, n: usize) -> Vec<String> {
        let path = format!("/nodes/{}/tasks/{}/log", seg(node), seg(upid));
        match self
            .get::<Vec<LogLine>>(&path, params([("start", 0), ("limit", 5000)]))
            .await
        {
            Ok(lines) => {
                let lines: Vec<String> = lines.into_iter().map(|l| l.t).collect();
                lines[lines.len().saturating_sub(n)..].to_vec()
            }
            Err(e) => {
                tracing::debug!("reading the log of {upid}: {e}");
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upids_name_their_node() {
        assert_eq!(
            upid_node("UPID:pve2:000003E8:00001B58:6B043EC1:imgcopy::imagectl@pve!ci:"),
            Some("pve2")
        );
        assert_eq!(upid_node("nope"), None);
        assert!(task_ok("OK") && task_ok("WARNINGS: 2") && !task_ok("checksum mismatch"));
    }
}
