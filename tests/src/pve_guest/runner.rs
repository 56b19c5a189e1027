//! **TEST DOUBLE.** The emulated gitlab-runner of one emulated guest: it starts once
//! `config.toml` holds a runner (the agent writes it, then would start the service), re-reads the
//! file before every request (the real runner reloads it when it changes), sends
//! `POST /api/v4/jobs/request` with the token and the manager's `system_id` every poll interval,
//! and serves its API request counter the way gitlab-runner does
//! (gitlab-org/gitlab-runner `network/api_requests_collector.go`):
//! `gitlab_runner_api_request_statuses_total{endpoint="request_job",method="post",runner="…",status="204",system_id="…"}`.
//!
//! Each guest's metrics listen on a port of their own on loopback (several guests share this
//! host), which the agent is told with `--runner-metrics-url`. The `runner` label holds the
//! runner id here: the real runner puts the first characters of the token there, which a test
//! harness must not print.

use imagectl_proto::Secret;
use serde_json::json;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A running emulated gitlab-runner. Stops when `up` goes false.
pub struct EmulatedRunner {
    /// `http://127.0.0.1:PORT/metrics`.
    pub metrics_url: String,
    /// Job requests answered 204 or 201.
    pub job_requests: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// What one request loop needs from the guest's root.
struct Conf {
    url: String,
    token: Secret,
    id: Option<u64>,
}

fn read_conf(root: &std::path::Path) -> Option<Conf> {
    let text = std::fs::read_to_string(root.join("etc/gitlab-runner/config.toml")).ok()?;
    let v: toml::Value = toml::from_str(&text).ok()?;
    let r = v.get("runners")?.as_array()?.first()?.clone();
    Some(Conf {
        url: r.get("url")?.as_str()?.trim_end_matches('/').to_owned(),
        token: Secret::new(r.get("token")?.as_str()?),
        id: r.get("id").and_then(|i| i.as_integer()).map(|i| i as u64),
    })
}

impl EmulatedRunner {
    /// Starts it for the guest whose root is `root`; `say` logs (never a token).
    pub fn start(
        root: PathBuf,
        interval: Duration,
        up: Arc<AtomicBool>,
        say: impl Fn(String) + Send + Sync + 'static,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let metrics_url = format!("http://{}/metrics", listener.local_addr()?);
        let counts: Arc<Mutex<BTreeMap<(String, u16), u64>>> = Arc::default();
        let labels: Arc<Mutex<(String, String)>> = Arc::default();
        let job_requests = Arc::new(AtomicU64::new(0));
        let say = Arc::new(say);
        let serve = {
            let (up, counts, labels) = (up.clone(), counts.clone(), labels.clone());
            std::thread::spawn(move || {
                while up.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((mut s, _)) => {
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                            let mut buf = [0u8; 2048];
                            let _ = s.read(&mut buf);
                            let body = page(&counts.lock().unwrap(), &labels.lock().unwrap());
                            let _ = write!(
                                s,
                                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                                body.len()
                            );
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
            })
        };
        let poll = {
            let (up, jobs) = (up.clone(), job_requests.clone());
            std::thread::spawn(move || {
                let http = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(5)))
                    .build()
                    .new_agent();
                let mut started = false;
                let mut last_problem = String::new();
                while up.load(Ordering::SeqCst) {
                    if let Some(c) = read_conf(&root) {
                        if !started {
                            say(format!("gitlab-runner polls {}/api/v4/jobs/request", c.url));
                            started = true;
                        }
                        let sid = std::fs::read_to_string(
                            root.join("etc/gitlab-runner/.runner_system_id"),
                        )
                        .map(|s| s.trim().to_owned())
                        .unwrap_or_default();
                        *labels.lock().unwrap() =
                            (c.id.map(|i| i.to_string()).unwrap_or_default(), sid.clone());
                        let body = json!({
                            "token": c.token.expose(), "system_id": sid,
                            "info": {"name": "gitlab-runner", "version": "17.0.0~imagectl-pve-guest",
                                     "executor": "docker", "features": {}},
                            "last_update": "",
                        });
                        let problem = match http
                            .post(format!("{}/api/v4/jobs/request", c.url))
                            .send_json(&body)
                        {
                            Ok(r) => {
                                let st = r.status().as_u16();
                                *counts
                                    .lock()
                                    .unwrap()
                                    .entry(("request_job".into(), st))
                                    .or_default() += 1;
                                if st == 204 || st == 201 {
                                    jobs.fetch_add(1, Ordering::SeqCst);
                                    String::new()
                                } else {
                                    format!("jobs/request answered HTTP {st}")
                                }
                            }
                            // No HTTP answer: not counted, as in the real collector.
                            Err(e) => format!("jobs/request failed: {e}"),
                        };
                        if problem != last_problem {
                            say(if problem.is_empty() {
                                "jobs/request answered 204 again".into()
                            } else {
                                problem.clone()
                            });
                            last_problem = problem;
                        }
                    }
                    let mut left = interval;
                    while !left.is_zero() && up.load(Ordering::SeqCst) {
                        let step = left.min(Duration::from_millis(50));
                        std::thread::sleep(step);
                        left -= step;
                    }
                }
                if started {
                    say("gitlab-runner stopped polling".into());
                }
            })
        };
        Ok(Self {
            metrics_url,
            job_requests,
            threads: vec![serve, poll],
        })
    }

    /// Waits for both threads (after `up` went false).
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// The metrics page: the counter with gitlab-runner's name, help, type and labels.
fn page(counts: &BTreeMap<(String, u16), u64>, labels: &(String, String)) -> String {
    let mut s = String::from(
        "# HELP gitlab_runner_api_request_statuses_total The total number of API requests made by \
         GitLab Runner, partitioned by runner, system_id, endpoint, status and method.\n\
         # TYPE gitlab_runner_api_request_statuses_total counter\n",
    );
    for ((endpoint, status), n) in counts {
        s.push_str(&format!(
            "gitlab_runner_api_request_statuses_total{{endpoint=\"{endpoint}\",method=\"post\",runner=\"{}\",status=\"{status}\",system_id=\"{}\"}} {n}\n",
            labels.0, labels.1
        ));
    }
    s
}
