//! `gitlab-fake`: runs the GitLab fake for manual end-to-end use.
//!
//! `gitlab-fake --listen 127.0.0.1:PORT` prints the admin `PRIVATE-TOKEN` on stdout (one line) and
//! the base URL on stderr, then serves until killed. It is a test fake: it hands out no jobs.

use imagectl_tests::gitlab_fake::GitlabFake;
use std::io::Write;
use std::net::SocketAddr;

fn main() {
    let mut listen: SocketAddr = "127.0.0.1:0".parse().expect("a valid address");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => {
                let v = args.next().unwrap_or_default();
                listen = v.parse().unwrap_or_else(|e| {
                    eprintln!("gitlab-fake: --listen {v:?}: {e}");
                    std::process::exit(2)
                });
            }
            "-h" | "--help" => {
                println!("usage: gitlab-fake [--listen ADDR:PORT]\n\nRuns imagectl's GitLab fake; prints the admin token on stdout.");
                return;
            }
            other => {
                eprintln!("gitlab-fake: unknown argument {other:?} (try --help)");
                std::process::exit(2);
            }
        }
    }
    let fake = GitlabFake::start_on(listen).unwrap_or_else(|e| {
        eprintln!("gitlab-fake: listening on {listen}: {e}");
        std::process::exit(1)
    });
    println!("{}", fake.admin_token());
    let _ = std::io::stdout().flush();
    eprintln!(
        "gitlab-fake: serving {}/api/v4 (a fake: it hands out no jobs)",
        fake.url()
    );
    loop {
        std::thread::park();
    }
}
