//! imagectl integration tests: one binary, one module per area.
mod agent;
mod agent_cli;
mod runner_double;
mod seed;
mod vm;

/// Path of the `imagectl` binary, built once per test run (`cargo build -p imagectl --bin imagectl`
/// with the same profile and target dir as this test binary).
pub fn imagectl_bin() -> &'static std::path::Path {
    static BIN: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test binary path");
        // target/<profile>/deps/it-… → target/<profile>
        let profile_dir = exe
            .parent()
            .and_then(|d| d.parent())
            .expect("target profile dir");
        let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let mut cmd =
            std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "imagectl",
            "--bin",
            "imagectl",
            "--manifest-path",
        ])
        .arg(&manifest);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        if let Some(target) = profile_dir.parent() {
            cmd.env("CARGO_TARGET_DIR", target);
        }
        let status = cmd.status().expect("running cargo build for imagectl");
        assert!(status.success(), "building imagectl failed");
        let bin = profile_dir.join("imagectl");
        assert!(bin.is_file(), "{} missing after build", bin.display());
        bin
    })
}
