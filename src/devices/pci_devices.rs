//! The VM's PCI devices: builds [`kickvm_virtio::PciDevices`] (PCI root at 0xCF8, GSI routing,
//! ioeventfd registrar) on the VM's buses and attaches every `--disk`.

use std::sync::Arc;

use kickvm_bus::Bus;
use kickvm_virtio::{AttachError, BlkConfig, NetConfig, PciDevices, PciOptions};
use kvm_ioctls::VmFd;

use crate::vmm::memory::GuestMemoryMmap;

// The VM's handles plus one list per device kind; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub fn attach(
    vm_fd: &Arc<VmFd>,
    memory: &GuestMemoryMmap,
    pio_bus: &Arc<Bus>,
    mmio_bus: &Arc<Bus>,
    disks: &[BlkConfig],
    nets: &[NetConfig],
    max_ioeventfds: Option<usize>,
    vcpus: usize,
) -> Result<PciDevices, AttachError> {
    let mut pci = PciDevices::new(
        vm_fd.clone(),
        memory.clone(),
        pio_bus.clone(),
        mmio_bus.clone(),
        PciOptions {
            max_ioeventfds,
            // Every function gets INTA# too, for guests that do not enable MSI-X.
            intx: true,
            vcpus,
        },
    )?;
    for disk in disks {
        pci.add_disk(disk)?;
    }
    for net in nets {
        pci.add_net(net)?;
    }
    Ok(pci)
}
