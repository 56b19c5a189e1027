//! Proof that gitlab-runner itself polls GitLab: its own metrics show a successful job request.
//!
//! GitLab marks a runner as contacted on `verify` and on `reset_authentication_token` too (the
//! agent's own calls), so "online" right after them proves nothing about gitlab-runner. What does
//! prove it is gitlab-runner's counter of API requests (gitlab-org/gitlab-runner
//! `network/api_requests_collector.go`):
//!
//! ```text
//! gitlab_runner_api_request_statuses_total{endpoint="request_job",method="post",runner="<short token>",status="204",system_id="s_…"} 3
//! ```
//!
//! with labels `runner`, `system_id`, `endpoint`, `status`, `method` (`endpoint` is
//! `apiEndpointRequestJob` = `request_job` for `POST /jobs/request`, observed in
//! `network/gitlab.go` `RequestJob`; `status` is the HTTP status as a decimal; requests that got no
//! HTTP answer are not counted). A job request succeeded when GitLab answered 201 (a job) or 204
//! (no job); 403 means GitLab rejected the token. The agent sums the samples with
//! `endpoint="request_job"`, `status` 201 or 204 and — when the label is there (gitlab-runner ≥
//! 16) — this VM's `system_id`. The `runner` label (the first 9 characters of the token after
//! `glrt-`, `helpers/shorten_token.go`) is never read, printed or compared.
//!
//! The metrics come from gitlab-runner's `listen_address` (`commands/multi.go` `listenAddress`:
//! `host:port`, a missing port means 9252, an empty host listens everywhere; the agent reads it
//! on loopback). The text is parsed leniently: lines it cannot read are skipped, nothing panics,
//! and at most [`METRICS_LIMIT`] bytes are read.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::Read;
use std::time::{Duration, Instant};

/// gitlab-runner's API request counter.
pub const METRIC: &str = "gitlab_runner_api_request_statuses_total";
/// The `endpoint` label value of `POST /jobs/request`.
pub const REQUEST_JOB: &str = "request_job";
/// gitlab-runner's default metrics port (`common.DefaultMetricsServerPort`).
pub const DEFAULT_PORT: u16 = 9252;
/// The most of the metrics page the agent reads.
pub const METRICS_LIMIT: u64 = 8 << 20;

/// The job requests one metrics page shows for this runner manager.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    /// True when the page has the counter at all.
    pub metric_seen: bool,
    /// Job requests GitLab answered 201 or 204.
    pub successful: f64,
    /// Every `request_job` status seen, with its count.
    pub statuses: BTreeMap<String, f64>,
}

impl Tally {
    /// The statuses seen, e.g. `403×4, 502×1`, or `none`.
    pub fn describe(&self) -> String {
        if self.statuses.is_empty() {
            return "none".into();
        }
        self.statuses
            .iter()
            .map(|(s, n)| format!("{s}×{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The metrics URL for gitlab-runner's `listen_address`, reached on loopback when it listens on
/// every address.
pub fn metrics_url(listen: &str) -> Result<String> {
    let l = listen.trim();
    if l.is_empty() {
        bail!(
            "the seed's metrics_listen is empty, so gitlab-runner serves no metrics and the agent \
             cannot see it poll; set metrics_listen (default \":9252\") or run with --no-poll-check"
        );
    }
    let (host, port) = if let Some(rest) = l.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .with_context(|| format!("metrics_listen {l:?}: unclosed '['"))?;
        match after.strip_prefix(':') {
            Some(p) => (h, Some(p)),
            None if after.is_empty() => (h, None),
            None => bail!("metrics_listen {l:?} is not host:port"),
        }
    } else {
        match l.matches(':').count() {
            0 => (l, None),
            1 => l
                .split_once(':')
                .map(|(h, p)| (h, Some(p)))
                .unwrap_or((l, None)),
            _ => bail!("metrics_listen {l:?}: an IPv6 address must be written in brackets"),
        }
    };
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .with_context(|| format!("metrics_listen {l:?}: {p:?} is not a port"))?,
    };
    let host = match host {
        "" | "0.0.0.0" | "::" => "127.0.0.1".to_owned(),
        h if h.contains(':') => format!("[{h}]"),
        h => h.to_owned(),
    };
    Ok(format!("http://{host}:{port}/metrics"))
}

/// Counts the `request_job` samples for `system_id` in a Prometheus text page.
pub fn tally(text: &str, system_id: &str) -> Tally {
    let mut t = Tally::default();
    for line in text.lines() {
        let Some((name, labels, value)) = parse_sample(line) else {
            continue;
        };
        if name != METRIC {
            continue;
        }
        t.metric_seen = true;
        let label = |k: &str| labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        if label("endpoint") != Some(REQUEST_JOB) {
            continue;
        }
        if label("system_id").is_some_and(|s| s != system_id) {
            continue;
        }
        if !value.is_finite() || value < 0.0 {
            continue;
        }
        let status = label("status").unwrap_or("?");
        // A status label is short and numeric in practice; keep anything else out of messages.
        let status = if status.len() <= 5 && status.bytes().all(|b| b.is_ascii_alphanumeric()) {
            status.to_owned()
        } else {
            "?".to_owned()
        };
        if status == "201" || status == "204" {
            t.successful += value;
        }
        *t.statuses.entry(status).or_default() += value;
    }
    t
}

/// A sample's label pairs, in order.
pub type Labels = Vec<(String, String)>;

/// One sample line: `name{label="value",…} value [timestamp]`. `None` for comments, blank lines
/// and anything malformed.
pub fn parse_sample(line: &str) -> Option<(&str, Labels, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line
        .find(|c: char| c == '{' || c.is_ascii_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(body) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(body)?;
        labels = parsed;
        rest = after;
    }
    let value = rest.split_ascii_whitespace().next()?;
    Some((name, labels, value.parse::<f64>().ok()?))
}

/// `a="x",b="y\"z"}` → the pairs and the text after `}`.
fn parse_labels(mut s: &str) -> Option<(Labels, &str)> {
    let mut out = Vec::new();
    loop {
        s = s.trim_start();
        if let Some(after) = s.strip_prefix('}') {
            return Some((out, after));
        }
        let eq = s.find('=')?;
        let name = s[..eq].trim();
        if name.is_empty() || name.contains([',', '"', '}']) {
            return None;
        }
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        out.push((name.to_owned(), value));
        s = s[end + 1..].trim_start();
        if let Some(after) = s.strip_prefix(',') {
            s = after;
        } else if !s.starts_with('}') {
            return None;
        }
    }
}

/// Reads the metrics page once.
pub fn scrape(agent: &ureq::Agent, url: &str) -> Result<String> {
    let resp = agent
        .get(url)
        .header("Accept", "text/plain")
        .call()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let status = resp.status().as_u16();
    if status != 200 {
        bail!("HTTP {status}");
    }
    let mut text = String::new();
    resp.into_body()
        .into_reader()
        .take(METRICS_LIMIT)
        .read_to_string(&mut text)
        .context("reading the metrics")?;
    Ok(text)
}

/// Polls `url` every `interval` until gitlab-runner shows a successful job request for
/// `system_id`, or fails after `timeout` saying what it saw.
pub fn wait_for_job_request(
    url: &str,
    system_id: &str,
    timeout: Duration,
    interval: Duration,
) -> Result<Tally> {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .max_redirects(0)
        .build()
        .new_agent();
    let deadline = Instant::now() + timeout;
    // The last scrape: its tally, or why it failed.
    let mut last: std::result::Result<Tally, String>;
    loop {
        last = scrape(&agent, url)
            .map(|text| tally(&text, system_id))
            .map_err(|e| crate::log::redact(&format!("{e:#}")));
        if let Ok(t) = &last {
            if t.successful > 0.0 {
                crate::info!(
                    "gitlab-runner polls GitLab: {METRIC}{{endpoint=\"{REQUEST_JOB}\"}} shows {} successful job request(s) (statuses: {})",
                    t.successful,
                    t.describe()
                );
                return last.map_err(anyhow::Error::msg);
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(interval.min(deadline.saturating_duration_since(Instant::now())));
    }
    let secs = timeout.as_secs_f64();
    match last {
        Err(e) => bail!(
            "gitlab-runner's metrics at {url} could not be read within {secs:.0} s ({e}); without \
             them the agent cannot confirm that gitlab-runner polls GitLab"
        ),
        Ok(t) if !t.metric_seen => bail!(
            "gitlab-runner's metrics at {url} have no {METRIC} within {secs:.0} s: gitlab-runner \
             has not sent any API request"
        ),
        Ok(t) => {
            let hint = if t.statuses.contains_key("403") {
                " (403: GitLab rejects the token in config.toml)"
            } else {
                ""
            };
            bail!(
                "gitlab-runner made no successful job request within {secs:.0} s: {METRIC} with \
                 endpoint=\"{REQUEST_JOB}\" and status 201 or 204 stayed 0 for system_id {system_id}; \
                 request_job statuses seen: {}{hint}",
                t.describe()
            )
        }
    }
}

#[cfg(test)]
mod tests;
