//! virtio-pci: one PCI function offering the legacy interface (virtio 0.9.5, I/O BAR 0), the
//! modern one (virtio 1.x vendor capabilities in memory BAR 4), or both (transitional), with
//! the MSI-X table and PBA in memory BAR 1 and INTx as the fallback.
//!
//! The transport owns the registers, the queues' kick eventfds, the device's I/O thread and the
//! [`Notifier`]; it activates the device at DRIVER_OK and resets it on a status write of 0.

mod caps;
mod interrupt;
mod registers;

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::GuestMemoryMmap;
use kickvm_bus::IoAddress;
use kickvm_pci::{
    BarKind, BarReprogram, GsiRouter, IntxLine, MsixConfig, PciConfiguration, PciDevice, PciHeader,
    COMMAND_INTX_DISABLE,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::counters::{QueueCounters, QueueCountersSnapshot};
use crate::device::{
    ActivateError, Activation, DirectInterrupt, HandlerSink, QueueHandler, QueueSetup,
    VirtioDevice, VirtioInterrupt,
};
use crate::io_thread::IoThread;
use crate::ioevent::{Doorbell, IoeventRegistrar};
use crate::notifier::{Notifier, NotifyMode};
use crate::snapshot::{QueuePosition, QueueSnapshot, SnapshotError, TransportSnapshot};
use caps::*;
pub use interrupt::{PciInterrupt, VIRTIO_MSI_NO_VECTOR};
use registers::{legacy, Effect};
pub use registers::{QueueRegs, Registers};
pub use registers::{
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
};

const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
const LEGACY_BAR: usize = 0;
const MSIX_BAR: usize = 1;
const MODERN_BAR: usize = 4;
/// The PBA starts at this offset of the MSI-X BAR, after the table.
const MSIX_PBA_OFFSET: u64 = 0x800;
const MSIX_BAR_SIZE: u64 = 0x1000;
/// How long a pause waits for requests in flight before it gives up waiting.
const PAUSE_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Which virtio-pci interfaces the function offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum TransportKind {
    /// Legacy and modern on one function (device id 0x1000 + n): what QEMU offers by default.
    #[default]
    Transitional,
    /// virtio 1.x only (device id 0x1040 + type).
    Modern,
    /// virtio 0.9.5 only.
    Legacy,
}

impl TransportKind {
    fn has_legacy(self) -> bool {
        self != TransportKind::Modern
    }
    fn has_modern(self) -> bool {
        self != TransportKind::Legacy
    }
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Transitional => "transitional",
            TransportKind::Modern => "modern",
            TransportKind::Legacy => "legacy",
        }
    }
}

impl FromStr for TransportKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "transitional" => Ok(TransportKind::Transitional),
            "modern" => Ok(TransportKind::Modern),
            "legacy" => Ok(TransportKind::Legacy),
            other => Err(format!(
                "unknown transport '{other}' (expected transitional, modern or legacy)"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("device has {0} queues; the transport supports 1..={MAX_QUEUES}")]
    QueueCount(usize),
    #[error("MSI-X: {0}")]
    Msix(#[from] kickvm_pci::MsixError),
    #[error("INTx: {0}")]
    Intx(#[from] kickvm_pci::IrqError),
    #[error("PCI configuration: {0}")]
    Config(#[from] kickvm_pci::ConfigError),
    #[error("cannot create eventfd or I/O thread: {0}")]
    Io(#[from] std::io::Error),
}

/// How the transport is built.
#[derive(Clone)]
pub struct TransportOptions {
    pub kind: TransportKind,
    /// The `ioeventfd=on|off` property.
    pub ioeventfd: bool,
    /// Bounded busy-polling of the I/O thread while requests are in flight.
    pub poll: Duration,
    /// The IOAPIC GSI for INTx, if the function should have one.
    pub intx_gsi: Option<u32>,
    /// Run the device's I/O thread at a higher priority than the vCPUs (when they can fill
    /// every host CPU).
    pub io_priority_boost: bool,
}

/// The I/O thread callbacks a transport registers, by id.
const CALLBACK_INTX_RESAMPLE: u32 = 0;
const CALLBACK_BACKEND_HANGUP: u32 = 1;

/// The notify mode of one queue and its counters, for `info` and `counters` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueReport {
    pub mode: NotifyMode,
    pub counters: QueueCountersSnapshot,
    /// The backend signals the queue's MSI-X irqfd itself (its interrupts are not counted).
    pub interrupts_direct: bool,
}

impl QueueReport {
    /// How the queue's interrupts leave: `direct` (the backend signals the irqfd) or
    /// `relayed` (through kickvm).
    pub fn interrupt_path(&self) -> &'static str {
        if self.interrupts_direct {
            "direct"
        } else {
            "relayed"
        }
    }
}

pub struct VirtioPciDevice {
    id: String,
    kind: TransportKind,
    config: PciConfiguration,
    msix_cap: usize,
    /// Offset of the VIRTIO_PCI_CAP_PCI_CFG capability (modern interface only).
    pci_cfg_cap: Option<usize>,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    regs: Registers,
    msix: Arc<Mutex<MsixConfig>>,
    interrupt: Arc<PciInterrupt>,
    kicks: Vec<Arc<EventFd>>,
    notifier: Notifier,
    io_thread: Arc<IoThread>,
    handler: Option<Arc<dyn QueueHandler>>,
    counters: Arc<[QueueCounters]>,
}

impl VirtioPciDevice {
    pub fn new(
        id: &str,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        options: TransportOptions,
        router: Arc<GsiRouter>,
        registrar: Arc<dyn IoeventRegistrar>,
    ) -> Result<Self, TransportError> {
        let num_queues = device.queue_max_sizes().len();
        if num_queues == 0 || num_queues > MAX_QUEUES {
            return Err(TransportError::QueueCount(num_queues));
        }
        let kind = options.kind;
        let device_type = device.device_type();
        let (device_id, revision) = match kind {
            TransportKind::Modern => (0x1040 + device_type, 1),
            // Transitional ids: 0x1000 + type - 1 (net 0x1000, block 0x1001, ...).
            _ => (0x1000 + device_type.saturating_sub(1), 0),
        };
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id,
            revision,
            class: class_of(device_type).0,
            subclass: class_of(device_type).1,
            prog_if: 0,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: if kind == TransportKind::Modern {
                0x40
            } else {
                device_type
            },
        });

        let mut features = device.features();
        if !kind.has_modern() {
            features &= 0xffff_ffff & !(1 << VIRTIO_F_VERSION_1);
        } else {
            features |= 1 << VIRTIO_F_VERSION_1;
        }

        if kind.has_legacy() {
            let size = (registers::LEGACY_HEADER_MSIX + device.config_len() as u64)
                .next_power_of_two()
                .max(0x40);
            config.add_bar(LEGACY_BAR, size, BarKind::Io)?;
        }
        // One vector per queue plus one for configuration changes.
        let msix = MsixConfig::new(num_queues as u16 + 1, router.clone())?;
        debug_assert!(msix.table_size() <= MSIX_PBA_OFFSET);
        config.add_bar(MSIX_BAR, MSIX_BAR_SIZE, BarKind::Mem32)?;
        let (cap, writable) =
            msix.capability(MSIX_BAR as u8, 0, MSIX_BAR as u8, MSIX_PBA_OFFSET as u32);
        let msix_cap = config.add_capability(&cap, Some(&writable))?;
        if kind.has_modern() {
            config.add_bar(MODERN_BAR, MODERN_BAR_SIZE, BarKind::Mem64)?;
            let bar = MODERN_BAR as u8;
            for cap in [
                vendor_cap(
                    CAP_COMMON_CFG,
                    bar,
                    COMMON_CFG_OFFSET as u32,
                    COMMON_CFG_LEN as u32,
                ),
                vendor_cap(CAP_ISR_CFG, bar, ISR_OFFSET as u32, 1),
                vendor_cap(
                    CAP_DEVICE_CFG,
                    bar,
                    DEVICE_CFG_OFFSET as u32,
                    device.config_len() as u32,
                ),
                vendor_cap(
                    CAP_NOTIFY_CFG,
                    bar,
                    NOTIFY_OFFSET as u32,
                    num_queues as u32 * NOTIFY_OFF_MULTIPLIER,
                ),
            ] {
                config.add_capability(&cap, None)?;
            }
        }
        let pci_cfg_cap = if kind.has_modern() {
            let (cap, writable) = pci_cfg_cap();
            Some(config.add_capability(&cap, Some(&writable))?)
        } else {
            None
        };
        let intx = match options.intx_gsi {
            Some(gsi) => {
                config.set_interrupt(gsi as u8);
                Some(IntxLine::new(router.chip().clone(), gsi)?)
            }
            None => None,
        };

        let counters: Arc<[QueueCounters]> =
            (0..num_queues).map(|_| QueueCounters::default()).collect();
        let msix = Arc::new(Mutex::new(msix));
        let interrupt = Arc::new(PciInterrupt::new(
            msix.clone(),
            intx,
            num_queues,
            counters.clone(),
        ));
        let io_thread = Arc::new(IoThread::spawn(
            id,
            counters.clone(),
            options.poll,
            options.io_priority_boost,
        )?);
        if let Some(intx) = interrupt.intx() {
            let for_callback = interrupt.clone();
            io_thread.add_callback(
                CALLBACK_INTX_RESAMPLE,
                std::os::fd::AsRawFd::as_raw_fd(intx.resample_fd()),
                Arc::new(move || for_callback.resample()),
            )?;
        }
        let kicks = (0..num_queues)
            .map(|_| EventFd::new(EFD_NONBLOCK).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let mut notifier = Notifier::new(
            id,
            options.ioeventfd,
            kicks.clone(),
            registrar,
            io_thread.clone(),
            counters.clone(),
        );
        if device.takes_host_notifiers() {
            notifier.take_host_notifier(&HandlerSink(None));
        }
        if let Some((socket, gone)) = device.backend_hangup() {
            let for_callback = interrupt.clone();
            let name = id.to_string();
            io_thread.add_hangup_callback(
                CALLBACK_BACKEND_HANGUP,
                socket,
                Arc::new(move || {
                    log::error!("{name}: the backend hung up; the device needs a reset");
                    gone();
                    for_callback.set_needs_reset();
                }),
            )?;
        }
        let regs = Registers::new(features, device.queue_max_sizes());
        log::info!(
            "{id}: virtio-pci {} device type {device_type}, {num_queues} queue(s), ioeventfd={}",
            kind.name(),
            if options.ioeventfd { "on" } else { "off" }
        );
        Ok(Self {
            id: id.to_string(),
            kind,
            config,
            msix_cap,
            pci_cfg_cap,
            device,
            mem,
            regs,
            msix,
            interrupt,
            kicks,
            notifier,
            io_thread,
            handler: None,
            counters,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn transport_kind(&self) -> TransportKind {
        self.kind
    }

    /// The virtio device type (1 net, 2 block).
    pub fn device_type(&self) -> u16 {
        self.device.device_type()
    }

    /// What serves the device ([`VirtioDevice::backend`]).
    pub fn backend(&self) -> Vec<(&'static str, crate::device::BackendValue)> {
        self.device.backend()
    }

    /// What refused this device's ioeventfd registration, while it is in sync mode for that.
    pub fn ioeventfd_refusal(&self) -> Option<&str> {
        self.notifier.refusal()
    }

    /// The device status as the driver reads it.
    pub fn device_status(&self) -> u8 {
        self.regs.status
            | if self.interrupt.needs_reset() {
                STATUS_NEEDS_RESET
            } else {
                0
            }
    }

    pub fn is_active(&self) -> bool {
        self.handler.is_some()
    }

    /// Each queue's notify mode in force and its counters.
    pub fn queue_reports(&self) -> Vec<QueueReport> {
        self.notifier
            .modes()
            .into_iter()
            .zip(self.counters.iter())
            .enumerate()
            .map(|(queue, (mode, c))| QueueReport {
                mode,
                counters: c.snapshot(),
                interrupts_direct: self
                    .handler
                    .as_ref()
                    .is_some_and(|h| h.interrupts_direct(queue)),
            })
            .collect()
    }

    pub fn ioeventfd(&self) -> bool {
        self.notifier.ioeventfd_property()
    }

    /// The run-time `ioeventfd=on|off` switch; loss-free.
    pub fn set_ioeventfd(&mut self, on: bool) {
        log::info!("{}: ioeventfd={}", self.id, if on { "on" } else { "off" });
        let sink = HandlerSink(self.handler.as_ref());
        self.notifier.set_ioeventfd(on, &sink);
    }

    /// VM pause (vCPUs already stopped): nothing new is taken from the rings, kicks stop
    /// reaching the device (kept for resume), and this returns once the requests in flight
    /// have completed, so the queues are quiescent. False if they did not within 10 s.
    pub fn pause(&mut self) -> bool {
        if let Some(handler) = &self.handler {
            handler.set_paused(true);
        }
        let sink = HandlerSink(self.handler.as_ref());
        self.notifier.vm_paused(&sink);
        let Some(handler) = &self.handler else {
            return true;
        };
        let deadline = Instant::now() + PAUSE_DRAIN_TIMEOUT;
        while (0..handler.num_queues()).any(|q| handler.busy(q)) {
            if Instant::now() >= deadline {
                log::warn!("{}: requests still in flight after pause timeout", self.id);
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }

    /// Undoes [`Self::pause`] in the order that loses nothing: rings open, doorbells back, and
    /// every queue looked at once (a spurious kick is harmless; a request made available
    /// around the pause must not wait for the next one).
    pub fn resume(&mut self) {
        let Some(handler) = self.handler.clone() else {
            self.notifier.vm_resumed(&HandlerSink(None));
            return;
        };
        handler.set_paused(false);
        self.notifier.vm_resumed(&HandlerSink(Some(&handler)));
        for (queue, mode) in self.notifier.modes().into_iter().enumerate() {
            match mode {
                NotifyMode::Ioeventfd => self.counters[queue].replay_kick(&self.kicks[queue]),
                NotifyMode::Sync(_) => handler.process_queue(queue),
                NotifyMode::HostNotifier => {}
            }
        }
    }

    /// The transport's and the device's state, for a snapshot. The VM must be paused (so
    /// nothing moves in the rings) and drained; a device that cannot be saved is refused.
    pub fn snapshot(&self) -> Result<TransportSnapshot, SnapshotError> {
        let device_type = self.device.device_type();
        let kind = crate::snapshot::kind_name(device_type);
        let device = self
            .device
            .snapshot()
            .map_err(|e| SnapshotError::from_device(device_type, &self.id, e))?;
        if self.notifier.vm_running() {
            return Err(SnapshotError::NotPaused {
                kind,
                id: self.id.clone(),
            });
        }
        let handler = self.handler.as_ref();
        if let Some(h) = handler {
            if (0..h.num_queues()).any(|q| h.busy(q)) {
                return Err(SnapshotError::InFlight {
                    kind,
                    id: self.id.clone(),
                });
            }
        }
        Ok(TransportSnapshot {
            device_type,
            kind: self.kind,
            registers: self.regs.clone(),
            config_vector: self.interrupt.config_vector(),
            isr: self.interrupt.isr(),
            needs_reset: self.interrupt.needs_reset(),
            active: handler.is_some(),
            ioeventfd: self.notifier.ioeventfd_property(),
            queues: (0..self.regs.queues.len())
                .map(|index| QueueSnapshot {
                    vector: self.interrupt.queue_vector(index),
                    position: handler.and_then(|h| h.queue_position(index)),
                })
                .collect(),
            msix: self.msix.lock().unwrap().snapshot(),
            device,
        })
    }

    /// Whether `snapshot` is of a device like this one (built from the same options) and this
    /// one is still as attached; checked before anything is changed.
    pub fn check_snapshot(&self, snapshot: &TransportSnapshot) -> Result<(), SnapshotError> {
        let mismatch = |what: &'static str, saved: String, actual: String| {
            Err(SnapshotError::Mismatch {
                id: self.id.clone(),
                what,
                saved,
                actual,
            })
        };
        let device_type = self.device.device_type();
        if snapshot.device_type != device_type {
            return mismatch(
                "device type",
                crate::snapshot::kind_name(snapshot.device_type).to_string(),
                crate::snapshot::kind_name(device_type).to_string(),
            );
        }
        if snapshot.kind != self.kind {
            return mismatch(
                "transport",
                snapshot.kind.name().to_string(),
                self.kind.name().to_string(),
            );
        }
        let sizes = |queues: &mut dyn Iterator<Item = u16>| {
            let sizes: Vec<String> = queues.map(|s| s.to_string()).collect();
            format!(
                "{} queue(s) of max size [{}]",
                sizes.len(),
                sizes.join(", ")
            )
        };
        let saved = sizes(&mut snapshot.registers.queues.iter().map(|q| q.max_size));
        let actual = sizes(&mut self.regs.queues.iter().map(|q| q.max_size));
        if saved != actual {
            return mismatch("queues", saved, actual);
        }
        if snapshot.registers.device_features != self.regs.device_features {
            return mismatch(
                "device features",
                format!("{:#x}", snapshot.registers.device_features),
                format!("{:#x}", self.regs.device_features),
            );
        }
        if self.is_active() || self.regs.status != 0 {
            return Err(SnapshotError::NotFresh(self.id.clone()));
        }
        Ok(())
    }

    /// Gives a device freshly attached from the same options the state of `snapshot`, before
    /// any vCPU runs. Its configuration space (BARs) must already be restored (the doorbells
    /// are where the BARs are), and guest memory and the interrupt controllers too: a device
    /// that was active is activated at its saved ring positions and every doorbell is kicked
    /// once, which may complete requests and send interrupts.
    pub fn restore(&mut self, snapshot: &TransportSnapshot) -> Result<(), SnapshotError> {
        self.check_snapshot(snapshot)?;
        self.msix
            .lock()
            .unwrap()
            .restore(&snapshot.msix)
            .map_err(|source| SnapshotError::Msix {
                id: self.id.clone(),
                source,
            })?;
        self.device
            .restore(&snapshot.device)
            .map_err(|e| SnapshotError::from_device(snapshot.device_type, &self.id, e))?;
        // Checked equal above: what the device offers and its queues' maximum sizes.
        self.regs = snapshot.registers.clone();
        for (index, saved) in snapshot.queues.iter().enumerate() {
            self.interrupt.set_queue_vector(index, saved.vector);
        }
        self.interrupt.set_config_vector(snapshot.config_vector);
        self.interrupt.restore(snapshot.isr, snapshot.needs_reset);
        self.interrupt
            .set_intx_disabled(self.config.command() & COMMAND_INTX_DISABLE != 0);
        if snapshot.ioeventfd != self.notifier.ioeventfd_property() {
            self.notifier
                .set_ioeventfd(snapshot.ioeventfd, &HandlerSink(None));
        }
        if snapshot.active {
            let positions: Vec<_> = snapshot.queues.iter().map(|q| q.position).collect();
            let handler =
                self.start_device(Some(&positions))
                    .map_err(|reason| SnapshotError::Activate {
                        id: self.id.clone(),
                        reason,
                    })?;
            let doorbells = self.doorbells();
            self.notifier
                .restored(true, doorbells, &HandlerSink(Some(&handler)));
            self.handler = Some(handler);
            self.route_direct_interrupts();
        } else {
            let doorbells = self.doorbells();
            self.notifier.restored(false, doorbells, &HandlerSink(None));
        }
        // Unread ISR bits stand for an INTx interrupt the guest has yet to take: the line is
        // level, so it is raised again.
        self.interrupt.resample();
        log::info!(
            "{}: restored (status {:#x}, {})",
            self.id,
            snapshot.registers.status,
            if snapshot.active {
                "active"
            } else {
                "inactive"
            }
        );
        Ok(())
    }

    /// The queues' kick eventfds (the doorbells' targets in ioeventfd mode).
    pub fn kick_eventfds(&self) -> &[Arc<EventFd>] {
        &self.kicks
    }

    pub fn msix(&self) -> &Arc<Mutex<MsixConfig>> {
        &self.msix
    }

    fn modern_driver(&self) -> bool {
        self.regs.driver_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    /// Where each enabled queue's doorbell is, for the interface the driver uses.
    fn doorbells(&self) -> Vec<Option<Doorbell>> {
        let modern = self.modern_driver();
        let bar = if modern { MODERN_BAR } else { LEGACY_BAR };
        let base = self.config.bar_address(bar);
        self.regs
            .queues
            .iter()
            .enumerate()
            .map(|(index, q)| {
                let base = base?;
                q.enabled.then_some(())?;
                let addr = if modern {
                    IoAddress::Mmio(
                        base + NOTIFY_OFFSET + index as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
                    )
                } else {
                    IoAddress::Pio(base + registers::LEGACY_NOTIFY)
                };
                Some(Doorbell {
                    addr,
                    datamatch: index as u16,
                })
            })
            .collect()
    }

    fn set_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.regs.status;
        let mut new = value;
        if new & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 {
            let offered = self.regs.device_features;
            let acked = self.regs.driver_features;
            let acceptable = acked & !offered == 0 && acked & (1 << VIRTIO_F_VERSION_1) != 0;
            if !acceptable {
                log::warn!(
                    "{}: driver features {acked:#x} refused (offered {offered:#x}); FEATURES_OK \
                     stays clear",
                    self.id
                );
                new &= !STATUS_FEATURES_OK;
            }
        }
        self.regs.status = new;
        if new & STATUS_DRIVER_OK != 0 && old & STATUS_DRIVER_OK == 0 {
            self.activate();
        } else if new & STATUS_DRIVER_OK == 0 && old & STATUS_DRIVER_OK != 0 {
            self.deactivate();
        }
    }

    /// The driver's queues as built at DRIVER_OK; a restore passes each queue's saved place
    /// in its rings, which an activation must start from instead of 0.
    fn build_queues(
        &self,
        positions: Option<&[Option<QueuePosition>]>,
    ) -> Result<Vec<QueueSetup>, ActivateError> {
        let event_idx = self.regs.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::new();
        for (index, regs) in self.regs.queues.iter().enumerate() {
            if !regs.enabled {
                continue;
            }
            let bad = |reason: String| ActivateError::BadQueue {
                queue: index,
                reason,
            };
            if !regs.size.is_power_of_two() || regs.size > regs.max_size {
                return Err(bad(format!(
                    "size {} is not a power of two of at most {}",
                    regs.size, regs.max_size
                )));
            }
            let mut queue = Queue::new(regs.max_size).map_err(|e| bad(e.to_string()))?;
            queue
                .try_set_size(regs.size)
                .map_err(|e| bad(e.to_string()))?;
            queue
                .try_set_desc_table_address(GuestAddress(regs.desc))
                .map_err(|e| bad(format!("descriptor table {:#x}: {e}", regs.desc)))?;
            queue
                .try_set_avail_ring_address(GuestAddress(regs.avail))
                .map_err(|e| bad(format!("available ring {:#x}: {e}", regs.avail)))?;
            queue
                .try_set_used_ring_address(GuestAddress(regs.used))
                .map_err(|e| bad(format!("used ring {:#x}: {e}", regs.used)))?;
            queue.set_event_idx(event_idx);
            if let Some(at) = positions.and_then(|p| p.get(index).copied().flatten()) {
                queue.set_next_avail(at.next_avail);
                queue.set_next_used(at.next_used);
                queue.set_event_idx(at.event_idx);
            }
            queue.set_ready(true);
            if !queue.is_valid(&self.mem) {
                return Err(bad("rings are not inside guest memory".to_string()));
            }
            queues.push(QueueSetup {
                index,
                queue,
                kick: self.kicks[index].clone(),
            });
        }
        Ok(queues)
    }

    fn activate(&mut self) {
        let handler = match self.start_device(None) {
            Ok(handler) => handler,
            Err(e) => {
                log::warn!("{}: {e}", self.id);
                self.interrupt.set_needs_reset();
                return;
            }
        };
        log::debug!(
            "{}: activated ({} driver, features {:#x})",
            self.id,
            if self.modern_driver() {
                "modern"
            } else {
                "legacy"
            },
            self.regs.driver_features
        );
        let doorbells = self.doorbells();
        self.notifier
            .driver_ok(doorbells, &HandlerSink(Some(&handler)));
        self.handler = Some(handler);
        self.route_direct_interrupts();
    }

    /// Builds the queues, activates the device on them and has the I/O thread serve it: what
    /// DRIVER_OK and a restore have in common. Says why not, for the caller to report.
    fn start_device(
        &mut self,
        positions: Option<&[Option<QueuePosition>]>,
    ) -> Result<Arc<dyn QueueHandler>, String> {
        let handler = self
            .build_queues(positions)
            .and_then(|queues| {
                self.device.activate(Activation {
                    mem: self.mem.clone(),
                    acked_features: self.regs.driver_features,
                    interrupt: self.interrupt.clone(),
                    queues,
                    counters: self.counters.clone(),
                })
            })
            .map_err(|e| format!("cannot activate: {e}"))?;
        if let Err(e) = self.io_thread.attach(handler.clone()) {
            self.device.reset();
            return Err(format!("I/O thread cannot serve the device: {e}"));
        }
        Ok(handler)
    }

    /// Hands a backend that signals interrupts itself the irqfd of each queue's vector while
    /// that vector can fire (KVM injects with no kickvm thread in between), and the eventfd
    /// kickvm relays otherwise (masked, MSI-X off: pending bits and INTx stay kickvm's).
    /// Called wherever that can change: activation, queue vector, MSI-X control and table
    /// writes.
    fn route_direct_interrupts(&self) {
        let Some(handler) = self
            .handler
            .as_ref()
            .filter(|h| h.takes_direct_interrupts())
        else {
            return;
        };
        let direct = {
            let msix = self.msix.lock().unwrap();
            (0..self.kicks.len())
                .map(|queue| {
                    let vector = self.interrupt.queue_vector(queue);
                    if !msix.deliverable(vector) {
                        return None;
                    }
                    let irqfd = msix.irqfd(vector)?.try_clone().ok()?;
                    Some(DirectInterrupt { vector, irqfd })
                })
                .collect()
        };
        handler.route_interrupts(direct);
    }

    /// DRIVER_OK lost or reset: kicks already signalled are processed before the device stops.
    fn deactivate(&mut self) {
        let handler = self.handler.take();
        self.notifier.driver_ok_lost(&HandlerSink(handler.as_ref()));
        if handler.is_some() {
            self.io_thread.detach();
            self.device.reset();
        }
    }

    fn reset(&mut self) {
        self.deactivate();
        self.regs.reset();
        self.interrupt.reset();
        for kick in &self.kicks {
            let _ = kick.read();
        }
    }

    fn apply(&mut self, effect: Effect) {
        match effect {
            Effect::None => {}
            Effect::Status(status) => self.set_status(status),
            Effect::Notify(queue) => self.exit_kick(usize::from(queue)),
            Effect::QueueVector => self.route_direct_interrupts(),
        }
    }

    fn exit_kick(&mut self, queue: usize) {
        if queue >= self.kicks.len() {
            log::debug!("{}: kick for nonexistent queue {queue} ignored", self.id);
            return;
        }
        self.notifier
            .exit_kick(queue, &HandlerSink(self.handler.as_ref()));
    }

    /// The BAR access the driver set up in the PCI_CFG capability: a BAR this function has,
    /// 1, 2 or 4 bytes, naturally aligned.
    fn pci_cfg_window(&self) -> Option<(usize, u64, usize)> {
        let cap = self.pci_cfg_cap?;
        let bar = usize::from(self.config.bytes(cap + 4, 1)[0]);
        let field =
            |at: usize| u32::from_le_bytes(self.config.bytes(cap + at, 4).try_into().unwrap());
        let (offset, len) = (u64::from(field(8)), field(12) as usize);
        let valid = matches!(len, 1 | 2 | 4)
            && offset.is_multiple_of(len as u64)
            && self
                .config
                .bar_size(bar)
                .is_some_and(|size| offset + len as u64 <= size);
        valid.then_some((bar, offset, len))
    }

    fn msix_enabled(&self) -> bool {
        self.msix.lock().unwrap().enabled()
    }

    fn read_legacy(&mut self, offset: u64, data: &mut [u8]) {
        let msix_enabled = self.msix_enabled();
        let config_at = legacy::config_offset(msix_enabled);
        if offset >= config_at {
            self.device.read_config(offset - config_at, data);
        } else {
            legacy::read(&self.regs, &self.interrupt, msix_enabled, offset, data);
        }
    }

    fn write_legacy(&mut self, offset: u64, data: &[u8]) {
        let msix_enabled = self.msix_enabled();
        let config_at = legacy::config_offset(msix_enabled);
        if offset >= config_at {
            self.device.write_config(offset - config_at, data);
        } else {
            let effect = legacy::write(&mut self.regs, &self.interrupt, msix_enabled, offset, data);
            self.apply(effect);
        }
    }

    fn read_modern(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_CFG_OFFSET + REGION_LEN => {
                registers::common::read(&self.regs, &self.interrupt, o, data)
            }
            o if (ISR_OFFSET..ISR_OFFSET + REGION_LEN).contains(&o) => {
                let isr = if o == ISR_OFFSET {
                    self.interrupt.read_isr()
                } else {
                    0
                };
                data.fill(0);
                data[0] = isr;
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + REGION_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG_OFFSET, data)
            }
            _ => data.fill(0),
        }
    }

    fn write_modern(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_CFG_OFFSET + REGION_LEN => {
                let effect = registers::common::write(&mut self.regs, &self.interrupt, o, data);
                self.apply(effect);
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + REGION_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + REGION_LEN).contains(&o) => {
                // The address names the queue; the value (the queue index) adds nothing.
                let queue = (o - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER);
                self.exit_kick(queue as usize);
            }
            _ => {}
        }
    }
}

/// PCI class/subclass by virtio device type (what guests' lspci shows).
fn class_of(device_type: u16) -> (u8, u8) {
    match device_type {
        1 => (0x02, 0x00), // network controller
        2 => (0x01, 0x00), // SCSI storage controller, as QEMU's virtio-blk
        _ => (0xff, 0x00),
    }
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn read_config(&mut self, reg: usize) -> u32 {
        if let Some(cap) = self.pci_cfg_cap {
            if reg * 4 == cap + PCI_CFG_DATA {
                let mut data = [0u8; 4];
                if let Some((bar, offset, len)) = self.pci_cfg_window() {
                    self.read_bar(bar, offset, &mut data[..len]);
                }
                return u32::from_le_bytes(data);
            }
        }
        self.config.read_reg(reg)
    }

    fn write_config(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarReprogram> {
        let moved = self.config.write(reg, offset, data);
        let start = reg * 4 + offset as usize;
        let end = start + data.len();
        if let Some(cap) = self.pci_cfg_cap {
            if start == cap + PCI_CFG_DATA {
                if let Some((bar, bar_offset, len)) = self.pci_cfg_window() {
                    let bytes = self.config.bytes(start, 4)[..len.min(data.len())].to_vec();
                    self.write_bar(bar, bar_offset, &bytes);
                }
            }
        }
        let msg_ctl = self.msix_cap + 2;
        if start < msg_ctl + 2 && end > msg_ctl {
            let bytes = self.config.bytes(msg_ctl, 2);
            let control = u16::from_le_bytes([bytes[0], bytes[1]]);
            self.msix.lock().unwrap().set_message_control(control);
            self.route_direct_interrupts();
        }
        if start < 6 && end > 4 {
            self.interrupt
                .set_intx_disabled(self.config.command() & COMMAND_INTX_DISABLE != 0);
        }
        moved
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match bar {
            LEGACY_BAR if self.kind.has_legacy() => self.read_legacy(offset, data),
            MODERN_BAR if self.kind.has_modern() => self.read_modern(offset, data),
            MSIX_BAR => {
                let msix = self.msix.lock().unwrap();
                if offset < MSIX_PBA_OFFSET {
                    msix.read_table(offset, data);
                } else {
                    msix.read_pba(offset - MSIX_PBA_OFFSET, data);
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match bar {
            LEGACY_BAR if self.kind.has_legacy() => self.write_legacy(offset, data),
            MODERN_BAR if self.kind.has_modern() => self.write_modern(offset, data),
            MSIX_BAR if offset < MSIX_PBA_OFFSET => {
                self.msix.lock().unwrap().write_table(offset, data);
                self.route_direct_interrupts();
            }
            _ => {}
        }
    }

    fn bar_moved(&mut self, moved: &BarReprogram) {
        let doorbell_bar = if self.modern_driver() {
            MODERN_BAR
        } else {
            LEGACY_BAR
        };
        if moved.bar == doorbell_bar && self.handler.is_some() {
            let doorbells = self.doorbells();
            self.notifier
                .doorbells_moved(doorbells, &HandlerSink(self.handler.as_ref()));
        }
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        // The run's notify-path record, one line per queue: the mode the run ended in, and the
        // counters after deactivation's last drain of the kick eventfds, so every kick is in.
        let reports = self.queue_reports();
        self.deactivate();
        for (index, report) in reports.iter().enumerate() {
            let c = self.counters[index].snapshot();
            log::info!(
                "{} queue {index}: mode={} kicks_ioeventfd={} kicks_exit={} kicks_replayed={} \
                 requests={} bytes={} interrupts_sent={} interrupts_suppressed={} interrupts={}",
                self.id,
                report.mode,
                c.kicks_ioeventfd,
                c.kicks_exit,
                c.kicks_replayed,
                c.requests,
                c.bytes,
                c.interrupts_sent,
                c.interrupts_suppressed,
                report.interrupt_path()
            );
        }
    }
}

#[cfg(test)]
mod tests;
