//! Kills QEMU when imagectl is interrupted.
//!
//! Every running QEMU is registered here with its process group (QEMU leads its own group) and the
//! work directory to remove. The first registration installs a SIGINT/SIGTERM/SIGHUP handler thread
//! (signal-hook); on a signal it kills every registered group, removes the directories and exits
//! with 128 + signal. Normal teardown is `QemuVm`'s `Drop`, which unregisters first.

use rustix::process::{kill_process, kill_process_group, Pid, Signal};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

struct Entry {
    pid: u32,
    cleanup: Option<PathBuf>,
}

static LIVE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
static HANDLER: OnceLock<()> = OnceLock::new();

/// Registers a running QEMU (its pid is its process group id).
pub(crate) fn register(pid: u32, cleanup: Option<PathBuf>) {
    HANDLER.get_or_init(install_handler);
    LIVE.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Entry { pid, cleanup });
}

/// Forgets a QEMU that is being torn down normally.
pub(crate) fn unregister(pid: u32) {
    LIVE.lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|e| e.pid != pid);
}

/// Sends SIGKILL to a QEMU's process group (and to the process itself, should the group be gone).
pub(crate) fn kill_tree(pid: u32) {
    let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return;
    };
    let _ = kill_process_group(pid, Signal::KILL);
    let _ = kill_process(pid, Signal::KILL);
}

fn install_handler() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot install signal handler; QEMU may outlive an interrupt: {e}");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("imagectl-vm-reaper".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let live = std::mem::take(&mut *LIVE.lock().unwrap_or_else(|e| e.into_inner()));
                for e in &live {
                    kill_tree(e.pid);
                }
                for e in &live {
                    if let Some(dir) = &e.cleanup {
                        let _ = std::fs::remove_dir_all(dir);
                    }
                }
                if !live.is_empty() {
                    eprintln!("\nimagectl: interrupted; stopped {} VM(s)", live.len());
                }
                std::process::exit(128 + sig);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start signal thread; QEMU may outlive an interrupt: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    #[test]
    fn kill_tree_kills_the_whole_group() {
        // A shell leading its own group, with a background child in the same group.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 60 & echo $!; wait"])
            .stdout(std::process::Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let grandchild: i32 = line.trim().parse().unwrap();
        register(child.id(), None);
        unregister(child.id());
        assert!(LIVE.lock().unwrap().iter().all(|e| e.pid != child.id()));
        kill_tree(child.id());
        let status = child.wait().unwrap();
        assert!(!status.success());
        // The grandchild got SIGKILL too (give the kernel a moment to reap it via init).
        let gone = (0..50).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(20));
            let stat =
                std::fs::read_to_string(format!("/proc/{grandchild}/stat")).unwrap_or_default();
            stat.is_empty() || stat.contains(") Z ")
        });
        assert!(gone, "grandchild {grandchild} survived");
    }
}
