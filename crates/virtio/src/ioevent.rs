//! Where a queue's doorbell is, and the part of KVM that turns a doorbell write into an
//! eventfd signal (`KVM_IOEVENTFD`). Implemented for `VmFd`; [`CappedRegistrar`] puts a limit on
//! it to stand in for an old kernel's small I/O bus; tests use a mock.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use kickvm_bus::IoAddress;
use kvm_ioctls::IoEventAddress;
use vmm_sys_util::eventfd::EventFd;

/// A queue's notify register: a 16-bit write of `datamatch` (the queue index, as both legacy
/// and modern drivers write it) at `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Doorbell {
    pub addr: IoAddress,
    pub datamatch: u16,
}

pub trait IoeventRegistrar: Send + Sync {
    fn register(&self, fd: &EventFd, doorbell: Doorbell) -> std::io::Result<()>;
    fn unregister(&self, fd: &EventFd, doorbell: Doorbell) -> std::io::Result<()>;
}

fn kvm_address(addr: IoAddress) -> IoEventAddress {
    match addr {
        IoAddress::Pio(a) => IoEventAddress::Pio(a),
        IoAddress::Mmio(a) => IoEventAddress::Mmio(a),
    }
}

impl IoeventRegistrar for kvm_ioctls::VmFd {
    fn register(&self, fd: &EventFd, doorbell: Doorbell) -> std::io::Result<()> {
        // A u16 datamatch makes the registration length 2 with datamatch: exactly the 16-bit
        // write drivers do. Any other write still exits and is handled synchronously.
        self.register_ioevent(fd, &kvm_address(doorbell.addr), doorbell.datamatch)
            .map_err(std::io::Error::from)
    }

    fn unregister(&self, fd: &EventFd, doorbell: Doorbell) -> std::io::Result<()> {
        self.unregister_ioevent(fd, &kvm_address(doorbell.addr), doorbell.datamatch)
            .map_err(std::io::Error::from)
    }
}

/// Refuses registrations beyond `max` in force at once, as a kernel with a small I/O bus does
/// (`--max-ioeventfds`). Shared by every device of a VM.
pub struct CappedRegistrar {
    inner: Arc<dyn IoeventRegistrar>,
    max: usize,
    in_use: AtomicUsize,
}

impl CappedRegistrar {
    pub fn new(inner: Arc<dyn IoeventRegistrar>, max: usize) -> Self {
        Self {
            inner,
            max,
            in_use: AtomicUsize::new(0),
        }
    }
}

impl IoeventRegistrar for CappedRegistrar {
    fn register(&self, fd: &EventFd, doorbell: Doorbell) -> std::io::Result<()> {
        let reserved = self
            .in_use
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max).then_some(n + 1)
            });
        if reserved.is_err() {
            // KVM answers ENOSPC when its I/O bus is full; this says which limit it was.
            return Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!("--max-ioeventfds cap of {} registrations reached", self.max),
            ));
        }
        self.inner.register(fd, doorbell).inspect_err(|_| {
            self.in_use.fetch_sub(1, Ordering::SeqCst);
        })
    }

    fn unregister(&self, fd: &EventFd, doorbell: Doorbell) -> std::io::Result<()> {
        self.inner.unregister(fd, doorbell)?;
        self.in_use.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}
