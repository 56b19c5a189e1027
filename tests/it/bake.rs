//! Baking: spec errors (exit 2 with file:line:col), the rootfs layer cache and its invalidation,
//! the lock and `--locked`, bit-for-bit reproducibility, and image hygiene.
//!
//! The heavy test bakes the small `tests/fixtures/specs/tiny` spec for real (mmdebstrap from the
//! host's mirror, GRUB, ext4, qcow2) and reads the results back with `imagectl inspect`.

use crate::support::{agent_bin, cache_dir, heavy, imagectl_bin, workspace};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A private copy of the tiny fixture spec (so tests can edit it).
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

fn build(spec: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(imagectl_bin())
        .arg("build")
        .arg(spec)
        .args(["--output", "json", "--quiet"])
        .arg("--out")
        .arg(out)
        .arg("--cache-dir")
        .arg(cache_dir())
        .arg("--agent-binary")
        .arg(agent_bin())
        .args(extra)
        .output()
        .expect("running imagectl build")
}

pub(crate) fn json(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "imagectl failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("JSON on stdout")
}

pub(crate) fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn inspect(image: &Path) -> serde_json::Value {
    let o = Command::new(imagectl_bin())
        .arg("inspect")
        .arg(image)
        .args(["--output", "json", "--quiet"])
        .output()
        .unwrap();
    json(&o)
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

// ---- spec errors: fast, no bake ---------------------------------------------------------------

fn spec_error(yaml: &str) -> (i32, String) {
    let dir = tiny_copy();
    let spec = dir.path().join("tiny.yaml");
    write(&spec, yaml);
    let o = build(&spec, &dir.path().join("out"), &[]);
    assert!(
        !dir.path()
            .join("out")
            .read_dir()
            .map(|mut d| d.any(|e| { e.unwrap().path().extension().is_some_and(|x| x == "qcow2") }))
            .unwrap_or(false),
        "no image may be written on bad input"
    );
    (o.status.code().unwrap_or(-1), stderr(&o))
}

const BASE: &str = "name: tiny\nversion: \"0.1\"\nbase:\n  distribution: debian\n  suite: bookworm\npackages: [linux-image-cloud-amd64]\n";

#[test]
fn unknown_key_names_file_line_and_column() {
    let (code, err) = spec_error(&format!("{BASE}pakages: [vim]\n"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("tiny.yaml:7:1"), "{err}");
    assert!(err.contains("unknown field `pakages`"), "{err}");
    assert!(err.contains("expected one of"), "{err}");
}

#[test]
fn wrong_type_is_reported_with_location() {
    let (code, err) = spec_error(&format!("{BASE}disk:\n  size: [1]\n"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("tiny.yaml:8:9"), "{err}");
}

#[test]
fn semantic_errors_exit_2_with_a_clear_message() {
    let cases: &[(&str, &str)] = &[
        ("name: Tiny!\nversion: \"1\"\nbase: {distribution: debian, suite: bookworm}\n", "name \"Tiny!\""),
        ("name: t\nversion: \"1\"\nbase: {distribution: fedora, suite: f40}\n", "only \"debian\""),
        (&format!("{BASE}disk: {{size: 10MiB}}\n"), "at least 1GiB"),
        (&format!("{BASE}artifacts:\n  - {{name: a, url: 'https://x.invalid/a', sha256: abc, dest: /usr/bin/a}}\n"), "64 hex digits"),
        (&format!("{BASE}files:\n  - {{content: x, dest: relative/path}}\n"), "absolute file path"),
        (&format!("{BASE}files:\n  - {{content: x, dest: /etc/x, mode: '999'}}\n"), "octal mode"),
        (&format!("{BASE}files:\n  - {{content: KEY, dest: /etc/ssh/ssh_host_rsa_key}}\n"), "image hygiene"),
        (&format!("{BASE}files:\n  - {{src: nope.txt, dest: /etc/x}}\n"), "not found"),
        (&format!("{BASE}units: {{enable: [notaunit]}}\n"), "not a systemd unit"),
        (&format!("{BASE}apt_repositories:\n  - {{name: r, url: 'https://r.invalid/debian', suite: s}}\n"), "needs a signing key"),
        (&format!("{BASE}apt_repositories:\n  - {{name: r, url: 'https://r.invalid', suite: s, key_url: 'https://r.invalid/k', key_fingerprint: ABCD}}\n"), "40-hex-digit"),
        ("name: t\nversion: \"1\"\nbase: {distribution: debian, suite: bookworm, snapshot: yesterday}\n", "give \"auto\" or a timestamp"),
        ("name: t\nversion: \"1\"\nbase: {distribution: debian, suite: bookworm, snapshot_url: 'ftp://x'}\n", "base.snapshot_url"),
        ("name: t\nversion: \"1\"\nbase: {distribution: debian, suite: bookworm, key_file: files/hello.txt}\npackages: [linux-image-cloud-amd64]\n", "not an OpenPGP public key"),
        ("name: t\nversion: \"1\"\nbase: {distribution: debian, suite: bookworm, key_file: nope.asc}\n", "base.key_file"),
    ];
    for (yaml, want) in cases {
        let (code, err) = spec_error(yaml);
        assert_eq!(code, 2, "{yaml}\n{err}");
        assert!(err.contains(want), "expected {want:?} in: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn missing_spec_and_profile_exit_2() {
    let dir = tiny_copy();
    let o = build(
        &dir.path().join("missing.yaml"),
        &dir.path().join("out"),
        &[],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = build(
        &dir.path().join("tiny.yaml"),
        &dir.path().join("out"),
        &["--profile", "nosuch"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("profile \"nosuch\" not found"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn locked_without_a_lock_exits_2_before_any_work() {
    let dir = tiny_copy();
    let o = build(
        &dir.path().join("tiny.yaml"),
        &dir.path().join("out"),
        &["--locked"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));
    assert!(!dir.path().join("tiny.lock").exists());
}

#[test]
fn offline_profile_loads_and_swaps_the_unreachable_sources() {
    let l = imagectl::spec::load(
        &workspace().join("image-specs/gitlab-runner.yaml"),
        &["offline".to_string()],
    )
    .unwrap();
    let s = &l.spec;
    assert!(!s.packages.iter().any(|p| p == "gitlab-runner"));
    assert!(
        s.artifacts.is_empty(),
        "the GitHub cAdvisor artifact is swapped out"
    );
    assert!(s.apt_repositories.iter().all(|r| r.url == "host"));
    assert!(s
        .apt_repositories
        .iter()
        .any(|r| r.packages == ["cadvisor"]));
    assert_eq!(s.local_packages.len(), 1);
    assert!(l
        .resolve(&s.local_packages[0].dir)
        .join("DEBIAN/control")
        .is_file());
    assert!(l
        .default_lock_path()
        .ends_with("gitlab-runner.offline.lock"));
    // Without the profile, the spec names GitLab's repository with a pinned key, and cAdvisor
    // from GitHub pinned by sha256.
    let full =
        imagectl::spec::load(&workspace().join("image-specs/gitlab-runner.yaml"), &[]).unwrap();
    let gl = full
        .spec
        .apt_repositories
        .iter()
        .find(|r| r.name == "gitlab-runner")
        .unwrap();
    assert_eq!(
        gl.key_fingerprint.as_deref(),
        Some("F6403F6544A38863DAA0B6E03F01618A51312F3F")
    );
    assert_eq!(full.spec.artifacts[0].name, "cadvisor");
}

// ---- the real thing ---------------------------------------------------------------------------

fn image_path(v: &serde_json::Value) -> PathBuf {
    PathBuf::from(v["image"].as_str().unwrap())
}

fn file_in_image(image: &Path, path: &str) -> Option<Vec<u8>> {
    imagectl::inspect::RootFs::open(image)
        .unwrap()
        .read(path)
        .unwrap()
}

#[test]
fn bake_cache_lock_and_reproducibility() {
    let _g = heavy();
    let dir = tiny_copy();
    let spec = dir.path().join("tiny.yaml");
    let lock = dir.path().join("tiny.lock");
    let out = dir.path().join("out");

    // 1. A build: creates the lock; the layer may come from an earlier run's cache.
    let first = json(&build(&spec, &out, &[]));
    assert!(lock.is_file(), "the first build writes the lock");
    let lock_text = std::fs::read_to_string(&lock).unwrap();
    assert!(
        lock_text.contains("name = \"linux-image-cloud-amd64\""),
        "{lock_text}"
    );
    assert!(lock_text.contains("sha256 = \""));
    let img1 = image_path(&first);
    let report = inspect(&img1);
    assert_eq!(report["ok"], true, "{report:#}");
    for c in report["hygiene"].as_array().unwrap() {
        assert_eq!(c["ok"], true, "hygiene check failed: {c}");
    }
    assert_eq!(report["qcow2"]["compression"], "zstd");
    assert_eq!(report["qcow2"]["has_backing_file"], false);
    assert_eq!(report["manifest_sha256_matches"], true);
    assert_eq!(
        file_in_image(&img1, "/etc/imagectl-test/hello.txt").unwrap(),
        b"hello from the tiny fixture\n"
    );
    let link = imagectl::inspect::RootFs::open(&img1)
        .unwrap()
        .list("/etc/systemd/system/multi-user.target.wants")
        .unwrap();
    assert!(link.contains(&"hello.service".to_string()), "{link:?}");

    // 2. The same spec and lock, the layer rebuilt from scratch (now pinned to the lock; the
    //    packages come from the .deb cache): bit-identical to the fresh resolution.
    let second = json(&build(&spec, &dir.path().join("out2"), &["--no-cache"]));
    assert_eq!(second["layer_cached"], false);
    assert_eq!(
        second["sha256"], first["sha256"],
        "same spec + lock + packages must give the same bytes"
    );
    assert_eq!(second["version"], first["version"]);
    assert!(second["lock_changes"].as_array().unwrap().is_empty());

    // 3. Change a file: the layer is reused (warm) and the new content is in the image.
    write(&dir.path().join("files/hello.txt"), "changed\n");
    let warm = json(&build(&spec, &out, &[]));
    assert_eq!(
        warm["layer_key"], second["layer_key"],
        "a file change must not change the layer key"
    );
    assert_eq!(
        warm["layer_cached"], true,
        "a file change must reuse the layer"
    );
    assert_ne!(
        warm["version"], first["version"],
        "new content, new version"
    );
    assert_eq!(
        file_in_image(&image_path(&warm), "/etc/imagectl-test/hello.txt").unwrap(),
        b"changed\n"
    );

    // 4. --locked with a lock that no longer matches the spec's packages: exit 2, nothing built.
    let yaml = std::fs::read_to_string(&spec).unwrap();
    write(
        &spec,
        &yaml.replace("  - systemd-sysv\n", "  - systemd-sysv\n  - less\n"),
    );
    let before: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
    let o = build(&spec, &out, &["--locked"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("out of date"), "{}", stderr(&o));
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), before.len());
    assert_eq!(
        std::fs::read_to_string(&lock).unwrap(),
        lock_text,
        "--locked never writes the lock"
    );

    // 5. Without --locked, a package change rebuilds the layer (never a stale one) and updates the lock.
    let grown = json(&build(&spec, &out, &[]));
    assert_eq!(
        grown["layer_cached"], false,
        "a package change must rebuild the layer"
    );
    let changes: Vec<String> = serde_json::from_value(grown["lock_changes"].clone()).unwrap();
    assert!(
        changes.iter().any(|c| c.starts_with("+ less ")),
        "{changes:?}"
    );
    let pkgs = inspect(&image_path(&grown))["packages"].clone();
    assert!(
        pkgs.as_array().unwrap().iter().any(|p| p["name"] == "less"),
        "less is installed"
    );

    // 6. --locked with the matching lock succeeds from the cache.
    let locked = json(&build(&spec, &out, &["--locked"]));
    assert_eq!(locked["layer_cached"], true);
    assert_eq!(locked["sha256"], grown["sha256"]);

    // 7. --locked when the resolution differs from the lock (a tampered sha256): exit 2.
    let text = std::fs::read_to_string(&lock).unwrap();
    let tampered = text.replacen("sha256 = \"", "sha256 = \"00", 1);
    write(&lock, &tampered);
    let o = build(&spec, &out, &["--locked"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("resolution differs"), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&lock).unwrap(), tampered);
}

#[test]
fn unreachable_source_fails_fast_naming_it_and_the_offline_profile() {
    // GitLab's repository and GitHub releases cannot be reached from the machines this suite runs
    // on; the default spec needs both. The build must stop before any bootstrap, quickly, and say
    // which source failed and that `--profile offline` exists.
    let out = tempfile::tempdir().unwrap();
    let (_, _) = (imagectl_bin(), agent_bin());
    let t = std::time::Instant::now();
    let o = build(
        &workspace().join("image-specs/gitlab-runner.yaml"),
        out.path(),
        &["--lock", &out.path().join("x.lock").to_string_lossy()],
    );
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("packages.gitlab.com"),
        "names the source: {err}"
    );
    assert!(
        err.contains("--profile offline"),
        "names the profile: {err}"
    );
    assert!(
        t.elapsed() < std::time::Duration::from_secs(45),
        "took {:?}",
        t.elapsed()
    );
    assert!(!out.path().join("x.lock").exists(), "no lock is written");
}
