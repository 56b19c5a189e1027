//! The checks `imagectl test` runs against a booted VM, and how their answers are judged.
//!
//! HTTP checks go through the host-forwarded ports; the others through the guest agent. The
//! judging functions are pure so they can be tested without a VM.

use crate::vm::{self, QemuVm, Qga};
use anyhow::Result;
use std::time::Duration;

/// How long one HTTP check may take to answer.
const HTTP_CHECK_TIMEOUT: Duration = Duration::from_secs(15);

/// How a check decides.
#[derive(Debug, Clone)]
pub(super) enum Probe {
    /// GET `path` on the forwarded guest port; passes on 200 with `needle` in the body.
    Http {
        guest_port: u16,
        path: &'static str,
        needle: &'static str,
    },
    /// Runs a command through the guest agent; passes on exit 0 with `want` in stdout.
    Exec {
        argv: &'static [&'static str],
        want: &'static str,
        fail_on: Option<&'static str>,
    },
    /// Reads the agent's status.json; passes on `registered`, fails on `failed`.
    AgentStatus,
}

/// A named check.
#[derive(Debug, Clone)]
pub struct Check {
    /// Name shown in the report.
    pub name: &'static str,
    probe: Probe,
}

impl Check {
    pub(super) fn uses_qga(&self) -> bool {
        !matches!(self.probe, Probe::Http { .. })
    }
}

/// Console text made safe to print: ANSI escape sequences and control characters removed.
pub fn sanitize_console(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                // CSI: ESC [ params final-byte; other escapes: ESC + one char.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for n in chars.by_ref() {
                        if ('@'..='~').contains(&n) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// The checks for a boot (the agent-status check only with an agent seed).
pub fn checks(with_agent: bool) -> Vec<Check> {
    let mut v = vec![
        Check {
            name: "node_exporter",
            probe: Probe::Http {
                guest_port: 9100,
                path: "/metrics",
                needle: "node_exporter_build_info",
            },
        },
        Check {
            name: "cadvisor",
            probe: Probe::Http {
                guest_port: 8080,
                path: "/metrics",
                needle: "cadvisor_version_info",
            },
        },
        Check {
            name: "cloud-init",
            probe: Probe::Exec {
                argv: &["/usr/bin/cloud-init", "status"],
                want: "done",
                fail_on: Some("error"),
            },
        },
        Check {
            name: "docker",
            probe: Probe::Exec {
                argv: &["/bin/systemctl", "is-active", "docker.service"],
                want: "active",
                fail_on: None,
            },
        },
        Check {
            name: "agent-unit",
            probe: Probe::Exec {
                argv: &["/bin/systemctl", "is-enabled", "imagectl-agent.service"],
                want: "",
                fail_on: Some("not-found"),
            },
        },
    ];
    if with_agent {
        v.push(Check {
            name: "agent-status",
            probe: Probe::AgentStatus,
        });
    }
    v
}

/// One poll of a check.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Poll {
    Pass(String),
    Wait(String),
    Fail(String),
}

/// Judges an exec result for a [`Probe::Exec`] check (pure).
fn judge_exec(out: &vm::ExecOutput, want: &str, fail_on: Option<&str>) -> Poll {
    let text = out.stdout_text();
    let shown = if text.is_empty() {
        String::from_utf8_lossy(&out.stderr).trim().to_string()
    } else {
        text.clone()
    };
    let shown = crate::util::tail(&shown, 2);
    if fail_on.is_some_and(|f| text.contains(f)) {
        return Poll::Fail(shown);
    }
    let matches = if want.is_empty() {
        true
    } else {
        text.lines().any(|l| l.contains(want))
    };
    if out.success() && matches && !(want == "active" && text.contains("inactive")) {
        Poll::Pass(shown)
    } else {
        Poll::Wait(format!(
            "{shown} (exit {})",
            out.exit_code.map_or("?".into(), |c| c.to_string())
        ))
    }
}

/// Judges a status.json body for the agent-status check (pure).
fn judge_status(body: &[u8]) -> Poll {
    match serde_json::from_slice::<imagectl_proto::AgentStatus>(body) {
        Ok(s) => match s.state {
            imagectl_proto::AgentState::Registered => Poll::Pass(format!(
                "registered (runner {})",
                s.runner_id.map_or("?".into(), |i| i.to_string())
            )),
            imagectl_proto::AgentState::Failed => {
                Poll::Fail(format!("failed: {}", s.error.unwrap_or_default()))
            }
            imagectl_proto::AgentState::Running => Poll::Wait("agent still running".into()),
        },
        Err(e) => Poll::Wait(format!("status.json not readable yet: {e}")),
    }
}

pub(super) fn poll_one(vm: &QemuVm, check: &Check, qga: &mut Option<Qga>) -> Poll {
    match &check.probe {
        Probe::Http {
            guest_port,
            path,
            needle,
        } => {
            let Some(port) = vm.host_port(*guest_port) else {
                return Poll::Fail(format!("guest port {guest_port} is not forwarded"));
            };
            // node_exporter's full scrape can take several seconds under TCG on a loaded host; a
            // short timeout turned a slow answer into minutes of "no answer yet".
            match vm::http_get(port, path, HTTP_CHECK_TIMEOUT) {
                Ok(r) if r.status == 200 && r.body.contains(needle) => {
                    Poll::Pass(format!("{path} has {needle}"))
                }
                Ok(r) if r.status == 200 => {
                    Poll::Wait(format!("{path} answers but lacks {needle}"))
                }
                Ok(r) => Poll::Wait(format!("{path} answered HTTP {}", r.status)),
                Err(e) => Poll::Wait(format!(
                    "no answer on guest port {guest_port} yet ({})",
                    root_cause(&e)
                )),
            }
        }
        Probe::Exec {
            argv,
            want,
            fail_on,
        } => with_qga(qga, |q| {
            q.exec(argv[0], &argv[1..], Duration::from_secs(30))
                .map(|out| judge_exec(&out, want, *fail_on))
        }),
        Probe::AgentStatus => with_qga(qga, |q| match q.read_file(imagectl_proto::STATUS_PATH) {
            Ok(body) => Ok(judge_status(&body)),
            Err(e) if format!("{e:#}").contains("refused") => {
                Ok(Poll::Wait("no status.json yet".into()))
            }
            Err(e) => Err(e),
        }),
    }
}

/// Runs `f` on the guest agent connection, if there is one; drops it on transport errors.
fn with_qga(qga: &mut Option<Qga>, f: impl FnOnce(&mut Qga) -> Result<Poll>) -> Poll {
    let Some(q) = qga.as_mut() else {
        return Poll::Wait("guest agent not answering yet".into());
    };
    match f(q) {
        Ok(p) => p,
        Err(e) => {
            *qga = None;
            Poll::Wait(format!("guest agent: {}", root_cause(&e)))
        }
    }
}

fn root_cause(e: &anyhow::Error) -> String {
    e.root_cause().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(code: i32, stdout: &str) -> vm::ExecOutput {
        vm::ExecOutput {
            exit_code: Some(code),
            signal: None,
            stdout: stdout.into(),
            stderr: b"err".to_vec(),
        }
    }

    #[test]
    fn exec_results_are_judged() {
        assert_eq!(
            judge_exec(&out(0, "active\n"), "active", None),
            Poll::Pass("active".into())
        );
        assert!(matches!(
            judge_exec(&out(3, "inactive\n"), "active", None),
            Poll::Wait(_)
        ));
        assert!(matches!(
            judge_exec(&out(3, "activating\n"), "active", None),
            Poll::Wait(_)
        ));
        assert!(matches!(
            judge_exec(&out(0, "status: running\n"), "done", Some("error")),
            Poll::Wait(_)
        ));
        assert!(matches!(
            judge_exec(&out(0, "status: done\n"), "done", Some("error")),
            Poll::Pass(_)
        ));
        assert!(matches!(
            judge_exec(&out(1, "status: error\n"), "done", Some("error")),
            Poll::Fail(_)
        ));
        assert!(matches!(
            judge_exec(&out(0, "enabled\n"), "", Some("not-found")),
            Poll::Pass(_)
        ));
        assert!(matches!(
            judge_exec(&out(4, "not-found\n"), "", Some("not-found")),
            Poll::Fail(_)
        ));
        assert!(matches!(
            judge_exec(&out(1, "disabled\n"), "", Some("not-found")),
            Poll::Wait(_)
        ));
    }

    #[test]
    fn agent_status_is_judged() {
        assert!(
            matches!(judge_status(br#"{"state":"registered","runner_id":4}"#), Poll::Pass(d) if d.contains('4'))
        );
        assert!(
            matches!(judge_status(br#"{"state":"failed","error":"403 from verify"}"#), Poll::Fail(d) if d.contains("403"))
        );
        assert!(matches!(
            judge_status(br#"{"state":"running"}"#),
            Poll::Wait(_)
        ));
        assert!(matches!(judge_status(b"{partial"), Poll::Wait(_)));
    }

    #[test]
    fn console_text_is_sanitised() {
        let raw = "\u{1b}[2J\u{1b}[01;01H\u{1b}[=3hBdsDxe: ok\r\n\u{1b}[1m\u{1b}[33mShell>\u{1b}[0m \u{7}x\n";
        assert_eq!(sanitize_console(raw), "BdsDxe: ok\nShell> x\n");
    }

    #[test]
    fn check_list_depends_on_agent() {
        let names = |v: Vec<Check>| v.iter().map(|c| c.name).collect::<Vec<_>>();
        assert_eq!(
            names(checks(false)),
            [
                "node_exporter",
                "cadvisor",
                "cloud-init",
                "docker",
                "agent-unit"
            ]
        );
        assert_eq!(names(checks(true)).last(), Some(&"agent-status"));
    }
}
