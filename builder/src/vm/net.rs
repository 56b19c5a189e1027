//! Loopback networking helpers: free ports, waiting for a port, and a minimal HTTP GET.
//!
//! Note on QEMU `hostfwd`: the host side accepts connections as soon as QEMU runs, whether or not
//! anything listens in the guest, so [`wait_for_port`] only says QEMU is up. Use [`http_get`] (a
//! real response) to know a guest service answers.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Largest response body [`http_get`] reads.
pub const MAX_BODY: usize = 32 << 20;

/// A free TCP port on 127.0.0.1 (bound and released; another process could take it meanwhile).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a free loopback port")?;
    Ok(l.local_addr().context("reading the bound port")?.port())
}

/// `n` distinct free ports, all held while picking so they differ.
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| {
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding a free loopback port")
        })
        .collect::<Result<_>>()?;
    held.iter()
        .map(|l| Ok(l.local_addr().context("reading the bound port")?.port()))
        .collect()
}

/// Waits until something accepts TCP connections on `127.0.0.1:port`; returns the time waited.
pub fn wait_for_port(port: u16, timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            bail!(
                "nothing listens on 127.0.0.1:{port} after {}s",
                timeout.as_secs()
            );
        }
        if TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(1))).is_ok() {
            return Ok(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100).min(left));
    }
}

/// An HTTP response: status code and body (lossily decoded as UTF-8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Body.
    pub body: String,
}

/// `GET http://127.0.0.1:{port}{path}` over HTTP/1.0 (no chunking), with one overall timeout.
pub fn http_get(port: u16, path: &str, timeout: Duration) -> Result<HttpResponse> {
    let deadline = Instant::now() + timeout;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    s.set_write_timeout(Some(timeout))
        .context("setting write timeout")?;
    // One write: some small HTTP servers read the request head with a single read.
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: imagectl\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    s.write_all(request.as_bytes())
        .with_context(|| format!("sending GET {path} to 127.0.0.1:{port}"))?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!(
                "GET 127.0.0.1:{port}{path} timed out after {}s",
                timeout.as_secs()
            );
        }
        s.set_read_timeout(Some(left))
            .context("setting read timeout")?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                if raw.len() > MAX_BODY {
                    bail!("response from 127.0.0.1:{port}{path} is larger than {MAX_BODY} bytes");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                bail!(
                    "GET 127.0.0.1:{port}{path} timed out after {}s",
                    timeout.as_secs()
                );
            }
            Err(e) => {
                return Err(e).with_context(|| format!("reading GET {path} from 127.0.0.1:{port}"))
            }
        }
    }
    parse_response(&raw).with_context(|| format!("parsing the answer of 127.0.0.1:{port}{path}"))
}

/// Parses an HTTP/1.x response without transfer encoding.
pub fn parse_response(raw: &[u8]) -> Result<HttpResponse> {
    if raw.is_empty() {
        bail!("connection closed without a response");
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of HTTP headers")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let proto = parts.next().unwrap_or_default();
    if !proto.starts_with("HTTP/1.") {
        bail!(
            "not an HTTP response: {:?}",
            crate::util::tail(status_line, 1)
        );
    }
    let status: u16 = parts
        .next()
        .and_then(|c| c.parse().ok())
        .context("no status code in the HTTP response")?;
    Ok(HttpResponse {
        status,
        body: String::from_utf8_lossy(&raw[split + 4..]).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-shot HTTP server on a free port answering `answer` verbatim.
    fn serve_once(answer: &'static str) -> u16 {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = c.read(&mut buf).unwrap();
                assert!(n > 0, "client closed before the end of its request");
                req.extend_from_slice(&buf[..n]);
            }
            assert!(String::from_utf8_lossy(&req).starts_with("GET /metrics HTTP/1.0\r\n"));
            c.write_all(answer.as_bytes()).unwrap();
        });
        port
    }

    #[test]
    fn get_reads_status_and_body() {
        let port = serve_once("HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nnode_exporter_build_info{version=\"1\"} 1\n");
        let r = http_get(port, "/metrics", Duration::from_secs(5)).unwrap();
        assert_eq!(r.status, 200);
        assert!(r.body.contains("node_exporter_build_info"));
    }

    #[test]
    fn closed_without_answer_is_an_error() {
        let port = serve_once("");
        let e = http_get(port, "/metrics", Duration::from_secs(5)).unwrap_err();
        assert!(format!("{e:#}").contains("without a response"), "{e:#}");
    }

    #[test]
    fn ports_are_free_and_waitable() {
        let ports = free_ports(3).unwrap();
        assert_eq!(ports.len(), 3);
        assert!(ports[0] != ports[1] && ports[1] != ports[2] && ports[0] != ports[2]);
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, ports[0])).unwrap();
        wait_for_port(ports[0], Duration::from_secs(2)).unwrap();
        drop(l);
        let p = free_port().unwrap();
        let e = wait_for_port(p, Duration::from_millis(300)).unwrap_err();
        assert!(e.to_string().contains("nothing listens"), "{e}");
    }

    #[test]
    fn parse_rejects_garbage() {
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert_eq!(
            parse_response(b"HTTP/1.1 404 Not Found\r\n\r\nx")
                .unwrap()
                .status,
            404
        );
    }
}
