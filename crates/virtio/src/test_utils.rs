//! Mocks of KVM for unit tests: an irqchip and an ioeventfd registrar that remember what they
//! were asked, and let a test play the guest's doorbell write.

use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use crate::GuestMemoryMmap;
use kickvm_pci::{GsiRouter, IrqChip, IrqRoute};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::ioevent::{Doorbell, IoeventRegistrar};

#[derive(Default)]
pub struct MockChip {
    pub routes: Mutex<Vec<IrqRoute>>,
}

impl IrqChip for MockChip {
    fn set_gsi_routing(&self, routes: &[IrqRoute]) -> std::io::Result<()> {
        *self.routes.lock().unwrap() = routes.to_vec();
        Ok(())
    }
    fn register_irqfd(&self, _: &EventFd, _: u32, _: Option<&EventFd>) -> std::io::Result<()> {
        Ok(())
    }
    fn unregister_irqfd(&self, _: &EventFd, _: u32) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn router() -> Arc<GsiRouter> {
    Arc::new(GsiRouter::new(Arc::new(MockChip::default())))
}

/// Stands in for KVM's ioeventfd table; refuses beyond `capacity`, as a full I/O bus does.
#[derive(Default)]
pub struct MockRegistrar {
    pub live: Mutex<HashSet<(i32, Doorbell)>>,
    pub capacity: Option<usize>,
}

impl IoeventRegistrar for MockRegistrar {
    fn register(&self, fd: &EventFd, doorbell: Doorbell) -> std::io::Result<()> {
        let mut live = self.live.lock().unwrap();
        if self.capacity.is_some_and(|c| live.len() >= c) {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        if !live.insert((fd.as_raw_fd(), doorbell)) {
            return Err(std::io::Error::from_raw_os_error(libc::EEXIST));
        }
        Ok(())
    }
    fn unregister(&self, fd: &EventFd, doorbell: Doorbell) -> std::io::Result<()> {
        if self
            .live
            .lock()
            .unwrap()
            .remove(&(fd.as_raw_fd(), doorbell))
        {
            Ok(())
        } else {
            Err(std::io::Error::from_raw_os_error(libc::ENOENT))
        }
    }
}

impl MockRegistrar {
    pub fn doorbells(&self) -> HashSet<Doorbell> {
        self.live.lock().unwrap().iter().map(|(_, d)| *d).collect()
    }

    /// What KVM does with a guest's matching doorbell write: signal the eventfd. Returns
    /// whether a registration matched (otherwise the write would exit).
    pub fn guest_writes(&self, doorbell: Doorbell, kicks: &[Arc<EventFd>]) -> bool {
        let live = self.live.lock().unwrap();
        for kick in kicks {
            if live.contains(&(kick.as_raw_fd(), doorbell)) {
                kick.write(1).unwrap();
                return true;
            }
        }
        false
    }
}

pub fn guest_memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}
