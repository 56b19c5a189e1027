//! A client-agnostic retry policy for GitLab (and other HTTP) calls, shared by `imagectl` (reqwest)
//! and `imagectl-agent` (ureq). Standard library only: the caller does the I/O and hands over the
//! status and a header lookup; this module decides whether and how long to wait.
//!
//! * [`is_retryable`]: 408, 429 and 5xx except 501/505 are worth another attempt.
//! * [`server_wait`]: what the server asked for on a 429 or 503 — `Retry-After` (delay-seconds or an
//!   HTTP-date, RFC 9110 §10.2.3) or GitLab's `RateLimit-ResetTime` (an HTTP-date; gitlabhq
//!   `lib/gitlab/rack_attack.rb`, `throttled_response_headers`), capped at [`MAX_SERVER_WAIT`].
//! * [`Backoff`]: jittered exponential pauses inside a total time budget ([`Policy`]), never
//!   sooner than the server asked, and giving up at once when the asked wait does not fit in what is
//!   left of the budget (sleeping first and failing afterwards would only hold the caller up).
//!
//! What gitlab-runner itself does, for comparison (gitlab-org/gitlab-runner
//! `network/retry_requester.go`): it retries 408, 429, 500, 502, 503, 504 and ≥ 512 up to 5
//! attempts, backing off 100 ms → 60 s (factor 2, jitter); it prefers `RateLimit-ResetTime`
//! (parsed as RFC 1123 against the local clock) over `Retry-After` (integer seconds only). Here
//! `Retry-After` comes first because a delay in seconds does not depend on the two clocks agreeing
//! (a VM at first boot may not have synchronised its clock yet); an absolute date is measured
//! against the response's own `Date` header when there is one, and only otherwise against the
//! local clock.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The longest wait a server may ask for. Longer requests are treated as this long (and so
/// normally do not fit in a budget: the caller gives up instead of sleeping for hours).
pub const MAX_SERVER_WAIT: Duration = Duration::from_secs(3600);

/// True for statuses where another attempt may succeed: 408 Request Timeout, 429 Too Many
/// Requests and the 5xx family, except 501 Not Implemented and 505 HTTP Version Not Supported,
/// which do not go away by themselves.
pub fn is_retryable(status: u16) -> bool {
    matches!(status, 408 | 429) || ((500..600).contains(&status) && !matches!(status, 501 | 505))
}

/// True for the statuses whose `Retry-After` (and GitLab's `RateLimit-ResetTime`) this policy
/// honours: 429 (RFC 6585 §4) and 503 (RFC 9110 §15.6.4).
pub fn honours_retry_after(status: u16) -> bool {
    matches!(status, 429 | 503)
}

/// Parses an HTTP-date (RFC 9110 §5.6.7) in any of its three forms: IMF-fixdate
/// (`Sun, 06 Nov 1994 08:49:37 GMT`), obsolete RFC 850 (`Sunday, 06-Nov-94 08:49:37 GMT`) and
/// asctime (`Sun Nov  6 08:49:37 1994`). The weekday is not checked. `None` for anything else,
/// including dates before 1970.
pub fn parse_http_date(value: &str) -> Option<SystemTime> {
    let s = value.trim();
    if !s.is_ascii() {
        return None;
    }
    let (day, month, year, time) = if let Some((_, rest)) = s.split_once(", ") {
        let rest = rest.strip_suffix(" GMT")?;
        if let Some((date, time)) = rest.split_once(' ').filter(|(d, _)| d.contains('-')) {
            // RFC 850: 06-Nov-94; a two-digit year is read as 1970–2069.
            let mut p = date.split('-');
            let (d, m, y) = (p.next()?, p.next()?, p.next()?);
            if p.next().is_some() || y.len() != 2 {
                return None;
            }
            let y: i64 = digits(y)?;
            let y = if y < 70 { 2000 + y } else { 1900 + y };
            (digits(d)?, month_number(m)?, y, time)
        } else {
            // IMF-fixdate: 06 Nov 1994 08:49:37
            let mut p = rest.split(' ');
            let (d, m, y, t) = (p.next()?, p.next()?, p.next()?, p.next()?);
            if p.next().is_some() || d.len() != 2 || y.len() != 4 {
                return None;
            }
            (digits(d)?, month_number(m)?, digits(y)?, t)
        }
    } else {
        // asctime: Sun Nov  6 08:49:37 1994
        let mut p = s.split_ascii_whitespace();
        let (_, m, d, t, y) = (p.next()?, p.next()?, p.next()?, p.next()?, p.next()?);
        if p.next().is_some() || y.len() != 4 {
            return None;
        }
        (digits(d)?, month_number(m)?, digits(y)?, t)
    };
    let mut t = time.split(':');
    let (h, mi, se) = (t.next()?, t.next()?, t.next()?);
    if t.next().is_some() || h.len() != 2 || mi.len() != 2 || se.len() != 2 {
        return None;
    }
    let (h, mi, se): (i64, i64, i64) = (digits(h)?, digits(mi)?, digits(se)?);
    // 60 is allowed for a leap second and counted as the next second's start.
    if !(1..=31).contains(&day) || h > 23 || mi > 59 || se > 60 || day > days_in_month(year, month)
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days.checked_mul(86_400)? + h * 3600 + mi * 60 + se;
    let secs = u64::try_from(secs).ok()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// Parses a `Retry-After` value: delay-seconds (digits only) or an HTTP-date, the latter measured
/// from `now`. A date in the past means "now" (zero). Capped at [`MAX_SERVER_WAIT`]. `None` when
/// the value is neither.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        // Many digits overflow u64: that is "very long", not "invalid".
        let secs = v.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs).min(MAX_SERVER_WAIT));
    }
    until(parse_http_date(v)?, now)
}

/// Parses GitLab's `RateLimit-ResetTime` (an HTTP-date: gitlabhq `lib/gitlab/rack_attack.rb`
/// writes `Time#httpdate`) into the wait from `now`; zero when it is past, capped at
/// [`MAX_SERVER_WAIT`].
pub fn parse_ratelimit_reset_time(value: &str, now: SystemTime) -> Option<Duration> {
    until(parse_http_date(value)?, now)
}

/// The wait the server asked for with a response of `status`, or `None` when it asked for none
/// (or the status is not one whose `Retry-After` is honoured, see [`honours_retry_after`]).
///
/// `header` looks a response header up by name (case-insensitively, as both reqwest and ureq do).
/// `Retry-After` wins; otherwise `RateLimit-ResetTime`. An absolute date is measured from the
/// response's `Date` header when it has a valid one (server time against server time, so a wrong
/// local clock does not matter), else from `local_now`.
pub fn server_wait(
    status: u16,
    header: impl Fn(&str) -> Option<String>,
    local_now: SystemTime,
) -> Option<Duration> {
    if !honours_retry_after(status) {
        return None;
    }
    let now = header("Date")
        .and_then(|d| parse_http_date(&d))
        .unwrap_or(local_now);
    if let Some(w) = header("Retry-After").and_then(|v| parse_retry_after(&v, now)) {
        return Some(w);
    }
    header("RateLimit-ResetTime").and_then(|v| parse_ratelimit_reset_time(&v, now))
}

/// How to retry: the first pause, the longest pause, and the total time for all attempts and
/// pauses together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The pause after the first failure (before jitter); doubles after each further failure.
    pub initial: Duration,
    /// The longest exponential pause (before jitter). A server's `Retry-After` may ask for more.
    pub max: Duration,
    /// Total time from the first attempt: no pause may end at or after it.
    pub budget: Duration,
}

impl Default for Policy {
    /// 1 s first pause, 30 s longest, 10 minutes in all.
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
            budget: Duration::from_secs(600),
        }
    }
}

impl Policy {
    /// Starts the clock: call right before the first attempt.
    pub fn start(self) -> Backoff {
        Backoff::new(self)
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pause {
    /// Sleep this long, then try again.
    Wait(Duration),
    /// Stop: the budget does not allow another attempt.
    GiveUp(GiveUp),
}

/// Why [`Backoff`] gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// The next pause would end after the budget.
    BudgetSpent {
        /// Budget left when giving up.
        remaining: Duration,
    },
    /// The server asked to wait longer than what is left of the budget.
    ServerWaitTooLong {
        /// What the server asked for.
        asked: Duration,
        /// Budget left.
        remaining: Duration,
    },
}

impl fmt::Display for GiveUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GiveUp::BudgetSpent { remaining } => write!(
                f,
                "the retry time budget is used up ({:.1} s left)",
                remaining.as_secs_f64()
            ),
            GiveUp::ServerWaitTooLong { asked, remaining } => write!(
                f,
                "the server asked to wait {:.0} s (Retry-After) but only {:.1} s of the retry time \
                 budget is left",
                asked.as_secs_f64(),
                remaining.as_secs_f64()
            ),
        }
    }
}

/// The state of one retried call: when it started, how many attempts failed, and a private
/// pseudo-random sequence for jitter (so a fleet booting together does not retry in lock-step).
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: Policy,
    started: Instant,
    failures: u32,
    rng: u64,
}

impl Backoff {
    /// Starts now, with a random jitter seed.
    pub fn new(policy: Policy) -> Self {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        if let Ok(d) = SystemTime::now().duration_since(UNIX_EPOCH) {
            h.write_u128(d.as_nanos());
        }
        Self::starting_at(policy, Instant::now(), h.finish())
    }

    /// Started at `started`, with a fixed jitter `seed` (for tests and simulations).
    pub fn starting_at(policy: Policy, started: Instant, seed: u64) -> Self {
        Self {
            policy,
            started,
            failures: 0,
            rng: seed,
        }
    }

    /// The policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Failed attempts recorded so far (calls of [`next_pause`](Self::next_pause)).
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Budget left now.
    pub fn remaining(&self) -> Duration {
        self.remaining_at(Instant::now())
    }

    /// Budget left at `now`.
    pub fn remaining_at(&self, now: Instant) -> Duration {
        self.policy
            .budget
            .saturating_sub(now.saturating_duration_since(self.started))
    }

    /// A timeout for the next attempt: what is left of the budget, at most `cap`, at least `floor`
    /// (so an attempt started just before the deadline can still complete a quick exchange).
    pub fn attempt_timeout(&self, cap: Duration, floor: Duration) -> Duration {
        self.remaining().min(cap).max(floor)
    }

    /// Records a failed attempt and says how long to pause before the next one. `server_wait` is
    /// what the server asked for ([`server_wait`]); the pause is never shorter.
    pub fn next_pause(&mut self, server_wait: Option<Duration>) -> Pause {
        self.next_pause_at(Instant::now(), server_wait)
    }

    /// [`next_pause`](Self::next_pause) at a given instant.
    pub fn next_pause_at(&mut self, now: Instant, server_wait: Option<Duration>) -> Pause {
        self.failures = self.failures.saturating_add(1);
        let remaining = self.remaining_at(now);
        let exp = self.exponential();
        let jittered = self.equal_jitter(exp);
        match server_wait {
            Some(asked) => {
                let asked = asked.min(MAX_SERVER_WAIT);
                if asked >= remaining {
                    return Pause::GiveUp(GiveUp::ServerWaitTooLong { asked, remaining });
                }
                // A little spread on top of what was asked (up to 10 %, at most 1 s), so clients
                // told the same instant do not all come back in the same millisecond.
                let spread = self.uniform(asked.mul_f64(0.1).min(Duration::from_secs(1)));
                let pause = (asked + spread).max(jittered);
                Pause::Wait(if pause < remaining { pause } else { asked })
            }
            None if jittered < remaining => Pause::Wait(jittered),
            None => Pause::GiveUp(GiveUp::BudgetSpent { remaining }),
        }
    }

    /// `initial · 2^(failures-1)`, at most `max`.
    fn exponential(&self) -> Duration {
        let shift = self.failures.saturating_sub(1).min(31);
        self.policy
            .initial
            .checked_mul(1u32 << shift)
            .unwrap_or(self.policy.max)
            .min(self.policy.max)
    }

    /// "Equal jitter": uniformly in [d/2, d).
    fn equal_jitter(&mut self, d: Duration) -> Duration {
        let half = d / 2;
        half + self.uniform(d - half)
    }

    /// Uniformly in [0, d) (zero for zero).
    fn uniform(&mut self, d: Duration) -> Duration {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.next_u64() % nanos)
    }

    /// splitmix64.
    fn next_u64(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// `t - now`, zero when `t` is past, capped.
fn until(t: SystemTime, now: SystemTime) -> Option<Duration> {
    Some(
        t.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(MAX_SERVER_WAIT),
    )
}

fn digits<T: std::str::FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn month_number(m: &str) -> Option<i64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    MONTHS
        .iter()
        .position(|x| *x == m)
        .and_then(|i| i64::try_from(i + 1).ok())
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests;
