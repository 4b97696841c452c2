//! PCI for kickvm: one root bus (segment 0, bus 0) reached through type-1 configuration access
//! at ports 0xCF8..0xCFF, a host bridge at 00:00.0, configuration space with BARs the guest can
//! size and move, a capability list, MSI-X and legacy INTx.
//!
//! Interrupts reach KVM through the small [`IrqChip`] trait (irqfd and GSI routing), implemented
//! for `kvm_ioctls::VmFd`, so everything here is testable with a mock.
//!
//! When the guest moves a BAR, [`PciConfiguration`] reports a [`BarReprogram`]; [`PciRoot`] is the
//! one place that applies it: it relocates the range on the PIO or MMIO bus and then tells the
//! device ([`PciDevice::bar_moved`]) so it can move whatever it registered there (ioeventfds).

mod allocator;
mod config;
mod device;
mod irq;
mod msix;
mod root;

pub use allocator::{BarAllocator, IO_WINDOW, MMIO32_WINDOW};
pub use config::{
    BarKind, BarReprogram, BarSnapshot, ConfigError, ConfigSnapshot, PciConfiguration, PciHeader,
    COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE, COMMAND_IO, COMMAND_MEMORY, NUM_BARS,
};
pub use device::{BarHandle, PciDevice, SharedPciDevice};
pub use irq::{
    irqchip_routes, GsiRouter, IntxLine, IrqChip, IrqError, IrqRoute, FIRST_MSI_GSI, IOAPIC_PINS,
};
pub use msix::{
    Delivery, MsixConfig, MsixEntry, MsixError, MsixSnapshot, MSIX_CAP_ID, MSIX_CAP_LEN,
    MSIX_ENTRY_SIZE,
};
pub use root::{PciConfigIo, PciError, PciRoot, PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_LEN};
