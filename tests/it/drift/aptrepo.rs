//! A real, signed apt repository on loopback, laid out like Debian's mirror and snapshot archive:
//! `debian/` is the mirror and `archive/debian/<TIMESTAMP>/` a snapshot. Its packages are real
//! .deb files from the test cache (copied, indexed with apt-ftparchive, signed with a throwaway
//! key made for the run); a snapshot's Release carries a Valid-Until that has passed, as the
//! snapshot archive's do.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().expect("starting a tool");
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The repository tree, its signing key and the HTTP server serving it.
pub struct AptRepo {
    /// The served root.
    pub root: PathBuf,
    gnupg: PathBuf,
    /// The public key (armored), for the spec's `base.key_file`.
    pub key: PathBuf,
    server: Option<Child>,
    /// The server's port.
    pub port: u16,
}

impl AptRepo {
    /// Makes `dir/root/debian` from `debs` (a pool of real .deb files), signs it and serves `root`
    /// on 127.0.0.1.
    pub fn new(dir: &Path, debs: &[PathBuf]) -> AptRepo {
        let root = dir.join("root");
        let gnupg = dir.join("gnupg");
        std::fs::create_dir_all(&gnupg).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&gnupg, std::fs::Permissions::from_mode(0o700)).unwrap();
        let mut repo = AptRepo {
            root: root.clone(),
            key: dir.join("signing-key.asc"),
            gnupg,
            server: None,
            port: 0,
        };
        run(repo.gpg().args([
            "--passphrase",
            "",
            "--quick-gen-key",
            "imagectl test repository (throwaway) <repo@test.invalid>",
            "ed25519",
            "sign",
            "never",
        ]));
        let armored = run(repo.gpg().args(["--armor", "--export"]));
        std::fs::write(&repo.key, armored).unwrap();
        let pool = root.join("debian/pool");
        std::fs::create_dir_all(&pool).unwrap();
        for d in debs {
            let to = pool.join(d.file_name().unwrap());
            if std::fs::hard_link(d, &to).is_err() {
                std::fs::copy(d, &to).unwrap();
            }
        }
        repo.publish(&root.join("debian"), None);
        repo.serve();
        repo
    }

    fn gpg(&self) -> Command {
        let mut c = Command::new("gpg");
        c.env("GNUPGHOME", &self.gnupg).args([
            "--batch",
            "--yes",
            "--no-tty",
            "--pinentry-mode",
            "loopback",
        ]);
        c
    }

    /// The mirror's URL.
    pub fn mirror(&self) -> String {
        format!("http://127.0.0.1:{}/debian/", self.port)
    }

    /// The snapshot archive's base URL.
    pub fn snapshot_base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Writes `dists/` for `bookworm` (the pool) and an empty `bookworm-updates` under `tree`,
    /// signed; `valid_until` (an RFC 2822 date) as a snapshot's Release has it.
    pub fn publish(&self, tree: &Path, valid_until: Option<&str>) {
        let _ = std::fs::remove_dir_all(tree.join("dists"));
        for (suite, with_pool) in [("bookworm", true), ("bookworm-updates", false)] {
            let dist = tree.join("dists").join(suite);
            let bin = dist.join("main/binary-amd64");
            std::fs::create_dir_all(&bin).unwrap();
            let packages = if with_pool {
                run(Command::new("apt-ftparchive")
                    .args(["packages", "pool"])
                    .current_dir(tree))
            } else {
                String::new()
            };
            std::fs::write(bin.join("Packages"), &packages).unwrap();
            let mut release = run(Command::new("apt-ftparchive")
                .arg("-o")
                .arg(format!("APT::FTPArchive::Release::Suite={suite}"))
                .arg("-o")
                .arg(format!("APT::FTPArchive::Release::Codename={suite}"))
                .args(["-o", "APT::FTPArchive::Release::Origin=Debian"])
                .args(["-o", "APT::FTPArchive::Release::Architectures=amd64"])
                .args(["-o", "APT::FTPArchive::Release::Components=main"])
                .args(["release", "."])
                .current_dir(&dist));
            if let Some(v) = valid_until {
                release = release.replacen("\nDate:", &format!("\nValid-Until: {v}\nDate:"), 1);
            }
            std::fs::write(dist.join("Release"), &release).unwrap();
            run(self
                .gpg()
                .args(["--passphrase", "", "--clearsign", "-o"])
                .arg(dist.join("InRelease"))
                .arg(dist.join("Release")));
        }
    }

    /// Replaces package `name`'s .deb in `tree`'s pool with a rebuild of it at `version` (the
    /// same files, another version), and republishes. Returns the old .deb's path (moved aside).
    pub fn bump(&self, tree: &Path, name: &str, version: &str, aside: &Path) -> PathBuf {
        let pool = tree.join("pool");
        let old = std::fs::read_dir(&pool)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(&format!("{name}_"))
            })
            .unwrap_or_else(|| panic!("{name} is not in the pool"));
        let unpacked = aside.join(format!("{name}-unpacked"));
        let _ = std::fs::remove_dir_all(&unpacked);
        run(Command::new("dpkg-deb").arg("-R").arg(&old).arg(&unpacked));
        let control = unpacked.join("DEBIAN/control");
        let text = std::fs::read_to_string(&control).unwrap();
        let text: String = text
            .lines()
            .map(|l| {
                if l.starts_with("Version:") {
                    format!("Version: {version}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        std::fs::write(&control, text).unwrap();
        let new = pool.join(format!("{name}_{version}_all.deb"));
        run(Command::new("dpkg-deb")
            .args(["--root-owner-group", "-b"])
            .arg(&unpacked)
            .arg(&new));
        let moved = aside.join(old.file_name().unwrap());
        std::fs::rename(&old, &moved).unwrap();
        self.publish(tree, None);
        moved
    }

    fn serve(&mut self) {
        let mut child = Command::new("python3")
            .args([
                "-u",
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                "0",
                "--directory",
            ])
            .arg(&self.root)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m http.server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        // "Serving HTTP on 127.0.0.1 port 41234 (http://127.0.0.1:41234/) ..."
        self.port = line
            .split_whitespace()
            .skip_while(|w| *w != "port")
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        self.server = Some(child);
    }

    /// Stops serving: nothing answers on the mirror's port any more.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for AptRepo {
    fn drop(&mut self) {
        self.stop();
        let _ = Command::new("gpgconf")
            .args(["--kill", "all"])
            .env("GNUPGHOME", &self.gnupg)
            .status();
    }
}
