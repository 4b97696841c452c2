//! The virtio-net device: what it offers, its configuration space, and its lifecycle
//! (activate hands each queue pair its tap queue; reset stops using them).

use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use super::handler::NetHandler;
use super::tap::NetBackend;
use super::VIRTIO_NET_TYPE;
use crate::device::{
    read_config_bytes, ActivateError, Activation, BackendValue, QueueHandler, VirtioDevice,
};
use crate::snapshot::{DeviceSnapshotError, DeviceState};

pub const DEFAULT_QUEUE_SIZE: u16 = 256;
pub const MAX_QUEUE_PAIRS: u16 = 16;
/// mac[6], status u16, max_virtqueue_pairs u16.
const CONFIG_LEN: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum NetDeviceError {
    #[error("queues={0}: a net device has 1 to {MAX_QUEUE_PAIRS} queue pairs")]
    QueuePairs(u16),
    #[error("the host side has {backend} queue(s) but {pairs} queue pair(s) were asked for")]
    BackendQueues { backend: usize, pairs: u16 },
    #[error("queue size {0} is not a power of two between 16 and 4096")]
    QueueSize(u16),
}

#[derive(Debug, Clone)]
pub struct NetOptions {
    pub mac: [u8; 6],
    pub pairs: u16,
    pub queue_size: u16,
    /// With sync kicks (`auto`): TX frames the vCPU sends itself before handing the rest of a
    /// burst to the I/O thread. None: the kick's thread sends everything.
    pub tx_inline: Option<usize>,
    /// After delivering frames, how long the I/O thread watches for a reply with TX kicks
    /// suppressed (`auto`; zero: never).
    pub reply_poll: std::time::Duration,
}

pub struct VirtioNet {
    backend: Arc<dyn NetBackend>,
    options: NetOptions,
    queue_sizes: Vec<u16>,
    features: u64,
    config: [u8; CONFIG_LEN],
    handler: Option<Arc<NetHandler>>,
    /// The queue pairs a restored driver had enabled, for the restore's activation.
    restored_pairs: Option<usize>,
}

impl VirtioNet {
    pub fn new(backend: Arc<dyn NetBackend>, options: NetOptions) -> Result<Self, NetDeviceError> {
        let pairs = options.pairs;
        if pairs == 0 || pairs > MAX_QUEUE_PAIRS {
            return Err(NetDeviceError::QueuePairs(pairs));
        }
        if backend.queues() != usize::from(pairs) {
            return Err(NetDeviceError::BackendQueues {
                backend: backend.queues(),
                pairs,
            });
        }
        if !options.queue_size.is_power_of_two() || !(16..=4096).contains(&options.queue_size) {
            return Err(NetDeviceError::QueueSize(options.queue_size));
        }
        let bit = |b: u32| 1u64 << b;
        let mut features = bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_TSO6)
            | bit(VIRTIO_NET_F_GUEST_ECN)
            | bit(VIRTIO_NET_F_HOST_TSO4)
            | bit(VIRTIO_NET_F_HOST_TSO6)
            | bit(VIRTIO_NET_F_HOST_ECN)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_NET_F_STATUS)
            | bit(VIRTIO_NET_F_CTRL_VQ)
            | bit(VIRTIO_NET_F_CTRL_RX)
            | bit(VIRTIO_NET_F_CTRL_VLAN)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_F_VERSION_1);
        if pairs > 1 {
            features |= bit(VIRTIO_NET_F_MQ);
        }
        let mut config = [0u8; CONFIG_LEN];
        config[0..6].copy_from_slice(&options.mac);
        config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        config[8..10].copy_from_slice(&pairs.to_le_bytes());
        // RX and TX per pair, then the control queue.
        let queue_sizes = vec![options.queue_size; usize::from(pairs) * 2 + 1];
        Ok(Self {
            backend,
            options,
            queue_sizes,
            features,
            config,
            handler: None,
            restored_pairs: None,
        })
    }

    pub fn mac(&self) -> [u8; 6] {
        self.options.mac
    }

    #[cfg(test)]
    pub(crate) fn handler_for_tests(&self) -> &NetHandler {
        self.handler.as_ref().expect("activated")
    }
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u16 {
        VIRTIO_NET_TYPE
    }

    fn backend(&self) -> Vec<(&'static str, BackendValue)> {
        let mac = self.options.mac.map(|b| format!("{b:02x}")).join(":");
        vec![
            ("mac", BackendValue::Text(mac)),
            (
                "queue_pairs",
                BackendValue::Number(self.options.pairs.into()),
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
        // Legacy drivers may write the MAC (virtio 0.9.5 lets them); everything else is
        // read-only.
        for (i, byte) in data.iter().enumerate() {
            if let Some(slot) = usize::try_from(offset)
                .ok()
                .map(|o| o + i)
                .filter(|&o| o < 6)
            {
                self.config[slot] = *byte;
            }
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<Arc<dyn QueueHandler>, ActivateError> {
        let handler = Arc::new(NetHandler::new(
            activation,
            self.backend.clone(),
            usize::from(self.options.pairs),
            self.options.tx_inline,
            self.options.reply_poll,
        )?);
        if let Some(pairs) = self.restored_pairs.take() {
            handler.set_active_pairs(pairs);
        }
        self.handler = Some(handler.clone());
        Ok(handler)
    }

    fn reset(&mut self) {
        self.restored_pairs = None;
        if let Some(handler) = self.handler.take() {
            handler.shut_down();
        }
    }

    /// The tap is the fresh attach's; what the guest set is the configuration (a legacy
    /// driver's MAC) and the queue pairs it enabled.
    fn snapshot(&self) -> Result<DeviceState, DeviceSnapshotError> {
        Ok(DeviceState::Net {
            config: self.config.to_vec(),
            active_pairs: self.handler.as_ref().map(|h| h.active_pairs() as u16),
        })
    }

    fn restore(&mut self, state: &DeviceState) -> Result<(), DeviceSnapshotError> {
        let DeviceState::Net {
            config,
            active_pairs,
        } = state
        else {
            return Err(DeviceSnapshotError::Mismatch(format!(
                "the snapshot holds {} state for a virtio-net device",
                state.name()
            )));
        };
        if config.len() != CONFIG_LEN || config[8..] != self.config[8..] {
            return Err(DeviceSnapshotError::Mismatch(format!(
                "the snapshot's configuration {config:02x?} is not of a device with {} queue \
                 pair(s)",
                self.options.pairs
            )));
        }
        if let Some(pairs) = active_pairs.filter(|&p| p == 0 || p > self.options.pairs) {
            return Err(DeviceSnapshotError::Mismatch(format!(
                "the snapshot has {pairs} queue pair(s) in use, the device has {}",
                self.options.pairs
            )));
        }
        self.config.copy_from_slice(config);
        self.restored_pairs = active_pairs.map(usize::from);
        Ok(())
    }
}
