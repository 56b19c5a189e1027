//! Unit tests of the GitLab client: message extraction, TLS classification, and the retry loop
//! against a tiny scripted HTTP server (so headers such as `Retry-After` and `Date` are exact).

use super::*;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::time::Instant;

#[test]
fn message_is_extracted_and_redacted() {
    crate::log::register_secret("glrt-msg-test-SECRET");
    assert_eq!(
        message_of(r#"{"message":"403 Forbidden"}"#),
        "403 Forbidden"
    );
    assert_eq!(
        message_of(r#"{"message":"bad glrt-msg-test-SECRET"}"#),
        "bad [REDACTED]"
    );
    assert_eq!(
        message_of("<html>token glrt-msg-test-SECRET</html>"),
        "(no message)"
    );
    assert!(message_of(&format!(r#"{{"error":"{}"}}"#, "é".repeat(300))).ends_with('…'));
}

#[test]
fn certificate_failures_are_classified() {
    assert!(is_permanent_tls_failure(
        "io: invalid peer certificate: Other(OtherError(CaUsedAsEndEntity))"
    ));
    assert!(is_permanent_tls_failure(
        "io: invalid peer certificate: UnknownIssuer"
    ));
    assert!(is_permanent_tls_failure(
        "io: invalid peer certificate: NotValidForName"
    ));
    assert!(!is_permanent_tls_failure(
        "io: invalid peer certificate: Expired"
    ));
    assert!(!is_permanent_tls_failure(
        "io: invalid peer certificate: NotValidYetContext { time: .. }"
    ));
    assert!(!is_permanent_tls_failure(
        "io: Connection refused (os error 111)"
    ));
}

fn policy(budget_ms: u64) -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(50),
        max: Duration::from_secs(30),
        budget: Duration::from_millis(budget_ms),
    }
}

#[test]
fn network_errors_exhaust_the_budget() {
    // Port 9 on localhost: connection refused at once.
    let gl = Gitlab::new("http://127.0.0.1:9", None).unwrap();
    let err = gl
        .verify(&Secret::new("glrt-x"), "s_000000000000", policy(300))
        .unwrap_err();
    match err {
        CallError::Exhausted {
            attempts,
            why: GiveUp::BudgetSpent { .. },
            ..
        } => assert!(attempts >= 2, "{attempts}"),
        other => panic!("{other}"),
    }
}

/// Serves one scripted raw HTTP response per connection, in order; returns the base URL.
fn serve(responses: Vec<String>) -> (String, std::thread::JoinHandle<usize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let t = std::thread::spawn(move || {
        let mut served = 0;
        for resp in responses {
            let (mut conn, _) = l.accept().unwrap();
            let mut r = BufReader::new(conn.try_clone().unwrap());
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; len];
            std::io::Read::read_exact(&mut r, &mut body).unwrap();
            conn.write_all(resp.as_bytes()).unwrap();
            served += 1;
        }
        served
    });
    (url, t)
}

fn response(status: &str, headers: &[&str], body: &str) -> String {
    let mut s = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for h in headers {
        s.push_str(h);
        s.push_str("\r\n");
    }
    s.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s
}

const VERIFIED: &str = r#"{"id":7,"token":"glrt-x","token_expires_at":null}"#;

#[test]
fn retry_after_is_honoured_on_503() {
    let (url, t) = serve(vec![
        response("503 Service Unavailable", &["Retry-After: 1"], "{}"),
        response("200 OK", &["Content-Type: application/json"], VERIFIED),
    ]);
    let gl = Gitlab::new(&url, None).unwrap();
    let t0 = Instant::now();
    let v = gl
        .verify(&Secret::new("glrt-x"), "s_000000000000", policy(10_000))
        .unwrap();
    assert_eq!(v.id, 7);
    // The exponential pause alone would be ≤ 50 ms: the second attempt waited for Retry-After.
    assert!(t0.elapsed() >= Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_eq!(t.join().unwrap(), 2);
}

#[test]
fn a_wait_longer_than_the_budget_gives_up_at_once() {
    let (url, t) = serve(vec![response(
        "429 Too Many Requests",
        &["Content-Type: text/plain", "Retry-After: 30"],
        "Retry later\n",
    )]);
    let gl = Gitlab::new(&url, None).unwrap();
    let t0 = Instant::now();
    let err = gl
        .verify(&Secret::new("glrt-x"), "s_000000000000", policy(2000))
        .unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    let text = err.to_string();
    assert!(
        text.contains("HTTP 429 (Retry-After 30 s)") && text.contains("asked to wait 30 s"),
        "{text}"
    );
    assert!(matches!(
        err,
        CallError::Exhausted {
            attempts: 1,
            why: GiveUp::ServerWaitTooLong { .. },
            ..
        }
    ));
    assert_eq!(t.join().unwrap(), 1);
}

#[test]
fn rotation_keeps_the_servers_date() {
    let rotated = r#"{"token":"glrt-rotated-unit-SECRET","token_expires_at":null}"#;
    let (url, t) = serve(vec![
        response(
            "201 Created",
            &["Date: Sun, 06 Nov 1994 08:49:37 GMT"],
            rotated,
        ),
        response("201 Created", &[], rotated),
        response("201 Created", &["Date: not a date"], rotated),
    ]);
    let gl = Gitlab::new(&url, None).unwrap();
    let r = gl
        .rotate(&Secret::new("glrt-x"), "s_000000000000", policy(5000))
        .unwrap();
    assert_eq!(
        r.server_date,
        Some(std::time::UNIX_EPOCH + Duration::from_secs(784_111_777))
    );
    assert_eq!(r.token.expose(), "glrt-rotated-unit-SECRET");
    // The new token is registered for redaction as soon as it is known.
    assert_eq!(
        crate::log::redact("x glrt-rotated-unit-SECRET"),
        "x [REDACTED]"
    );
    let r = gl
        .rotate(&Secret::new("glrt-x"), "s_000000000000", policy(5000))
        .unwrap();
    assert_eq!(r.server_date, None);
    let r = gl
        .rotate(&Secret::new("glrt-x"), "s_000000000000", policy(5000))
        .unwrap();
    assert_eq!(r.server_date, None);
    assert_eq!(t.join().unwrap(), 3);
}

#[test]
fn final_statuses_are_not_retried() {
    let (url, t) = serve(vec![response(
        "501 Not Implemented",
        &[],
        r#"{"message":"nope"}"#,
    )]);
    let gl = Gitlab::new(&url, None).unwrap();
    let err = gl
        .verify(&Secret::new("glrt-x"), "s_000000000000", policy(5000))
        .unwrap_err();
    assert!(
        matches!(err, CallError::Final { status: 501, ref message } if message == "nope"),
        "{err}"
    );
    assert_eq!(t.join().unwrap(), 1);
}
