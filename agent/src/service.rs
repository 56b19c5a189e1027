//! Starting gitlab-runner through systemd and confirming it stays up.

use crate::sys;
use anyhow::{bail, Result};
use std::time::{Duration, Instant};

/// The unit the agent starts.
pub const RUNNER_UNIT: &str = "gitlab-runner.service";

/// `systemctl enable` + `restart` (restart, not `--now`: a runner the package already started must
/// re-read the new config.toml), then waits up to `timeout` for `is-active` to say `active` twice in
/// a row one second apart, so a unit that crashes right after starting is not taken for healthy.
pub fn start_runner(timeout: Duration) -> Result<()> {
    sys::run("systemctl", &["--no-ask-password", "enable", RUNNER_UNIT])?;
    sys::run("systemctl", &["--no-ask-password", "restart", RUNNER_UNIT])?;
    let deadline = Instant::now() + timeout;
    let mut seen_active = false;
    let last = loop {
        let out = sys::output("systemctl", &["is-active", RUNNER_UNIT])?;
        let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if state == "active" {
            if seen_active {
                return Ok(());
            }
            seen_active = true;
        } else {
            seen_active = false;
        }
        if Instant::now() >= deadline {
            break state;
        }
        std::thread::sleep(if seen_active {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(250)
        });
    };
    bail!(
        "{RUNNER_UNIT} is not active after {} s (systemctl is-active: {last:?}); see `journalctl -u {RUNNER_UNIT}`",
        timeout.as_secs()
    )
}
