//! Snapshot and restore of whole devices through [`PciDevices`], driven as a guest driver
//! would through the buses, on mock KVM interfaces: a virtio-blk disk on a real image file
//! brought up, used, paused, saved (through JSON), and restored into a fresh attach on the
//! same guest memory.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::GuestMemoryMmap;
use kickvm_bus::{Bus, IoAddress};
use kickvm_pci::IrqRoute;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};

use super::*;
use crate::ioevent::Doorbell;
use crate::notifier::NotifyMode;
use crate::test_utils::{guest_memory, MockChip, MockRegistrar};
use crate::{BlkConfig, PciDevices, PciOptions};

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const RING: u64 = 0x10_0000;
const MOVED_BAR: u64 = 0xd000_0000;

struct TempImage(std::path::PathBuf);

impl TempImage {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "kickvm-snapshot-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let mut content = Vec::new();
        for sector in 0..2048u32 {
            content.extend(std::iter::repeat_n((sector % 251) as u8, 512));
        }
        std::fs::write(&path, content).unwrap();
        TempImage(path)
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct Machine {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    chip: Arc<MockChip>,
    registrar: Arc<MockRegistrar>,
    pci: PciDevices,
}

/// A VM's PCI side on `mem` with one disk per `--disk` option string.
fn machine(mem: &GuestMemoryMmap, disks: &[String]) -> Machine {
    let pio = Arc::new(Bus::new());
    let mmio = Arc::new(Bus::new());
    let chip = Arc::new(MockChip::default());
    let registrar = Arc::new(MockRegistrar::default());
    let mut pci = PciDevices::with_backends(
        chip.clone(),
        registrar.clone(),
        mem.clone(),
        pio.clone(),
        mmio.clone(),
        PciOptions::default(),
    )
    .unwrap();
    for disk in disks {
        let config: BlkConfig = disk.parse().unwrap();
        pci.add_disk(&config).unwrap();
    }
    Machine {
        pio,
        mmio,
        chip,
        registrar,
        pci,
    }
}

impl Machine {
    fn config_read(&self, reg: u32) -> u32 {
        self.pio.write(
            0xcf8,
            &((1u32 << 31) | (1 << 11) | (reg << 2)).to_le_bytes(),
        );
        let mut data = [0u8; 4];
        assert!(self.pio.read(0xcfc, &mut data));
        u32::from_le_bytes(data)
    }
    fn config_write(&self, reg: u32, value: u32) {
        self.pio.write(
            0xcf8,
            &((1u32 << 31) | (1 << 11) | (reg << 2)).to_le_bytes(),
        );
        self.pio.write(0xcfc, &value.to_le_bytes());
    }
    fn find_cap(&self, id: u8, cfg_type: Option<u8>) -> u32 {
        let mut cap = self.config_read(0x34 / 4) & 0xff;
        while cap != 0 {
            let head = self.config_read(cap / 4);
            if head as u8 == id && cfg_type.is_none_or(|t| (head >> 24) as u8 == t) {
                return cap;
            }
            cap = (head >> 8) & 0xff;
        }
        panic!("capability {id:#x} not found");
    }
    fn bar(&self, index: u32) -> u64 {
        let low = self.config_read(4 + index);
        let high = if low & 0x6 == 0x4 {
            self.config_read(5 + index)
        } else {
            0
        };
        (u64::from(high) << 32) | u64::from(low & !0xf)
    }
    fn mmio_write(&self, addr: u64, value: u64, len: usize) {
        assert!(
            self.mmio.write(addr, &value.to_le_bytes()[..len]),
            "nothing at {addr:#x}"
        );
    }
    fn mmio_read(&self, addr: u64, len: usize) -> u64 {
        let mut data = [0u8; 8];
        assert!(
            self.mmio.read(addr, &mut data[..len]),
            "nothing at {addr:#x}"
        );
        u64::from_le_bytes(data)
    }
    fn disk(&self) -> crate::SharedVirtioDevice {
        self.pci.device("disk0").unwrap()
    }
    fn notify_addr(&self) -> u64 {
        let notify_cap = self.find_cap(0x09, Some(2));
        self.bar(4) + u64::from(self.config_read(notify_cap / 4 + 2))
    }
    /// The guest's doorbell write for queue 0: through KVM's ioeventfd when one is
    /// registered there (returns true), else an exit to the device.
    fn kick(&self) -> bool {
        let doorbell = Doorbell {
            addr: IoAddress::Mmio(self.notify_addr()),
            datamatch: 0,
        };
        let kicks = self.disk().lock().unwrap().kick_eventfds().to_vec();
        if self.registrar.guest_writes(doorbell, &kicks) {
            return true;
        }
        self.mmio_write(self.notify_addr(), 0, 2);
        false
    }
    /// What the guest reads of the device: common configuration (queue 0) and MSI-X table.
    fn guest_view(&self) -> Vec<u64> {
        let common = self.bar(4);
        self.mmio_write(common + 0x16, 0, 2);
        let mut view: Vec<u64> = [
            (0x10, 2),
            (0x12, 2),
            (0x14, 1),
            (0x15, 1),
            (0x16, 2),
            (0x18, 2),
            (0x1a, 2),
            (0x1c, 2),
            (0x20, 8),
            (0x28, 8),
            (0x30, 8),
        ]
        .iter()
        .map(|&(offset, len)| self.mmio_read(common + offset, len))
        .collect();
        for half in [0, 1] {
            self.mmio_write(common + 0x08, half, 4);
            view.push(self.mmio_read(common + 0x0c, 4));
        }
        let table = self.bar(1);
        view.extend((0..8).map(|dword| self.mmio_read(table + dword * 4, 4)));
        view.push(u64::from(self.config_read(self.find_cap(0x11, None) / 4)));
        view
    }
}

/// The used ring on its own page (virtio-queue's mock puts it over the available ring's end).
fn used_ring(mock: &MockSplitQueue<GuestMemoryMmap>) -> GuestAddress {
    mock.desc_table_addr().unchecked_add(0x8000)
}

/// A modern driver: MSI-X on with vector 0 (entry 0 unmasked) for queue 0, one queue of 16.
fn bring_up(m: &Machine, mock: &MockSplitQueue<GuestMemoryMmap>) {
    let msix_cap = m.find_cap(0x11, None);
    let table = m.bar(1);
    m.mmio_write(table, 0xfee0_0000, 4);
    m.mmio_write(table + 8, 0x41, 4);
    m.mmio_write(table + 12, 0, 4);
    let control = m.config_read(msix_cap / 4);
    m.config_write(msix_cap / 4, control | (1 << 31));
    let common = m.bar(4);
    for status in [1u64, 3] {
        m.mmio_write(common + 0x14, status, 1);
    }
    m.mmio_write(common + 0x08, 0, 4);
    m.mmio_write(common + 0x0c, 1 << 29, 4); // EVENT_IDX
    m.mmio_write(common + 0x08, 1, 4);
    m.mmio_write(common + 0x0c, 1, 4); // VERSION_1
    m.mmio_write(common + 0x14, 0xb, 1);
    m.mmio_write(common + 0x10, 0, 2);
    m.mmio_write(common + 0x16, 0, 2);
    m.mmio_write(common + 0x18, 16, 2);
    m.mmio_write(common + 0x1a, 0, 2);
    m.mmio_write(common + 0x20, mock.desc_table_addr().0, 8);
    m.mmio_write(common + 0x28, mock.avail_addr().0, 8);
    m.mmio_write(common + 0x30, used_ring(mock).0, 8);
    m.mmio_write(common + 0x1c, 1, 2);
    m.mmio_write(common + 0x14, 0xf, 1);
    assert_eq!(m.mmio_read(common + 0x14, 1), 0xf, "DRIVER_OK");
}

/// Request `n` (0..5): a one-sector read of `sector`, made available (not kicked).
fn add_read(mem: &GuestMemoryMmap, mock: &MockSplitQueue<GuestMemoryMmap>, n: u16, sector: u64) {
    let base = 0x20_0000 + u64::from(n) * 0x1000;
    mem.write_obj(0u32, GuestAddress(base)).unwrap();
    mem.write_obj(sector, GuestAddress(base + 8)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(base + 0x800)).unwrap();
    let first = n * 3;
    let descs: Vec<RawDescriptor> = [
        Descriptor::new(base, 16, NEXT, first + 1),
        Descriptor::new(base + 0x200, 512, NEXT | WRITE, first + 2),
        Descriptor::new(base + 0x800, 1, WRITE, 0),
    ]
    .into_iter()
    .map(RawDescriptor::from)
    .collect();
    for (i, desc) in descs.into_iter().enumerate() {
        let at = mock
            .desc_table_addr()
            .unchecked_add(16 * (u64::from(first) + i as u64));
        mem.write_obj(desc, at).unwrap();
    }
    let idx_addr = mock.avail_addr().unchecked_add(2);
    let idx: u16 = mem.read_obj(idx_addr).unwrap();
    let slot = mock.avail_addr().unchecked_add(4 + 2 * u64::from(idx % 16));
    mem.write_obj(first, slot).unwrap();
    // used_event: interrupt when this one is used (EVENT_IDX).
    let used_event = mock.avail_addr().unchecked_add(4 + 2 * 16);
    mem.write_obj(idx, used_event).unwrap();
    std::sync::atomic::fence(Ordering::Release);
    mem.write_obj(idx.wrapping_add(1), idx_addr).unwrap();
}

fn used_idx(mem: &GuestMemoryMmap, mock: &MockSplitQueue<GuestMemoryMmap>) -> u16 {
    mem.read_obj(used_ring(mock).unchecked_add(2)).unwrap()
}

fn wait_used(mem: &GuestMemoryMmap, mock: &MockSplitQueue<GuestMemoryMmap>, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while used_idx(mem, mock) < want {
        assert!(
            Instant::now() < deadline,
            "request {want} never completed (used idx {})",
            used_idx(mem, mock)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Request `n` completed OK with sector `sector`'s bytes, as used element `slot`.
fn check_read(
    mem: &GuestMemoryMmap,
    mock: &MockSplitQueue<GuestMemoryMmap>,
    n: u16,
    sector: u64,
    slot: u64,
) {
    let base = 0x20_0000 + u64::from(n) * 0x1000;
    assert_eq!(mem.read_obj::<u8>(GuestAddress(base + 0x800)).unwrap(), 0);
    let mut data = [0u8; 512];
    mem.read_slice(&mut data, GuestAddress(base + 0x200))
        .unwrap();
    assert!(data.iter().all(|&b| u64::from(b) == sector % 251));
    let elem = used_ring(mock).unchecked_add(4 + 8 * slot);
    assert_eq!(mem.read_obj::<u32>(elem).unwrap(), u32::from(n * 3));
}

fn irqfd_fired(m: &Machine, vector: u16) -> bool {
    let disk = m.disk();
    let device = disk.lock().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if device
            .msix()
            .lock()
            .unwrap()
            .irqfd(vector)
            .unwrap()
            .read()
            .is_ok()
        {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn json_round_trip(snapshot: &PciSnapshot) -> PciSnapshot {
    let json = serde_json::to_string(snapshot).unwrap();
    let back: PciSnapshot = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, snapshot);
    back
}

/// Three requests done, a fourth made available but not kicked, the VM paused and saved;
/// the disk restored into a fresh attach on the same memory takes the fourth (restore kicks
/// every queue) and a fifth the guest kicks, at used slots 3 and 4.
fn save_use_restore(ioeventfd: &str, move_bar: bool) {
    let image = TempImage::new();
    let disk = format!(
        "path={},transport=modern,engine=sync,ioeventfd={ioeventfd}",
        image.0.display()
    );
    let mem = guest_memory(16 << 20);
    let a = machine(&mem, std::slice::from_ref(&disk));
    if move_bar {
        a.config_write(8, MOVED_BAR as u32);
        assert_eq!(a.bar(4), MOVED_BAR);
    }
    let mock = MockSplitQueue::create(&mem, GuestAddress(RING), 16);
    bring_up(&a, &mock);
    for n in 0..3 {
        add_read(&mem, &mock, n, 10 + u64::from(n));
        assert_eq!(a.kick(), ioeventfd == "on");
        wait_used(&mem, &mock, n + 1);
    }
    assert!(irqfd_fired(&a, 0));
    add_read(&mem, &mock, 3, 13);
    a.pci.pause_all();
    let view = a.guest_view();
    let snapshot = json_round_trip(&a.pci.snapshot().unwrap());
    let position = snapshot.devices[0].transport.queues[0].position.unwrap();
    assert_eq!((position.next_avail, position.next_used), (3, 3));
    assert!(position.event_idx);
    drop(a);
    assert_eq!(used_idx(&mem, &mock), 3, "paused: the fourth waits");

    let mut b = machine(&mem, &[disk]);
    b.pci.restore(&snapshot).unwrap();
    assert_eq!(b.bar(4), if move_bar { MOVED_BAR } else { b.bar(4) });
    wait_used(&mem, &mock, 4);
    check_read(&mem, &mock, 3, 13, 3);
    assert!(irqfd_fired(&b, 0), "the restored vector fires");
    assert_eq!(b.guest_view(), view);
    let mode = b.disk().lock().unwrap().queue_reports()[0].mode;
    if ioeventfd == "on" {
        assert_eq!(mode, NotifyMode::Ioeventfd);
        let doorbell = Doorbell {
            addr: IoAddress::Mmio(b.notify_addr()),
            datamatch: 0,
        };
        assert!(b.registrar.doorbells().contains(&doorbell));
    } else {
        assert_ne!(mode, NotifyMode::Ioeventfd);
    }
    add_read(&mem, &mock, 4, 14);
    assert_eq!(b.kick(), ioeventfd == "on");
    wait_used(&mem, &mock, 5);
    check_read(&mem, &mock, 4, 14, 4);
    // The restored MSI-X entry is routed: vector 0's GSI to the saved message.
    let gsi = b
        .disk()
        .lock()
        .unwrap()
        .msix()
        .lock()
        .unwrap()
        .gsi(0)
        .unwrap();
    assert!(b.chip.routes.lock().unwrap().contains(&IrqRoute::Msi {
        gsi,
        address: 0xfee0_0000,
        data: 0x41
    }));
}

#[test]
fn a_restored_disk_with_ioeventfd_carries_on_at_the_saved_ring_positions() {
    save_use_restore("on", false);
}

#[test]
fn a_restored_disk_with_sync_kicks_carries_on_at_the_saved_ring_positions() {
    save_use_restore("off", false);
}

#[test]
fn a_moved_bar_is_at_its_moved_address_after_restore_with_its_doorbell() {
    save_use_restore("on", true);
}

#[test]
fn msix_masks_and_pending_bits_survive_and_the_vector_fires_on_unmask() {
    let image = TempImage::new();
    let disk = format!("path={},transport=modern,engine=sync", image.0.display());
    let mem = guest_memory(16 << 20);
    let a = machine(&mem, std::slice::from_ref(&disk));
    let mock = MockSplitQueue::create(&mem, GuestAddress(RING), 16);
    bring_up(&a, &mock);
    let table = a.bar(1);
    a.mmio_write(table + 12, 1, 4); // vector 0 masked
    add_read(&mem, &mock, 0, 5);
    a.kick();
    wait_used(&mem, &mock, 1);
    let pba = table + 0x800;
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.mmio_read(pba, 8) & 1 == 0 {
        assert!(Instant::now() < deadline, "vector 0 never pending");
        std::thread::sleep(Duration::from_millis(1));
    }
    a.pci.pause_all();
    let snapshot = json_round_trip(&a.pci.snapshot().unwrap());
    drop(a);

    let mut b = machine(&mem, &[disk]);
    b.pci.restore(&snapshot).unwrap();
    let table = b.bar(1);
    assert_eq!(b.mmio_read(table + 12, 4), 1, "still masked");
    assert_eq!(b.mmio_read(table + 0x800, 8) & 1, 1, "still pending");
    assert_eq!(b.mmio_read(table, 4), 0xfee0_0000);
    assert_eq!(b.mmio_read(table + 8, 4), 0x41);
    b.mmio_write(table + 12, 0, 4);
    assert!(irqfd_fired(&b, 0), "the pending vector fires on unmask");
    assert_eq!(b.mmio_read(table + 0x800, 8) & 1, 0);
}

#[test]
fn a_snapshot_needs_the_vm_paused() {
    let image = TempImage::new();
    let disk = format!("path={},transport=modern,engine=sync", image.0.display());
    let mem = guest_memory(16 << 20);
    let a = machine(&mem, &[disk]);
    let err = a.pci.snapshot().unwrap_err();
    assert!(matches!(err, SnapshotError::NotPaused { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "disk disk0 is running: a snapshot needs the VM paused"
    );
    a.pci.pause_all();
    a.pci.snapshot().unwrap();
}

#[test]
fn a_vhost_user_device_is_refused_in_one_line() {
    let err = SnapshotError::from_device(2, "disk1", DeviceSnapshotError::VhostUser);
    assert_eq!(
        err.to_string(),
        "disk disk1 is served by a vhost-user backend: snapshots of vhost-user devices are not \
         supported"
    );
}

/// Restores `snapshot` into a fresh VM with `disks`, expecting a typed refusal.
fn refused(snapshot: &PciSnapshot, disks: &[String]) -> SnapshotError {
    let mem = guest_memory(16 << 20);
    let mut m = machine(&mem, disks);
    m.pci.restore(snapshot).unwrap_err()
}

#[test]
fn a_snapshot_that_does_not_match_the_devices_is_a_typed_error() {
    let image = TempImage::new();
    let path = image.0.display();
    let disk = format!("path={path},transport=modern,engine=sync");
    let mem = guest_memory(16 << 20);
    let a = machine(&mem, std::slice::from_ref(&disk));
    let mock = MockSplitQueue::create(&mem, GuestAddress(RING), 16);
    bring_up(&a, &mock);
    a.pci.pause_all();
    let snapshot = a.pci.snapshot().unwrap();
    drop(a);

    let err = refused(&snapshot, &[format!("{disk},queues=2")]);
    assert!(
        matches!(err, SnapshotError::Mismatch { what: "queues", .. }),
        "{err}"
    );
    let err = refused(&snapshot, &[format!("{disk},id=boot")]);
    assert!(
        matches!(err, SnapshotError::UnknownDevice(ref id) if id == "disk0"),
        "{err}"
    );
    let err = refused(
        &snapshot,
        &[format!("path={path},transport=legacy,engine=sync")],
    );
    assert!(
        matches!(
            err,
            SnapshotError::Mismatch {
                what: "transport",
                ..
            }
        ),
        "{err}"
    );
    let err = refused(&snapshot, &[format!("{disk},readonly=on")]);
    assert!(
        matches!(
            err,
            SnapshotError::Mismatch {
                what: "device features",
                ..
            }
        ),
        "{err}"
    );
    let mut net = snapshot.clone();
    net.devices[0].transport.device_type = 1;
    let err = refused(&net, std::slice::from_ref(&disk));
    assert!(
        matches!(
            err,
            SnapshotError::Mismatch {
                what: "device type",
                ..
            }
        ),
        "{err}"
    );
    let mut empty = snapshot.clone();
    empty.devices.clear();
    let err = refused(&empty, std::slice::from_ref(&disk));
    assert!(matches!(err, SnapshotError::MissingDevice(_)), "{err}");
    let mut future = snapshot.clone();
    future.version = SNAPSHOT_VERSION + 1;
    let err = refused(&future, std::slice::from_ref(&disk));
    assert!(matches!(err, SnapshotError::Version(_)), "{err}");

    let mut m = machine(&mem, &[disk]);
    m.pci.restore(&snapshot).unwrap();
    let err = m.pci.restore(&snapshot).unwrap_err();
    assert!(matches!(err, SnapshotError::NotFresh(_)), "{err}");
}
