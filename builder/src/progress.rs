//! Progress reporting: indicatif spinners and bars on a terminal, plain lines otherwise.
//!
//! Progress goes to stderr so that `--output json` on stdout stays machine-readable.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Creates stage spinners and byte bars; decides once whether stderr is a terminal.
#[derive(Clone, Debug)]
pub struct Progress {
    tty: bool,
    quiet: bool,
}

impl Progress {
    /// Progress on stderr: fancy on a TTY, plain lines otherwise; nothing at all when `quiet`.
    pub fn new(quiet: bool) -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            quiet,
        }
    }

    /// Starts a named stage.
    pub fn stage(&self, name: &str) -> Stage {
        let bar = if self.tty && !self.quiet {
            let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            pb.set_style(
                ProgressStyle::with_template("{spinner:.cyan} {prefix:.bold} {wide_msg} {elapsed}")
                    .expect("static template"),
            );
            pb.set_prefix(name.to_string());
            pb.enable_steady_tick(Duration::from_millis(120));
            Some(pb)
        } else {
            if !self.quiet {
                eprintln!("==> {name}");
            }
            None
        };
        Stage {
            name: name.to_string(),
            bar,
            start: Instant::now(),
            quiet: self.quiet,
        }
    }

    /// A line worth reading on its own (a warning, a decision taken), unless quiet.
    pub fn note(&self, line: impl AsRef<str>) {
        if !self.quiet {
            eprintln!("    {}", line.as_ref());
        }
    }

    /// A byte-counting bar (uploads, downloads): rate and ETA on a TTY, nothing otherwise.
    pub fn bytes(&self, name: &str, total: u64) -> ProgressBar {
        if self.tty && !self.quiet {
            let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            pb.set_style(
                ProgressStyle::with_template(
                    "{prefix:.bold} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            pb.set_prefix(name.to_string());
            pb
        } else {
            ProgressBar::hidden()
        }
    }
}

/// One running stage; finish it with [`Stage::done`] (dropping it unfinished marks it failed).
pub struct Stage {
    name: String,
    bar: Option<ProgressBar>,
    start: Instant,
    quiet: bool,
}

impl Stage {
    /// Updates the stage's message.
    pub fn message(&self, msg: impl Into<String>) {
        let msg = msg.into();
        match &self.bar {
            Some(pb) => pb.set_message(msg),
            None => tracing::debug!("{}: {msg}", self.name),
        }
    }

    /// Marks the stage done with a short summary; returns its duration.
    pub fn done(mut self, summary: impl Into<String>) -> Duration {
        let took = self.start.elapsed();
        let summary = summary.into();
        if let Some(pb) = self.bar.take() {
            pb.finish_and_clear();
        }
        if !self.quiet {
            eprintln!("    {} {summary} ({:.1}s)", self.name, took.as_secs_f64());
        }
        took
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        if let Some(pb) = self.bar.take() {
            pb.abandon_with_message("failed");
        }
    }
}
