//! Shared test support: the workspace binaries (built once per run, same profile and target dir
//! as this test binary) and the offline-profile image baked once per run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/it-… → target/<profile>
    exe.parent()
        .and_then(|d| d.parent())
        .expect("target profile dir")
        .to_path_buf()
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn build_bin(package: &str, bin: &str) -> PathBuf {
    let profile = profile_dir();
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args([
        "build",
        "--quiet",
        "-p",
        package,
        "--bin",
        bin,
        "--manifest-path",
    ])
    .arg(workspace().join("Cargo.toml"));
    if profile.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    if let Some(target) = profile.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    let status = cmd.status().expect("running cargo build");
    assert!(status.success(), "building {bin} failed");
    let path = profile.join(bin);
    assert!(path.is_file(), "{} missing after build", path.display());
    // A private copy: a concurrent `cargo build` may relink the original mid-run.
    let dir = test_dir().join(format!("bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join(bin);
    let _ = std::fs::remove_file(&copy);
    if std::fs::hard_link(&path, &copy).is_err() {
        std::fs::copy(&path, &copy).unwrap();
    }
    copy
}

/// Path of the `imagectl` binary.
pub fn imagectl_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_bin("imagectl", "imagectl"))
}

/// Path of the `imagectl-agent` binary.
pub fn agent_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_bin("imagectl-agent", "imagectl-agent"))
}

/// Where heavy test artefacts live: `$IMAGECTL_TEST_DIR`, else `target/imagectl-test`.
pub fn test_dir() -> PathBuf {
    std::env::var_os("IMAGECTL_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            profile_dir()
                .parent()
                .expect("target dir")
                .join("imagectl-test")
        })
}

/// The shared package/layer cache for tests.
pub fn cache_dir() -> PathBuf {
    test_dir().join("cache")
}

/// Serialises the tests that bake or boot: the machine has two cores.
pub fn heavy() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The offline-profile image of `image-specs/gitlab-runner.yaml`, baked once per test run against
/// what the mirror serves today (the rootfs layer is reused from the shared cache across runs).
/// Returns the qcow2 path.
pub fn offline_image() -> &'static Path {
    static IMG: OnceLock<PathBuf> = OnceLock::new();
    IMG.get_or_init(|| {
        let _agent = agent_bin();
        let out = test_dir().join("offline-out");
        let _ = std::fs::remove_dir_all(&out);
        // A lock of this run's own: the committed one pins versions the mirror may no longer
        // serve, and tests must never rewrite it. A lock left by an earlier run in the same test
        // directory is kept (its pins are then re-resolved if they drifted).
        std::fs::create_dir_all(test_dir()).unwrap();
        let lock = test_dir().join("offline.lock");
        let o = Command::new(imagectl_bin())
            .arg("build")
            .arg(workspace().join("image-specs/gitlab-runner.yaml"))
            .args(["--profile", "offline", "--output", "json", "--quiet"])
            .arg("--out")
            .arg(&out)
            .arg("--cache-dir")
            .arg(cache_dir())
            .arg("--lock")
            .arg(&lock)
            .arg("--agent-binary")
            .arg(agent_bin())
            .output()
            .expect("running imagectl build");
        assert!(
            o.status.success(),
            "offline bake failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("build JSON");
        PathBuf::from(v["image"].as_str().expect("image path"))
    })
}
