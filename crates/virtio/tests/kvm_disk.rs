//! A virtio-blk disk attached to a real KVM VM (in-kernel irqchip, real KVM_IOEVENTFD,
//! KVM_IRQFD and KVM_SET_GSI_ROUTING), driven the way a guest driver would through the buses
//! the vCPU threads dispatch to. Needs /dev/kvm: without it these tests fail, loudly.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kickvm_bus::{Bus, IoAddress};
use kickvm_virtio::ioevent::{Doorbell, IoeventRegistrar};
use kickvm_virtio::notifier::{NotifyMode, SyncReason};
use kickvm_virtio::GuestMemoryMmap;
use kickvm_virtio::{BlkConfig, PciDevices, PciOptions};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress};

const NEXT: u16 = 1;
const WRITE: u16 = 2;

struct TempImage(std::path::PathBuf);

impl TempImage {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "kickvm-kvm-disk-{}-{}.img",
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
    vm: Arc<kvm_ioctls::VmFd>,
    mem: GuestMemoryMmap,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    pci: PciDevices,
    slot: std::cell::Cell<u32>,
    _kvm: kvm_ioctls::Kvm,
}

fn machine(options: PciOptions) -> Machine {
    let kvm = kvm_ioctls::Kvm::new().expect("this test needs /dev/kvm");
    let vm = Arc::new(kvm.create_vm().expect("KVM_CREATE_VM"));
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let pio = Arc::new(Bus::new());
    let mmio = Arc::new(Bus::new());
    let pci = PciDevices::new(vm.clone(), mem.clone(), pio.clone(), mmio.clone(), options)
        .expect("PCI on KVM");
    Machine {
        vm,
        mem,
        pio,
        mmio,
        pci,
        slot: std::cell::Cell::new(1),
        _kvm: kvm,
    }
}

impl Machine {
    fn config_read(&self, reg: u32) -> u32 {
        self.pio.write(
            0xcf8,
            &((1u32 << 31) | (self.slot.get() << 11) | (reg << 2)).to_le_bytes(),
        );
        let mut data = [0u8; 4];
        assert!(self.pio.read(0xcfc, &mut data));
        u32::from_le_bytes(data)
    }
    fn config_write(&self, reg: u32, value: u32) {
        self.pio.write(
            0xcf8,
            &((1u32 << 31) | (self.slot.get() << 11) | (reg << 2)).to_le_bytes(),
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
        assert!(self.mmio.read(addr, &mut data[..len]));
        u64::from_le_bytes(data)
    }
}

/// The used ring, on its own page: the mock's own used ring overlaps the end of its
/// available ring (virtio-queue 0.18's `SplitQueueRing::end` counts elements, not bytes).
fn used_ring(mock: &MockSplitQueue<GuestMemoryMmap>) -> GuestAddress {
    mock.desc_table_addr().unchecked_add(0x8000)
}

/// What a modern driver does: MSI-X on with vector 0 for queue 0, features, one queue, DRIVER_OK.
fn bring_up_modern(m: &Machine, mock: &MockSplitQueue<GuestMemoryMmap>) -> u64 {
    assert_eq!(m.config_read(0) & 0xffff, 0x1af4);
    let msix_cap = m.find_cap(0x11, None);
    let msix_bar = m.bar(1);
    // MSI-X table entry 0: a fixed-destination MSI to APIC 0, vector 0x40; unmasked.
    m.mmio_write(msix_bar, 0xfee0_0000, 4);
    m.mmio_write(msix_bar + 8, 0x40, 4);
    m.mmio_write(msix_bar + 12, 0, 4);
    let control = m.config_read(msix_cap / 4);
    m.config_write(msix_cap / 4, control | (1 << 31));

    // Notify capability: BAR offset of the notify area and the multiplier.
    let notify_cap = m.find_cap(0x09, Some(2));
    let notify_offset = u64::from(m.config_read(notify_cap / 4 + 2));
    let multiplier = u64::from(m.config_read(notify_cap / 4 + 4));
    let bar = m.bar(4);
    let common = bar;
    for status in [1u64, 3] {
        m.mmio_write(common + 0x14, status, 1);
    }
    m.mmio_write(common + 0x08, 1, 4);
    m.mmio_write(common + 0x0c, 1, 4); // VERSION_1
    m.mmio_write(common + 0x14, 0xb, 1);
    assert_eq!(
        m.mmio_read(common + 0x14, 1) & 0x8,
        0x8,
        "FEATURES_OK accepted"
    );
    m.mmio_write(common + 0x16, 0, 2);
    m.mmio_write(common + 0x18, 16, 2);
    m.mmio_write(common + 0x1a, 0, 2);
    assert_eq!(m.mmio_read(common + 0x1a, 2), 0, "vector 0 accepted");
    m.mmio_write(common + 0x20, mock.desc_table_addr().0, 8);
    m.mmio_write(common + 0x28, mock.avail_addr().0, 8);
    m.mmio_write(common + 0x30, used_ring(mock).0, 8);
    m.mmio_write(common + 0x1c, 1, 2);
    let queue_notify_off = m.mmio_read(common + 0x1e, 2);
    m.mmio_write(common + 0x14, 0xf, 1);
    assert_eq!(
        m.mmio_read(common + 0x14, 1),
        0xf,
        "DRIVER_OK without NEEDS_RESET"
    );
    bar + notify_offset + queue_notify_off * multiplier
}

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
    // By hand rather than `add_desc_chains`, which does not wrap the available ring.
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
    std::sync::atomic::fence(Ordering::Release);
    mem.write_obj(idx.wrapping_add(1), idx_addr).unwrap();
}

fn wait_used(mem: &GuestMemoryMmap, mock: &MockSplitQueue<GuestMemoryMmap>, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let used: u16 = mem.read_obj(used_ring(mock).unchecked_add(2)).unwrap();
        if used >= want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "request {want} never completed (used idx {used})"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn check_read(mem: &GuestMemoryMmap, n: u16, sector: u64) {
    let base = 0x20_0000 + u64::from(n) * 0x1000;
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(base + 0x800)).unwrap(),
        0,
        "status OK"
    );
    let mut data = [0u8; 512];
    mem.read_slice(&mut data, GuestAddress(base + 0x200))
        .unwrap();
    assert!(
        data.iter().all(|&b| u64::from(b) == sector % 251),
        "data of sector {sector}"
    );
}

#[test]
fn kvm_accepts_the_ioeventfd_and_the_io_thread_serves_the_kick() {
    let image = TempImage::new();
    let mut m = machine(PciOptions::default());
    let disk: BlkConfig = format!("path={},transport=modern", image.0.display())
        .parse()
        .unwrap();
    let id = m.pci.add_disk(&disk).unwrap();
    assert_eq!(id, "disk0");
    let mock = MockSplitQueue::create(&m.mem, GuestAddress(0x10_0000), 16);
    bring_up_modern(&m, &mock);
    let device = m.pci.device("disk0").unwrap();
    assert_eq!(
        device.lock().unwrap().queue_reports()[0].mode,
        NotifyMode::Ioeventfd
    );

    // What KVM does when the guest writes the doorbell: signal the eventfd; no exit.
    add_read(&m.mem, &mock, 0, 7);
    let kick = device.lock().unwrap().kick_eventfds()[0].clone();
    kick.write(1).unwrap();
    wait_used(&m.mem, &mock, 1);
    check_read(&m.mem, 0, 7);
    // The interrupt follows the used-ring update on the I/O thread.
    let deadline = Instant::now() + Duration::from_secs(10);
    while device.lock().unwrap().queue_reports()[0]
        .counters
        .interrupts_sent
        == 0
    {
        assert!(Instant::now() < deadline, "no interrupt was sent");
        std::thread::sleep(Duration::from_millis(1));
    }
    let counters = device.lock().unwrap().queue_reports()[0].counters;
    assert_eq!((counters.kicks_ioeventfd, counters.kicks_exit), (1, 0));
    assert_eq!(counters.requests, 1);
    assert_eq!(counters.interrupts_sent, 1);
}

#[test]
fn switching_ioeventfd_off_at_run_time_makes_kicks_exit_and_still_serves_them() {
    let image = TempImage::new();
    let mut m = machine(PciOptions::default());
    let disk: BlkConfig = format!("path={},transport=modern", image.0.display())
        .parse()
        .unwrap();
    m.pci.add_disk(&disk).unwrap();
    let mock = MockSplitQueue::create(&m.mem, GuestAddress(0x10_0000), 16);
    let doorbell = bring_up_modern(&m, &mock);
    let device = m.pci.device("disk0").unwrap();
    device.lock().unwrap().set_ioeventfd(false);
    assert_eq!(
        device.lock().unwrap().queue_reports()[0].mode,
        NotifyMode::Sync(SyncReason::PropertyOff)
    );
    add_read(&m.mem, &mock, 0, 3);
    // The doorbell write now exits to the vCPU thread: here, a write on the MMIO bus.
    m.mmio_write(doorbell, 0, 2);
    wait_used(&m.mem, &mock, 1);
    check_read(&m.mem, 0, 3);
    device.lock().unwrap().set_ioeventfd(true);
    add_read(&m.mem, &mock, 1, 4);
    device.lock().unwrap().kick_eventfds()[0].write(1).unwrap();
    wait_used(&m.mem, &mock, 2);
    check_read(&m.mem, 1, 4);
    let counters = device.lock().unwrap().queue_reports()[0].counters;
    assert_eq!((counters.kicks_exit, counters.kicks_ioeventfd), (1, 1));
}

#[test]
fn kvm_refusing_the_registration_leaves_the_disk_in_sync_mode_and_working() {
    let image = TempImage::new();
    let mut m = machine(PciOptions::default());
    let disk: BlkConfig = format!("path={},transport=modern", image.0.display())
        .parse()
        .unwrap();
    m.pci.add_disk(&disk).unwrap();
    // Something else already owns queue 0's doorbell: KVM answers EEXIST.
    let bar = m.bar(4);
    let squatter = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    let doorbell = Doorbell {
        addr: IoAddress::Mmio(bar + 0x3000),
        datamatch: 0,
    };
    IoeventRegistrar::register(m.vm.as_ref(), &squatter, doorbell).unwrap();
    let mock = MockSplitQueue::create(&m.mem, GuestAddress(0x10_0000), 16);
    let notify = bring_up_modern(&m, &mock);
    let device = m.pci.device("disk0").unwrap();
    assert_eq!(
        device.lock().unwrap().queue_reports()[0].mode,
        NotifyMode::Sync(SyncReason::KvmRefused)
    );
    add_read(&m.mem, &mock, 0, 9);
    m.mmio_write(notify, 0, 2);
    wait_used(&m.mem, &mock, 1);
    check_read(&m.mem, 0, 9);
}

#[test]
fn max_ioeventfds_cap_puts_the_second_disk_in_sync_mode_and_both_work() {
    let images = [TempImage::new(), TempImage::new()];
    let mut m = machine(PciOptions {
        max_ioeventfds: Some(1),
        intx: false,
        ..PciOptions::default()
    });
    for image in &images {
        let disk: BlkConfig = format!("path={},transport=modern", image.0.display())
            .parse()
            .unwrap();
        m.pci.add_disk(&disk).unwrap();
    }
    let rings = [
        MockSplitQueue::create(&m.mem, GuestAddress(0x10_0000), 16),
        MockSplitQueue::create(&m.mem, GuestAddress(0x18_0000), 16),
    ];
    let mut doorbells = Vec::new();
    for (slot, mock) in [1, 2].into_iter().zip(&rings) {
        m.slot.set(slot);
        doorbells.push(bring_up_modern(&m, mock));
    }
    let disks = [
        m.pci.device("disk0").unwrap(),
        m.pci.device("disk1").unwrap(),
    ];
    assert_eq!(
        disks[0].lock().unwrap().queue_reports()[0].mode,
        NotifyMode::Ioeventfd
    );
    assert_eq!(
        disks[1].lock().unwrap().queue_reports()[0].mode,
        NotifyMode::Sync(SyncReason::KvmRefused)
    );
    // disk0's kick arrives by eventfd, disk1's by exit; both are served.
    add_read(&m.mem, &rings[0], 0, 5);
    disks[0].lock().unwrap().kick_eventfds()[0]
        .write(1)
        .unwrap();
    add_read(&m.mem, &rings[1], 1, 6);
    m.mmio_write(doorbells[1], 0, 2);
    wait_used(&m.mem, &rings[0], 1);
    wait_used(&m.mem, &rings[1], 1);
    check_read(&m.mem, 0, 5);
    check_read(&m.mem, 1, 6);
}

#[test]
fn reset_takes_the_queue_back_to_sync_before_driver_ok() {
    let image = TempImage::new();
    let mut m = machine(PciOptions {
        max_ioeventfds: None,
        intx: true,
        ..PciOptions::default()
    });
    let disk: BlkConfig = format!("path={},transport=modern", image.0.display())
        .parse()
        .unwrap();
    m.pci.add_disk(&disk).unwrap();
    assert_eq!(m.config_read(0x3c / 4) >> 8 & 0xff, 1, "INTA# declared");
    let mock = MockSplitQueue::create(&m.mem, GuestAddress(0x10_0000), 16);
    bring_up_modern(&m, &mock);
    let bar = m.bar(4);
    m.mmio_write(bar + 0x14, 0, 1);
    assert_eq!(m.mmio_read(bar + 0x14, 1), 0);
    let device = m.pci.device("disk0").unwrap();
    assert_eq!(
        device.lock().unwrap().queue_reports()[0].mode,
        NotifyMode::Sync(SyncReason::DriverNotReady)
    );
}

#[test]
fn pause_and_resume_around_kicks_lose_no_request() {
    let image = TempImage::new();
    let mut m = machine(PciOptions::default());
    let disk: BlkConfig = format!("path={},transport=modern", image.0.display())
        .parse()
        .unwrap();
    m.pci.add_disk(&disk).unwrap();
    let mock = MockSplitQueue::create(&m.mem, GuestAddress(0x10_0000), 16);
    bring_up_modern(&m, &mock);
    let device = m.pci.device("disk0").unwrap();
    let kick = device.lock().unwrap().kick_eventfds()[0].clone();
    for round in 0..40u16 {
        // Descriptor slots are reused every 5 rounds (3 descriptors each, 16 in the table).
        let slot = round % 5;
        add_read(&m.mem, &mock, slot, u64::from(round));
        kick.write(1).unwrap();
        assert!(
            device.lock().unwrap().pause(),
            "round {round}: pause did not quiesce"
        );
        assert_eq!(
            device.lock().unwrap().queue_reports()[0].mode,
            NotifyMode::Sync(SyncReason::VmPaused)
        );
        device.lock().unwrap().resume();
        wait_used(&m.mem, &mock, round + 1);
        check_read(&m.mem, slot, u64::from(round));
    }
    assert_eq!(
        device.lock().unwrap().queue_reports()[0].mode,
        NotifyMode::Ioeventfd
    );
}
