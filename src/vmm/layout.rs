//! The guest-physical memory map every part of kickvm agrees on. Other crates (PCI, virtio)
//! take their windows from here rather than hard-coding addresses.

/// Real-mode IVT and the BIOS data area; kept as RAM but nothing of ours lives there.
pub const BDA_START: u64 = 0x400;
/// BDA word holding the EBDA segment; guests scanning for the MP table follow it.
pub const BDA_EBDA_SEGMENT: u64 = 0x40e;
/// BDA word holding the base memory size in KiB.
pub const BDA_BASE_MEMORY_KIB: u64 = 0x413;

/// Boot GDT (4 entries) and an empty IDT, read by the CPU only until the guest loads its own.
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;

/// PVH `hvm_start_info`, followed by its module list and memory map.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Maximum number of memory-map entries we describe (PVH and e820 alike).
pub const MAX_MEMMAP_ENTRIES: usize = 16;

/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack of the 64-bit Linux entry (grows down from here).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-map page tables for the 64-bit Linux entry: PML4, PDPT, then 4 page directories
/// (4 GiB of 2 MiB pages, so boot data anywhere below the hole is reachable).
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
pub const PD_COUNT: u64 = 4;

/// Kernel command line (NUL-terminated) and its maximum size including the NUL.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;

/// Extended BIOS data area (reserved in the memory map from here to 1 MiB).
pub const EBDA_START: u64 = 0x9_fc00;
/// ACPI tables (RSDP first) in the BIOS area that guests scan for the RSDP.
pub const ACPI_START: u64 = 0xe_0000;
/// The MP table goes in the BIOS ROM segment, which every MP-table scanner searches and which
/// (unlike the 1 KiB left in the EBDA) holds 254 processor entries.
pub const MPTABLE_START: u64 = 0xf_0000;
/// Start of the legacy VGA/BIOS hole, reserved in the memory map up to 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;

/// Where a bzImage's protected-mode kernel is loaded when its header asks for less.
pub const KERNEL_MIN_LOAD_ADDR: u64 = HIMEM_START;

/// RAM below the 32-bit PCI hole ends here; the rest of RAM continues at 4 GiB.
pub const MEM_32BIT_GAP_START: u64 = 0xc000_0000;
pub const MEM_4G: u64 = 0x1_0000_0000;
pub const MEM_32BIT_GAP_SIZE: u64 = MEM_4G - MEM_32BIT_GAP_START;

/// 32-bit PCI MMIO window for BARs (inside the hole, below the IOAPIC/LAPIC/firmware area).
pub const PCI_MMIO32_START: u64 = MEM_32BIT_GAP_START;
pub const PCI_MMIO32_END: u64 = 0xfc00_0000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;

/// PCI I/O-port window for BARs and the type-1 configuration mechanism.
pub const PCI_IO_START: u64 = 0xc000;
pub const PCI_IO_END: u64 = 0x1_0000;
pub const PCI_CONFIG_ADDRESS_PORT: u64 = 0xcf8;
pub const PCI_CONFIG_IO_LEN: u64 = 8;

/// KVM's private pages: the real-mode identity map (1 page) and the TSS (3 pages), in the hole
/// below the 256 KiB firmware area, where no device and no RAM lives.
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
pub const KVM_TSS_START: u64 = 0xfffb_d000;

/// Legacy devices.
pub const SERIAL_PORT_BASE: u64 = 0x3f8;
pub const SERIAL_PORT_LEN: u64 = 8;
pub const SERIAL_IRQ: u32 = 4;
pub const I8042_PORT_BASE: u64 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;
pub const ACPI_SHUTDOWN_PORT: u64 = 0x600;
/// Sleep control (0x600) and sleep status (0x601) registers of the hardware-reduced FADT.
pub const ACPI_SHUTDOWN_PORT_LEN: u64 = 2;
/// The Generic Event Device's event register (read clears it); the DSDT names it.
pub const ACPI_GED_PORT: u64 = 0x602;
pub const ACPI_GED_PORT_LEN: u64 = 1;
/// The GED's interrupt: an otherwise unused ISA pin, edge-triggered, active high (DSDT `_CRS`).
pub const ACPI_GED_GSI: u32 = 5;

/// GSIs 0..23 are IOAPIC pins; MSI routes are allocated from here upward.
pub const IOAPIC_PINS: u32 = 24;
pub const MSI_GSI_START: u32 = IOAPIC_PINS;

const GIB: u64 = 1 << 30;

/// The guest RAM ranges for `mem_size` bytes: below the hole, then from 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MEM_32BIT_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MEM_32BIT_GAP_START),
            (MEM_4G, mem_size - MEM_32BIT_GAP_START),
        ]
    }
}

/// One past the highest guest-physical RAM address.
pub fn ram_end(mem_size: u64) -> u64 {
    ram_ranges(mem_size)
        .last()
        .map(|&(start, len)| start + len)
        .unwrap_or(0)
}

/// Start of the 64-bit PCI MMIO window: the first 1 GiB boundary above both RAM and 4 GiB.
pub fn pci_mmio64_start(mem_size: u64) -> u64 {
    ram_end(mem_size).max(MEM_4G).next_multiple_of(GIB)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range_below_the_hole() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_ranges(3 * GIB), vec![(0, 3 * GIB)]);
    }

    #[test]
    fn memory_above_3g_continues_at_4g() {
        assert_eq!(ram_ranges(4 * GIB), vec![(0, 3 * GIB), (MEM_4G, GIB)]);
        assert_eq!(ram_end(4 * GIB), 5 * GIB);
    }

    #[test]
    fn mmio64_window_starts_above_ram_on_a_gib_boundary() {
        assert_eq!(pci_mmio64_start(512 << 20), MEM_4G);
        assert_eq!(pci_mmio64_start(4 * GIB + 1), 6 * GIB);
    }
}
