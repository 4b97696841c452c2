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
pub struct BootConfig<'a> {
    pub kernel: &'a Path,
    pub initramfs: Option<&'a Path>,
    pub cmdline: &'a str,
    pub mem_size: u64,
    pub cpus: u8,
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

    let entry = match detect_format(&mut kernel).map_err(|source| BootError::OpenKernel {
        path: config.kernel.to_path_buf(),
        source,
    })? {
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
    fn small_memory_map_has_one_high_ram_range() {
        let map = memory_map(512 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(map[2].addr + map[2].size, 512 << 20);
    }
}
