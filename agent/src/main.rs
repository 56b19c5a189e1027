//! `imagectl-agent` binary entry point: parses the command line and runs [`imagectl_agent::run`].

use clap::Parser;
use imagectl_agent::{seed::SeedSource, Options, Outcome};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// First-boot agent: registers this VM's GitLab runner from the imagectl seed.
///
/// Reads imagectl/agent.json from the seed (label `cidata`), verifies and rotates the one-time
/// runner token, writes /etc/gitlab-runner/config.toml (0600), starts gitlab-runner, waits until
/// gitlab-runner's metrics show a successful job request, and writes
/// /var/lib/imagectl/status.json. Does nothing once /var/lib/imagectl/registered exists.
#[derive(Debug, Parser)]
#[command(name = "imagectl-agent", version, help_expected = true)]
struct Cli {
    /// Resolve every absolute path the agent writes or reads (/etc, /var/lib, /run) under DIR.
    #[arg(long, value_name = "DIR", default_value = "/")]
    root: PathBuf,

    /// Read imagectl/agent.json from DIR instead of mounting the seed device.
    #[arg(long, value_name = "DIR", conflicts_with = "seed_device")]
    seed_dir: Option<PathBuf>,

    /// Mount this device instead of /dev/disk/by-label/cidata.
    #[arg(long, value_name = "PATH")]
    seed_device: Option<PathBuf>,

    /// Seconds to wait for the seed device to appear.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    seed_wait_secs: u64,

    /// Do not run systemctl (do not start gitlab-runner); for tests.
    #[arg(long)]
    no_systemctl: bool,

    /// Time budget in seconds for retrying verify (and, separately, the rotation); overrides the
    /// seed's verify_budget_secs. A 429/503 whose Retry-After does not fit in it ends the retries.
    #[arg(long, value_name = "SECS")]
    budget_secs: Option<f64>,

    /// First pause between retries in milliseconds; doubles each time up to --retry-max-secs,
    /// with jitter (never shorter than GitLab's Retry-After).
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    retry_initial_ms: u64,

    /// Longest exponential pause between retries, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    retry_max_secs: u64,

    /// Seconds gitlab-runner.service may take to become active.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    active_timeout_secs: u64,

    /// Seconds gitlab-runner may take to make its first successful job request (seen in its
    /// metrics on the seed's metrics_listen) before the agent reports failure.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    runner_poll_timeout_secs: u64,

    /// Do not wait for gitlab-runner's first successful job request before reporting
    /// `registered`; for tests and manual runs without gitlab-runner.
    #[arg(long, conflicts_with = "runner_poll_timeout_secs")]
    no_poll_check: bool,

    /// Read gitlab-runner's metrics at this http://127.0.0.1:PORT/metrics URL instead of the
    /// seed's metrics_listen (test harnesses that run several runners on one host).
    #[arg(long, value_name = "URL", value_parser = loopback_metrics_url)]
    runner_metrics_url: Option<String>,

    /// Seconds to wait for the clock to synchronise when GitLab's answer carries no Date header
    /// and the token expires (token_obtained_at must not come from an unsynchronised clock).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    time_sync_wait_secs: u64,
}

/// `--runner-metrics-url`: plain http on loopback only (the metrics never leave the VM).
fn loopback_metrics_url(v: &str) -> Result<String, String> {
    let rest = v
        .strip_prefix("http://127.0.0.1:")
        .ok_or_else(|| format!("{v:?}: use http://127.0.0.1:PORT/metrics"))?;
    let (port, path) = rest.split_once('/').unwrap_or((rest, ""));
    match port.parse::<u16>() {
        Ok(p) if p > 0 && path == "metrics" => Ok(v.to_string()),
        _ => Err(format!("{v:?}: use http://127.0.0.1:PORT/metrics")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let opts = Options {
        root: cli.root,
        seed: match cli.seed_dir {
            Some(d) => SeedSource::Dir(d),
            None => SeedSource::Device(cli.seed_device),
        },
        seed_wait: Duration::from_secs(cli.seed_wait_secs),
        systemctl: !cli.no_systemctl,
        budget: cli
            .budget_secs
            .map(|s| Duration::from_secs_f64(s.clamp(0.0, 86_400.0))),
        initial_backoff: Duration::from_millis(cli.retry_initial_ms),
        max_backoff: Duration::from_secs(cli.retry_max_secs),
        active_timeout: Duration::from_secs(cli.active_timeout_secs),
        runner_poll: (!cli.no_poll_check)
            .then(|| Duration::from_secs(cli.runner_poll_timeout_secs)),
        metrics_url: cli.runner_metrics_url,
        time_sync_wait: Duration::from_secs(cli.time_sync_wait_secs),
        local_clock: std::time::SystemTime::now,
    };
    match imagectl_agent::run(&opts) {
        Ok(Outcome::AlreadyRegistered) => ExitCode::SUCCESS,
        Ok(Outcome::Registered {
            runner_id,
            system_id,
            recovered,
        }) => {
            let how = if recovered { " (recovered)" } else { "" };
            imagectl_agent::info!("runner {runner_id} registered as manager {system_id}{how}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            imagectl_agent::error!("registration failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
