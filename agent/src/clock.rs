//! `token_obtained_at`: when the rotated token was obtained, without trusting an unsynchronised
//! guest clock.
//!
//! gitlab-runner rotates an expiring token at `token_obtained_at + 0.75 × (token_expires_at −
//! token_obtained_at)` (gitlab-org/gitlab-runner `commands/multi.go` `nextRunnerToReset`,
//! `common/consts.go` `TokenResetIntervalFactor = 0.75`). A freshly cloned VM may boot with a clock
//! that is days off until NTP catches up, and a `token_obtained_at` in the future would postpone
//! the rotation past the expiry. So, in this order:
//!
//! 1. **GitLab's answer**: the `Date` header of the `reset_authentication_token` response, GitLab's
//!    own clock at the moment it issued the token (second precision, as `register` writes it).
//! 2. Without a usable `Date`: the local clock if it is synchronised — systemd-timesyncd's
//!    `/run/systemd/timesync/synchronized`, or (on the real root) `timedatectl`'s
//!    `NTPSynchronized=yes`, which reports the kernel's NTP status whichever daemon set it.
//! 3. Otherwise `0001-01-01T00:00:00Z` ("unknown") — and, when the token expires, the agent then
//!    waits (bounded) for the clock to synchronise and rewrites the value as the synchronised time
//!    minus the time elapsed since the rotation (measured on the monotonic clock). The wait comes
//!    *after* config.toml is committed, so it never widens the window in which the rotated token
//!    exists only in memory. If the clock never synchronises, "unknown" stays: gitlab-runner then
//!    computes a rotation time in the distant past and rotates at its first chance, stamping the
//!    new token with its own clock — safe, where a wrong date would not be. A token without expiry
//!    never needs the value (gitlab-runner skips it), so nothing waits for it.

use crate::paths::Paths;
use anyhow::{Context, Result};
use std::time::{Duration, Instant, SystemTime};
use toml::value::Datetime;

/// Where `token_obtained_at` came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The `Date` header of GitLab's rotation response.
    GitlabDate,
    /// The local clock, synchronised.
    SyncedClock,
    /// Unknown: written as `0001-01-01T00:00:00Z`.
    Unknown,
}

/// The value for config.toml and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Obtained {
    /// The TOML datetime.
    pub at: Datetime,
    /// Its source.
    pub source: Source,
}

/// The local clock (injectable for tests).
pub type LocalClock = fn() -> SystemTime;

/// `token_obtained_at` right after the rotation, without waiting: GitLab's `Date` if the response
/// had one, else the local clock if `synced`, else unknown.
pub fn token_obtained_at(
    server_date: Option<SystemTime>,
    local: LocalClock,
    synced: bool,
) -> Result<Obtained> {
    if let Some(date) = server_date {
        let skew = match local().duration_since(date) {
            Ok(ahead) => ahead.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        };
        // The Date is whole seconds and the response took a moment: ignore small differences.
        if skew.abs() > 60.0 {
            crate::warn!(
                "the local clock is {skew:+.0} s off GitLab's; token_obtained_at is GitLab's Date"
            );
        }
        return Ok(Obtained {
            at: to_datetime(date)?,
            source: Source::GitlabDate,
        });
    }
    if synced {
        return Ok(Obtained {
            at: to_datetime(local())?,
            source: Source::SyncedClock,
        });
    }
    Ok(Obtained {
        at: crate::config::datetime(None)?,
        source: Source::Unknown,
    })
}

/// Waits up to `wait` for the local clock to synchronise; then returns the synchronised time of
/// `rotated_at` (an instant on the monotonic clock), or `None` if it did not synchronise.
pub fn wait_for_sync(
    wait: Duration,
    local: LocalClock,
    mut synced: impl FnMut() -> bool,
    rotated_at: Instant,
) -> Result<Option<Datetime>> {
    let deadline = Instant::now() + wait;
    crate::info!(
        "GitLab's answer had no Date header and the clock is not synchronised; waiting up to {} s for it",
        wait.as_secs()
    );
    loop {
        if synced() {
            let at = local()
                .checked_sub(rotated_at.elapsed())
                .context("the synchronised clock is before 1970")?;
            return to_datetime(at).map(Some);
        }
        if Instant::now() >= deadline {
            crate::warn!(
                "the clock did not synchronise: token_obtained_at stays unknown ({}), so \
                 gitlab-runner rotates the expiring token at its first chance",
                crate::config::NO_EXPIRY
            );
            return Ok(None);
        }
        std::thread::sleep(
            Duration::from_millis(500).min(deadline.saturating_duration_since(Instant::now())),
        );
    }
}

/// True when the local clock is synchronised: timesyncd's marker under the agent's root, or, when
/// the root is `/`, `timedatectl show --property=NTPSynchronized --value` saying `yes`.
pub fn clock_synced(paths: &Paths) -> bool {
    if paths.timesync_marker.exists() {
        return true;
    }
    if paths.root != std::path::Path::new("/") {
        return false;
    }
    crate::sys::output(
        "timedatectl",
        &["show", "--property=NTPSynchronized", "--value"],
    )
    .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == "yes")
    .unwrap_or(false)
}

/// A TOML datetime (UTC, whole seconds) for `t`.
pub fn to_datetime(t: SystemTime) -> Result<Datetime> {
    let t = time::OffsetDateTime::from(t);
    let text = t
        .replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .context("formatting a timestamp")?;
    crate::config::datetime(Some(&text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn year_2001() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(978_307_200)
    }

    #[test]
    fn gitlabs_date_wins_over_a_wrong_local_clock() {
        let date = UNIX_EPOCH + Duration::from_secs(1_780_000_000);
        for synced in [true, false] {
            let o = token_obtained_at(Some(date), year_2001, synced).unwrap();
            assert_eq!(o.source, Source::GitlabDate);
            assert_eq!(o.at.to_string(), "2026-05-28T20:26:40Z");
        }
    }

    #[test]
    fn without_a_date_only_a_synced_clock_is_used() {
        let o = token_obtained_at(None, year_2001, true).unwrap();
        assert_eq!(o.source, Source::SyncedClock);
        assert_eq!(o.at.to_string(), "2001-01-01T00:00:00Z");
        let o = token_obtained_at(None, year_2001, false).unwrap();
        assert_eq!(o.source, Source::Unknown);
        assert_eq!(o.at.to_string(), crate::config::NO_EXPIRY);
    }

    #[test]
    fn waiting_for_sync_dates_the_rotation_not_the_end_of_the_wait() {
        // Rotated 3 s ago (monotonic); the clock synchronises on the third look.
        let rotated_at = Instant::now() - Duration::from_secs(3);
        let mut looks = 0;
        let at = wait_for_sync(
            Duration::from_secs(5),
            year_2001,
            || {
                looks += 1;
                looks >= 3
            },
            rotated_at,
        )
        .unwrap()
        .unwrap();
        assert_eq!(looks, 3);
        // 2001-01-01T00:00:00Z minus the ~4 s since the rotation.
        let t = time::OffsetDateTime::parse(
            &at.to_string(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        let back = 978_307_200 - t.unix_timestamp();
        assert!(
            (3..=6).contains(&back),
            "{at} is {back} s before the local now"
        );
        // Never synchronises: bounded wait, then None (the value stays unknown).
        let t0 = Instant::now();
        let r = wait_for_sync(
            Duration::from_millis(600),
            year_2001,
            || false,
            Instant::now(),
        );
        assert!(r.unwrap().is_none());
        assert!(t0.elapsed() >= Duration::from_millis(600));
    }

    #[test]
    fn timesync_marker_under_the_root_counts() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        assert!(!clock_synced(&paths));
        std::fs::create_dir_all(paths.timesync_marker.parent().unwrap()).unwrap();
        std::fs::write(&paths.timesync_marker, "").unwrap();
        assert!(clock_synced(&paths));
    }
}
