//! Interrupt plumbing to KVM: irqfds, the GSI routing table and legacy INTx lines.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so [`GsiRouter`] is the single owner of it:
//! every update re-sends the irqchip routes of GSIs 0..23 beside the MSI routes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// IOAPIC input pins; GSIs below this are wired to the in-kernel irqchip.
pub const IOAPIC_PINS: u32 = 24;
/// MSI GSIs are handed out from here upward.
pub const FIRST_MSI_GSI: u32 = IOAPIC_PINS;
/// KVM's limit on routing entries (KVM_MAX_IRQ_ROUTES).
const MAX_GSI: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    #[error("KVM refused the GSI routing table: {0}")]
    Routing(std::io::Error),
    #[error("KVM refused irqfd for GSI {gsi}: {source}")]
    Irqfd { gsi: u32, source: std::io::Error },
    #[error("no GSI left for MSI routes")]
    GsisExhausted,
    #[error("cannot create eventfd: {0}")]
    EventFd(std::io::Error),
}

/// One entry of the GSI routing table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqRoute {
    Irqchip { gsi: u32, chip: u32, pin: u32 },
    Msi { gsi: u32, address: u64, data: u32 },
}

/// The part of KVM's VM interface that interrupts need; implemented for `VmFd`, mocked in tests.
pub trait IrqChip: Send + Sync {
    /// Replaces the whole routing table with `routes`.
    fn set_gsi_routing(&self, routes: &[IrqRoute]) -> std::io::Result<()>;
    /// Signals on `fd` inject `gsi`; with `resample`, the line is level-triggered and KVM
    /// signals `resample` when the guest EOIs it.
    fn register_irqfd(
        &self,
        fd: &EventFd,
        gsi: u32,
        resample: Option<&EventFd>,
    ) -> std::io::Result<()>;
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> std::io::Result<()>;
}

impl IrqChip for kvm_ioctls::VmFd {
    fn set_gsi_routing(&self, routes: &[IrqRoute]) -> std::io::Result<()> {
        let entries: Vec<kvm_irq_routing_entry> = routes.iter().map(to_kvm_entry).collect();
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| std::io::Error::other(format!("routing table: {e:?}")))?;
        kvm_ioctls::VmFd::set_gsi_routing(self, &table).map_err(std::io::Error::from)
    }

    fn register_irqfd(
        &self,
        fd: &EventFd,
        gsi: u32,
        resample: Option<&EventFd>,
    ) -> std::io::Result<()> {
        match resample {
            Some(resample) => self.register_irqfd_with_resample(fd, resample, gsi),
            None => kvm_ioctls::VmFd::register_irqfd(self, fd, gsi),
        }
        .map_err(std::io::Error::from)
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> std::io::Result<()> {
        kvm_ioctls::VmFd::unregister_irqfd(self, fd, gsi).map_err(std::io::Error::from)
    }
}

fn to_kvm_entry(route: &IrqRoute) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry::default();
    match *route {
        IrqRoute::Irqchip { gsi, chip, pin } => {
            entry.gsi = gsi;
            entry.type_ = KVM_IRQ_ROUTING_IRQCHIP;
            entry.u.irqchip.irqchip = chip;
            entry.u.irqchip.pin = pin;
        }
        IrqRoute::Msi { gsi, address, data } => {
            entry.gsi = gsi;
            entry.type_ = KVM_IRQ_ROUTING_MSI;
            entry.u.msi.address_lo = address as u32;
            entry.u.msi.address_hi = (address >> 32) as u32;
            entry.u.msi.data = data;
        }
    }
    entry
}

/// The routes KVM sets up by itself with the in-kernel irqchip: every GSI below 24 to its IOAPIC
/// pin, and GSIs 0..15 also to the 8259 pair.
pub fn irqchip_routes() -> Vec<IrqRoute> {
    let mut routes = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        if gsi < 16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            routes.push(IrqRoute::Irqchip {
                gsi,
                chip,
                pin: gsi % 8,
            });
        }
        routes.push(IrqRoute::Irqchip {
            gsi,
            chip: KVM_IRQCHIP_IOAPIC,
            pin: gsi,
        });
    }
    routes
}

#[derive(Default)]
struct RouterState {
    next_gsi: u32,
    free: Vec<u32>,
    msi: BTreeMap<u32, (u64, u32)>,
}

/// The one owner of KVM's GSI routing table.
pub struct GsiRouter {
    chip: Arc<dyn IrqChip>,
    state: Mutex<RouterState>,
}

impl GsiRouter {
    pub fn new(chip: Arc<dyn IrqChip>) -> Self {
        Self {
            chip,
            state: Mutex::new(RouterState {
                next_gsi: FIRST_MSI_GSI,
                ..Default::default()
            }),
        }
    }

    pub fn chip(&self) -> &Arc<dyn IrqChip> {
        &self.chip
    }

    pub fn allocate_msi_gsi(&self) -> Result<u32, IrqError> {
        let mut state = self.state.lock().unwrap();
        if let Some(gsi) = state.free.pop() {
            return Ok(gsi);
        }
        if state.next_gsi >= MAX_GSI {
            return Err(IrqError::GsisExhausted);
        }
        state.next_gsi += 1;
        Ok(state.next_gsi - 1)
    }

    /// Drops `gsi`'s route (if any) and makes the GSI available again.
    pub fn release_msi_gsi(&self, gsi: u32) -> Result<(), IrqError> {
        let mut state = self.state.lock().unwrap();
        let had_route = state.msi.remove(&gsi).is_some();
        state.free.push(gsi);
        if had_route {
            self.commit(&state)?;
        }
        Ok(())
    }

    /// Points `gsi` at an MSI message. A table KVM refuses leaves the previous one in force.
    pub fn set_msi_route(&self, gsi: u32, address: u64, data: u32) -> Result<(), IrqError> {
        let mut state = self.state.lock().unwrap();
        if state.msi.get(&gsi) == Some(&(address, data)) {
            return Ok(());
        }
        let previous = state.msi.insert(gsi, (address, data));
        self.commit(&state).inspect_err(|_| {
            match previous {
                Some(p) => state.msi.insert(gsi, p),
                None => state.msi.remove(&gsi),
            };
        })
    }

    /// Sends the routing table as it stands (the irqchip routes alone before any MSI).
    pub fn install(&self) -> Result<(), IrqError> {
        self.commit(&self.state.lock().unwrap())
    }

    fn commit(&self, state: &RouterState) -> Result<(), IrqError> {
        let mut routes = irqchip_routes();
        routes.extend(
            state
                .msi
                .iter()
                .map(|(&gsi, &(address, data))| IrqRoute::Msi { gsi, address, data }),
        );
        self.chip
            .set_gsi_routing(&routes)
            .map_err(IrqError::Routing)
    }
}

/// A level-triggered INTx line on an IOAPIC pin, emulated with an irqfd and its resample fd:
/// the device asserts with [`IntxLine::assert`]; KVM lowers the line at EOI and signals the
/// resample fd, on which the device re-asserts if its interrupt is still pending.
pub struct IntxLine {
    chip: Arc<dyn IrqChip>,
    gsi: u32,
    trigger: EventFd,
    resample: EventFd,
}

impl IntxLine {
    pub fn new(chip: Arc<dyn IrqChip>, gsi: u32) -> Result<Self, IrqError> {
        let trigger = EventFd::new(EFD_NONBLOCK).map_err(IrqError::EventFd)?;
        let resample = EventFd::new(EFD_NONBLOCK).map_err(IrqError::EventFd)?;
        chip.register_irqfd(&trigger, gsi, Some(&resample))
            .map_err(|source| IrqError::Irqfd { gsi, source })?;
        Ok(Self {
            chip,
            gsi,
            trigger,
            resample,
        })
    }

    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    pub fn assert(&self) {
        if let Err(e) = self.trigger.write(1) {
            log::warn!("INTx GSI {}: cannot signal irqfd: {e}", self.gsi);
        }
    }

    /// Readable when the guest has EOI'd the line.
    pub fn resample_fd(&self) -> &EventFd {
        &self.resample
    }

    /// The irqfd KVM injects from (what [`IntxLine::assert`] signals).
    pub fn trigger_fd(&self) -> &EventFd {
        &self.trigger
    }
}

impl Drop for IntxLine {
    fn drop(&mut self) {
        let _ = self.chip.unregister_irqfd(&self.trigger, self.gsi);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// Records what would have reached KVM.
    #[derive(Default)]
    pub struct MockChip {
        pub tables: Mutex<Vec<Vec<IrqRoute>>>,
        pub irqfds: Mutex<Vec<(i32, u32, bool)>>,
        pub refuse_routing: std::sync::atomic::AtomicBool,
    }

    impl IrqChip for MockChip {
        fn set_gsi_routing(&self, routes: &[IrqRoute]) -> std::io::Result<()> {
            if self
                .refuse_routing
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                return Err(std::io::Error::from_raw_os_error(libc_einval()));
            }
            self.tables.lock().unwrap().push(routes.to_vec());
            Ok(())
        }
        fn register_irqfd(
            &self,
            fd: &EventFd,
            gsi: u32,
            resample: Option<&EventFd>,
        ) -> std::io::Result<()> {
            self.irqfds
                .lock()
                .unwrap()
                .push((fd.as_raw_fd(), gsi, resample.is_some()));
            Ok(())
        }
        fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> std::io::Result<()> {
            self.irqfds
                .lock()
                .unwrap()
                .retain(|&(f, g, _)| (f, g) != (fd.as_raw_fd(), gsi));
            Ok(())
        }
    }

    fn libc_einval() -> i32 {
        22
    }

    #[test]
    fn every_routing_table_keeps_the_irqchip_routes_for_gsis_0_to_23() {
        let chip = Arc::new(MockChip::default());
        let router = GsiRouter::new(chip.clone());
        let a = router.allocate_msi_gsi().unwrap();
        let b = router.allocate_msi_gsi().unwrap();
        assert_eq!((a, b), (24, 25));
        router.set_msi_route(a, 0xfee0_0000, 0x41).unwrap();
        router.set_msi_route(b, 0xfee0_1000, 0x42).unwrap();
        let tables = chip.tables.lock().unwrap();
        let last = tables.last().unwrap();
        for gsi in 0..24 {
            assert!(last.contains(&IrqRoute::Irqchip {
                gsi,
                chip: KVM_IRQCHIP_IOAPIC,
                pin: gsi
            }));
        }
        assert!(last.contains(&IrqRoute::Irqchip {
            gsi: 9,
            chip: KVM_IRQCHIP_PIC_SLAVE,
            pin: 1
        }));
        assert!(last.contains(&IrqRoute::Msi {
            gsi: a,
            address: 0xfee0_0000,
            data: 0x41
        }));
        assert!(last.contains(&IrqRoute::Msi {
            gsi: b,
            address: 0xfee0_1000,
            data: 0x42
        }));
    }

    #[test]
    fn unchanged_route_is_not_resent_and_refused_table_keeps_old_route() {
        let chip = Arc::new(MockChip::default());
        let router = GsiRouter::new(chip.clone());
        let gsi = router.allocate_msi_gsi().unwrap();
        router.set_msi_route(gsi, 0xfee0_0000, 1).unwrap();
        router.set_msi_route(gsi, 0xfee0_0000, 1).unwrap();
        assert_eq!(chip.tables.lock().unwrap().len(), 1);
        chip.refuse_routing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(router.set_msi_route(gsi, 0xfee0_0000, 2).is_err());
        chip.refuse_routing
            .store(false, std::sync::atomic::Ordering::SeqCst);
        router.install().unwrap();
        let tables = chip.tables.lock().unwrap();
        assert!(tables.last().unwrap().contains(&IrqRoute::Msi {
            gsi,
            address: 0xfee0_0000,
            data: 1
        }));
    }

    #[test]
    fn released_gsi_loses_its_route_and_is_reused() {
        let chip = Arc::new(MockChip::default());
        let router = GsiRouter::new(chip.clone());
        let gsi = router.allocate_msi_gsi().unwrap();
        router.set_msi_route(gsi, 0xfee0_0000, 1).unwrap();
        router.release_msi_gsi(gsi).unwrap();
        let tables = chip.tables.lock().unwrap();
        assert!(!tables
            .last()
            .unwrap()
            .iter()
            .any(|r| matches!(r, IrqRoute::Msi { .. })));
        drop(tables);
        assert_eq!(router.allocate_msi_gsi().unwrap(), gsi);
    }

    #[test]
    fn intx_line_registers_a_resampling_irqfd_and_unregisters_on_drop() {
        let chip = Arc::new(MockChip::default());
        let line = IntxLine::new(chip.clone(), 17).unwrap();
        assert_eq!(chip.irqfds.lock().unwrap().len(), 1);
        assert!(chip.irqfds.lock().unwrap()[0].2);
        line.assert();
        drop(line);
        assert!(chip.irqfds.lock().unwrap().is_empty());
    }
}
