//! A virtio device whose queues an external vhost-user backend serves (`--disk socket=PATH`,
//! e.g. `qemu-storage-daemon --export type=vhost-user-blk`): the seed's "host notifiers taken by
//! vhost-user backends".
//!
//! kickvm keeps the transport (registers, MSI-X, the notifier state machine) and hands the
//! backend what it needs to run the rings itself: guest memory (shared, by file descriptor), the
//! ring addresses, and per queue two eventfds. The *kick* eventfd is the transport's own: the
//! notifier keeps it registered as the doorbell's ioeventfd but takes it away from the I/O
//! thread ([`crate::notifier::Notifier::take_host_notifier`]), so a guest kick goes from KVM
//! straight to the backend. With `ioeventfd=off` (or refused, or while switching) the doorbell
//! exits and [`VhostUserHandler::process_queue`] signals that same eventfd. The *call* eventfd is
//! kickvm's: the I/O thread watches it and raises the queue's interrupt through the transport,
//! so MSI-X masking and INTx keep working whatever the guest does with its vectors.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::GuestMemoryMmap;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{
    read_config_bytes, ActivateError, Activation, BackendValue, DirectInterrupt, QueueHandler,
    VirtioDevice, VirtioInterrupt,
};

const VIRTIO_ID_BLOCK: u16 = 2;
/// `struct virtio_blk_config` up to and including the write-zeroes fields.
const BLK_CONFIG_LEN: u32 = 60;
const BLK_CONFIG_NUM_QUEUES: usize = 34;
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
/// Feature bits the transport cannot honour whatever the backend says: a platform IOMMU,
/// packed rings and notification data (kickvm's transport sets up split rings, kicks carry
/// no data).
const TRANSPORT_UNSUPPORTED: u64 = (1 << 33) | (1 << 34) | (1 << 38);

#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error("cannot connect to the vhost-user backend at {path}: {source}")]
    Connect { path: PathBuf, source: vhost::Error },
    #[error("vhost-user backend at {path}: {what} failed: {source}")]
    Protocol {
        path: PathBuf,
        what: &'static str,
        source: vhost::Error,
    },
    #[error("vhost-user backend at {path} does not offer {what}, which kickvm needs")]
    Missing { path: PathBuf, what: &'static str },
}

/// One ring as handed to the backend, kept so that a pause can stop it and a resume start it
/// again where it stopped.
struct Ring {
    index: usize,
    addresses: VringConfigData,
    /// Where the backend starts: the queue's next available index at activation, then what
    /// GET_VRING_BASE answered when it was stopped.
    base: u16,
    kick: Arc<EventFd>,
    call: Arc<EventFd>,
    /// The queue's MSI-X irqfd while its vector can fire: given to the backend instead of
    /// `call`, so its completions reach KVM with no kickvm thread in between.
    direct: Option<DirectInterrupt>,
    running: bool,
    /// Guest addresses of the available and used rings' `idx` fields.
    avail_idx: GuestAddress,
    used_idx: GuestAddress,
}

impl Ring {
    /// What the backend signals on completion: the vector's irqfd, or kickvm's relay.
    fn call_fd(&self) -> &EventFd {
        self.direct.as_ref().map_or(&*self.call, |d| &d.irqfd)
    }
}

/// How long a pause waits for the backend to finish the requests it has taken.
const PAUSE_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The connection and the rings it runs, shared by the device (activation, reset) and its
/// handler (pause, resume).
struct Backend {
    path: PathBuf,
    frontend: Frontend,
    rings: Vec<Ring>,
    /// The backend hung up (seen by the I/O thread): nothing more is asked of it.
    gone: Arc<AtomicBool>,
}

impl Backend {
    fn start_ring(
        frontend: &mut Frontend,
        ring: &Ring,
    ) -> Result<(), (&'static str, vhost::Error)> {
        let at = |what| move |e| (what, e);
        frontend
            .set_vring_num(ring.index, ring.addresses.queue_size)
            .map_err(at("SET_VRING_NUM"))?;
        frontend
            .set_vring_addr(ring.index, &ring.addresses)
            .map_err(at("SET_VRING_ADDR"))?;
        frontend
            .set_vring_base(ring.index, ring.base)
            .map_err(at("SET_VRING_BASE"))?;
        frontend
            .set_vring_call(ring.index, ring.call_fd())
            .map_err(at("SET_VRING_CALL"))?;
        frontend
            .set_vring_kick(ring.index, &ring.kick)
            .map_err(at("SET_VRING_KICK"))?;
        // Protocol features are always negotiated (see `connect`), so rings start disabled.
        frontend
            .set_vring_enable(ring.index, true)
            .map_err(at("SET_VRING_ENABLE"))
    }

    /// Starts every ring that is not running.
    fn start(&mut self) -> Result<(), String> {
        for ring in self.rings.iter_mut().filter(|r| !r.running) {
            Self::start_ring(&mut self.frontend, ring).map_err(|(what, e)| {
                format!("{}: ring {}: {what}: {e}", self.path.display(), ring.index)
            })?;
            ring.running = true;
        }
        Ok(())
    }

    /// Waits until the backend has used every buffer the driver made available (the vCPUs are
    /// stopped, so no new ones come): a backend stopped with requests in flight may complete
    /// them into a ring it has already let go of (libvhost-user then writes a closed call fd).
    /// Each ring is kicked once first, for a request made available just before the pause
    /// whose kick never came. Returns false on timeout.
    fn drain(&self, mem: &GuestMemoryMmap) -> bool {
        for ring in self.rings.iter().filter(|r| r.running) {
            let _ = ring.kick.write(1);
        }
        let deadline = Instant::now() + PAUSE_DRAIN_TIMEOUT;
        let in_flight = |ring: &Ring| {
            let avail: u16 = mem.load(ring.avail_idx, Ordering::Acquire).unwrap_or(0);
            let used: u16 = mem.load(ring.used_idx, Ordering::Acquire).unwrap_or(0);
            avail != used
        };
        while self.rings.iter().any(|r| r.running && in_flight(r)) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        true
    }

    /// Stops every running ring: after GET_VRING_BASE the backend no longer touches it, and
    /// its answer is where the ring starts again.
    fn stop(&mut self) {
        for ring in self.rings.iter_mut().filter(|r| r.running) {
            ring.running = false;
            if let Err(e) = self.frontend.set_vring_enable(ring.index, false) {
                log::warn!(
                    "{}: disabling ring {}: {e}",
                    self.path.display(),
                    ring.index
                );
            }
            match self.frontend.get_vring_base(ring.index) {
                Ok(base) => ring.base = base as u16,
                Err(e) => {
                    log::warn!("{}: stopping ring {}: {e}", self.path.display(), ring.index)
                }
            }
        }
    }
}

/// A vhost-user-blk device: config space and features come from the backend.
pub struct VhostUserBlk {
    backend: Arc<Mutex<Backend>>,
    /// Virtio features the backend offers the driver.
    features: u64,
    queue_sizes: Vec<u16>,
    config: Vec<u8>,
}

impl VhostUserBlk {
    /// Connects to the backend at `path` and learns its features and configuration. The device
    /// gets `queues` queues (fewer if the backend has fewer) of `queue_size` entries.
    pub fn connect(path: &Path, queues: u16, queue_size: u16) -> Result<Self, VhostUserError> {
        let protocol_err = |what| {
            move |source| VhostUserError::Protocol {
                path: path.to_path_buf(),
                what,
                source,
            }
        };
        let mut frontend = Frontend::connect(path, u64::from(queues)).map_err(|source| {
            VhostUserError::Connect {
                path: path.to_path_buf(),
                source,
            }
        })?;
        frontend.set_owner().map_err(protocol_err("SET_OWNER"))?;
        let offered = frontend
            .get_features()
            .map_err(protocol_err("GET_FEATURES"))?;
        if offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(VhostUserError::Missing {
                path: path.to_path_buf(),
                what: "protocol features (for the configuration space)",
            });
        }
        let backend_protocol = frontend
            .get_protocol_features()
            .map_err(protocol_err("GET_PROTOCOL_FEATURES"))?;
        if !backend_protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(VhostUserError::Missing {
                path: path.to_path_buf(),
                what: "the CONFIG protocol feature",
            });
        }
        let wanted = VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK;
        let protocol_features = backend_protocol & wanted;
        frontend
            .set_protocol_features(protocol_features)
            .map_err(protocol_err("SET_PROTOCOL_FEATURES"))?;
        if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every message waits for the backend's answer, so one it refuses (say, a driver
            // without VERSION_1) fails that step instead of a later, unrelated one.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let queues = if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
            let backend_queues = frontend
                .get_queue_num()
                .map_err(protocol_err("GET_QUEUE_NUM"))?;
            queues
                .min(u16::try_from(backend_queues).unwrap_or(u16::MAX))
                .max(1)
        } else {
            1
        };
        let (_, mut config) = frontend
            .get_config(
                0,
                BLK_CONFIG_LEN,
                VhostUserConfigFlags::WRITABLE,
                &vec![0u8; BLK_CONFIG_LEN as usize],
            )
            .map_err(protocol_err("GET_CONFIG"))?;
        let mut features =
            offered & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() & !TRANSPORT_UNSUPPORTED;
        if queues > 1 {
            config[BLK_CONFIG_NUM_QUEUES..BLK_CONFIG_NUM_QUEUES + 2]
                .copy_from_slice(&queues.to_le_bytes());
        } else {
            features &= !VIRTIO_BLK_F_MQ;
        }
        log::info!(
            "vhost-user-blk at {}: {queues} queue(s), features {features:#x}, protocol {:#x}",
            path.display(),
            protocol_features.bits()
        );
        Ok(Self {
            backend: Arc::new(Mutex::new(Backend {
                path: path.to_path_buf(),
                frontend,
                rings: Vec::new(),
                gone: Arc::new(AtomicBool::new(false)),
            })),
            features,
            queue_sizes: vec![queue_size; usize::from(queues)],
            config,
        })
    }

    /// The backend's rings are addressed in kickvm's virtual address space (the memory table
    /// maps it to the shared file).
    fn host_address(mem: &GuestMemoryMmap, addr: GuestAddress) -> Result<u64, ActivateError> {
        mem.get_host_address(addr)
            .map(|p| p as u64)
            .map_err(|e| ActivateError::BadQueue {
                queue: 0,
                reason: format!("ring address {:#x}: {e}", addr.0),
            })
    }
}

impl VirtioDevice for VhostUserBlk {
    /// The rings' positions live in the backend process, which offers no way to save them.
    fn snapshot(
        &self,
    ) -> Result<crate::snapshot::DeviceState, crate::snapshot::DeviceSnapshotError> {
        Err(crate::snapshot::DeviceSnapshotError::VhostUser)
    }

    fn device_type(&self) -> u16 {
        VIRTIO_ID_BLOCK
    }

    fn backend(&self) -> Vec<(&'static str, BackendValue)> {
        let socket = self.backend.lock().unwrap().path.display().to_string();
        vec![("vhost_user_socket", BackendValue::Text(socket))]
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn config_len(&self) -> usize {
        self.config.len()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The one writable field of virtio-blk (WCE) is not offered through kickvm.
        log::debug!(
            "vhost-user-blk: {}-byte config write at {offset:#x} ignored",
            data.len()
        );
    }

    fn takes_host_notifiers(&self) -> bool {
        true
    }

    /// A backend that exits or crashes closes the socket: from then on the device asks it
    /// nothing (a pause does not wait for requests it will never complete) and needs a reset.
    fn backend_hangup(&self) -> Option<(RawFd, Arc<dyn Fn() + Send + Sync>)> {
        let backend = self.backend.lock().unwrap();
        let gone = backend.gone.clone();
        Some((
            backend.frontend.as_raw_fd(),
            Arc::new(move || gone.store(true, Ordering::SeqCst)),
        ))
    }

    fn activate(&mut self, activation: Activation) -> Result<Arc<dyn QueueHandler>, ActivateError> {
        let mut backend = self.backend.lock().unwrap();
        backend.stop();
        backend.rings.clear();
        let backend_err =
            |what: &str, e: vhost::Error| ActivateError::Backend(format!("{what}: {e}"));
        let acked = activation.acked_features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        backend
            .frontend
            .set_features(acked)
            .map_err(|e| backend_err("SET_FEATURES", e))?;
        let regions = activation
            .mem
            .iter()
            .map(|region| {
                VhostUserMemoryRegionInfo::from_guest_region(region).map_err(|e| {
                    ActivateError::Backend(format!(
                        "guest memory is not shared with the backend ({e}); kickvm maps it \
                         shared when a vhost-user disk is configured"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        backend
            .frontend
            .set_mem_table(&regions)
            .map_err(|e| backend_err("SET_MEM_TABLE", e))?;

        let num_queues = self.queue_sizes.len();
        let mut kicks: Vec<Option<Arc<EventFd>>> = vec![None; num_queues];
        let mut calls: Vec<Option<Arc<EventFd>>> = vec![None; num_queues];
        for setup in activation.queues {
            let index = setup.index;
            let queue = &setup.queue;
            let ring = |addr: u64| Self::host_address(&activation.mem, GuestAddress(addr));
            let call = Arc::new(
                EventFd::new(EFD_NONBLOCK)
                    .map_err(|e| ActivateError::Backend(format!("call eventfd: {e}")))?,
            );
            backend.rings.push(Ring {
                index,
                addresses: VringConfigData {
                    queue_max_size: self.queue_sizes[index],
                    queue_size: queue.size(),
                    flags: 0,
                    desc_table_addr: ring(queue.desc_table())?,
                    used_ring_addr: ring(queue.used_ring())?,
                    avail_ring_addr: ring(queue.avail_ring())?,
                    log_addr: None,
                },
                base: queue.next_avail(),
                kick: setup.kick.clone(),
                call: call.clone(),
                direct: None,
                running: false,
                avail_idx: GuestAddress(queue.avail_ring() + 2),
                used_idx: GuestAddress(queue.used_ring() + 2),
            });
            kicks[index] = Some(setup.kick);
            calls[index] = Some(call);
        }
        backend.start().map_err(ActivateError::Backend)?;
        drop(backend);
        Ok(Arc::new(VhostUserHandler {
            backend: self.backend.clone(),
            mem: activation.mem,
            direct: (0..num_queues).map(|_| AtomicBool::new(false)).collect(),
            kicks,
            calls,
            interrupt: activation.interrupt,
        }))
    }

    fn reset(&mut self) {
        let mut backend = self.backend.lock().unwrap();
        backend.stop();
        backend.rings.clear();
    }
}

/// What the transport and I/O thread call for a vhost-user device: kicks are passed on to the
/// backend, the backend's calls become interrupts.
pub struct VhostUserHandler {
    backend: Arc<Mutex<Backend>>,
    mem: GuestMemoryMmap,
    kicks: Vec<Option<Arc<EventFd>>>,
    calls: Vec<Option<Arc<EventFd>>>,
    /// Per queue: the backend signals the vector's irqfd itself (readable without the
    /// backend's lock, which a pause holds while it drains).
    direct: Box<[AtomicBool]>,
    interrupt: Arc<dyn VirtioInterrupt>,
}

impl QueueHandler for VhostUserHandler {
    /// A kick that exited (sync mode): signal the eventfd the backend waits on.
    fn process_queue(&self, queue: usize) {
        if let Some(Some(kick)) = self.kicks.get(queue) {
            if let Err(e) = kick.write(1) {
                log::warn!("vhost-user queue {queue}: cannot pass the kick on: {e}");
            }
        }
    }

    /// The backend polls its own rings; nothing to do here.
    fn poll_queue(&self, _queue: usize) -> bool {
        false
    }

    fn completion_fd(&self, queue: usize) -> Option<RawFd> {
        self.calls.get(queue)?.as_ref().map(|call| call.as_raw_fd())
    }

    fn process_completions(&self, queue: usize) {
        let Some(Some(call)) = self.calls.get(queue) else {
            return;
        };
        // The backend consulted EVENT_IDX before calling.
        if call.read().is_ok() {
            self.interrupt.signal_queue(queue);
        }
    }

    /// Pause lets the backend finish what it took, then stops its rings (GET_VRING_BASE: it
    /// takes nothing more from them);
    /// resume starts them again where they stopped and kicks each once, so a request made
    /// available around the pause does not wait for the guest's next kick.
    fn set_paused(&self, paused: bool) {
        let mut backend = self.backend.lock().unwrap();
        if backend.gone.load(Ordering::SeqCst) {
            return;
        }
        if paused {
            if !backend.drain(&self.mem) {
                log::warn!(
                    "{}: requests still in the backend after {PAUSE_DRAIN_TIMEOUT:?}; stopping \
                     its rings anyway",
                    backend.path.display()
                );
            }
            backend.stop();
            return;
        }
        if let Err(e) = backend.start() {
            log::warn!("vhost-user: cannot restart after a pause: {e}");
            self.interrupt.set_needs_reset();
            return;
        }
        for kick in self.kicks.iter().flatten() {
            let _ = kick.write(1);
        }
    }

    fn busy(&self, _queue: usize) -> bool {
        false
    }

    fn num_queues(&self) -> usize {
        self.kicks.len()
    }

    fn takes_direct_interrupts(&self) -> bool {
        true
    }

    /// Re-sends SET_VRING_CALL for each running ring whose route changed (a stopped ring
    /// gets its route when it starts). Between a guest masking a vector and the backend's
    /// ack, a completion may still reach the guest through the old irqfd.
    fn route_interrupts(&self, direct: Vec<Option<DirectInterrupt>>) {
        let mut backend = self.backend.lock().unwrap();
        if backend.gone.load(Ordering::SeqCst) {
            return;
        }
        let Backend {
            frontend, rings, ..
        } = &mut *backend;
        for (queue, wanted) in direct.into_iter().enumerate() {
            let Some(ring) = rings.iter_mut().find(|r| r.index == queue) else {
                continue;
            };
            if ring.direct.as_ref().map(|d| d.vector) == wanted.as_ref().map(|d| d.vector) {
                continue;
            }
            ring.direct = wanted;
            if let Some(flag) = self.direct.get(queue) {
                flag.store(ring.direct.is_some(), Ordering::Relaxed);
            }
            if ring.running {
                if let Err(e) = frontend.set_vring_call(queue, ring.call_fd()) {
                    log::warn!("vhost-user queue {queue}: SET_VRING_CALL failed: {e}");
                    self.interrupt.set_needs_reset();
                }
            }
        }
    }

    fn interrupts_direct(&self, queue: usize) -> bool {
        self.direct
            .get(queue)
            .is_some_and(|d| d.load(Ordering::Relaxed))
    }
}
