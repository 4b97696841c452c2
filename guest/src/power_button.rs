//! The ACPI power button of a hardware-reduced platform, found the way an OS
//! finds it: a Generic Event Device (`_HID "ACPI0013"`) in the DSDT whose
//! `_CRS` names its interrupt and whose operation region is the event register
//! its `_EVT` reads (bit 0: power button). This guest has no AML interpreter,
//! so it reads those two facts from the GED's bytes, as kickvm's DSDT lays
//! them out (`Interrupt` descriptor, `OperationRegion (..., SystemIO, port, ..)`),
//! and routes the interrupt through the IOAPIC the MADT names. Where there is
//! no GED (QEMU's q35, firmware without one) there is no button.

use core::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};

use crate::acpi::{self, u16_at, u32_at};
use crate::boot::INTERRUPT_COUNTS;
use crate::ioapic::{self, Trigger};
use crate::x86::inb;

/// The vector the GED interrupt is routed to (below the virtio MSI-X vectors).
pub const VECTOR: u8 = 0x30;
const GED_HID: &[u8] = b"ACPI0013\0";
const EXTENDED_IRQ_DESCRIPTOR: u8 = 0x89;
const EXT_OP_PREFIX: u8 = 0x5B;
const OP_REGION_OP: u8 = 0x80;
const DEVICE_OP: u8 = 0x82;
const SYSTEM_IO: u8 = 0x01;
const BYTE_PREFIX: u8 = 0x0A;
const WORD_PREFIX: u8 = 0x0B;
const EVENT_POWER_BUTTON: u8 = 1 << 0;

static PORT: AtomicU16 = AtomicU16::new(0);
static INTERRUPTS_SEEN: AtomicU64 = AtomicU64::new(0);
static PRESSED: AtomicBool = AtomicBool::new(false);

/// The GED's interrupt (GSI) and event register port, from its DSDT bytes.
fn find_ged(dsdt: &[u8]) -> Option<(u32, u16)> {
    let hid = dsdt.windows(GED_HID.len()).position(|w| w == GED_HID)?;
    // The GED's objects follow its _HID, up to the next device.
    let rest = &dsdt[hid..];
    let end = rest
        .windows(2)
        .position(|w| w == [EXT_OP_PREFIX, DEVICE_OP])
        .unwrap_or(rest.len());
    let body = &rest[..end];
    let irq = body
        .windows(9)
        .find(|w| w[0] == EXTENDED_IRQ_DESCRIPTOR && u16_at(w, 1) == 6 && w[4] == 1)
        .map(|w| u32_at(w, 5))?;
    // ExtOp OpRegion, NameSeg (4), RegionSpace, RegionOffset (byte or word).
    let port = (0..body.len()).find_map(|i| {
        let op = body.get(i..i + 8)?;
        if op[0] != EXT_OP_PREFIX || op[1] != OP_REGION_OP || op[6] != SYSTEM_IO {
            return None;
        }
        match op[7] {
            BYTE_PREFIX => body.get(i + 8).map(|&b| b as u16),
            WORD_PREFIX => body.get(i + 8..i + 10).map(|b| u16_at(b, 0)),
            _ => None,
        }
    })?;
    Some((irq, port))
}

/// Looks for the button and, if there is one, routes its interrupt (edge,
/// active high, as the GED's `_CRS` says) to `VECTOR` on the CPU `apic_id`.
/// Returns the GSI.
pub fn arm(rsdp_hint: u64, apic_id: u8) -> Option<u32> {
    let rsdp = acpi::find_rsdp(rsdp_hint)?;
    let (gsi, port) = find_ged(acpi::find_dsdt(rsdp)?)?;
    if !ioapic::route(gsi, VECTOR, apic_id, Trigger::Edge) {
        return None;
    }
    PORT.store(port, Ordering::Relaxed);
    // A press before the pin was unmasked raised no interrupt; its event waits in the
    // register.
    if inb(port) & EVENT_POWER_BUTTON != 0 {
        PRESSED.store(true, Ordering::Relaxed);
    }
    Some(gsi)
}

/// True if the platform has a button this guest armed.
pub fn armed() -> bool {
    PORT.load(Ordering::Relaxed) != 0
}

/// True once the power button has been pressed: a new GED interrupt whose
/// event register says so. Reading the register acknowledges the press.
pub fn pressed() -> bool {
    if PRESSED.load(Ordering::Relaxed) {
        return true;
    }
    let port = PORT.load(Ordering::Relaxed);
    if port == 0 {
        return false;
    }
    let taken = INTERRUPT_COUNTS[VECTOR as usize].load(Ordering::Acquire);
    if taken == INTERRUPTS_SEEN.load(Ordering::Relaxed) {
        return false;
    }
    INTERRUPTS_SEEN.store(taken, Ordering::Relaxed);
    if inb(port) & EVENT_POWER_BUTTON != 0 {
        PRESSED.store(true, Ordering::Relaxed);
    }
    PRESSED.load(Ordering::Relaxed)
}
