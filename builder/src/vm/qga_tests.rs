//! Tests of the guest agent client against a test peer: a small unix-socket server written here
//! that speaks qemu-ga's documented JSON protocol (it is not qemu-ga).

use super::*;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};

const STATUS: &str = r#"{"state":"registered","runner_id":7}"#;

fn b64(s: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Starts the test peer; returns the socket path (in `dir`) and the log of commands it received.
fn test_peer(dir: &Path) -> (std::path::PathBuf, Arc<Mutex<Vec<String>>>) {
    let path = dir.join("qga.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = log.clone();
    std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let mut out = conn.try_clone().unwrap();
        let mut reader = BufReader::new(conn);
        let mut status_calls = 0;
        let mut file_reads = 0;
        // An answer left over from an earlier session: the client must drop it.
        out.write_all(b"{\"return\": {\"stale\": true}}\n").unwrap();
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            let text: Vec<u8> = line.drain(..).filter(|b| *b != 0xFF).collect();
            let req: Value = match serde_json::from_slice(&text) {
                Ok(v) => v,
                Err(_) => continue,
            };
            let cmd = req["execute"].as_str().unwrap_or_default().to_string();
            seen.lock().unwrap().push(cmd.clone());
            let args = &req["arguments"];
            let answer = match cmd.as_str() {
                "guest-sync-delimited" => {
                    out.write_all(&[0xFF]).unwrap();
                    json!({ "return": args["id"] })
                }
                "guest-ping" => json!({"return": {}}),
                "guest-exec" => {
                    assert_eq!(args["capture-output"], json!(true));
                    json!({"return": {"pid": 4242}})
                }
                "guest-exec-status" => {
                    assert_eq!(args["pid"], json!(4242));
                    status_calls += 1;
                    if status_calls == 1 {
                        json!({"return": {"exited": false}})
                    } else {
                        json!({"return": {"exited": true, "exitcode": 3,
                            "out-data": b64(b"inactive\n"), "err-data": b64(b"oops")}})
                    }
                }
                "guest-file-open" if args["path"] == "/var/lib/imagectl/status.json" => {
                    json!({"return": 5})
                }
                "guest-file-open" => json!({"error": {"class": "GenericError",
                    "desc": "failed to open file: No such file or directory"}}),
                "guest-file-read" => {
                    file_reads += 1;
                    let (part, eof) = match file_reads {
                        1 => (&STATUS.as_bytes()[..10], false),
                        2 => (&STATUS.as_bytes()[10..], true),
                        _ => (&b""[..], true),
                    };
                    json!({"return": {"count": part.len(), "buf-b64": b64(part), "eof": eof}})
                }
                "guest-file-close" => json!({"return": {}}),
                _ => json!({"error": {"class": "CommandNotFound", "desc": "unknown"}}),
            };
            out.write_all(format!("{answer}\n").as_bytes()).unwrap();
        }
    });
    (path, log)
}

#[test]
fn sync_ping_exec_and_file_read() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, log) = test_peer(dir.path());
    let mut q = Qga::connect(&sock, Duration::from_secs(5)).unwrap();
    q.ping().unwrap();

    let out = q
        .exec(
            "/bin/systemctl",
            &["is-active", "docker"],
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(out.exit_code, Some(3));
    assert!(!out.success());
    assert_eq!(out.stdout_text(), "inactive");
    assert_eq!(out.stderr, b"oops");

    let data = q.read_file("/var/lib/imagectl/status.json").unwrap();
    assert_eq!(data, STATUS.as_bytes());
    let status: imagectl_proto::AgentStatus = serde_json::from_slice(&data).unwrap();
    assert_eq!(status.state, imagectl_proto::AgentState::Registered);

    let err = q.read_file("/nope").unwrap_err();
    assert!(format!("{err:#}").contains("No such file"), "{err:#}");

    let log = log.lock().unwrap().clone();
    assert_eq!(log[0], "guest-sync-delimited");
    assert_eq!(log.iter().filter(|c| *c == "guest-exec-status").count(), 2);
    assert_eq!(log.iter().filter(|c| *c == "guest-file-close").count(), 1);
}

#[test]
fn connect_times_out_when_nobody_answers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("silent.sock");
    // Accepts but never answers, like QEMU's socket before the guest agent runs.
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let _held: Vec<_> = listener.incoming().take(4).collect();
        std::thread::sleep(Duration::from_secs(10));
    });
    let start = Instant::now();
    let err = match Qga::connect(&path, Duration::from_millis(700)) {
        Ok(_) => panic!("a silent peer must not sync"),
        Err(e) => e,
    };
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(format!("{err:#}").contains("did not answer"), "{err:#}");
}

#[test]
fn exec_status_parsing() {
    let st = json!({"exited": true, "signal": 9});
    let out = parse_exec_status(&st).unwrap();
    assert_eq!(out.signal, Some(9));
    assert_eq!(out.exit_code, None);
    assert!(!out.success());
    assert!(parse_exec_status(&json!({"exited": true, "out-data": "!!notbase64"})).is_err());
}
