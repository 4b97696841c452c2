//! The virtio-blk device: what it offers, its configuration space, and its lifecycle
//! (activate builds one engine per enabled queue; reset drops them after their I/O finished).

use std::sync::Arc;

use kickvm_block::{open_engine, BlockError, DiskImage, EngineKind, MAX_SEGMENTS};
use virtio_queue::QueueT;

use super::handler::{BlkHandler, BlkQueue};
use super::request::RequestLimits;
use super::*;
use crate::device::{
    read_config_bytes, ActivateError, Activation, BackendValue, QueueHandler, VirtioDevice,
};
use crate::pause::PauseRequests;
use crate::snapshot::{DeviceSnapshotError, DeviceState};

const CONFIG_LEN: usize = 0x3c;
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
pub const MAX_QUEUES: u16 = 64;

#[derive(Debug, thiserror::Error)]
pub enum BlkDeviceError {
    #[error("queues={0}: a disk has 1 to {MAX_QUEUES} queues")]
    QueueCount(u16),
    #[error("queue size {0} is not a power of two between 4 and 32768")]
    QueueSize(u16),
}

/// How a virtio-blk device is built (the image is opened by the caller).
#[derive(Debug, Clone)]
pub struct BlkOptions {
    pub serial: Option<String>,
    pub queues: u16,
    pub queue_size: u16,
    pub engine: EngineKind,
    /// `enospc=pause`: a write the host file system has no space for is held and the VM
    /// paused through these, rather than answered IOERR.
    pub pause_on_no_space: Option<Arc<PauseRequests>>,
}

impl Default for BlkOptions {
    fn default() -> Self {
        Self {
            serial: None,
            queues: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
            engine: EngineKind::Auto,
            pause_on_no_space: None,
        }
    }
}

pub struct VirtioBlk {
    image: Arc<DiskImage>,
    engine: EngineKind,
    queue_sizes: Vec<u16>,
    features: u64,
    config: [u8; CONFIG_LEN],
    limits: RequestLimits,
    handler: Option<Arc<BlkHandler>>,
    pause_on_no_space: Option<Arc<PauseRequests>>,
}

impl VirtioBlk {
    pub fn new(image: Arc<DiskImage>, options: BlkOptions) -> Result<Self, BlkDeviceError> {
        if options.queues == 0 || options.queues > MAX_QUEUES {
            return Err(BlkDeviceError::QueueCount(options.queues));
        }
        if !options.queue_size.is_power_of_two() || options.queue_size < 4 {
            return Err(BlkDeviceError::QueueSize(options.queue_size));
        }
        let readonly = image.is_readonly();
        let discard = !readonly && image.supports_discard();
        let write_zeroes = !readonly && image.supports_write_zeroes();
        let bit = |b: u32| 1u64 << b;
        let mut features = bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_F_VERSION_1);
        if readonly {
            features |= bit(VIRTIO_BLK_F_RO);
        }
        if options.queues > 1 {
            features |= bit(VIRTIO_BLK_F_MQ);
        }
        if discard {
            features |= bit(VIRTIO_BLK_F_DISCARD);
        }
        if write_zeroes {
            features |= bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }

        let mut serial = [0u8; VIRTIO_BLK_ID_BYTES];
        if let Some(s) = &options.serial {
            let n = s.len().min(VIRTIO_BLK_ID_BYTES);
            serial[..n].copy_from_slice(&s.as_bytes()[..n]);
        }
        // Indirect descriptors let a request carry more than the ring holds; the engine's
        // iovec limit is the real bound.
        let seg_max = (u32::from(options.queue_size) - 2).min(MAX_SEGMENTS as u32);
        let capacity_bytes = image.size_bytes() / SECTOR_SIZE * SECTOR_SIZE;
        let block_size = image.logical_block_size();

        let mut config = [0u8; CONFIG_LEN];
        let mut put = |offset: usize, bytes: &[u8]| {
            config[offset..offset + bytes.len()].copy_from_slice(bytes)
        };
        put(0x00, &(capacity_bytes / SECTOR_SIZE).to_le_bytes());
        put(0x0c, &seg_max.to_le_bytes());
        put(0x14, &block_size.to_le_bytes());
        put(0x22, &options.queues.to_le_bytes());
        let alignment = (block_size / SECTOR_SIZE as u32).max(1);
        if discard {
            put(0x24, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(0x28, &1u32.to_le_bytes());
            put(0x2c, &alignment.to_le_bytes());
        }
        if write_zeroes {
            put(0x30, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(0x34, &1u32.to_le_bytes());
            put(0x38, &[1]);
        }

        Ok(Self {
            engine: options.engine,
            queue_sizes: vec![options.queue_size; usize::from(options.queues)],
            features,
            config,
            limits: RequestLimits {
                capacity_bytes,
                readonly,
                serial,
                seg_max,
                discard,
                write_zeroes,
            },
            image,
            handler: None,
            pause_on_no_space: options.pause_on_no_space,
        })
    }

    pub fn image(&self) -> &Arc<DiskImage> {
        &self.image
    }
}

impl VirtioDevice for VirtioBlk {
    fn device_type(&self) -> u16 {
        VIRTIO_BLK_TYPE
    }

    fn backend(&self) -> Vec<(&'static str, BackendValue)> {
        let image = &self.image;
        vec![
            (
                "path",
                BackendValue::Text(image.path().display().to_string()),
            ),
            ("size_bytes", BackendValue::Number(image.size_bytes())),
            ("readonly", BackendValue::Flag(image.is_readonly())),
            (
                "direct",
                BackendValue::Flag(image.direct_io_alignment().is_some()),
            ),
            ("engine", BackendValue::Text(self.engine.name().to_string())),
            ("locked", BackendValue::Flag(image.is_locked())),
            (
                "enospc",
                BackendValue::Text(
                    if self.pause_on_no_space.is_some() {
                        "pause"
                    } else {
                        "report"
                    }
                    .to_string(),
                ),
            ),
        ]
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn config_len(&self) -> usize {
        CONFIG_LEN
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Nothing is writable (CONFIG_WCE is not offered).
        log::debug!(
            "virtio-blk: {}-byte config write at {offset:#x} ignored",
            data.len()
        );
    }

    fn activate(&mut self, activation: Activation) -> Result<Arc<dyn QueueHandler>, ActivateError> {
        let mut queues: Vec<Option<BlkQueue>> = (0..self.queue_sizes.len()).map(|_| None).collect();
        for setup in activation.queues {
            let engine = open_engine(&self.image, self.engine, u32::from(setup.queue.size()))
                .map_err(|e: BlockError| ActivateError::Backend(e.to_string()))?;
            queues[setup.index] = Some(BlkQueue::new(setup.queue, engine));
        }
        let handler = Arc::new(BlkHandler::new(
            activation.mem,
            activation.interrupt,
            activation.counters,
            self.limits.clone(),
            queues,
            self.pause_on_no_space
                .clone()
                .map(|requests| (requests, self.image.path().display().to_string())),
        ));
        self.handler = Some(handler.clone());
        Ok(handler)
    }

    fn reset(&mut self) {
        if let Some(handler) = self.handler.take() {
            handler.shut_down();
        }
    }

    /// A held write's buffers and status stay the guest's business until it is made: the
    /// restored device would know nothing of it, and the guest would wait forever.
    fn snapshot(&self) -> Result<DeviceState, DeviceSnapshotError> {
        match self.handler.as_ref().map_or(0, |h| h.held_requests()) {
            0 => Ok(DeviceState::Blk),
            held => Err(DeviceSnapshotError::HeldRequests(held)),
        }
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceSnapshotError> {
        match state {
            DeviceState::Blk => Ok(()),
            other => Err(DeviceSnapshotError::Mismatch(format!(
                "the snapshot holds {} state for a virtio-blk device",
                other.name()
            ))),
        }
    }
}
