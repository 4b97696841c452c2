//! Address buses: the vCPU threads route every port-I/O and MMIO exit through one of these to
//! the device that claims the address.
//!
//! A device is inserted once per range it decodes; a PCI BAR that the guest moves is moved with
//! [`Bus::relocate`], so the device keeps its state and only the address changes. Addresses that
//! no device claims are reported to the caller, which answers them as hardware does (reads as all
//! ones, writes ignored).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device reachable through a bus. `base` is where the matching range starts, `offset` the
/// access's distance from it, so a device with several ranges (BARs) can tell them apart.
pub trait BusDevice: Send {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    InvalidRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps a device already at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
    #[error("no device is mapped at {0:#x}")]
    NotMapped(u64),
}

/// Kinds of guest-physical address space, and where a KVM ioeventfd is registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoAddress {
    Pio(u64),
    Mmio(u64),
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A map from address ranges to devices. Reads of the map (every exit) take a shared lock;
/// only inserting, removing and relocating ranges takes it exclusively.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let mut ranges = self.ranges.write().unwrap();
        if let Some((&other, entry)) = ranges.range(..end).next_back() {
            if other + entry.len > base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        ranges.insert(base, Entry { len, device });
        Ok(())
    }

    pub fn remove(&self, base: u64) -> Result<SharedDevice, BusError> {
        self.ranges
            .write()
            .unwrap()
            .remove(&base)
            .map(|e| e.device)
            .ok_or(BusError::NotMapped(base))
    }

    /// Moves the range that starts at `old_base` to `new_base`, keeping its device and length.
    /// On overlap the range stays where it was.
    pub fn relocate(&self, old_base: u64, new_base: u64) -> Result<(), BusError> {
        let entry = {
            let mut ranges = self.ranges.write().unwrap();
            ranges
                .remove(&old_base)
                .ok_or(BusError::NotMapped(old_base))?
        };
        let (device, len) = (entry.device.clone(), entry.len);
        self.insert(device, new_base, len).inspect_err(|_| {
            self.ranges.write().unwrap().insert(old_base, entry);
        })
    }

    fn resolve(&self, addr: u64) -> Option<(u64, SharedDevice)> {
        let ranges = self.ranges.read().unwrap();
        let (&base, entry) = ranges.range(..=addr).next_back()?;
        (addr - base < entry.len).then(|| (base, entry.device.clone()))
    }

    /// Dispatches a read; returns false when no device claims `addr` (`data` is left alone).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((base, dev)) => {
                dev.lock().unwrap().read(base, addr - base, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device claims `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((base, dev)) => {
                dev.lock().unwrap().write(base, addr - base, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.last_write = Some((base, offset, data.to_vec()));
        }
    }

    fn recorder() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn access_is_routed_with_offset_from_range_base() {
        let bus = Bus::new();
        let dev = recorder();
        bus.insert(dev.clone(), 0x1000, 0x10).unwrap();
        let mut data = [0u8; 2];
        assert!(bus.read(0x1004, &mut data));
        assert_eq!(data, [4, 4]);
        assert!(bus.write(0x100f, &[9]));
        assert_eq!(dev.lock().unwrap().last_write, Some((0x1000, 0xf, vec![9])));
    }

    #[test]
    fn unclaimed_addresses_are_reported() {
        let bus = Bus::new();
        bus.insert(recorder(), 0x1000, 0x10).unwrap();
        let mut data = [0xaa];
        assert!(!bus.read(0x1010, &mut data));
        assert!(!bus.read(0xfff, &mut data));
        assert_eq!(data, [0xaa]);
        assert!(!bus.write(0x2000, &[1]));
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let bus = Bus::new();
        bus.insert(recorder(), 0x1000, 0x10).unwrap();
        assert!(matches!(
            bus.insert(recorder(), 0x100f, 1),
            Err(BusError::Overlap { other: 0x1000, .. })
        ));
        assert!(matches!(
            bus.insert(recorder(), 0xff8, 0x10),
            Err(BusError::Overlap { .. })
        ));
        assert!(bus.insert(recorder(), 0x1010, 1).is_ok());
        assert!(matches!(
            bus.insert(recorder(), 0x5000, 0),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(recorder(), u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
    }

    #[test]
    fn relocated_range_answers_only_at_new_address() {
        let bus = Bus::new();
        let dev = recorder();
        bus.insert(dev.clone(), 0x1000, 0x10).unwrap();
        bus.relocate(0x1000, 0x8000).unwrap();
        assert!(!bus.write(0x1000, &[1]));
        assert!(bus.write(0x8001, &[2]));
        assert_eq!(dev.lock().unwrap().last_write, Some((0x8000, 1, vec![2])));
    }

    #[test]
    fn failed_relocation_keeps_old_range() {
        let bus = Bus::new();
        bus.insert(recorder(), 0x1000, 0x10).unwrap();
        bus.insert(recorder(), 0x2000, 0x10).unwrap();
        assert!(bus.relocate(0x1000, 0x2008).is_err());
        assert!(bus.write(0x1000, &[1]));
        assert_eq!(
            bus.relocate(0x3000, 0x4000),
            Err(BusError::NotMapped(0x3000))
        );
    }
}
