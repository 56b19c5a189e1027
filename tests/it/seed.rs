//! Seed ISO tests: the library writer and the `imagectl seed` command, read back with xorriso and
//! checked with `cloud-init schema`.

use crate::imagectl_bin;
use imagectl::seed::{self, AdminUser, Network, SeedConfig, StaticNet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const TOKEN: &str = "glrt-it-TOPSECRET-0123456789";
const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJx7yQk0bxQ2cW0s8lR4h1mZ4cM3H0Vt2m9yq0x6Y1pK ops@example";

fn agent() -> seed::AgentSeed {
    let mut a: seed::AgentSeed = serde_json::from_value(serde_json::json!({
        "version": 1, "gitlab_url": "https://gitlab.example.com", "runner_token": "",
        "runner_id": 42, "runner_name": "imagectl/ci/ci-01"
    }))
    .unwrap();
    a.runner_token = seed::Secret::new(TOKEN);
    a
}

/// Extracts an ISO with xorriso (Rock Ridge names) and makes the copy writable for cleanup.
fn extract(iso: &Path, dir: &Path) -> PathBuf {
    let out = dir.join("extracted");
    let st = Command::new("xorriso")
        .args(["-osirrox", "on", "-indev"])
        .arg(iso)
        .args(["-extract", "/"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    for d in [out.clone(), out.join("imagectl")] {
        if d.is_dir() {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    out
}

/// `xorriso … -find / -exec lsdl` lines of an ISO (Rock Ridge modes and owners).
fn listing(iso: &Path) -> String {
    let out = Command::new("xorriso")
        .args(["-report_about", "WARNING", "-indev"])
        .arg(iso)
        .args(["-find", "/", "-exec", "lsdl"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn volume_id(iso: &Path) -> String {
    let out = Command::new("xorriso")
        .arg("-indev")
        .arg(iso)
        .arg("-pvd_info")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("Volume Id    : "))
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn schema_ok(user_data: &Path) {
    let out = Command::new("cloud-init")
        .args(["schema", "--config-file"])
        .arg(user_data)
        .output()
        .expect("running cloud-init schema");
    assert!(
        out.status.success(),
        "cloud-init schema rejected {}:\n{}{}",
        user_data.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn library_iso_has_the_nocloud_layout() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = SeedConfig::new("ci-01.example.com").unwrap();
    cfg.instance_id = "iid-ci-01-test".into();
    cfg.agent = Some(agent());
    cfg.admin = Some(AdminUser {
        name: "ops".into(),
        ssh_authorized_keys: vec![KEY.into()],
    });
    let iso = dir.path().join("seed.iso");
    let info = seed::write_iso(&cfg, &iso).unwrap();
    assert_eq!(info.instance_id, "iid-ci-01-test");
    assert_eq!(info.sha256, imagectl::util::sha256_file(&iso).unwrap());
    assert_eq!(
        std::fs::metadata(&iso).unwrap().permissions().mode() & 0o777,
        0o600
    );

    assert_eq!(volume_id(&iso), "cidata");
    // Joliet: a supplementary volume descriptor (type 2) with a UCS-2 escape sequence at sector 17.
    let raw = std::fs::read(&iso).unwrap();
    let svd = &raw[17 * 2048..18 * 2048];
    assert_eq!(&svd[..6], b"\x02CD001");
    assert_eq!(&svd[88..90], b"%/");

    let ls = listing(&iso);
    let line = |name: &str| {
        ls.lines()
            .find(|l| l.ends_with(&format!("'{name}'")))
            .unwrap_or_else(|| panic!("{name} missing:\n{ls}"))
            .to_string()
    };
    assert!(
        line("/imagectl/agent.json").starts_with("-r--------    1 0        0 "),
        "{ls}"
    );
    assert!(
        line("/user-data").starts_with("-r--r--r--    1 0        0 "),
        "{ls}"
    );
    line("/meta-data");
    line("/network-config");

    let x = extract(&iso, dir.path());
    let user_data = std::fs::read_to_string(x.join("user-data")).unwrap();
    let meta = std::fs::read_to_string(x.join("meta-data")).unwrap();
    let net = std::fs::read_to_string(x.join("network-config")).unwrap();
    let agent_json = std::fs::read_to_string(x.join("imagectl/agent.json")).unwrap();
    assert!(user_data.starts_with("#cloud-config\n"));
    for (name, text) in [
        ("user-data", &user_data),
        ("meta-data", &meta),
        ("network-config", &net),
    ] {
        assert!(!text.contains(TOKEN), "token leaked into {name}");
    }
    let ud: serde_yaml::Value = serde_yaml::from_str(&user_data).unwrap();
    assert_eq!(ud["hostname"].as_str(), Some("ci-01"));
    assert_eq!(ud["preserve_hostname"].as_bool(), Some(false));
    assert_eq!(ud["users"][0]["ssh_authorized_keys"][0].as_str(), Some(KEY));
    let md: serde_yaml::Value = serde_yaml::from_str(&meta).unwrap();
    assert_eq!(md["instance-id"].as_str(), Some("iid-ci-01-test"));
    assert_eq!(md["local-hostname"].as_str(), Some("ci-01.example.com"));
    let nc: serde_yaml::Value = serde_yaml::from_str(&net).unwrap();
    assert_eq!(nc["version"].as_u64(), Some(2));
    assert_eq!(nc["ethernets"]["eth0"]["dhcp4"].as_bool(), Some(true));
    let parsed: imagectl_proto::AgentSeed = serde_json::from_str(&agent_json).unwrap();
    assert_eq!(parsed.runner_token.expose(), TOKEN);
    assert_eq!(parsed.runner_id, 42);
    schema_ok(&x.join("user-data"));
}

#[test]
fn seed_without_agent_and_with_static_network() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = SeedConfig::new("imagectl-test").unwrap();
    cfg.network = Network::Static(StaticNet {
        address: "192.0.2.10/24".into(),
        gateway: Some("192.0.2.1".parse().unwrap()),
        dns: vec!["192.0.2.53".parse().unwrap()],
    });
    let iso = dir.path().join("s.iso");
    let info = seed::write_iso(&cfg, &iso).unwrap();
    assert!(!info.agent);
    assert!(info.instance_id.starts_with("iid-imagectl-test-"));
    let x = extract(&iso, dir.path());
    assert!(
        !x.join("imagectl").exists(),
        "no agent.json without an agent"
    );
    let nc: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(x.join("network-config")).unwrap()).unwrap();
    assert_eq!(
        nc["ethernets"]["eth0"]["addresses"][0].as_str(),
        Some("192.0.2.10/24")
    );
    assert_eq!(
        nc["ethernets"]["eth0"]["routes"][0]["via"].as_str(),
        Some("192.0.2.1")
    );
    schema_ok(&x.join("user-data"));
}

fn imagectl(args: &[&str], dir: &Path, envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(imagectl_bin());
    cmd.args(args)
        .current_dir(dir)
        .env_remove("IMAGECTL_RUNNER_TOKEN")
        .env_remove("SOURCE_DATE_EPOCH");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn cli_is_reproducible_and_never_prints_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("token"), format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(d.join("token"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(d.join("key.pub"), format!("{KEY}\n")).unwrap();
    let args = |out: &'static str| {
        vec![
            "seed",
            "--out",
            out,
            "--hostname",
            "ci-01",
            "--instance-id",
            "iid-ci-01-fixed",
            "--gitlab-url",
            "https://gitlab.example.com",
            "--runner-id",
            "42",
            "--token-file",
            "token",
            "--ssh-key",
            "key.pub",
            "-vv",
            "-o",
            "json",
        ]
    };
    let a = imagectl(&args("a.iso"), d, &[]);
    assert!(a.status.success(), "{}", text(&a));
    let b = imagectl(&args("b.iso"), d, &[("SOURCE_DATE_EPOCH", "1700000000")]);
    assert!(b.status.success(), "{}", text(&b));
    assert!(
        !text(&a).contains(TOKEN) && !text(&b).contains(TOKEN),
        "token printed"
    );
    let ja: serde_json::Value = serde_json::from_slice(&a.stdout).unwrap();
    assert_eq!(ja["instance_id"], "iid-ci-01-fixed");
    assert_eq!(ja["agent"], true);
    let bytes_a = std::fs::read(d.join("a.iso")).unwrap();
    assert_eq!(
        bytes_a,
        std::fs::read(d.join("b.iso")).unwrap(),
        "same input, different bytes"
    );
    assert_eq!(
        ja["sha256"].as_str().unwrap(),
        imagectl::util::sha256_file(&d.join("a.iso")).unwrap()
    );
    // A different epoch changes the dates, and so the bytes.
    let c = imagectl(&args("c.iso"), d, &[("SOURCE_DATE_EPOCH", "1600000000")]);
    assert!(c.status.success(), "{}", text(&c));
    assert_ne!(bytes_a, std::fs::read(d.join("c.iso")).unwrap());

    // Token from the environment works too.
    let e = imagectl(
        &[
            "seed",
            "--out",
            "e.iso",
            "--hostname",
            "ci-02",
            "--gitlab-url",
            "http://10.0.2.100",
            "--runner-id",
            "7",
        ],
        d,
        &[("IMAGECTL_RUNNER_TOKEN", TOKEN)],
    );
    assert!(e.status.success(), "{}", text(&e));
    assert!(!text(&e).contains(TOKEN));
    let x = extract(&d.join("e.iso"), d);
    let seed: imagectl_proto::AgentSeed =
        serde_json::from_str(&std::fs::read_to_string(x.join("imagectl/agent.json")).unwrap())
            .unwrap();
    assert_eq!(seed.runner_token.expose(), TOKEN);
    assert_eq!(seed.gitlab_url, "http://10.0.2.100");
}

#[test]
fn cli_rejects_bad_input_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("id_ed25519"),
        "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n",
    )
    .unwrap();
    std::fs::write(d.join("token"), TOKEN).unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["seed", "--out", "x.iso", "--hostname", "Bad_Name"],
            "invalid hostname",
        ),
        (
            &[
                "seed",
                "--out",
                "x.iso",
                "--hostname",
                "h",
                "--instance-id",
                "a b",
            ],
            "invalid instance id",
        ),
        (
            &[
                "seed",
                "--out",
                "x.iso",
                "--hostname",
                "h",
                "--gitlab-url",
                "https://g.example",
                "--runner-id",
                "1",
            ],
            "no runner token",
        ),
        (
            &[
                "seed",
                "--out",
                "x.iso",
                "--hostname",
                "h",
                "--runner-id",
                "1",
                "--token-file",
                "token",
            ],
            "--gitlab-url",
        ),
        (
            &[
                "seed",
                "--out",
                "x.iso",
                "--hostname",
                "h",
                "--gitlab-url",
                "ftp://g",
                "--runner-id",
                "1",
                "--token-file",
                "token",
            ],
            "invalid GitLab URL",
        ),
        (
            &[
                "seed",
                "--out",
                "x.iso",
                "--hostname",
                "h",
                "--ssh-key",
                "id_ed25519",
            ],
            "private SSH key",
        ),
        (
            &[
                "seed",
                "--out",
                "x.iso",
                "--hostname",
                "h",
                "--static-ip",
                "10.0.0.5",
            ],
            "ADDRESS/PREFIX",
        ),
        (
            &[
                "seed",
                "--out",
                "x.iso",
                "--hostname",
                "h",
                "--gateway",
                "10.0.0.1",
            ],
            "--static-ip",
        ),
        (
            &["seed", "--out", "nodir/x.iso", "--hostname", "h"],
            "does not exist",
        ),
        (
            &[
                "seed",
                "--out",
                "x.iso",
                "--hostname",
                "h",
                "--token",
                TOKEN,
            ],
            "unexpected argument",
        ),
    ];
    for (args, want) in cases {
        let o = imagectl(args, d, &[]);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {t}");
        assert!(t.contains(want), "{args:?}: expected {want:?} in {t}");
        assert!(!d.join("x.iso").exists(), "{args:?} wrote an ISO");
    }
}
