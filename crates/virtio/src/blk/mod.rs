//! virtio-blk on a raw image, served by `kickvm_block` engines: one engine per queue, requests
//! in flight concurrently, completions batched into one interrupt.
//!
//! * `device.rs`: features, configuration space, activation and reset.
//! * `request.rs`: turning a descriptor chain into a block request, refusing bad guests.
//! * `handler.rs`: what happens on a kick and on a completion (the queue's event handler).

mod device;
mod handler;
mod request;

pub use device::{BlkDeviceError, BlkOptions, VirtioBlk, DEFAULT_QUEUE_SIZE, MAX_QUEUES};

pub const VIRTIO_BLK_TYPE: u16 = 2;

pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
pub const VIRTIO_BLK_F_RO: u32 = 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
pub const VIRTIO_BLK_F_MQ: u32 = 12;
pub const VIRTIO_BLK_F_DISCARD: u32 = 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 14;
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
pub const VIRTIO_F_VERSION_1: u32 = 32;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Serial numbers (GET_ID) are 20 bytes, NUL-padded, not necessarily NUL-terminated.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
pub const SECTOR_SIZE: u64 = 512;
/// Largest discard / write-zeroes range, in sectors (advertised in config space).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;

#[cfg(test)]
mod tests;
