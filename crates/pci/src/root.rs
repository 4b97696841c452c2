//! The root bus: a host bridge at 00:00.0, up to 31 more devices, type-1 configuration access
//! through ports 0xCF8..0xCFF, and the one place where BAR moves are applied to the buses.

use std::sync::{Arc, Mutex, Weak};

use kickvm_bus::{Bus, BusDevice, BusError};

use crate::allocator::BarAllocator;
use crate::config::{
    BarKind, BarReprogram, ConfigError, ConfigSnapshot, PciConfiguration, PciHeader, COMMAND_IO,
    COMMAND_MEMORY,
};
use crate::device::{BarHandle, PciDevice, SharedPciDevice};

pub const PCI_CONFIG_IO_BASE: u64 = 0xcf8;
pub const PCI_CONFIG_IO_LEN: u64 = 8;
const NUM_SLOTS: usize = 32;
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;

#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("all 31 PCI slots are taken")]
    NoFreeSlot,
    #[error("PCI slot {0} is taken or invalid")]
    SlotTaken(u8),
    #[error("no room for a {size:#x}-byte {kind:?} BAR in the PCI windows")]
    BarSpace { kind: BarKind, size: u64 },
    #[error("cannot map BAR: {0}")]
    Bus(#[from] BusError),
    #[error("no PCI function in slot {0}")]
    EmptySlot(u8),
    #[error("slot {slot}: {source}")]
    Snapshot { slot: u8, source: ConfigError },
    #[error("slot {slot}: BAR {bar} cannot go back to {address:#x}: {source}")]
    BarRestore {
        slot: u8,
        bar: usize,
        address: u64,
        source: BusError,
    },
}

/// 00:00.0: a host bridge with no BARs, so guests that scan for one find it.
struct HostBridge {
    config: PciConfiguration,
}

impl HostBridge {
    fn new() -> Self {
        Self {
            config: PciConfiguration::new(&PciHeader {
                // Intel's host bridge id, as guests expect on x86.
                vendor_id: 0x8086,
                device_id: 0x0d57,
                class: 0x06,
                subclass: 0x00,
                ..Default::default()
            }),
        }
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
}

pub struct PciRoot {
    slots: Vec<Option<SharedPciDevice>>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
}

impl PciRoot {
    pub fn new(pio: Arc<Bus>, mmio: Arc<Bus>) -> Self {
        let mut slots = vec![None; NUM_SLOTS];
        slots[0] = Some(Arc::new(Mutex::new(HostBridge::new())) as SharedPciDevice);
        Self { slots, pio, mmio }
    }

    /// The lowest free slot, for a device that needs to know it before it is built (its INTx
    /// GSI depends on it).
    pub fn free_slot(&self) -> Result<u8, PciError> {
        self.slots
            .iter()
            .position(Option::is_none)
            .map(|s| s as u8)
            .ok_or(PciError::NoFreeSlot)
    }

    /// The IOAPIC pin a slot's INTA# is wired to: 16..23, shared round-robin (level-triggered
    /// lines may be shared).
    pub fn intx_gsi(slot: u8) -> u32 {
        16 + u32::from(slot) % 8
    }

    /// Places `device` at `slot`: assigns every declared BAR an address as firmware would,
    /// enables decoding, and maps the BARs on the buses.
    pub fn add_device(
        &mut self,
        slot: u8,
        device: SharedPciDevice,
        allocator: &mut BarAllocator,
    ) -> Result<(), PciError> {
        if slot == 0 || usize::from(slot) >= NUM_SLOTS || self.slots[usize::from(slot)].is_some() {
            return Err(PciError::SlotTaken(slot));
        }
        let mut mapped: Vec<(BarKind, u64)> = Vec::new();
        let result = self.map_bars(&device, allocator, &mut mapped);
        if result.is_err() {
            for (kind, base) in mapped {
                let _ = self.bus_for(kind).remove(base);
            }
            return result;
        }
        self.slots[usize::from(slot)] = Some(device);
        Ok(())
    }

    fn map_bars(
        &self,
        device: &SharedPciDevice,
        allocator: &mut BarAllocator,
        mapped: &mut Vec<(BarKind, u64)>,
    ) -> Result<(), PciError> {
        let bars: Vec<_> = device.lock().unwrap().config().bars().collect();
        let mut command = 0;
        for (index, kind, size, _) in bars {
            let base = allocator
                .allocate(kind, size)
                .ok_or(PciError::BarSpace { kind, size })?;
            let handle = Arc::new(Mutex::new(BarHandle::new(device.clone(), index)));
            self.bus_for(kind).insert(handle, base, size)?;
            mapped.push((kind, base));
            device
                .lock()
                .unwrap()
                .config_mut()
                .set_bar_address(index, base);
            command |= if kind == BarKind::Io {
                COMMAND_IO
            } else {
                COMMAND_MEMORY
            };
        }
        device.lock().unwrap().config_mut().enable_command(command);
        Ok(())
    }

    fn bus_for(&self, kind: BarKind) -> &Bus {
        match kind {
            BarKind::Io => &self.pio,
            BarKind::Mem32 | BarKind::Mem64 => &self.mmio,
        }
    }

    pub fn device(&self, slot: u8) -> Option<SharedPciDevice> {
        self.slots.get(usize::from(slot))?.clone()
    }

    pub fn read_config(&self, bus: u8, slot: u8, function: u8, reg: usize) -> u32 {
        match self.function(bus, slot, function) {
            Some(device) => device.lock().unwrap().read_config(reg),
            None => 0xffff_ffff,
        }
    }

    pub fn write_config(
        &self,
        bus: u8,
        slot: u8,
        function: u8,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) {
        let Some(device) = self.function(bus, slot, function) else {
            return;
        };
        let moved = device.lock().unwrap().write_config(reg, offset, data);
        if let Some(moved) = moved {
            if let Err(e) = self.apply_bar_move(&device, moved) {
                log::warn!(
                    "guest moved BAR {} from {:#x} to {:#x}: {e}; it stays at {:#x}",
                    moved.bar,
                    moved.old,
                    moved.new,
                    moved.old
                );
            }
        }
    }

    /// Every function's configuration space (the host bridge's too), by slot, for a snapshot.
    pub fn snapshot(&self) -> Vec<(u8, ConfigSnapshot)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(slot, device)| {
                let snapshot = device.as_ref()?.lock().unwrap().config().snapshot();
                Some((slot as u8, snapshot))
            })
            .collect()
    }

    /// Gives the functions in these slots their saved configuration space back, and puts each
    /// BAR the guest had moved back at its saved address the way a guest's BAR write does
    /// ([`Self::apply_bar_move`]: buses, then the configuration, then the device). Every
    /// snapshot is checked against its function before anything changes.
    ///
    /// A BAR may be going where another one still is (the guest moved both): moves that meet
    /// an occupied range are retried once others have gone, until none is left or none moves.
    pub fn restore(&self, configs: &[(u8, &ConfigSnapshot)]) -> Result<(), PciError> {
        let mut devices = Vec::with_capacity(configs.len());
        for &(slot, snapshot) in configs {
            let device = self.device(slot).ok_or(PciError::EmptySlot(slot))?;
            // A dry run on a copy: the device's configuration changes only once all fit.
            let mut probe = device.lock().unwrap().config().clone();
            probe
                .restore(snapshot)
                .map_err(|source| PciError::Snapshot { slot, source })?;
            devices.push((slot, device, snapshot));
        }
        let mut moves = Vec::new();
        for (slot, device, snapshot) in devices {
            let wanted = device
                .lock()
                .unwrap()
                .config_mut()
                .restore(snapshot)
                .map_err(|source| PciError::Snapshot { slot, source })?;
            moves.extend(wanted.into_iter().map(|m| (slot, device.clone(), m)));
        }
        while !moves.is_empty() {
            let before = moves.len();
            let mut last_error = None;
            moves.retain(
                |(slot, device, moved)| match self.apply_bar_move(device, *moved) {
                    Ok(()) => false,
                    Err(source) => {
                        last_error = Some((*slot, *moved, source));
                        true
                    }
                },
            );
            if moves.len() == before {
                let (slot, moved, source) = last_error.expect("a move failed");
                return Err(PciError::BarRestore {
                    slot,
                    bar: moved.bar,
                    address: moved.new,
                    source,
                });
            }
        }
        Ok(())
    }

    fn function(&self, bus: u8, slot: u8, function: u8) -> Option<SharedPciDevice> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.device(slot)
    }

    /// Moves the bus range first, then lets the device follow (its ioeventfds). A move onto
    /// an occupied range is refused: the BAR keeps answering at its old address.
    fn apply_bar_move(
        &self,
        device: &SharedPciDevice,
        moved: BarReprogram,
    ) -> Result<(), BusError> {
        self.bus_for(moved.kind).relocate(moved.old, moved.new)?;
        log::debug!(
            "PCI BAR {} moved {:#x} -> {:#x} ({:#x} bytes)",
            moved.bar,
            moved.old,
            moved.new,
            moved.len
        );
        let mut device = device.lock().unwrap();
        device.config_mut().commit_bar_move(&moved);
        device.bar_moved(&moved);
        Ok(())
    }
}

/// Ports 0xCF8 (CONFIG_ADDRESS) and 0xCFC..0xCFF (CONFIG_DATA): PCI configuration mechanism #1.
///
/// Holds the root weakly: the root holds the PIO bus this sits on, and a strong reference
/// would keep the whole device tree (and its I/O threads) alive after the VM is gone.
pub struct PciConfigIo {
    root: Weak<Mutex<PciRoot>>,
    address: u32,
}

impl PciConfigIo {
    pub fn new(root: &Arc<Mutex<PciRoot>>) -> Self {
        Self {
            root: Arc::downgrade(root),
            address: 0,
        }
    }

    /// The CONFIG_ADDRESS latch, for a snapshot: a guest may be between writing it and
    /// reading CONFIG_DATA.
    pub fn config_address(&self) -> u32 {
        self.address
    }

    pub fn set_config_address(&mut self, address: u32) {
        self.address = address & !0x3;
    }

    fn target(&self) -> Option<(u8, u8, u8, usize)> {
        if self.address & CONFIG_ADDRESS_ENABLE == 0 {
            return None;
        }
        let bus = (self.address >> 16) as u8;
        let slot = ((self.address >> 11) & 0x1f) as u8;
        let function = ((self.address >> 8) & 0x7) as u8;
        let reg = ((self.address >> 2) & 0x3f) as usize;
        Some((bus, slot, function, reg))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let value = match offset {
            0..=3 => u64::from(self.address) >> (offset * 8),
            4..=7 => match (self.target(), self.root.upgrade()) {
                (Some((bus, slot, function, reg)), Some(root)) => {
                    let value = root.lock().unwrap().read_config(bus, slot, function, reg);
                    u64::from(value) >> ((offset - 4) * 8)
                }
                _ => u64::MAX,
            },
            _ => u64::MAX,
        };
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = (value >> (i * 8)) as u8;
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match offset {
            // Only a full dword write to 0xCF8 sets the address (byte writes to 0xCF9 are the
            // reset-control register on real chipsets; not emulated here).
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes(data.try_into().unwrap()) & !0x3;
            }
            4..=7 => {
                let data_offset = offset - 4;
                if data_offset as usize + data.len() > 4 {
                    return;
                }
                if let (Some((bus, slot, function, reg)), Some(root)) =
                    (self.target(), self.root.upgrade())
                {
                    root.lock()
                        .unwrap()
                        .write_config(bus, slot, function, reg, data_offset, data);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A function with one I/O and one 64-bit memory BAR that records the moves it is told of.
    struct TestDevice {
        config: PciConfiguration,
        moves: Vec<BarReprogram>,
        last_write: Option<(usize, u64, Vec<u8>)>,
    }

    impl TestDevice {
        fn shared() -> Arc<Mutex<TestDevice>> {
            let mut config = PciConfiguration::new(&PciHeader {
                vendor_id: 0x1af4,
                device_id: 0x1042,
                ..Default::default()
            });
            config.add_bar(0, 0x40, BarKind::Io).unwrap();
            config.add_bar(2, 0x4000, BarKind::Mem64).unwrap();
            Arc::new(Mutex::new(TestDevice {
                config,
                moves: Vec::new(),
                last_write: None,
            }))
        }
    }

    impl PciDevice for TestDevice {
        fn config(&self) -> &PciConfiguration {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfiguration {
            &mut self.config
        }
        fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.last_write = Some((bar, offset, data.to_vec()));
        }
        fn bar_moved(&mut self, moved: &BarReprogram) {
            self.moves.push(*moved);
        }
    }

    struct Machine {
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        root: Arc<Mutex<PciRoot>>,
        device: Arc<Mutex<TestDevice>>,
    }

    fn machine() -> Machine {
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let root = Arc::new(Mutex::new(PciRoot::new(pio.clone(), mmio.clone())));
        pio.insert(
            Arc::new(Mutex::new(PciConfigIo::new(&root))),
            PCI_CONFIG_IO_BASE,
            PCI_CONFIG_IO_LEN,
        )
        .unwrap();
        let device = TestDevice::shared();
        let mut allocator = BarAllocator::default();
        let slot = root.lock().unwrap().free_slot().unwrap();
        assert_eq!(slot, 1);
        root.lock()
            .unwrap()
            .add_device(slot, device.clone(), &mut allocator)
            .unwrap();
        Machine {
            pio,
            mmio,
            root,
            device,
        }
    }

    fn config_read(m: &Machine, slot: u8, reg: u32) -> u32 {
        let address = CONFIG_ADDRESS_ENABLE | (u32::from(slot) << 11) | (reg << 2);
        m.pio.write(0xcf8, &address.to_le_bytes());
        let mut data = [0u8; 4];
        m.pio.read(0xcfc, &mut data);
        u32::from_le_bytes(data)
    }

    fn config_write(m: &Machine, slot: u8, reg: u32, value: u32) {
        let address = CONFIG_ADDRESS_ENABLE | (u32::from(slot) << 11) | (reg << 2);
        m.pio.write(0xcf8, &address.to_le_bytes());
        m.pio.write(0xcfc, &value.to_le_bytes());
    }

    #[test]
    fn host_bridge_answers_at_slot_0_and_empty_slots_read_all_ones() {
        let m = machine();
        assert_eq!(config_read(&m, 0, 0), 0x0d57_8086);
        assert_eq!(config_read(&m, 0, 2) >> 8, 0x06_00_00);
        assert_eq!(config_read(&m, 1, 0), 0x1042_1af4);
        assert_eq!(config_read(&m, 7, 0), 0xffff_ffff);
    }

    #[test]
    fn config_address_without_enable_bit_reads_all_ones() {
        let m = machine();
        m.pio.write(0xcf8, &0u32.to_le_bytes());
        let mut data = [0u8; 4];
        m.pio.read(0xcfc, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0xffff_ffff);
    }

    #[test]
    fn byte_access_to_config_data_reads_the_right_lane() {
        let m = machine();
        let address = CONFIG_ADDRESS_ENABLE | (1 << 11);
        m.pio.write(0xcf8, &address.to_le_bytes());
        let mut byte = [0u8; 1];
        m.pio.read(0xcfe, &mut byte);
        assert_eq!(byte[0], 0x42);
    }

    #[test]
    fn bars_are_preassigned_in_the_windows_with_decoding_enabled() {
        let m = machine();
        assert_eq!(config_read(&m, 1, 4), 0xc001);
        assert_eq!(config_read(&m, 1, 6), 0xc000_0004);
        assert_eq!(config_read(&m, 1, 1) & 0x3, 0x3);
        assert!(m.mmio.write(0xc000_0010, &[1]));
        assert_eq!(
            m.device.lock().unwrap().last_write,
            Some((2, 0x10, vec![1]))
        );
    }

    #[test]
    fn moving_a_bar_moves_its_bus_range_and_tells_the_device() {
        let m = machine();
        config_write(&m, 1, 6, 0xd000_0000);
        assert!(!m.mmio.write(0xc000_0000, &[1]));
        assert!(m.mmio.write(0xd000_0008, &[2]));
        assert_eq!(m.device.lock().unwrap().last_write, Some((2, 8, vec![2])));
        let moves = m.device.lock().unwrap().moves.clone();
        assert_eq!(
            moves,
            vec![BarReprogram {
                bar: 2,
                kind: BarKind::Mem64,
                old: 0xc000_0000,
                new: 0xd000_0000,
                len: 0x4000
            }]
        );
        config_write(&m, 1, 4, 0xe001);
        assert!(m.pio.write(0xe010, &[3]));
        assert!(!m.pio.write(0xc010, &[3]));
    }

    #[test]
    fn a_restored_moved_bar_answers_at_its_saved_address_and_the_device_is_told() {
        let m = machine();
        config_write(&m, 1, 6, 0xd000_0000);
        config_write(&m, 1, 15, 0x0b);
        let saved = m.root.lock().unwrap().snapshot();
        assert_eq!(saved.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [0, 1]);

        let fresh = machine();
        let configs: Vec<_> = saved.iter().map(|(slot, c)| (*slot, c)).collect();
        fresh.root.lock().unwrap().restore(&configs).unwrap();
        assert!(fresh.mmio.write(0xd000_0008, &[2]));
        assert!(!fresh.mmio.write(0xc000_0000, &[1]));
        assert_eq!(
            fresh.device.lock().unwrap().last_write,
            Some((2, 8, vec![2]))
        );
        assert_eq!(fresh.device.lock().unwrap().moves.len(), 1);
        assert_eq!(config_read(&fresh, 1, 6), 0xd000_0004);
        assert_eq!(config_read(&fresh, 1, 15) & 0xff, 0x0b);
        assert!(fresh.pio.write(0xc000, &[1]), "the unmoved BAR stays");
    }

    #[test]
    fn restored_bars_may_take_each_others_places_in_turn() {
        let m = machine();
        let second = TestDevice::shared();
        let mut allocator = BarAllocator::new(0xe000..0xf000, 0xe000_0000..0xf000_0000, None);
        m.root
            .lock()
            .unwrap()
            .add_device(2, second.clone(), &mut allocator)
            .unwrap();
        // Slot 1's memory BAR goes where slot 2's was, after slot 2's moved away.
        config_write(&m, 2, 6, 0xd000_0000);
        config_write(&m, 1, 6, 0xe000_0000);
        let saved = m.root.lock().unwrap().snapshot();

        let fresh = machine();
        let mut allocator = BarAllocator::new(0xe000..0xf000, 0xe000_0000..0xf000_0000, None);
        fresh
            .root
            .lock()
            .unwrap()
            .add_device(2, TestDevice::shared(), &mut allocator)
            .unwrap();
        let configs: Vec<_> = saved.iter().map(|(slot, c)| (*slot, c)).collect();
        fresh.root.lock().unwrap().restore(&configs).unwrap();
        assert!(fresh.mmio.write(0xe000_0000, &[7]));
        assert_eq!(
            fresh.device.lock().unwrap().last_write,
            Some((2, 0, vec![7]))
        );
        assert_eq!(config_read(&fresh, 2, 6), 0xd000_0004);
    }

    #[test]
    fn a_snapshot_of_other_functions_is_refused_before_anything_changes() {
        let m = machine();
        config_write(&m, 1, 6, 0xd000_0000);
        let mut saved = m.root.lock().unwrap().snapshot();
        saved[1].1.bars[1].size = 0x8000;
        let fresh = machine();
        let configs: Vec<_> = saved.iter().map(|(slot, c)| (*slot, c)).collect();
        let err = fresh.root.lock().unwrap().restore(&configs).unwrap_err();
        assert!(matches!(
            err,
            PciError::Snapshot {
                slot: 1,
                source: ConfigError::SnapshotBars { .. }
            }
        ));
        assert_eq!(config_read(&fresh, 1, 6), 0xc000_0004, "untouched");
        let err = fresh.root.lock().unwrap().restore(&[(9, &saved[1].1)]);
        assert!(matches!(err, Err(PciError::EmptySlot(9))));
    }

    #[test]
    fn the_config_address_latch_can_be_saved_and_set() {
        let m = machine();
        let io = PciConfigIo::new(&m.root);
        let mut other = PciConfigIo::new(&m.root);
        other.set_config_address(CONFIG_ADDRESS_ENABLE | (1 << 11));
        let mut data = [0u8; 4];
        other.read(PCI_CONFIG_IO_BASE, 4, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x1042_1af4);
        assert_eq!(io.config_address(), 0);
    }

    #[test]
    fn sizing_a_bar_leaves_the_bus_alone() {
        let m = machine();
        config_write(&m, 1, 6, 0xffff_ffff);
        assert_eq!(config_read(&m, 1, 6), 0xffff_c004);
        config_write(&m, 1, 6, 0xc000_0000);
        assert!(m.mmio.write(0xc000_0000, &[1]));
        assert!(m.device.lock().unwrap().moves.is_empty());
    }

    #[test]
    fn move_onto_the_config_ports_is_refused_and_the_bar_stays() {
        let m = machine();
        config_write(&m, 1, 4, 0xcf9);
        assert!(m.pio.write(0xc000, &[1]));
        assert!(m.device.lock().unwrap().moves.is_empty());
        // The config ports still work.
        assert_eq!(config_read(&m, 0, 0), 0x0d57_8086);
    }

    #[test]
    fn no_room_for_a_bar_is_an_error_and_leaves_buses_clean() {
        let m = machine();
        let device = TestDevice::shared();
        let mut tiny = BarAllocator::new(0xc000..0xc040, 0xc000_0000..0xc000_1000, None);
        let err = m
            .root
            .lock()
            .unwrap()
            .add_device(2, device, &mut tiny)
            .unwrap_err();
        assert!(matches!(err, PciError::BarSpace { .. } | PciError::Bus(_)));
        assert_eq!(config_read(&m, 2, 0), 0xffff_ffff);
    }
}
