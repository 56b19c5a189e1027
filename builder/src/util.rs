//! Small shared helpers: hashing, running external tools with context, human sizes.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

/// Reads a text file the user named (`what` says which flag or role), refusing what would hang,
/// exhaust memory or leak: a missing path, a directory, a FIFO or device (reading would block or
/// never end), more than `max` bytes, or bytes that are not UTF-8 text. Every refusal is an input
/// error (exit 2) naming the file and never quoting it.
pub fn read_text_input(path: &Path, what: &str, max: u64) -> Result<String> {
    use crate::error::input;
    let shown = path.display();
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(input(format!("{what} {shown} does not exist")))
        }
        Err(e) => {
            return Err(input(format!(
                "{what} {shown} cannot be read: {}",
                e.kind()
            )))
        }
    };
    if meta.is_dir() {
        return Err(input(format!("{what} {shown} is a directory, not a file")));
    }
    if !meta.is_file() {
        return Err(input(format!(
            "{what} {shown} is not a regular file (a pipe or device); pass a file"
        )));
    }
    if meta.len() > max {
        return Err(input(format!(
            "{what} {shown} is {}; at most {} is read",
            human_size(meta.len()),
            human_size(max)
        )));
    }
    let bytes = std::fs::read(path)
        .map_err(|e| input(format!("{what} {shown} cannot be read: {}", e.kind())))?;
    String::from_utf8(bytes).map_err(|_| input(format!("{what} {shown} is not UTF-8 text")))
}

/// SHA-256 of a file, hex encoded.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = fs_err::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Writes a file atomically: a private temporary file in the same directory, renamed over `path`.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(data)
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

/// SHA-256 of bytes, hex encoded.
pub fn sha256_bytes(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Runs a command to completion; on failure the error names the tool and carries its stderr tail.
pub fn run(cmd: &mut Command) -> Result<()> {
    let what = describe(cmd);
    tracing::debug!("running {what}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {what} (is it installed?)"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr), 20)
        );
    }
    Ok(())
}

/// Like [`run`] but returns stdout.
pub fn run_output(cmd: &mut Command) -> Result<String> {
    let what = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {what} (is it installed?)"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr), 20)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The program name of a command, for messages (arguments are left out on purpose).
pub fn describe(cmd: &Command) -> String {
    cmd.get_program().to_string_lossy().into_owned()
}

/// The last `n` lines of a text.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Human-readable byte size (binary units).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(3 * 1024 * 1024), "3.0 MiB");
    }

    #[test]
    fn failing_tool_reports_stderr() {
        let err = run(Command::new("sh").args(["-c", "echo boom >&2; exit 3"])).unwrap_err();
        assert!(err.to_string().contains("boom"), "{err}");
    }
}
