//! `monitoring/`: alert rules, scrape configuration, file_sd contract, Grafana dashboard, and the
//! textfile metrics the image exports.
//!
//! - `promtool check rules` / `promtool test rules` pass, and each alert's unit test really
//!   depends on that alert (disabling its expression makes `promtool test rules` fail).
//! - Every alert has a severity, a summary and a `runbook_url` whose anchor exists in
//!   `docs/runbook.md`.
//! - `scrape.example.yml` with `targets.example.json` passes `promtool check config` (which also
//!   validates file_sd files).
//! - The dashboard is well-formed Grafana JSON, has the panels the team needs, and every PromQL
//!   expression in it compiles (through `promtool check rules`) and queries only known metrics.
//! - A real node_exporter reads the agent's textfile (written by the agent's own code) and the
//!   image textfile documented in `monitoring/README`, and exposes every node metric the rules
//!   and the dashboard use.

use crate::support::workspace;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

const ALERTS: [&str; 5] = [
    "RunnerDown",
    "HighDiskUsage",
    "JobQueueBacklog",
    "ImagectlAgentFailed",
    "RunnerImageStale",
];

/// Metric names the rules and the dashboard may query: what node_exporter (Debian's 1.5),
/// cAdvisor, gitlab-runner and Prometheus itself export, and imagectl's own textfile metrics.
const KNOWN_METRICS: &[&str] = &[
    // Prometheus, per target.
    "up",
    // node_exporter.
    "node_cpu_seconds_total",
    "node_memory_MemAvailable_bytes",
    "node_memory_MemTotal_bytes",
    "node_filesystem_avail_bytes",
    "node_filesystem_size_bytes",
    "node_network_receive_bytes_total",
    "node_network_transmit_bytes_total",
    "node_boot_time_seconds",
    "node_time_seconds",
    // cAdvisor.
    "container_cpu_usage_seconds_total",
    "container_memory_working_set_bytes",
    "container_last_seen",
    // gitlab-runner (:9252).
    "gitlab_runner_jobs",
    "gitlab_runner_concurrent",
    "gitlab_runner_api_request_statuses_total",
    "gitlab_runner_errors_total",
    // imagectl: the agent's textfile (agent/src/status.rs) and the image's (monitoring/README).
    "imagectl_agent_registered",
    "imagectl_agent_last_run_timestamp_seconds",
    "imagectl_image_info",
    "imagectl_image_build_timestamp_seconds",
];

fn mon() -> PathBuf {
    workspace().join("monitoring")
}

fn rules_path() -> PathBuf {
    mon().join("prometheus/alerts/imagectl.rules.yml")
}

fn promtool(args: &[&str], dir: &Path) -> Output {
    Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running promtool (Debian package `prometheus`; tools/setup-host.sh installs it)")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn load_yaml(path: &Path) -> Value {
    let s = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&s).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The rules of every group.
fn rules() -> Vec<Value> {
    let doc = load_yaml(&rules_path());
    doc["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").clone())
        .collect()
}

#[test]
fn promtool_accepts_the_rules_and_their_unit_tests_pass() {
    let dir = mon().join("prometheus/alerts");
    let check = promtool(&["check", "rules", "imagectl.rules.yml"], &dir);
    assert!(check.status.success(), "{}", text(&check));
    assert!(
        text(&check).contains("SUCCESS: 5 rules found"),
        "{}",
        text(&check)
    );
    let test = promtool(&["test", "rules", "imagectl.rules.test.yml"], &dir);
    assert!(test.status.success(), "{}", text(&test));
}

#[test]
fn each_alert_is_proven_by_the_unit_tests() {
    let tests = load_yaml(&mon().join("prometheus/alerts/imagectl.rules.test.yml"));
    let original = load_yaml(&rules_path());
    for alert in ALERTS {
        // The test file expects the alert to fire somewhere, not only to stay quiet.
        let fires = tests["tests"].as_array().expect("tests").iter().any(|t| {
            t["alert_rule_test"].as_array().is_some_and(|cases| {
                cases.iter().any(|c| {
                    c["alertname"] == alert
                        && c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty())
                })
            })
        });
        assert!(fires, "no unit test expects {alert} to fire");

        // With the alert's expression disabled, the unit tests must fail on that alert.
        let d = tempfile::tempdir().expect("tempdir");
        let mut mutated = original.clone();
        for group in mutated["groups"].as_array_mut().expect("groups") {
            for rule in group["rules"].as_array_mut().expect("rules") {
                if rule["alert"] == alert {
                    rule["expr"] = Value::String("vector(1) == 0".into());
                }
            }
        }
        std::fs::write(
            d.path().join("imagectl.rules.yml"),
            serde_yaml::to_string(&mutated).expect("yaml"),
        )
        .expect("write rules");
        std::fs::copy(
            mon().join("prometheus/alerts/imagectl.rules.test.yml"),
            d.path().join("imagectl.rules.test.yml"),
        )
        .expect("copy tests");
        let out = promtool(&["test", "rules", "imagectl.rules.test.yml"], d.path());
        assert!(
            !out.status.success(),
            "unit tests still pass with {alert} disabled"
        );
        assert!(
            text(&out).contains(&format!("alertname: {alert}")),
            "{alert}: {}",
            text(&out)
        );
    }
}

#[test]
fn every_alert_has_severity_summary_and_a_runbook_anchor_that_exists() {
    let runbook = std::fs::read_to_string(workspace().join("docs/runbook.md")).expect("runbook");
    let anchors = crate::docs::anchors(&runbook);
    let rules = rules();
    let names: Vec<&str> = rules.iter().filter_map(|r| r["alert"].as_str()).collect();
    assert_eq!(names, ALERTS, "alert names (the old team's and ours)");
    for r in &rules {
        let name = r["alert"].as_str().expect("alert");
        assert!(
            matches!(
                r["labels"]["severity"].as_str(),
                Some("critical" | "warning")
            ),
            "{name}: severity"
        );
        assert!(r["for"].as_str().is_some(), "{name}: no `for`");
        assert!(
            r["annotations"]["summary"].as_str().is_some(),
            "{name}: summary"
        );
        let url = r["annotations"]["runbook_url"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: runbook_url"));
        let anchor = url
            .split_once("docs/runbook.md#")
            .map(|(_, a)| a)
            .unwrap_or_else(|| panic!("{name}: runbook_url {url} is not docs/runbook.md#…"));
        assert_eq!(anchor, name.to_lowercase(), "{name}: anchor");
        assert!(
            anchors.contains(anchor),
            "{name}: docs/runbook.md has no heading #{anchor}"
        );
    }
}

#[test]
fn scrape_example_and_file_sd_targets_pass_promtool_check_config() {
    let d = tempfile::tempdir().expect("tempdir");
    let sd = d.path().join("file_sd");
    std::fs::create_dir_all(d.path().join("alerts")).expect("mkdir");
    std::fs::create_dir_all(&sd).expect("mkdir");
    let config = std::fs::read_to_string(mon().join("prometheus/scrape.example.yml"))
        .expect("scrape example");
    assert!(config.contains("/etc/prometheus/file_sd/imagectl-*.json"));
    let config = config.replace("/etc/prometheus/file_sd", &sd.display().to_string());
    std::fs::write(d.path().join("prometheus.yml"), config).expect("write config");
    std::fs::copy(rules_path(), d.path().join("alerts/imagectl.rules.yml")).expect("copy rules");

    // The documented targets format: every exporter of every VM, with the labels the rules need.
    let targets_path = mon().join("prometheus/targets.example.json");
    let targets: Value =
        serde_json::from_str(&std::fs::read_to_string(&targets_path).expect("targets"))
            .expect("json");
    let mut exporters = BTreeSet::new();
    for group in targets.as_array().expect("target groups") {
        let labels = &group["labels"];
        for key in ["fleet", "vm", "exporter"] {
            assert!(
                labels[key].as_str().is_some_and(|v| !v.is_empty()),
                "{key} in {group}"
            );
        }
        exporters.insert(labels["exporter"].as_str().unwrap_or_default().to_owned());
        assert_eq!(
            group["targets"].as_array().map(Vec::len),
            Some(1),
            "{group}"
        );
    }
    assert_eq!(
        exporters,
        BTreeSet::from(["node".into(), "cadvisor".into(), "gitlab-runner".into()])
    );
    std::fs::copy(&targets_path, sd.join("imagectl-ci.json")).expect("copy targets");

    let ok = promtool(&["check", "config", "prometheus.yml"], d.path());
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(
        text(&ok).contains("SUCCESS: 5 rules found"),
        "{}",
        text(&ok)
    );

    // promtool really reads the file_sd files: a malformed one fails the check.
    std::fs::write(
        sd.join("imagectl-bad.json"),
        r#"[{"targets": ["vm:9100"], "labels": {"not a label": "x"}}]"#,
    )
    .expect("write bad targets");
    let bad = promtool(&["check", "config", "prometheus.yml"], d.path());
    assert!(
        !bad.status.success(),
        "a bad file_sd file passed: {}",
        text(&bad)
    );
}

/// Metric names in a PromQL expression: identifiers that are not functions, keywords, label
/// names, label values, durations or template variables.
fn metric_names(expr: &str) -> BTreeSet<String> {
    // Drop string literals, label matchers and range selectors.
    let mut s = String::new();
    let mut depth_brace = 0;
    let mut depth_bracket = 0;
    let mut quote = None;
    for c in expr.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '{') => depth_brace += 1,
            (None, '}') => depth_brace -= 1,
            (None, '[') => depth_bracket += 1,
            (None, ']') => depth_bracket -= 1,
            (None, c) if depth_brace == 0 && depth_bracket == 0 => s.push(c),
            _ => s.push(' '),
        }
    }
    // Drop the label lists of by/without/on/ignoring/group_left/group_right.
    let mut cleaned = String::new();
    let mut rest = s.as_str();
    let grouping = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    'outer: while !rest.is_empty() {
        for kw in grouping {
            if let Some(after) = rest.strip_prefix(kw) {
                let prev_ok = !cleaned
                    .chars()
                    .last()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_');
                let t = after.trim_start();
                if prev_ok && t.starts_with('(') {
                    let close = t.find(')').expect("closing parenthesis");
                    cleaned.push(' ');
                    rest = &t[close + 1..];
                    continue 'outer;
                }
            }
        }
        let c = rest.chars().next().expect("char");
        cleaned.push(c);
        rest = &rest[c.len_utf8()..];
    }
    let keywords = [
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "group_left",
        "group_right",
    ];
    let mut out = BTreeSet::new();
    let chars: Vec<char> = cleaned.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '$' {
            // Template variable.
            i += 1;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            continue;
        }
        if c.is_ascii_digit() || c == '.' {
            // Numbers, including 10e9.
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            continue;
        }
        if c.is_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            if next != Some(&'(') && !keywords.contains(&word.as_str()) {
                out.insert(word);
            }
            continue;
        }
        i += 1;
    }
    out
}

#[test]
fn metric_name_extraction_ignores_functions_labels_and_keywords() {
    let names = metric_names(
        r#"sum by (vm, name) (rate(container_cpu_usage_seconds_total{exporter="cadvisor", image!="", vm=~"$vm"}[$__rate_interval])) / on (vm) group_left count(up) > bool 10e9 unless foo:bar"#,
    );
    assert_eq!(
        names,
        BTreeSet::from([
            "container_cpu_usage_seconds_total".to_owned(),
            "up".to_owned(),
            "foo:bar".to_owned()
        ])
    );
}

#[test]
fn rules_query_only_known_metrics() {
    for r in rules() {
        let expr = r["expr"].as_str().expect("expr");
        for m in metric_names(expr) {
            assert!(
                KNOWN_METRICS.contains(&m.as_str()),
                "{}: unknown metric {m}",
                r["alert"]
            );
        }
    }
}

fn dashboard() -> Value {
    let path = mon().join("grafana/imagectl-runners.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard"))
        .expect("dashboard JSON")
}

/// All panels, rows' nested panels included.
fn panels(d: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p.clone());
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner.iter().cloned());
        }
    }
    out
}

#[test]
fn dashboard_is_well_formed_and_has_the_panels_the_team_needs() {
    let d = dashboard();
    assert!(
        d["schemaVersion"].as_u64().is_some_and(|v| v >= 30),
        "schemaVersion"
    );
    assert!(
        d["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty() && u.len() <= 40),
        "uid"
    );
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()), "title");

    // Template variables: a Prometheus data source, fleet and VM.
    let vars = d["templating"]["list"].as_array().expect("templating");
    let var = |name: &str| vars.iter().find(|v| v["name"] == name).cloned();
    assert_eq!(
        var("datasource").expect("datasource variable")["query"],
        "prometheus"
    );
    for name in ["fleet", "vm"] {
        let v = var(name).unwrap_or_else(|| panic!("variable {name}"));
        assert_eq!(v["type"], "query");
        assert_eq!(v["datasource"]["uid"], "${datasource}");
        let q = v["query"]["query"].as_str().expect("variable query");
        assert!(
            q.starts_with("label_values(") && q.contains(name),
            "{name}: {q}"
        );
    }

    let all = panels(&d);
    let mut ids = BTreeSet::new();
    let mut titles = Vec::new();
    for p in &all {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "duplicate panel id {id}");
        let title = p["title"].as_str().expect("panel title");
        titles.push(title.to_lowercase());
        let g = &p["gridPos"];
        let (x, w, h) = (
            g["x"].as_u64().expect("x"),
            g["w"].as_u64().expect("w"),
            g["h"].as_u64().expect("h"),
        );
        assert!(
            w >= 1 && x + w <= 24 && h >= 1 && g["y"].is_u64(),
            "{title}: gridPos {g}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert!(
            ["stat", "timeseries", "table", "gauge", "bargauge", "text"]
                .contains(&p["type"].as_str().unwrap_or("")),
            "{title}: type {}",
            p["type"]
        );
        assert_eq!(p["datasource"]["type"], "prometheus", "{title}");
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no targets");
        let mut refs = BTreeSet::new();
        for t in targets {
            let r = t["refId"].as_str().expect("refId");
            assert!(refs.insert(r.to_owned()), "{title}: duplicate refId {r}");
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}/{r}");
            let expr = t["expr"].as_str().expect("expr");
            assert!(
                expr.contains(r#"fleet=~"$fleet""#) && expr.contains(r#"vm=~"$vm""#),
                "{title}/{r} ignores the variables: {expr}"
            );
            for m in metric_names(expr) {
                assert!(
                    KNOWN_METRICS.contains(&m.as_str()),
                    "{title}/{r}: unknown metric {m}"
                );
            }
        }
    }
    for needed in [
        "runner status",
        "agent state",
        "cpu",
        "memory",
        "disk",
        "/var/lib/docker",
        "container",
        "network",
        "image version",
        "jobs",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(needed)),
            "no panel about {needed:?}: {titles:?}"
        );
    }
    // The image-version table shows imagectl_image_info per VM.
    let image = all
        .iter()
        .find(|p| {
            p["title"]
                .as_str()
                .is_some_and(|t| t.to_lowercase().contains("image version"))
        })
        .expect("image version panel");
    assert!(image["targets"][0]["expr"]
        .as_str()
        .is_some_and(|e| e.starts_with("imagectl_image_info{")));
}

#[test]
fn dashboard_queries_are_valid_promql() {
    // promtool has no "check expression"; a recording rule per query makes it compile them all.
    let d = dashboard();
    let mut rules = Vec::new();
    for p in panels(&d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .expect("expr")
                .replace("$__rate_interval", "5m")
                .replace("$fleet", ".*")
                .replace("$vm", ".*");
            rules.push(serde_json::json!({
                "record": format!("dashboard:panel_{}_{}", p["id"], t["refId"].as_str().unwrap_or("X")),
                "expr": expr,
            }));
        }
    }
    for v in d["templating"]["list"].as_array().expect("templating") {
        if let Some(q) = v["query"]["query"].as_str() {
            // label_values(SELECTOR, label): the selector must compile.
            let selector = q
                .strip_prefix("label_values(")
                .and_then(|s| s.rsplit_once(','))
                .map(|(sel, _)| sel.replace("$fleet", ".*"))
                .expect("label_values query");
            rules.push(serde_json::json!({"record": format!("dashboard:var_{}", v["name"].as_str().unwrap_or("x")), "expr": selector}));
        }
    }
    let n = rules.len();
    assert!(n >= 15, "only {n} queries");
    let file = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("dash.rules.yml"),
        serde_yaml::to_string(&file).expect("yaml"),
    )
    .expect("write");
    let out = promtool(&["check", "rules", "dash.rules.yml"], dir.path());
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("SUCCESS: {n} rules found")),
        "{}",
        text(&out)
    );
}

/// The image textfile documented for the lead in `monitoring/README`.
fn image_textfile_from_readme() -> String {
    let readme = std::fs::read_to_string(mon().join("README")).expect("monitoring/README");
    let begin = "BEGIN imagectl-image.prom\n";
    let a = readme.find(begin).expect("BEGIN line") + begin.len();
    let b = readme[a..]
        .find("END imagectl-image.prom")
        .expect("END line")
        + a;
    readme[a..b].to_owned()
}

/// Kills and reaps a child process when dropped.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[test]
fn node_exporter_exposes_imagectl_textfiles_and_every_node_metric_used() {
    let exporter = Path::new("/usr/bin/prometheus-node-exporter");
    assert!(
        exporter.is_file(),
        "prometheus-node-exporter is not installed (tools/setup-host.sh installs it)"
    );
    let root = tempfile::tempdir().expect("tempdir");
    // The agent's textfile, written by the agent's own code.
    let paths = imagectl_agent::paths::Paths::new(root.path());
    imagectl_agent::status::write_textfile(&paths, true).expect("agent textfile");
    let dir = paths.textfile.parent().expect("textfile dir").to_path_buf();
    assert!(
        dir.ends_with("var/lib/prometheus/node-exporter"),
        "{}",
        dir.display()
    );
    // The image's textfile, exactly as documented for the bake step.
    let image = image_textfile_from_readme();
    assert!(image.ends_with('\n'));
    std::fs::write(dir.join("imagectl-image.prom"), &image).expect("image textfile");

    let port = free_port();
    let child = Command::new(exporter)
        .args([
            &format!("--web.listen-address=127.0.0.1:{port}"),
            &format!("--collector.textfile.directory={}", dir.display()),
            "--collector.disable-defaults",
            "--collector.textfile",
            "--collector.cpu",
            "--collector.meminfo",
            "--collector.filesystem",
            "--collector.netdev",
            "--collector.stat",
            "--collector.time",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starting node_exporter");
    let _reap = Reap(child);
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .new_agent();
    let url = format!("http://127.0.0.1:{port}/metrics");
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        match agent.get(&url).call() {
            Ok(mut r) => break r.body_mut().read_to_string().expect("metrics body"),
            Err(e) if Instant::now() > deadline => panic!("node_exporter did not answer: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    assert!(
        body.lines().any(|l| l == "node_textfile_scrape_error 0"),
        "node_exporter could not parse the textfiles:\n{}",
        body.lines()
            .filter(|l| l.contains("textfile"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        body.lines().any(|l| l == "imagectl_agent_registered 1"),
        "agent metric missing"
    );
    let info = body
        .lines()
        .find(|l| l.starts_with("imagectl_image_info{"))
        .expect("imagectl_image_info exported");
    for label in ["name=\"", "version=\"", "sha256=\""] {
        assert!(info.contains(label), "{info}");
    }
    assert!(info.ends_with("} 1"), "{info}");
    assert!(body
        .lines()
        .any(|l| l.starts_with("imagectl_image_build_timestamp_seconds ")));

    // Every node_* and imagectl_* metric the rules and the dashboard query is really exported.
    let exported: BTreeSet<&str> = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let mut used = BTreeSet::new();
    for r in rules() {
        used.extend(metric_names(r["expr"].as_str().expect("expr")));
    }
    for p in panels(&dashboard()) {
        for t in p["targets"].as_array().into_iter().flatten() {
            used.extend(metric_names(t["expr"].as_str().expect("expr")));
        }
    }
    let missing: Vec<&String> = used
        .iter()
        .filter(|m| m.starts_with("node_") || m.starts_with("imagectl_"))
        .filter(|m| !exported.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "node_exporter does not export {missing:?}"
    );
}
