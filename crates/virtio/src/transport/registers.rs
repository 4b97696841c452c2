//! The driver-visible register state shared by both flavours, and the two register layouts
//! over it: virtio 1.x common configuration and the virtio 0.9.5 legacy I/O BAR header.

use super::interrupt::PciInterrupt;

pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

/// Legacy queues are page-aligned rings at QUEUE_PFN * 4096.
const LEGACY_PAGE: u64 = 4096;
/// Legacy header without and with the MSI-X vector registers.
pub const LEGACY_HEADER: u64 = 0x14;
pub const LEGACY_HEADER_MSIX: u64 = 0x18;
pub const LEGACY_NOTIFY: u64 = 0x10;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueRegs {
    pub max_size: u16,
    pub size: u16,
    pub enabled: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub legacy_pfn: u32,
}

/// What a register write asks of the transport beyond storing a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    None,
    Status(u8),
    Notify(u16),
    /// A queue's MSI-X vector changed.
    QueueVector,
}

/// Also a device's snapshot of them (`crate::snapshot::TransportSnapshot`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Registers {
    pub device_features: u64,
    pub driver_features: u64,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub status: u8,
    pub queue_select: u16,
    pub config_generation: u8,
    pub queues: Vec<QueueRegs>,
}

impl Registers {
    pub fn new(device_features: u64, max_sizes: &[u16]) -> Self {
        Self {
            device_features,
            driver_features: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            status: 0,
            queue_select: 0,
            config_generation: 0,
            queues: max_sizes
                .iter()
                .map(|&max| QueueRegs {
                    max_size: max,
                    size: max,
                    ..Default::default()
                })
                .collect(),
        }
    }

    pub fn reset(&mut self) {
        *self = Self {
            config_generation: self.config_generation,
            ..Self::new(
                self.device_features,
                &self.queues.iter().map(|q| q.max_size).collect::<Vec<_>>(),
            )
        };
    }

    fn selected(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn selected_ref(&self) -> Option<&QueueRegs> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn features_writable(&self) -> bool {
        self.status & STATUS_FEATURES_OK == 0
    }
}

fn put(data: &mut [u8], value: u64) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = (value >> (8 * i)) as u8;
    }
}

fn get(data: &[u8]) -> u64 {
    data.iter()
        .enumerate()
        .fold(0, |acc, (i, b)| acc | (u64::from(*b) << (8 * i)))
}

fn set_half(target: &mut u64, high: bool, value: u32) {
    if high {
        *target = (*target & 0xffff_ffff) | (u64::from(value) << 32);
    } else {
        *target = (*target & !0xffff_ffff) | u64::from(value);
    }
}

/// virtio 1.x common configuration (`struct virtio_pci_common_cfg`). Accesses must match a
/// field's offset and width (or a 32-bit half of a 64-bit field); others read 0 / are ignored.
pub mod common {
    use super::*;

    pub fn read(regs: &Registers, interrupt: &PciInterrupt, offset: u64, data: &mut [u8]) {
        let q = regs.selected_ref();
        let len = data.len();
        let value: u64 = match (offset, len) {
            (0x00, 4) => u64::from(regs.device_feature_select),
            (0x04, 4) => match regs.device_feature_select {
                0 => regs.device_features & 0xffff_ffff,
                1 => regs.device_features >> 32,
                _ => 0,
            },
            (0x08, 4) => u64::from(regs.driver_feature_select),
            (0x0c, 4) => match regs.driver_feature_select {
                0 => regs.driver_features & 0xffff_ffff,
                1 => regs.driver_features >> 32,
                _ => 0,
            },
            (0x10, 2) => u64::from(interrupt.config_vector()),
            (0x12, 2) => regs.queues.len() as u64,
            (0x14, 1) => u64::from(
                regs.status
                    | if interrupt.needs_reset() {
                        STATUS_NEEDS_RESET
                    } else {
                        0
                    },
            ),
            (0x15, 1) => u64::from(regs.config_generation),
            (0x16, 2) => u64::from(regs.queue_select),
            (0x18, 2) => q.map_or(0, |q| u64::from(q.size)),
            (0x1a, 2) => {
                if q.is_some() {
                    u64::from(interrupt.queue_vector(usize::from(regs.queue_select)))
                } else {
                    0xffff
                }
            }
            (0x1c, 2) => q.map_or(0, |q| u64::from(q.enabled)),
            (0x1e, 2) => q.map_or(0, |_| u64::from(regs.queue_select)),
            (0x20, 8) => q.map_or(0, |q| q.desc),
            (0x20, 4) => q.map_or(0, |q| q.desc & 0xffff_ffff),
            (0x24, 4) => q.map_or(0, |q| q.desc >> 32),
            (0x28, 8) => q.map_or(0, |q| q.avail),
            (0x28, 4) => q.map_or(0, |q| q.avail & 0xffff_ffff),
            (0x2c, 4) => q.map_or(0, |q| q.avail >> 32),
            (0x30, 8) => q.map_or(0, |q| q.used),
            (0x30, 4) => q.map_or(0, |q| q.used & 0xffff_ffff),
            (0x34, 4) => q.map_or(0, |q| q.used >> 32),
            _ => {
                log::debug!("virtio common cfg: {len}-byte read at {offset:#x} ignored");
                0
            }
        };
        put(data, value);
    }

    pub fn write(
        regs: &mut Registers,
        interrupt: &PciInterrupt,
        offset: u64,
        data: &[u8],
    ) -> Effect {
        let value = get(data);
        let queue_index = usize::from(regs.queue_select);
        // Queue addresses and size are fixed once the queue is enabled.
        let queue_editable = regs.selected_ref().is_some_and(|q| !q.enabled);
        match (offset, data.len()) {
            (0x00, 4) => regs.device_feature_select = value as u32,
            (0x08, 4) => regs.driver_feature_select = value as u32,
            (0x0c, 4) if regs.features_writable() => match regs.driver_feature_select {
                0 => set_half(&mut regs.driver_features, false, value as u32),
                1 => set_half(&mut regs.driver_features, true, value as u32),
                _ => {}
            },
            (0x10, 2) => interrupt.set_config_vector(value as u16),
            (0x14, 1) => return Effect::Status(value as u8),
            (0x16, 2) => regs.queue_select = value as u16,
            (0x18, 2) if queue_editable => regs.selected().unwrap().size = value as u16,
            (0x1a, 2) => {
                interrupt.set_queue_vector(queue_index, value as u16);
                return Effect::QueueVector;
            }
            (0x1c, 2) => {
                if let Some(q) = regs.selected() {
                    // Writing 0 is not allowed to the driver; only a reset disables a queue.
                    if value == 1 {
                        q.enabled = true;
                    }
                }
            }
            (0x20, 8) if queue_editable => regs.selected().unwrap().desc = value,
            (0x20, 4) | (0x24, 4) if queue_editable => set_half(
                &mut regs.selected().unwrap().desc,
                offset == 0x24,
                value as u32,
            ),
            (0x28, 8) if queue_editable => regs.selected().unwrap().avail = value,
            (0x28, 4) | (0x2c, 4) if queue_editable => set_half(
                &mut regs.selected().unwrap().avail,
                offset == 0x2c,
                value as u32,
            ),
            (0x30, 8) if queue_editable => regs.selected().unwrap().used = value,
            (0x30, 4) | (0x34, 4) if queue_editable => set_half(
                &mut regs.selected().unwrap().used,
                offset == 0x34,
                value as u32,
            ),
            (offset, len) => {
                log::debug!("virtio common cfg: {len}-byte write at {offset:#x} ignored")
            }
        }
        Effect::None
    }
}

/// The virtio 0.9.5 header at the start of the legacy I/O BAR. Device configuration follows
/// it at [`legacy::config_offset`].
pub mod legacy {
    use super::*;

    pub fn config_offset(msix_enabled: bool) -> u64 {
        if msix_enabled {
            LEGACY_HEADER_MSIX
        } else {
            LEGACY_HEADER
        }
    }

    pub fn read(
        regs: &Registers,
        interrupt: &PciInterrupt,
        msix_enabled: bool,
        offset: u64,
        data: &mut [u8],
    ) {
        let q = regs.selected_ref();
        let value: u64 = match (offset, data.len()) {
            // Legacy drivers see the low 32 feature bits; VERSION_1 (bit 32) is never offered.
            (0x00, 4) => regs.device_features & 0xffff_ffff,
            (0x04, 4) => regs.driver_features & 0xffff_ffff,
            (0x08, 4) => q.map_or(0, |q| u64::from(q.legacy_pfn)),
            (0x0c, 2) => q.map_or(0, |q| u64::from(q.max_size)),
            (0x0e, 2) => u64::from(regs.queue_select),
            (0x12, 1) => u64::from(
                regs.status
                    | if interrupt.needs_reset() {
                        STATUS_NEEDS_RESET
                    } else {
                        0
                    },
            ),
            (0x13, 1) => u64::from(interrupt.read_isr()),
            (0x14, 2) if msix_enabled => u64::from(interrupt.config_vector()),
            (0x16, 2) if msix_enabled => {
                if q.is_some() {
                    u64::from(interrupt.queue_vector(usize::from(regs.queue_select)))
                } else {
                    0xffff
                }
            }
            _ => 0,
        };
        put(data, value);
    }

    pub fn write(
        regs: &mut Registers,
        interrupt: &PciInterrupt,
        msix_enabled: bool,
        offset: u64,
        data: &[u8],
    ) -> Effect {
        let value = get(data);
        match (offset, data.len()) {
            (0x04, 4) if regs.status & STATUS_DRIVER_OK == 0 => {
                regs.driver_features = value & 0xffff_ffff
            }
            (0x08, 4) => {
                if let Some(q) = regs.selected() {
                    set_pfn(q, value as u32);
                }
            }
            (0x0e, 2) => regs.queue_select = value as u16,
            (LEGACY_NOTIFY, 2) => return Effect::Notify(value as u16),
            (0x12, 1) => return Effect::Status(value as u8),
            (0x14, 2) if msix_enabled => interrupt.set_config_vector(value as u16),
            (0x16, 2) if msix_enabled => {
                interrupt.set_queue_vector(usize::from(regs.queue_select), value as u16);
                return Effect::QueueVector;
            }
            (offset, len) => log::debug!("virtio legacy: {len}-byte write at {offset:#x} ignored"),
        }
        Effect::None
    }

    /// A legacy queue always has its maximum size and the 0.9.5 layout: descriptors, then the
    /// available ring, then the used ring on the next page boundary.
    fn set_pfn(q: &mut QueueRegs, pfn: u32) {
        q.legacy_pfn = pfn;
        if pfn == 0 {
            q.enabled = false;
            return;
        }
        let size = u64::from(q.max_size);
        q.size = q.max_size;
        q.desc = u64::from(pfn) * LEGACY_PAGE;
        q.avail = q.desc + 16 * size;
        q.used = (q.avail + 6 + 2 * size).next_multiple_of(LEGACY_PAGE);
        q.enabled = true;
    }
}
