//! The ACPI registers of kickvm's hardware-reduced platform (see the FADT): sleep control at
//! 0x600, where writing SLP_TYP=5 | SLP_EN (0x34, as for cloud-hypervisor) powers off, and
//! sleep status at 0x601, which reads as zero.

use std::sync::Arc;

use kickvm_bus::BusDevice;

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

#[cfg(test)]
mod tests {
    use super::*;

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
