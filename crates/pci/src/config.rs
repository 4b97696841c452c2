//! Type-0 configuration space: the header, six BARs the guest sizes and moves, and the
//! capability list.
//!
//! A BAR is "mapped" at the address kickvm last put on a bus. The guest sizes a BAR by writing
//! all ones and reading back the size mask; that write never moves anything. Any other write that
//! changes the address yields a [`BarReprogram`], which the caller applies to its buses and then
//! confirms with [`PciConfiguration::commit_bar_move`]; until then the mapping stays where it was.

const CONFIG_SIZE: usize = 256;
pub const NUM_BARS: usize = 6;
const BAR0_OFFSET: usize = 0x10;
const COMMAND_OFFSET: usize = 0x04;
const STATUS_OFFSET: usize = 0x06;
const CAP_POINTER_OFFSET: usize = 0x34;
const INTERRUPT_LINE_OFFSET: usize = 0x3c;
const INTERRUPT_PIN_OFFSET: usize = 0x3d;
const FIRST_CAP_OFFSET: usize = 0x40;
const STATUS_CAP_LIST: u16 = 0x10;

pub const COMMAND_IO: u16 = 0x1;
pub const COMMAND_MEMORY: u16 = 0x2;
pub const COMMAND_BUS_MASTER: u16 = 0x4;
pub const COMMAND_INTX_DISABLE: u16 = 0x400;
/// Parity and SERR# enable are kept so a guest reads back what it wrote.
const COMMAND_WRITABLE: u16 =
    COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | 0x40 | 0x100 | COMMAND_INTX_DISABLE;

const BAR_IO_FLAG: u32 = 0x1;
const BAR_MEM64_FLAG: u32 = 0x4;

/// What a BAR decodes. A 64-bit memory BAR takes two BAR slots (index and index + 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BarKind {
    Io,
    Mem32,
    Mem64,
}

/// The guest moved a BAR: the range `old..old+len` now answers at `new`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarReprogram {
    pub bar: usize,
    pub kind: BarKind,
    pub old: u64,
    pub new: u64,
    pub len: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("BAR {0} does not exist or is already taken")]
    BarSlot(usize),
    #[error("BAR size {0:#x} is not a power of two of at least 16 bytes (4 for I/O)")]
    BarSize(u64),
    #[error("capability of {0} bytes does not fit in configuration space")]
    CapabilityTooLarge(usize),
    #[error("the snapshot's configuration space is {0} bytes, not {CONFIG_SIZE}")]
    SnapshotSize(usize),
    #[error("the snapshot is of PCI function {saved}, this is {actual} (vendor:device)")]
    SnapshotIdentity { saved: String, actual: String },
    #[error("the snapshot's BARs are {saved}, this function's are {actual}")]
    SnapshotBars { saved: String, actual: String },
}

/// A BAR as the guest left it, for a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BarSnapshot {
    pub index: usize,
    pub kind: BarKind,
    pub size: u64,
    /// Where the buses answer for it (the guest may have moved it).
    pub address: u64,
    /// The guest was sizing it (its last write to a half was all ones).
    pub sizing: [bool; 2],
}

/// A function's whole configuration space and BAR layout, for a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConfigSnapshot {
    /// All 256 bytes: header, BAR registers, command, capabilities (MSI-X message control).
    pub bytes: Vec<u8>,
    pub bars: Vec<BarSnapshot>,
}

fn describe_bars(bars: impl Iterator<Item = (usize, BarKind, u64)>) -> String {
    let list: Vec<String> = bars
        .map(|(index, kind, size)| format!("{index}:{kind:?}/{size:#x}"))
        .collect();
    if list.is_empty() {
        "none".to_string()
    } else {
        list.join(" ")
    }
}

/// The identity of a function, as firmware and drivers see it.
#[derive(Debug, Clone, Copy, Default)]
pub struct PciHeader {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

#[derive(Debug, Clone, Copy)]
struct Bar {
    size: u64,
    kind: BarKind,
    mapped: u64,
    /// The guest's last write to each dword was all ones: it is sizing, not moving.
    sizing: [bool; 2],
}

impl Bar {
    fn flags(&self) -> u32 {
        match self.kind {
            BarKind::Io => BAR_IO_FLAG,
            BarKind::Mem32 => 0,
            BarKind::Mem64 => BAR_MEM64_FLAG,
        }
    }

    fn address_mask(&self) -> u64 {
        let mask = !(self.size - 1);
        match self.kind {
            BarKind::Io => mask & 0xffff_fffc,
            BarKind::Mem32 => mask & 0xffff_fff0,
            BarKind::Mem64 => mask & !0xf,
        }
    }
}

#[derive(Clone)]
pub struct PciConfiguration {
    bytes: [u8; CONFIG_SIZE],
    writable: [u8; CONFIG_SIZE],
    bars: [Option<Bar>; NUM_BARS],
    /// Slots that are the upper half of a 64-bit BAR, pointing at the lower half.
    upper_half_of: [Option<usize>; NUM_BARS],
    next_cap: usize,
    last_cap: Option<usize>,
}

impl PciConfiguration {
    pub fn new(header: &PciHeader) -> Self {
        let mut config = Self {
            bytes: [0; CONFIG_SIZE],
            writable: [0; CONFIG_SIZE],
            bars: [None; NUM_BARS],
            upper_half_of: [None; NUM_BARS],
            next_cap: FIRST_CAP_OFFSET,
            last_cap: None,
        };
        config.put16(0x00, header.vendor_id);
        config.put16(0x02, header.device_id);
        config.bytes[0x08] = header.revision;
        config.bytes[0x09] = header.prog_if;
        config.bytes[0x0a] = header.subclass;
        config.bytes[0x0b] = header.class;
        config.put16(0x2c, header.subsystem_vendor_id);
        config.put16(0x2e, header.subsystem_id);
        config.writable[COMMAND_OFFSET..COMMAND_OFFSET + 2]
            .copy_from_slice(&COMMAND_WRITABLE.to_le_bytes());
        // Cache line size and latency timer are plain storage for the guest.
        config.writable[0x0c] = 0xff;
        config.writable[0x0d] = 0xff;
        config.writable[INTERRUPT_LINE_OFFSET] = 0xff;
        config
    }

    fn put16(&mut self, offset: usize, value: u16) {
        self.bytes[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
    }

    fn get32(&self, offset: usize) -> u32 {
        u32::from_le_bytes(self.bytes[offset..offset + 4].try_into().unwrap())
    }

    fn put32(&mut self, offset: usize, value: u32) {
        self.bytes[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
    }

    pub fn vendor_id(&self) -> u16 {
        u16::from_le_bytes([self.bytes[0], self.bytes[1]])
    }

    pub fn device_id(&self) -> u16 {
        u16::from_le_bytes([self.bytes[2], self.bytes[3]])
    }

    pub fn command(&self) -> u16 {
        u16::from_le_bytes([self.bytes[COMMAND_OFFSET], self.bytes[COMMAND_OFFSET + 1]])
    }

    /// Sets command bits as firmware would after assigning BARs.
    pub fn enable_command(&mut self, bits: u16) {
        let command = self.command() | (bits & COMMAND_WRITABLE);
        self.put16(COMMAND_OFFSET, command);
    }

    /// Interrupt pin 1 (INTA#) routed to `line` (the IOAPIC GSI the guest reads back).
    pub fn set_interrupt(&mut self, line: u8) {
        self.bytes[INTERRUPT_LINE_OFFSET] = line;
        self.bytes[INTERRUPT_PIN_OFFSET] = 1;
    }

    /// Declares BAR `index`; its address is assigned later with [`Self::set_bar_address`].
    pub fn add_bar(&mut self, index: usize, size: u64, kind: BarKind) -> Result<(), ConfigError> {
        let slots = if kind == BarKind::Mem64 { 2 } else { 1 };
        if index + slots > NUM_BARS
            || (index..index + slots)
                .any(|i| self.bars[i].is_some() || self.upper_half_of[i].is_some())
        {
            return Err(ConfigError::BarSlot(index));
        }
        let min = if kind == BarKind::Io { 4 } else { 16 };
        let max = match kind {
            BarKind::Io => 0x1_0000,
            BarKind::Mem32 => 1 << 31,
            BarKind::Mem64 => 1 << 62,
        };
        if !size.is_power_of_two() || size < min || size > max {
            return Err(ConfigError::BarSize(size));
        }
        let bar = Bar {
            size,
            kind,
            mapped: 0,
            sizing: [false; 2],
        };
        self.put32(BAR0_OFFSET + 4 * index, bar.flags());
        self.bars[index] = Some(bar);
        if kind == BarKind::Mem64 {
            self.upper_half_of[index + 1] = Some(index);
        }
        Ok(())
    }

    /// Places BAR `index` at `addr` without reporting a move: firmware's initial assignment.
    pub fn set_bar_address(&mut self, index: usize, addr: u64) {
        let Some(bar) = self.bars[index].as_mut() else {
            return;
        };
        bar.mapped = addr;
        self.write_bar_register(index, addr);
    }

    fn write_bar_register(&mut self, index: usize, addr: u64) {
        let bar = self.bars[index].expect("BAR exists");
        let value = (addr & bar.address_mask()) | u64::from(bar.flags());
        self.put32(BAR0_OFFSET + 4 * index, value as u32);
        if bar.kind == BarKind::Mem64 {
            self.put32(BAR0_OFFSET + 4 * (index + 1), (value >> 32) as u32);
        }
    }

    /// Where BAR `index` is mapped now, if it exists.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        self.bars.get(index)?.map(|b| b.mapped)
    }

    pub fn bar_size(&self, index: usize) -> Option<u64> {
        self.bars.get(index)?.map(|b| b.size)
    }

    /// Every declared BAR: (index, kind, size, mapped address).
    pub fn bars(&self) -> impl Iterator<Item = (usize, BarKind, u64, u64)> + '_ {
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.map(|b| (i, b.kind, b.size, b.mapped)))
    }

    /// The buses now answer at `moved.new`; from here on that is the BAR's mapping.
    pub fn commit_bar_move(&mut self, moved: &BarReprogram) {
        if let Some(bar) = self.bars[moved.bar].as_mut() {
            bar.mapped = moved.new;
        }
    }

    pub fn snapshot(&self) -> ConfigSnapshot {
        ConfigSnapshot {
            bytes: self.bytes.to_vec(),
            bars: self
                .bars
                .iter()
                .enumerate()
                .filter_map(|(index, bar)| {
                    bar.map(|b| BarSnapshot {
                        index,
                        kind: b.kind,
                        size: b.size,
                        address: b.mapped,
                        sizing: b.sizing,
                    })
                })
                .collect(),
        }
    }

    /// Takes back the bytes of a snapshot of this same function (same identity and BAR layout:
    /// built from the same options). The BARs stay mapped where they are: the returned moves,
    /// one per BAR the snapshot has elsewhere, go through the caller's buses and
    /// [`Self::commit_bar_move`] exactly as a guest's BAR write does.
    pub fn restore(&mut self, snapshot: &ConfigSnapshot) -> Result<Vec<BarReprogram>, ConfigError> {
        if snapshot.bytes.len() != CONFIG_SIZE {
            return Err(ConfigError::SnapshotSize(snapshot.bytes.len()));
        }
        let identity = |b: &[u8]| {
            format!(
                "{:04x}:{:04x}",
                u16::from_le_bytes([b[0], b[1]]),
                u16::from_le_bytes([b[2], b[3]])
            )
        };
        if snapshot.bytes[..4] != self.bytes[..4] {
            return Err(ConfigError::SnapshotIdentity {
                saved: identity(&snapshot.bytes),
                actual: identity(&self.bytes),
            });
        }
        let layout: Vec<_> = self
            .bars()
            .map(|(i, kind, size, _)| (i, kind, size))
            .collect();
        let saved: Vec<_> = snapshot
            .bars
            .iter()
            .map(|b| (b.index, b.kind, b.size))
            .collect();
        if layout != saved {
            return Err(ConfigError::SnapshotBars {
                saved: describe_bars(saved.into_iter()),
                actual: describe_bars(layout.into_iter()),
            });
        }
        self.bytes.copy_from_slice(&snapshot.bytes);
        let mut moves = Vec::new();
        for saved in &snapshot.bars {
            let bar = self.bars[saved.index].as_mut().expect("layout checked");
            bar.sizing = saved.sizing;
            if bar.mapped != saved.address {
                moves.push(BarReprogram {
                    bar: saved.index,
                    kind: bar.kind,
                    old: bar.mapped,
                    new: saved.address,
                    len: bar.size,
                });
            }
        }
        Ok(moves)
    }

    /// Appends a capability. `body` starts with the capability id; its next pointer (byte 1) is
    /// filled in here. `writable` (same length, optional) marks the bits the guest may change.
    /// Returns the capability's offset in configuration space.
    pub fn add_capability(
        &mut self,
        body: &[u8],
        writable: Option<&[u8]>,
    ) -> Result<usize, ConfigError> {
        let offset = self.next_cap;
        let end = offset + body.len();
        if body.len() < 2 || end > CONFIG_SIZE {
            return Err(ConfigError::CapabilityTooLarge(body.len()));
        }
        self.bytes[offset..end].copy_from_slice(body);
        self.bytes[offset + 1] = 0;
        if let Some(mask) = writable {
            for (i, m) in mask.iter().take(body.len()).enumerate() {
                self.writable[offset + i] = *m;
            }
            // The id and next pointer are never writable.
            self.writable[offset] = 0;
            self.writable[offset + 1] = 0;
        }
        match self.last_cap {
            Some(prev) => self.bytes[prev + 1] = offset as u8,
            None => {
                self.bytes[CAP_POINTER_OFFSET] = offset as u8;
                let status =
                    u16::from_le_bytes([self.bytes[STATUS_OFFSET], self.bytes[STATUS_OFFSET + 1]])
                        | STATUS_CAP_LIST;
                self.put16(STATUS_OFFSET, status);
            }
        }
        self.last_cap = Some(offset);
        // Capabilities are dword aligned.
        self.next_cap = (end + 3) & !3;
        Ok(offset)
    }

    /// Raw bytes, for a device that keeps state inside one of its capabilities.
    pub fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        &self.bytes[offset..offset + len]
    }

    /// Overwrites bytes regardless of the writable mask (device-side updates of a capability).
    pub fn set_bytes(&mut self, offset: usize, data: &[u8]) {
        self.bytes[offset..offset + data.len()].copy_from_slice(data);
    }

    /// Reads dword register `reg` (offset `reg * 4`); out of range reads as all ones.
    pub fn read_reg(&self, reg: usize) -> u32 {
        if reg >= CONFIG_SIZE / 4 {
            return 0xffff_ffff;
        }
        self.get32(reg * 4)
    }

    /// A guest write of `data` at byte `offset` within dword register `reg`. Returns the BAR
    /// move it asks for, if any.
    pub fn write(&mut self, reg: usize, offset: u64, data: &[u8]) -> Option<BarReprogram> {
        let start = reg.checked_mul(4)?.checked_add(offset as usize)?;
        if data.is_empty() || offset as usize + data.len() > 4 || start + data.len() > CONFIG_SIZE {
            return None;
        }
        let bar_slot = (BAR0_OFFSET / 4..BAR0_OFFSET / 4 + NUM_BARS)
            .contains(&reg)
            .then(|| reg - BAR0_OFFSET / 4);
        if let Some(slot) = bar_slot {
            return self.write_bar_slot(slot, offset as usize, data);
        }
        for (i, byte) in data.iter().enumerate() {
            let at = start + i;
            let mask = self.writable[at];
            self.bytes[at] = (self.bytes[at] & !mask) | (byte & mask);
        }
        None
    }

    fn write_bar_slot(&mut self, slot: usize, offset: usize, data: &[u8]) -> Option<BarReprogram> {
        let (index, half) = match (self.bars[slot], self.upper_half_of[slot]) {
            (Some(_), _) => (slot, 0),
            (None, Some(lower)) => (lower, 1),
            // An unimplemented BAR is hardwired to zero.
            (None, None) => return None,
        };
        let mut bar = self.bars[index].expect("BAR exists");
        let reg_offset = BAR0_OFFSET + 4 * slot;
        let mut value = self.get32(reg_offset).to_le_bytes();
        value[offset..offset + data.len()].copy_from_slice(data);
        let value = u32::from_le_bytes(value);
        bar.sizing[half] = value == 0xffff_ffff;
        let mask = bar.address_mask();
        let stored = if half == 0 {
            (value & mask as u32) | bar.flags()
        } else {
            value & (mask >> 32) as u32
        };
        self.put32(reg_offset, stored);
        self.bars[index] = Some(bar);

        if bar.sizing.iter().any(|&s| s) {
            return None;
        }
        let low = u64::from(self.get32(BAR0_OFFSET + 4 * index));
        let high = if bar.kind == BarKind::Mem64 {
            u64::from(self.get32(BAR0_OFFSET + 4 * (index + 1)))
        } else {
            0
        };
        let new = ((high << 32) | low) & mask;
        (new != bar.mapped).then_some(BarReprogram {
            bar: index,
            kind: bar.kind,
            old: bar.mapped,
            new,
            len: bar.size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PciConfiguration {
        PciConfiguration::new(&PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            ..Default::default()
        })
    }

    fn write32(c: &mut PciConfiguration, offset: usize, value: u32) -> Option<BarReprogram> {
        c.write(offset / 4, 0, &value.to_le_bytes())
    }

    #[test]
    fn sizing_a_mem32_bar_reads_back_its_size_mask_and_moves_nothing() {
        let mut c = config();
        c.add_bar(1, 0x4000, BarKind::Mem32).unwrap();
        c.set_bar_address(1, 0xc000_0000);
        assert_eq!(write32(&mut c, 0x14, 0xffff_ffff), None);
        assert_eq!(c.read_reg(5), 0xffff_c000);
        assert_eq!(write32(&mut c, 0x14, 0xc000_0000), None);
        assert_eq!(c.read_reg(5), 0xc000_0000);
        assert_eq!(c.bar_address(1), Some(0xc000_0000));
    }

    #[test]
    fn sizing_an_io_bar_keeps_the_io_flag() {
        let mut c = config();
        c.add_bar(0, 0x40, BarKind::Io).unwrap();
        c.set_bar_address(0, 0xc000);
        write32(&mut c, 0x10, 0xffff_ffff);
        assert_eq!(c.read_reg(4), 0xffff_ffc1);
    }

    #[test]
    fn sizing_a_64bit_bar_covers_both_halves_and_restoring_moves_nothing() {
        let mut c = config();
        c.add_bar(4, 0x4000, BarKind::Mem64).unwrap();
        c.set_bar_address(4, 0xc001_0000);
        assert_eq!(write32(&mut c, 0x20, 0xffff_ffff), None);
        assert_eq!(write32(&mut c, 0x24, 0xffff_ffff), None);
        assert_eq!(c.read_reg(8), 0xffff_c004);
        assert_eq!(c.read_reg(9), 0xffff_ffff);
        assert_eq!(write32(&mut c, 0x20, 0xc001_0000), None);
        assert_eq!(write32(&mut c, 0x24, 0), None);
        assert_eq!(c.bar_address(4), Some(0xc001_0000));
    }

    #[test]
    fn restoring_a_snapshot_brings_back_every_byte_and_reports_moved_bars() {
        let mut c = config();
        c.add_bar(0, 0x40, BarKind::Io).unwrap();
        c.add_bar(4, 0x4000, BarKind::Mem64).unwrap();
        c.set_bar_address(0, 0xc000);
        c.set_bar_address(4, 0xc001_0000);
        c.enable_command(COMMAND_IO | COMMAND_MEMORY);
        let moved = write32(&mut c, 0x20, 0xd000_0000).unwrap();
        c.commit_bar_move(&moved);
        write32(&mut c, 0x3c, 0x0a);
        let saved = c.snapshot();

        let mut fresh = config();
        fresh.add_bar(0, 0x40, BarKind::Io).unwrap();
        fresh.add_bar(4, 0x4000, BarKind::Mem64).unwrap();
        fresh.set_bar_address(0, 0xc000);
        fresh.set_bar_address(4, 0xc001_0000);
        let moves = fresh.restore(&saved).unwrap();
        assert_eq!(
            moves,
            vec![BarReprogram {
                bar: 4,
                kind: BarKind::Mem64,
                old: 0xc001_0000,
                new: 0xd000_0000,
                len: 0x4000
            }]
        );
        assert_eq!(fresh.bar_address(4), Some(0xc001_0000), "until committed");
        fresh.commit_bar_move(&moves[0]);
        assert_eq!(fresh.snapshot(), saved);
        assert_eq!(fresh.read_reg(8), 0xd000_0004);
        assert_eq!(fresh.command(), COMMAND_IO | COMMAND_MEMORY);
    }

    #[test]
    fn a_snapshot_of_another_layout_or_function_is_refused_untouched() {
        let mut c = config();
        c.add_bar(0, 0x40, BarKind::Io).unwrap();
        let saved = c.snapshot();
        let mut other = config();
        other.add_bar(0, 0x80, BarKind::Io).unwrap();
        assert!(matches!(
            other.restore(&saved),
            Err(ConfigError::SnapshotBars { .. })
        ));
        let mut other = PciConfiguration::new(&PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1041,
            ..Default::default()
        });
        other.add_bar(0, 0x40, BarKind::Io).unwrap();
        assert!(matches!(
            other.restore(&saved),
            Err(ConfigError::SnapshotIdentity { .. })
        ));
        assert_eq!(other.device_id(), 0x1041);
        let mut short = saved.clone();
        short.bytes.truncate(64);
        assert_eq!(c.restore(&short), Err(ConfigError::SnapshotSize(64)));
    }

    #[test]
    fn moving_a_bar_reports_old_and_new_until_committed() {
        let mut c = config();
        c.add_bar(0, 0x40, BarKind::Io).unwrap();
        c.set_bar_address(0, 0xc000);
        let moved = write32(&mut c, 0x10, 0xd001).unwrap();
        assert_eq!(
            moved,
            BarReprogram {
                bar: 0,
                kind: BarKind::Io,
                old: 0xc000,
                new: 0xd000,
                len: 0x40
            }
        );
        assert_eq!(c.bar_address(0), Some(0xc000));
        c.commit_bar_move(&moved);
        assert_eq!(c.bar_address(0), Some(0xd000));
        assert_eq!(c.read_reg(4), 0xd001);
    }

    #[test]
    fn moving_a_64bit_bar_above_4g_combines_both_halves() {
        let mut c = config();
        c.add_bar(2, 0x1000, BarKind::Mem64).unwrap();
        c.set_bar_address(2, 0xc000_0000);
        // Upper half first: the intermediate address is already a real move.
        let first = write32(&mut c, 0x1c, 0x1).unwrap();
        assert_eq!(first.new, 0x1_c000_0000);
        c.commit_bar_move(&first);
        let second = write32(&mut c, 0x18, 0x2000_0000).unwrap();
        assert_eq!((second.old, second.new), (0x1_c000_0000, 0x1_2000_0000));
    }

    #[test]
    fn byte_writes_to_a_bar_are_merged_into_the_dword() {
        let mut c = config();
        c.add_bar(1, 0x1000, BarKind::Mem32).unwrap();
        c.set_bar_address(1, 0xc000_0000);
        let moved = c.write(5, 3, &[0xd0]).unwrap();
        assert_eq!(moved.new, 0xd000_0000);
    }

    #[test]
    fn unimplemented_bars_and_readonly_header_ignore_writes() {
        let mut c = config();
        assert_eq!(write32(&mut c, 0x18, 0xffff_ffff), None);
        assert_eq!(c.read_reg(6), 0);
        write32(&mut c, 0x00, 0);
        assert_eq!(c.vendor_id(), 0x1af4);
        write32(&mut c, 0x04, 0xffff_ffff);
        assert_eq!(c.command(), COMMAND_WRITABLE);
        // Status stays read-only.
        assert_eq!(c.read_reg(1) >> 16, 0);
    }

    #[test]
    fn bad_bar_declarations_are_refused() {
        let mut c = config();
        assert_eq!(
            c.add_bar(0, 0x30, BarKind::Mem32),
            Err(ConfigError::BarSize(0x30))
        );
        assert_eq!(
            c.add_bar(5, 0x1000, BarKind::Mem64),
            Err(ConfigError::BarSlot(5))
        );
        c.add_bar(0, 0x1000, BarKind::Mem64).unwrap();
        assert_eq!(
            c.add_bar(1, 0x1000, BarKind::Mem32),
            Err(ConfigError::BarSlot(1))
        );
    }

    #[test]
    fn capabilities_form_a_linked_list_with_writable_bits_only_where_marked() {
        let mut c = config();
        let first = c
            .add_capability(&[0x11, 0xaa, 0x00, 0x00], Some(&[0, 0, 0, 0xc0]))
            .unwrap();
        let second = c.add_capability(&[0x09, 0, 5, 1, 2], None).unwrap();
        assert_eq!(first, 0x40);
        assert_eq!(second, 0x44);
        assert_eq!(c.read_reg(0x34 / 4) & 0xff, 0x40);
        assert_ne!(c.read_reg(1) >> 16 & u32::from(STATUS_CAP_LIST), 0);
        assert_eq!(c.bytes(first + 1, 1), &[0x44]);
        assert_eq!(c.bytes(second + 1, 1), &[0]);
        c.write(0x40 / 4, 0, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(c.read_reg(0x40 / 4), 0xc000_4411);
        c.write(0x44 / 4, 2, &[0xff]);
        assert_eq!(c.bytes(second + 2, 1), &[5]);
    }
}
