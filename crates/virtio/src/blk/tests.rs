//! virtio-blk driven through real queues in guest memory (virtio-queue's mock rings), on a real
//! image file with the synchronous engine, including every bad-guest case of issue 3.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::GuestMemoryMmap;
use kickvm_block::{DiskImage, DiskOptions, EngineKind};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::counters::QueueCounters;
use crate::device::{Activation, QueueHandler, QueueSetup, VirtioDevice, VirtioInterrupt};
use crate::test_utils::guest_memory;

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;
const QUEUE_LEN: u16 = 16;
const IMAGE_SECTORS: u64 = 2048;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x11_0000;
const STATUS: u64 = 0x12_0000;

#[derive(Default)]
struct MockInterrupt {
    queue_signals: Mutex<Vec<usize>>,
    needs_reset: AtomicBool,
    config_signals: AtomicUsize,
}

impl VirtioInterrupt for MockInterrupt {
    fn signal_queue(&self, queue: usize) {
        self.queue_signals.lock().unwrap().push(queue);
    }
    fn signal_config(&self) {
        self.config_signals.fetch_add(1, Ordering::SeqCst);
    }
    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.signal_config();
    }
}

struct TempImage(PathBuf);

impl TempImage {
    /// Sector n is filled with byte n % 251.
    fn new() -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "kickvm-blk-test-{}-{}.img",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let mut content = Vec::new();
        for sector in 0..IMAGE_SECTORS {
            content.extend(std::iter::repeat_n((sector % 251) as u8, 512));
        }
        std::fs::write(&path, content).unwrap();
        TempImage(path)
    }
    fn sector(&self, n: u64) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()[(n * 512) as usize..((n + 1) * 512) as usize].to_vec()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct Disk {
    blk: VirtioBlk,
    handler: Arc<dyn QueueHandler>,
    interrupt: Arc<MockInterrupt>,
    counters: Arc<[QueueCounters]>,
    _image: TempImage,
    image_path: PathBuf,
}

fn disk(mem: &GuestMemoryMmap, queues: Vec<Queue>, readonly: bool, serial: Option<&str>) -> Disk {
    let image = TempImage::new();
    let disk_image = Arc::new(
        DiskImage::open(
            &image.0,
            DiskOptions {
                readonly,
                direct: false,
                declared_raw: false,
                unlocked: false,
            },
        )
        .unwrap(),
    );
    let num_queues = queues.len() as u16;
    let mut blk = VirtioBlk::new(
        disk_image,
        BlkOptions {
            serial: serial.map(str::to_string),
            queues: num_queues,
            queue_size: QUEUE_LEN,
            engine: EngineKind::Sync,
            pause_on_no_space: None,
        },
    )
    .unwrap();
    let interrupt = Arc::new(MockInterrupt::default());
    let counters: Arc<[QueueCounters]> =
        (0..num_queues).map(|_| QueueCounters::default()).collect();
    let handler = blk
        .activate(Activation {
            mem: mem.clone(),
            acked_features: blk.features(),
            interrupt: interrupt.clone(),
            queues: queues
                .into_iter()
                .enumerate()
                .map(|(index, queue)| QueueSetup {
                    index,
                    queue,
                    kick: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
                })
                .collect(),
            counters: counters.clone(),
        })
        .unwrap();
    let image_path = image.0.clone();
    Disk {
        blk,
        handler,
        interrupt,
        counters,
        _image: image,
        image_path,
    }
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

fn header(mem: &GuestMemoryMmap, at: u64, request_type: u32, sector: u64) {
    mem.write_obj(request_type, GuestAddress(at)).unwrap();
    mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
}

/// A three-descriptor request at table index `first`: header, data, status.
fn request(first: u16, data_len: u32, data_flags: u16) -> Vec<RawDescriptor> {
    vec![
        desc(HDR + u64::from(first) * 16, 16, NEXT, first + 1),
        desc(
            DATA + u64::from(first) * 0x1000,
            data_len,
            NEXT | data_flags,
            first + 2,
        ),
        desc(STATUS + u64::from(first), 1, WRITE, 0),
    ]
}

fn status(mem: &GuestMemoryMmap, first: u16) -> u8 {
    mem.read_obj(GuestAddress(STATUS + u64::from(first)))
        .unwrap()
}

fn used_entry(mem: &GuestMemoryMmap, mock: &MockSplitQueue<GuestMemoryMmap>, n: u64) -> (u32, u32) {
    let at = mock.used_addr().unchecked_add(4 + 8 * n);
    (
        mem.read_obj(at).unwrap(),
        mem.read_obj(at.unchecked_add(4)).unwrap(),
    )
}

fn used_idx(mem: &GuestMemoryMmap, mock: &MockSplitQueue<GuestMemoryMmap>) -> u16 {
    mem.read_obj(mock.used_addr().unchecked_add(2)).unwrap()
}

fn setup(mem: &GuestMemoryMmap) -> MockSplitQueue<'_, GuestMemoryMmap> {
    MockSplitQueue::new(mem, QUEUE_LEN)
}

#[test]
fn read_fills_the_buffer_from_the_image_and_completes_ok() {
    let mem = guest_memory(0x40_0000);
    let mock = setup(&mem);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 7);
    mock.add_desc_chains(&request(0, 1024, WRITE), 0).unwrap();
    let d = disk(&mem, vec![mock.create_queue().unwrap()], false, None);
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    d.handler.process_queue(0);
    assert_eq!(status(&mem, 0), VIRTIO_BLK_S_OK);
    let mut data = vec![0u8; 1024];
    mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert!(data[..512].iter().all(|&b| b == 7) && data[512..].iter().all(|&b| b == 8));
    assert_eq!(used_entry(&mem, &mock, 0), (0, 1025));
    assert_eq!(*d.interrupt.queue_signals.lock().unwrap(), vec![0]);
    let c = d.counters[0].snapshot();
    assert_eq!((c.requests, c.bytes), (1, 1024));
}

/// Pages of the first region marked written in its dirty bitmap, clearing it.
fn take_dirty_pages(mem: &GuestMemoryMmap) -> Vec<u64> {
    crate::dirty::pages(&crate::dirty::take_written(mem)[0])
}

#[test]
fn a_completed_read_marks_its_data_buffer_written_for_migration() {
    let mem = guest_memory(0x40_0000);
    let mock = setup(&mem);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 7);
    mock.add_desc_chains(&request(0, 1024, WRITE), 0).unwrap();
    let d = disk(&mem, vec![mock.create_queue().unwrap()], false, None);
    take_dirty_pages(&mem);
    d.handler.process_queue(0);
    assert_eq!(status(&mem, 0), VIRTIO_BLK_S_OK);
    let dirty = take_dirty_pages(&mem);
    // The data the kernel wrote through its host address, the status byte, and the used ring.
    for (what, addr) in [
        ("data", DATA),
        ("status", STATUS),
        ("used ring", mock.used_addr().0),
    ] {
        assert!(
            dirty.contains(&(addr >> 12)),
            "{what} page {:#x} not marked: {dirty:x?}",
            addr >> 12
        );
    }
    // The header the device only read is not.
    assert!(!dirty.contains(&(HDR >> 12)), "{dirty:x?}");
}

#[test]
fn write_then_flush_reaches_the_image_file() {
    let mem = guest_memory(0x40_0000);
    let mock = setup(&mem);
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 3);
    header(&mem, HDR + 3 * 16, VIRTIO_BLK_T_FLUSH, 0);
    mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    let mut chains = request(0, 512, 0);
    chains.push(desc(HDR + 3 * 16, 16, NEXT, 4));
    chains.push(desc(STATUS + 3, 1, WRITE, 0));
    mock.add_desc_chains(&chains, 0).unwrap();
    let d = disk(&mem, vec![mock.create_queue().unwrap()], false, None);
    d.handler.process_queue(0);
    assert_eq!(
        (status(&mem, 0), status(&mem, 3)),
        (VIRTIO_BLK_S_OK, VIRTIO_BLK_S_OK)
    );
    assert_eq!(used_idx(&mem, &mock), 2);
    assert_eq!(d._image.sector(3), vec![0xab; 512]);
    assert_eq!(d._image.sector(4), vec![4; 512]);
    assert_eq!(
        d.interrupt.queue_signals.lock().unwrap().len(),
        1,
        "one interrupt per batch"
    );
}

#[test]
fn get_id_returns_the_20_byte_serial() {
    let mem = guest_memory(0x40_0000);
    let mock = setup(&mem);
    header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
    mock.add_desc_chains(&request(0, 20, WRITE), 0).unwrap();
    let d = disk(
        &mem,
        vec![mock.create_queue().unwrap()],
        false,
        Some("disk-serial-0001"),
    );
    d.handler.process_queue(0);
    assert_eq!(status(&mem, 0), VIRTIO_BLK_S_OK);
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..16], b"disk-serial-0001");
    assert_eq!(&id[16..], &[0; 4]);
}

#[test]
fn write_zeroes_zeroes_the_range_when_offered() {
    let mem = guest_memory(0x40_0000);
    let mock = setup(&mem);
    header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    mem.write_obj(10u64, GuestAddress(DATA)).unwrap();
    mem.write_obj(2u32, GuestAddress(DATA + 8)).unwrap();
    mem.write_obj(0u32, GuestAddress(DATA + 12)).unwrap();
    mock.add_desc_chains(&request(0, 16, 0), 0).unwrap();
    let d = disk(&mem, vec![mock.create_queue().unwrap()], false, None);
    let offered = d.blk.features() & (1 << VIRTIO_BLK_F_WRITE_ZEROES) != 0;
    d.handler.process_queue(0);
    if offered {
        assert_eq!(status(&mem, 0), VIRTIO_BLK_S_OK);
        assert_eq!(d._image.sector(10), vec![0; 512]);
        assert_eq!(d._image.sector(11), vec![0; 512]);
        assert_eq!(d._image.sector(12), vec![12; 512]);
    } else {
        assert_eq!(status(&mem, 0), VIRTIO_BLK_S_UNSUPP);
    }
}

#[test]
fn indirect_descriptor_table_is_followed() {
    let mem = guest_memory(0x40_0000);
    let mock = setup(&mem);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 5);
    let table = 0x13_0000u64;
    for (i, d) in request(0, 512, WRITE).into_iter().enumerate() {
        mem.write_obj(d, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    mock.add_desc_chains(&[desc(table, 48, INDIRECT, 0)], 0)
        .unwrap();
    let d = disk(&mem, vec![mock.create_queue().unwrap()], false, None);
    d.handler.process_queue(0);
    assert_eq!(status(&mem, 0), VIRTIO_BLK_S_OK);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 5);
}

// ---- bad guests ----

fn expect_status(chains: Vec<RawDescriptor>, setup_mem: impl Fn(&GuestMemoryMmap), expected: u8) {
    let mem = guest_memory(0x40_0000);
    let mock = setup(&mem);
    setup_mem(&mem);
    mock.add_desc_chains(&chains, 0).unwrap();
    let d = disk(&mem, vec![mock.create_queue().unwrap()], false, None);
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    d.handler.process_queue(0);
    assert_eq!(status(&mem, 0), expected);
    assert_eq!(used_idx(&mem, &mock), 1, "the chain was returned");
    assert!(!d.interrupt.needs_reset.load(Ordering::SeqCst));
}

#[test]
fn read_past_the_end_of_the_disk_gets_ioerr() {
    expect_status(
        request(0, 1024, WRITE),
        |mem| header(mem, HDR, VIRTIO_BLK_T_IN, IMAGE_SECTORS - 1),
        VIRTIO_BLK_S_IOERR,
    );
}

#[test]
fn huge_sector_number_gets_ioerr_without_overflow() {
    expect_status(
        request(0, 512, WRITE),
        |mem| header(mem, HDR, VIRTIO_BLK_T_IN, u64::MAX),
        VIRTIO_BLK_S_IOERR,
    );
}

#[test]
fn unknown_request_type_gets_unsupp() {
    expect_status(
        request(0, 512, WRITE),
        |mem| header(mem, HDR, 0x77, 0),
        VIRTIO_BLK_S_UNSUPP,
    );
}

#[test]
fn read_into_a_device_readable_buffer_gets_ioerr() {
    expect_status(
        request(0, 512, 0),
        |mem| header(mem, HDR, VIRTIO_BLK_T_IN, 0),
        VIRTIO_BLK_S_IOERR,
    );
}

#[test]
fn write_from_a_device_writable_buffer_gets_ioerr() {
    expect_status(
        request(0, 512, WRITE),
        |mem| header(mem, HDR, VIRTIO_BLK_T_OUT, 0),
        VIRTIO_BLK_S_IOERR,
    );
}

#[test]
fn data_buffer_outside_guest_memory_gets_ioerr() {
    let mut chains = request(0, 512, WRITE);
    chains[1] = desc(0x1_0000_0000, 512, NEXT | WRITE, 2);
    expect_status(
        chains,
        |mem| header(mem, HDR, VIRTIO_BLK_T_IN, 0),
        VIRTIO_BLK_S_IOERR,
    );
}

#[test]
fn data_buffer_running_off_the_end_of_memory_gets_ioerr() {
    let mut chains = request(0, 512, WRITE);
    chains[1] = desc(0x40_0000 - 256, 512, NEXT | WRITE, 2);
    expect_status(
        chains,
        |mem| header(mem, HDR, VIRTIO_BLK_T_IN, 0),
        VIRTIO_BLK_S_IOERR,
    );
}

#[test]
fn header_outside_guest_memory_gets_ioerr() {
    let mut chains = request(0, 512, WRITE);
    chains[0] = desc(0x7fff_0000, 16, NEXT, 1);
    expect_status(chains, |_| {}, VIRTIO_BLK_S_IOERR);
}

#[test]
fn chain_too_short_for_a_header_gets_ioerr() {
    let chains = vec![desc(HDR, 8, NEXT, 1), desc(STATUS, 1, WRITE, 0)];
    expect_status(
        chains,
        |mem| header(mem, HDR, VIRTIO_BLK_T_IN, 0),
        VIRTIO_BLK_S_IOERR,
    );
}

#[test]
fn chain_of_only_a_status_byte_gets_ioerr() {
    expect_status(vec![desc(STATUS, 1, WRITE, 0)], |_| {}, VIRTIO_BLK_S_IOERR);
}

#[test]
fn data_not_a_multiple_of_512_gets_ioerr() {
    expect_status(
        request(0, 100, WRITE),
        |mem| header(mem, HDR, VIRTIO_BLK_T_IN, 0),
        VIRTIO_BLK_S_IOERR,
    );
}

#[test]
fn chain_without_a_writable_status_is_returned_unwritten() {
    let mem = guest_memory(0x40_0000);
    let mock = setup(&mem);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    mock.add_desc_chains(&[desc(HDR, 16, NEXT, 1), desc(STATUS, 1, 0, 0)], 0)
        .unwrap();
    let d = disk(&mem, vec![mock.create_queue().unwrap()], false, None);
    mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    d.handler.process_queue(0);
    assert_eq!(
        status(&mem, 0),
        0xee,
        "nothing written into a device-readable buffer"
    );
    assert_eq!(used_entry(&mem, &mock, 0), (0, 0));
}

#[test]
fn descriptor_loop_sets_needs_reset_without_hanging() {
    let mem = guest_memory(0x40_0000);
    let mock = setup(&mem);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    mock.add_desc_chains(
        &[desc(HDR, 16, NEXT, 1), desc(DATA, 512, NEXT | WRITE, 0)],
        0,
    )
    .unwrap();
    let d = disk(&mem, vec![mock.create_queue().unwrap()], false, None);
    d.handler.process_queue(0);
    assert!(d.interrupt.needs_reset.load(Ordering::SeqCst));
    // Later kicks are ignored, not re-parsed.
    d.handler.process_queue(0);
}

#[test]
fn write_to_a_readonly_disk_gets_ioerr_and_leaves_the_file_alone() {
    let mem = guest_memory(0x40_0000);
    let mock = setup(&mem);
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 1);
    mem.write_slice(&[0x55; 512], GuestAddress(DATA)).unwrap();
    mock.add_desc_chains(&request(0, 512, 0), 0).unwrap();
    let d = disk(&mem, vec![mock.create_queue().unwrap()], true, None);
    assert_ne!(d.blk.features() & (1 << VIRTIO_BLK_F_RO), 0);
    d.handler.process_queue(0);
    assert_eq!(status(&mem, 0), VIRTIO_BLK_S_IOERR);
    assert_eq!(std::fs::read(&d.image_path).unwrap()[512..1024], [1u8; 512]);
}

#[test]
fn available_index_beyond_the_ring_sets_needs_reset_without_hanging() {
    let mem = guest_memory(0x40_0000);
    let mock = setup(&mem);
    let queue: Queue = mock.create_queue().unwrap();
    mem.write_obj(100u16, mock.avail_addr().unchecked_add(2))
        .unwrap();
    let d = disk(&mem, vec![queue], false, None);
    d.handler.process_queue(0);
    assert!(d.interrupt.needs_reset.load(Ordering::SeqCst));
}

#[test]
fn head_index_out_of_range_sets_needs_reset() {
    let mem = guest_memory(0x40_0000);
    let mock = setup(&mem);
    let queue: Queue = mock.create_queue().unwrap();
    mem.write_obj(500u16, mock.avail_addr().unchecked_add(4))
        .unwrap();
    mem.write_obj(1u16, mock.avail_addr().unchecked_add(2))
        .unwrap();
    let d = disk(&mem, vec![queue], false, None);
    d.handler.process_queue(0);
    assert!(d.interrupt.needs_reset.load(Ordering::SeqCst));
}

#[test]
fn kick_for_a_nonexistent_queue_is_ignored() {
    let mem = guest_memory(0x40_0000);
    let mock = setup(&mem);
    let d = disk(&mem, vec![mock.create_queue().unwrap()], false, None);
    d.handler.process_queue(3);
    d.handler.process_completions(9);
    assert!(!d.handler.busy(9));
}

#[test]
fn a_broken_queue_does_not_stall_the_other_queue() {
    let mem = guest_memory(0x40_0000);
    let broken = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_LEN);
    let healthy = MockSplitQueue::create(&mem, GuestAddress(0x8000), QUEUE_LEN);
    broken
        .add_desc_chains(&[desc(HDR, 16, NEXT, 0)], 0)
        .unwrap();
    header(&mem, HDR + 16, VIRTIO_BLK_T_IN, 9);
    healthy
        .add_desc_chains(
            &[
                desc(HDR + 16, 16, NEXT, 1),
                desc(DATA, 512, NEXT | WRITE, 2),
                desc(STATUS, 1, WRITE, 0),
            ],
            0,
        )
        .unwrap();
    let d = disk(
        &mem,
        vec![
            broken.create_queue().unwrap(),
            healthy.create_queue().unwrap(),
        ],
        false,
        None,
    );
    d.handler.process_queue(0);
    d.handler.process_queue(1);
    assert_eq!(status(&mem, 0), VIRTIO_BLK_S_OK);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA)).unwrap(), 9);
    assert_eq!(*d.interrupt.queue_signals.lock().unwrap(), vec![1]);
}

#[test]
fn event_idx_suppresses_the_interrupt_the_driver_did_not_ask_for() {
    let mem = guest_memory(0x40_0000);
    let mock = setup(&mem);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    mock.add_desc_chains(&request(0, 512, WRITE), 0).unwrap();
    let mut queue: Queue = mock.create_queue().unwrap();
    queue.set_event_idx(true);
    // used_event (after the avail ring) = 5: interrupt only once used idx passes 5.
    let used_event = mock
        .avail_addr()
        .unchecked_add(4 + 2 * u64::from(QUEUE_LEN));
    mem.write_obj(5u16, used_event).unwrap();
    let d = disk(&mem, vec![queue], false, None);
    d.handler.process_queue(0);
    assert_eq!(status(&mem, 0), VIRTIO_BLK_S_OK);
    assert!(d.interrupt.queue_signals.lock().unwrap().is_empty());
    assert_eq!(d.counters[0].snapshot().interrupts_suppressed, 1);
    // And avail_event tells the driver when to kick next.
    let avail_event = mock.used_addr().unchecked_add(4 + 8 * u64::from(QUEUE_LEN));
    assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 1);
}

#[test]
fn reset_after_activation_stops_the_queues() {
    let mem = guest_memory(0x40_0000);
    let mock = setup(&mem);
    let mut d = disk(&mem, vec![mock.create_queue().unwrap()], false, None);
    d.blk.reset();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    mock.add_desc_chains(&request(0, 512, WRITE), 0).unwrap();
    d.handler.process_queue(0);
    assert_eq!(used_idx(&mem, &mock), 0);
}

#[test]
fn paused_queue_completes_nothing_new_and_takes_it_after_resume() {
    let mem = guest_memory(0x40_0000);
    let mock = setup(&mem);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 2);
    mock.add_desc_chains(&request(0, 512, WRITE), 0).unwrap();
    let d = disk(&mem, vec![mock.create_queue().unwrap()], false, None);
    d.handler.set_paused(true);
    d.handler.process_queue(0);
    assert!(!d.handler.poll_queue(0));
    assert_eq!(used_idx(&mem, &mock), 0, "nothing taken while paused");
    d.handler.set_paused(false);
    d.handler.process_queue(0);
    assert_eq!(used_idx(&mem, &mock), 1);
    assert_eq!(status(&mem, 0), VIRTIO_BLK_S_OK);
}

/// An engine whose writes fail with ENOSPC while `full` is set; otherwise every request
/// succeeds at once. It records the requests it was given.
struct FullDiskEngine {
    full: Arc<AtomicBool>,
    submitted: Arc<Mutex<Vec<kickvm_block::RequestKind>>>,
    ready: Vec<kickvm_block::Completion>,
    eventfd: EventFd,
}

impl kickvm_block::BlockEngine for FullDiskEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Sync
    }
    fn submit(&mut self, request: kickvm_block::Request) -> Result<(), kickvm_block::BlockError> {
        self.submitted.lock().unwrap().push(request.kind);
        let result = if request.kind != kickvm_block::RequestKind::Read
            && self.full.load(Ordering::SeqCst)
        {
            Err(std::io::Error::from_raw_os_error(libc::ENOSPC).into())
        } else {
            Ok(request.byte_len() as u32)
        };
        self.ready.push(kickvm_block::Completion {
            user_data: request.user_data,
            result,
        });
        Ok(())
    }
    fn commit(&mut self) -> Result<(), kickvm_block::BlockError> {
        Ok(())
    }
    fn completion_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.eventfd)
    }
    fn reap(&mut self, out: &mut Vec<kickvm_block::Completion>) {
        out.append(&mut self.ready);
    }
    fn in_flight(&self) -> usize {
        self.ready.len()
    }
    fn depth(&self) -> usize {
        usize::from(QUEUE_LEN)
    }
}

/// A handler over one queue holding a 512-byte write to sector 3, served by a
/// [`FullDiskEngine`] that starts full; returns the handler, the engine's switch and log.
fn handler_over_a_full_disk(
    mem: &GuestMemoryMmap,
    mock: &MockSplitQueue<GuestMemoryMmap>,
    interrupt: Arc<MockInterrupt>,
    pause: Option<Arc<crate::pause::PauseRequests>>,
) -> (
    handler::BlkHandler,
    Arc<AtomicBool>,
    Arc<Mutex<Vec<kickvm_block::RequestKind>>>,
) {
    header(mem, HDR, VIRTIO_BLK_T_OUT, 3);
    mock.add_desc_chains(&request(0, 512, 0), 0).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let full = Arc::new(AtomicBool::new(true));
    let submitted = Arc::new(Mutex::new(Vec::new()));
    let engine = FullDiskEngine {
        full: full.clone(),
        submitted: submitted.clone(),
        ready: Vec::new(),
        eventfd: EventFd::new(EFD_NONBLOCK).unwrap(),
    };
    let handler = handler::BlkHandler::new(
        mem.clone(),
        interrupt,
        (0..1).map(|_| QueueCounters::default()).collect(),
        request::RequestLimits {
            capacity_bytes: IMAGE_SECTORS * 512,
            readonly: false,
            serial: [0; VIRTIO_BLK_ID_BYTES],
            seg_max: 8,
            discard: false,
            write_zeroes: false,
        },
        vec![Some(handler::BlkQueue::new(
            mock.create_queue().unwrap(),
            Box::new(engine),
        ))],
        pause.map(|p| (p, "disk.img".to_string())),
    );
    (handler, full, submitted)
}

#[test]
fn a_write_without_host_space_is_an_ioerr_by_default() {
    let mem = guest_memory(0x40_0000);
    let mock = setup(&mem);
    let interrupt = Arc::new(MockInterrupt::default());
    let (handler, _, _) = handler_over_a_full_disk(&mem, &mock, interrupt, None);
    handler.process_queue(0);
    assert_eq!(used_idx(&mem, &mock), 1);
    assert_eq!(status(&mem, 0), VIRTIO_BLK_S_IOERR);
}

#[test]
fn a_write_without_host_space_is_held_the_vm_asked_to_pause_and_made_again_on_resume() {
    let mem = guest_memory(0x40_0000);
    let mock = setup(&mem);
    let interrupt = Arc::new(MockInterrupt::default());
    let pause = Arc::new(crate::pause::PauseRequests::new().unwrap());
    let (handler, full, submitted) =
        handler_over_a_full_disk(&mem, &mock, interrupt.clone(), Some(pause.clone()));
    handler.process_queue(0);
    assert_eq!(used_idx(&mem, &mock), 0, "the failed write is not answered");
    assert_eq!(status(&mem, 0), 0xff);
    assert_eq!(pause.take(), ["disk.img: no space left on device"]);
    // A snapshot now would lose the write.
    assert_eq!(handler.held_requests(), 1);
    let position = handler.queue_position(0).unwrap();
    assert_eq!((position.next_avail, position.next_used), (1, 0));
    // Paused and resumed while the disk is still full: made again, held again.
    handler.set_paused(true);
    handler.set_paused(false);
    assert_eq!(used_idx(&mem, &mock), 0);
    assert_eq!(pause.take().len(), 1, "asked again");
    // Space freed: the resume makes it again and it completes.
    full.store(false, Ordering::SeqCst);
    handler.set_paused(true);
    handler.set_paused(false);
    assert_eq!(used_idx(&mem, &mock), 1);
    assert_eq!(status(&mem, 0), VIRTIO_BLK_S_OK);
    assert!(pause.take().is_empty());
    assert_eq!(handler.held_requests(), 0);
    assert_eq!(interrupt.queue_signals.lock().unwrap().len(), 1);
    assert_eq!(
        submitted.lock().unwrap().len(),
        3,
        "the write was submitted three times"
    );
}

#[test]
fn a_disk_holding_writes_refuses_a_snapshot_in_one_line() {
    let err = crate::snapshot::SnapshotError::from_device(
        VIRTIO_BLK_TYPE,
        "disk0",
        crate::snapshot::DeviceSnapshotError::HeldRequests(2),
    );
    assert_eq!(
        err.to_string(),
        "disk disk0 holds 2 write(s) the host had no space for (enospc=pause): free space and \
         resume the VM before taking a snapshot"
    );
    let mem = guest_memory(0x40_0000);
    let d = disk(&mem, vec![setup(&mem).create_queue().unwrap()], false, None);
    assert_eq!(
        d.blk.snapshot(),
        Ok(crate::snapshot::DeviceState::Blk),
        "nothing held"
    );
}
