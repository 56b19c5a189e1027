//! `imagectl-agent` binary entry point: parses the command line and runs [`imagectl_agent::run`].

use clap::Parser;
use imagectl_agent::{seed::SeedSource, Options, Outcome};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// First-boot agent: registers this VM's GitLab runner from the imagectl seed.
///
/// Reads imagectl/agent.json from the seed (label `cidata`), verifies and rotates the one-time
/// runner token, writes /etc/gitlab-runner/config.toml (0600), starts gitlab-runner and writes
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
    /// seed's verify_budget_secs.
    #[arg(long, value_name = "SECS")]
    budget_secs: Option<f64>,

    /// First pause between retries in milliseconds; doubles each time up to 30 s, with jitter.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    retry_initial_ms: u64,

    /// Seconds gitlab-runner.service may take to become active.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    active_timeout_secs: u64,
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
        active_timeout: Duration::from_secs(cli.active_timeout_secs),
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
