//! Loading the kernel and writing what the boot protocol hands it: the memory map, the command
//! line, the initramfs, the MP table. Which protocol is used follows from the image:
//! an ELF with a PVH note boots through PVH (32-bit entry, `hvm_start_info`), any other ELF
//! vmlinux and every bzImage through the Linux 64-bit boot protocol (`boot_params`).

pub mod acpi;
pub mod linux;
pub mod mptable;
pub mod pvh;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress};

use super::layout;
use super::memory::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {path} is neither an ELF (vmlinux, PVH) nor a bzImage")]
    UnknownKernelFormat { path: PathBuf },
    #[error("cannot load kernel {path}: {source}")]
    LoadKernel {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error("cannot read initramfs {path}: {source}")]
    ReadInitramfs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "initramfs {path} ({size_mib} MiB) does not fit in guest RAM between the kernel and \
         {limit:#x}; give the VM more --memory"
    )]
    InitramfsTooLarge {
        path: PathBuf,
        size_mib: u64,
        limit: u64,
    },
    #[error("kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineHasNul,
    #[error("cannot write {what} to guest memory: {detail}")]
    WriteGuest { what: &'static str, detail: String },
}

impl BootError {
    /// True when the error comes from what the user gave us (a bad file, too little memory),
    /// rather than from the host.
    pub fn is_config_error(&self) -> bool {
        !matches!(self, BootError::WriteGuest { .. })
    }
}

/// How the boot vCPU enters the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// 32-bit protected mode, paging off, `ebx` = address of `hvm_start_info`.
    Pvh { entry: u64, start_info: u64 },
    /// 64-bit long mode on identity-mapped page tables, `rsi` = address of `boot_params`.
    Linux64 { entry: u64, boot_params: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    Ram,
    Reserved,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: MemoryKind,
}

/// The memory map every protocol reports: low RAM below the EBDA, the EBDA/BIOS area
/// reserved, RAM from 1 MiB to the hole, and RAM above 4 GiB.
pub fn memory_map(mem_size: u64) -> Vec<MemoryMapEntry> {
    let mut map = vec![
        MemoryMapEntry {
            addr: 0,
            size: layout::EBDA_START,
            kind: MemoryKind::Ram,
        },
        MemoryMapEntry {
            addr: layout::EBDA_START,
            size: layout::HIMEM_START - layout::EBDA_START,
            kind: MemoryKind::Reserved,
        },
    ];
    for (start, len) in layout::ram_ranges(mem_size) {
        let start_above_1m = start.max(layout::HIMEM_START);
        let end = start + len;
        if end > start_above_1m {
            map.push(MemoryMapEntry {
                addr: start_above_1m,
                size: end - start_above_1m,
                kind: MemoryKind::Ram,
            });
        }
    }
    map
}

/// What the boot needs to know, taken from the VM config.
#[derive(Clone, Copy)]
pub struct BootConfig<'a> {
    pub kernel: &'a Path,
    pub initramfs: Option<&'a Path>,
    pub cmdline: &'a str,
    pub mem_size: u64,
    pub cpus: u8,
    /// Appended to the command line when the kernel is Linux (a bzImage, or an ELF carrying
    /// Linux's ELF notes), unless the user already gave them; other kernels never see them.
    pub linux_extra_args: &'a [&'a str],
}

/// Loads the kernel (and initramfs) into guest memory and writes the boot structures.
pub fn load(mem: &GuestMemoryMmap, config: &BootConfig) -> Result<BootEntry, BootError> {
    if config.cmdline.contains('\0') {
        return Err(BootError::CmdlineHasNul);
    }
    let mut kernel = File::open(config.kernel).map_err(|source| BootError::OpenKernel {
        path: config.kernel.to_path_buf(),
        source,
    })?;
    let load_err = |source| BootError::LoadKernel {
        path: config.kernel.to_path_buf(),
        source,
    };

    // Firmware tables first: they live below 1 MiB, where no kernel loads.
    let rsdp = acpi::write(mem, config.cpus)?;
    mptable::write(mem, config.cpus)?;

    let open_err = |source| BootError::OpenKernel {
        path: config.kernel.to_path_buf(),
        source,
    };
    let format = detect_format(&mut kernel).map_err(open_err)?;
    let is_linux = match format {
        KernelFormat::BzImage => true,
        // A malformed ELF is reported by the loader below, with its reason.
        KernelFormat::Elf => elf_has_linux_note(&mut kernel).unwrap_or(false),
        KernelFormat::Unknown => false,
    };
    let cmdline = if is_linux {
        with_extra_args(config.cmdline, config.linux_extra_args)
    } else {
        config.cmdline.to_string()
    };
    let config = &BootConfig {
        cmdline: &cmdline,
        ..*config
    };

    let entry = match format {
        KernelFormat::Elf => {
            let loaded = Elf::load(
                mem,
                None,
                &mut kernel,
                Some(GuestAddress(layout::HIMEM_START)),
            )
            .map_err(load_err)?;
            match loaded.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(entry) => {
                    log::info!("PVH kernel, entry {:#x}", entry.0);
                    pvh::configure(mem, config, &loaded, entry.0, rsdp)?
                }
                _ => {
                    log::info!("ELF vmlinux, 64-bit entry {:#x}", loaded.kernel_load.0);
                    let entry = loaded.kernel_load.0;
                    linux::configure(mem, config, &loaded, entry, rsdp)?
                }
            }
        }
        KernelFormat::BzImage => {
            let loaded = BzImage::load(
                mem,
                None,
                &mut kernel,
                Some(GuestAddress(layout::KERNEL_MIN_LOAD_ADDR)),
            )
            .map_err(load_err)?;
            // The 64-bit entry of a bzImage's protected-mode part is 0x200 past its start
            // (Documentation/arch/x86/boot.rst, "64-bit boot protocol").
            let entry = loaded.kernel_load.0 + 0x200;
            log::info!(
                "bzImage at {:#x}, 64-bit entry {entry:#x}",
                loaded.kernel_load.0
            );
            linux::configure(mem, config, &loaded, entry, rsdp)?
        }
        KernelFormat::Unknown => {
            return Err(BootError::UnknownKernelFormat {
                path: config.kernel.to_path_buf(),
            })
        }
    };
    Ok(entry)
}

/// `cmdline` plus each of `extra` whose key (the part before `=`) it does not mention yet.
fn with_extra_args(cmdline: &str, extra: &[&str]) -> String {
    let mut out = cmdline.trim().to_string();
    let present: Vec<&str> = cmdline
        .split_whitespace()
        .map(|word| word.split('=').next().unwrap_or(word))
        .collect();
    let mut added = Vec::new();
    for arg in extra {
        let key = arg.split('=').next().unwrap_or(arg);
        if !present.contains(&key) {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(arg);
            added.push(*arg);
        }
    }
    if !added.is_empty() {
        log::info!(
            "Linux kernel: appending `{}` to its command line",
            added.join(" ")
        );
    }
    out
}

const PT_NOTE: u32 = 4;
/// Note segments larger than this are not Linux's and are not read.
const MAX_NOTE_SEGMENT: u64 = 64 << 10;

/// Whether an ELF kernel carries a note owned by "Linux" (every vmlinux has such notes, e.g.
/// the build salt); the test guest and other PVH kernels do not.
fn elf_has_linux_note(kernel: &mut File) -> std::io::Result<bool> {
    let mut ehdr = [0u8; 64];
    kernel.seek(SeekFrom::Start(0))?;
    kernel.read_exact(&mut ehdr)?;
    let phoff = u64::from_le_bytes(ehdr[0x20..0x28].try_into().unwrap());
    let phentsize = u64::from(u16::from_le_bytes([ehdr[0x36], ehdr[0x37]]));
    let phnum = u64::from(u16::from_le_bytes([ehdr[0x38], ehdr[0x39]]));
    let mut found = false;
    for i in 0..phnum {
        let mut phdr = [0u8; 56];
        kernel.seek(SeekFrom::Start(phoff + i * phentsize))?;
        kernel.read_exact(&mut phdr)?;
        let kind = u32::from_le_bytes(phdr[0..4].try_into().unwrap());
        let offset = u64::from_le_bytes(phdr[8..16].try_into().unwrap());
        let size = u64::from_le_bytes(phdr[32..40].try_into().unwrap());
        if kind != PT_NOTE || size > MAX_NOTE_SEGMENT {
            continue;
        }
        let mut notes = vec![0u8; size as usize];
        kernel.seek(SeekFrom::Start(offset))?;
        kernel.read_exact(&mut notes)?;
        if notes_have_owner(&notes, b"Linux") {
            found = true;
            break;
        }
    }
    kernel.seek(SeekFrom::Start(0))?;
    Ok(found)
}

fn notes_have_owner(mut notes: &[u8], owner: &[u8]) -> bool {
    let align4 = |n: usize| n.next_multiple_of(4);
    while notes.len() >= 12 {
        let namesz = u32::from_le_bytes(notes[0..4].try_into().unwrap()) as usize;
        let descsz = u32::from_le_bytes(notes[4..8].try_into().unwrap()) as usize;
        let name_end = 12 + namesz;
        if name_end > notes.len() {
            return false;
        }
        let name = &notes[12..name_end];
        if name.strip_suffix(b"\0").unwrap_or(name) == owner {
            return true;
        }
        let next = 12usize
            .saturating_add(align4(namesz))
            .saturating_add(align4(descsz));
        if next > notes.len() {
            return false;
        }
        notes = &notes[next..];
    }
    false
}

enum KernelFormat {
    Elf,
    BzImage,
    Unknown,
}

fn detect_format(kernel: &mut File) -> std::io::Result<KernelFormat> {
    let mut head = [0u8; 0x206];
    kernel.seek(SeekFrom::Start(0))?;
    let mut filled = 0;
    while filled < head.len() {
        match kernel.read(&mut head[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    kernel.seek(SeekFrom::Start(0))?;
    if filled >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    if filled == head.len() && head[0x202..0x206] == *b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Ok(KernelFormat::Unknown)
}

/// Reads the initramfs and puts it as high as possible in RAM below `limit` (and below the
/// 32-bit hole), page-aligned and above `lowest` (the kernel's end). Returns (address, size).
fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    mem_size: u64,
    lowest: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let read_err = |source| BootError::ReadInitramfs {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let top = limit.min(mem_size).min(layout::MEM_32BIT_GAP_START);
    let too_large = || BootError::InitramfsTooLarge {
        path: path.to_path_buf(),
        size_mib: size.div_ceil(1 << 20),
        limit: top,
    };
    let addr = top
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= lowest)
        .ok_or_else(too_large)?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| BootError::WriteGuest {
            what: "initramfs",
            detail: e.to_string(),
        })?;
    log::info!("initramfs: {size} bytes at {addr:#x}");
    Ok((addr, size))
}

/// Writes the NUL-terminated command line at CMDLINE_START.
fn write_cmdline(
    mem: &GuestMemoryMmap,
    cmdline: &str,
    max_with_nul: usize,
) -> Result<(), BootError> {
    if cmdline.len() + 1 > max_with_nul {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: max_with_nul - 1,
        });
    }
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(layout::CMDLINE_START))
        .map_err(|e| BootError::WriteGuest {
            what: "command line",
            detail: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram_total(map: &[MemoryMapEntry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == MemoryKind::Ram)
            .map(|e| e.size)
            .sum()
    }

    #[test]
    fn memory_map_reserves_bios_area_and_skips_the_hole() {
        let map = memory_map(4 << 30);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2].addr, layout::HIMEM_START);
        assert_eq!(map[2].addr + map[2].size, layout::MEM_32BIT_GAP_START);
        assert_eq!(map[3].addr, layout::MEM_4G);
        assert_eq!(
            ram_total(&map),
            (4 << 30) - (layout::HIMEM_START - layout::EBDA_START)
        );
    }

    #[test]
    fn extra_args_are_appended_unless_the_user_gave_the_key() {
        assert_eq!(
            with_extra_args("console=ttyS0", &["noxsave", "clearcpuid=x"]),
            "console=ttyS0 noxsave clearcpuid=x"
        );
        assert_eq!(
            with_extra_args("clearcpuid=y noxsave", &["noxsave", "clearcpuid=x"]),
            "clearcpuid=y noxsave"
        );
        assert_eq!(with_extra_args("", &["noxsave"]), "noxsave");
    }

    #[test]
    fn linux_note_owner_is_found_among_other_notes() {
        let mut notes = Vec::new();
        for (name, desc) in [
            (&b"Xen\0"[..], &[0u8; 4][..]),
            (&b"Linux\0"[..], &[1u8; 6][..]),
        ] {
            notes.extend_from_slice(&(name.len() as u32).to_le_bytes());
            notes.extend_from_slice(&(desc.len() as u32).to_le_bytes());
            notes.extend_from_slice(&1u32.to_le_bytes());
            notes.extend_from_slice(name);
            notes.resize(notes.len().next_multiple_of(4), 0);
            notes.extend_from_slice(desc);
            notes.resize(notes.len().next_multiple_of(4), 0);
        }
        assert!(notes_have_owner(&notes, b"Linux"));
        assert!(notes_have_owner(&notes, b"Xen"));
        assert!(!notes_have_owner(&notes, b"GNU"));
        assert!(!notes_have_owner(&notes[..20], b"Linux"));
    }

    #[test]
    fn small_memory_map_has_one_high_ram_range() {
        let map = memory_map(512 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(map[2].addr + map[2].size, 512 << 20);
    }
}
