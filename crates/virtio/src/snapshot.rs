//! Device state for VM snapshots: what [`crate::PciDevices::snapshot`] saves of every PCI
//! function and [`crate::PciDevices::restore`] gives back to devices freshly attached from the
//! same `--disk`/`--net` options.
//!
//! Saved is everything the guest can see or that the device needs to carry on where it
//! stopped: configuration space and BAR addresses, the MSI-X table, the virtio registers and
//! vectors, ISR and NEEDS_RESET, and each queue's place in its rings (`next_avail`,
//! `next_used`). Not saved is what the fresh attach makes again from the options: images,
//! taps, eventfds, GSIs, I/O threads. A restored device whose driver had set DRIVER_OK is
//! activated at the saved ring positions and its doorbells are kicked once
//! ([`crate::notifier::Notifier::restored`]), so a request made available around the
//! snapshot is taken.
//!
//! Refused: vhost-user devices (their ring state lives in the backend process) and a disk
//! holding writes for want of host space (`enospc=pause`: they would be lost).

use kickvm_pci::{ConfigSnapshot, MsixError, MsixSnapshot, PciError};
use serde::{Deserialize, Serialize};

use crate::transport::{Registers, TransportKind};

/// Bumped whenever a saved field changes meaning; a snapshot of another version is refused.
pub const SNAPSHOT_VERSION: u32 = 1;

/// The state of every PCI function of a VM.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PciSnapshot {
    pub version: u32,
    /// The CONFIG_ADDRESS latch at 0xCF8.
    pub config_address: u32,
    /// 00:00.0 (a guest may have written its command register or interrupt line).
    pub host_bridge: ConfigSnapshot,
    pub devices: Vec<PciDeviceSnapshot>,
}

/// One virtio-pci function.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PciDeviceSnapshot {
    pub id: String,
    pub slot: u8,
    pub config: ConfigSnapshot,
    pub transport: TransportSnapshot,
}

/// The virtio-pci transport: registers, vectors, interrupt state, queues, and the device's own.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TransportSnapshot {
    pub device_type: u16,
    pub kind: TransportKind,
    /// The transport's registers as the driver left them, device features included: a device
    /// built from other options (a read-only image, a file system without discard) may not
    /// offer what the driver accepted.
    pub registers: Registers,
    pub config_vector: u16,
    /// Unread ISR bits (INTx): the line is raised again on restore while they are set.
    pub isr: u8,
    pub needs_reset: bool,
    /// The device was activated (DRIVER_OK and activation succeeded).
    pub active: bool,
    /// The `ioeventfd` property as switched at run time.
    pub ioeventfd: bool,
    pub queues: Vec<QueueSnapshot>,
    pub msix: MsixSnapshot,
    pub device: DeviceState,
}

/// One virtqueue beyond its registers: its MSI-X vector and, while active, the device's place
/// in its rings.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSnapshot {
    pub vector: u16,
    pub position: Option<QueuePosition>,
}

/// Where a device stands in a queue's rings (virtio-queue's `QueueState` fields that change
/// as requests are taken and completed).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuePosition {
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

/// A device's state beyond the transport's.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum DeviceState {
    /// virtio-blk's configuration space follows from the options; nothing else outlives a
    /// drained queue.
    Blk,
    Net {
        /// MAC (legacy drivers may write it), status, max queue pairs.
        config: Vec<u8>,
        /// Queue pairs the driver enabled (VIRTIO_NET_CTRL_MQ), while active.
        active_pairs: Option<u16>,
    },
}

impl DeviceState {
    pub fn name(&self) -> &'static str {
        match self {
            DeviceState::Blk => "virtio-blk",
            DeviceState::Net { .. } => "virtio-net",
        }
    }
}

/// Why a device's own state cannot be saved or taken back.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum DeviceSnapshotError {
    #[error("served by a vhost-user backend")]
    VhostUser,
    #[error("{0} write(s) held for want of host space")]
    HeldRequests(usize),
    #[error("the device does not support snapshots")]
    Unsupported,
    #[error("{0}")]
    Mismatch(String),
}

#[derive(thiserror::Error, Debug)]
pub enum SnapshotError {
    #[error(
        "{kind} {id} is served by a vhost-user backend: snapshots of vhost-user devices are not \
         supported"
    )]
    VhostUser { kind: &'static str, id: String },
    #[error(
        "{kind} {id} holds {count} write(s) the host had no space for (enospc=pause): free space \
         and resume the VM before taking a snapshot"
    )]
    HeldRequests {
        kind: &'static str,
        id: String,
        count: usize,
    },
    #[error(
        "{kind} {id} still has requests in flight: a snapshot needs the VM paused and drained"
    )]
    InFlight { kind: &'static str, id: String },
    #[error("{kind} {id} is running: a snapshot needs the VM paused")]
    NotPaused { kind: &'static str, id: String },
    #[error("{kind} {id} does not support snapshots")]
    Unsupported { kind: &'static str, id: String },
    #[error("snapshot device state version {0} is not supported (this kickvm reads version {SNAPSHOT_VERSION})")]
    Version(u32),
    #[error("the snapshot has a device {0} this VM does not have (restore with the same --disk/--net options)")]
    UnknownDevice(String),
    #[error("{0} is not in the snapshot (restore with the same --disk/--net options)")]
    MissingDevice(String),
    #[error(
        "{id}: the snapshot has {what} {saved}, the device has {actual} (restore with the same \
         --disk/--net options)"
    )]
    Mismatch {
        id: String,
        what: &'static str,
        saved: String,
        actual: String,
    },
    #[error("{kind} {id}: {reason} (restore with the same --disk/--net options)")]
    DeviceState {
        kind: &'static str,
        id: String,
        reason: String,
    },
    #[error("{0} has been used since it was attached: snapshots are restored into fresh devices")]
    NotFresh(String),
    #[error("PCI configuration: {0}")]
    Pci(#[from] PciError),
    #[error("{id}: MSI-X: {source}")]
    Msix { id: String, source: MsixError },
    #[error("{id}: the restored device cannot be activated: {reason}")]
    Activate { id: String, reason: String },
}

/// How errors name a device of `device_type`, as the command line does.
pub(crate) fn kind_name(device_type: u16) -> &'static str {
    match device_type {
        crate::blk::VIRTIO_BLK_TYPE => "disk",
        crate::net::VIRTIO_NET_TYPE => "net",
        _ => "device",
    }
}

impl SnapshotError {
    pub(crate) fn from_device(device_type: u16, id: &str, e: DeviceSnapshotError) -> Self {
        let (kind, id) = (kind_name(device_type), id.to_string());
        match e {
            DeviceSnapshotError::VhostUser => SnapshotError::VhostUser { kind, id },
            DeviceSnapshotError::HeldRequests(count) => {
                SnapshotError::HeldRequests { kind, id, count }
            }
            DeviceSnapshotError::Unsupported => SnapshotError::Unsupported { kind, id },
            DeviceSnapshotError::Mismatch(reason) => {
                SnapshotError::DeviceState { kind, id, reason }
            }
        }
    }
}

#[cfg(test)]
mod tests;
