//! A moving mirror: pins that stop being served, the snapshot archive, the .deb cache and an
//! air-gapped rebuild, against a real signed apt repository on loopback (see `drift/aptrepo.rs`)
//! made of real Debian packages from the test cache.
//!
//! 1. A fresh build against the repository (empty cache) records the snapshot timestamp and an
//!    artifact's sha256 (trust on first use) in the lock.
//! 2. The mirror replaces `netbase`'s version. `--locked` (no cache, no snapshot yet) exits 2
//!    naming the package, the sources tried and the remedies, and builds nothing.
//! 3. A plain build re-resolves just that package and reports it; the lock moves.
//! 4. The snapshot at the lock's timestamp still holds the old version (its Release expired): a
//!    `--locked` rebuild with no cache succeeds, bit-identical to 1.
//! 5. `imagectl fetch` fills a directory; with the mirror gone, `--locked --cache-dir DIR` (the old
//!    .deb in the cache) rebuilds bit-identical to 1.
//! 6. A changed artifact is refused against the lock's sha256.

#[path = "drift/aptrepo.rs"]
mod aptrepo;

use crate::bake::{json as ok_json, stderr as err};
use crate::support::{agent_bin, cache_dir, heavy, imagectl_bin, offline_image};
use aptrepo::AptRepo;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn imagectl(args: &[&str], extra: &[&Path]) -> Output {
    let mut c = Command::new(imagectl_bin());
    c.args(args);
    for p in extra {
        c.arg(p);
    }
    c.args(["--output", "json", "--quiet"]);
    c.output().expect("running imagectl")
}

fn build(spec: &Path, out: &Path, cache: &Path, lock: &Path, flags: &[&str]) -> Output {
    let mut c = Command::new(imagectl_bin());
    c.arg("build")
        .arg(spec)
        .args(["--output", "json", "--quiet", "--agent-binary"])
        .arg(agent_bin())
        .arg("--out")
        .arg(out)
        .arg("--cache-dir")
        .arg(cache)
        .arg("--lock")
        .arg(lock)
        .args(flags);
    c.output().expect("running imagectl build")
}

fn lock_value(lock: &Path, key: &str) -> Option<String> {
    let v: toml::Value = toml::from_str(&std::fs::read_to_string(lock).unwrap()).unwrap();
    v.get(key).and_then(|x| x.as_str()).map(str::to_string)
}

fn pinned_version(lock: &Path, name: &str) -> Option<String> {
    let v: toml::Value = toml::from_str(&std::fs::read_to_string(lock).unwrap()).unwrap();
    v["package"]
        .as_array()?
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .and_then(|p| p["version"].as_str())
        .map(str::to_string)
}

fn write_spec(dir: &Path, repo: &AptRepo) -> PathBuf {
    let spec = dir.join("drift.yaml");
    std::fs::write(
        &spec,
        format!(
            "name: drift\nversion: \"0.1\"\nbase:\n  distribution: debian\n  suite: bookworm\n  \
             mirror: {mirror}\n  snapshot: auto\n  snapshot_url: {snap}\n  key_file: repo-key.asc\n\
             packages: [linux-image-cloud-amd64, initramfs-tools, netbase]\n\
             artifacts:\n  - name: tool\n    url: http://127.0.0.1:{port}/files/tool\n    \
             dest: /usr/local/bin/tool\n    mode: \"0755\"\n\
             disk:\n  size: 1GiB\n  boot: bios\n",
            mirror = repo.mirror(),
            snap = repo.snapshot_base(),
            port = repo.port,
        ),
    )
    .unwrap();
    std::fs::copy(&repo.key, dir.join("repo-key.asc")).unwrap();
    spec
}

fn read_in_image(image: &str, path: &str) -> Option<Vec<u8>> {
    imagectl::inspect::RootFs::open(Path::new(image))
        .unwrap()
        .read(path)
        .unwrap()
}

#[test]
fn a_moving_mirror_is_re_resolved_refused_when_locked_and_served_by_snapshot_and_cache() {
    // Real .debs: the offline bake leaves the whole closure in the test cache.
    let _img = offline_image();
    let _g = heavy();
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().to_path_buf();
    if std::env::var_os("IMAGECTL_KEEP_TEST_DIRS").is_some() {
        // For a look at the repository and the builds after a failure.
        eprintln!("keeping {}", dir.display());
        std::mem::forget(t);
    }
    let dir = dir.as_path();
    let debs: Vec<PathBuf> = std::fs::read_dir(cache_dir().join("debs/bookworm"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    assert!(debs.len() > 100, "the offline bake filled the cache");
    let mut repo = AptRepo::new(dir, &debs);
    std::fs::create_dir_all(repo.root.join("files")).unwrap();
    std::fs::write(repo.root.join("files/tool"), b"#!/bin/sh\necho tool v1\n").unwrap();
    let spec = write_spec(dir, &repo);
    let lock = dir.join("drift.lock");
    let out = dir.join("out");

    // 1. Fresh.
    let first = ok_json(&build(&spec, &out, &dir.join("c1"), &lock, &[]));
    let sha1 = first["sha256"].as_str().unwrap().to_string();
    let ts1 = lock_value(&lock, "snapshot").expect("the lock records the snapshot timestamp");
    assert!(imagectl::spec::is_snapshot_timestamp(&ts1), "{ts1}");
    let old_netbase = pinned_version(&lock, "netbase").expect("netbase pinned");
    let lock_text = std::fs::read_to_string(&lock).unwrap();
    assert!(
        lock_text.contains("name = \"tool\"")
            && lock_text.contains(&imagectl::util::sha256_bytes(b"#!/bin/sh\necho tool v1\n")),
        "the artifact's sha256 is recorded on first use:\n{lock_text}"
    );
    let image1 = first["image"].as_str().unwrap().to_string();
    let sources =
        String::from_utf8(read_in_image(&image1, "/etc/apt/sources.list").unwrap()).unwrap();
    assert_eq!(
        sources,
        format!(
            "deb [signed-by=/etc/apt/keyrings/imagectl-base.asc] {m} bookworm main\n\
             deb [signed-by=/etc/apt/keyrings/imagectl-base.asc] {m} bookworm-updates main\n",
            m = repo.mirror()
        ),
        "the image keeps the spec's sources, not what the build fetched from"
    );
    assert!(read_in_image(&image1, "/etc/apt/keyrings/imagectl-base.asc").is_some());
    let locked1 = dir.join("locked1.lock");
    std::fs::copy(&lock, &locked1).unwrap();

    // The snapshot of that moment, kept aside until step 4; then the mirror moves on.
    let snap_tree = dir.join("snapshot-later");
    std::fs::create_dir_all(&snap_tree).unwrap();
    run_ok(
        Command::new("cp")
            .arg("-al")
            .arg(repo.root.join("debian/pool"))
            .arg(snap_tree.join("pool")),
    );
    let new_netbase = format!("{old_netbase}+moved1");
    let aside = dir.join("aside");
    std::fs::create_dir_all(&aside).unwrap();
    repo.bump(&repo.root.join("debian"), "netbase", &new_netbase, &aside);

    // 2. --locked: exit 2, a few lines naming the package, the sources and the remedies.
    let o = build(
        &spec,
        &dir.join("out2"),
        &dir.join("c2"),
        &locked1,
        &["--locked"],
    );
    let e = err(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains(&format!("netbase {old_netbase}")), "{e}");
    assert!(
        e.contains("the .deb cache") && e.contains("the mirror"),
        "{e}"
    );
    assert!(e.contains(&format!("snapshot archive at {ts1}")), "{e}");
    assert!(
        e.contains("--refresh-lock") && e.contains("imagectl fetch"),
        "{e}"
    );
    assert!(
        !e.contains("apt-get --yes") && !e.contains("--include"),
        "no command line: {e}"
    );
    assert!(
        e.lines()
            .filter(|l| l.starts_with("error") || !l.starts_with("  "))
            .count()
            <= 6,
        "{e}"
    );
    assert!(
        !dir.join("out2").exists()
            || std::fs::read_dir(dir.join("out2")).unwrap().all(|f| f
                .unwrap()
                .path()
                .extension()
                .is_none_or(|x| x != "qcow2")),
        "--locked builds nothing"
    );
    assert_eq!(
        std::fs::read_to_string(&locked1).unwrap(),
        lock_text,
        "--locked never writes"
    );

    // 3. A plain build re-resolves just that package and says so.
    let moved = ok_json(&build(
        &spec,
        &dir.join("out3"),
        &dir.join("c3"),
        &lock,
        &[],
    ));
    let drift: Vec<String> = serde_json::from_value(moved["drift"].clone()).unwrap();
    assert_eq!(
        drift,
        vec![format!(
            "netbase {old_netbase} → {new_netbase} (pinned version no longer served)"
        )]
    );
    assert_eq!(pinned_version(&lock, "netbase"), Some(new_netbase.clone()));
    let changes: Vec<String> = serde_json::from_value(moved["lock_changes"].clone()).unwrap();
    assert!(
        changes
            .iter()
            .any(|c| c == &format!("~ netbase {old_netbase} -> {new_netbase}")),
        "{changes:?}"
    );
    assert_eq!(
        pinned_version(&lock, "linux-image-cloud-amd64"),
        pinned_version(&locked1, "linux-image-cloud-amd64"),
        "only the drifted package moves"
    );
    let manifest =
        imagectl::manifest::Manifest::read(Path::new(moved["manifest"].as_str().unwrap())).unwrap();
    assert_eq!(manifest.drift, drift, "the manifest records the drift");

    // 4. The snapshot at the lock's timestamp still holds the old version: --locked, no cache.
    let snap = repo.root.join("archive/debian").join(&ts1);
    std::fs::create_dir_all(snap.parent().unwrap()).unwrap();
    std::fs::rename(&snap_tree, &snap).unwrap();
    repo.publish(&snap, Some("Thu, 01 Jan 2026 00:00:00 UTC"));
    let snapped = ok_json(&build(
        &spec,
        &dir.join("out4"),
        &dir.join("c4"),
        &locked1,
        &["--locked"],
    ));
    assert_eq!(
        snapped["sha256"],
        sha1.as_str(),
        "bit-identical to the first build"
    );
    let origins = snapped["origins"].as_str().unwrap();
    assert!(origins.contains("1 from the snapshot archive"), "{origins}");

    // 5. fetch, then a rebuild with the mirror gone, from the fetched directory.
    let fetched = dir.join("fetched");
    let f = ok_json(&imagectl(
        &[
            "fetch",
            spec.to_str().unwrap(),
            "--locked",
            "--lock",
            locked1.to_str().unwrap(),
            "--into",
        ],
        &[&fetched],
    ));
    assert_eq!(f["from_snapshot"], 1, "{f}");
    assert_eq!(f["artifacts"], 1, "{f}");
    // 6. An artifact that changed at its URL is refused against the lock.
    std::fs::write(repo.root.join("files/tool"), b"#!/bin/sh\necho tampered\n").unwrap();
    let o = imagectl(
        &[
            "fetch",
            spec.to_str().unwrap(),
            "--lock",
            locked1.to_str().unwrap(),
            "--into",
        ],
        &[&dir.join("fetched-again")],
    );
    assert_eq!(o.status.code(), Some(2), "{}", err(&o));
    assert!(
        err(&o).contains("artifact \"tool\"") && err(&o).contains("the lock records"),
        "{}",
        err(&o)
    );
    repo.stop();
    let airgapped = ok_json(&build(
        &spec,
        &dir.join("out5"),
        &fetched,
        &locked1,
        &["--locked"],
    ));
    assert_eq!(airgapped["sha256"], sha1.as_str(), "no mirror, same bytes");
    assert_eq!(airgapped["layer_cached"], false);
}

fn run_ok(c: &mut Command) {
    let s = c.status().unwrap();
    assert!(s.success(), "{c:?}");
}
