//! PVH boot (xenbits "PVH boot ABI"): the guest enters in 32-bit protected mode with `ebx`
//! pointing at `hvm_start_info` version 1, which carries the command line, the modules
//! (initramfs) and the memory map.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::KernelLoaderResult;
use vm_memory::GuestAddress;

use super::{
    load_initramfs, memory_map, write_cmdline, BootConfig, BootEntry, BootError, MemoryKind,
};
use crate::vmm::layout;
use crate::vmm::memory::GuestMemoryMmap;

const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// hvm_memmap_table_entry types (same values as e820).
const XEN_HVM_MEMMAP_TYPE_RAM: u32 = 1;
const XEN_HVM_MEMMAP_TYPE_RESERVED: u32 = 2;

pub fn configure(
    mem: &GuestMemoryMmap,
    config: &BootConfig,
    loaded: &KernelLoaderResult,
    entry: u64,
    rsdp: u64,
) -> Result<BootEntry, BootError> {
    write_cmdline(mem, config.cmdline, layout::CMDLINE_MAX_SIZE)?;

    let memmap: Vec<hvm_memmap_table_entry> = memory_map(config.mem_size)
        .into_iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: match e.kind {
                MemoryKind::Ram => XEN_HVM_MEMMAP_TYPE_RAM,
                MemoryKind::Reserved => XEN_HVM_MEMMAP_TYPE_RESERVED,
            },
            reserved: 0,
        })
        .collect();

    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: layout::CMDLINE_START,
        memmap_paddr: layout::PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        rsdp_paddr: rsdp,
        ..Default::default()
    };

    let mut modules = Vec::new();
    if let Some(path) = config.initramfs {
        let (addr, size) = load_initramfs(mem, path, config.mem_size, loaded.kernel_end, u64::MAX)?;
        modules.push(hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        });
        start_info.nr_modules = 1;
        start_info.modlist_paddr = layout::PVH_MODLIST_START;
    }

    let mut params = BootParams::new(&start_info, GuestAddress(layout::PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(layout::PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem).map_err(|e| {
        BootError::WriteGuest {
            what: "hvm_start_info",
            detail: e.to_string(),
        }
    })?;
    Ok(BootEntry::Pvh {
        entry,
        start_info: layout::PVH_INFO_START,
    })
}
