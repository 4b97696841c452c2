//! What a PCI function looks like to the root bus, and the bus-side handle of one of its BARs.

use std::sync::{Arc, Mutex};

use kickvm_bus::BusDevice;

use crate::config::{BarReprogram, PciConfiguration};

/// A PCI function on kickvm's root bus.
///
/// Configuration accesses come from [`crate::PciRoot`]; BAR accesses come from the PIO/MMIO
/// buses through a [`BarHandle`], which names the BAR by index so a BAR that moves needs no
/// bookkeeping in the device to keep routing right.
pub trait PciDevice: Send {
    fn config(&self) -> &PciConfiguration;
    fn config_mut(&mut self) -> &mut PciConfiguration;

    fn read_config(&mut self, reg: usize) -> u32 {
        self.config().read_reg(reg)
    }

    /// Returns the BAR move the write asks for; the root applies it to the buses.
    fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarReprogram> {
        self.config_mut().write(reg, offset, data)
    }

    fn read_bar(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write_bar(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}

    /// Called after the buses answer at `moved.new` (and the configuration has committed the
    /// move): the place to move anything else registered at the old address, such as
    /// ioeventfds.
    fn bar_moved(&mut self, _moved: &BarReprogram) {}
}

pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// One BAR of one device, as inserted on a bus.
pub struct BarHandle {
    device: SharedPciDevice,
    bar: usize,
}

impl BarHandle {
    pub fn new(device: SharedPciDevice, bar: usize) -> Self {
        Self { device, bar }
    }
}

impl BusDevice for BarHandle {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.device.lock().unwrap().read_bar(self.bar, offset, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        self.device
            .lock()
            .unwrap()
            .write_bar(self.bar, offset, data);
    }
}
