//! Child processes (`mount`, `umount`, `systemctl`) and `/proc/uptime`.
//!
//! Children run with a cleared environment plus a fixed `PATH` and `LC_ALL=C`, so nothing the agent
//! holds (it keeps no secret in its environment anyway) can leak into them, and no secret ever goes
//! into their arguments.

use anyhow::{bail, Context, Result};
use std::process::{Command, Stdio};

/// `PATH` given to children.
pub const CHILD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs `prog args…`, returning its stdout; fails with its (redacted) stderr when it exits non-zero.
pub fn run(prog: &str, args: &[&str]) -> Result<String> {
    let out = output(prog, args)?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "`{prog} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            crate::log::redact(stderr.trim())
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `prog args…` and returns its output whatever the exit status.
pub fn output(prog: &str, args: &[&str]) -> Result<std::process::Output> {
    Command::new(prog)
        .args(args)
        .env_clear()
        .env("PATH", CHILD_PATH)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {prog}"))
}

/// Seconds since boot from `/proc/uptime`, when readable.
pub fn uptime() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/uptime").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_get_a_clean_environment() {
        std::env::set_var("IMAGECTL_AGENT_TEST_LEAK", "leak-me");
        let out = run("env", &[]).unwrap();
        assert!(!out.contains("leak-me"), "{out}");
        assert!(out.contains("PATH=/usr/local/sbin"), "{out}");
    }

    #[test]
    fn failures_carry_stderr() {
        let err = run("sh", &["-c", "echo boom >&2; exit 3"]).unwrap_err();
        assert!(format!("{err:#}").contains("boom"));
    }

    #[test]
    fn uptime_is_positive() {
        assert!(uptime().unwrap() > 0.0);
    }
}
