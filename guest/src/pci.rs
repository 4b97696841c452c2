//! PCI bus 0 through type-1 configuration access (0xCF8/0xCFC), BAR sizing
//! and assignment, capabilities and MSI-X.

use crate::sync::SpinLock;
use crate::x86::{inb, inl, inw, outl, outw};
use crate::{paging, x86};

const CONFIG_ADDRESS: u16 = 0xCF8;
const CONFIG_DATA: u16 = 0xCFC;

pub const COMMAND: u8 = 0x04;
pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Configuration space offset of the Interrupt Line register.
pub const INTERRUPT_LINE: u8 = 0x3C;
const STATUS: u8 = 0x06;
const STATUS_CAPABILITIES: u16 = 1 << 4;
const HEADER_TYPE: u8 = 0x0E;
const BAR0: u8 = 0x10;
const CAPABILITIES_POINTER: u8 = 0x34;

pub const CAP_MSIX: u8 = 0x11;
pub const CAP_VENDOR: u8 = 0x09;

/// BARs the firmware left unassigned get addresses from these windows.
const MMIO_WINDOW: (u64, u64) = (0xC000_0000, 0xFC00_0000);
const IO_WINDOW: (u64, u64) = (0xC000, 0x1_0000);

/// One config access is two port accesses: CPUs must not interleave them.
static CONFIG_LOCK: SpinLock<()> = SpinLock::new(());

#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Address {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl Address {
    fn config_address(self, offset: u8) -> u32 {
        0x8000_0000
            | (self.bus as u32) << 16
            | (self.device as u32) << 11
            | (self.function as u32) << 8
            | (offset as u32 & 0xFC)
    }

    pub fn read32(self, offset: u8) -> u32 {
        let _guard = CONFIG_LOCK.lock();
        outl(CONFIG_ADDRESS, self.config_address(offset));
        inl(CONFIG_DATA)
    }

    pub fn read16(self, offset: u8) -> u16 {
        let _guard = CONFIG_LOCK.lock();
        outl(CONFIG_ADDRESS, self.config_address(offset));
        inw(CONFIG_DATA + (offset as u16 & 2))
    }

    pub fn read8(self, offset: u8) -> u8 {
        let _guard = CONFIG_LOCK.lock();
        outl(CONFIG_ADDRESS, self.config_address(offset));
        inb(CONFIG_DATA + (offset as u16 & 3))
    }

    pub fn write32(self, offset: u8, value: u32) {
        let _guard = CONFIG_LOCK.lock();
        outl(CONFIG_ADDRESS, self.config_address(offset));
        outl(CONFIG_DATA, value);
    }

    pub fn write16(self, offset: u8, value: u16) {
        let _guard = CONFIG_LOCK.lock();
        outl(CONFIG_ADDRESS, self.config_address(offset));
        outw(CONFIG_DATA + (offset as u16 & 2), value);
    }
}

impl core::fmt::Display for Address {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

#[derive(Clone, Copy, Default)]
pub struct Bar {
    pub addr: u64,
    pub size: u64,
    pub io: bool,
}

#[derive(Clone, Copy)]
pub struct Function {
    pub addr: Address,
    pub vendor: u16,
    pub device: u16,
    pub bars: [Bar; 6],
}

impl Function {
    /// Offsets of the capabilities with this id, in list order.
    pub fn capabilities(&self, id: u8) -> impl Iterator<Item = u8> + '_ {
        let has_list = self.addr.read16(STATUS) & STATUS_CAPABILITIES != 0;
        let mut next = if has_list {
            self.addr.read8(CAPABILITIES_POINTER) & 0xFC
        } else {
            0
        };
        let mut budget = 48; // a looping list must not hang the guest
        core::iter::from_fn(move || {
            while next >= 0x40 && budget > 0 {
                budget -= 1;
                let at = next;
                next = self.addr.read8(at + 1) & 0xFC;
                if self.addr.read8(at) == id {
                    return Some(at);
                }
            }
            None
        })
    }

    pub fn set_command_bits(&self, set: u16, clear: u16) {
        let command = self.addr.read16(COMMAND);
        self.addr.write16(COMMAND, (command | set) & !clear);
    }
}

struct Windows {
    mmio_next: u64,
    io_next: u64,
}

/// Up to this many functions are recorded.
pub const MAX_FUNCTIONS: usize = 64;

pub struct Bus {
    pub functions: [Option<Function>; MAX_FUNCTIONS],
    pub count: usize,
}

fn size_bar(addr: Address, index: usize) -> (Bar, bool) {
    let offset = BAR0 + 4 * index as u8;
    let original = addr.read32(offset);
    let io = original & 1 != 0;
    let is64 = !io && (original >> 1) & 3 == 2;
    addr.write32(offset, 0xFFFF_FFFF);
    let low_mask = addr.read32(offset);
    addr.write32(offset, original);
    let mut high_original = 0;
    let mut high_mask = 0;
    if is64 {
        high_original = addr.read32(offset + 4);
        addr.write32(offset + 4, 0xFFFF_FFFF);
        high_mask = addr.read32(offset + 4);
        addr.write32(offset + 4, high_original);
    }
    let (base, mask) = if io {
        (
            (original & !3) as u64,
            (low_mask & !3) as u64 | 0xFFFF_FFFF_0000_0000,
        )
    } else {
        let base = (original & !0xF) as u64 | (high_original as u64) << 32;
        let mask = (low_mask & !0xF) as u64
            | if is64 {
                (high_mask as u64) << 32
            } else {
                0xFFFF_FFFF_0000_0000
            };
        (base, mask)
    };
    let size = if mask & 0xFFFF_FFFF == 0 && !is64 {
        0
    } else {
        (!mask).wrapping_add(1)
    };
    let size = if io { size & 0xFFFF } else { size };
    (
        Bar {
            addr: base,
            size,
            io,
        },
        is64,
    )
}

/// Places `bar` at the next free address of its window; false if it does not fit.
fn assign_bar(
    addr: Address,
    index: usize,
    bar: &mut Bar,
    is64: bool,
    windows: &mut Windows,
) -> bool {
    let (next, limit) = if bar.io {
        (&mut windows.io_next, IO_WINDOW.1)
    } else {
        (&mut windows.mmio_next, MMIO_WINDOW.1)
    };
    let start = (*next + bar.size - 1) & !(bar.size - 1);
    if start + bar.size > limit {
        return false;
    }
    *next = start + bar.size;
    bar.addr = start;
    let offset = BAR0 + 4 * index as u8;
    let flags = addr.read32(offset) & if bar.io { 3 } else { 0xF };
    addr.write32(offset, start as u32 | flags);
    if is64 {
        addr.write32(offset + 4, (start >> 32) as u32);
    }
    true
}

/// Where the next BAR assigned goes: past everything [`enumerate`] found.
static WINDOWS: SpinLock<Windows> = SpinLock::new(Windows {
    mmio_next: MMIO_WINDOW.0,
    io_next: IO_WINDOW.0,
});

/// Enumerates bus 0, sizes every BAR and assigns any the firmware left at 0.
pub fn enumerate() -> Bus {
    let mut bus = Bus {
        functions: [None; MAX_FUNCTIONS],
        count: 0,
    };
    for device in 0..32u8 {
        for function in 0..8u8 {
            let addr = Address {
                bus: 0,
                device,
                function,
            };
            let id = addr.read32(0);
            if id & 0xFFFF == 0xFFFF {
                if function == 0 {
                    break;
                }
                continue;
            }
            if bus.count < MAX_FUNCTIONS {
                bus.functions[bus.count] = Some(Function {
                    addr,
                    vendor: id as u16,
                    device: (id >> 16) as u16,
                    bars: [Bar::default(); 6],
                });
                bus.count += 1;
            }
            if function == 0 && addr.read8(HEADER_TYPE) & 0x80 == 0 {
                break;
            }
        }
    }
    let mut windows = Windows {
        mmio_next: MMIO_WINDOW.0,
        io_next: IO_WINDOW.0,
    };
    let mut unassigned = [[false; 6]; MAX_FUNCTIONS];
    let mut wide = [[false; 6]; MAX_FUNCTIONS];
    for (slot, f) in bus.functions.iter_mut().enumerate() {
        let Some(f) = f else { continue };
        // Only ordinary (type 0) headers have six BARs.
        if f.addr.read8(HEADER_TYPE) & 0x7F != 0 {
            continue;
        }
        let command = f.addr.read16(COMMAND);
        f.addr
            .write16(COMMAND, command & !(COMMAND_IO | COMMAND_MEMORY));
        let mut index = 0;
        while index < 6 {
            let (bar, is64) = size_bar(f.addr, index);
            f.bars[index] = bar;
            wide[slot][index] = is64;
            if bar.size != 0 {
                if bar.addr == 0 {
                    unassigned[slot][index] = true;
                } else if bar.io && (IO_WINDOW.0..IO_WINDOW.1).contains(&bar.addr) {
                    windows.io_next = windows.io_next.max(bar.addr + bar.size);
                } else if !bar.io && (MMIO_WINDOW.0..MMIO_WINDOW.1).contains(&bar.addr) {
                    windows.mmio_next = windows.mmio_next.max(bar.addr + bar.size);
                }
            }
            index += if is64 { 2 } else { 1 };
        }
        f.addr.write16(COMMAND, command);
    }
    for (slot, f) in bus.functions.iter_mut().enumerate() {
        let Some(f) = f else { continue };
        for index in 0..6 {
            if unassigned[slot][index] {
                let mut bar = f.bars[index];
                assign_bar(f.addr, index, &mut bar, wide[slot][index], &mut windows);
                f.bars[index] = bar;
            }
        }
    }
    *WINDOWS.lock() = windows;
    bus
}

/// Gives every BAR of `f` a new address past all the others (as an OS
/// rebalancing resources does), with the function's decoding off while they
/// move, and records them in `f`. False if a window ran out (those BARs stay).
pub fn move_bars(f: &mut Function) -> bool {
    let mut windows = WINDOWS.lock();
    let command = f.addr.read16(COMMAND);
    f.addr
        .write16(COMMAND, command & !(COMMAND_IO | COMMAND_MEMORY));
    let mut all_moved = true;
    let mut index = 0;
    while index < 6 {
        let low = f.addr.read32(BAR0 + 4 * index as u8);
        let is64 = low & 1 == 0 && (low >> 1) & 3 == 2;
        let mut bar = f.bars[index];
        if bar.size != 0 {
            all_moved &= assign_bar(f.addr, index, &mut bar, is64, &mut windows);
            f.bars[index] = bar;
        }
        index += if is64 { 2 } else { 1 };
    }
    f.addr.write16(COMMAND, command);
    all_moved
}

impl Bus {
    pub fn iter(&self) -> impl Iterator<Item = &Function> {
        self.functions[..self.count].iter().flatten()
    }
}

/// An MSI-X table in a memory BAR.
pub struct Msix {
    cap: u8,
    table: u64,
    pub size: u16,
}

const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;

impl Msix {
    pub fn find(f: &Function) -> Option<Msix> {
        let cap = f.capabilities(CAP_MSIX).next()?;
        let control = f.addr.read16(cap + 2);
        let table = f.addr.read32(cap + 4);
        let bar = f.bars[(table & 7) as usize];
        if bar.io || bar.addr == 0 {
            return None;
        }
        let size = (control & 0x7FF) + 1;
        let table_addr = bar.addr + (table & !7) as u64;
        if !paging::map_device(table_addr, size as u64 * 16) {
            return None;
        }
        Some(Msix {
            cap,
            table: table_addr,
            size,
        })
    }

    /// Points entry `index` at `vector` on the CPU with `apic_id`, unmasked.
    pub fn route(&self, index: u16, apic_id: u8, vector: u8) {
        let entry = self.table + index as u64 * 16;
        x86::mmio_write32(entry + 12, 1);
        x86::mmio_write32(entry, 0xFEE0_0000 | (apic_id as u32) << 12);
        x86::mmio_write32(entry + 4, 0);
        x86::mmio_write32(entry + 8, vector as u32);
        x86::mmio_write32(entry + 12, 0);
    }

    pub fn enable(&self, f: &Function) {
        let control = f.addr.read16(self.cap + 2);
        f.addr
            .write16(self.cap + 2, (control | MSIX_ENABLE) & !MSIX_FUNCTION_MASK);
    }
}
