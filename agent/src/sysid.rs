//! `/etc/machine-id` and gitlab-runner's `system_id`.
//!
//! gitlab-runner identifies a runner *manager* (one host using a runner token) by its `system_id`:
//! `s_` + the first 12 hex characters of HMAC-SHA256(key = machine-id, message = "gitlab-runner")
//! (`machineid.ProtectedID("gitlab-runner")`), stored in `.runner_system_id` beside config.toml and
//! reused from there when present. Clones of one golden image therefore need their own machine-id —
//! the image ships an empty one and systemd fills it on first boot; if it is still empty or missing
//! when the agent runs, the agent writes a fresh random one.

use crate::fsx;
use anyhow::{Context, Result};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::Read;
use std::path::Path;

/// Reads the machine-id, creating a random one if the file is missing or empty. Returns the trimmed
/// id and whether this run wrote it.
pub fn ensure_machine_id(path: &Path) -> Result<(String, bool)> {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => return Ok((s.trim().to_owned(), false)),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    // A v4-style id, as systemd-id128 would make.
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let id = hex::encode(bytes);
    if let Some(dir) = path.parent() {
        fsx::create_dir_all(dir, 0o755)?;
    }
    // In place, not by rename: /etc/machine-id may be a bind mount (systemd's first-boot id).
    std::fs::write(path, format!("{id}\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    crate::warn!(
        "{} was empty or missing; wrote a new machine id",
        path.display()
    );
    Ok((id, true))
}

/// gitlab-runner's `system_id` for a machine-id.
pub fn system_id(machine_id: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(machine_id.trim().as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(b"gitlab-runner");
    let digest = hex::encode(mac.finalize().into_bytes());
    format!("s_{}", &digest[..12])
}

/// The system_id stored in `.runner_system_id`, if the file exists and holds a plausible one.
pub fn read_stored(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let id = s.trim();
            if is_valid(id) {
                Ok(Some(id.to_owned()))
            } else {
                crate::warn!("ignoring {}: {id:?} is not a system_id", path.display());
                Ok(None)
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// `s_`/`r_` + 12 alphanumerics, as gitlab-runner writes them.
pub fn is_valid(id: &str) -> bool {
    (id.starts_with("s_") || id.starts_with("r_"))
        && id.len() == 14
        && id[2..].bytes().all(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_gitlab_runner_protected_id() {
        // Computed independently with Python's hmac module; the trailing newline is trimmed.
        let id = system_id("0123456789abcdef0123456789abcdef\n");
        assert_eq!(id, "s_ee3af03959fe");
        assert!(is_valid(&id));
    }

    #[test]
    fn empty_machine_id_is_filled() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("etc/machine-id");
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, "").unwrap();
        let (id, wrote) = ensure_machine_id(&p).unwrap();
        assert!(wrote);
        assert_eq!(id.len(), 32);
        let (again, wrote) = ensure_machine_id(&p).unwrap();
        assert_eq!((again, wrote), (id, false));
    }
}
