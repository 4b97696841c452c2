//! MSI-X: the capability, the vector table and the pending-bit array, with per-vector and
//! function masking. Every vector is an irqfd on its own GSI; its MSI route follows the table
//! entry. A vector triggered while masked sets its pending bit and fires when unmasked.

use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::irq::{GsiRouter, IrqError};

pub const MSIX_CAP_ID: u8 = 0x11;
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// The capability: id, next, message control, table offset/BIR, PBA offset/BIR.
pub const MSIX_CAP_LEN: usize = 12;
const MSG_CTL_ENABLE: u16 = 1 << 15;
const MSG_CTL_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_CTRL_MASKED: u32 = 1;
/// The spec's limit: table size is an 11-bit field.
const MAX_VECTORS: u16 = 2048;

#[derive(Debug, thiserror::Error)]
pub enum MsixError {
    #[error("MSI-X supports 1..=2048 vectors, not {0}")]
    VectorCount(u16),
    #[error(transparent)]
    Irq(#[from] IrqError),
    #[error("the snapshot's MSI-X table has {saved} vectors, this function has {actual}")]
    SnapshotVectors { saved: usize, actual: usize },
}

/// The guest-visible MSI-X state, for a snapshot: the table, the pending bits and message
/// control's enable and function-mask bits. The GSIs and irqfds behind the vectors are the
/// VMM's own and are made afresh.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixSnapshot {
    pub enabled: bool,
    pub function_masked: bool,
    pub entries: Vec<MsixEntry>,
    pub pending: Vec<bool>,
}

/// What happened to a trigger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Sent,
    /// Masked: the pending bit is set and the vector fires on unmask.
    Pending,
    /// MSI-X is off or the vector does not exist; the caller may fall back to INTx.
    NotDelivered,
}

/// One MSI-X table entry, as the guest wrote it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixEntry {
    pub address_lo: u32,
    pub address_hi: u32,
    pub data: u32,
    pub control: u32,
}

impl MsixEntry {
    fn masked(&self) -> bool {
        self.control & ENTRY_CTRL_MASKED != 0
    }
    fn address(&self) -> u64 {
        (u64::from(self.address_hi) << 32) | u64::from(self.address_lo)
    }
}

struct Vector {
    gsi: u32,
    irqfd: EventFd,
}

pub struct MsixConfig {
    entries: Vec<MsixEntry>,
    pending: Vec<bool>,
    vectors: Vec<Vector>,
    enabled: bool,
    function_masked: bool,
    router: Arc<GsiRouter>,
}

impl MsixConfig {
    /// Allocates one GSI and one irqfd per vector and registers the irqfds with KVM.
    pub fn new(num_vectors: u16, router: Arc<GsiRouter>) -> Result<Self, MsixError> {
        if num_vectors == 0 || num_vectors > MAX_VECTORS {
            return Err(MsixError::VectorCount(num_vectors));
        }
        let mut config = Self {
            // Reset state: every vector masked.
            entries: vec![
                MsixEntry {
                    control: ENTRY_CTRL_MASKED,
                    ..Default::default()
                };
                num_vectors.into()
            ],
            pending: vec![false; num_vectors.into()],
            vectors: Vec::with_capacity(num_vectors.into()),
            enabled: false,
            function_masked: false,
            router,
        };
        for _ in 0..num_vectors {
            let gsi = config.router.allocate_msi_gsi()?;
            let irqfd = EventFd::new(EFD_NONBLOCK).map_err(IrqError::EventFd)?;
            if let Err(source) = config.router.chip().register_irqfd(&irqfd, gsi, None) {
                let _ = config.router.release_msi_gsi(gsi);
                return Err(IrqError::Irqfd { gsi, source }.into());
            }
            config.vectors.push(Vector { gsi, irqfd });
        }
        Ok(config)
    }

    pub fn num_vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * MSIX_ENTRY_SIZE
    }

    pub fn pba_size(&self) -> u64 {
        self.entries.len().div_ceil(64) as u64 * 8
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn function_masked(&self) -> bool {
        self.function_masked
    }

    pub fn vector_masked(&self, vector: u16) -> bool {
        self.entries
            .get(usize::from(vector))
            .is_none_or(MsixEntry::masked)
    }

    /// Whether a signal on `vector`'s irqfd reaches the guest now: MSI-X on, neither the
    /// function nor the vector masked, and the vector has an address (its route is set).
    pub fn deliverable(&self, vector: u16) -> bool {
        self.enabled
            && !self.function_masked
            && self
                .entries
                .get(usize::from(vector))
                .is_some_and(|e| !e.masked() && e.address() != 0)
    }

    pub fn pending(&self, vector: u16) -> bool {
        self.pending
            .get(usize::from(vector))
            .copied()
            .unwrap_or(false)
    }

    /// The capability bytes (for `PciConfiguration::add_capability`) and their writable mask:
    /// only the enable and function-mask bits of message control.
    pub fn capability(
        &self,
        table_bar: u8,
        table_offset: u32,
        pba_bar: u8,
        pba_offset: u32,
    ) -> ([u8; MSIX_CAP_LEN], [u8; MSIX_CAP_LEN]) {
        let mut cap = [0u8; MSIX_CAP_LEN];
        cap[0] = MSIX_CAP_ID;
        cap[2..4].copy_from_slice(&(self.num_vectors() - 1).to_le_bytes());
        cap[4..8].copy_from_slice(&(table_offset | u32::from(table_bar)).to_le_bytes());
        cap[8..12].copy_from_slice(&(pba_offset | u32::from(pba_bar)).to_le_bytes());
        let mut writable = [0u8; MSIX_CAP_LEN];
        writable[3] = ((MSG_CTL_ENABLE | MSG_CTL_FUNCTION_MASK) >> 8) as u8;
        (cap, writable)
    }

    /// The guest wrote message control (already masked to its writable bits by the caller's
    /// configuration space).
    pub fn set_message_control(&mut self, control: u16) {
        let was_live = self.enabled && !self.function_masked;
        self.enabled = control & MSG_CTL_ENABLE != 0;
        self.function_masked = control & MSG_CTL_FUNCTION_MASK != 0;
        if !was_live && self.enabled && !self.function_masked {
            for vector in 0..self.entries.len() {
                self.update_route(vector);
                self.deliver_pending(vector);
            }
        }
    }

    /// A guest read of the table: dword or qword, naturally aligned; anything else reads ones.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let len = data.len();
        if !(len == 4 || len == 8) || !offset.is_multiple_of(len as u64) {
            data.fill(0xff);
            return;
        }
        let low = self.read_table_dword(offset);
        let value = if len == 8 {
            low | (self.read_table_dword(offset + 4) << 32)
        } else {
            low
        };
        data.copy_from_slice(&value.to_le_bytes()[..len]);
    }

    fn read_table_dword(&self, offset: u64) -> u64 {
        let Some(entry) = self.entries.get((offset / MSIX_ENTRY_SIZE) as usize) else {
            return 0xffff_ffff;
        };
        u64::from(match offset % MSIX_ENTRY_SIZE {
            0 => entry.address_lo,
            4 => entry.address_hi,
            8 => entry.data,
            _ => entry.control,
        })
    }

    /// A guest write to the table: dword or qword, naturally aligned; anything else is ignored.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        match data.len() {
            4 if offset.is_multiple_of(4) => {
                self.write_table_dword(offset, u32::from_le_bytes(data.try_into().unwrap()))
            }
            8 if offset.is_multiple_of(8) => {
                self.write_table_dword(offset, u32::from_le_bytes(data[..4].try_into().unwrap()));
                self.write_table_dword(
                    offset + 4,
                    u32::from_le_bytes(data[4..].try_into().unwrap()),
                );
            }
            _ => log::debug!(
                "MSI-X table: ignored {}-byte write at {offset:#x}",
                data.len()
            ),
        }
    }

    fn write_table_dword(&mut self, offset: u64, value: u32) {
        let vector = (offset / MSIX_ENTRY_SIZE) as usize;
        let Some(entry) = self.entries.get_mut(vector) else {
            return;
        };
        let was_masked = entry.masked();
        match offset % MSIX_ENTRY_SIZE {
            0 => entry.address_lo = value & !0x3,
            4 => entry.address_hi = value,
            8 => entry.data = value,
            _ => entry.control = value & ENTRY_CTRL_MASKED,
        }
        let now_masked = entry.masked();
        // The route matters only while the vector can fire; updating it then (not on every
        // address/data dword written under mask) keeps routing-table rewrites rare.
        if !now_masked && self.enabled {
            self.update_route(vector);
        }
        if was_masked && !now_masked {
            self.deliver_pending(vector);
        }
    }

    fn update_route(&self, vector: usize) {
        let entry = self.entries[vector];
        if entry.masked() || entry.address() == 0 {
            return;
        }
        let gsi = self.vectors[vector].gsi;
        if let Err(e) = self.router.set_msi_route(gsi, entry.address(), entry.data) {
            log::warn!("MSI-X vector {vector}: {e}");
        }
    }

    fn deliver_pending(&mut self, vector: usize) {
        if self.pending[vector] && !self.entries[vector].masked() && !self.function_masked {
            self.pending[vector] = false;
            self.fire(vector);
        }
    }

    fn fire(&self, vector: usize) {
        if let Err(e) = self.vectors[vector].irqfd.write(1) {
            log::warn!("MSI-X vector {vector}: cannot signal irqfd: {e}");
        }
    }

    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let first_bit = (offset as usize + i) * 8;
            *byte = (0..8)
                .filter(|b| self.pending.get(first_bit + b).copied().unwrap_or(false))
                .fold(0u8, |acc, b| acc | (1 << b));
        }
    }

    /// Sends `vector`, or marks it pending while it (or the function) is masked.
    pub fn trigger(&mut self, vector: u16) -> Delivery {
        let index = usize::from(vector);
        if !self.enabled || index >= self.entries.len() {
            return Delivery::NotDelivered;
        }
        if self.function_masked || self.entries[index].masked() {
            self.pending[index] = true;
            return Delivery::Pending;
        }
        self.fire(index);
        Delivery::Sent
    }

    /// The eventfd behind `vector`, for a test or a backend that signals it directly.
    pub fn irqfd(&self, vector: u16) -> Option<&EventFd> {
        self.vectors.get(usize::from(vector)).map(|v| &v.irqfd)
    }

    pub fn gsi(&self, vector: u16) -> Option<u32> {
        self.vectors.get(usize::from(vector)).map(|v| v.gsi)
    }

    pub fn snapshot(&self) -> MsixSnapshot {
        MsixSnapshot {
            enabled: self.enabled,
            function_masked: self.function_masked,
            entries: self.entries.clone(),
            pending: self.pending.clone(),
        }
    }

    /// Takes back a snapshot's table and bits, and sends KVM the route of every vector that
    /// can fire (the ones a guest's table writes would have routed). Nothing fires: interrupts
    /// sent before the snapshot are in the restored interrupt controller, and pending bits
    /// fire on unmask as they would have.
    pub fn restore(&mut self, snapshot: &MsixSnapshot) -> Result<(), MsixError> {
        if snapshot.entries.len() != self.entries.len()
            || snapshot.pending.len() != self.pending.len()
        {
            return Err(MsixError::SnapshotVectors {
                saved: snapshot.entries.len(),
                actual: self.entries.len(),
            });
        }
        self.entries.clone_from(&snapshot.entries);
        for entry in &mut self.entries {
            entry.address_lo &= !0x3;
            entry.control &= ENTRY_CTRL_MASKED;
        }
        self.pending.clone_from(&snapshot.pending);
        self.enabled = snapshot.enabled;
        self.function_masked = snapshot.function_masked;
        if self.enabled {
            for vector in 0..self.entries.len() {
                self.update_route(vector);
            }
        }
        Ok(())
    }

    /// Device reset: back to disabled with every vector masked and nothing pending.
    pub fn reset(&mut self) {
        self.enabled = false;
        self.function_masked = false;
        for entry in &mut self.entries {
            *entry = MsixEntry {
                control: ENTRY_CTRL_MASKED,
                ..Default::default()
            };
        }
        self.pending.iter_mut().for_each(|p| *p = false);
    }
}

impl Drop for MsixConfig {
    fn drop(&mut self) {
        for v in &self.vectors {
            let _ = self.router.chip().unregister_irqfd(&v.irqfd, v.gsi);
            let _ = self.router.release_msi_gsi(v.gsi);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::tests::MockChip;
    use crate::irq::IrqRoute;

    fn msix(n: u16) -> (Arc<MockChip>, MsixConfig) {
        let chip = Arc::new(MockChip::default());
        let router = Arc::new(GsiRouter::new(chip.clone()));
        (chip, MsixConfig::new(n, router).unwrap())
    }

    fn program(m: &mut MsixConfig, vector: u64, address: u64, data: u32) {
        let base = vector * MSIX_ENTRY_SIZE;
        m.write_table(base, &address.to_le_bytes());
        m.write_table(base + 8, &data.to_le_bytes());
        m.write_table(base + 12, &0u32.to_le_bytes());
    }

    fn fired(m: &MsixConfig, vector: u16) -> bool {
        m.irqfd(vector).unwrap().read().is_ok()
    }

    #[test]
    fn each_vector_gets_its_own_gsi_and_irqfd() {
        let (chip, m) = msix(3);
        assert_eq!((m.gsi(0), m.gsi(2)), (Some(24), Some(26)));
        assert_eq!(chip.irqfds.lock().unwrap().len(), 3);
        drop(m);
        assert!(chip.irqfds.lock().unwrap().is_empty());
    }

    #[test]
    fn unmasked_vector_fires_and_its_route_follows_the_table_entry() {
        let (chip, mut m) = msix(2);
        m.set_message_control(MSG_CTL_ENABLE);
        program(&mut m, 1, 0xfee0_1000, 0x4031);
        assert_eq!(m.trigger(1), Delivery::Sent);
        assert!(fired(&m, 1));
        assert!(!fired(&m, 0));
        let tables = chip.tables.lock().unwrap();
        assert!(tables.last().unwrap().contains(&IrqRoute::Msi {
            gsi: 25,
            address: 0xfee0_1000,
            data: 0x4031
        }));
    }

    #[test]
    fn masked_vector_sets_pending_and_fires_on_unmask() {
        let (_chip, mut m) = msix(2);
        m.set_message_control(MSG_CTL_ENABLE);
        m.write_table(0, &0xfee0_0000u32.to_le_bytes());
        assert_eq!(m.trigger(0), Delivery::Pending);
        assert!(!fired(&m, 0));
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 1);
        m.write_table(12, &0u32.to_le_bytes());
        assert!(fired(&m, 0));
        assert!(!m.pending(0));
    }

    #[test]
    fn function_mask_holds_every_vector_until_cleared() {
        let (_chip, mut m) = msix(2);
        m.set_message_control(MSG_CTL_ENABLE | MSG_CTL_FUNCTION_MASK);
        program(&mut m, 0, 0xfee0_0000, 1);
        assert_eq!(m.trigger(0), Delivery::Pending);
        assert!(!fired(&m, 0));
        m.set_message_control(MSG_CTL_ENABLE);
        assert!(fired(&m, 0));
    }

    #[test]
    fn a_vector_is_deliverable_only_while_enabled_unmasked_and_addressed() {
        let (_chip, mut m) = msix(2);
        program(&mut m, 0, 0xfee0_0000, 1);
        assert!(!m.deliverable(0), "MSI-X off");
        m.set_message_control(MSG_CTL_ENABLE);
        assert!(m.deliverable(0));
        assert!(!m.deliverable(1), "never given an address");
        assert!(!m.deliverable(7), "no such vector");
        m.write_table(12, &1u32.to_le_bytes());
        assert!(!m.deliverable(0), "vector masked");
        m.write_table(12, &0u32.to_le_bytes());
        m.set_message_control(MSG_CTL_ENABLE | MSG_CTL_FUNCTION_MASK);
        assert!(!m.deliverable(0), "function masked");
    }

    #[test]
    fn disabled_msix_or_unknown_vector_is_not_delivered() {
        let (_chip, mut m) = msix(2);
        assert_eq!(m.trigger(0), Delivery::NotDelivered);
        m.set_message_control(MSG_CTL_ENABLE);
        assert_eq!(m.trigger(7), Delivery::NotDelivered);
        assert_eq!(m.trigger(0xffff), Delivery::NotDelivered);
    }

    #[test]
    fn table_reads_back_entries_and_ignores_odd_sized_writes() {
        let (_chip, mut m) = msix(2);
        program(&mut m, 1, 0x1_fee0_0004, 7);
        m.write_table(16, &[0xff]);
        let mut qword = [0u8; 8];
        m.read_table(16, &mut qword);
        assert_eq!(u64::from_le_bytes(qword), 0x1_fee0_0004);
        let mut dword = [0u8; 4];
        m.read_table(28, &mut dword);
        assert_eq!(u32::from_le_bytes(dword), 0);
        m.read_table(12, &mut dword);
        assert_eq!(u32::from_le_bytes(dword), 1, "vector 0 starts masked");
        m.read_table(0x100, &mut dword);
        assert_eq!(u32::from_le_bytes(dword), 0xffff_ffff);
    }

    #[test]
    fn a_restored_table_keeps_entries_masks_and_pending_bits_and_routes_live_vectors() {
        let (_chip, mut m) = msix(3);
        m.set_message_control(MSG_CTL_ENABLE);
        program(&mut m, 0, 0xfee0_0000, 0x41);
        program(&mut m, 2, 0xfee0_2000, 0x43);
        m.write_table(2 * 16 + 12, &1u32.to_le_bytes());
        assert_eq!(m.trigger(2), Delivery::Pending);
        let saved = m.snapshot();

        let (chip, mut fresh) = msix(3);
        fresh.restore(&saved).unwrap();
        assert_eq!(fresh.snapshot(), saved);
        assert!(fresh.deliverable(0));
        assert!(fresh.vector_masked(2) && fresh.pending(2));
        let gsi = fresh.gsi(0).unwrap();
        assert!(chip
            .tables
            .lock()
            .unwrap()
            .last()
            .unwrap()
            .contains(&IrqRoute::Msi {
                gsi,
                address: 0xfee0_0000,
                data: 0x41
            }));
        assert_eq!(fresh.trigger(0), Delivery::Sent);
        assert!(fired(&fresh, 0));
        assert!(!fired(&fresh, 2), "restoring fires nothing");
        fresh.write_table(2 * 16 + 12, &0u32.to_le_bytes());
        assert!(fired(&fresh, 2), "the saved pending bit fires on unmask");
    }

    #[test]
    fn a_table_of_another_size_is_refused() {
        let (_chip, m) = msix(3);
        let (_chip, mut other) = msix(2);
        assert!(matches!(
            other.restore(&m.snapshot()),
            Err(MsixError::SnapshotVectors {
                saved: 3,
                actual: 2
            })
        ));
    }

    #[test]
    fn capability_describes_table_size_and_locations() {
        let (_chip, m) = msix(5);
        let (cap, writable) = m.capability(1, 0, 1, 0x800);
        assert_eq!(cap[0], MSIX_CAP_ID);
        assert_eq!(u16::from_le_bytes([cap[2], cap[3]]), 4);
        assert_eq!(u32::from_le_bytes(cap[4..8].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(cap[8..12].try_into().unwrap()), 0x801);
        assert_eq!(writable[3], 0xc0);
    }
}
