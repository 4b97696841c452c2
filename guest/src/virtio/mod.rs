//! virtio-pci: the modern transport (virtio 1.x capabilities in memory BARs)
//! and the legacy one (virtio 0.9.5 registers in I/O BAR0).

pub mod queue;

use crate::paging;
use crate::pci::{Function, Msix, CAP_VENDOR};
use crate::x86::{
    inb, inl, inw, mmio_read16, mmio_read32, mmio_read8, mmio_write16, mmio_write32, mmio_write8,
    outb, outl, outw,
};

pub const VENDOR_ID: u16 = 0x1AF4;

pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

pub const F_INDIRECT_DESC: u64 = 1 << 28;
pub const F_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;

/// "No MSI-X vector" for config and queue vector registers.
pub const NO_VECTOR: u16 = 0xFFFF;

/// How a driver learns that the device used its buffers (`completion=`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// Spinning on the used ring.
    Poll,
    /// By the queue's interrupt: MSI-X, or the function's INTx line (`irq=`).
    Irq,
}

/// Which interrupt a queue completed by interrupt uses (`irq=`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum IrqSource {
    /// One MSI-X vector per queue.
    Msix,
    /// The function's level-triggered INTx line, through the IOAPIC, with the
    /// ISR read in the interrupt handler: what a guest without MSI-X does.
    Intx,
}

impl IrqSource {
    pub fn name(self) -> &'static str {
        match self {
            IrqSource::Msix => "msix",
            IrqSource::Intx => "intx",
        }
    }
}

impl Completion {
    pub fn name(self) -> &'static str {
        match self {
            Completion::Poll => "poll",
            Completion::Irq => "irq",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Modern,
    Legacy,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Modern => "modern",
            Kind::Legacy => "legacy",
        }
    }
}

#[derive(Clone, Copy)]
enum Regs {
    Modern {
        common: u64,
        notify: u64,
        notify_multiplier: u32,
        device: u64,
        isr: u64,
    },
    Legacy {
        io: u16,
    },
}

// Modern common configuration offsets.
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0C;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1A;
const QUEUE_ENABLE: u64 = 0x1C;
const QUEUE_NOTIFY_OFF: u64 = 0x1E;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;

// Legacy I/O register offsets.
const L_HOST_FEATURES: u16 = 0;
const L_GUEST_FEATURES: u16 = 4;
const L_QUEUE_PFN: u16 = 8;
const L_QUEUE_SIZE: u16 = 12;
const L_QUEUE_SELECT: u16 = 14;
pub const L_QUEUE_NOTIFY: u16 = 16;
const L_STATUS: u16 = 18;
const L_ISR: u16 = 19;
const L_CONFIG_VECTOR: u16 = 20;
const L_QUEUE_VECTOR: u16 = 22;
const L_CONFIG: u16 = 20;
const L_CONFIG_MSIX: u16 = 24;

// Capability cfg_type values.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;

/// Where a queue's kick goes.
#[derive(Clone, Copy)]
pub enum Doorbell {
    Mmio(u64),
    Port(u16),
}

impl Doorbell {
    pub fn ring(self, queue: u16) {
        match self {
            Doorbell::Mmio(addr) => mmio_write16(addr, queue),
            Doorbell::Port(port) => outw(port, queue),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Error {
    NoModernTransport,
    NoLegacyTransport,
    FeaturesRejected,
    QueueMissing,
    QueueTooSmall,
    OutOfMemory,
    MsixMissing,
    MsixVectorRejected,
    NoIntxLine,
    BarsNotMoved,
    DeviceFailed,
}

impl Error {
    pub fn reason(self) -> &'static str {
        match self {
            Error::NoModernTransport => "no-modern-transport",
            Error::NoLegacyTransport => "no-legacy-transport",
            Error::FeaturesRejected => "features-rejected",
            Error::QueueMissing => "queue-missing",
            Error::QueueTooSmall => "queue-too-small",
            Error::OutOfMemory => "out-of-memory",
            Error::MsixMissing => "msix-missing",
            Error::MsixVectorRejected => "msix-vector-rejected",
            Error::NoIntxLine => "no-intx-line",
            Error::BarsNotMoved => "bars-not-moved",
            Error::DeviceFailed => "device-failed",
        }
    }
}

pub struct Transport {
    pub kind: Kind,
    regs: Regs,
    pub function: Function,
    msix_enabled: bool,
}

fn bar_address(f: &Function, bar: u8, offset: u32, length: u32) -> Option<u64> {
    let b = f.bars.get(bar as usize)?;
    if b.io || b.addr == 0 || offset as u64 + length as u64 > b.size {
        return None;
    }
    let addr = b.addr + offset as u64;
    paging::map_device(addr, length as u64).then_some(addr)
}

impl Transport {
    pub fn new(function: Function, kind: Kind) -> Result<Transport, Error> {
        let regs = match kind {
            Kind::Modern => {
                let (mut common, mut notify, mut device, mut isr, mut multiplier) =
                    (None, None, None, None, 0);
                for cap in function.capabilities(CAP_VENDOR) {
                    let a = function.addr;
                    let cfg_type = a.read8(cap + 3);
                    let bar = a.read8(cap + 4);
                    let offset = a.read32(cap + 8);
                    let length = a.read32(cap + 12);
                    // The first capability of each type is the preferred one.
                    match cfg_type {
                        CAP_COMMON if common.is_none() => {
                            common = bar_address(&function, bar, offset, length)
                        }
                        CAP_NOTIFY if notify.is_none() => {
                            notify = bar_address(&function, bar, offset, length);
                            multiplier = a.read32(cap + 16);
                        }
                        CAP_DEVICE if device.is_none() => {
                            device = bar_address(&function, bar, offset, length)
                        }
                        CAP_ISR if isr.is_none() => isr = bar_address(&function, bar, offset, 1),
                        _ => {}
                    }
                }
                match (common, notify, device, isr) {
                    (Some(common), Some(notify), Some(device), Some(isr)) => Regs::Modern {
                        common,
                        notify,
                        notify_multiplier: multiplier,
                        device,
                        isr,
                    },
                    _ => return Err(Error::NoModernTransport),
                }
            }
            Kind::Legacy => {
                let bar = function.bars[0];
                if !bar.io || bar.addr == 0 {
                    return Err(Error::NoLegacyTransport);
                }
                Regs::Legacy {
                    io: bar.addr as u16,
                }
            }
        };
        Ok(Transport {
            kind,
            regs,
            function,
            msix_enabled: false,
        })
    }

    /// Where the registers are: the common config's address (modern) or the
    /// I/O port base (legacy), for reports.
    pub fn registers(&self) -> u64 {
        match self.regs {
            Regs::Modern { common, .. } => common,
            Regs::Legacy { io } => io as u64,
        }
    }

    /// The ISR status register, as the INTx interrupt stub reads it (an MMIO
    /// address, or the port marked with `INTX_SOURCE_PORT`).
    pub fn isr_source(&self) -> u64 {
        match self.regs {
            Regs::Modern { isr, .. } => isr,
            Regs::Legacy { io } => crate::boot::INTX_SOURCE_PORT | u64::from(io + L_ISR),
        }
    }

    pub fn status(&self) -> u8 {
        match self.regs {
            Regs::Modern { common, .. } => mmio_read8(common + DEVICE_STATUS),
            Regs::Legacy { io } => inb(io + L_STATUS),
        }
    }

    fn write_status(&self, status: u8) {
        match self.regs {
            Regs::Modern { common, .. } => mmio_write8(common + DEVICE_STATUS, status),
            Regs::Legacy { io } => outb(io + L_STATUS, status),
        }
    }

    /// Resets the device and waits until it reads back reset.
    pub fn reset(&self) {
        self.write_status(0);
        for _ in 0..1_000_000 {
            if self.status() == 0 {
                break;
            }
            crate::x86::pause();
        }
    }

    /// Adds one status bit; the spec orders them and some VMMs
    /// (Firecracker) refuse several at once.
    pub fn add_status(&self, bit: u8) {
        let status = self.status();
        self.write_status(status | bit);
    }

    pub fn device_features(&self) -> u64 {
        match self.regs {
            Regs::Modern { common, .. } => {
                mmio_write32(common + DEVICE_FEATURE_SELECT, 0);
                let low = mmio_read32(common + DEVICE_FEATURE) as u64;
                mmio_write32(common + DEVICE_FEATURE_SELECT, 1);
                let high = mmio_read32(common + DEVICE_FEATURE) as u64;
                low | high << 32
            }
            Regs::Legacy { io } => inl(io + L_HOST_FEATURES) as u64,
        }
    }

    /// Writes the driver's features and, for modern, sets FEATURES_OK and
    /// checks the device kept it.
    pub fn negotiate(&self, features: u64) -> Result<(), Error> {
        match self.regs {
            Regs::Modern { common, .. } => {
                mmio_write32(common + DRIVER_FEATURE_SELECT, 0);
                mmio_write32(common + DRIVER_FEATURE, features as u32);
                mmio_write32(common + DRIVER_FEATURE_SELECT, 1);
                mmio_write32(common + DRIVER_FEATURE, (features >> 32) as u32);
                self.add_status(STATUS_FEATURES_OK);
                if self.status() & STATUS_FEATURES_OK == 0 {
                    return Err(Error::FeaturesRejected);
                }
            }
            Regs::Legacy { io } => outl(io + L_GUEST_FEATURES, features as u32),
        }
        Ok(())
    }

    /// Features the transport itself needs on top of the device's.
    pub fn required_features(&self) -> u64 {
        match self.kind {
            Kind::Modern => F_VERSION_1,
            Kind::Legacy => 0,
        }
    }

    pub fn num_queues(&self) -> u16 {
        match self.regs {
            Regs::Modern { common, .. } => mmio_read16(common + NUM_QUEUES),
            Regs::Legacy { .. } => u16::MAX,
        }
    }

    /// Selects a queue and returns its maximum (modern) or fixed (legacy)
    /// size; 0 if the queue does not exist.
    pub fn queue_max_size(&self, index: u16) -> u16 {
        match self.regs {
            Regs::Modern { common, .. } => {
                mmio_write16(common + QUEUE_SELECT, index);
                mmio_read16(common + QUEUE_SIZE)
            }
            Regs::Legacy { io } => {
                outw(io + L_QUEUE_SELECT, index);
                inw(io + L_QUEUE_SIZE)
            }
        }
    }

    /// Enables MSI-X on the function (it moves legacy device config).
    pub fn enable_msix(&mut self, msix: &Msix) {
        msix.enable(&self.function);
        self.msix_enabled = true;
        match self.regs {
            Regs::Modern { common, .. } => mmio_write16(common + CONFIG_MSIX_VECTOR, NO_VECTOR),
            Regs::Legacy { io } => outw(io + L_CONFIG_VECTOR, NO_VECTOR),
        }
    }

    /// Programs queue `index` (size, ring addresses, MSI-X vector), enables
    /// it and returns its doorbell.
    pub fn activate_queue(
        &self,
        index: u16,
        q: &queue::Layout,
        msix_entry: u16,
    ) -> Result<Doorbell, Error> {
        match self.regs {
            Regs::Modern { common, .. } => {
                mmio_write16(common + QUEUE_SELECT, index);
                mmio_write16(common + QUEUE_SIZE, q.size);
                let write64 = |off: u64, v: u64| {
                    mmio_write32(common + off, v as u32);
                    mmio_write32(common + off + 4, (v >> 32) as u32);
                };
                write64(QUEUE_DESC, q.desc);
                write64(QUEUE_DRIVER, q.avail);
                write64(QUEUE_DEVICE, q.used);
                if self.msix_enabled {
                    mmio_write16(common + QUEUE_MSIX_VECTOR, msix_entry);
                    if mmio_read16(common + QUEUE_MSIX_VECTOR) != msix_entry {
                        return Err(Error::MsixVectorRejected);
                    }
                }
                mmio_write16(common + QUEUE_ENABLE, 1);
                Ok(self.doorbell(index))
            }
            Regs::Legacy { io } => {
                outw(io + L_QUEUE_SELECT, index);
                if self.msix_enabled {
                    outw(io + L_QUEUE_VECTOR, msix_entry);
                    if inw(io + L_QUEUE_VECTOR) != msix_entry {
                        return Err(Error::MsixVectorRejected);
                    }
                }
                outl(io + L_QUEUE_PFN, (q.desc >> 12) as u32);
                Ok(self.doorbell(index))
            }
        }
    }

    /// Where queue `index`'s kicks go, at the registers' current addresses.
    pub fn doorbell(&self, index: u16) -> Doorbell {
        match self.regs {
            Regs::Modern {
                common,
                notify,
                notify_multiplier,
                ..
            } => {
                mmio_write16(common + QUEUE_SELECT, index);
                let notify_off = mmio_read16(common + QUEUE_NOTIFY_OFF);
                Doorbell::Mmio(notify + notify_off as u64 * notify_multiplier as u64)
            }
            Regs::Legacy { io } => Doorbell::Port(io + L_QUEUE_NOTIFY),
        }
    }

    /// The same device after its BARs moved (`function` holds the new addresses): the
    /// registers are found again where they now are.
    pub fn moved(&self, function: Function) -> Result<Transport, Error> {
        let mut moved = Transport::new(function, self.kind)?;
        moved.msix_enabled = self.msix_enabled;
        Ok(moved)
    }

    fn config_generation(&self) -> u8 {
        match self.regs {
            Regs::Modern { common, .. } => mmio_read8(common + CONFIG_GENERATION),
            Regs::Legacy { .. } => 0,
        }
    }

    fn read_config_raw(&self, offset: u16, width: u8) -> u32 {
        match self.regs {
            Regs::Modern { device, .. } => {
                let a = device + offset as u64;
                match width {
                    1 => mmio_read8(a) as u32,
                    2 => mmio_read16(a) as u32,
                    _ => mmio_read32(a),
                }
            }
            Regs::Legacy { io } => {
                let base = if self.msix_enabled {
                    L_CONFIG_MSIX
                } else {
                    L_CONFIG
                };
                let port = io + base + offset;
                match width {
                    1 => inb(port) as u32,
                    2 => inw(port) as u32,
                    _ => inl(port),
                }
            }
        }
    }

    /// Reads device config; retried until the generation is stable.
    pub fn read_config(&self, offset: u16, width: u8) -> u32 {
        loop {
            let before = self.config_generation();
            let value = self.read_config_raw(offset, width);
            if self.config_generation() == before {
                return value;
            }
        }
    }

    pub fn read_config64(&self, offset: u16) -> u64 {
        loop {
            let before = self.config_generation();
            let low = self.read_config_raw(offset, 4) as u64;
            let high = self.read_config_raw(offset + 4, 4) as u64;
            if self.config_generation() == before {
                return low | high << 32;
            }
        }
    }
}
