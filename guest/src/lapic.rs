//! The local xAPIC through its user-mapped page at 0xFEE00000.

use crate::x86::{mmio_read32, mmio_write32, pause};

const BASE: u64 = 0xFEE0_0000;
const ID: u64 = BASE + 0x20;
const TPR: u64 = BASE + 0x80;
const SPURIOUS: u64 = BASE + 0xF0;
const ICR_LOW: u64 = BASE + 0x300;
const ICR_HIGH: u64 = BASE + 0x310;

pub const SPURIOUS_VECTOR: u8 = 0xFF;
const APIC_SOFTWARE_ENABLE: u32 = 1 << 8;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;
const ICR_INIT: u32 = 0x500;
const ICR_STARTUP: u32 = 0x600;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;

/// This CPU's xAPIC id.
pub fn id() -> u8 {
    (mmio_read32(ID) >> 24) as u8
}

/// Software-enables this CPU's APIC so it accepts interrupts (MSI-X).
pub fn enable() {
    mmio_write32(TPR, 0);
    mmio_write32(SPURIOUS, APIC_SOFTWARE_ENABLE | SPURIOUS_VECTOR as u32);
}

fn send_ipi(apic_id: u8, command: u32) {
    mmio_write32(ICR_HIGH, (apic_id as u32) << 24);
    mmio_write32(ICR_LOW, command);
    for _ in 0..1_000_000 {
        if mmio_read32(ICR_LOW) & ICR_DELIVERY_PENDING == 0 {
            break;
        }
        pause();
    }
}

pub fn send_init(apic_id: u8) {
    send_ipi(apic_id, ICR_INIT | ICR_LEVEL_ASSERT);
}

/// A start-up IPI: the CPU starts in real mode at `page << 12`.
pub fn send_startup(apic_id: u8, page: u8) {
    send_ipi(apic_id, ICR_STARTUP | ICR_LEVEL_ASSERT | page as u32);
}
