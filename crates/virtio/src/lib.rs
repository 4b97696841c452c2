//! virtio for kickvm: the virtio-pci transport (legacy and modern on one device), the notifier
//! state machine that decides how each queue's kick is delivered, the I/O threads, and the
//! devices (virtio-blk).

pub mod attach;
pub mod blk;
pub mod config;
pub mod counters;
pub mod device;
pub mod dirty;
pub mod io_thread;
pub mod ioevent;
pub mod net;
pub mod notifier;
pub mod pause;
pub mod snapshot;
#[cfg(test)]
pub(crate) mod test_utils;
pub mod transport;
pub mod vhost_user;

pub use attach::{AttachError, PciDevices, PciOptions, PlugError, SharedVirtioDevice};
pub use config::{BlkConfig, BlkConfigError};
pub use net::{IoeventfdPolicy, NetConfig, NetConfigError};
pub use snapshot::{
    DeviceState, PciDeviceSnapshot, PciSnapshot, QueuePosition, QueueSnapshot, SnapshotError,
    TransportSnapshot, SNAPSHOT_VERSION,
};
pub use transport::{TransportKind, VirtioPciDevice};

/// Guest RAM as every device sees it. Each region carries a bitmap of the pages written through
/// it (one atomic OR per page written, after the write), so a live migration can resend what
/// the devices wrote while the guest ran; writes through raw host pointers (I/O submitted to
/// the kernel) are marked by their device on completion.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
