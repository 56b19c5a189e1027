//! Local virtual machines: QEMU processes and the guest agent protocol.
//!
//! * [`QemuVm`] boots an image on a throwaway qcow2 overlay (the image is never written), with
//!   virtio-scsi disk, the seed ISO as a virtio-scsi cdrom, serial console to a file, a guest-agent
//!   channel, and QEMU user networking only: `restrict=on` by default, so a guest reaches nothing
//!   outside this machine except the host ports it is explicitly forwarded to.
//! * [`args`] builds QEMU's argument list as a pure function (tested without QEMU).
//! * [`qga`] speaks the QEMU guest agent's JSON protocol over the unix socket.
//! * [`net`] picks free ports and checks HTTP endpoints on 127.0.0.1.
//!
//! QEMU is always killed: on drop, on panic (drop runs while unwinding), and on SIGINT/SIGTERM/SIGHUP
//! of imagectl (see `reaper`). It runs in its own process group and, where `setpriv` exists, with a
//! parent-death signal, so it also dies if imagectl is killed outright.

pub mod args;
pub mod net;
pub mod qemu;
pub mod qga;
mod reaper;

pub use args::{GuestForward, LaunchPlan, PortForward};
pub use net::{free_port, http_get, wait_for_port, HttpResponse};
pub use qemu::{QemuVm, QemuVmBuilder};
pub use qga::{ExecOutput, Qga};

use anyhow::Result;
use std::fmt;
use std::str::FromStr;

/// Guest ports forwarded to 127.0.0.1 by default: node_exporter, cAdvisor, gitlab-runner metrics.
pub const DEFAULT_GUEST_PORTS: [u16; 3] = [9100, 8080, 9252];
/// OVMF firmware code (read-only pflash).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// OVMF variable store template (copied per VM).
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// Environment variable that overrides the accelerator (`tcg`, `kvm` or `auto`).
pub const ACCEL_ENV: &str = "IMAGECTL_ACCEL";

/// Guest firmware.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// SeaBIOS (QEMU's and Proxmox's default).
    #[default]
    Bios,
    /// OVMF (UEFI).
    Uefi,
}

impl fmt::Display for Firmware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        })
    }
}

/// CPU acceleration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Software emulation (`-accel tcg,thread=multi -cpu max`).
    Tcg,
    /// Hardware virtualisation (`-accel kvm -cpu host`).
    Kvm,
    /// KVM when it works, else TCG (with a warning).
    #[default]
    Auto,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
            Accel::Auto => "auto",
        })
    }
}

impl FromStr for Accel {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "tcg" => Ok(Accel::Tcg),
            "kvm" => Ok(Accel::Kvm),
            "auto" | "" => Ok(Accel::Auto),
            other => Err(crate::error::input(format!(
                "unknown accelerator {other:?}: use tcg, kvm or auto"
            ))),
        }
    }
}

impl Accel {
    /// `IMAGECTL_ACCEL` when set, else `requested`.
    pub fn from_env_or(requested: Accel) -> Result<Accel> {
        match std::env::var(ACCEL_ENV) {
            Ok(v) if !v.trim().is_empty() => v.parse().map_err(|_| {
                crate::error::input(format!(
                    "{ACCEL_ENV}={v:?} is not an accelerator: use tcg, kvm or auto (or unset it)"
                ))
            }),
            _ => Ok(requested),
        }
    }
}

/// Whether the guest may open connections to the outside world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetPolicy {
    /// `restrict=on`: only forwarded ports, nothing outbound (tests, CI).
    #[default]
    Restricted,
    /// Normal user-mode NAT (a user's own machine, where runners must pull images).
    Open,
}

/// True when QEMU's stderr shows that KVM cannot run this guest (so TCG should be used).
pub fn is_kvm_failure(stderr: &str) -> bool {
    const MARKERS: &[&str] = &[
        "KVM internal error",
        "emulation failure",
        "failed to initialize kvm",
        "Could not access KVM kernel module",
        "kvm_buf_set_msrs",
        "kvm_init_vcpu",
        "error: failed to set MSR",
    ];
    MARKERS.iter().any(|m| stderr.contains(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_failures_are_recognised() {
        assert!(is_kvm_failure(
            "KVM internal error. Suberror: 1\nextra data[0]: 0x0\nemulation failure\n"
        ));
        assert!(is_kvm_failure(
            "qemu-system-x86_64: error: failed to set MSR 0x10a to 0xc000069\nqemu-system-x86_64: target/i386/kvm/kvm.c:3849: kvm_buf_set_msrs: Assertion failed."
        ));
        assert!(is_kvm_failure("Could not access KVM kernel module: Permission denied\nqemu-system-x86_64: failed to initialize kvm: Permission denied"));
        assert!(!is_kvm_failure(
            "qemu-system-x86_64: -netdev user: Could not set up host forwarding rule"
        ));
        assert!(!is_kvm_failure(""));
    }

    #[test]
    fn accel_parses_and_rejects() {
        assert_eq!("TCG".parse::<Accel>().unwrap(), Accel::Tcg);
        assert_eq!("kvm".parse::<Accel>().unwrap(), Accel::Kvm);
        assert_eq!("auto".parse::<Accel>().unwrap(), Accel::Auto);
        let e = "hvf".parse::<Accel>().unwrap_err();
        assert_eq!(crate::error::exit_code(&e), 2);
    }
}
