//! The ACPI registers of kickvm's hardware-reduced platform (see the FADT and DSDT built in
//! `vmm::boot::acpi`): sleep control at 0x600, where writing SLP_TYP=5 | SLP_EN (0x34, as for
//! cloud-hypervisor) powers off; sleep status at 0x601, which reads as zero; and the Generic
//! Event Device's event register at 0x602, through which the host asks the guest to shut down.
//!
//! A hardware-reduced platform has no fixed power button, so the request travels the way ACPI
//! 6 prescribes for such platforms: the GED (`ACPI0013`) raises its interrupt, the guest's
//! `_EVT` method reads the event register and sends `Notify (PWRB, 0x80)` to a control-method
//! power button (`PNP0C0C`), which Linux turns into KEY_POWER (systemd-logind, acpid).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use kickvm_bus::BusDevice;
use vmm_sys_util::eventfd::EventFd;

use crate::vmm::exit::{ExitNotifier, VmExitReason};

const SLEEP_ENABLE: u8 = 1 << 5;
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0x7;
const SLEEP_TYPE_S5: u8 = 5;

pub struct AcpiShutdown {
    exit: Arc<ExitNotifier>,
}

impl AcpiShutdown {
    pub fn new(exit: Arc<ExitNotifier>) -> Self {
        AcpiShutdown { exit }
    }
}

impl BusDevice for AcpiShutdown {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        if offset != 0 {
            return;
        }
        let sleep_type = (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK;
        if value & SLEEP_ENABLE != 0 && sleep_type == SLEEP_TYPE_S5 {
            log::info!("guest entered ACPI S5: powering off");
            self.exit.notify(VmExitReason::PowerOff);
        } else {
            log::debug!("ACPI sleep control write {value:#x} ignored");
        }
    }
}

/// Bit 0 of the GED event register: the power button was pressed.
pub const GED_EVENT_POWER_BUTTON: u8 = 1 << 0;

/// The GED's side shared with the control API: pressing the button from any thread.
pub struct GedEvents {
    pending: AtomicU8,
    interrupt: EventFd,
    presses: AtomicU64,
    taken: AtomicU64,
}

impl GedEvents {
    /// `interrupt` is an irqfd on the GSI the DSDT gives the GED (edge-triggered).
    pub fn new(interrupt: EventFd) -> Self {
        GedEvents {
            pending: AtomicU8::new(0),
            interrupt,
            presses: AtomicU64::new(0),
            taken: AtomicU64::new(0),
        }
    }

    /// Asks the guest to shut down: latches the event, then raises the GED interrupt.
    pub fn press_power_button(&self) -> std::io::Result<()> {
        self.pending
            .fetch_or(GED_EVENT_POWER_BUTTON, Ordering::SeqCst);
        self.presses.fetch_add(1, Ordering::Relaxed);
        self.interrupt.write(1)
    }

    /// Button presses so far, and how many of them the guest has read from the register.
    pub fn presses(&self) -> (u64, u64) {
        (
            self.presses.load(Ordering::Relaxed),
            self.taken.load(Ordering::Relaxed),
        )
    }

    /// What the guest's `_EVT` reads: the pending events, which the read clears (so one press
    /// is handled once however many CPUs take the interrupt).
    fn take(&self) -> u8 {
        let events = self.pending.swap(0, Ordering::SeqCst);
        if events & GED_EVENT_POWER_BUTTON != 0 {
            self.taken.fetch_add(1, Ordering::Relaxed);
        }
        events
    }
}

/// The GED's event register on the I/O bus.
pub struct AcpiGed {
    events: Arc<GedEvents>,
}

impl AcpiGed {
    pub fn new(events: Arc<GedEvents>) -> Self {
        AcpiGed { events }
    }
}

impl BusDevice for AcpiGed {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            if let Some(first) = data.first_mut() {
                *first = self.events.take();
            }
        }
    }

    fn write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_press_raises_the_interrupt_and_the_register_reads_it_once() {
        let interrupt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let events = Arc::new(GedEvents::new(interrupt.try_clone().unwrap()));
        let mut ged = AcpiGed::new(events.clone());
        let mut byte = [0xffu8];
        ged.read(0x602, 0, &mut byte);
        assert_eq!(byte[0], 0, "nothing pending before a press");
        assert!(interrupt.read().is_err(), "no interrupt before a press");

        events.press_power_button().unwrap();
        assert_eq!(
            interrupt.read().unwrap(),
            1,
            "the press raises the interrupt"
        );
        assert_eq!(events.presses(), (1, 0));
        ged.read(0x602, 0, &mut byte);
        assert_eq!(byte[0], GED_EVENT_POWER_BUTTON);
        assert_eq!(events.presses(), (1, 1), "the guest took the press");
        ged.read(0x602, 0, &mut byte);
        assert_eq!(byte[0], 0, "the read cleared the event");
    }

    #[test]
    fn s5_write_powers_off_and_other_writes_do_not() {
        let exit = Arc::new(ExitNotifier::new().unwrap());
        let mut dev = AcpiShutdown::new(exit.clone());
        dev.write(0x600, 0, &[0x14]);
        assert_eq!(exit.reason(), None);
        dev.write(0x600, 0, &[0x34]);
        assert_eq!(exit.reason(), Some(VmExitReason::PowerOff));
    }
}
