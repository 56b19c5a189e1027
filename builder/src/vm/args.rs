//! QEMU's command line, built as a pure function of a [`LaunchPlan`] so it can be tested without
//! starting QEMU.
//!
//! The layout follows what Proxmox gives a VM: q35, virtio-scsi (one controller, `scsi-hd`), the
//! cloud-init seed as a SCSI cdrom on the same virtio-scsi controller, virtio-net, a
//! virtio-serial guest-agent port. The seed is not on q35's AHCI (`ide.2`): Debian's cloud kernel
//! (`linux-image-cloud-amd64`, which the image uses) is built without `SATA_AHCI`, so a guest
//! never sees an AHCI cdrom, cloud-init falls back to DataSourceNone and the agent finds no seed. Networking is
//! always QEMU user networking; nothing else is ever emitted.

use super::{Accel, Firmware, NetPolicy};
use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::PathBuf;

/// A guest TCP port reachable on `127.0.0.1:host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PortForward {
    /// Port inside the guest.
    pub guest: u16,
    /// Port on the host's loopback.
    pub host: u16,
}

/// A guest-side address whose connections are relayed to `127.0.0.1:host_port` on the host, one
/// `nc` per connection (QEMU's `guestfwd=…-cmd:` form).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestForward {
    /// Address the guest connects to (inside 10.0.2.0/24, e.g. 10.0.2.100).
    pub guest_ip: Ipv4Addr,
    /// Port the guest connects to.
    pub guest_port: u16,
    /// Host loopback port the connection is relayed to.
    pub host_port: u16,
}

/// Everything QEMU's command line is made of, with all paths and ports resolved.
#[derive(Debug, Clone)]
pub struct LaunchPlan {
    /// VM name (shown in `ps` and QEMU's window title).
    pub name: String,
    /// Resolved accelerator: `Tcg` or `Kvm` (never `Auto`).
    pub accel: Accel,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Firmware.
    pub firmware: Firmware,
    /// OVMF code (read-only), used with [`Firmware::Uefi`].
    pub ovmf_code: PathBuf,
    /// This VM's copy of the OVMF variable store, used with [`Firmware::Uefi`].
    pub ovmf_vars: PathBuf,
    /// The qcow2 overlay to boot from.
    pub disk: PathBuf,
    /// The NoCloud seed ISO, if any.
    pub seed_iso: Option<PathBuf>,
    /// File that receives the serial console.
    pub serial_log: PathBuf,
    /// Unix socket of the guest agent channel.
    pub qga_socket: PathBuf,
    /// Unix socket for QMP, if wanted.
    pub qmp_socket: Option<PathBuf>,
    /// QEMU's pid file.
    pub pidfile: PathBuf,
    /// Outbound network policy.
    pub net: NetPolicy,
    /// Host-forwarded guest ports.
    pub hostfwd: Vec<PortForward>,
    /// Guest-side relays to host ports.
    pub guestfwd: Vec<GuestForward>,
}

/// Escapes a value for a QEMU option string (a comma is written twice).
pub fn qemu_escape(s: &str) -> String {
    s.replace(',', ",,")
}

fn p(path: &std::path::Path) -> String {
    qemu_escape(&path.to_string_lossy())
}

/// The `-netdev` value: user networking, restricted unless the plan says otherwise.
pub fn netdev_arg(plan: &LaunchPlan) -> String {
    let mut s = String::from("user,id=net0");
    if plan.net == NetPolicy::Restricted {
        s.push_str(",restrict=on");
    }
    for f in &plan.hostfwd {
        s.push_str(&format!(",hostfwd=tcp:127.0.0.1:{}-:{}", f.host, f.guest));
    }
    for g in &plan.guestfwd {
        s.push_str(&format!(
            ",guestfwd=tcp:{}:{}-cmd:nc 127.0.0.1 {}",
            g.guest_ip, g.guest_port, g.host_port
        ));
    }
    s
}

/// QEMU's arguments (without the program name).
pub fn qemu_args(plan: &LaunchPlan) -> Vec<OsString> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&[
        "-name",
        &format!(
            "imagectl-{},process=imagectl-{}",
            qemu_escape(&plan.name),
            qemu_escape(&plan.name)
        ),
    ]);
    push(&["-machine", "q35"]);
    match plan.accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg | Accel::Auto => push(&["-accel", "tcg,thread=multi", "-cpu", "max"]),
    }
    push(&[
        "-m",
        &plan.memory_mib.to_string(),
        "-smp",
        &plan.cpus.to_string(),
    ]);
    push(&["-nodefaults", "-no-user-config", "-nographic"]);
    push(&["-pidfile", &plan.pidfile.to_string_lossy()]);
    if plan.firmware == Firmware::Uefi {
        push(&[
            "-drive",
            &format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                p(&plan.ovmf_code)
            ),
            "-drive",
            &format!("if=pflash,format=raw,unit=1,file={}", p(&plan.ovmf_vars)),
        ]);
    }
    push(&[
        "-chardev",
        &format!("file,id=serial0,path={}", p(&plan.serial_log)),
        "-serial",
        "chardev:serial0",
    ]);
    push(&[
        "-device",
        "virtio-scsi-pci,id=scsi0",
        "-drive",
        &format!(
            "file={},if=none,id=disk0,format=qcow2,discard=unmap",
            p(&plan.disk)
        ),
        "-device",
        "scsi-hd,drive=disk0,bus=scsi0.0,bootindex=1",
    ]);
    if let Some(iso) = &plan.seed_iso {
        push(&[
            "-drive",
            &format!(
                "file={},if=none,id=seed0,media=cdrom,readonly=on,format=raw",
                p(iso)
            ),
            "-device",
            "scsi-cd,drive=seed0,bus=scsi0.0",
        ]);
    }
    push(&[
        "-netdev",
        &netdev_arg(plan),
        "-device",
        "virtio-net-pci,netdev=net0",
    ]);
    push(&[
        "-chardev",
        &format!(
            "socket,path={},server=on,wait=off,id=qga0",
            p(&plan.qga_socket)
        ),
        "-device",
        "virtio-serial-pci,id=vser0",
        "-device",
        "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
    ]);
    if let Some(qmp) = &plan.qmp_socket {
        push(&["-qmp", &format!("unix:{},server=on,wait=off", p(qmp))]);
    }
    push(&["-device", "virtio-rng-pci"]);
    a.into_iter().map(OsString::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> LaunchPlan {
        LaunchPlan {
            name: "t1".into(),
            accel: Accel::Tcg,
            memory_mib: 2048,
            cpus: 2,
            firmware: Firmware::Bios,
            ovmf_code: super::super::OVMF_CODE.into(),
            ovmf_vars: "/w/vars.fd".into(),
            disk: "/w/disk.qcow2".into(),
            seed_iso: Some("/w/seed.iso".into()),
            serial_log: "/w/serial.log".into(),
            qga_socket: "/w/qga.sock".into(),
            qmp_socket: None,
            pidfile: "/w/qemu.pid".into(),
            net: NetPolicy::Restricted,
            hostfwd: vec![
                PortForward {
                    guest: 9100,
                    host: 19100,
                },
                PortForward {
                    guest: 8080,
                    host: 18080,
                },
            ],
            guestfwd: vec![GuestForward {
                guest_ip: Ipv4Addr::new(10, 0, 2, 100),
                guest_port: 80,
                host_port: 3000,
            }],
        }
    }

    fn strings(plan: &LaunchPlan) -> Vec<String> {
        qemu_args(plan)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect()
    }

    /// The value following `flag` each time it occurs.
    fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn tcg_bios_layout() {
        let a = strings(&plan());
        assert_eq!(values(&a, "-accel"), ["tcg,thread=multi"]);
        assert_eq!(values(&a, "-cpu"), ["max"]);
        assert_eq!(values(&a, "-machine"), ["q35"]);
        assert!(a.contains(&"-nodefaults".to_string()) && a.contains(&"-nographic".to_string()));
        let dev = values(&a, "-device");
        assert!(dev.contains(&"virtio-scsi-pci,id=scsi0"));
        assert!(dev.contains(&"scsi-hd,drive=disk0,bus=scsi0.0,bootindex=1"));
        assert!(dev.contains(&"scsi-cd,drive=seed0,bus=scsi0.0"));
        assert!(
            dev.contains(&"virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0")
        );
        let drives = values(&a, "-drive");
        assert!(drives
            .iter()
            .any(|d| d.starts_with("file=/w/disk.qcow2,if=none,id=disk0,format=qcow2")));
        assert!(drives.iter().any(|d| d.contains("/w/seed.iso")
            && d.contains("media=cdrom")
            && d.contains("readonly=on")));
        assert!(
            !drives.iter().any(|d| d.contains("pflash")),
            "BIOS has no pflash"
        );
        let chardevs = values(&a, "-chardev");
        assert!(chardevs.contains(&"socket,path=/w/qga.sock,server=on,wait=off,id=qga0"));
        assert!(chardevs.contains(&"file,id=serial0,path=/w/serial.log"));
        assert!(values(&a, "-qmp").is_empty());
    }

    #[test]
    fn kvm_uefi_and_qmp() {
        let mut pl = plan();
        pl.accel = Accel::Kvm;
        pl.firmware = Firmware::Uefi;
        pl.qmp_socket = Some("/w/qmp.sock".into());
        let a = strings(&pl);
        assert_eq!(values(&a, "-accel"), ["kvm"]);
        assert_eq!(values(&a, "-cpu"), ["host"]);
        let drives = values(&a, "-drive");
        assert!(drives.contains(
            &"if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"
        ));
        assert!(drives.contains(&"if=pflash,format=raw,unit=1,file=/w/vars.fd"));
        assert_eq!(values(&a, "-qmp"), ["unix:/w/qmp.sock,server=on,wait=off"]);
    }

    #[test]
    fn network_is_user_mode_restricted_by_default() {
        let pl = plan();
        let a = strings(&pl);
        let netdevs = values(&a, "-netdev");
        assert_eq!(netdevs.len(), 1);
        assert_eq!(
            netdevs[0],
            "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:19100-:9100,hostfwd=tcp:127.0.0.1:18080-:8080,guestfwd=tcp:10.0.2.100:80-cmd:nc 127.0.0.1 3000"
        );
        assert!(!a.iter().any(|s| s.contains("tap") || s.contains("bridge")));
        let mut open = pl;
        open.net = NetPolicy::Open;
        assert!(!netdev_arg(&open).contains("restrict"));
        assert!(netdev_arg(&open).starts_with("user,"));
    }

    #[test]
    fn commas_in_paths_are_escaped() {
        let mut pl = plan();
        pl.disk = "/tmp/a,b/disk.qcow2".into();
        let a = strings(&pl);
        assert!(values(&a, "-drive")
            .iter()
            .any(|d| d.starts_with("file=/tmp/a,,b/disk.qcow2,if=none")));
    }
}
