//! A QEMU guest agent (qemu-ga) client over the virtio-serial channel's unix socket.
//!
//! Protocol (QEMU's qemu-ga reference): one JSON object per command, answered by one JSON object
//! followed by a newline: `{"return": …}` or `{"error": {"class": …, "desc": …}}`. The socket
//! accepts connections before the guest agent runs, and answers to earlier (timed-out) requests can
//! still arrive, so every session starts with `guest-sync-delimited`: the client sends `0xFF` (which
//! resets the agent's parser) and a random id; the agent answers with a `0xFF` byte and then
//! `{"return": id}`. Everything before the last `0xFF` is stale and dropped.

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use serde_json::{json, Value};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Default time one command may take.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest file [`Qga::read_file`] reads.
pub const MAX_FILE: usize = 16 << 20;

/// A connected, synchronised guest agent session.
pub struct Qga {
    stream: UnixStream,
    buf: Vec<u8>,
    timeout: Duration,
    synced: bool,
}

/// What a command run through `guest-exec` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit code, when it exited normally.
    pub exit_code: Option<i32>,
    /// Signal that ended it, if one did.
    pub signal: Option<i32>,
    /// Captured standard output.
    pub stdout: Vec<u8>,
    /// Captured standard error.
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    /// True for exit code 0.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
    /// Standard output as (lossy) text, trimmed.
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).trim().to_string()
    }
}

impl Qga {
    /// Connects to the agent socket and synchronises, retrying until `timeout` (the guest agent
    /// may not be up yet).
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let mut last: anyhow::Error;
        loop {
            match UnixStream::connect(socket) {
                Ok(stream) => {
                    let mut q = Qga {
                        stream,
                        buf: Vec::new(),
                        timeout: DEFAULT_COMMAND_TIMEOUT,
                        synced: false,
                    };
                    loop {
                        let left = deadline.saturating_duration_since(Instant::now());
                        match q.sync(left.min(Duration::from_secs(3))) {
                            Ok(()) => return Ok(q),
                            Err(e) => last = e,
                        }
                        if Instant::now() >= deadline {
                            break;
                        }
                    }
                }
                Err(e) => last = anyhow!(e).context(format!("connecting to {}", socket.display())),
            }
            if Instant::now() >= deadline {
                return Err(last.context("guest agent did not answer"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Sets the time each later command may take.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// `guest-sync-delimited` with a fresh id; drops anything stale.
    pub fn sync(&mut self, timeout: Duration) -> Result<()> {
        let id = u64::from(uuid::Uuid::new_v4().as_fields().0) & 0x7fff_ffff;
        let mut msg = vec![0xFFu8];
        msg.extend_from_slice(
            json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
                .to_string()
                .as_bytes(),
        );
        msg.push(b'\n');
        self.stream
            .write_all(&msg)
            .context("writing guest-sync-delimited")?;
        let deadline = Instant::now() + timeout;
        loop {
            // Wait for the delimiter, then drop everything up to and including it.
            while !self.buf.contains(&0xFF) {
                self.fill(deadline)
                    .context("waiting for the guest agent's sync delimiter")?;
            }
            let pos = self
                .buf
                .iter()
                .rposition(|b| *b == 0xFF)
                .expect("delimiter present");
            self.buf.drain(..=pos);
            let v = self
                .read_value(deadline)
                .context("reading guest-sync answer")?;
            if v.get("return").and_then(Value::as_u64) == Some(id) {
                self.synced = true;
                return Ok(());
            }
            tracing::trace!("qga: dropping stale answer {v}");
        }
    }

    /// Runs one command and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        if !self.synced {
            self.sync(self.timeout)?;
        }
        let mut req = json!({ "execute": command });
        if let Some(a) = arguments {
            req["arguments"] = a;
        }
        let mut line = req.to_string().into_bytes();
        line.push(b'\n');
        self.stream
            .write_all(&line)
            .with_context(|| format!("sending {command} to the guest agent"))?;
        let deadline = Instant::now() + self.timeout;
        let v = match self.read_value(deadline) {
            Ok(v) => v,
            Err(e) => {
                // A late answer would be taken for the next command's: resync first next time.
                self.synced = false;
                return Err(e.context(format!("waiting for the answer to {command}")));
            }
        };
        if let Some(r) = v.get("return") {
            return Ok(r.clone());
        }
        if let Some(err) = v.get("error") {
            let class = err.get("class").and_then(Value::as_str).unwrap_or("Error");
            let desc = err.get("desc").and_then(Value::as_str).unwrap_or("");
            bail!("guest agent refused {command}: {class}: {desc}");
        }
        self.synced = false;
        bail!("unexpected guest agent answer to {command}: {v}")
    }

    /// `guest-ping`.
    pub fn ping(&mut self) -> Result<()> {
        self.execute("guest-ping", None).map(|_| ())
    }

    /// Runs `path args…` in the guest, capturing output, and waits up to `timeout` for it to exit.
    pub fn exec(&mut self, path: &str, args: &[&str], timeout: Duration) -> Result<ExecOutput> {
        let started = self.execute(
            "guest-exec",
            Some(json!({"path": path, "arg": args, "capture-output": true})),
        )?;
        let pid = started
            .get("pid")
            .and_then(Value::as_i64)
            .context("guest-exec returned no pid")?;
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.execute("guest-exec-status", Some(json!({ "pid": pid })))?;
            if st.get("exited").and_then(Value::as_bool) == Some(true) {
                return parse_exec_status(&st);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{path} did not finish in the guest within {}s",
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Reads a whole file from the guest (`guest-file-open/read/close`).
    pub fn read_file(&mut self, path: &str) -> Result<Vec<u8>> {
        let handle = self
            .execute("guest-file-open", Some(json!({"path": path, "mode": "r"})))
            .with_context(|| format!("opening {path} in the guest"))?;
        let handle = handle
            .as_i64()
            .context("guest-file-open returned no handle")?;
        let result = self.read_handle(handle, path);
        let closed = self.execute("guest-file-close", Some(json!({ "handle": handle })));
        let data = result?;
        closed.with_context(|| format!("closing {path} in the guest"))?;
        Ok(data)
    }

    fn read_handle(&mut self, handle: i64, path: &str) -> Result<Vec<u8>> {
        let mut data = Vec::new();
        loop {
            let r = self
                .execute(
                    "guest-file-read",
                    Some(json!({"handle": handle, "count": 65536})),
                )
                .with_context(|| format!("reading {path} in the guest"))?;
            data.extend(decode_b64(r.get("buf-b64"))?);
            if data.len() > MAX_FILE {
                bail!("{path} in the guest is larger than {MAX_FILE} bytes");
            }
            let count = r.get("count").and_then(Value::as_u64).unwrap_or(0);
            if r.get("eof").and_then(Value::as_bool) == Some(true) || count == 0 {
                return Ok(data);
            }
        }
    }

    /// Reads more bytes into the buffer, failing at `deadline`.
    fn fill(&mut self, deadline: Instant) -> Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("guest agent timed out");
        }
        self.stream
            .set_read_timeout(Some(left))
            .context("setting guest agent read timeout")?;
        let mut chunk = [0u8; 8192];
        match self.stream.read(&mut chunk) {
            Ok(0) => bail!("guest agent socket closed"),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                bail!("guest agent timed out")
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e).context("reading from the guest agent"),
        }
    }

    /// Reads the next newline-terminated JSON object (skipping blank lines and delimiters).
    fn read_value(&mut self, deadline: Instant) -> Result<Value> {
        loop {
            if let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                let text: Vec<u8> = line.into_iter().filter(|b| *b != 0xFF).collect();
                let text = String::from_utf8_lossy(&text);
                if text.trim().is_empty() {
                    continue;
                }
                return serde_json::from_str(text.trim())
                    .with_context(|| format!("parsing guest agent answer {:?}", text.trim()));
            }
            self.fill(deadline)?;
        }
    }
}

fn decode_b64(v: Option<&Value>) -> Result<Vec<u8>> {
    match v.and_then(Value::as_str) {
        Some(s) => base64::engine::general_purpose::STANDARD
            .decode(s)
            .context("decoding base64 from the guest agent"),
        None => Ok(Vec::new()),
    }
}

/// Turns an exited `guest-exec-status` answer into an [`ExecOutput`].
pub fn parse_exec_status(st: &Value) -> Result<ExecOutput> {
    let int = |k: &str| st.get(k).and_then(Value::as_i64).map(|v| v as i32);
    Ok(ExecOutput {
        exit_code: int("exitcode"),
        signal: int("signal"),
        stdout: decode_b64(st.get("out-data"))?,
        stderr: decode_b64(st.get("err-data"))?,
    })
}

#[cfg(test)]
#[path = "qga_tests.rs"]
mod tests;
