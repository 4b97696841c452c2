//! Intel MultiProcessor Specification 1.4 tables: how a guest without ACPI learns its CPUs
//! (one processor entry per vCPU, APIC ids 0..N-1), the IOAPIC and the ISA interrupt wiring.
//! Written in the BIOS ROM segment (0xF0000), where guests scan for the floating pointer.

use vm_memory::{Bytes, GuestAddress};

use super::BootError;
use crate::vmm::layout;
use crate::vmm::memory::GuestMemoryMmap;

const MP_SPEC_REV: u8 = 4;
const LAPIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// Family 6 signature, FPU and APIC feature flags: what the MP spec wants for "a modern CPU".
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const IOAPIC_ENABLED: u8 = 1;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity and trigger "conform to the bus" (ISA: active high, edge).
const INT_FLAGS_CONFORMING: u16 = 0;
const ISA_BUS_ID: u8 = 0;
const ISA_IRQS: u8 = 16;
const ALL_LAPICS: u8 = 0xff;

const FLOATING_POINTER_LEN: usize = 16;
const CONFIG_HEADER_LEN: usize = 44;

fn checksum_fix(bytes: &[u8]) -> u8 {
    let sum = bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    0u8.wrapping_sub(sum)
}

/// Builds the floating pointer followed by the configuration table, for `cpus` vCPUs, as
/// bytes to be placed at `base`.
pub fn build(base: u64, cpus: u8) -> Vec<u8> {
    let config_addr = base + FLOATING_POINTER_LEN as u64;
    let ioapic_id = cpus;

    let mut entries = Vec::new();
    let mut entry_count: u16 = 0;
    for apic_id in 0..cpus {
        let flags = CPU_ENABLED | if apic_id == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, apic_id, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        entry_count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    entry_count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED]);
    entries.extend_from_slice(&(layout::IOAPIC_START as u32).to_le_bytes());
    entry_count += 1;
    // ISA IRQ n is IOAPIC pin n: the in-kernel irqchip's default GSI routing.
    for irq in 0..ISA_IRQS {
        entries.push(ENTRY_IO_INTERRUPT);
        entries.push(INT_TYPE_INT);
        entries.extend_from_slice(&INT_FLAGS_CONFORMING.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, irq, ioapic_id, irq]);
        entry_count += 1;
    }
    // Every LAPIC: LINT0 receives the 8259's ExtINT, LINT1 NMIs (matches the LVT setup).
    for (int_type, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        entries.push(ENTRY_LOCAL_INTERRUPT);
        entries.push(int_type);
        entries.extend_from_slice(&INT_FLAGS_CONFORMING.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, 0, ALL_LAPICS, lint]);
        entry_count += 1;
    }

    let mut header = Vec::with_capacity(CONFIG_HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((CONFIG_HEADER_LEN + entries.len()) as u16).to_le_bytes());
    header.push(MP_SPEC_REV);
    header.push(0); // checksum, fixed below
    header.extend_from_slice(b"KICKVM  ");
    header.extend_from_slice(b"000000000000");
    header.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&entry_count.to_le_bytes());
    header.extend_from_slice(&(layout::APIC_START as u32).to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes()); // no extended entries
    header.push(0);
    header.push(0);
    debug_assert_eq!(header.len(), CONFIG_HEADER_LEN);

    let mut config = header;
    config.extend_from_slice(&entries);
    config[7] = checksum_fix(&config);

    let mut floating = Vec::with_capacity(FLOATING_POINTER_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(config_addr as u32).to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(MP_SPEC_REV);
    floating.push(0); // checksum, fixed below
    floating.extend_from_slice(&[0; 5]); // feature bytes: a configuration table is present
    floating[10] = checksum_fix(&floating);

    floating.extend_from_slice(&config);
    floating
}

/// Writes the MP table at MPTABLE_START, and fills the BIOS data area words (EBDA segment,
/// base memory size) that scanners read to decide where else to look.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<(), BootError> {
    let table = build(layout::MPTABLE_START, cpus);
    let write_err = |e: vm_memory::GuestMemoryError| BootError::WriteGuest {
        what: "MP table",
        detail: e.to_string(),
    };
    mem.write_slice(&table, GuestAddress(layout::MPTABLE_START))
        .map_err(write_err)?;
    mem.write_obj(
        (layout::EBDA_START >> 4) as u16,
        GuestAddress(layout::BDA_EBDA_SEGMENT),
    )
    .map_err(write_err)?;
    mem.write_obj(
        (layout::EBDA_START >> 10) as u16,
        GuestAddress(layout::BDA_BASE_MEMORY_KIB),
    )
    .map_err(write_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn floating_pointer_and_table_checksums_are_zero() {
        let table = build(layout::MPTABLE_START, 4);
        assert_eq!(&table[..4], b"_MP_");
        assert_eq!(sum(&table[..16]), 0);
        let config = &table[16..];
        let len = u16::from_le_bytes([config[4], config[5]]) as usize;
        assert_eq!(len, config.len());
        assert_eq!(sum(config), 0);
    }

    #[test]
    fn one_enabled_processor_per_vcpu_with_bsp_first() {
        for cpus in [1u8, 2, 4, 254] {
            let table = build(layout::MPTABLE_START, cpus);
            let config = &table[16..];
            let count = u16::from_le_bytes([config[34], config[35]]);
            let processors: Vec<&[u8]> = config[44..].chunks(20).take(cpus as usize).collect();
            assert!(processors
                .iter()
                .all(|p| p[0] == ENTRY_PROCESSOR && p[3] & CPU_ENABLED != 0));
            let ids: Vec<u8> = processors.iter().map(|p| p[1]).collect();
            assert_eq!(ids, (0..cpus).collect::<Vec<_>>());
            assert_eq!(processors[0][3] & CPU_BOOTSTRAP, CPU_BOOTSTRAP);
            assert_eq!(count, u16::from(cpus) + 2 + 16 + 2);
        }
    }

    #[test]
    fn table_for_most_cpus_fits_below_1m() {
        let table = build(layout::MPTABLE_START, 254);
        assert!(layout::MPTABLE_START + table.len() as u64 <= layout::HIMEM_START);
    }
}
