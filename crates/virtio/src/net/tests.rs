//! virtio-net driven through real rings in guest memory (virtio-queue's mock queues), with a
//! socket pair standing in for each tap queue: frames in both directions, offload headers,
//! multiqueue control, the poll of the `auto` policy, and every bad-guest case of issue 4.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::GuestMemoryMmap;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::header::HEADER_LEN;
use super::*;
use crate::counters::QueueCounters;
use crate::device::{Activation, QueueHandler, QueueSetup, VirtioDevice, VirtioInterrupt};
use crate::test_utils::guest_memory;

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const QUEUE_LEN: u16 = 16;
const MEM_SIZE: usize = 16 << 20;
const BUF: u64 = 0x10_0000;

#[derive(Default)]
struct MockInterrupt {
    queue_signals: Mutex<Vec<usize>>,
    needs_reset: AtomicBool,
}

impl VirtioInterrupt for MockInterrupt {
    fn signal_queue(&self, queue: usize) {
        self.queue_signals.lock().unwrap().push(queue);
    }
    fn signal_config(&self) {}
    fn set_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
    }
}

/// One SOCK_SEQPACKET pair per queue: the device's end, and the host's (the test's).
struct PairBackend {
    device_ends: Vec<OwnedFd>,
    host_ends: Vec<OwnedFd>,
    hdr_len: AtomicUsize,
    offload: AtomicU32,
    enabled: Mutex<Vec<bool>>,
}

impl PairBackend {
    fn new(queues: usize) -> Arc<Self> {
        let mut device_ends = Vec::new();
        let mut host_ends = Vec::new();
        for _ in 0..queues {
            let mut fds = [0; 2];
            // SAFETY: socketpair writes two descriptors into `fds`.
            let ret = unsafe {
                libc::socketpair(
                    libc::AF_UNIX,
                    libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                    0,
                    fds.as_mut_ptr(),
                )
            };
            assert_eq!(ret, 0);
            // SAFETY: both descriptors are new and owned here.
            let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            // SAFETY: plain fcntl on an owned descriptor.
            unsafe { libc::fcntl(a.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
            for fd in [&a, &b] {
                let size: libc::c_int = 1 << 20;
                // SAFETY: setsockopt reads one int.
                unsafe {
                    libc::setsockopt(
                        fd.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_SNDBUF,
                        &size as *const _ as *const libc::c_void,
                        4,
                    )
                };
            }
            device_ends.push(a);
            host_ends.push(b);
        }
        Arc::new(Self {
            device_ends,
            host_ends,
            hdr_len: AtomicUsize::new(0),
            offload: AtomicU32::new(u32::MAX),
            enabled: Mutex::new(vec![true; queues]),
        })
    }

    /// What the device wrote to queue `q`, if anything (waits briefly).
    fn host_recv(&self, q: usize) -> Option<Vec<u8>> {
        let fd = self.host_ends[q].as_raw_fd();
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 {
            return None;
        }
        let mut buf = vec![0u8; 70_000];
        // SAFETY: reads into `buf`.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
        (n >= 0).then(|| {
            buf.truncate(n as usize);
            buf
        })
    }

    fn host_send(&self, q: usize, frame: &[u8]) {
        // SAFETY: writes from `frame`.
        let n = unsafe {
            libc::write(
                self.host_ends[q].as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
            )
        };
        assert_eq!(n as usize, frame.len());
    }
}

impl NetBackend for PairBackend {
    fn queues(&self) -> usize {
        self.device_ends.len()
    }
    fn queue_fd(&self, queue: usize) -> RawFd {
        self.device_ends[queue].as_raw_fd()
    }
    fn set_vnet_header_len(&self, len: usize) -> io::Result<()> {
        self.hdr_len.store(len, Ordering::SeqCst);
        Ok(())
    }
    fn set_offload(&self, flags: u32) -> io::Result<()> {
        self.offload.store(flags, Ordering::SeqCst);
        Ok(())
    }
    fn set_queue_enabled(&self, queue: usize, enabled: bool) -> io::Result<()> {
        self.enabled.lock().unwrap()[queue] = enabled;
        Ok(())
    }
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// A guest: memory, one mock ring per queue (RX, TX per pair, then control), and the device.
struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    rings: Vec<MockSplitQueue<'a, GuestMemoryMmap>>,
    next_desc: Vec<u16>,
    net: VirtioNet,
    handler: Arc<dyn QueueHandler>,
    interrupt: Arc<MockInterrupt>,
    backend: Arc<PairBackend>,
}

fn ring_addr(q: usize) -> u64 {
    q as u64 * 0x1_0000
}

fn guest(mem: &GuestMemoryMmap, pairs: u16, acked: impl Fn(u64) -> u64) -> Guest<'_> {
    guest_with(mem, pairs, acked, None, std::time::Duration::ZERO)
}

fn guest_with(
    mem: &GuestMemoryMmap,
    pairs: u16,
    acked: impl Fn(u64) -> u64,
    tx_inline: Option<usize>,
    reply_poll: std::time::Duration,
) -> Guest<'_> {
    let backend = PairBackend::new(usize::from(pairs));
    let mut net = VirtioNet::new(
        backend.clone(),
        NetOptions {
            mac: [2, 0, 0, 0, 0, 7],
            pairs,
            queue_size: QUEUE_LEN,
            tx_inline,
            reply_poll,
        },
    )
    .unwrap();
    let nq = net.queue_max_sizes().len();
    let rings: Vec<_> = (0..nq)
        .map(|q| MockSplitQueue::create(mem, GuestAddress(ring_addr(q)), QUEUE_LEN))
        .collect();
    let interrupt = Arc::new(MockInterrupt::default());
    let counters: Arc<[QueueCounters]> = (0..nq).map(|_| QueueCounters::default()).collect();
    let acked_features = acked(net.features());
    let handler = net
        .activate(Activation {
            mem: mem.clone(),
            acked_features,
            interrupt: interrupt.clone(),
            queues: rings
                .iter()
                .enumerate()
                .map(|(index, ring)| {
                    let mut queue: Queue = ring.create_queue().unwrap();
                    virtio_queue::QueueT::set_event_idx(
                        &mut queue,
                        acked_features
                            & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
                            != 0,
                    );
                    QueueSetup {
                        index,
                        queue,
                        kick: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
                    }
                })
                .collect(),
            counters,
        })
        .unwrap();
    Guest {
        mem,
        next_desc: vec![0; nq],
        rings,
        net,
        handler,
        interrupt,
        backend,
    }
}

fn all(features: u64) -> u64 {
    features
}

impl Guest<'_> {
    /// Publishes `count` TX frames on queue 1 (pair 0), frame `i` made by `frame(i)` behind a
    /// default header in its own page from BUF, one chain each, without kicking.
    fn offer_tx_frames(&mut self, count: u64, frame: impl Fn(u64) -> Vec<u8>) {
        for i in 0..count {
            let at = BUF + i * 0x1000;
            let len = put_tx(self.mem, at, &VnetHeader::default(), &frame(i));
            self.offer(1, &[(at, len, false)]);
        }
    }

    /// Offers one chain of (addr, len, writable) buffers on queue `q`; returns its head.
    fn offer(&mut self, q: usize, buffers: &[(u64, u32, bool)]) -> u16 {
        let first = self.next_desc[q];
        let descs: Vec<_> = buffers
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, writable))| {
                let mut flags = if writable { WRITE } else { 0 };
                let next = first + i as u16 + 1;
                if i + 1 < buffers.len() {
                    flags |= NEXT;
                }
                desc(addr, len, flags, next % QUEUE_LEN)
            })
            .collect();
        self.rings[q].add_desc_chains(&descs, first).unwrap();
        self.next_desc[q] = (first + buffers.len() as u16) % QUEUE_LEN;
        first
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.mem
            .read_obj::<u16>(self.rings[q].used_addr().unchecked_add(2))
            .unwrap()
    }

    fn used_entry(&self, q: usize, n: u64) -> (u32, u32) {
        let at = self.rings[q]
            .used_addr()
            .unchecked_add(4 + 8 * (n % u64::from(QUEUE_LEN)));
        (
            self.mem.read_obj(at).unwrap(),
            self.mem.read_obj(at.unchecked_add(4)).unwrap(),
        )
    }

    fn stats(&self) -> &handler::NetStats {
        &self.net.handler_for_tests().stats
    }

    fn needs_reset(&self) -> bool {
        self.interrupt.needs_reset.load(Ordering::SeqCst)
    }
}

use vm_memory::Address;

fn eth_frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 7]);
    f[12] = 0x08;
    f[13] = 0x00;
    f
}

/// A header plus frame in guest memory at `at`, as a driver lays out a TX buffer.
fn put_tx(mem: &GuestMemoryMmap, at: u64, header: &VnetHeader, frame: &[u8]) -> u32 {
    let mut bytes = vec![0u8; HEADER_LEN];
    header.write(&mut bytes);
    bytes.extend_from_slice(frame);
    mem.write_slice(&bytes, GuestAddress(at)).unwrap();
    bytes.len() as u32
}

// ---- TX ----

#[test]
fn tx_frame_split_over_descriptors_reaches_the_tap_whole_with_its_header() {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest(&mem, 1, all);
    let frame = eth_frame(1000, 1);
    let len = put_tx(&mem, BUF, &VnetHeader::default(), &frame);
    let head = g.offer(
        1,
        &[
            (BUF, HEADER_LEN as u32, false),
            (BUF + HEADER_LEN as u64, len - HEADER_LEN as u32, false),
        ],
    );
    g.handler.process_queue(1);
    let got = g.backend.host_recv(0).expect("frame on the tap");
    assert_eq!(&got[HEADER_LEN..], &frame[..]);
    assert_eq!(g.used_idx(1), 1);
    assert_eq!(g.used_entry(1, 0), (u32::from(head), 0));
    assert_eq!(*g.interrupt.queue_signals.lock().unwrap(), vec![1]);
    assert_eq!(g.backend.hdr_len.load(Ordering::SeqCst), HEADER_LEN);
}

#[test]
fn tx_batch_of_frames_is_sent_in_order_with_one_interrupt() {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest(&mem, 1, all);
    g.offer_tx_frames(8, |i| eth_frame(60 + i as usize, i as u8));
    g.handler.process_queue(1);
    for i in 0..8 {
        let got = g.backend.host_recv(0).unwrap();
        assert_eq!(&got[HEADER_LEN..], &eth_frame(60 + i, i as u8)[..]);
    }
    assert_eq!(g.used_idx(1), 8);
    assert_eq!(g.interrupt.queue_signals.lock().unwrap().len(), 1);
}

fn expect_tx_dropped(
    buffers: impl Fn(&GuestMemoryMmap) -> Vec<(u64, u32, bool)>,
    acked: fn(u64) -> u64,
) {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest(&mem, 1, acked);
    let chain = buffers(&mem);
    let head = g.offer(1, &chain);
    g.handler.process_queue(1);
    assert!(
        g.backend.host_recv(0).is_none(),
        "a bad frame reached the tap"
    );
    assert_eq!(g.used_idx(1), 1, "the chain must still be returned");
    assert_eq!(g.used_entry(1, 0).0, u32::from(head));
    assert_eq!(g.stats().tx_dropped.load(Ordering::Relaxed), 1);
    assert!(!g.needs_reset(), "a dropped frame is not a broken device");
    // The queue keeps working.
    let len = put_tx(
        &mem,
        BUF + 0x8_0000,
        &VnetHeader::default(),
        &eth_frame(100, 9),
    );
    g.offer(1, &[(BUF + 0x8_0000, len, false)]);
    g.handler.process_queue(1);
    assert_eq!(
        &g.backend.host_recv(0).unwrap()[HEADER_LEN..],
        &eth_frame(100, 9)[..]
    );
}

#[test]
fn tx_chain_shorter_than_the_header_is_dropped() {
    expect_tx_dropped(|_| vec![(BUF, 6, false)], all);
}

#[test]
fn tx_chain_with_no_header_at_all_is_dropped() {
    expect_tx_dropped(|_| vec![(BUF, 0, false)], all);
}

#[test]
fn tx_header_without_a_frame_is_dropped() {
    expect_tx_dropped(|_| vec![(BUF, HEADER_LEN as u32, false)], all);
}

#[test]
fn tx_frame_over_64_kib_is_dropped() {
    expect_tx_dropped(
        |mem| {
            put_tx(
                mem,
                BUF,
                &VnetHeader::default(),
                &eth_frame(MAX_FRAME_LEN + 1, 0),
            );
            vec![(BUF, (HEADER_LEN + MAX_FRAME_LEN + 1) as u32, false)]
        },
        all,
    );
}

#[test]
fn tx_descriptor_outside_guest_memory_is_dropped() {
    expect_tx_dropped(
        |mem| {
            put_tx(mem, BUF, &VnetHeader::default(), &[]);
            vec![
                (BUF, HEADER_LEN as u32, false),
                (MEM_SIZE as u64 - 8, 100, false),
            ]
        },
        all,
    );
}

#[test]
fn tx_descriptor_past_the_end_of_the_address_space_is_dropped() {
    expect_tx_dropped(|_| vec![(u64::MAX - 4, 64, false)], all);
}

#[test]
fn tx_chain_with_a_device_writable_buffer_is_dropped() {
    expect_tx_dropped(
        |mem| {
            let len = put_tx(mem, BUF, &VnetHeader::default(), &eth_frame(64, 0));
            vec![(BUF, len, true)]
        },
        all,
    );
}

#[test]
fn tx_gso_header_the_guest_did_not_negotiate_is_dropped() {
    expect_tx_dropped(
        |mem| {
            let hdr = VnetHeader {
                flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
                gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
                hdr_len: 54,
                gso_size: 1448,
                csum_start: 34,
                csum_offset: 16,
                num_buffers: 0,
            };
            let len = put_tx(mem, BUF, &hdr, &eth_frame(3000, 0));
            vec![(BUF, len, false)]
        },
        |f| f & !(1 << VIRTIO_NET_F_HOST_TSO4),
    );
}

#[test]
fn tx_checksum_request_outside_the_frame_is_dropped() {
    expect_tx_dropped(
        |mem| {
            let hdr = VnetHeader {
                flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
                csum_start: 60,
                csum_offset: 6,
                ..Default::default()
            };
            let len = put_tx(mem, BUF, &hdr, &eth_frame(64, 0));
            vec![(BUF, len, false)]
        },
        all,
    );
}

#[test]
fn tx_descriptor_loop_neither_hangs_nor_sends() {
    let mem = guest_memory(MEM_SIZE);
    let g = guest(&mem, 1, all);
    put_tx(&mem, BUF, &VnetHeader::default(), &eth_frame(64, 0));
    // 0 -> 1 -> 0 -> ...
    g.rings[1]
        .add_desc_chains(&[desc(BUF, 40, NEXT, 1), desc(BUF + 40, 36, NEXT, 0)], 0)
        .unwrap();
    g.handler.process_queue(1);
    assert!(g.backend.host_recv(0).is_none());
}

#[test]
fn tx_available_index_beyond_the_ring_sets_needs_reset_without_hanging() {
    let mem = guest_memory(MEM_SIZE);
    let g = guest(&mem, 1, all);
    mem.write_obj::<u16>(QUEUE_LEN + 5, g.rings[1].avail_addr().unchecked_add(2))
        .unwrap();
    g.handler.process_queue(1);
    assert!(g.needs_reset());
}

#[test]
fn gso_frame_with_host_tso_negotiated_goes_out_with_its_header() {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest(&mem, 1, all);
    let hdr = VnetHeader {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
        gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    let frame = eth_frame(20_000, 3);
    let len = put_tx(&mem, BUF, &hdr, &frame);
    g.offer(1, &[(BUF, len, false)]);
    g.handler.process_queue(1);
    let got = g.backend.host_recv(0).unwrap();
    assert_eq!(
        VnetHeader::parse(&got[..HEADER_LEN]).unwrap().gso_size,
        1448
    );
    assert_eq!(got.len(), HEADER_LEN + frame.len());
}

// ---- RX ----

fn tap_frame(hdr: &VnetHeader, frame: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0xeeu8; HEADER_LEN];
    hdr.write(&mut bytes[..10]);
    bytes.extend_from_slice(frame);
    bytes
}

#[test]
fn rx_frame_from_the_tap_lands_in_a_posted_buffer_with_num_buffers_one() {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest(&mem, 1, all);
    let head = g.offer(0, &[(BUF, 2048, true)]);
    g.handler.process_queue(0);
    let frame = eth_frame(600, 5);
    g.backend
        .host_send(0, &tap_frame(&VnetHeader::default(), &frame));
    g.handler.process_completions(0);
    assert_eq!(g.used_idx(0), 1);
    assert_eq!(
        g.used_entry(0, 0),
        (u32::from(head), (HEADER_LEN + frame.len()) as u32)
    );
    let mut got = vec![0u8; HEADER_LEN + frame.len()];
    mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert_eq!(VnetHeader::parse(&got).unwrap().num_buffers, 1);
    assert_eq!(&got[HEADER_LEN..], &frame[..]);
    assert_eq!(*g.interrupt.queue_signals.lock().unwrap(), vec![0]);
}

fn readable(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd.
    unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
}

#[test]
fn rx_without_buffers_leaves_frames_in_the_tap_and_stops_watching_it_until_buffers_come() {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest(&mem, 1, all);
    let watch = g.handler.completion_fd(0).unwrap();
    for i in 0..3 {
        g.backend
            .host_send(0, &tap_frame(&VnetHeader::default(), &eth_frame(100, i)));
    }
    assert!(readable(watch), "the I/O thread must hear about the tap");
    g.handler.process_completions(0);
    assert_eq!(g.used_idx(0), 0);
    // No busy loop: with nothing to put frames in, the I/O thread is not woken again.
    assert!(!readable(watch));
    // Frames wait in the tap, not in the device (one may be held in its bounce buffer).
    assert!(readable(g.backend.device_ends[0].as_raw_fd()));
    for i in 0..3u64 {
        g.offer(0, &[(BUF + i * 0x1000, 2048, true)]);
    }
    g.handler.process_queue(0);
    assert_eq!(
        g.used_idx(0),
        3,
        "all three frames delivered once buffers came"
    );
    for i in 0..3u64 {
        let mut got = vec![0u8; 100];
        mem.read_slice(&mut got, GuestAddress(BUF + i * 0x1000 + HEADER_LEN as u64))
            .unwrap();
        assert_eq!(got, eth_frame(100, i as u8));
    }
    assert!(readable(watch) || !readable(g.backend.device_ends[0].as_raw_fd()));
}

#[test]
fn rx_kick_is_requested_only_when_buffers_run_out() {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest(&mem, 1, all);
    let avail_event = |g: &Guest| {
        mem.read_obj::<u16>(
            g.rings[0]
                .used_addr()
                .unchecked_add(4 + 8 * u64::from(QUEUE_LEN)),
        )
        .unwrap()
    };
    g.offer(0, &[(BUF, 2048, true)]);
    g.handler.process_queue(0);
    g.backend
        .host_send(0, &tap_frame(&VnetHeader::default(), &eth_frame(100, 0)));
    g.backend
        .host_send(0, &tap_frame(&VnetHeader::default(), &eth_frame(100, 1)));
    g.handler.process_completions(0);
    assert_eq!(g.used_idx(0), 1);
    // Out of buffers: the device asked for a kick at the next avail index.
    assert_eq!(avail_event(&g), 1);
}

#[test]
fn rx_frame_too_big_for_a_buffer_without_mrg_rxbuf_is_dropped_and_the_buffer_kept() {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest(&mem, 1, |f| f & !(1 << VIRTIO_NET_F_MRG_RXBUF));
    let head = g.offer(0, &[(BUF, 256, true)]);
    g.handler.process_queue(0);
    g.backend
        .host_send(0, &tap_frame(&VnetHeader::default(), &eth_frame(1000, 0)));
    g.backend
        .host_send(0, &tap_frame(&VnetHeader::default(), &eth_frame(200, 1)));
    g.handler.process_completions(0);
    assert_eq!(g.stats().rx_dropped.load(Ordering::Relaxed), 1);
    assert_eq!(g.used_idx(0), 1);
    assert_eq!(
        g.used_entry(0, 0),
        (u32::from(head), (HEADER_LEN + 200) as u32)
    );
}

#[test]
fn rx_large_gso_frame_is_spread_over_merged_buffers_published_at_once() {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest(&mem, 1, all);
    let heads: Vec<u16> = (0..8u64)
        .map(|i| g.offer(0, &[(BUF + i * 0x1000, 1536, true)]))
        .collect();
    g.handler.process_queue(0);
    let hdr = VnetHeader {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
        gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    let frame = eth_frame(5000, 7);
    g.backend.host_send(0, &tap_frame(&hdr, &frame));
    g.handler.process_completions(0);
    let total = HEADER_LEN + frame.len();
    let chains = total.div_ceil(1536);
    assert_eq!(g.used_idx(0) as usize, chains);
    let mut assembled = Vec::new();
    for (i, head) in heads.iter().enumerate().take(chains) {
        let (id, len) = g.used_entry(0, i as u64);
        assert_eq!(id, u32::from(*head));
        let mut part = vec![0u8; len as usize];
        mem.read_slice(&mut part, GuestAddress(BUF + i as u64 * 0x1000))
            .unwrap();
        assembled.extend(part);
    }
    let got = VnetHeader::parse(&assembled).unwrap();
    assert_eq!(got.num_buffers as usize, chains);
    assert_eq!((got.gso_type, got.gso_size), (hdr.gso_type, hdr.gso_size));
    assert_eq!(&assembled[HEADER_LEN..], &frame[..]);
    // Bigger than a direct read's room: it spilled into the bounce buffer and was copied.
    assert_eq!(g.stats().rx_direct.load(Ordering::Relaxed), 0);
}

#[test]
fn rx_frame_waits_when_merged_buffers_are_too_few_then_completes() {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest(&mem, 1, all);
    g.offer(0, &[(BUF, 1536, true)]);
    g.handler.process_queue(0);
    let frame = eth_frame(3000, 2);
    g.backend
        .host_send(0, &tap_frame(&VnetHeader::default(), &frame));
    g.handler.process_completions(0);
    assert_eq!(g.used_idx(0), 0, "no part of a frame may be published");
    g.offer(0, &[(BUF + 0x1000, 1536, true)]);
    g.offer(0, &[(BUF + 0x2000, 1536, true)]);
    g.handler.process_queue(0);
    assert_eq!(g.used_idx(0), 2);
}

#[test]
fn rx_chain_with_a_device_readable_buffer_sets_needs_reset() {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest(&mem, 1, all);
    g.offer(0, &[(BUF, 2048, false)]);
    g.backend
        .host_send(0, &tap_frame(&VnetHeader::default(), &eth_frame(100, 0)));
    g.handler.process_queue(0);
    assert!(g.needs_reset());
    assert!(
        !readable(g.handler.completion_fd(0).unwrap()),
        "a broken queue must not spin the I/O thread"
    );
}

#[test]
fn rx_buffer_outside_guest_memory_sets_needs_reset_without_writing() {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest(&mem, 1, all);
    g.offer(0, &[(MEM_SIZE as u64 - 16, 2048, true)]);
    g.backend
        .host_send(0, &tap_frame(&VnetHeader::default(), &eth_frame(100, 0)));
    g.handler.process_queue(0);
    assert!(g.needs_reset());
    assert_eq!(g.used_idx(0), 0);
}

/// Reads what the guest sees of one used chain: `len` bytes from its buffers in order.
fn read_parts(mem: &GuestMemoryMmap, parts: &[(u64, usize)], len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for &(addr, plen) in parts {
        let n = plen.min(len - out.len());
        let mut part = vec![0u8; n];
        mem.read_slice(&mut part, GuestAddress(addr)).unwrap();
        out.extend(part);
    }
    out
}

#[test]
fn rx_direct_read_fills_a_chain_whose_header_straddles_two_descriptors() {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest(&mem, 1, all);
    // 7 bytes, then the rest: num_buffers (bytes 10-11) lies in the second descriptor, the
    // header's first bytes in the first.
    let head = g.offer(0, &[(BUF, 7, true), (BUF + 0x1000, 2041, true)]);
    g.handler.process_queue(0);
    let frame = eth_frame(1400, 9);
    g.backend
        .host_send(0, &tap_frame(&VnetHeader::default(), &frame));
    g.handler.process_completions(0);
    let total = HEADER_LEN + frame.len();
    assert_eq!(g.used_idx(0), 1);
    assert_eq!(g.used_entry(0, 0), (u32::from(head), total as u32));
    let got = read_parts(&mem, &[(BUF, 7), (BUF + 0x1000, 2041)], total);
    assert_eq!(VnetHeader::parse(&got).unwrap().num_buffers, 1);
    assert_eq!(&got[HEADER_LEN..], &frame[..]);
    assert_eq!(g.stats().rx_frames.load(Ordering::Relaxed), 1);
    assert_eq!(
        g.stats().rx_direct.load(Ordering::Relaxed),
        1,
        "not read in place"
    );
}

#[test]
fn rx_direct_read_spreads_a_frame_over_merged_chains_and_leaves_the_rest_for_the_next() {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest(&mem, 1, all);
    let heads: Vec<u16> = (0..4u64)
        .map(|i| g.offer(0, &[(BUF + i * 0x1000, 600, true)]))
        .collect();
    g.handler.process_queue(0);
    let first = eth_frame(1400, 1);
    let second = eth_frame(100, 2);
    g.backend
        .host_send(0, &tap_frame(&VnetHeader::default(), &first));
    g.backend
        .host_send(0, &tap_frame(&VnetHeader::default(), &second));
    g.handler.process_completions(0);
    // 1412 bytes take three 600-byte chains; the second frame gets the fourth.
    assert_eq!(g.used_idx(0), 4);
    let lens: Vec<u32> = (0..3).map(|i| g.used_entry(0, i).1).collect();
    assert_eq!(lens, vec![600, 600, 212]);
    for (i, head) in heads.iter().enumerate().take(3) {
        assert_eq!(g.used_entry(0, i as u64).0, u32::from(*head));
    }
    let parts: Vec<(u64, usize)> = (0..3u64).map(|i| (BUF + i * 0x1000, 600)).collect();
    let got = read_parts(&mem, &parts, HEADER_LEN + first.len());
    assert_eq!(VnetHeader::parse(&got).unwrap().num_buffers, 3);
    assert_eq!(&got[HEADER_LEN..], &first[..]);
    assert_eq!(
        g.used_entry(0, 3),
        (u32::from(heads[3]), (HEADER_LEN + second.len()) as u32)
    );
    let got = read_parts(&mem, &[(BUF + 0x3000, 600)], HEADER_LEN + second.len());
    assert_eq!(VnetHeader::parse(&got).unwrap().num_buffers, 1);
    assert_eq!(&got[HEADER_LEN..], &second[..]);
    assert_eq!(
        g.stats().rx_direct.load(Ordering::Relaxed),
        2,
        "not read in place"
    );
}

#[test]
fn rx_chain_running_outside_guest_memory_sets_needs_reset_before_the_tap_writes_anywhere() {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest(&mem, 1, all);
    mem.write_slice(&[0x5a; 64], GuestAddress(BUF)).unwrap();
    // A valid first descriptor, then one past the end of memory.
    g.offer(0, &[(BUF, 64, true), (MEM_SIZE as u64 - 8, 2048, true)]);
    g.backend
        .host_send(0, &tap_frame(&VnetHeader::default(), &eth_frame(100, 0)));
    g.handler.process_queue(0);
    assert!(g.needs_reset());
    assert_eq!(g.used_idx(0), 0);
    let mut first = [0u8; 64];
    mem.read_slice(&mut first, GuestAddress(BUF)).unwrap();
    assert_eq!(
        first, [0x5a; 64],
        "the valid part of a bad chain was written"
    );
    assert!(
        readable(g.backend.device_ends[0].as_raw_fd()),
        "the frame must stay in the tap, not be read into a bad chain"
    );
}

#[test]
fn rx_merged_chain_shorter_than_the_header_sets_needs_reset() {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest(&mem, 1, all);
    g.offer(0, &[(BUF, 4, true)]);
    g.offer(0, &[(BUF + 0x1000, 2048, true)]);
    g.backend
        .host_send(0, &tap_frame(&VnetHeader::default(), &eth_frame(100, 0)));
    g.handler.process_queue(0);
    assert!(g.needs_reset());
    assert_eq!(g.used_idx(0), 0);
}

#[test]
fn rx_chain_too_short_without_mrg_rxbuf_drops_the_frame_and_keeps_the_chain_unpublished() {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest(&mem, 1, |f| f & !(1 << VIRTIO_NET_F_MRG_RXBUF));
    let head = g.offer(0, &[(BUF, 20, true)]);
    g.handler.process_queue(0);
    g.backend
        .host_send(0, &tap_frame(&VnetHeader::default(), &eth_frame(100, 0)));
    g.handler.process_completions(0);
    assert!(!g.needs_reset());
    assert_eq!(g.used_idx(0), 0);
    assert_eq!(g.stats().rx_dropped.load(Ordering::Relaxed), 1);
    // The chain is still the device's, for a frame that fits.
    g.backend
        .host_send(0, &tap_frame(&VnetHeader::default(), &[7; 8]));
    g.handler.process_completions(0);
    assert_eq!(g.used_idx(0), 1);
    assert_eq!(g.used_entry(0, 0), (u32::from(head), HEADER_LEN as u32 + 8));
}

#[test]
fn rx_buffer_spanning_two_memory_regions_is_filled_through_the_bounce_buffer() {
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), MEM_SIZE / 2),
        (GuestAddress(MEM_SIZE as u64 / 2), MEM_SIZE / 2),
    ])
    .unwrap();
    let mut g = guest(&mem, 1, all);
    let at = MEM_SIZE as u64 / 2 - 100;
    let head = g.offer(0, &[(at, 2048, true)]);
    g.handler.process_queue(0);
    let frame = eth_frame(1000, 3);
    g.backend
        .host_send(0, &tap_frame(&VnetHeader::default(), &frame));
    g.handler.process_completions(0);
    let total = HEADER_LEN + frame.len();
    assert_eq!(g.used_entry(0, 0), (u32::from(head), total as u32));
    let mut got = vec![0u8; total];
    mem.read_slice(&mut got, GuestAddress(at)).unwrap();
    assert_eq!(VnetHeader::parse(&got).unwrap().num_buffers, 1);
    assert_eq!(&got[HEADER_LEN..], &frame[..]);
    assert_eq!(g.stats().rx_direct.load(Ordering::Relaxed), 0);
}

// ---- features, config, control queue ----

#[test]
fn config_space_has_the_mac_link_up_and_the_queue_pairs() {
    let mem = guest_memory(MEM_SIZE);
    let g = guest(&mem, 2, all);
    let mut config = [0u8; 10];
    g.net.read_config(0, &mut config);
    assert_eq!(&config[..6], &[2, 0, 0, 0, 0, 7]);
    assert_eq!(
        u16::from_le_bytes([config[6], config[7]]),
        VIRTIO_NET_S_LINK_UP as u16
    );
    assert_eq!(u16::from_le_bytes([config[8], config[9]]), 2);
    let f = g.net.features();
    for bit in [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MQ,
        VIRTIO_NET_F_CTRL_VQ,
        virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX,
    ] {
        assert!(f & (1 << bit) != 0, "feature bit {bit} not offered");
    }
}

#[test]
fn activation_tells_the_tap_the_header_size_and_the_guest_offloads() {
    let mem = guest_memory(MEM_SIZE);
    let g = guest(&mem, 1, all);
    assert_eq!(
        g.backend.offload.load(Ordering::SeqCst),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN
    );
    let legacy = guest(&mem, 1, |f| {
        f & !(1 << VIRTIO_F_VERSION_1) & !(1 << VIRTIO_NET_F_MRG_RXBUF)
    });
    assert_eq!(legacy.backend.hdr_len.load(Ordering::SeqCst), 10);
    let plain = guest(&mem, 1, |f| f & !(1 << VIRTIO_NET_F_GUEST_CSUM));
    assert_eq!(
        plain.backend.offload.load(Ordering::SeqCst),
        0,
        "no TSO without checksum offload"
    );
}

#[test]
fn legacy_header_without_num_buffers_passes_through() {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest(&mem, 1, |f| {
        f & !(1 << VIRTIO_F_VERSION_1) & !(1 << VIRTIO_NET_F_MRG_RXBUF)
    });
    let frame = eth_frame(80, 4);
    let mut bytes = vec![0u8; 10];
    bytes.extend_from_slice(&frame);
    mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
    g.offer(1, &[(BUF, bytes.len() as u32, false)]);
    g.handler.process_queue(1);
    assert_eq!(g.backend.host_recv(0).unwrap(), bytes);
}

fn ctrl_command(g: &mut Guest, ctrl: usize, class: u8, cmd: u8, data: &[u8]) -> u8 {
    let mut bytes = vec![class, cmd];
    bytes.extend_from_slice(data);
    let at = BUF + 0x20_0000;
    g.mem.write_slice(&bytes, GuestAddress(at)).unwrap();
    g.mem.write_obj(0xffu8, GuestAddress(at + 0x100)).unwrap();
    g.offer(
        ctrl,
        &[(at, bytes.len() as u32, false), (at + 0x100, 1, true)],
    );
    g.handler.process_queue(ctrl);
    g.mem.read_obj(GuestAddress(at + 0x100)).unwrap()
}

#[test]
fn multiqueue_starts_on_one_pair_and_the_driver_enables_more_through_the_control_queue() {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest(&mem, 2, all);
    assert_eq!(*g.backend.enabled.lock().unwrap(), vec![true, false]);
    let ok = VIRTIO_NET_OK as u8;
    let err = VIRTIO_NET_ERR as u8;
    let mq = VIRTIO_NET_CTRL_MQ as u8;
    assert_eq!(ctrl_command(&mut g, 4, mq, 0, &2u16.to_le_bytes()), ok);
    assert_eq!(*g.backend.enabled.lock().unwrap(), vec![true, true]);
    assert_eq!(ctrl_command(&mut g, 4, mq, 0, &3u16.to_le_bytes()), err);
    assert_eq!(ctrl_command(&mut g, 4, mq, 0, &0u16.to_le_bytes()), err);
    assert_eq!(ctrl_command(&mut g, 4, 99, 0, &[]), err);
    // The second pair has its own tap queue.
    let len = put_tx(&mem, BUF, &VnetHeader::default(), &eth_frame(70, 1));
    g.offer(3, &[(BUF, len, false)]);
    g.handler.process_queue(3);
    assert!(g.backend.host_recv(0).is_none());
    assert_eq!(
        &g.backend.host_recv(1).unwrap()[HEADER_LEN..],
        &eth_frame(70, 1)[..]
    );
}

#[test]
fn without_mq_the_control_queue_is_queue_two() {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest(&mem, 2, |f| f & !(1 << VIRTIO_NET_F_MQ));
    assert_eq!(
        ctrl_command(&mut g, 2, VIRTIO_NET_CTRL_RX as u8, 0, &[1]),
        VIRTIO_NET_OK as u8
    );
}

// ---- the I/O thread's poll (the auto policy) ----

fn avail_event(g: &Guest, q: usize) -> u16 {
    g.mem
        .read_obj::<u16>(
            g.rings[q]
                .used_addr()
                .unchecked_add(4 + 8 * u64::from(QUEUE_LEN)),
        )
        .unwrap()
}

#[test]
fn polling_serves_the_pair_with_tx_kicks_off_until_rearmed() {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest(&mem, 1, all);
    g.offer(0, &[(BUF + 0x10_000, 2048, true)]);
    // The tap has a frame: the poll of the RX queue delivers it...
    g.backend
        .host_send(0, &tap_frame(&VnetHeader::default(), &eth_frame(100, 0)));
    assert!(g.handler.poll_queue(0));
    assert_eq!(g.used_idx(0), 1);
    // ...and the reply the driver queues next, without a kick, goes out on the next poll.
    let len = put_tx(&mem, BUF, &VnetHeader::default(), &eth_frame(64, 1));
    g.offer(1, &[(BUF, len, false)]);
    assert!(g.handler.poll_queue(0));
    assert_eq!(
        g.backend.host_recv(0).unwrap()[HEADER_LEN..],
        eth_frame(64, 1)[..]
    );
    assert!(g.stats().polled_frames.load(Ordering::Relaxed) >= 2);
    // While polled, the driver is not asked to kick (avail_event left behind)...
    assert!(!g.handler.poll_queue(0));
    assert_ne!(avail_event(&g, 1), 1);
    // ...and rearming asks again, at the next index.
    g.handler.rearm(0);
    assert_eq!(avail_event(&g, 1), 1);
}

#[test]
fn rearm_sends_what_arrived_after_the_last_poll() {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest(&mem, 1, all);
    assert!(!g.handler.poll_queue(1));
    let len = put_tx(&mem, BUF, &VnetHeader::default(), &eth_frame(64, 2));
    g.offer(1, &[(BUF, len, false)]);
    g.handler.rearm(1);
    assert_eq!(
        g.backend.host_recv(0).unwrap()[HEADER_LEN..],
        eth_frame(64, 2)[..]
    );
    assert!(!g.handler.busy(0) && !g.handler.busy(1));
}

// ---- sync kicks with hand-off (the auto policy) ----

#[test]
fn a_short_tx_burst_is_sent_on_the_kick_itself() {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest_with(&mem, 1, all, Some(4), std::time::Duration::ZERO);
    g.offer_tx_frames(3, |i| eth_frame(64, i as u8));
    g.handler.process_queue(1);
    for i in 0..3 {
        assert_eq!(
            g.backend.host_recv(0).unwrap()[HEADER_LEN..],
            eth_frame(64, i)[..]
        );
    }
    assert!(
        !readable(g.handler.completion_fd(0).unwrap()),
        "nothing to hand over"
    );
    assert_eq!(avail_event(&g, 1), 3, "kicks are back on");
}

#[test]
fn a_long_tx_burst_is_handed_to_the_io_thread_with_kicks_off_until_it_is_sent() {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest_with(&mem, 1, all, Some(4), std::time::Duration::ZERO);
    g.offer_tx_frames(10, |i| eth_frame(64, i as u8));
    g.handler.process_queue(1);
    assert_eq!(g.used_idx(1), 4, "the vCPU sends its share only");
    let watch = g.handler.completion_fd(0).unwrap();
    assert!(readable(watch), "the I/O thread must be woken for the rest");
    assert_ne!(
        avail_event(&g, 1),
        4,
        "no kicks while the I/O thread has the ring"
    );
    g.handler.process_completions(0);
    assert_eq!(g.used_idx(1), 10);
    for i in 0..10 {
        assert_eq!(
            g.backend.host_recv(0).unwrap()[HEADER_LEN..],
            eth_frame(64, i)[..]
        );
    }
    assert!(!readable(watch));
    assert_eq!(avail_event(&g, 1), 10, "kicks are back on once it is sent");
}

#[test]
fn a_reply_posted_soon_after_a_receive_goes_out_without_a_kick() {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest_with(&mem, 1, all, Some(8), std::time::Duration::from_secs(2));
    g.offer(0, &[(BUF + 0x10_000, 2048, true)]);
    g.backend
        .host_send(0, &tap_frame(&VnetHeader::default(), &eth_frame(100, 0)));
    // The "guest" answers 5 ms after the frame arrives, without kicking.
    let len = put_tx(&mem, BUF, &VnetHeader::default(), &eth_frame(64, 1));
    let (desc_at, ring) = (GuestAddress(ring_addr(1)), g.rings[1].avail_addr());
    let mem2 = mem.clone();
    let guest = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(5));
        mem2.write_obj(desc(BUF, len, 0, 0), desc_at).unwrap();
        mem2.write_obj(0u16, ring.unchecked_add(4)).unwrap();
        mem2.write_obj(1u16, ring.unchecked_add(2)).unwrap();
    });
    // While the I/O thread waits, the driver must not be asked to kick.
    g.handler.process_completions(0);
    guest.join().unwrap();
    assert_eq!(g.used_idx(0), 1);
    assert_eq!(
        g.backend.host_recv(0).unwrap()[HEADER_LEN..],
        eth_frame(64, 1)[..]
    );
    assert_eq!(g.used_idx(1), 1);
    assert_eq!(avail_event(&g, 1), 1, "kicks are back on after the wait");
    assert_eq!(g.stats().polled_frames.load(Ordering::Relaxed), 1);
}

#[test]
fn the_wait_sends_what_was_published_and_leaves_later_frames_to_the_kick() {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest_with(&mem, 1, all, None, std::time::Duration::from_secs(2));
    g.offer(0, &[(BUF + 0x10_000, 2048, true)]);
    // Three frames already published without a kick when the frame arrives: the wait ends at
    // once and sends them, and kicks are asked for from the driver's index on.
    g.offer_tx_frames(3, |i| eth_frame(64, i as u8));
    g.backend
        .host_send(0, &tap_frame(&VnetHeader::default(), &eth_frame(100, 9)));
    let start = std::time::Instant::now();
    g.handler.process_completions(0);
    assert!(start.elapsed() < std::time::Duration::from_secs(1));
    assert_eq!(g.used_idx(1), 3);
    assert_eq!(avail_event(&g, 1), 3, "the next publish must kick");
    for i in 0..3u8 {
        assert_eq!(
            g.backend.host_recv(0).unwrap()[HEADER_LEN..],
            eth_frame(64, i)[..]
        );
    }
    // A frame published after that comes with its kick.
    let len = put_tx(
        &mem,
        BUF + 0x5000,
        &VnetHeader::default(),
        &eth_frame(64, 5),
    );
    g.offer(1, &[(BUF + 0x5000, len, false)]);
    g.handler.process_queue(1);
    assert_eq!(g.used_idx(1), 4);
}

#[test]
fn without_replies_the_io_thread_stops_waiting_for_them() {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest_with(&mem, 1, all, Some(8), std::time::Duration::from_millis(50));
    for i in 0..2u64 {
        g.offer(0, &[(BUF + i * 0x1000, 2048, true)]);
    }
    g.backend
        .host_send(0, &tap_frame(&VnetHeader::default(), &eth_frame(100, 0)));
    let start = std::time::Instant::now();
    g.handler.process_completions(0);
    assert!(
        start.elapsed() >= std::time::Duration::from_millis(50),
        "first time it waits"
    );
    assert_eq!(
        avail_event(&g, 1),
        0,
        "kicks are back on after a fruitless wait"
    );
    g.backend
        .host_send(0, &tap_frame(&VnetHeader::default(), &eth_frame(100, 1)));
    let start = std::time::Instant::now();
    g.handler.process_completions(0);
    assert!(
        start.elapsed() < std::time::Duration::from_millis(50),
        "then it does not"
    );
    assert_eq!(g.used_idx(0), 2);
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET and sched_setaffinity act on this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set),
            0,
            "this test needs CPUs 0 and 1"
        );
    }
}

#[test]
fn a_transmit_slower_than_the_wait_after_a_receive_does_not_turn_the_wait_back_on() {
    let mem = guest_memory(MEM_SIZE);
    let wait = std::time::Duration::from_millis(20);
    let mut g = guest_with(&mem, 1, all, None, wait);
    for i in 0..4u64 {
        g.offer(0, &[(BUF + i * 0x1000, 2048, true)]);
    }
    // The "I/O thread" (this one) and the "vCPU" (kicks) on different CPUs, where waiting
    // is allowed at all.
    pin_to_cpu(0);
    let kick_tx = |g: &Guest| {
        let handler = g.handler.clone();
        std::thread::spawn(move || {
            pin_to_cpu(1);
            handler.process_queue(1);
        })
        .join()
        .unwrap();
    };
    let receive = |g: &Guest, seed: u8| {
        g.backend
            .host_send(0, &tap_frame(&VnetHeader::default(), &eth_frame(100, seed)));
        let start = std::time::Instant::now();
        g.handler.process_completions(0);
        start.elapsed() >= wait
    };
    assert!(receive(&g, 0), "the first receive waits");
    // The answer comes after the wait ended (as from a guest taking an interrupt first).
    std::thread::sleep(wait * 2);
    let len = put_tx(
        &mem,
        BUF + 0x8000,
        &VnetHeader::default(),
        &eth_frame(64, 1),
    );
    g.offer(1, &[(BUF + 0x8000, len, false)]);
    kick_tx(&g);
    assert_eq!(g.used_idx(1), 1);
    assert!(!receive(&g, 1), "a late answer is no reason to wait again");
    // A prompt one is.
    let len = put_tx(
        &mem,
        BUF + 0x9000,
        &VnetHeader::default(),
        &eth_frame(64, 2),
    );
    g.offer(1, &[(BUF + 0x9000, len, false)]);
    kick_tx(&g);
    assert!(
        receive(&g, 2),
        "an answer within the wait turns waiting back on"
    );
    assert_eq!(g.used_idx(0), 3);
}

#[test]
fn reset_stops_the_queues_and_the_tap_watch() {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest(&mem, 1, all);
    g.backend
        .host_send(0, &tap_frame(&VnetHeader::default(), &eth_frame(100, 0)));
    g.net.reset();
    assert!(!readable(g.handler.completion_fd(0).unwrap()));
    g.offer(0, &[(BUF, 2048, true)]);
    g.handler.process_queue(0);
    assert_eq!(g.used_idx(0), 0);
}

// ---- header handling ----

#[test]
fn header_round_trips_through_its_wire_form() {
    let hdr = VnetHeader {
        flags: 1,
        gso_type: 4,
        hdr_len: 74,
        gso_size: 1428,
        csum_start: 54,
        csum_offset: 16,
        num_buffers: 3,
    };
    let mut bytes = [0u8; HEADER_LEN];
    hdr.write(&mut bytes);
    assert_eq!(VnetHeader::parse(&bytes), Some(hdr));
    assert_eq!(VnetHeader::parse(&bytes[..9]), None);
    assert_eq!(VnetHeader::parse(&bytes[..10]).unwrap().num_buffers, 0);
}

#[test]
fn tx_header_checks_follow_the_negotiated_offloads() {
    let everything = !(1u64 << VIRTIO_NET_F_HOST_UFO);
    let csum = |start, offset| VnetHeader {
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
        csum_start: start,
        csum_offset: offset,
        ..Default::default()
    };
    assert_eq!(VnetHeader::default().check_tx(60, 0), Ok(()));
    assert_eq!(csum(34, 6).check_tx(60, everything), Ok(()));
    assert_eq!(
        csum(34, 6).check_tx(60, 0),
        Err(TxHeaderError::CsumNotNegotiated)
    );
    assert!(matches!(
        csum(58, 6).check_tx(60, everything),
        Err(TxHeaderError::CsumOutsideFrame { .. })
    ));
    let gso = |gso_type: u32, size| VnetHeader {
        gso_type: gso_type as u8,
        gso_size: size,
        ..csum(34, 16)
    };
    assert_eq!(
        gso(VIRTIO_NET_HDR_GSO_TCPV4, 1448).check_tx(9000, everything),
        Ok(())
    );
    assert_eq!(
        gso(VIRTIO_NET_HDR_GSO_TCPV6, 1448).check_tx(9000, everything),
        Ok(())
    );
    assert_eq!(
        gso(VIRTIO_NET_HDR_GSO_TCPV6, 1448)
            .check_tx(9000, everything & !(1 << VIRTIO_NET_F_HOST_TSO6)),
        Err(TxHeaderError::GsoNotNegotiated(
            VIRTIO_NET_HDR_GSO_TCPV6 as u8
        ))
    );
    assert!(gso(VIRTIO_NET_HDR_GSO_UDP, 1448)
        .check_tx(9000, everything)
        .is_err());
    assert_eq!(
        gso(VIRTIO_NET_HDR_GSO_TCPV4, 0).check_tx(9000, everything),
        Err(TxHeaderError::GsoSizeZero)
    );
    assert_eq!(
        gso(VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN, 1448)
            .check_tx(9000, everything & !(1 << VIRTIO_NET_F_HOST_ECN)),
        Err(TxHeaderError::GsoNotNegotiated(
            (VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN) as u8
        ))
    );
    assert!(gso(77, 1448).check_tx(9000, everything).is_err());
    assert_eq!(
        VnetHeader::default().check_tx(MAX_FRAME_LEN + 1, everything),
        Err(TxHeaderError::TooLarge(MAX_FRAME_LEN + 1))
    );
}

#[test]
fn header_length_and_tap_offloads_follow_the_features() {
    assert_eq!(vnet_header_len(1 << VIRTIO_F_VERSION_1), 12);
    assert_eq!(vnet_header_len(1 << VIRTIO_NET_F_MRG_RXBUF), 12);
    assert_eq!(vnet_header_len(0), 10);
    let f = |bits: &[u32]| bits.iter().fold(0u64, |a, b| a | 1 << b);
    assert_eq!(tap_offload_flags(f(&[VIRTIO_NET_F_GUEST_TSO4])), 0);
    assert_eq!(
        tap_offload_flags(f(&[VIRTIO_NET_F_GUEST_CSUM])),
        libc::TUN_F_CSUM
    );
    assert_eq!(
        tap_offload_flags(f(&[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO6])),
        libc::TUN_F_CSUM | libc::TUN_F_TSO6
    );
    assert_eq!(
        tap_offload_flags(f(&[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN])),
        libc::TUN_F_CSUM
    );
}

#[test]
fn paused_device_moves_no_frame_either_way_until_resumed() {
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest(&mem, 1, all);
    let watch = g.handler.completion_fd(0).unwrap();
    g.offer(0, &[(BUF, 2048, true)]);
    g.handler.process_queue(0);
    g.handler.set_paused(true);
    let rx_frame = eth_frame(200, 7);
    g.backend
        .host_send(0, &tap_frame(&VnetHeader::default(), &rx_frame));
    let len = put_tx(
        &mem,
        BUF + 0x4000,
        &VnetHeader::default(),
        &eth_frame(90, 3),
    );
    g.offer(1, &[(BUF + 0x4000, len, false)]);
    // Whatever the threads do while paused, nothing reaches the guest or the tap...
    g.handler.process_completions(0);
    g.handler.process_queue(0);
    g.handler.process_queue(1);
    assert!(!g.handler.poll_queue(1));
    assert_eq!(
        g.used_idx(0),
        0,
        "a frame reached guest memory while paused"
    );
    assert_eq!(g.used_idx(1), 0, "a frame left the guest while paused");
    assert!(g.backend.host_recv(0).is_none());
    // ...and the I/O thread is not woken over and over by the waiting frame.
    assert!(!readable(watch));
    // Resume looks at every queue, as the transport does.
    g.handler.set_paused(false);
    g.handler.process_queue(0);
    g.handler.process_queue(1);
    assert_eq!(g.used_idx(1), 1);
    assert_eq!(
        &g.backend.host_recv(0).unwrap()[HEADER_LEN..],
        &eth_frame(90, 3)[..]
    );
    if g.used_idx(0) == 0 {
        g.handler.process_completions(0);
    }
    assert_eq!(
        g.used_idx(0),
        1,
        "the frame that waited is delivered after resume"
    );
    let mut got = vec![0u8; rx_frame.len()];
    mem.read_slice(&mut got, GuestAddress(BUF + HEADER_LEN as u64))
        .unwrap();
    assert_eq!(got, rx_frame);
}

#[test]
fn a_snapshot_keeps_the_enabled_pairs_the_mac_and_each_queues_ring_position() {
    use crate::snapshot::{DeviceState, QueuePosition};
    let mem = guest_memory(MEM_SIZE);
    let mut g = guest(&mem, 2, all);
    let mq = VIRTIO_NET_CTRL_MQ as u8;
    ctrl_command(&mut g, 4, mq, 0, &2u16.to_le_bytes());
    // A legacy driver's MAC write.
    g.net.write_config(5, &[9]);
    let len = put_tx(&mem, BUF, &VnetHeader::default(), &eth_frame(70, 1));
    g.offer(3, &[(BUF, len, false)]);
    g.handler.process_queue(3);
    assert_eq!(
        g.handler.queue_position(3),
        Some(QueuePosition {
            next_avail: 1,
            next_used: 1,
            event_idx: true
        })
    );
    assert_eq!(g.handler.queue_position(4).unwrap().next_used, 1);
    assert_eq!(g.handler.queue_position(0).unwrap().next_avail, 0);
    let state = g.net.snapshot().unwrap();
    let DeviceState::Net {
        config,
        active_pairs,
    } = &state
    else {
        panic!("{state:?}");
    };
    assert_eq!((config[5], *active_pairs), (9, Some(2)));

    let backend = PairBackend::new(2);
    let options = NetOptions {
        mac: [2, 0, 0, 0, 0, 7],
        pairs: 2,
        queue_size: QUEUE_LEN,
        tx_inline: None,
        reply_poll: std::time::Duration::ZERO,
    };
    let mut fresh = VirtioNet::new(backend.clone(), options.clone()).unwrap();
    assert!(fresh.restore(&DeviceState::Blk).is_err());
    let mut one_pair = VirtioNet::new(
        PairBackend::new(1),
        NetOptions {
            pairs: 1,
            ..options
        },
    )
    .unwrap();
    assert!(one_pair.restore(&state).is_err(), "a device of 1 pair");
    fresh.restore(&state).unwrap();
    let mut mac = [0u8; 6];
    fresh.read_config(0, &mut mac);
    assert_eq!(mac, [2, 0, 0, 0, 0, 9]);
    let mem2 = guest_memory(MEM_SIZE);
    let nq = fresh.queue_max_sizes().len();
    let rings: Vec<_> = (0..nq)
        .map(|q| MockSplitQueue::create(&mem2, GuestAddress(ring_addr(q)), QUEUE_LEN))
        .collect();
    let counters: Arc<[QueueCounters]> = (0..nq).map(|_| QueueCounters::default()).collect();
    let acked_features = fresh.features();
    fresh
        .activate(Activation {
            mem: mem2.clone(),
            acked_features,
            interrupt: Arc::new(MockInterrupt::default()),
            queues: rings
                .iter()
                .enumerate()
                .map(|(index, ring)| QueueSetup {
                    index,
                    queue: ring.create_queue().unwrap(),
                    kick: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
                })
                .collect(),
            counters,
        })
        .unwrap();
    assert_eq!(
        *backend.enabled.lock().unwrap(),
        vec![true, true],
        "both tap queues attached again"
    );
}
