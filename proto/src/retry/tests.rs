//! Unit tests of the retry policy: header parsing, retryable statuses and the backoff's decisions.

use super::*;

fn at(unix: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix)
}

/// 1994-11-06T08:49:37Z, the example of RFC 9110 §5.6.7.
const RFC_EXAMPLE: u64 = 784_111_777;

#[test]
fn http_dates_in_all_three_forms() {
    for s in [
        "Sun, 06 Nov 1994 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37 GMT",
        "Sun Nov  6 08:49:37 1994",
        "  Sun, 06 Nov 1994 08:49:37 GMT  ",
    ] {
        assert_eq!(parse_http_date(s), Some(at(RFC_EXAMPLE)), "{s:?}");
    }
    // Leap years and the end of a year.
    assert_eq!(
        parse_http_date("Thu, 29 Feb 2024 00:00:00 GMT"),
        Some(at(1_709_164_800))
    );
    assert_eq!(
        parse_http_date("Thu, 31 Dec 2099 23:59:59 GMT"),
        Some(at(4_102_444_799))
    );
    // RFC 850 two-digit years: 00–69 are 20xx.
    assert_eq!(
        parse_http_date("Saturday, 01-Jan-00 00:00:00 GMT"),
        Some(at(946_684_800))
    );
}

#[test]
fn bad_http_dates_are_none_and_never_panic() {
    for s in [
        "",
        "GMT",
        ", GMT",
        "Sun, 06 Nov 1994 08:49:37",
        "Sun, 06 Nov 1994 08:49:37 UTC",
        "Sun, 6 Nov 1994 08:49:37 GMT",
        "Sun, 06 Foo 1994 08:49:37 GMT",
        "Sun, 31 Feb 2023 08:49:37 GMT",
        "Sun, 29 Feb 2023 08:49:37 GMT",
        "Sun, 06 Nov 1994 24:00:00 GMT",
        "Sun, 06 Nov 1994 8:49:37 GMT",
        "Sun, 06 Nov 1994 08:49 GMT",
        "Sun, 06 Nov 1969 08:49:37 GMT",
        "Sun, 06 Nov +994 08:49:37 GMT",
        "Sun, 06-Nov-1994 08:49:37 GMT",
        "Sun, ０6 Nov 1994 08:49:37 GMT",
        "Sun Nov  6 08:49:37",
        "Sun Nov  6 08:49:37 1994 extra",
        "Sun, 06 Nov 1994 08:49:37 GMT GMT",
        "99999999999999999999",
        "\u{0}",
    ] {
        assert_eq!(parse_http_date(s), None, "{s:?}");
    }
}

#[test]
fn retry_after_seconds_and_dates() {
    let now = at(RFC_EXAMPLE);
    assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
    assert_eq!(
        parse_retry_after(" 120 ", now),
        Some(Duration::from_secs(120))
    );
    assert_eq!(parse_retry_after("0", now), Some(Duration::ZERO));
    assert_eq!(
        parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now),
        Some(Duration::from_secs(30))
    );
    // A date in the past: retry now.
    assert_eq!(
        parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
        Some(Duration::ZERO)
    );
    // Capped, also when the number does not fit in u64.
    assert_eq!(parse_retry_after("86400", now), Some(MAX_SERVER_WAIT));
    assert_eq!(
        parse_retry_after("99999999999999999999999", now),
        Some(MAX_SERVER_WAIT)
    );
    for bad in ["", "-1", "1.5", "soon", "2s", "+2"] {
        assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
    }
}

#[test]
fn ratelimit_reset_time_is_an_http_date() {
    let now = at(RFC_EXAMPLE);
    assert_eq!(
        parse_ratelimit_reset_time("Sun, 06 Nov 1994 08:49:39 GMT", now),
        Some(Duration::from_secs(2))
    );
    assert_eq!(parse_ratelimit_reset_time("2", now), None);
}

#[test]
fn retryable_statuses() {
    for s in [408, 429, 500, 502, 503, 504, 507, 520, 599] {
        assert!(is_retryable(s), "{s}");
    }
    for s in [
        200, 201, 204, 301, 400, 401, 403, 404, 409, 410, 422, 501, 505, 600,
    ] {
        assert!(!is_retryable(s), "{s}");
    }
    assert!(honours_retry_after(429) && honours_retry_after(503));
    assert!(!honours_retry_after(500) && !honours_retry_after(502));
}

fn headers<'a>(list: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
    move |name| {
        list.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| (*v).to_owned())
    }
}

#[test]
fn server_wait_prefers_retry_after_and_uses_the_servers_date() {
    let local = at(RFC_EXAMPLE);
    // GitLab's Rack::Attack answer: both headers.
    let h = [
        ("retry-after", "2"),
        ("ratelimit-resettime", "Sun, 06 Nov 1994 08:50:37 GMT"),
    ];
    assert_eq!(
        server_wait(429, headers(&h), local),
        Some(Duration::from_secs(2))
    );
    // Only the reset time: measured against the response's Date, not the (wrong) local clock.
    let h = [
        ("Date", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ("RateLimit-ResetTime", "Sun, 06 Nov 1994 08:49:42 GMT"),
    ];
    let local_way_behind = at(RFC_EXAMPLE - 86_400 * 365);
    assert_eq!(
        server_wait(429, headers(&h), local_way_behind),
        Some(Duration::from_secs(5))
    );
    // Without a Date header, the local clock.
    let h = [("RateLimit-ResetTime", "Sun, 06 Nov 1994 08:49:42 GMT")];
    assert_eq!(
        server_wait(503, headers(&h), local),
        Some(Duration::from_secs(5))
    );
    // An unparsable Retry-After falls back to the reset time; nothing usable is None.
    let h = [
        ("Retry-After", "later"),
        ("RateLimit-ResetTime", "Sun, 06 Nov 1994 08:49:40 GMT"),
    ];
    assert_eq!(
        server_wait(429, headers(&h), local),
        Some(Duration::from_secs(3))
    );
    assert_eq!(
        server_wait(429, headers(&[("Retry-After", "later")]), local),
        None
    );
    // Statuses whose Retry-After is not honoured.
    assert_eq!(
        server_wait(500, headers(&[("Retry-After", "2")]), local),
        None
    );
}

fn policy(initial_ms: u64, max_ms: u64, budget_ms: u64) -> Policy {
    Policy {
        initial: Duration::from_millis(initial_ms),
        max: Duration::from_millis(max_ms),
        budget: Duration::from_millis(budget_ms),
    }
}

#[test]
fn exponential_pauses_are_jittered_and_capped() {
    let t0 = Instant::now();
    for seed in 0..200 {
        let mut b = Backoff::starting_at(policy(100, 800, 1_000_000), t0, seed);
        let expected = [100, 200, 400, 800, 800, 800];
        for (i, base) in expected.iter().enumerate() {
            let Pause::Wait(p) = b.next_pause_at(t0, None) else {
                panic!("gave up with budget left");
            };
            let base = Duration::from_millis(*base);
            assert!(
                p >= base / 2 && p < base,
                "seed {seed}, failure {i}: {p:?} vs {base:?}"
            );
        }
        assert_eq!(b.failures(), 6);
    }
    // Different seeds give different pauses.
    let pauses: std::collections::BTreeSet<_> = (0..20)
        .map(|s| Backoff::starting_at(policy(1000, 1000, 10_000), t0, s).next_pause_at(t0, None))
        .map(|p| format!("{p:?}"))
        .collect();
    assert!(pauses.len() > 10, "{pauses:?}");
}

#[test]
fn gives_up_when_the_pause_does_not_fit() {
    let t0 = Instant::now();
    let mut b = Backoff::starting_at(policy(100, 100, 1000), t0, 7);
    assert!(matches!(b.next_pause_at(t0, None), Pause::Wait(_)));
    // 960 ms into a 1 s budget, a pause of at least 50 ms does not fit.
    let late = t0 + Duration::from_millis(960);
    assert_eq!(
        b.next_pause_at(late, None),
        Pause::GiveUp(GiveUp::BudgetSpent {
            remaining: Duration::from_millis(40)
        })
    );
    // After the deadline, nothing fits.
    let after = t0 + Duration::from_secs(5);
    assert!(matches!(
        b.next_pause_at(after, None),
        Pause::GiveUp(GiveUp::BudgetSpent { remaining }) if remaining.is_zero()
    ));
}

#[test]
fn server_wait_is_a_floor_and_must_fit_the_budget() {
    let t0 = Instant::now();
    for seed in 0..100 {
        let mut b = Backoff::starting_at(policy(20, 30_000, 10_000), t0, seed);
        let Pause::Wait(p) = b.next_pause_at(t0, Some(Duration::from_secs(2))) else {
            panic!("2 s fits in 10 s");
        };
        // Never sooner than asked; a little spread (≤ 10 %, ≤ 1 s) on top.
        assert!(
            p >= Duration::from_secs(2) && p <= Duration::from_millis(2200),
            "{p:?}"
        );
    }
    // The exponential pause wins when it is longer than what was asked.
    let mut b = Backoff::starting_at(policy(4000, 30_000, 60_000), t0, 1);
    let Pause::Wait(p) = b.next_pause_at(t0, Some(Duration::ZERO)) else {
        panic!()
    };
    assert!(p >= Duration::from_secs(2), "{p:?}");
    // Asked for more than is left: give up at once, saying so.
    let mut b = Backoff::starting_at(policy(20, 30_000, 1500), t0, 1);
    let g = b.next_pause_at(t0, Some(Duration::from_secs(2)));
    assert_eq!(
        g,
        Pause::GiveUp(GiveUp::ServerWaitTooLong {
            asked: Duration::from_secs(2),
            remaining: Duration::from_millis(1500)
        })
    );
    let Pause::GiveUp(g) = g else { unreachable!() };
    assert!(g.to_string().contains("asked to wait 2 s"), "{g}");
    // When asked + spread would not fit but asked alone does, exactly what was asked.
    let mut b = Backoff::starting_at(policy(20, 30_000, 2001), t0, 3);
    assert_eq!(
        b.next_pause_at(t0, Some(Duration::from_secs(2))),
        Pause::Wait(Duration::from_secs(2))
    );
    // Absurd requests are capped before comparing.
    let mut b = Backoff::starting_at(policy(20, 30_000, 600_000), t0, 3);
    assert!(matches!(
        b.next_pause_at(t0, Some(Duration::from_secs(1 << 40))),
        Pause::GiveUp(GiveUp::ServerWaitTooLong { asked, .. }) if asked == MAX_SERVER_WAIT
    ));
}

#[test]
fn extreme_policies_do_not_panic() {
    let t0 = Instant::now();
    let mut b = Backoff::starting_at(policy(0, 0, 0), t0, 0);
    assert!(matches!(b.next_pause_at(t0, None), Pause::GiveUp(_)));
    let huge = Policy {
        initial: Duration::MAX,
        max: Duration::MAX,
        budget: Duration::MAX,
    };
    let mut b = Backoff::starting_at(huge, t0, u64::MAX);
    for _ in 0..40 {
        let _ = b.next_pause_at(t0, Some(Duration::MAX));
        let _ = b.next_pause_at(t0, None);
    }
    assert!(
        b.attempt_timeout(Duration::from_secs(30), Duration::from_secs(1))
            <= Duration::from_secs(30)
    );
    let b = Policy::default().start();
    let t = b.attempt_timeout(Duration::from_secs(30), Duration::from_secs(1));
    assert!(t <= Duration::from_secs(30) && t >= Duration::from_secs(1));
}
