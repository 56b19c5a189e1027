//! A tiny stderr logger that never prints a secret.
//!
//! Every secret the agent learns (the seed token, the rotated token) is registered here with
//! [`register_secret`] as soon as it is known; every line the logger prints, and every error text the
//! agent stores or prints, goes through [`redact`] first. The journal captures stderr; when stderr is
//! connected to it (`JOURNAL_STREAM` names stderr) lines carry a `<N>` syslog priority prefix so the journal
//! records the right level, otherwise a plain `level:` prefix. No timestamps: the journal adds them.

use std::io::Write;
use std::sync::{Mutex, OnceLock};

/// The text that replaces a secret.
pub const REDACTED: &str = "[REDACTED]";

fn secrets() -> &'static Mutex<Vec<String>> {
    static SECRETS: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    SECRETS.get_or_init(|| Mutex::new(Vec::new()))
}

/// Remembers `secret` so that [`redact`] removes it from any text. Empty or very short values are
/// ignored (redacting them would mangle unrelated text and they are not credentials anyway).
pub fn register_secret(secret: &str) {
    if secret.len() < 4 {
        return;
    }
    let mut list = secrets().lock().unwrap_or_else(|e| e.into_inner());
    if !list.iter().any(|s| s == secret) {
        list.push(secret.to_owned());
        // Longest first, so a secret that contains another is removed whole.
        list.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }
}

/// `text` with every registered secret replaced by [`REDACTED`].
pub fn redact(text: &str) -> String {
    let list = secrets().lock().unwrap_or_else(|e| e.into_inner());
    let mut out = text.to_owned();
    for s in list.iter() {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), REDACTED);
        }
    }
    out
}

/// Log levels, mapped to syslog priorities for the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Something failed.
    Error,
    /// Something odd that the agent worked around.
    Warn,
    /// Progress.
    Info,
}

/// True when stderr is the journal's stream: `JOURNAL_STREAM` (`DEV:INODE`, set by systemd) matches
/// stderr itself, not just an inherited variable.
fn stderr_is_journal() -> bool {
    static IS: OnceLock<bool> = OnceLock::new();
    *IS.get_or_init(|| {
        use std::os::unix::fs::MetadataExt;
        let Some(var) = std::env::var_os("JOURNAL_STREAM") else {
            return false;
        };
        let var = var.to_string_lossy();
        let Some((dev, ino)) = var.split_once(':') else {
            return false;
        };
        match std::fs::metadata("/proc/self/fd/2") {
            Ok(m) => dev.parse() == Ok(m.dev()) && ino.parse() == Ok(m.ino()),
            Err(_) => false,
        }
    })
}

/// Writes one redacted line to stderr.
pub fn emit(level: Level, msg: &str) {
    let journal = stderr_is_journal();
    let prefix = match (journal, level) {
        (true, Level::Error) => "<3>",
        (true, Level::Warn) => "<4>",
        (true, Level::Info) => "<6>",
        (false, Level::Error) => "error: ",
        (false, Level::Warn) => "warning: ",
        (false, Level::Info) => "",
    };
    let line = redact(msg);
    let mut err = std::io::stderr().lock();
    // A closed stderr must not abort registration. The journal parses `<N>` only at the start of a
    // line and names the unit itself; a terminal gets the program name.
    let _ = if journal {
        writeln!(err, "{prefix}{line}")
    } else {
        writeln!(err, "imagectl-agent: {prefix}{line}")
    };
}

/// Logs progress.
#[macro_export]
macro_rules! info {
    ($($t:tt)*) => { $crate::log::emit($crate::log::Level::Info, &format!($($t)*)) };
}

/// Logs a recoverable problem.
#[macro_export]
macro_rules! warn {
    ($($t:tt)*) => { $crate::log::emit($crate::log::Level::Warn, &format!($($t)*)) };
}

/// Logs a failure.
#[macro_export]
macro_rules! error {
    ($($t:tt)*) => { $crate::log::emit($crate::log::Level::Error, &format!($($t)*)) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_registered_secrets_longest_first() {
        register_secret("glrt-unit-test-AAAA");
        register_secret("glrt-unit-test-AAAA-longer");
        register_secret("ab"); // too short: ignored
        let out = redact("x glrt-unit-test-AAAA-longer y glrt-unit-test-AAAA ab");
        assert_eq!(out, "x [REDACTED] y [REDACTED] ab");
    }
}
