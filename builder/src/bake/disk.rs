//! The raw disk: GPT (bios_grub + ESP + root), FAT ESP, ext4 root from the composed tar, and GRUB
//! for both BIOS and UEFI — written into one sparse file, with no mounts and no loop devices.
//!
//! Layout (512-byte sectors, 1 MiB alignment):
//! * 1: `bios_grub`, 1 MiB at sector 2048: GRUB's i386-pc core image, loaded by the MBR boot code.
//! * 2: ESP, 64 MiB, FAT: `EFI/BOOT/BOOTX64.EFI` (GRUB, x86_64-efi).
//! * 3: root, ext4, the rest: built by `mkfs.ext4 -d TAR -E offset=…` straight into the file.
//!
//! Both GRUBs carry the same small embedded config that finds the root by filesystem UUID and reads
//! `/boot/grub/grub.cfg` from it. UUIDs are derived from the image's inputs, so the same inputs give
//! the same bytes.

use crate::util::run;
use anyhow::{bail, Context, Result};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use uuid::Uuid;

const SECTOR: u64 = 512;
const BIOS_START: u64 = 2048;
const BIOS_SECTORS: u64 = 2048;
const ESP_START: u64 = BIOS_START + BIOS_SECTORS;
const ESP_SECTORS: u64 = 64 * 2048;
/// First sector of the root partition.
pub const ROOT_START: u64 = ESP_START + ESP_SECTORS;

/// Deterministic identifiers of one image's disk.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DiskIds {
    /// GPT disk GUID.
    pub disk: Uuid,
    /// bios_grub partition GUID.
    pub bios: Uuid,
    /// ESP partition GUID.
    pub esp: Uuid,
    /// Root partition GUID.
    pub root_part: Uuid,
    /// ext4 filesystem UUID of the root.
    pub root_fs: Uuid,
    /// FAT volume id of the ESP.
    pub esp_serial: u32,
}

impl DiskIds {
    /// Ids derived from a seed string (the image's input hash).
    pub fn derive(seed: &str) -> Self {
        let ns = Uuid::from_bytes(*b"imagectl-disk-v1");
        let id = |what: &str| Uuid::new_v5(&ns, format!("{seed}/{what}").as_bytes());
        let serial = id("esp-serial").as_bytes()[..4]
            .iter()
            .fold(0u32, |a, b| (a << 8) | u32::from(*b));
        Self {
            disk: id("disk"),
            bios: id("bios"),
            esp: id("esp"),
            root_part: id("root-part"),
            root_fs: id("root-fs"),
            esp_serial: serial,
        }
    }
}

/// The GRUB config on the root filesystem (`/boot/grub/grub.cfg`).
pub fn grub_cfg(ids: &DiskIds, kernel: &str, cmdline: &str) -> String {
    format!(
        "# Written by imagectl at build time.\n\
         set timeout=0\n\
         serial --unit=0 --speed=115200\n\
         terminal_input serial console\n\
         terminal_output serial console\n\
         search --no-floppy --fs-uuid --set=root {uuid}\n\
         menuentry 'Debian GNU/Linux ({kernel})' {{\n\
         \tlinux /boot/vmlinuz-{kernel} root=UUID={uuid} ro {cmdline}\n\
         \tinitrd /boot/initrd.img-{kernel}\n\
         }}\n",
        uuid = ids.root_fs
    )
}

/// `/etc/fstab` for the image.
pub fn fstab(ids: &DiskIds, uefi: bool) -> String {
    let mut s = format!("UUID={} / ext4 errors=remount-ro 0 1\n", ids.root_fs);
    if uefi {
        s.push_str(&format!(
            "UUID={:04X}-{:04X} /boot/efi vfat umask=0077,nofail 0 2\n",
            ids.esp_serial >> 16,
            ids.esp_serial & 0xffff
        ));
    }
    s
}

fn early_cfg(ids: &DiskIds) -> String {
    format!(
        "search --no-floppy --fs-uuid --set=root {}\nset prefix=($root)/boot/grub\n",
        ids.root_fs
    )
}

const GRUB_MODULES: &[&str] = &[
    "part_gpt",
    "ext2",
    "search",
    "search_fs_uuid",
    "normal",
    "configfile",
    "linux",
    "boot",
    "echo",
    "test",
    "serial",
    "terminal",
    "gzio",
    "minicmd",
];

/// Builds a GRUB image for `format` (`i386-pc` or `x86_64-efi`) with the early config embedded.
fn grub_image(format: &str, ids: &DiskIds, work: &Path) -> Result<Vec<u8>> {
    let cfg = work.join(format!("early-{format}.cfg"));
    fs_err::write(&cfg, early_cfg(ids))?;
    let out = work.join(format!("core-{format}.img"));
    let mut mods: Vec<&str> = GRUB_MODULES.to_vec();
    if format == "i386-pc" {
        mods.push("biosdisk");
    } else {
        mods.extend(["efi_gop", "all_video"]);
    }
    run(Command::new("grub-mkimage")
        .args(["-O", format, "-p", "/boot/grub", "-c"])
        .arg(&cfg)
        .arg("-o")
        .arg(&out)
        .args(&mods)
        .env("SOURCE_DATE_EPOCH", "0"))
    .with_context(|| {
        format!("making the GRUB {format} image (apt-get install grub-pc-bin grub-efi-amd64-bin)")
    })?;
    Ok(fs_err::read(&out)?)
}

/// What goes onto a raw disk.
pub struct RawDisk<'a> {
    /// The raw file to create.
    pub raw: &'a Path,
    /// Virtual size in bytes (rounded down to MiB).
    pub size: u64,
    /// The composed root filesystem tar.
    pub root_tar: &'a Path,
    /// Identifiers.
    pub ids: &'a DiskIds,
    /// Install BIOS boot code.
    pub bios: bool,
    /// Install the ESP.
    pub uefi: bool,
    /// SOURCE_DATE_EPOCH.
    pub epoch: i64,
    /// Scratch directory.
    pub work: &'a Path,
}

/// Writes the GPT, the partitions' contents and the boot code into `raw` (created, sparse).
pub fn build_raw(d: &RawDisk<'_>) -> Result<()> {
    let RawDisk {
        raw,
        size,
        root_tar,
        ids,
        bios,
        uefi,
        epoch,
        work,
    } = *d;
    let size = size / (1 << 20) * (1 << 20);
    {
        let f = fs_err::File::create(raw)?;
        f.set_len(size)?;
    }
    let total = size / SECTOR;
    // GPT keeps 33 sectors at the end for its backup; keep the root 1 MiB-aligned below that.
    let root_end = (total - 34) / 2048 * 2048;
    let root_sectors = root_end - ROOT_START;
    write_gpt(raw, ids, root_sectors)?;

    if bios {
        let core = grub_image("i386-pc", ids, work)?;
        install_bios(raw, &core)?;
    }
    if uefi {
        let efi = grub_image("x86_64-efi", ids, work)?;
        write_esp(raw, ids, &efi, epoch)?;
    }
    // ext4 root, written straight into the partition.
    let blocks = root_sectors * SECTOR / 4096;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-L", "root", "-T", "default"])
        .args(["-O", "^metadata_csum_seed,^orphan_file"])
        .arg("-U")
        .arg(ids.root_fs.to_string())
        .arg("-E")
        .arg(format!(
            "offset={},hash_seed={},lazy_itable_init=1,nodiscard,root_owner=0:0",
            ROOT_START * SECTOR,
            ids.root_fs
        ))
        .arg("-d")
        .arg(root_tar)
        .arg(raw)
        .arg(blocks.to_string())
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .env("E2FSPROGS_FAKE_TIME", epoch.to_string()))
    .context("making the ext4 root (needs e2fsprogs >= 1.47.1 for tar input)")?;
    Ok(())
}

fn write_gpt(raw: &Path, ids: &DiskIds, root_sectors: u64) -> Result<()> {
    use gpt::partition_types::{Type, BIOS, EFI, LINUX_FS};
    let f = fs_err::OpenOptions::new()
        .read(true)
        .write(true)
        .open(raw)?;
    let total = f.metadata()?.len() / SECTOR;
    let mut file = f.into_parts().0;
    let mbr =
        gpt::mbr::ProtectiveMBR::with_lb_size(u32::try_from(total - 1).unwrap_or(0xFFFF_FFFF));
    mbr.overwrite_lba0(&mut file)
        .context("writing the protective MBR")?;
    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .create_from_device(file, Some(ids.disk))
        .context("creating the GPT")?;
    let parts: [(&str, u32, u64, u64, Type, Uuid); 3] = [
        ("bios", 1, BIOS_START, BIOS_SECTORS, BIOS, ids.bios),
        ("esp", 2, ESP_START, ESP_SECTORS, EFI, ids.esp),
        ("root", 3, ROOT_START, root_sectors, LINUX_FS, ids.root_part),
    ];
    for (name, id, start, len, ty, _) in &parts {
        disk.add_partition_at(name, *id, *start, *len, ty.clone(), 0)
            .with_context(|| format!("adding partition {name}"))?;
    }
    let mut table = disk.partitions().clone();
    for (_, id, _, _, _, guid) in &parts {
        if let Some(p) = table.get_mut(id) {
            p.part_guid = *guid;
        }
    }
    disk.update_partitions(table)
        .context("setting partition GUIDs")?;
    disk.write().context("writing the GPT")?;
    Ok(())
}

/// Puts GRUB's boot.img into the MBR and core.img into the bios_grub partition, doing what
/// `grub-bios-setup` does for an embedded core: point boot.img at the core's first sector and fill
/// the core's first blocklist with the remaining sectors.
fn install_bios(raw: &Path, core: &[u8]) -> Result<()> {
    let boot_img = fs_err::read("/usr/lib/grub/i386-pc/boot.img")
        .context("reading GRUB's boot.img (apt-get install grub-pc-bin)")?;
    if boot_img.len() != 512 {
        bail!("boot.img is {} bytes, expected 512", boot_img.len());
    }
    let sectors = (core.len() as u64).div_ceil(SECTOR);
    if sectors > BIOS_SECTORS {
        bail!("GRUB core image ({sectors} sectors) does not fit the bios_grub partition");
    }
    let mut core = core.to_vec();
    core.resize((sectors * SECTOR) as usize, 0);
    // First blocklist entry sits at the end of the first sector: start (u64), len (u16), segment (u16).
    let bl = 512 - 12;
    core[bl..bl + 8].copy_from_slice(&(BIOS_START + 1).to_le_bytes());
    core[bl + 8..bl + 10].copy_from_slice(&((sectors - 1) as u16).to_le_bytes());
    core[bl + 10..bl + 12].copy_from_slice(&0x0820u16.to_le_bytes());

    let mut f = fs_err::OpenOptions::new()
        .read(true)
        .write(true)
        .open(raw)?;
    let mut mbr = [0u8; 512];
    f.seek(SeekFrom::Start(0))?;
    f.read_exact(&mut mbr)?;
    let mut new = [0u8; 512];
    new.copy_from_slice(&boot_img);
    // Keep the BPB area and the partition table (from 0x1b8: disk signature, entries, 0x55AA).
    new[0x03..0x5a].copy_from_slice(&mbr[0x03..0x5a]);
    new[0x1b8..].copy_from_slice(&mbr[0x1b8..]);
    new[0x5c..0x64].copy_from_slice(&BIOS_START.to_le_bytes());
    new[0x64] = 0xff; // boot drive: use the one the BIOS passed
    new[0x66] = 0x90; // drive check: hard disk, so skip the floppy workaround
    new[0x67] = 0x90;
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&new)?;
    f.seek(SeekFrom::Start(BIOS_START * SECTOR))?;
    f.write_all(&core)?;
    f.flush()?;
    Ok(())
}

/// A window of a file: the ESP partition, for the FAT writer.
struct Window {
    file: std::fs::File,
    start: u64,
    len: u64,
    pos: u64,
}

impl Read for Window {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min((self.len - self.pos) as usize);
        self.file.seek(SeekFrom::Start(self.start + self.pos))?;
        let n = self.file.read(&mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for Window {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min((self.len - self.pos) as usize);
        if n == 0 && !buf.is_empty() {
            return Err(std::io::Error::other("write past the end of the partition"));
        }
        self.file.seek(SeekFrom::Start(self.start + self.pos))?;
        let n = self.file.write(&buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Seek for Window {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(p) => p as i64,
            SeekFrom::Current(d) => self.pos as i64 + d,
            SeekFrom::End(d) => self.len as i64 + d,
        };
        if new < 0 || new as u64 > self.len {
            return Err(std::io::Error::other("seek outside the partition"));
        }
        self.pos = new as u64;
        Ok(self.pos)
    }
}

/// Fixed timestamps for reproducible FAT entries.
#[derive(Debug, Clone, Copy)]
struct FixedTime(fatfs::DateTime);

impl fatfs::TimeProvider for FixedTime {
    fn get_current_date(&self) -> fatfs::Date {
        self.0.date
    }
    fn get_current_date_time(&self) -> fatfs::DateTime {
        self.0
    }
}

fn fat_time(epoch: i64) -> fatfs::DateTime {
    let t = time::OffsetDateTime::from_unix_timestamp(epoch.max(315_532_800))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    fatfs::DateTime {
        date: fatfs::Date {
            year: t.year() as u16,
            month: u8::from(t.month()) as u16,
            day: t.day() as u16,
        },
        time: fatfs::Time {
            hour: t.hour() as u16,
            min: t.minute() as u16,
            sec: (t.second() / 2 * 2) as u16,
            millis: 0,
        },
    }
}

fn write_esp(raw: &Path, ids: &DiskIds, efi: &[u8], epoch: i64) -> Result<()> {
    let file = fs_err::OpenOptions::new()
        .read(true)
        .write(true)
        .open(raw)?
        .into_parts()
        .0;
    let mut win = Window {
        file,
        start: ESP_START * SECTOR,
        len: ESP_SECTORS * SECTOR,
        pos: 0,
    };
    let opts = fatfs::FormatVolumeOptions::new()
        .volume_id(ids.esp_serial)
        .volume_label(*b"ESP        ");
    fatfs::format_volume(&mut win, opts).context("formatting the ESP")?;
    win.pos = 0;
    let fs = fatfs::FileSystem::new(
        &mut win,
        // fatfs wants a 'static provider; one tiny value per build.
        fatfs::FsOptions::new().time_provider(Box::leak(Box::new(FixedTime(fat_time(epoch))))),
    )
    .context("opening the ESP")?;
    {
        let root = fs.root_dir();
        let boot = root.create_dir("EFI")?.create_dir("BOOT")?;
        let mut f = boot.create_file("BOOTX64.EFI")?;
        f.truncate()?;
        f.write_all(efi).context("writing BOOTX64.EFI")?;
        f.flush()?;
    }
    fs.unmount().context("closing the ESP")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let a = DiskIds::derive("x");
        let b = DiskIds::derive("x");
        let c = DiskIds::derive("y");
        assert_eq!(a.root_fs, b.root_fs);
        assert_ne!(a.root_fs, c.root_fs);
        assert_ne!(a.disk, a.root_part);
    }

    #[test]
    fn grub_cfg_names_root_and_kernel() {
        let ids = DiskIds::derive("x");
        let c = grub_cfg(&ids, "6.1.0-1-cloud-amd64", "console=ttyS0");
        assert!(c.contains(&format!("root=UUID={}", ids.root_fs)));
        assert!(c.contains("/boot/vmlinuz-6.1.0-1-cloud-amd64"));
    }
}
