//! Routing an IOAPIC pin (a GSI) to a vector on one CPU, with the IOAPIC the
//! MADT names for it.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::acpi::{self, u32_at};
use crate::x86::mmio_write32;

const MADT_IO_APIC: u8 = 1;
const REGSEL: u64 = 0x00;
const WINDOW: u64 = 0x10;
const REDIRECTION_TABLE: u32 = 0x10;
/// Redirection entry bits.
const LEVEL_TRIGGERED: u32 = 1 << 15;

/// The ACPI root pointer the boot protocol handed over (0: scan for it).
static RSDP_HINT: AtomicU64 = AtomicU64::new(0);

/// How a line signals.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Edge, active high (ISA-style, the GED's `_CRS`).
    Edge,
    /// Level, active high (a PCI INTx line as kickvm wires it): the source
    /// must be quieted before the EOI, or the line fires again.
    Level,
}

/// Remembers where the ACPI tables are, for later routes.
pub fn init(rsdp_hint: u64) {
    RSDP_HINT.store(rsdp_hint, Ordering::Relaxed);
}

/// The IOAPIC serving `gsi`: its MMIO base and first GSI, from the MADT.
fn ioapic_for(gsi: u32) -> Option<(u64, u32)> {
    let rsdp = acpi::find_rsdp(RSDP_HINT.load(Ordering::Relaxed))?;
    let madt = acpi::find_table(rsdp, b"APIC")?;
    acpi::madt_entries(madt)
        .filter(|(kind, e)| *kind == MADT_IO_APIC && e.len() >= 12)
        .map(|(_, e)| (u32_at(e, 4) as u64, u32_at(e, 8)))
        // 24 pins: the common IOAPIC, the one kickvm and QEMU emulate.
        .find(|&(_, first)| (first..first + 24).contains(&gsi))
}

fn write(base: u64, register: u32, value: u32) {
    mmio_write32(base + REGSEL, register);
    mmio_write32(base + WINDOW, value);
}

/// Routes `gsi` to `vector` on the CPU `apic_id` (fixed delivery, physical
/// destination, unmasked). False if no IOAPIC serves it.
pub fn route(gsi: u32, vector: u8, apic_id: u8, trigger: Trigger) -> bool {
    let Some((base, first)) = ioapic_for(gsi) else {
        return false;
    };
    let entry = REDIRECTION_TABLE + 2 * (gsi - first);
    write(base, entry + 1, (apic_id as u32) << 24);
    let mode = match trigger {
        Trigger::Edge => 0,
        Trigger::Level => LEVEL_TRIGGERED,
    };
    write(base, entry, vector as u32 | mode);
    true
}
