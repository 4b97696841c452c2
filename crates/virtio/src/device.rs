//! The contract between the transport and a virtio device.
//!
//! The transport owns the registers, the queues' configuration and their kick eventfds; at
//! DRIVER_OK it builds the queues and hands them to [`VirtioDevice::activate`], which returns the
//! [`QueueHandler`] that both the I/O thread (ioeventfd mode, completions) and the vCPU thread
//! (sync mode) call. A handler keeps each queue behind its own lock, so the two threads share
//! it without a device-wide lock.

use std::os::fd::RawFd;
use std::sync::Arc;

use crate::GuestMemoryMmap;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::counters::QueueCounters;
use crate::notifier::KickSink;
use crate::snapshot::{DeviceSnapshotError, DeviceState, QueuePosition};

/// Interrupts as the device sees them; the transport maps them to MSI-X vectors or INTx.
pub trait VirtioInterrupt: Send + Sync {
    /// Queue `queue` has new used buffers (the caller already consulted EVENT_IDX).
    fn signal_queue(&self, queue: usize);
    fn signal_config(&self);
    /// The device found the driver's state unusable: sets DEVICE_NEEDS_RESET in the status and
    /// sends a configuration interrupt.
    fn set_needs_reset(&self);
}

/// A queue the driver set up, handed to the device at activation.
pub struct QueueSetup {
    pub index: usize,
    pub queue: Queue,
    pub kick: Arc<EventFd>,
}

/// Everything a device gets at activation.
pub struct Activation {
    pub mem: GuestMemoryMmap,
    pub acked_features: u64,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub queues: Vec<QueueSetup>,
    pub counters: Arc<[QueueCounters]>,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {queue} is unusable: {reason}")]
    BadQueue { queue: usize, reason: String },
    #[error("device backend failed to start: {0}")]
    Backend(String),
}

/// Processes a device's queues. Called from the vCPU thread (sync mode, and while switching
/// modes) and from the device's I/O thread.
pub trait QueueHandler: Send + Sync {
    /// The driver kicked `queue`: take what it made available.
    fn process_queue(&self, queue: usize);
    /// An eventfd the I/O thread watches for `queue`'s backend completions, if any.
    fn completion_fd(&self, queue: usize) -> Option<RawFd>;
    /// `queue`'s completion fd is readable (or the I/O thread is polling).
    fn process_completions(&self, queue: usize);
    /// The polling I/O thread's turn on an ioeventfd queue: like [`Self::process_queue`] but
    /// leaves driver notifications off (the thread will look again). Returns whether anything
    /// was taken or completed.
    fn poll_queue(&self, queue: usize) -> bool {
        self.process_queue(queue);
        false
    }
    /// Polling of `queue` stops: notifications back on, and a last look at the ring.
    fn rearm(&self, _queue: usize) {}
    /// While paused, requests in flight complete but nothing new is taken from the rings.
    /// Returns once no queue is in the middle of taking requests.
    fn set_paused(&self, _paused: bool) {}
    /// Requests of `queue` are in flight: the I/O thread may poll rather than sleep.
    fn busy(&self, queue: usize) -> bool;
    /// Whether the polling I/O thread, when kicks keep coming with nothing to take, dozes
    /// (looks at the rings after short timed sleeps, kick eventfds unwatched, so a kick wakes
    /// no thread) rather than spin on.
    fn doze_on_idle_kicks(&self) -> bool {
        false
    }
    fn num_queues(&self) -> usize;
    /// Whether the backend signals interrupts itself and so can be handed a vector's irqfd
    /// ([`Self::route_interrupts`]) instead of an eventfd kickvm relays.
    fn takes_direct_interrupts(&self) -> bool {
        false
    }
    /// Per queue: the irqfd of its MSI-X vector while that vector can fire, else `None`
    /// (the backend's signals are then relayed by [`Self::process_completions`], which is
    /// what marks a masked vector pending and drives INTx). Called whenever that changes.
    fn route_interrupts(&self, _direct: Vec<Option<DirectInterrupt>>) {}
    /// Whether `queue`'s interrupts currently go from the backend straight into KVM.
    fn interrupts_direct(&self, _queue: usize) -> bool {
        false
    }
    /// Where the handler stands in `queue`'s rings, for a snapshot (the VM is paused and the
    /// queue drained). `None` for a queue it does not use.
    fn queue_position(&self, _queue: usize) -> Option<QueuePosition> {
        None
    }
}

/// A queue's MSI-X vector as a backend may signal it itself.
pub struct DirectInterrupt {
    pub vector: u16,
    /// A duplicate of the vector's irqfd.
    pub irqfd: EventFd,
}

/// The adapter the notifier uses to run a queue inline.
pub struct HandlerSink<'a>(pub Option<&'a Arc<dyn QueueHandler>>);

impl KickSink for HandlerSink<'_> {
    fn process_kick(&self, queue: usize) {
        if let Some(handler) = self.0 {
            handler.process_queue(queue);
        }
    }
}

/// Reads `data.len()` bytes of a device's configuration space `config` at `offset`; bytes
/// beyond it read as zero (a driver may probe past the fields a device has).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|o| config.get(o.checked_add(i)?))
            .copied()
            .unwrap_or(0);
    }
}

/// One value of [`VirtioDevice::backend`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendValue {
    Text(String),
    Number(u64),
    Flag(bool),
}

/// A virtio device behind the transport.
pub trait VirtioDevice: Send {
    /// The virtio device type (2 for block).
    fn device_type(&self) -> u16;
    /// What serves the device, as named values for reports (`vm.info`): the image, the
    /// backend's socket, the MAC.
    fn backend(&self) -> Vec<(&'static str, BackendValue)> {
        Vec::new()
    }
    /// The largest size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered, including transport features (VERSION_1, EVENT_IDX, ...).
    fn features(&self) -> u64;
    /// Length of the device-specific configuration space.
    fn config_len(&self) -> usize;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    fn activate(&mut self, activation: Activation) -> Result<Arc<dyn QueueHandler>, ActivateError>;
    /// An external backend (vhost-user) reads the queues' kick eventfds: the transport keeps
    /// them registered with KVM but out of its I/O thread (the notifier's host-notifier mode).
    fn takes_host_notifiers(&self) -> bool {
        false
    }
    /// A socket whose hang-up means the device's backend is gone, and what the device does
    /// then (the transport also sets NEEDS_RESET): for devices served by another process.
    fn backend_hangup(&self) -> Option<(RawFd, Arc<dyn Fn() + Send + Sync>)> {
        None
    }
    /// Stops using the queues: waits for requests in flight, then forgets them. The device is
    /// ready to be activated again.
    fn reset(&mut self);
    /// The device's own state for a snapshot, taken while the VM is paused. A device that
    /// cannot be saved says why; the default is that it cannot.
    fn snapshot(&self) -> Result<DeviceState, DeviceSnapshotError> {
        Err(DeviceSnapshotError::Unsupported)
    }
    /// Takes back [`Self::snapshot`]'s state on a device freshly built from the same options,
    /// before the transport activates it.
    fn restore(&mut self, _state: &DeviceState) -> Result<(), DeviceSnapshotError> {
        Err(DeviceSnapshotError::Unsupported)
    }
}
