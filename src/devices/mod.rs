//! Legacy platform devices on the port-I/O bus. PCI devices (added later, in `pci*` modules)
//! attach to the same buses: the PCI host bridge at 0xCF8/0xCFC on the PIO bus and BARs on
//! whichever bus their address space says.

pub mod acpi;
pub mod i8042;
pub mod pci_devices;
pub mod serial;
