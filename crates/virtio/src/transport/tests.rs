use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::test_utils::{guest_memory, router, MockRegistrar};

const MODERN_BASE: u64 = 0xc000_4000;
const LEGACY_BASE: u64 = 0xc040;

#[derive(Default)]
struct TestHandler {
    kicks: Mutex<Vec<usize>>,
    /// Plays a backend that signals interrupts itself.
    takes_direct: std::sync::atomic::AtomicBool,
    /// Each `route_interrupts` call: per queue, the vector handed over directly.
    routes: Mutex<Vec<Vec<Option<u16>>>>,
}

impl QueueHandler for TestHandler {
    fn process_queue(&self, queue: usize) {
        self.kicks.lock().unwrap().push(queue);
    }
    fn completion_fd(&self, _: usize) -> Option<std::os::fd::RawFd> {
        None
    }
    fn process_completions(&self, _: usize) {}
    fn busy(&self, _: usize) -> bool {
        false
    }
    fn num_queues(&self) -> usize {
        2
    }
    fn takes_direct_interrupts(&self) -> bool {
        self.takes_direct.load(Ordering::SeqCst)
    }
    fn route_interrupts(&self, direct: Vec<Option<DirectInterrupt>>) {
        let vectors = direct
            .iter()
            .map(|d| d.as_ref().map(|d| d.vector))
            .collect();
        self.routes.lock().unwrap().push(vectors);
    }
}

struct TestDevice {
    handler: Arc<TestHandler>,
    activated_queues: Arc<Mutex<Vec<Vec<usize>>>>,
    resets: Arc<AtomicUsize>,
    config: [u8; 8],
}

impl VirtioDevice for TestDevice {
    fn device_type(&self) -> u16 {
        2
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 16]
    }
    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
    }
    fn config_len(&self) -> usize {
        self.config.len()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, _: u64, _: &[u8]) {}
    fn activate(&mut self, a: Activation) -> Result<Arc<dyn QueueHandler>, ActivateError> {
        self.activated_queues
            .lock()
            .unwrap()
            .push(a.queues.iter().map(|q| q.index).collect());
        Ok(self.handler.clone())
    }
    fn reset(&mut self) {
        self.resets.fetch_add(1, Ordering::SeqCst);
    }
}

struct Rig {
    pci: VirtioPciDevice,
    registrar: Arc<MockRegistrar>,
    handler: Arc<TestHandler>,
    activated_queues: Arc<Mutex<Vec<Vec<usize>>>>,
    resets: Arc<AtomicUsize>,
}

fn rig(kind: TransportKind, ioeventfd: bool) -> Rig {
    let handler = Arc::new(TestHandler::default());
    let activated_queues = Arc::new(Mutex::new(Vec::new()));
    let resets = Arc::new(AtomicUsize::new(0));
    let device = TestDevice {
        handler: handler.clone(),
        activated_queues: activated_queues.clone(),
        resets: resets.clone(),
        config: [1, 2, 3, 4, 5, 6, 7, 8],
    };
    let registrar = Arc::new(MockRegistrar::default());
    let mut pci = VirtioPciDevice::new(
        "vtest",
        Box::new(device),
        guest_memory(0x10_0000),
        TransportOptions {
            kind,
            ioeventfd,
            poll: Duration::ZERO,
            intx_gsi: None,
            io_priority_boost: false,
        },
        router(),
        registrar.clone(),
    )
    .unwrap();
    // Firmware's BAR placement, as PciRoot does it.
    let bars: Vec<_> = pci.config().bars().collect();
    for (index, kind, _, _) in bars {
        let base = match kind {
            BarKind::Io => LEGACY_BASE,
            BarKind::Mem32 => 0xc000_0000,
            BarKind::Mem64 => MODERN_BASE,
        };
        pci.config_mut().set_bar_address(index, base);
    }
    Rig {
        pci,
        registrar,
        handler,
        activated_queues,
        resets,
    }
}

impl Rig {
    fn common_write(&mut self, offset: u64, value: u64, len: usize) {
        self.pci.write_bar(
            MODERN_BAR,
            COMMON_CFG_OFFSET + offset,
            &value.to_le_bytes()[..len],
        );
    }
    fn common_read(&mut self, offset: u64, len: usize) -> u64 {
        let mut data = [0u8; 8];
        self.pci
            .read_bar(MODERN_BAR, COMMON_CFG_OFFSET + offset, &mut data[..len]);
        u64::from_le_bytes(data)
    }
    fn legacy_write(&mut self, offset: u64, value: u64, len: usize) {
        self.pci
            .write_bar(LEGACY_BAR, offset, &value.to_le_bytes()[..len]);
    }
    fn legacy_read(&mut self, offset: u64, len: usize) -> u64 {
        let mut data = [0u8; 8];
        self.pci.read_bar(LEGACY_BAR, offset, &mut data[..len]);
        u64::from_le_bytes(data)
    }
    fn status(&mut self) -> u8 {
        self.common_read(0x14, 1) as u8
    }

    /// A modern driver's bring-up, one status bit at a time, with queues of `size`.
    fn modern_bring_up(&mut self, size: u16) {
        self.common_write(0x14, u64::from(STATUS_ACKNOWLEDGE), 1);
        self.common_write(0x14, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER), 1);
        self.common_write(0x08, 1, 4);
        self.common_write(0x0c, 1, 4); // VERSION_1 (bit 32)
        self.common_write(
            0x14,
            u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK),
            1,
        );
        for q in 0..2u64 {
            self.common_write(0x16, q, 2);
            self.common_write(0x18, u64::from(size), 2);
            self.common_write(0x20, 0x1_0000 + q * 0x1000, 8);
            self.common_write(0x28, 0x1_0200 + q * 0x1000, 8);
            self.common_write(0x30, 0x1_0400 + q * 0x1000, 8);
            self.common_write(0x1c, 1, 2);
        }
        self.common_write(
            0x14,
            u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK),
            1,
        );
    }

    fn legacy_bring_up(&mut self) {
        self.legacy_write(0x12, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER), 1);
        self.legacy_write(0x04, 0, 4);
        for q in 0..2u64 {
            self.legacy_write(0x0e, q, 2);
            self.legacy_write(0x08, 0x10 + q, 4);
        }
        self.legacy_write(
            0x12,
            u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK),
            1,
        );
    }

    fn kicks(&self) -> Vec<usize> {
        self.handler.kicks.lock().unwrap().clone()
    }
}

fn modern_doorbell(queue: u16) -> Doorbell {
    Doorbell {
        addr: IoAddress::Mmio(MODERN_BASE + NOTIFY_OFFSET + u64::from(queue) * 4),
        datamatch: queue,
    }
}

fn legacy_doorbell(queue: u16) -> Doorbell {
    Doorbell {
        addr: IoAddress::Pio(LEGACY_BASE + 16),
        datamatch: queue,
    }
}

#[test]
fn pci_ids_follow_the_transport_flavour() {
    let r = rig(TransportKind::Transitional, true);
    assert_eq!(r.pci.config().device_id(), 0x1001);
    assert!(r.pci.config().bar_address(LEGACY_BAR).is_some());
    assert!(r.pci.config().bar_address(MODERN_BAR).is_some());
    let r = rig(TransportKind::Modern, true);
    assert_eq!(r.pci.config().device_id(), 0x1042);
    assert!(r.pci.config().bar_address(LEGACY_BAR).is_none());
    let r = rig(TransportKind::Legacy, true);
    assert_eq!(r.pci.config().device_id(), 0x1001);
    assert!(r.pci.config().bar_address(MODERN_BAR).is_none());
}

#[test]
fn modern_capabilities_point_into_the_modern_bar() {
    let r = rig(TransportKind::Modern, true);
    let config = r.pci.config();
    let mut types = Vec::new();
    let mut cap = config.bytes(0x34, 1)[0] as usize;
    while cap != 0 {
        let bytes = config.bytes(cap, 4);
        if bytes[0] == VIRTIO_PCI_CAP_ID {
            types.push(bytes[3]);
            if bytes[3] != CAP_PCI_CFG {
                assert_eq!(config.bytes(cap + 4, 1)[0], MODERN_BAR as u8);
            }
        }
        cap = bytes[1] as usize;
    }
    assert_eq!(
        types,
        vec![
            CAP_COMMON_CFG,
            CAP_ISR_CFG,
            CAP_DEVICE_CFG,
            CAP_NOTIFY_CFG,
            CAP_PCI_CFG
        ]
    );
}

#[test]
fn modern_bring_up_activates_and_registers_one_mmio_doorbell_per_queue() {
    let mut r = rig(TransportKind::Transitional, true);
    r.modern_bring_up(8);
    assert_eq!(r.status() & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
    assert_eq!(*r.activated_queues.lock().unwrap(), vec![vec![0, 1]]);
    assert_eq!(
        r.registrar.doorbells(),
        [modern_doorbell(0), modern_doorbell(1)].into()
    );
    assert_eq!(r.pci.queue_reports()[1].mode, NotifyMode::Ioeventfd);
}

#[test]
fn legacy_bring_up_registers_pio_doorbells_with_queue_index_datamatch() {
    let mut r = rig(TransportKind::Transitional, true);
    r.legacy_bring_up();
    assert_eq!(*r.activated_queues.lock().unwrap(), vec![vec![0, 1]]);
    assert_eq!(
        r.registrar.doorbells(),
        [legacy_doorbell(0), legacy_doorbell(1)].into()
    );
}

#[test]
fn legacy_queue_pfn_lays_out_rings_on_the_0_9_5_pattern() {
    let mut r = rig(TransportKind::Legacy, false);
    r.legacy_write(0x0e, 0, 2);
    assert_eq!(r.legacy_read(0x0c, 2), 16);
    r.legacy_write(0x08, 0x10, 4);
    let q = r.pci.regs.queues[0];
    assert_eq!((q.desc, q.avail, q.used), (0x10000, 0x10100, 0x11000));
    assert_eq!(r.legacy_read(0x08, 4), 0x10);
}

#[test]
fn legacy_host_features_never_offer_version_1() {
    let mut r = rig(TransportKind::Transitional, true);
    assert_eq!(
        r.legacy_read(0, 4) & (1 << VIRTIO_RING_F_EVENT_IDX),
        1 << VIRTIO_RING_F_EVENT_IDX
    );
    r.common_write(0x00, 1, 4);
    assert_eq!(
        r.common_read(0x04, 4),
        1,
        "modern sees VERSION_1 in the high word"
    );
}

#[test]
fn features_without_version_1_are_refused_at_features_ok() {
    let mut r = rig(TransportKind::Modern, true);
    r.common_write(0x14, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER), 1);
    r.common_write(
        0x14,
        u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK),
        1,
    );
    assert_eq!(r.status() & STATUS_FEATURES_OK, 0);
}

#[test]
fn features_not_offered_are_refused_at_features_ok() {
    let mut r = rig(TransportKind::Modern, true);
    r.common_write(0x08, 1, 4);
    r.common_write(0x0c, 1 | (1 << 5), 4);
    r.common_write(0x14, u64::from(STATUS_FEATURES_OK), 1);
    assert_eq!(r.status() & STATUS_FEATURES_OK, 0);
}

#[test]
fn queue_size_that_is_not_a_power_of_two_sets_needs_reset() {
    let mut r = rig(TransportKind::Modern, true);
    r.modern_bring_up(6);
    assert_ne!(r.status() & STATUS_NEEDS_RESET, 0);
    assert!(r.activated_queues.lock().unwrap().is_empty());
    assert!(r.registrar.doorbells().is_empty());
    // A reset clears it.
    r.common_write(0x14, 0, 1);
    assert_eq!(r.status(), 0);
}

#[test]
fn queue_larger_than_max_sets_needs_reset() {
    let mut r = rig(TransportKind::Modern, true);
    r.modern_bring_up(32);
    assert_ne!(r.status() & STATUS_NEEDS_RESET, 0);
}

#[test]
fn rings_outside_guest_memory_set_needs_reset() {
    let mut r = rig(TransportKind::Modern, true);
    r.common_write(0x08, 1, 4);
    r.common_write(0x0c, 1, 4);
    r.common_write(0x14, u64::from(STATUS_FEATURES_OK), 1);
    r.common_write(0x16, 0, 2);
    r.common_write(0x18, 8, 2);
    r.common_write(0x20, 0xff_ff00, 8);
    r.common_write(0x1c, 1, 2);
    r.common_write(0x14, u64::from(STATUS_FEATURES_OK | STATUS_DRIVER_OK), 1);
    assert_ne!(r.status() & STATUS_NEEDS_RESET, 0);
}

impl Rig {
    fn msix_control(&mut self, control: u16) {
        let at = self.pci.msix_cap + 2;
        self.pci
            .write_config(at / 4, (at % 4) as u64, &control.to_le_bytes());
    }
    fn msix_entry_control(&mut self, vector: u64, masked: bool) {
        self.pci
            .write_bar(MSIX_BAR, vector * 16 + 12, &u32::from(masked).to_le_bytes());
    }
    fn last_route(&self) -> Option<Vec<Option<u16>>> {
        self.handler.routes.lock().unwrap().last().cloned()
    }
}

#[test]
fn a_backend_gets_a_queues_irqfd_only_while_its_vector_can_fire() {
    const ENABLE: u16 = 1 << 15;
    const FUNCTION_MASK: u16 = 1 << 14;
    let mut r = rig(TransportKind::Modern, true);
    r.handler.takes_direct.store(true, Ordering::SeqCst);
    r.msix_control(ENABLE);
    r.pci.write_bar(MSIX_BAR, 0, &0xfee0_0000u32.to_le_bytes());
    r.pci.write_bar(MSIX_BAR, 8, &0x41u32.to_le_bytes());
    r.msix_entry_control(0, false);
    r.common_write(0x16, 0, 2);
    r.common_write(0x1a, 0, 2); // queue 0 -> vector 0; queue 1 keeps NO_VECTOR
    assert_eq!(r.last_route(), None, "nothing is routed before DRIVER_OK");
    r.modern_bring_up(16);
    assert_eq!(r.last_route(), Some(vec![Some(0), None]));
    r.msix_entry_control(0, true);
    assert_eq!(r.last_route(), Some(vec![None, None]), "vector masked");
    r.msix_entry_control(0, false);
    assert_eq!(r.last_route(), Some(vec![Some(0), None]), "unmasked");
    r.msix_control(ENABLE | FUNCTION_MASK);
    assert_eq!(r.last_route(), Some(vec![None, None]), "function masked");
    r.msix_control(ENABLE);
    assert_eq!(
        r.last_route(),
        Some(vec![Some(0), None]),
        "function unmasked"
    );
    r.common_write(0x16, 1, 2);
    r.common_write(0x1a, 0, 2); // queue 1 -> vector 0 after DRIVER_OK
    assert_eq!(
        r.last_route(),
        Some(vec![Some(0), Some(0)]),
        "vector reassigned"
    );
    r.msix_control(0);
    assert_eq!(r.last_route(), Some(vec![None, None]), "MSI-X off: INTx");
}

#[test]
fn msix_vector_out_of_range_reads_back_no_vector() {
    let mut r = rig(TransportKind::Modern, true);
    r.common_write(0x10, 2, 2);
    assert_eq!(r.common_read(0x10, 2), 2);
    r.common_write(0x10, 3, 2);
    assert_eq!(r.common_read(0x10, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
    r.common_write(0x16, 1, 2);
    r.common_write(0x1a, 1, 2);
    assert_eq!(r.common_read(0x1a, 2), 1);
    r.common_write(0x1a, 0x800, 2);
    assert_eq!(r.common_read(0x1a, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
}

#[test]
fn sync_mode_notify_runs_the_handler_inline_and_counts_an_exit() {
    let mut r = rig(TransportKind::Modern, false);
    r.modern_bring_up(8);
    assert!(r.registrar.doorbells().is_empty());
    r.pci
        .write_bar(MODERN_BAR, NOTIFY_OFFSET + 4, &1u16.to_le_bytes());
    assert_eq!(r.kicks(), vec![1]);
    assert_eq!(r.pci.queue_reports()[1].counters.kicks_exit, 1);
    assert_eq!(
        r.pci.queue_reports()[1].mode,
        NotifyMode::Sync(crate::notifier::SyncReason::PropertyOff)
    );
}

#[test]
fn legacy_notify_with_a_nonexistent_queue_is_ignored() {
    let mut r = rig(TransportKind::Legacy, false);
    r.legacy_bring_up();
    r.legacy_write(16, 7, 2);
    r.legacy_write(16, 0xffff, 2);
    assert!(r.kicks().is_empty());
    r.legacy_write(16, 1, 2);
    assert_eq!(r.kicks(), vec![1]);
}

#[test]
fn notify_for_a_nonexistent_modern_queue_is_ignored() {
    let mut r = rig(TransportKind::Modern, false);
    r.modern_bring_up(8);
    r.pci
        .write_bar(MODERN_BAR, NOTIFY_OFFSET + 0xffc, &0u16.to_le_bytes());
    assert!(r.kicks().is_empty());
}

#[test]
fn reset_processes_a_pending_ioeventfd_kick_then_deregisters_and_resets_the_device() {
    let mut r = rig(TransportKind::Modern, true);
    r.modern_bring_up(8);
    let kicks = r.pci.kick_eventfds().to_vec();
    assert!(r.registrar.guest_writes(modern_doorbell(0), &kicks));
    r.common_write(0x14, 0, 1);
    assert_eq!(r.kicks(), vec![0], "the kick was not lost");
    assert!(r.registrar.doorbells().is_empty());
    assert_eq!(r.resets.load(Ordering::SeqCst), 1);
    assert_eq!(r.status(), 0);
    assert_eq!(r.common_read(0x1c, 2), 0, "queues disabled after reset");
}

#[test]
fn runtime_ioeventfd_switch_changes_the_registrations() {
    let mut r = rig(TransportKind::Modern, true);
    r.modern_bring_up(8);
    r.pci.set_ioeventfd(false);
    assert!(r.registrar.doorbells().is_empty());
    r.pci.set_ioeventfd(true);
    assert_eq!(r.registrar.doorbells().len(), 2);
}

#[test]
fn pause_deregisters_and_resume_restores_the_doorbells() {
    let mut r = rig(TransportKind::Modern, true);
    r.modern_bring_up(8);
    assert!(r.pci.pause());
    assert!(r.registrar.doorbells().is_empty());
    r.pci.resume();
    assert_eq!(r.registrar.doorbells().len(), 2);
}

#[test]
fn moving_the_modern_bar_moves_the_doorbells() {
    let mut r = rig(TransportKind::Modern, true);
    r.modern_bring_up(8);
    let moved = r
        .pci
        .write_config(8, 0, &0xd000_0000u32.to_le_bytes())
        .unwrap();
    r.pci.config_mut().commit_bar_move(&moved);
    r.pci.bar_moved(&moved);
    let expected: std::collections::HashSet<_> = (0..2u16)
        .map(|q| Doorbell {
            addr: IoAddress::Mmio(0xd000_0000 + NOTIFY_OFFSET + u64::from(q) * 4),
            datamatch: q,
        })
        .collect();
    assert_eq!(r.registrar.doorbells(), expected);
}

#[test]
fn device_config_is_reachable_through_both_interfaces() {
    let mut r = rig(TransportKind::Transitional, true);
    let mut data = [0u8; 4];
    r.pci.read_bar(MODERN_BAR, DEVICE_CFG_OFFSET + 2, &mut data);
    assert_eq!(data, [3, 4, 5, 6]);
    // Legacy: config follows the 20-byte header while MSI-X is off.
    assert_eq!(r.legacy_read(0x14, 1), 1);
}

#[test]
fn refused_registration_keeps_the_device_working_in_sync_mode() {
    let handler = Arc::new(TestHandler::default());
    let device = TestDevice {
        handler: handler.clone(),
        activated_queues: Default::default(),
        resets: Default::default(),
        config: [0; 8],
    };
    let registrar = Arc::new(MockRegistrar {
        capacity: Some(1),
        ..Default::default()
    });
    let mut pci = VirtioPciDevice::new(
        "vtest",
        Box::new(device),
        guest_memory(0x10_0000),
        TransportOptions {
            kind: TransportKind::Modern,
            ioeventfd: true,
            poll: Duration::ZERO,
            intx_gsi: None,
            io_priority_boost: false,
        },
        router(),
        registrar.clone(),
    )
    .unwrap();
    pci.config_mut().set_bar_address(MODERN_BAR, MODERN_BASE);
    let mut r = Rig {
        pci,
        registrar,
        handler,
        activated_queues: Default::default(),
        resets: Default::default(),
    };
    r.modern_bring_up(8);
    assert_eq!(
        r.status() & STATUS_NEEDS_RESET,
        0,
        "a refusal never fails the device"
    );
    assert!(r.registrar.doorbells().is_empty());
    assert_eq!(
        r.pci.queue_reports()[0].mode,
        NotifyMode::Sync(crate::notifier::SyncReason::KvmRefused)
    );
    r.pci
        .write_bar(MODERN_BAR, NOTIFY_OFFSET, &0u16.to_le_bytes());
    assert_eq!(r.kicks(), vec![0]);
}

#[test]
fn pci_cfg_capability_reaches_the_common_configuration() {
    let mut r = rig(TransportKind::Modern, true);
    let config = r.pci.config();
    let mut cap = config.bytes(0x34, 1)[0] as usize;
    while config.bytes(cap, 4)[0] != VIRTIO_PCI_CAP_ID || config.bytes(cap + 3, 1)[0] != CAP_PCI_CFG
    {
        cap = config.bytes(cap + 1, 1)[0] as usize;
        assert_ne!(cap, 0, "no PCI_CFG capability");
    }
    let reg = cap / 4;
    // Window: BAR 4, common cfg num_queues (offset 0x12), 2 bytes.
    r.pci.write_config(reg + 1, 0, &[MODERN_BAR as u8, 0, 0, 0]);
    r.pci.write_config(reg + 2, 0, &0x12u32.to_le_bytes());
    r.pci.write_config(reg + 3, 0, &2u32.to_le_bytes());
    assert_eq!(r.pci.read_config(reg + 4) & 0xffff, 2);
    // Write queue_select = 1 through the window, read it back directly.
    r.pci.write_config(reg + 2, 0, &0x16u32.to_le_bytes());
    r.pci.write_config(reg + 4, 0, &1u32.to_le_bytes());
    assert_eq!(r.common_read(0x16, 2), 1);
    // A misaligned window does nothing.
    r.pci.write_config(reg + 2, 0, &0x13u32.to_le_bytes());
    assert_eq!(r.pci.read_config(reg + 4), 0);
}
