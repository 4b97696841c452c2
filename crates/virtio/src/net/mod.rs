//! virtio-net on a Linux tap device: one tap queue per virtqueue pair (IFF_MULTI_QUEUE), the
//! tap's virtio-net header (IFF_VNET_HDR) passed through so the guest's checksum and
//! segmentation offloads reach the host stack.
//!
//! * `config.rs`: `--net tap=NAME,...` into a [`NetConfig`].
//! * `tap.rs`: opening (or creating) the tap, its queues and offload settings.
//! * `header.rs`: the virtio-net header: its size, what a TX header may ask for, the tap
//!   offloads the guest's RX features allow.
//! * `device.rs`: features, configuration space (MAC, STATUS, queue pairs), activation.
//! * `handler.rs`: RX (tap readable, buffers posted), TX (the kick, in batches), the control
//!   queue, and the bounded poll of the `auto` policy.

mod config;
mod device;
pub(crate) mod handler;
mod header;
mod tap;

pub use config::{
    IoeventfdPolicy, NetConfig, NetConfigError, DEFAULT_POLL_US, DEFAULT_REPLY_POLL_US,
    DEFAULT_TX_INLINE,
};
pub use device::{NetDeviceError, NetOptions, VirtioNet, DEFAULT_QUEUE_SIZE, MAX_QUEUE_PAIRS};
pub use header::{tap_offload_flags, vnet_header_len, TxHeaderError, VnetHeader};
pub use tap::{NetBackend, Tap, TapError};

pub const VIRTIO_NET_TYPE: u16 = 1;

/// The largest Ethernet frame (without the virtio-net header) either direction carries: 64 KiB
/// of GSO payload plus a VLAN Ethernet header. TX frames beyond it are dropped.
pub const MAX_FRAME_LEN: usize = 65_536 + 18;

#[cfg(test)]
mod tests;
