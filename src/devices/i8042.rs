//! The i8042 keyboard controller, reduced to what a VM needs: command 0xFE on port 0x64
//! (pulse the CPU reset line) ends the VM with a reset. Linux's `reboot` and `panic=-1`
//! reach it.

use std::sync::Arc;

use kickvm_bus::BusDevice;
use vm_superio::{I8042Device, Trigger};

use crate::vmm::exit::{ExitNotifier, VmExitReason};

pub struct ResetTrigger(Arc<ExitNotifier>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        log::info!("guest reset through the i8042");
        self.0.notify(VmExitReason::Reset);
        Ok(())
    }
}

/// Registered at port 0x60 with length 5, so offset 4 is the command port 0x64.
pub struct I8042 {
    device: I8042Device<ResetTrigger>,
}

impl I8042 {
    pub fn new(exit: Arc<ExitNotifier>) -> Self {
        I8042 {
            device: I8042Device::new(ResetTrigger(exit)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let value = self.device.read(offset as u8);
        data.fill(value);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            let Ok(()) = self.device.write(offset as u8, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_on_port_0x64_resets_the_vm() {
        let exit = Arc::new(ExitNotifier::new().unwrap());
        let mut dev = I8042::new(exit.clone());
        dev.write(0x60, 0, &[0xfe]);
        assert_eq!(exit.reason(), None, "0xFE to the data port is not a reset");
        dev.write(0x60, 4, &[0xfe]);
        assert_eq!(exit.reason(), Some(VmExitReason::Reset));
    }
}
