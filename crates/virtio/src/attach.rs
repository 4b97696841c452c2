//! The VMM's entry point to PCI and virtio: [`PciDevices`] puts the PCI root on the port-I/O
//! bus, owns GSI routing and the ioeventfd registrar, and creates and attaches devices.
//!
//! ```text
//! let mut pci = PciDevices::new(vm_fd.clone(), memory.clone(), pio_bus.clone(), mmio_bus.clone(),
//!                               PciOptions::default())?;
//! for disk in &config.disks {            // Vec<BlkConfig>, parsed from each --disk
//!     pci.add_disk(disk)?;
//! }
//! // keep `pci` alive for the VM's life; pci.device("disk0") for the control API
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::GuestMemoryMmap;
use kickvm_block::{BlockError, DiskImage, DiskOptions};
use kickvm_bus::{Bus, BusError};
use kickvm_pci::{
    BarAllocator, GsiRouter, IrqChip, IrqError, PciConfigIo, PciDevice, PciError, PciRoot,
    PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_LEN,
};

use crate::blk::{BlkDeviceError, BlkOptions, VirtioBlk};
use crate::config::BlkConfig;
use crate::device::VirtioDevice;
use crate::ioevent::{CappedRegistrar, IoeventRegistrar};
use crate::net::{
    IoeventfdPolicy, NetConfig, NetDeviceError, NetOptions, Tap, TapError, VirtioNet,
    DEFAULT_POLL_US, DEFAULT_REPLY_POLL_US,
};
use crate::pause::PauseRequests;
use crate::snapshot::{PciDeviceSnapshot, PciSnapshot, SnapshotError, SNAPSHOT_VERSION};
use crate::transport::{TransportError, TransportKind, TransportOptions, VirtioPciDevice};
use crate::vhost_user::VhostUserBlk;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("cannot put the PCI configuration ports on the I/O bus: {0}")]
    ConfigPorts(BusError),
    #[error("cannot install the GSI routing table: {0}")]
    Routing(IrqError),
    #[error("disk {id}: {source}")]
    Image { id: String, source: BlockError },
    #[error("disk {id}: {source}")]
    VhostUser {
        id: String,
        source: crate::vhost_user::VhostUserError,
    },
    #[error("disk {id}: {source}")]
    Device { id: String, source: BlkDeviceError },
    #[error("{kind} {id}: {source}")]
    Plug {
        kind: &'static str,
        id: String,
        source: PlugError,
    },
    #[error("two devices are called `{0}`")]
    DuplicateId(String),
    #[error("cannot create the pause-request eventfd: {0}")]
    PauseEvent(std::io::Error),
    #[error(
        "disk {id}: {path} is already disk {other} of this VM; one image cannot back two disks"
    )]
    SameImage {
        id: String,
        path: std::path::PathBuf,
        other: String,
    },
    #[error("net {id}: {source}")]
    Tap { id: String, source: TapError },
    #[error("net {id}: {source}")]
    NetDevice { id: String, source: NetDeviceError },
}

/// Why a built device could not be put on the PCI bus.
#[derive(Debug, thiserror::Error)]
pub enum PlugError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Pci(#[from] PciError),
}

/// How a device is plugged: its transport, notify mode and I/O thread poll.
struct PlugOptions {
    kind: TransportKind,
    ioeventfd: bool,
    poll_us: u32,
}

/// VM-wide PCI options.
#[derive(Debug, Clone, Copy, Default)]
pub struct PciOptions {
    /// `--max-ioeventfds N`: refuse registrations beyond N, as a kernel with a small I/O bus
    /// would; devices that hit it stay in sync mode.
    pub max_ioeventfds: Option<usize>,
    /// Give devices INTx lines (level, resample) for guests without MSI-X.
    pub intx: bool,
    /// The VM's vCPU count (0: unknown). When the vCPUs alone can occupy every host CPU the
    /// device I/O threads ask for a higher priority than the vCPUs (see `io_thread.rs`).
    pub vcpus: usize,
}

impl PciOptions {
    fn io_priority_boost(&self) -> bool {
        self.vcpus > 0 && self.vcpus >= crate::io_thread::host_cpus()
    }
}

pub type SharedVirtioDevice = Arc<Mutex<VirtioPciDevice>>;

pub struct PciDevices {
    root: Arc<Mutex<PciRoot>>,
    allocator: BarAllocator,
    router: Arc<GsiRouter>,
    registrar: Arc<dyn IoeventRegistrar>,
    mem: GuestMemoryMmap,
    options: PciOptions,
    devices: Vec<(String, SharedVirtioDevice)>,
    /// Each device's slot, in `devices`' order.
    slots: Vec<u8>,
    /// The CONFIG_ADDRESS latch, kept for snapshots.
    config_io: Arc<Mutex<PciConfigIo>>,
    /// The images the disks opened, by identity, with the disk's id.
    images: Vec<(ImageIdentity, String)>,
    /// Where devices ask the VMM to pause the VM.
    pause_requests: Arc<PauseRequests>,
    disks: usize,
    nets: usize,
}

/// What makes two paths the same image: the file (device and inode), or for a block device
/// the device itself, whichever node names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ImageIdentity {
    File { dev: u64, ino: u64 },
    BlockDevice { rdev: u64 },
}

impl ImageIdentity {
    /// `None` if the path cannot be looked at (opening it then says why).
    fn of(path: &std::path::Path) -> Option<Self> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let meta = std::fs::metadata(path).ok()?;
        Some(if meta.file_type().is_block_device() {
            ImageIdentity::BlockDevice { rdev: meta.rdev() }
        } else {
            ImageIdentity::File {
                dev: meta.dev(),
                ino: meta.ino(),
            }
        })
    }
}

impl PciDevices {
    /// On KVM: irqfds, GSI routing and ioeventfds go to `vm` (which must have an in-kernel
    /// irqchip).
    pub fn new(
        vm: Arc<kvm_ioctls::VmFd>,
        mem: GuestMemoryMmap,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        options: PciOptions,
    ) -> Result<Self, AttachError> {
        Self::with_backends(vm.clone(), vm, mem, pio, mmio, options)
    }

    /// With any irqchip and ioeventfd implementation (tests use mocks).
    pub fn with_backends(
        chip: Arc<dyn IrqChip>,
        registrar: Arc<dyn IoeventRegistrar>,
        mem: GuestMemoryMmap,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        options: PciOptions,
    ) -> Result<Self, AttachError> {
        let root = Arc::new(Mutex::new(PciRoot::new(pio.clone(), mmio)));
        let config_io = Arc::new(Mutex::new(PciConfigIo::new(&root)));
        pio.insert(config_io.clone(), PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_LEN)
            .map_err(AttachError::ConfigPorts)?;
        let router = Arc::new(GsiRouter::new(chip));
        router.install().map_err(AttachError::Routing)?;
        let registrar: Arc<dyn IoeventRegistrar> = match options.max_ioeventfds {
            Some(max) => Arc::new(CappedRegistrar::new(registrar, max)),
            None => registrar,
        };
        Ok(Self {
            root,
            allocator: BarAllocator::default(),
            router,
            registrar,
            mem,
            options,
            devices: Vec::new(),
            slots: Vec::new(),
            config_io,
            images: Vec::new(),
            pause_requests: Arc::new(PauseRequests::new().map_err(AttachError::PauseEvent)?),
            disks: 0,
            nets: 0,
        })
    }

    /// Where devices ask for the VM to be paused (the main loop watches it).
    pub fn pause_requests(&self) -> &Arc<PauseRequests> {
        &self.pause_requests
    }

    /// The GSI routing owner: anything else that needs MSI routes must go through it.
    pub fn router(&self) -> &Arc<GsiRouter> {
        &self.router
    }

    pub fn root(&self) -> &Arc<Mutex<PciRoot>> {
        &self.root
    }

    /// Opens the image (or connects to the vhost-user backend), builds a virtio-blk device behind
    /// a virtio-pci transport, and places it in the next free slot with its BARs mapped.
    /// Returns the device's id.
    pub fn add_disk(&mut self, config: &BlkConfig) -> Result<String, AttachError> {
        let id = config
            .id
            .clone()
            .unwrap_or_else(|| format!("disk{}", self.disks));
        if self.device(&id).is_some() {
            return Err(AttachError::DuplicateId(id));
        }
        // Its own lock would refuse the second open too, but as "another process".
        let image = config
            .vhost_user
            .is_none()
            .then(|| ImageIdentity::of(&config.path))
            .flatten();
        if let Some((_, other)) = self.images.iter().find(|(i, _)| Some(*i) == image) {
            return Err(AttachError::SameImage {
                id,
                path: config.path.clone(),
                other: other.clone(),
            });
        }
        let (device, backend, poll_us): (Box<dyn VirtioDevice>, String, u32) =
            match &config.vhost_user {
                // The backend runs the rings; guest memory must be shared (see `vhost_user`).
                Some(socket) => (
                    Box::new(
                        VhostUserBlk::connect(socket, config.queues, config.queue_size).map_err(
                            |source| AttachError::VhostUser {
                                id: id.clone(),
                                source,
                            },
                        )?,
                    ),
                    format!("vhost-user-blk {}", socket.display()),
                    0,
                ),
                None => (
                    Box::new(self.open_blk(&id, config)?),
                    config.path.display().to_string(),
                    config.poll_us,
                ),
            };
        let slot = self
            .plug(
                &id,
                device,
                PlugOptions {
                    kind: config.transport,
                    ioeventfd: config.ioeventfd,
                    poll_us,
                },
            )
            .map_err(|source| AttachError::Plug {
                kind: "disk",
                id: id.clone(),
                source,
            })?;
        log::info!(
            "{id}: {backend} at 00:{slot:02x}.0 ({}, ioeventfd={})",
            config.transport.name(),
            if config.ioeventfd { "on" } else { "off" }
        );
        if let Some(image) = image {
            self.images.push((image, id.clone()));
        }
        self.disks += 1;
        Ok(id)
    }

    fn open_blk(&self, id: &str, config: &BlkConfig) -> Result<VirtioBlk, AttachError> {
        let image = DiskImage::open(
            &config.path,
            DiskOptions {
                readonly: config.readonly,
                direct: config.direct,
                declared_raw: config.declared_raw,
                unlocked: !config.lock,
            },
        )
        .map_err(|source| AttachError::Image {
            id: id.to_string(),
            source,
        })?;
        VirtioBlk::new(
            Arc::new(image),
            BlkOptions {
                serial: config.serial.clone(),
                queues: config.queues,
                queue_size: config.queue_size,
                engine: config.engine,
                pause_on_no_space: config
                    .pause_on_no_space
                    .then(|| self.pause_requests.clone()),
            },
        )
        .map_err(|source| AttachError::Device {
            id: id.to_string(),
            source,
        })
    }

    /// Opens (or creates) the tap, builds a virtio-net device behind a virtio-pci transport,
    /// and places it in the next free slot. Returns the device's id.
    pub fn add_net(&mut self, config: &NetConfig) -> Result<String, AttachError> {
        let id = config
            .id
            .clone()
            .unwrap_or_else(|| format!("net{}", self.nets));
        if self.device(&id).is_some() {
            return Err(AttachError::DuplicateId(id));
        }
        let tap = Tap::open(&config.tap, usize::from(config.queues)).map_err(|source| {
            AttachError::Tap {
                id: id.clone(),
                source,
            }
        })?;
        let mac = config
            .mac
            .unwrap_or([0x52, 0x54, 0x00, 0x12, 0x34, 0x56 + self.nets as u8]);
        // on: ioeventfd (with the I/O thread's poll if poll_us > 0); off: sync exits; auto:
        // sync exits with TX bursts handed to the I/O thread (see `IoeventfdPolicy`).
        let (ioeventfd, poll_us, tx_inline, reply_us) = match config.ioeventfd {
            IoeventfdPolicy::On => (true, config.poll_us.unwrap_or(DEFAULT_POLL_US), None, 0),
            IoeventfdPolicy::Off => (false, 0, None, 0),
            IoeventfdPolicy::Auto => (
                false,
                0,
                (config.tx_inline > 0).then_some(usize::from(config.tx_inline)),
                config.poll_us.unwrap_or(DEFAULT_REPLY_POLL_US),
            ),
        };
        let net = VirtioNet::new(
            Arc::new(tap),
            NetOptions {
                mac,
                pairs: config.queues,
                queue_size: config.queue_size,
                tx_inline,
                reply_poll: Duration::from_micros(u64::from(reply_us)),
            },
        )
        .map_err(|source| AttachError::NetDevice {
            id: id.clone(),
            source,
        })?;
        let slot = self
            .plug(
                &id,
                Box::new(net),
                PlugOptions {
                    kind: config.transport,
                    ioeventfd,
                    poll_us,
                },
            )
            .map_err(|source| AttachError::Plug {
                kind: "net",
                id: id.clone(),
                source,
            })?;
        log::info!(
            "{id}: tap {} at 00:{slot:02x}.0 ({}, mac {}, {} queue pair(s), ioeventfd={})",
            config.tap,
            config.transport.name(),
            mac.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":"),
            config.queues,
            config.ioeventfd.name()
        );
        self.nets += 1;
        Ok(id)
    }

    /// Puts `device` behind a virtio-pci transport in the next free slot with its BARs mapped,
    /// under `id`. Returns the slot.
    fn plug(
        &mut self,
        id: &str,
        device: Box<dyn VirtioDevice>,
        options: PlugOptions,
    ) -> Result<u8, PlugError> {
        let slot = self.root.lock().unwrap().free_slot()?;
        let transport = VirtioPciDevice::new(
            id,
            device,
            self.mem.clone(),
            TransportOptions {
                kind: options.kind,
                ioeventfd: options.ioeventfd,
                poll: Duration::from_micros(u64::from(options.poll_us)),
                intx_gsi: self.options.intx.then(|| PciRoot::intx_gsi(slot)),
                io_priority_boost: self.options.io_priority_boost(),
            },
            self.router.clone(),
            self.registrar.clone(),
        )?;
        let transport = Arc::new(Mutex::new(transport));
        self.root
            .lock()
            .unwrap()
            .add_device(slot, transport.clone(), &mut self.allocator)?;
        self.devices.push((id.to_string(), transport));
        self.slots.push(slot);
        Ok(slot)
    }

    pub fn device(&self, id: &str) -> Option<SharedVirtioDevice> {
        self.devices
            .iter()
            .find(|(name, _)| name == id)
            .map(|(_, d)| d.clone())
    }

    pub fn devices(&self) -> impl Iterator<Item = (&str, &SharedVirtioDevice)> {
        self.devices.iter().map(|(id, d)| (id.as_str(), d))
    }

    /// VM pause: every device stops taking kicks and drains its requests in flight.
    pub fn pause_all(&self) {
        for (_, device) in &self.devices {
            device.lock().unwrap().pause();
        }
    }

    pub fn resume_all(&self) {
        for (_, device) in &self.devices {
            device.lock().unwrap().resume();
        }
    }

    /// The state of every PCI device (and the PCI root's config-address latch), for a
    /// snapshot. The VM must be paused ([`Self::pause_all`] has run, vCPUs parked, requests
    /// drained). Refused, naming the device: a vhost-user disk, a disk holding writes for want
    /// of host space (`enospc=pause`), a device not paused or with requests in flight.
    pub fn snapshot(&self) -> Result<PciSnapshot, SnapshotError> {
        let host_bridge = {
            let root = self.root.lock().unwrap();
            let bridge = root.device(0).expect("the host bridge is at 00:00.0");
            let config = bridge.lock().unwrap().config().snapshot();
            config
        };
        let mut devices = Vec::with_capacity(self.devices.len());
        for ((id, device), &slot) in self.devices.iter().zip(&self.slots) {
            let device = device.lock().unwrap();
            devices.push(PciDeviceSnapshot {
                id: id.clone(),
                slot,
                config: device.config().snapshot(),
                transport: device.snapshot()?,
            });
        }
        Ok(PciSnapshot {
            version: SNAPSHOT_VERSION,
            config_address: self.config_io.lock().unwrap().config_address(),
            host_bridge,
            devices,
        })
    }

    /// Applies a snapshot to devices freshly attached from the same configuration (same
    /// `--disk`/`--net` options, so the same ids, slots and BAR sizes), before any vCPU runs
    /// and after guest memory and the vCPUs' interrupt controllers are restored: devices that
    /// were active are kicked once on every queue, which may complete requests and interrupt.
    ///
    /// Everything is checked against the devices before anything changes (ids, slots, device
    /// types, transports, queues, features, BAR layouts); an error met after that (a BAR that
    /// cannot be mapped back, a device that cannot be activated) leaves the devices partly
    /// restored, and the VM must not run.
    pub fn restore(&mut self, snapshot: &PciSnapshot) -> Result<(), SnapshotError> {
        if snapshot.version != SNAPSHOT_VERSION {
            return Err(SnapshotError::Version(snapshot.version));
        }
        let mut pairs = Vec::with_capacity(snapshot.devices.len());
        for saved in &snapshot.devices {
            let index = self
                .devices
                .iter()
                .position(|(id, _)| *id == saved.id)
                .ok_or_else(|| SnapshotError::UnknownDevice(saved.id.clone()))?;
            if self.slots[index] != saved.slot {
                return Err(SnapshotError::Mismatch {
                    id: saved.id.clone(),
                    what: "PCI slot",
                    saved: format!("00:{:02x}.0", saved.slot),
                    actual: format!("00:{:02x}.0", self.slots[index]),
                });
            }
            let device = self.devices[index].1.clone();
            device.lock().unwrap().check_snapshot(&saved.transport)?;
            pairs.push((device, saved));
        }
        if let Some((id, _)) = self
            .devices
            .iter()
            .find(|(id, _)| !snapshot.devices.iter().any(|d| d.id == *id))
        {
            return Err(SnapshotError::MissingDevice(id.clone()));
        }
        let mut configs = vec![(0u8, &snapshot.host_bridge)];
        configs.extend(snapshot.devices.iter().map(|d| (d.slot, &d.config)));
        self.root.lock().unwrap().restore(&configs)?;
        for (device, saved) in pairs {
            device.lock().unwrap().restore(&saved.transport)?;
        }
        self.config_io
            .lock()
            .unwrap()
            .set_config_address(snapshot.config_address);
        Ok(())
    }
}
