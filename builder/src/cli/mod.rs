//! The command line: clap derive, one module per subcommand.
//!
//! Every flag carries a doc line (`help_expected`). Output for humans goes to stdout as text, or as
//! JSON with `--output json`; progress and logs go to stderr.

mod build;
mod completions;
mod deploy;
mod destroy;
mod fetch;
mod gc;
mod images;
mod inspect;
mod man;
mod publish;
mod replace;
mod rollback;
mod seed;
mod status;
mod targets;
mod test;

use clap::{Parser, Subcommand, ValueEnum};
use std::io::Write;

/// Output format for command results.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Default)]
pub enum OutputFormat {
    /// Human-readable text.
    #[default]
    Text,
    /// One JSON document on stdout.
    Json,
}

/// Flags every subcommand takes.
#[derive(clap::Args, Debug, Clone)]
pub struct Global {
    /// Result format on stdout.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// More log detail on stderr (-v debug, -vv trace).
    #[arg(long, short = 'v', global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// No progress output, only results and errors.
    #[arg(long, short = 'q', global = true)]
    pub quiet: bool,
}

impl Global {
    /// The progress reporter these flags ask for.
    pub fn progress(&self) -> crate::progress::Progress {
        crate::progress::Progress::new(self.quiet)
    }

    /// Prints a result: JSON as one document, text through `text`.
    pub fn emit<T: serde::Serialize>(
        &self,
        value: &T,
        text: impl FnOnce(&T) -> String,
    ) -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        match self.output {
            OutputFormat::Json => {
                serde_json::to_writer_pretty(&mut out, value)?;
                writeln!(out)?;
            }
            OutputFormat::Text => {
                write!(out, "{}", text(value))?;
            }
        }
        Ok(())
    }
}

/// imagectl: golden GitLab-runner images and immutable runner fleets on Proxmox VE.
#[derive(Parser, Debug)]
#[command(name = "imagectl", version, about, long_about = None, help_expected = true)]
pub struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Bake a golden qcow2 image from an image spec.
    Build(build::Args),
    /// Download every locked .deb and artifact into a directory, for a rebuild without a mirror.
    Fetch(fetch::Args),
    /// Show what is in a baked image or its manifest, and check its hygiene.
    Inspect(inspect::Args),
    /// Boot an image in QEMU and check that its services come up.
    Test(test::Args),
    /// Write a NoCloud seed ISO for a VM (for humans; deploy makes its own).
    Seed(seed::Args),
    /// Publish a baked image to Proxmox VE as a versioned template (HTTP API only).
    Publish(publish::Args),
    /// List image versions on the Proxmox cluster and how many VMs use each.
    Images(images::Args),
    /// Delete old templates that no VM uses (and, for fleets, orphans).
    ///
    /// GitLab token scopes: manage_runner (or api); read_api (or api) to list runners and find
    /// orphans; without it gc does the rest and says what it could not check.
    Gc(gc::Args),
    /// Reconcile a fleet to N healthy runner VMs of an image.
    ///
    /// GitLab token scopes: create_runner and manage_runner (or api); read_api to find a runner
    /// whose create answer was lost. Checked before anything is made (exit 2 when missing).
    Deploy(deploy::Args),
    /// Show every VM of a fleet: image, runner, GitLab status, agent state, health.
    ///
    /// GitLab token scopes: manage_runner or read_api (or api).
    Status(status::Args),
    /// Replace VMs one for one, draining their runners first.
    ///
    /// GitLab token scopes: create_runner and manage_runner (or api); read_api to find a runner
    /// whose create answer was lost.
    Replace(replace::Args),
    /// Replace every VM not on the previous (or a given) image version.
    ///
    /// GitLab token scopes: create_runner and manage_runner (or api); read_api to find a runner
    /// whose create answer was lost.
    Rollback(rollback::Args),
    /// Drain and delete a fleet: runners, VMs and seeds.
    ///
    /// GitLab token scopes: manage_runner (or api); read_api (or api) to find orphan runners;
    /// without it destroy does the rest and says what it could not check.
    Destroy(destroy::Args),
    /// Print Prometheus file_sd targets for a fleet.
    ///
    /// Needs no GitLab token.
    Targets(targets::Args),
    /// Print a shell completion script.
    Completions(completions::Args),
    /// Print the man page (roff).
    Man(man::Args),
}

/// The clap definition of the whole command line (completions, man pages, doc checks in tests).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

/// Runs the CLI; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    init_tracing(cli.global.verbose);
    // One TLS crypto provider for every client (reqwest is built without a default one), before
    // any client exists, whatever the command and its settings.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let result = match cli.command {
        Command::Build(a) => build::run(&cli.global, a),
        Command::Fetch(a) => fetch::run(&cli.global, a),
        Command::Inspect(a) => inspect::run(&cli.global, a),
        Command::Test(a) => test::run(&cli.global, a),
        Command::Seed(a) => seed::run(&cli.global, a),
        Command::Publish(a) => publish::run(&cli.global, a),
        Command::Images(a) => images::run(&cli.global, a),
        Command::Gc(a) => gc::run(&cli.global, a),
        Command::Deploy(a) => deploy::run(&cli.global, a),
        Command::Status(a) => status::run(&cli.global, a),
        Command::Replace(a) => replace::run(&cli.global, a),
        Command::Rollback(a) => rollback::run(&cli.global, a),
        Command::Destroy(a) => destroy::run(&cli.global, a),
        Command::Targets(a) => targets::run(&cli.global, a),
        Command::Completions(a) => completions::run(&cli.global, a),
        Command::Man(a) => man::run(&cli.global, a),
    };
    match result {
        Ok(code) => code,
        // stdout closed early (`imagectl … | head`): stop quietly, as other tools do.
        Err(err) if is_broken_pipe(&err) => 0,
        Err(err) => {
            eprintln!("error: {err:#}");
            crate::error::exit_code(&err)
        }
    }
}

/// True when writing stdout failed because its reader went away.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info,imagectl=debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("IMAGECTL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .with_target(false)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
