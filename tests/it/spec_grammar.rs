//! Spec grammar (issue 15): every field that reaches a shell, apt, GRUB or the image is refused
//! at load time with exit 2 naming the field, by `build --dry-run`, before anything is resolved.

use crate::support::{agent_bin, cache_dir, imagectl_bin, workspace};
use std::path::Path;
use std::process::{Command, Output};

const BASE: &str = "name: tiny\nversion: \"0.1\"\nbase:\n  distribution: debian\n  suite: bookworm\npackages: [linux-image-cloud-amd64]\n";

/// A private copy of the tiny fixture spec.
fn tiny_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = workspace().join("tests/fixtures/specs/tiny");
    let st = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", src.display()))
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(st.success());
    dir
}

fn dry_run(dir: &Path, extra: &[&str]) -> Output {
    Command::new(imagectl_bin())
        .arg("build")
        .arg(dir.join("tiny.yaml"))
        .args(["--dry-run", "--quiet", "--out"])
        .arg(dir.join("out"))
        .arg("--cache-dir")
        .arg(cache_dir())
        .arg("--agent-binary")
        .arg(agent_bin())
        .args(extra)
        .output()
        .expect("running imagectl build")
}

/// Writes `yaml` as the spec (and `profile` as profiles/p.yaml when given) and expects exit 2
/// with `want` in the message.
fn refused(yaml: &str, profile: Option<&str>, want: &str) {
    let dir = tiny_copy();
    std::fs::write(dir.path().join("tiny.yaml"), yaml).unwrap();
    let mut extra = vec![];
    if let Some(p) = profile {
        std::fs::create_dir_all(dir.path().join("profiles")).unwrap();
        std::fs::write(dir.path().join("profiles/p.yaml"), p).unwrap();
        extra = vec!["--profile", "p"];
    }
    let o = dry_run(dir.path(), &extra);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{yaml}\n{profile:?}\n{err}");
    assert!(
        err.contains(want),
        "expected {want:?} for\n{yaml}\nin: {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("Error {"),
        "{err}"
    );
}

fn spec(extra: &str) -> String {
    format!("{BASE}{extra}")
}

#[test]
fn users_shells_and_groups_are_strict() {
    for shell in [
        "'/bin/sh; rm -rf /'",
        "'$(id)'",
        "\"/bin/sh\\nid\"",
        "bash",
        "/opt/evil",
    ] {
        refused(
            &spec(&format!("users:\n  - {{name: ops, shell: {shell}}}\n")),
            None,
            "users[0].shell",
        );
    }
    refused(
        &spec("users:\n  - {name: ops, groups: ['docker; id']}\n"),
        None,
        "users[0].groups[0]",
    );
    refused(
        &spec("users:\n  - {name: ops, groups: ['a,b']}\n"),
        None,
        "users[0].groups[0]",
    );
    refused(
        &spec("groups:\n  - {name: 'x y'}\n"),
        None,
        "groups[0].name",
    );
}

#[test]
fn repository_fields_cannot_carry_a_second_line() {
    let repo = |url: &str, suite: &str, comps: &str| {
        spec(&format!(
            "apt_repositories:\n  - name: r\n    url: {url}\n    suite: {suite}\n    components: {comps}\n    key_file: files/hello.txt\n    key_fingerprint: F6403F6544A38863DAA0B6E03F01618A51312F3F\n"
        ))
    };
    let evil = "\"http://x/ bookworm main\\ndeb [trusted=yes] http://e/evil\"";
    refused(
        &repo(evil, "bookworm", "[main]"),
        None,
        "apt_repositories[0].url",
    );
    refused(
        &repo(
            "https://r.invalid/debian",
            "\"bookworm main\\ndeb http://e/evil x\"",
            "[main]",
        ),
        None,
        "apt_repositories[0].suite",
    );
    refused(
        &repo(
            "https://r.invalid/debian",
            "bookworm",
            "[\"main\\ndeb http://e/evil x\"]",
        ),
        None,
        "apt_repositories[0].components[0]",
    );
    refused(&spec("base: {distribution: debian, suite: bookworm, mirror: \"http://x/\\ndeb http://e/ x y\"}\n").replacen("base:\n  distribution: debian\n  suite: bookworm\n", "", 1), None, "base.mirror");
}

#[test]
fn packages_are_names_not_options_paths_or_patterns() {
    for p in [
        "--allow-unauthenticated",
        "-oAPT::Get::AllowUnauthenticated=true",
        "/path/evil.deb",
        "./evil.deb",
        "'?true'",
        "'!udev'",
        "linux-image-*",
    ] {
        refused(
            &format!("{BASE}packages: [\"{}\"]\n", p.trim_matches('\'')).replacen(
                "packages: [linux-image-cloud-amd64]\n",
                "",
                1,
            ),
            None,
            "packages[0]",
        );
        refused(
            BASE,
            Some(&format!(
                "add:\n  packages: [\"{}\"]\n",
                p.trim_matches('\'')
            )),
            "add.packages[0]",
        );
    }
}

#[test]
fn host_files_outside_the_spec_tree_are_refused() {
    refused(
        &spec("files:\n  - {src: /etc/shadow, dest: /etc/x}\n"),
        None,
        "files[0].src",
    );
    refused(
        &spec("files:\n  - {src: ../../../../../../etc/passwd, dest: /etc/x}\n"),
        None,
        "outside",
    );
    let dir = tiny_copy();
    std::os::unix::fs::symlink("/etc/passwd", dir.path().join("files/link")).unwrap();
    std::fs::write(
        dir.path().join("tiny.yaml"),
        spec("files:\n  - {src: files/link, dest: /etc/x}\n"),
    )
    .unwrap();
    let o = dry_run(dir.path(), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("files[0].src") && err.contains("outside"),
        "{err}"
    );
}

#[test]
fn hygiene_guard_sees_normalised_destinations() {
    refused(
        &spec("files:\n  - {content: x, dest: /etc//machine-id}\n"),
        None,
        "managed by imagectl",
    );
    refused(
        &spec("files:\n  - {content: x, dest: /etc//ssh/ssh_host_ed25519_key}\n"),
        None,
        "image hygiene",
    );
    refused(
        &spec("files:\n  - {content: x, dest: /etc/./ssh/ssh_host_ed25519_key/}\n"),
        None,
        "image hygiene",
    );
    refused(
        &spec("files:\n  - {content: x, dest: /usr/local/bin//imagectl-agent}\n"),
        None,
        "managed by imagectl",
    );
}

#[test]
fn kernel_cmdline_cannot_leave_the_linux_line() {
    for c in [
        "\"quiet\\nrm\"",
        "\"quiet }\\nmenuentry evil {\"",
        "'a\"b'",
        "'a;b'",
        "'a$b'",
        "'a`b'",
    ] {
        refused(
            &spec(&format!("kernel_cmdline: {c}\n")),
            None,
            "kernel_cmdline",
        );
    }
}

#[test]
fn build_version_follows_the_spec_version_rule() {
    let dir = tiny_copy();
    for v in ["../../evil", "", "a b"] {
        let o = dry_run(dir.path(), &["--version", v]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{v:?}: {err}");
        assert!(err.contains("--version"), "{err}");
    }
}

#[test]
fn alias_amplification_is_refused() {
    let big = "x".repeat(100_000);
    let uses = vec!["*s"; 500].join(", ");
    refused(
        &format!("{BASE}description: &s {big}\nunits: {{mask: [{uses}]}}\n"),
        None,
        "alias",
    );
}

#[test]
fn a_profile_cannot_hide_spec_errors() {
    let bad_sha = spec(&format!(
        "artifacts:\n  - {{name: a, url: 'https://x.invalid/a', sha256: '{}', dest: /usr/bin/a}}\n",
        "a".repeat(63)
    ));
    refused(
        &bad_sha,
        Some("remove:\n  artifacts: [a]\n"),
        "artifacts[0]",
    );
    refused(
        &spec("files:\n  - {content: x, dest: /etc/x, mode: '0999'}\n"),
        Some("remove:\n  files: [/etc/x]\n"),
        "octal mode",
    );
}
