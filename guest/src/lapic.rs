//! The local xAPIC through its user-mapped page at 0xFEE00000.

use crate::x86::{mmio_read32, mmio_write32, pause};

const BASE: u64 = 0xFEE0_0000;
const ID: u64 = BASE + 0x20;
const TPR: u64 = BASE + 0x80;
const SPURIOUS: u64 = BASE + 0xF0;
const ICR_LOW: u64 = BASE + 0x300;
const ICR_HIGH: u64 = BASE + 0x310;

pub const SPURIOUS_VECTOR: u8 = 0xFF;
/// Self-IPI vector whose CPL0 handler halts (see `halt_until_changed`); below the MSI-X
/// vectors so a device interrupt pending with it is taken first.
pub const HALT_VECTOR: u8 = 0x31;
const ICR_DEST_SELF: u32 = 1 << 18;
/// The periodic tick that bounds a halt (so a completion that never comes still ends in a
/// timeout, not a hang); its interrupts are counted and EOI'd like any other.
pub const WAKE_TICK_VECTOR: u8 = 0x32;
const LVT_TIMER: u64 = BASE + 0x320;
const TIMER_INITIAL_COUNT: u64 = BASE + 0x380;
const TIMER_DIVIDE: u64 = BASE + 0x3E0;
const LVT_TIMER_PERIODIC: u32 = 1 << 17;
const TIMER_DIVIDE_BY_16: u32 = 0x3;
/// 10 ms at KVM's 1 GHz APIC bus, divided by 16.
const WAKE_TICK_COUNT: u32 = 10_000_000 / 16;
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

/// Gives the CPU up until an interrupt moves `counter` away from `seen` (or any interrupt
/// arrives): `hlt` needs CPL0, which this CPL3 code reaches by sending itself an interrupt
/// whose handler checks the counter with interrupts off and halts. The vCPU's host thread
/// then sleeps instead of spinning, leaving the host CPU to others (a device's I/O thread).
/// Costs a few emulated CPL0 instructions under PVM; returns at once if it already moved.
pub fn halt_until_changed(counter: &core::sync::atomic::AtomicU64, seen: u64) {
    // SAFETY: the ICR is in the user-mapped APIC page; the handler (boot.rs `halt_common`)
    // reads `counter` through %rdi, compares %rsi, sets %ecx and changes nothing else the
    // compiler can see. The loop waits until that handler ran (other interrupts may be
    // taken first).
    unsafe {
        core::arch::asm!(
            "xor ecx, ecx",
            "mov dword ptr [{icr}], {command:e}",
            "2:",
            "test ecx, ecx",
            "jnz 3f",
            "pause",
            "jmp 2b",
            "3:",
            icr = in(reg) ICR_LOW,
            command = in(reg) ICR_DEST_SELF | HALT_VECTOR as u32,
            in("rdi") counter.as_ptr(),
            in("rsi") seen,
            out("ecx") _,
            options(nostack),
        );
    }
}

/// Starts this CPU's 10 ms wake tick (for `halt_until_changed`).
pub fn start_wake_tick() {
    mmio_write32(TIMER_DIVIDE, TIMER_DIVIDE_BY_16);
    mmio_write32(LVT_TIMER, LVT_TIMER_PERIODIC | WAKE_TICK_VECTOR as u32);
    mmio_write32(TIMER_INITIAL_COUNT, WAKE_TICK_COUNT);
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
