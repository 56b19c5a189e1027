//! The PVE client's error type: PVE's HTTP status and message kept, so callers can branch on them.
//!
//! PVE reports an error in the HTTP reason phrase and in a JSON body
//! `{"data":null,"message":"…\n","errors":{"param":"why"}}`; both are read. No variant ever holds
//! the API token: requests are described by method and path only.

use crate::error::InputError;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

/// An error from talking to the PVE API.
#[derive(Debug, thiserror::Error)]
pub enum PveError {
    /// PVE answered with an error status.
    #[error("{method} {path}: HTTP {status}: {message}{}{}", fields(errors), hint(*status))]
    Api {
        /// HTTP method.
        method: String,
        /// API path (below `/api2/json`).
        path: String,
        /// HTTP status code.
        status: u16,
        /// PVE's message (body `message`, else the reason phrase).
        message: String,
        /// Per-parameter errors (`errors` in the body).
        errors: BTreeMap<String, String>,
        /// Present for errors that are the user's to fix (400, 401, 403): exit code 2.
        #[source]
        input: Option<InputError>,
    },
    /// The server's certificate did not match the pinned fingerprint.
    #[error(
        "{method} {path}: TLS: the server certificate's SHA-256 fingerprint is {got}, but the pinned \
         fingerprint is {expected}; refusing to connect (if the node certificate was renewed, check \
         it with `pvenode cert info` on the node and update PROXMOX_VE_FINGERPRINT)"
    )]
    PinMismatch {
        /// HTTP method.
        method: String,
        /// API path.
        path: String,
        /// The pin.
        expected: String,
        /// What the server presented.
        got: String,
        /// Marks it as input: exit code 2.
        #[source]
        input: InputError,
    },
    /// The request did not get an answer (connect, TLS, I/O, timeout).
    #[error("{method} {path}: {detail}")]
    Transport {
        /// HTTP method.
        method: String,
        /// API path.
        path: String,
        /// What went wrong, in short.
        detail: String,
        /// The underlying error.
        #[source]
        source: reqwest::Error,
    },
    /// The answer did not parse as what the API documents.
    #[error("{method} {path}: unexpected answer from the PVE API: {detail}")]
    Decode {
        /// HTTP method.
        method: String,
        /// API path.
        path: String,
        /// Why it did not parse.
        detail: String,
        /// Marks it as input: exit code 2.
        #[source]
        input: InputError,
    },
    /// A task (UPID) ended with an exit status other than OK.
    #[error("task {upid} on {node} failed: {exitstatus}{}", log_tail(log))]
    Task {
        /// Node the task ran on.
        node: String,
        /// The task id.
        upid: String,
        /// PVE's exit status (the error message).
        exitstatus: String,
        /// The last lines of the task log.
        log: Vec<String>,
    },
    /// A task did not finish in time.
    #[error("task {upid} on {node} did not finish within {}s{}", waited.as_secs(), log_tail(log))]
    TaskTimeout {
        /// Node the task runs on.
        node: String,
        /// The task id.
        upid: String,
        /// How long we waited.
        waited: Duration,
        /// The last lines of the task log.
        log: Vec<String>,
    },
}

fn fields(errors: &BTreeMap<String, String>) -> String {
    let mut s = String::new();
    for (k, v) in errors {
        let _ = write!(s, "\n  {k}: {}", v.trim_end());
    }
    s
}

fn hint(status: u16) -> &'static str {
    match status {
        401 => {
            "\nhint: the API token was refused (wrong, expired or deleted); check \
             PROXMOX_VE_API_TOKEN (USER@REALM!TOKENID=SECRET)"
        }
        403 => "\nhint: the API token lacks a privilege (with privilege separation, the token needs its own ACL)",
        595 => "\nhint: PVE cannot reach that node (offline?)",
        _ => "",
    }
}

fn log_tail(log: &[String]) -> String {
    if log.is_empty() {
        return String::new();
    }
    let mut s = String::from("\ntask log (last lines):");
    for l in log {
        let _ = write!(s, "\n  {l}");
    }
    s
}

impl PveError {
    /// Builds an API error; 400/401/403 count as the user's input (exit code 2).
    pub fn api(
        method: &str,
        path: &str,
        status: u16,
        message: String,
        errors: BTreeMap<String, String>,
    ) -> Self {
        let input = matches!(status, 400 | 401 | 403)
            .then(|| InputError(format!("the PVE API refused the request (HTTP {status})")));
        PveError::Api {
            method: method.into(),
            path: path.into(),
            status,
            message,
            errors,
            input,
        }
    }

    /// Builds a decode error.
    pub fn decode(method: &str, path: &str, detail: impl Into<String>) -> Self {
        let detail = detail.into();
        PveError::Decode {
            method: method.into(),
            path: path.into(),
            input: InputError(format!("unexpected answer from {path}")),
            detail,
        }
    }

    /// The HTTP status, for API errors.
    pub fn status(&self) -> Option<u16> {
        match self {
            PveError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// PVE's message (API error) or the task's exit status.
    pub fn message(&self) -> Option<&str> {
        match self {
            PveError::Api { message, .. } => Some(message),
            PveError::Task { exitstatus, .. } => Some(exitstatus),
            _ => None,
        }
    }

    /// "can't lock file '…' - got timeout" and other lock waits that a retry may get past.
    pub fn is_lock_timeout(&self) -> bool {
        self.message().is_some_and(|m| {
            let m = m.to_ascii_lowercase();
            (m.contains("can't lock file") || m.contains("lock")) && m.contains("got timeout")
        })
    }

    /// "unable to create VM N: config file already exists", "VM N already exists on node …".
    pub fn is_already_exists(&self) -> bool {
        self.message()
            .is_some_and(|m| m.contains("already exists") && !m.contains("disk image"))
    }

    /// The token was refused.
    pub fn is_auth(&self) -> bool {
        self.status() == Some(401)
    }

    /// The node is unreachable for PVE ("No route to host", 595).
    pub fn is_node_unreachable(&self) -> bool {
        self.status() == Some(595)
    }

    /// The object (VM config, volume) does not exist.
    pub fn is_not_found(&self) -> bool {
        self.message().is_some_and(|m| {
            m.contains("does not exist") || m.contains("no such") || m.contains("not found")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_keep_status_message_and_fields() {
        let mut errs = BTreeMap::new();
        errs.insert("scsi0".into(), "invalid format\n".into());
        let e = PveError::api(
            "POST",
            "/nodes/pve1/qemu",
            400,
            "Parameter verification failed.".into(),
            errs,
        );
        let text = e.to_string();
        assert!(
            text.contains("HTTP 400: Parameter verification failed."),
            "{text}"
        );
        assert!(text.contains("scsi0: invalid format"), "{text}");
        let any = anyhow::Error::new(e);
        assert_eq!(crate::error::exit_code(&any), 2);
        let e = PveError::api(
            "POST",
            "/x",
            500,
            "can't lock file '/var/lock/qemu-server/lock-100.conf' - got timeout".into(),
            BTreeMap::new(),
        );
        assert!(e.is_lock_timeout());
        assert_eq!(crate::error::exit_code(&anyhow::Error::new(e)), 1);
    }

    #[test]
    fn already_exists_is_recognised_in_both_wordings() {
        for m in [
            "unable to create VM 100: config file already exists",
            "unable to create VM 100 - VM 100 already exists on node 'pve1'",
        ] {
            assert!(PveError::api("POST", "/", 500, m.into(), BTreeMap::new()).is_already_exists());
        }
    }
}
