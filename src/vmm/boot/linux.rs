//! Linux 64-bit boot protocol (Documentation/arch/x86/boot.rst): `boot_params` (the zero
//! page) with the setup header, the command line, the initramfs and the e820 map; the kernel
//! is entered in long mode with `rsi` pointing at the zero page.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::KernelLoaderResult;
use vm_memory::GuestAddress;

use super::{
    load_initramfs, memory_map, write_cmdline, BootConfig, BootEntry, BootError, MemoryKind,
};
use crate::vmm::layout;
use crate::vmm::memory::GuestMemoryMmap;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
/// "Undefined" boot loader id: we are not one of the registered loaders.
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// Boot protocol 2.06 added `cmdline_size`; older kernels take at most 255 characters.
const OLD_CMDLINE_MAX_WITH_NUL: usize = 256;
/// Before protocol 2.03 the initramfs had to end below this address.
const OLD_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

pub fn configure(
    mem: &GuestMemoryMmap,
    config: &BootConfig,
    loaded: &KernelLoaderResult,
    entry: u64,
    rsdp: u64,
) -> Result<BootEntry, BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = loaded.setup_header {
        params.hdr = hdr;
    } else {
        // An ELF vmlinux carries no setup header; describe ourselves as protocol 2.10+.
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
        params.hdr.version = 0x020c;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.acpi_rsdp_addr = rsdp;

    let cmdline_max = if params.hdr.version >= 0x0206 && params.hdr.cmdline_size != 0 {
        params.hdr.cmdline_size as usize + 1
    } else if loaded.setup_header.is_none() {
        layout::CMDLINE_MAX_SIZE
    } else {
        OLD_CMDLINE_MAX_WITH_NUL
    };
    write_cmdline(
        mem,
        config.cmdline,
        cmdline_max.min(layout::CMDLINE_MAX_SIZE),
    )?;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = config.cmdline.len() as u32;

    if let Some(path) = config.initramfs {
        let limit = match params.hdr.initrd_addr_max {
            0 if loaded.setup_header.is_some() => OLD_INITRD_ADDR_MAX,
            0 => u64::MAX,
            max => u64::from(max),
        } + 1;
        // The decompressor needs `init_size` bytes from the load address.
        let kernel_top = loaded
            .kernel_end
            .max(loaded.kernel_load.0 + u64::from(params.hdr.init_size));
        let (addr, size) = load_initramfs(mem, path, config.mem_size, kernel_top, limit)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let map = memory_map(config.mem_size);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: match e.kind {
                MemoryKind::Ram => E820_RAM,
                MemoryKind::Reserved => E820_RESERVED,
            },
        };
    }
    params.e820_entries = map.len() as u8;

    let boot = BootParams::new(&params, GuestAddress(layout::ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&boot, mem).map_err(|e| {
        BootError::WriteGuest {
            what: "boot_params",
            detail: e.to_string(),
        }
    })?;
    Ok(BootEntry::Linux64 {
        entry,
        boot_params: layout::ZERO_PAGE_START,
    })
}
