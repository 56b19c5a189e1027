//! Unit tests of the metrics check: listen addresses, the Prometheus text parser, the tally.

use super::*;

#[test]
fn listen_addresses_become_loopback_urls() {
    for (listen, url) in [
        (":9252", "http://127.0.0.1:9252/metrics"),
        ("0.0.0.0:9252", "http://127.0.0.1:9252/metrics"),
        ("[::]:9300", "http://127.0.0.1:9300/metrics"),
        ("127.0.0.1:19252", "http://127.0.0.1:19252/metrics"),
        ("[::1]:9252", "http://[::1]:9252/metrics"),
        ("localhost", "http://localhost:9252/metrics"),
        ("[::1]", "http://[::1]:9252/metrics"),
        (" :9252 ", "http://127.0.0.1:9252/metrics"),
    ] {
        assert_eq!(metrics_url(listen).unwrap(), url, "{listen:?}");
    }
    for bad in ["", "  ", ":x", ":0", ":70000", "::1:9252", "[::1", "[::1]x"] {
        assert!(metrics_url(bad).is_err(), "{bad:?}");
    }
    assert!(metrics_url("")
        .unwrap_err()
        .to_string()
        .contains("--no-poll-check"));
}

/// What gitlab-runner's `/metrics` looks like (client_golang sorts the label names).
const REAL: &str = r#"# HELP gitlab_runner_api_request_statuses_total The total number of API requests made by GitLab Runner, partitioned by runner, system_id, endpoint, status and method.
# TYPE gitlab_runner_api_request_statuses_total counter
gitlab_runner_api_request_statuses_total{endpoint="request_job",method="post",runner="abcdefghi",status="204",system_id="s_0123456789ab"} 3
gitlab_runner_api_request_statuses_total{endpoint="request_job",method="post",runner="abcdefghi",status="403",system_id="s_0123456789ab"} 1
gitlab_runner_api_request_statuses_total{endpoint="update_job",method="put",runner="abcdefghi",status="200",system_id="s_0123456789ab"} 7
gitlab_runner_api_request_statuses_total{endpoint="request_job",method="post",runner="zzzzzzzzz",status="201",system_id="s_ffffffffffff"} 5
# HELP gitlab_runner_concurrent The current value of concurrent setting
# TYPE gitlab_runner_concurrent gauge
gitlab_runner_concurrent 1
"#;

#[test]
fn tally_counts_this_managers_successful_job_requests() {
    let t = tally(REAL, "s_0123456789ab");
    assert!(t.metric_seen);
    assert_eq!(t.successful, 3.0);
    assert_eq!(t.describe(), "204×3, 403×1");
    // Another system_id's 201 does not count for this VM.
    let t = tally(REAL, "s_000000000000");
    assert_eq!(t.successful, 0.0);
    assert!(t.metric_seen);
    // gitlab-runner before 16.x had no system_id label: any request_job counts.
    let old = "gitlab_runner_api_request_statuses_total{endpoint=\"request_job\",runner=\"abc\",status=\"201\"} 1e+00\n";
    assert_eq!(tally(old, "s_x").successful, 1.0);
}

#[test]
fn only_rejections_or_nothing_are_no_proof() {
    let t = tally(
        "gitlab_runner_api_request_statuses_total{endpoint=\"request_job\",status=\"403\"} 9\n",
        "s_x",
    );
    assert_eq!((t.successful, t.describe()), (0.0, "403×9".to_owned()));
    let t = tally("gitlab_runner_concurrent 1\n", "s_x");
    assert!(!t.metric_seen);
    assert_eq!(t.describe(), "none");
    // The reset_token endpoint (the agent-like rotation by gitlab-runner) is not a job request.
    let t = tally(
        "gitlab_runner_api_request_statuses_total{endpoint=\"reset_token\",status=\"201\"} 1\n",
        "s_x",
    );
    assert_eq!(t.successful, 0.0);
}

#[test]
fn parser_handles_escapes_timestamps_and_odd_input() {
    let (n, l, v) = parse_sample(
        r#"m{a="x\"y",b="back\\slash",c="line\nbreak", d = "sp" ,} 2.5 1700000000000"#,
    )
    .unwrap();
    assert_eq!(n, "m");
    assert_eq!(v, 2.5);
    assert_eq!(
        l,
        vec![
            ("a".into(), "x\"y".into()),
            ("b".into(), "back\\slash".into()),
            ("c".into(), "line\nbreak".into()),
            ("d".into(), "sp".into()),
        ]
    );
    assert_eq!(parse_sample("plain 4").unwrap().2, 4.0);
    assert!(parse_sample("m +Inf").unwrap().2.is_infinite());
    for bad in [
        "",
        "# TYPE m counter",
        "{a=\"b\"} 1",
        "m{a=\"b\" 1",
        "m{a=\"b} 1",
        "m{a=b} 1",
        "m{=\"b\"} 1",
        "m{a=\"b\"}",
        "m{a=\"b\"} one",
        "m{a=\"b\"\"c\"} 1",
        "m{a=\"\\",
        "m{é=\"ü\"} 1 x",
        "\u{0}{\u{0}",
    ] {
        // Must not panic; most are None.
        let _ = parse_sample(bad);
    }
    assert!(parse_sample("m{a=\"b\" 1").is_none());
    assert!(parse_sample("m{a=\"b\"}").is_none());
    // Junk around a good line does not hide it.
    let page = format!("\u{0}garbage{{\n{{}}\nm{{a=\"\n{REAL}");
    assert_eq!(tally(&page, "s_0123456789ab").successful, 3.0);
    // Non-finite or negative counts are not proof.
    let t = tally(
        "gitlab_runner_api_request_statuses_total{endpoint=\"request_job\",status=\"204\"} NaN\n\
         gitlab_runner_api_request_statuses_total{endpoint=\"request_job\",status=\"201\"} -1\n",
        "s_x",
    );
    assert_eq!(t.successful, 0.0);
}

#[test]
fn odd_status_labels_stay_out_of_messages() {
    let t = tally(
        "gitlab_runner_api_request_statuses_total{endpoint=\"request_job\",status=\"glrt-abcdefghijkl\"} 1\n",
        "s_x",
    );
    assert_eq!(t.describe(), "?×1");
}

#[test]
fn nothing_listening_fails_clearly() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/metrics");
    let err = wait_for_job_request(
        &url,
        "s_x",
        Duration::from_millis(300),
        Duration::from_millis(100),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("could not be read") && err.contains(&url),
        "{err}"
    );
}
