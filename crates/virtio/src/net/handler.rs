//! virtio-net's queue handler: TX on the kick, RX when the tap is readable or the guest posts
//! buffers, the control queue, and the I/O thread's bounded poll (the `auto` policy).
//!
//! When the I/O thread polls (transport `poll` > 0), a pair is served as one: the poll of
//! either queue looks at the tap and at the TX ring with TX notifications left off, because an
//! echo's reply follows its request and a stream's next frame follows the last. `rearm` turns
//! TX notifications back on and re-checks the ring.
//!
//! Each queue pair has its own locks and its own tap queue, so pairs never wait for each
//! other. The I/O thread learns of RX work through one epoll descriptor per pair that holds
//! the tap queue: while the guest has posted no RX buffers the tap is taken out of it, so a
//! full tap neither spins the thread nor is read into unbounded memory (frames wait in the
//! tap's own bounded queue, and the kernel drops beyond it). The guest's RX kick (enabled
//! only while buffers ran out) puts it back.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::GuestMemoryMmap;
use virtio_bindings::virtio_net::*;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::header::{
    tap_offload_flags, vnet_header_len, VnetHeader, HEADER_LEN, NUM_BUFFERS_OFFSET,
};
use super::tap::NetBackend;
use super::MAX_FRAME_LEN;
use crate::counters::QueueCounters;
use crate::device::{ActivateError, Activation, QueueHandler, VirtioInterrupt};
use crate::snapshot::QueuePosition;

/// Frames moved per call before the handler lets the I/O thread look at other events.
const BATCH: usize = 256;
/// RX reads straight into the guest's buffers when the chains at hand hold this much frame
/// (a full Ethernet frame with a VLAN tag): the usual frame then costs no copy. A bigger one
/// (GSO) spills into the bounce buffer and takes the copying path.
const DIRECT_FRAME_LEN: usize = 1518;
/// readv's limit (UIO_MAXIOV), the bounce buffer's tail included.
const MAX_IOVECS: usize = 1024;

type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;
/// An RX chain's head, its writable segments, and their total length.
type RxChain = (u16, Vec<(GuestAddress, usize)>, usize);

/// Drops and errors, for tests and reports.
#[derive(Debug, Default)]
pub struct NetStats {
    pub tx_frames: AtomicU64,
    pub tx_dropped: AtomicU64,
    pub rx_frames: AtomicU64,
    pub rx_dropped: AtomicU64,
    /// Frames the I/O thread's poll found (TX without a kick, RX without waiting for epoll).
    pub polled_frames: AtomicU64,
    /// RX frames the tap wrote straight into the guest's buffers (no bounce copy).
    pub rx_direct: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Whether the driver's available index is more than a ring ahead of what the device took
/// (or unreadable): `pop_descriptor_chain` then refuses the ring, so waiting cannot help.
fn log_read_error() {
    let e = io::Error::last_os_error();
    if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted {
        log::debug!("virtio-net RX: tap read failed: {e}");
    }
}

fn avail_out_of_range(mem: &GuestMemoryMmap, queue: &Queue) -> bool {
    queue.avail_idx(mem, Ordering::Acquire).map_or(true, |idx| {
        idx.0.wrapping_sub(queue.next_avail()) > queue.size()
    })
}

struct RxQueue {
    queue: Queue,
    /// Header and frame read from the tap; `pending` bytes of it wait for buffers.
    bounce: Vec<u8>,
    pending: usize,
    broken: bool,
    /// Scratch for the direct read: the chains taken (head, capacity), their writable
    /// segments in order, and the iovecs over them.
    peeked: Vec<(u16, usize)>,
    segments: Vec<(GuestAddress, usize)>,
    iovecs: Vec<libc::iovec>,
}

// SAFETY: `iovecs` holds pointers into guest memory and the bounce buffer only during one
// direct read, under the queue's lock; both outlive the handler's use of them.
unsafe impl Send for RxQueue {}

/// What a direct read did with the next frame.
enum Direct {
    /// Settled: delivered, nothing to put it in, a dropped frame or a broken ring.
    Done(RxOutcome),
    /// The frame is in the bounce buffer (`pending`): the copying path takes over.
    Bounced,
    /// The tap had nothing (or failed).
    TapEmpty,
}

struct TxQueue {
    queue: Queue,
    iovecs: Vec<libc::iovec>,
    broken: bool,
}

// SAFETY: `iovecs` holds pointers into guest memory only between building a frame and
// writing it, under the queue's lock; the memory outlives the handler.
unsafe impl Send for TxQueue {}

struct Pair {
    rx_index: usize,
    tx_index: usize,
    rx: Mutex<Option<RxQueue>>,
    tx: Mutex<Option<TxQueue>>,
    fd: RawFd,
    /// Holds `fd` while the guest has RX buffers; the I/O thread watches this.
    readiness: Epoll,
    tap_watched: AtomicBool,
    /// Wakes the I/O thread (through `readiness`) to send what a vCPU left for it.
    handoff: EventFd,
    tx_handed_off: AtomicBool,
    /// When frames last went to the guest (ns since `NetHandler::clock`).
    last_rx_ns: AtomicU64,
    /// Transmits follow receives closely (request/response): wait for replies.
    replies_follow: AtomicBool,
    /// The CPU the last TX kick ran on (the vCPU's, in sync mode); -1 before the first.
    kick_cpu: AtomicI32,
}

/// How far one TX pass goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TxMode {
    /// Everything, then notifications on.
    Drain,
    /// What is there now, notifications left off: the polling I/O thread comes back.
    Quiet,
    /// Up to N frames on the calling (vCPU) thread; if more wait, the I/O thread takes over.
    Inline(usize),
}

enum RxOutcome {
    /// Chains used, frame bytes (without the header).
    Delivered(usize, usize),
    NoBuffers,
    Dropped,
    Fatal(&'static str),
}

pub struct NetHandler {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    counters: Arc<[QueueCounters]>,
    backend: Arc<dyn NetBackend>,
    acked: u64,
    hdr_len: usize,
    mrg_rxbuf: bool,
    pairs: Vec<Pair>,
    ctrl_index: Option<usize>,
    ctrl: Mutex<Option<Queue>>,
    num_queues: usize,
    /// Sync-kick TX: frames sent on the vCPU before the rest is handed to the I/O thread.
    tx_inline: Option<usize>,
    /// How long the I/O thread watches for a reply after delivering frames (zero: never).
    reply_poll: Duration,
    clock: Instant,
    /// VM paused: no frame moves in either direction until resume.
    paused: AtomicBool,
    /// What the driver last set with VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, for a snapshot.
    active_pairs: AtomicUsize,
    pub stats: NetStats,
}

fn has(features: u64, bit: u32) -> bool {
    features & (1 << bit) != 0
}

impl NetHandler {
    pub fn new(
        activation: Activation,
        backend: Arc<dyn NetBackend>,
        max_pairs: usize,
        tx_inline: Option<usize>,
        reply_poll: Duration,
    ) -> Result<Self, ActivateError> {
        let acked = activation.acked_features;
        let mq = has(acked, VIRTIO_NET_F_MQ) && has(acked, VIRTIO_NET_F_CTRL_VQ);
        let pairs_offered = if mq { max_pairs } else { 1 };
        // The control queue follows the last pair the driver may use (virtio 1.x 5.1.2).
        let ctrl_index = has(acked, VIRTIO_NET_F_CTRL_VQ).then_some(pairs_offered * 2);
        let hdr_len = vnet_header_len(acked);
        let backend_err = |what: &str, e: io::Error| ActivateError::Backend(format!("{what}: {e}"));
        backend
            .set_vnet_header_len(hdr_len)
            .map_err(|e| backend_err("TUNSETVNETHDRSZ", e))?;
        backend
            .set_offload(tap_offload_flags(acked))
            .map_err(|e| backend_err("TUNSETOFFLOAD", e))?;

        let mut rx_queues: Vec<Option<Queue>> = (0..pairs_offered).map(|_| None).collect();
        let mut tx_queues: Vec<Option<Queue>> = (0..pairs_offered).map(|_| None).collect();
        let mut ctrl = None;
        let mut num_queues = 0;
        for setup in activation.queues {
            num_queues = num_queues.max(setup.index + 1);
            if Some(setup.index) == ctrl_index {
                ctrl = Some(setup.queue);
            } else if setup.index < pairs_offered * 2 {
                let slot = if setup.index % 2 == 0 {
                    &mut rx_queues[setup.index / 2]
                } else {
                    &mut tx_queues[setup.index / 2]
                };
                *slot = Some(setup.queue);
            }
            // A queue beyond what the features allow is left alone.
        }
        let mut pairs = Vec::with_capacity(pairs_offered);
        for (i, (rx, tx)) in rx_queues.into_iter().zip(tx_queues).enumerate() {
            let readiness = Epoll::new().map_err(|e| backend_err("epoll", e))?;
            let handoff = EventFd::new(EFD_NONBLOCK).map_err(|e| backend_err("eventfd", e))?;
            readiness
                .ctl(
                    ControlOperation::Add,
                    handoff.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, 1),
                )
                .map_err(|e| backend_err("epoll", e))?;
            let mut rx = rx.map(|queue| RxQueue {
                queue,
                bounce: vec![0; hdr_len + MAX_FRAME_LEN],
                pending: 0,
                broken: false,
                peeked: Vec::with_capacity(8),
                segments: Vec::with_capacity(8),
                iovecs: Vec::with_capacity(8),
            });
            if let Some(rx) = rx.as_mut() {
                // RX kicks are only wanted once buffers run out.
                let _ = rx.queue.disable_notification(&activation.mem);
            }
            pairs.push(Pair {
                rx_index: 2 * i,
                tx_index: 2 * i + 1,
                rx: Mutex::new(rx),
                tx: Mutex::new(tx.map(|queue| TxQueue {
                    queue,
                    iovecs: Vec::with_capacity(64),
                    broken: false,
                })),
                fd: backend.queue_fd(i),
                readiness,
                tap_watched: AtomicBool::new(false),
                handoff,
                tx_handed_off: AtomicBool::new(false),
                last_rx_ns: AtomicU64::new(0),
                replies_follow: AtomicBool::new(true),
                kick_cpu: AtomicI32::new(-1),
            });
        }
        let handler = Self {
            mem: activation.mem,
            interrupt: activation.interrupt,
            counters: activation.counters,
            backend,
            acked,
            hdr_len,
            mrg_rxbuf: has(acked, VIRTIO_NET_F_MRG_RXBUF),
            pairs,
            ctrl_index,
            ctrl: Mutex::new(ctrl),
            num_queues,
            tx_inline,
            reply_poll,
            clock: Instant::now(),
            paused: AtomicBool::new(false),
            active_pairs: AtomicUsize::new(1),
            stats: NetStats::default(),
        };
        // One pair until the driver asks for more (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET).
        handler.set_active_pairs(1);
        for pair in &handler.pairs {
            if pair.rx.lock().unwrap().is_some() {
                handler.watch_tap(pair, true);
            }
        }
        Ok(handler)
    }

    pub(crate) fn active_pairs(&self) -> usize {
        self.active_pairs.load(Ordering::SeqCst)
    }

    /// Device reset: stop using the queues (the tap keeps whatever it queued).
    pub fn shut_down(&self) {
        for pair in &self.pairs {
            self.watch_tap(pair, false);
            drop(pair.rx.lock().unwrap().take());
            drop(pair.tx.lock().unwrap().take());
        }
        self.ctrl.lock().unwrap().take();
    }

    /// The queue pairs the driver uses (one until it asks for more): the tap queues beyond
    /// them are detached.
    pub(crate) fn set_active_pairs(&self, active: usize) {
        self.active_pairs.store(active, Ordering::SeqCst);
        for i in 0..self.backend.queues() {
            if let Err(e) = self.backend.set_queue_enabled(i, i < active) {
                log::warn!("virtio-net: cannot (de)attach tap queue {i}: {e}");
            }
        }
    }

    fn watch_tap(&self, pair: &Pair, watch: bool) {
        if pair.tap_watched.swap(watch, Ordering::SeqCst) == watch {
            return;
        }
        let result = if watch {
            pair.readiness.ctl(
                ControlOperation::Add,
                pair.fd,
                EpollEvent::new(EventSet::IN, 0),
            )
        } else {
            pair.readiness
                .ctl(ControlOperation::Delete, pair.fd, EpollEvent::default())
        };
        if let Err(e) = result {
            log::warn!("virtio-net: cannot change tap readiness watch: {e}");
        }
    }

    fn pair_of(&self, queue: usize) -> Option<&Pair> {
        self.pairs.get(queue / 2)
    }

    fn fatal(&self, queue: usize, reason: &str) {
        log::warn!("virtio-net queue {queue}: {reason}; device needs reset");
        self.interrupt.set_needs_reset();
    }

    fn signal(&self, queue: usize, q: &mut Queue) {
        match q.needs_notification(&self.mem) {
            Ok(false) => QueueCounters::add(&self.counters[queue].interrupts_suppressed, 1),
            // Unreadable used_event: interrupt anyway, a spurious one is harmless.
            _ => self.interrupt.signal_queue(queue),
        }
    }

    // ---- TX ----

    /// Sends what the driver made available, as `mode` says. Unless the mode leaves the ring
    /// to someone who will come back (the polling I/O thread, a hand-off), notifications are
    /// back on at return and the ring was re-checked after, so no kick can be lost.
    fn tx_run(&self, pair: &Pair, mode: TxMode) -> usize {
        let index = pair.tx_index;
        let mut guard = pair.tx.lock().unwrap();
        let Some(tx) = guard.as_mut() else { return 0 };
        if tx.broken {
            return 0;
        }
        let mut sent = 0;
        let mut used = 0;
        let mut handed_off = false;
        // Passes that found the ring non-empty yet popped nothing (bounded: a ring pop keeps
        // refusing would otherwise spin here).
        let mut empty_passes = 0;
        let keep_quiet = mode == TxMode::Quiet;
        let inline = match mode {
            TxMode::Inline(n) => n,
            _ => usize::MAX,
        };
        let result = (|| -> Result<(), &'static str> {
            tx.queue
                .disable_notification(&self.mem)
                .map_err(|_| "used ring not writable")?;
            loop {
                let mut popped = 0;
                while let Some(chain) = tx.queue.pop_descriptor_chain(&self.mem) {
                    popped += 1;
                    let head = chain.head_index();
                    if self.send_frame(pair.fd, &mut tx.iovecs, chain, index) {
                        sent += 1;
                    }
                    tx.queue
                        .add_used(&self.mem, head, 0)
                        .map_err(|_| "descriptor head out of range")?;
                    used += 1;
                    if keep_quiet && used >= BATCH {
                        break;
                    }
                    if used >= inline {
                        let more = tx
                            .queue
                            .avail_idx(&self.mem, Ordering::Acquire)
                            .map_or(true, |idx| idx.0 != tx.queue.next_avail());
                        if more {
                            // A stream, not a reply: the I/O thread sends the rest while the
                            // vCPU goes back to its guest; kicks stay off until it is done.
                            handed_off = true;
                            return Ok(());
                        }
                    }
                }
                if keep_quiet {
                    // The poller comes back to the ring; kicks would only cost the guest.
                    return Ok(());
                }
                match tx.queue.enable_notification(&self.mem) {
                    Ok(false) => return Ok(()),
                    // Nothing popped yet more is available: either the driver published
                    // between the empty pop and this re-check (a kick it suppressed, or the
                    // reply wait's timeout, meets its next frame here: go round again), or
                    // its index is more than a ring ahead, which pop refuses for good.
                    Ok(true)
                        if popped == 0
                            && (avail_out_of_range(&self.mem, &tx.queue) || {
                                empty_passes += 1;
                                empty_passes > 2
                            }) =>
                    {
                        return Err("available index out of range")
                    }
                    Ok(true) => {
                        let _ = tx.queue.disable_notification(&self.mem);
                    }
                    Err(_) => return Err("available ring unreadable"),
                }
            }
        })();
        if let Err(reason) = result {
            tx.broken = true;
            self.fatal(index, reason);
        }
        if used > 0 {
            self.signal(index, &mut tx.queue);
        }
        drop(guard);
        if handed_off {
            pair.tx_handed_off.store(true, Ordering::Release);
            if let Err(e) = pair.handoff.write(1) {
                // Cannot happen short of a counter overflow; send the rest here instead.
                log::warn!("virtio-net: TX hand-off failed ({e}); sending inline");
                pair.tx_handed_off.store(false, Ordering::Release);
                return sent + self.tx_run(pair, TxMode::Drain);
            }
        }
        sent
    }

    /// Writes one TX chain to the tap. Bad chains are dropped (false), never fatal: the
    /// chain is returned to the driver either way.
    fn send_frame(
        &self,
        fd: RawFd,
        iovecs: &mut Vec<libc::iovec>,
        chain: Chain,
        queue: usize,
    ) -> bool {
        iovecs.clear();
        let mut header = [0u8; super::header::HEADER_LEN];
        let mut total = 0usize;
        let mut cut_short = false;
        for desc in chain {
            cut_short = desc.has_next();
            if desc.is_write_only() {
                return self.drop_tx("write-only descriptor in a TX chain");
            }
            let len = desc.len() as usize;
            if len == 0 {
                continue;
            }
            let Ok(slice) = self.mem.get_slice(desc.addr(), len) else {
                return self.drop_tx("descriptor outside guest memory");
            };
            if total < self.hdr_len {
                let n = (self.hdr_len - total).min(len);
                if self
                    .mem
                    .read_slice(&mut header[total..total + n], desc.addr())
                    .is_err()
                {
                    return self.drop_tx("header unreadable");
                }
            }
            total += len;
            if total > self.hdr_len + MAX_FRAME_LEN {
                return self.drop_tx("frame over 64 KiB");
            }
            iovecs.push(libc::iovec {
                // The mapping is plain anonymous memory (no Xen grants): the pointer stays
                // valid after the guard.
                iov_base: slice.ptr_guard().as_ptr() as *mut libc::c_void,
                iov_len: len,
            });
        }
        if cut_short {
            // The iterator stops at a loop or a next index beyond the table.
            return self.drop_tx("descriptor chain loops or leaves the table");
        }
        if total < self.hdr_len {
            return self.drop_tx("chain shorter than the virtio-net header");
        }
        let frame_len = total - self.hdr_len;
        let Some(hdr) = VnetHeader::parse(&header[..self.hdr_len]) else {
            return self.drop_tx("short header");
        };
        if let Err(e) = hdr.check_tx(frame_len, self.acked) {
            log::debug!("virtio-net TX: {e}");
            return self.drop_tx("bad virtio-net header");
        }
        if frame_len < 14 {
            return self.drop_tx("frame shorter than an Ethernet header");
        }
        // SAFETY: every iovec points into guest memory checked by get_slice above, which
        // outlives this call; writev only reads them.
        let ret = unsafe { libc::writev(fd, iovecs.as_ptr(), iovecs.len() as libc::c_int) };
        iovecs.clear();
        if ret < 0 {
            let e = io::Error::last_os_error();
            log::debug!("virtio-net TX: tap write failed: {e}");
            add(&self.stats.tx_dropped, 1);
            return false;
        }
        QueueCounters::add(&self.counters[queue].requests, 1);
        QueueCounters::add(&self.counters[queue].bytes, frame_len as u64);
        add(&self.stats.tx_frames, 1);
        true
    }

    fn drop_tx(&self, reason: &str) -> bool {
        log::debug!("virtio-net TX chain dropped: {reason}");
        add(&self.stats.tx_dropped, 1);
        false
    }

    // ---- RX ----

    /// Moves frames from the tap into posted buffers until either runs out.
    fn rx_run(&self, pair: &Pair) -> usize {
        let index = pair.rx_index;
        let mut guard = pair.rx.lock().unwrap();
        let Some(rx) = guard.as_mut() else { return 0 };
        if rx.broken {
            self.watch_tap(pair, false);
            return 0;
        }
        let mut frames = 0;
        let mut used = 0;
        let mut always_signal = false;
        for _ in 0..BATCH {
            let outcome = if rx.pending == 0 {
                match self.read_direct(pair, rx) {
                    Direct::Done(outcome) => outcome,
                    Direct::Bounced => self.deliver(rx),
                    Direct::TapEmpty => break,
                }
            } else {
                self.deliver(rx)
            };
            match outcome {
                RxOutcome::Delivered(chains, bytes) => {
                    QueueCounters::add(&self.counters[index].requests, 1);
                    QueueCounters::add(&self.counters[index].bytes, bytes as u64);
                    add(&self.stats.rx_frames, 1);
                    rx.pending = 0;
                    frames += 1;
                    used += chains;
                    always_signal |= chains > 1;
                }
                RxOutcome::Dropped => {
                    add(&self.stats.rx_dropped, 1);
                    rx.pending = 0;
                }
                RxOutcome::NoBuffers => {
                    // Ask for a kick when buffers come; re-check to close the race with a
                    // driver that posted just now.
                    match rx.queue.enable_notification(&self.mem) {
                        Ok(true) if avail_out_of_range(&self.mem, &rx.queue) => {
                            rx.broken = true;
                            self.watch_tap(pair, false);
                            self.fatal(index, "available index out of range");
                            break;
                        }
                        Ok(true) => {
                            let _ = rx.queue.disable_notification(&self.mem);
                            continue;
                        }
                        Ok(false) => {
                            self.watch_tap(pair, false);
                            break;
                        }
                        Err(_) => {
                            rx.broken = true;
                            self.fatal(index, "available ring unreadable");
                            break;
                        }
                    }
                }
                RxOutcome::Fatal(reason) => {
                    rx.broken = true;
                    self.watch_tap(pair, false);
                    self.fatal(index, reason);
                    break;
                }
            }
        }
        if used > 0 {
            if always_signal {
                // A frame spread over several buffers was published with fewer used-index
                // updates than entries, which EVENT_IDX bookkeeping cannot follow exactly.
                let _ = rx.queue.needs_notification(&self.mem);
                self.interrupt.signal_queue(index);
            } else {
                self.signal(index, &mut rx.queue);
            }
        }
        frames
    }

    /// Copies the pending frame into one chain (or several, with MRG_RXBUF).
    fn deliver(&self, rx: &mut RxQueue) -> RxOutcome {
        let len = rx.pending;
        // Where each chain's writable bytes are, collected before anything is written, so a
        // frame that does not fit leaves the ring untouched.
        let mut chains: Vec<RxChain> = Vec::new();
        let mut room = 0usize;
        while room < len {
            let Some(chain) = rx.queue.pop_descriptor_chain(&self.mem) else {
                for _ in 0..chains.len() {
                    rx.queue.go_to_previous_position();
                }
                return RxOutcome::NoBuffers;
            };
            let head = chain.head_index();
            let mut segments = Vec::new();
            let mut capacity = 0usize;
            let mut cut_short = false;
            for desc in chain {
                cut_short = desc.has_next();
                if !desc.is_write_only() {
                    return RxOutcome::Fatal("read-only descriptor in an RX chain");
                }
                let dlen = desc.len() as usize;
                if !self.mem.check_range(desc.addr(), dlen) {
                    return RxOutcome::Fatal("RX descriptor outside guest memory");
                }
                segments.push((desc.addr(), dlen));
                capacity += dlen;
            }
            if cut_short {
                return RxOutcome::Fatal("RX descriptor chain loops or leaves the table");
            }
            room += capacity;
            chains.push((head, segments, capacity));
            if !self.mrg_rxbuf {
                break;
            }
            if chains.len() == 1 && capacity < self.hdr_len {
                return RxOutcome::Fatal("RX buffer shorter than the virtio-net header");
            }
        }
        if room < len {
            // Without MRG_RXBUF a frame must fit one chain: this one is too big for what the
            // driver posts. The chain goes back for the next frame.
            rx.queue.go_to_previous_position();
            return RxOutcome::Dropped;
        }
        if self.hdr_len >= HEADER_LEN {
            // Set even without MRG_RXBUF, where it must read 1 (virtio 1.x 5.1.6.3.1); the
            // tap leaves these two bytes unwritten.
            let count = chains.len() as u16;
            rx.bounce[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2]
                .copy_from_slice(&count.to_le_bytes());
        }
        let mut offset = 0usize;
        let mut used = Vec::with_capacity(chains.len());
        for (head, segments, _) in &chains {
            let begin = offset;
            for &(addr, dlen) in segments {
                if offset >= len {
                    break;
                }
                let n = dlen.min(len - offset);
                if self
                    .mem
                    .write_slice(&rx.bounce[offset..offset + n], addr)
                    .is_err()
                {
                    return RxOutcome::Fatal("RX buffer not writable");
                }
                offset += n;
            }
            used.push((*head, offset - begin));
        }
        if let Err(reason) = self.publish_used(&mut rx.queue, &used) {
            return RxOutcome::Fatal(reason);
        }
        RxOutcome::Delivered(chains.len(), len - self.hdr_len)
    }

    /// Puts one frame's chains (head, bytes written) in the used ring and moves the used
    /// index once, past all of them, so the driver never sees part of a frame.
    fn publish_used(&self, queue: &mut Queue, used: &[(u16, usize)]) -> Result<(), &'static str> {
        let start = queue.next_used();
        let last = used.len() - 1;
        for (i, &(head, written)) in used.iter().enumerate() {
            let written = written as u32;
            if i < last {
                let slot = u64::from(start.wrapping_add(i as u16) % queue.size());
                let at = GuestAddress(queue.used_ring()).checked_add(4 + slot * 8);
                let ok = at.is_some_and(|at| {
                    self.mem.write_obj(u32::from(head), at).is_ok()
                        && self.mem.write_obj(written, at.unchecked_add(4)).is_ok()
                });
                if !ok {
                    return Err("used ring not writable");
                }
            } else {
                queue.set_next_used(start.wrapping_add(last as u16));
                if queue.add_used(&self.mem, head, written).is_err() {
                    return Err("used ring not writable");
                }
            }
        }
        Ok(())
    }

    /// Reads the next frame from the tap into the bounce buffer; its length, or None when
    /// the tap has nothing (or failed).
    fn read_bounce(&self, pair: &Pair, rx: &mut RxQueue) -> Option<usize> {
        // SAFETY: reads into the bounce buffer, which is as long as the count given.
        let n = unsafe {
            libc::read(
                pair.fd,
                rx.bounce.as_mut_ptr() as *mut libc::c_void,
                rx.bounce.len(),
            )
        };
        if n < 0 {
            log_read_error();
            return None;
        }
        // Stamped before the guest can see the frame, so a reply's kick compares against
        // this frame, not the previous one.
        self.stamp_rx(pair);
        Some(n as usize)
    }

    fn stamp_rx(&self, pair: &Pair) {
        pair.last_rx_ns
            .store(self.clock.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// Reads the next frame from the tap straight into the guest's next RX chain (with
    /// MRG_RXBUF, the next few, up to a full Ethernet frame's room), one `readv` with the
    /// bounce buffer as its last piece. A frame that fits costs no copy; one that spills
    /// over is moved whole into the bounce buffer and left to `deliver`, which waits for
    /// more buffers or drops it exactly as a bounced frame would be. Chains not used go
    /// back to the ring; every descriptor is checked before the tap writes anywhere.
    fn read_direct(&self, pair: &Pair, rx: &mut RxQueue) -> Direct {
        rx.peeked.clear();
        rx.segments.clear();
        rx.iovecs.clear();
        let want = self.hdr_len + DIRECT_FRAME_LEN;
        let mut capacity = 0usize;
        // A descriptor that spans two memory regions has no single host slice.
        let mut split_region = false;
        while capacity < want && rx.iovecs.len() < MAX_IOVECS - 1 {
            let Some(chain) = rx.queue.pop_descriptor_chain(&self.mem) else {
                break;
            };
            let head = chain.head_index();
            let mut chain_capacity = 0usize;
            let mut cut_short = false;
            for desc in chain {
                cut_short = desc.has_next();
                if !desc.is_write_only() {
                    return Direct::Done(RxOutcome::Fatal("read-only descriptor in an RX chain"));
                }
                let dlen = desc.len() as usize;
                if !self.mem.check_range(desc.addr(), dlen) {
                    return Direct::Done(RxOutcome::Fatal("RX descriptor outside guest memory"));
                }
                if dlen == 0 {
                    continue;
                }
                match self.mem.get_slice(desc.addr(), dlen) {
                    Ok(slice) => rx.iovecs.push(libc::iovec {
                        // Plain anonymous memory (no Xen grants): the pointer stays valid
                        // after the guard.
                        iov_base: slice.ptr_guard_mut().as_ptr() as *mut libc::c_void,
                        iov_len: dlen,
                    }),
                    Err(_) => split_region = true,
                }
                rx.segments.push((desc.addr(), dlen));
                chain_capacity += dlen;
            }
            if cut_short {
                return Direct::Done(RxOutcome::Fatal(
                    "RX descriptor chain loops or leaves the table",
                ));
            }
            if self.mrg_rxbuf && rx.peeked.is_empty() && chain_capacity < self.hdr_len {
                return Direct::Done(RxOutcome::Fatal(
                    "RX buffer shorter than the virtio-net header",
                ));
            }
            rx.peeked.push((head, chain_capacity));
            capacity += chain_capacity;
            if !self.mrg_rxbuf {
                break;
            }
        }
        if rx.peeked.is_empty() {
            return Direct::Done(RxOutcome::NoBuffers);
        }
        if split_region || rx.iovecs.len() >= MAX_IOVECS {
            self.put_back(rx, rx.peeked.len());
            return match self.read_bounce(pair, rx) {
                Some(n) => self.bounced(rx, n),
                None => Direct::TapEmpty,
            };
        }
        // The bounce buffer takes whatever does not fit, so no frame is ever cut short.
        let tail = rx.bounce.len().saturating_sub(capacity);
        if tail > 0 {
            rx.iovecs.push(libc::iovec {
                iov_base: rx.bounce[capacity..].as_mut_ptr() as *mut libc::c_void,
                iov_len: tail,
            });
        }
        // SAFETY: every iovec is either a host slice of guest memory checked above (mapped
        // for the VM's lifetime) or part of the bounce buffer, each as long as given.
        let n = unsafe { libc::readv(pair.fd, rx.iovecs.as_ptr(), rx.iovecs.len() as i32) };
        rx.iovecs.clear();
        if n < 0 {
            log_read_error();
            self.put_back(rx, rx.peeked.len());
            return Direct::TapEmpty;
        }
        self.stamp_rx(pair);
        let n = n as usize;
        crate::dirty::mark_segments_written(&self.mem, rx.segments.iter().copied(), n);
        if n > capacity + tail {
            // The tap reports a frame's whole length even when it cut it short.
            self.put_back(rx, rx.peeked.len());
            return Direct::Done(RxOutcome::Dropped);
        }
        if n > capacity {
            // Spilled: gather the part in the guest's buffers in front of the rest.
            let mut offset = 0;
            for &(addr, dlen) in &rx.segments {
                let part = &mut rx.bounce[offset..offset + dlen];
                if self.mem.read_slice(part, addr).is_err() {
                    return Direct::Done(RxOutcome::Fatal("RX buffer not readable"));
                }
                offset += dlen;
            }
            self.put_back(rx, rx.peeked.len());
            return self.bounced(rx, n);
        }
        if n < self.hdr_len {
            self.put_back(rx, rx.peeked.len());
            return Direct::Done(RxOutcome::Dropped);
        }
        // The chains the frame filled (each entry becomes head, bytes written); the rest
        // go back.
        let mut left = n;
        let mut filled = 0;
        for entry in rx.peeked.iter_mut() {
            entry.1 = entry.1.min(left);
            left -= entry.1;
            filled += 1;
            if left == 0 {
                break;
            }
        }
        self.put_back(rx, rx.peeked.len() - filled);
        rx.peeked.truncate(filled);
        if self.hdr_len >= HEADER_LEN {
            // The tap leaves num_buffers unwritten (see `deliver`).
            let count = (filled as u16).to_le_bytes();
            if !self.write_at(&rx.segments, NUM_BUFFERS_OFFSET, &count) {
                return Direct::Done(RxOutcome::Fatal("RX buffer not writable"));
            }
        }
        if let Err(reason) = self.publish_used(&mut rx.queue, &rx.peeked) {
            return Direct::Done(RxOutcome::Fatal(reason));
        }
        add(&self.stats.rx_direct, 1);
        Direct::Done(RxOutcome::Delivered(filled, n - self.hdr_len))
    }

    /// A frame of `n` bytes now in the bounce buffer: over-long ones are dropped.
    fn bounced(&self, rx: &mut RxQueue, n: usize) -> Direct {
        if n < self.hdr_len || n > rx.bounce.len() {
            return Direct::Done(RxOutcome::Dropped);
        }
        rx.pending = n;
        Direct::Bounced
    }

    /// Returns the last `count` chains taken to the ring, for the next frame.
    fn put_back(&self, rx: &mut RxQueue, count: usize) {
        for _ in 0..count {
            rx.queue.go_to_previous_position();
        }
    }

    /// Writes `bytes` at `offset` into the byte stream the segments make up.
    fn write_at(&self, segments: &[(GuestAddress, usize)], offset: usize, bytes: &[u8]) -> bool {
        let mut skip = offset;
        let mut rest = bytes;
        for &(addr, dlen) in segments {
            if rest.is_empty() {
                break;
            }
            if skip >= dlen {
                skip -= dlen;
                continue;
            }
            let n = (dlen - skip).min(rest.len());
            let Some(at) = addr.checked_add(skip as u64) else {
                return false;
            };
            if self.mem.write_slice(&rest[..n], at).is_err() {
                return false;
            }
            rest = &rest[n..];
            skip = 0;
        }
        rest.is_empty()
    }

    /// The driver posted RX buffers: a frame held back, or the tap, can move again. (In
    /// ioeventfd mode the I/O thread also lands here for the pair's readiness descriptor, so
    /// a hand-off is served here too.)
    fn rx_buffers_posted(&self, pair: &Pair) -> usize {
        self.take_handoff(pair);
        {
            let mut guard = pair.rx.lock().unwrap();
            let Some(rx) = guard.as_mut() else { return 0 };
            if rx.broken {
                return 0;
            }
            if !pair.tap_watched.load(Ordering::SeqCst) {
                let posted = rx
                    .queue
                    .avail_idx(&self.mem, Ordering::Acquire)
                    .is_ok_and(|idx| idx.0 != rx.queue.next_avail());
                if !posted {
                    return 0;
                }
            }
            let _ = rx.queue.disable_notification(&self.mem);
        }
        self.watch_tap(pair, true);
        self.rx_run(pair)
    }

    /// Sends what a vCPU handed over (`TxMode::Inline`); returns the frames sent.
    fn take_handoff(&self, pair: &Pair) -> usize {
        let _ = pair.handoff.read();
        if pair.tx_handed_off.swap(false, Ordering::AcqRel) {
            self.tx_run(pair, TxMode::Drain)
        } else {
            0
        }
    }

    fn since_rx(&self, pair: &Pair) -> Duration {
        let now = self.clock.elapsed().as_nanos() as u64;
        Duration::from_nanos(now.saturating_sub(pair.last_rx_ns.load(Ordering::Relaxed)))
    }

    /// Right after frames went to the guest, watches the TX ring for `reply_poll` with the
    /// guest's kick suppressed: a reply posted meanwhile goes out from here, without the
    /// ~25 µs exit its kick would cost. When none comes, the pair stops doing this until a
    /// transmit again follows a receive closely.
    /// Whether this (I/O) thread runs on the CPU the last TX kick came from: spinning there
    /// would keep the vCPU, and so the reply, from running (measured: every wait fruitless).
    fn on_the_vcpus_cpu(&self, pair: &Pair) -> bool {
        // SAFETY: sched_getcpu has no arguments and no side effects.
        let cpu = unsafe { libc::sched_getcpu() };
        cpu >= 0 && cpu == pair.kick_cpu.load(Ordering::Relaxed)
    }

    /// Kicks must already be suppressed (`suppress_tx_kicks`); they are back on at return.
    fn wait_for_reply(&self, pair: &Pair) {
        let start = Instant::now();
        let mut sent = 0;
        while start.elapsed() < self.reply_poll {
            if self.tx_available(pair) {
                break;
            }
            std::hint::spin_loop();
        }
        // Sends what came (if anything) with kicks back on.
        sent += self.tx_hand_back(pair);
        pair.replies_follow.store(sent > 0, Ordering::Relaxed);
        if sent > 0 {
            add(&self.stats.polled_frames, sent as u64);
        }
    }

    /// Ends a reply wait: turns TX kicks back on at the driver's *current* index and sends
    /// only what it published before that, returning the ring to the vCPU's kick. A plain
    /// drain (kicks on at the device's index, re-check, repeat) would never end against a
    /// guest that streams as fast as this thread sends: after one ARP reply, a whole
    /// guest-to-host flood ran through the I/O thread (4.9k pps against ~60k). Whatever the
    /// driver publishes after the re-check sees the threshold and kicks; what it published
    /// before is sent here, so nothing waits for a kick that will not come.
    fn tx_hand_back(&self, pair: &Pair) -> usize {
        let index = pair.tx_index;
        let mut guard = pair.tx.lock().unwrap();
        let Some(tx) = guard.as_mut().filter(|tx| !tx.broken) else {
            return 0;
        };
        let result = (|| -> Result<usize, &'static str> {
            let mut end = tx
                .queue
                .avail_idx(&self.mem, Ordering::Acquire)
                .map_err(|_| "available ring unreadable")?
                .0;
            loop {
                if avail_out_of_range(&self.mem, &tx.queue) {
                    return Err("available index out of range");
                }
                if tx.queue.event_idx_enabled() {
                    let at = GuestAddress(tx.queue.used_ring())
                        .checked_add(4 + 8 * u64::from(tx.queue.size()))
                        .ok_or("used ring not writable")?;
                    self.mem
                        .write_obj(end.to_le(), at)
                        .map_err(|_| "used ring not writable")?;
                } else {
                    // Kicks on for every publish from here (used.flags = 0).
                    tx.queue
                        .enable_notification(&self.mem)
                        .map_err(|_| "used ring not writable")?;
                }
                // The driver publishes, then reads the threshold; this thread writes the
                // threshold, then reads the index: one of the two sees the other.
                std::sync::atomic::fence(Ordering::SeqCst);
                let now = tx
                    .queue
                    .avail_idx(&self.mem, Ordering::Acquire)
                    .map_err(|_| "available ring unreadable")?
                    .0;
                if now == end {
                    break;
                }
                end = now;
            }
            let mut used = 0;
            while tx.queue.next_avail() != end {
                let Some(chain) = tx.queue.pop_descriptor_chain(&self.mem) else {
                    return Err("available index out of range");
                };
                let head = chain.head_index();
                self.send_frame(pair.fd, &mut tx.iovecs, chain, index);
                tx.queue
                    .add_used(&self.mem, head, 0)
                    .map_err(|_| "descriptor head out of range")?;
                used += 1;
            }
            Ok(used)
        })();
        match result {
            Ok(used) => {
                if used > 0 {
                    self.signal(index, &mut tx.queue);
                }
                used
            }
            Err(reason) => {
                tx.broken = true;
                self.fatal(index, reason);
                0
            }
        }
    }

    /// Points the driver's kick threshold behind what it already made available (EVENT_IDX)
    /// or sets NO_NOTIFY, so its next transmits do not kick. False if the queue is unusable.
    fn suppress_tx_kicks(&self, pair: &Pair) -> bool {
        let mut guard = pair.tx.lock().unwrap();
        let Some(tx) = guard.as_mut().filter(|tx| !tx.broken) else {
            return false;
        };
        if !tx.queue.event_idx_enabled() {
            return tx.queue.disable_notification(&self.mem).is_ok();
        }
        let avail_event =
            GuestAddress(tx.queue.used_ring()).checked_add(4 + 8 * u64::from(tx.queue.size()));
        let behind = tx.queue.next_avail().wrapping_sub(1);
        avail_event.is_some_and(|at| self.mem.write_obj(behind.to_le(), at).is_ok())
    }

    fn tx_available(&self, pair: &Pair) -> bool {
        let guard = pair.tx.lock().unwrap();
        guard.as_ref().is_some_and(|tx| {
            tx.queue
                .avail_idx(&self.mem, Ordering::Acquire)
                .is_ok_and(|idx| idx.0 != tx.queue.next_avail())
        })
    }

    /// One look at the whole pair for the polling I/O thread; TX notifications stay off.
    fn poll_pair(&self, pair: &Pair) -> bool {
        let found = self.rx_buffers_posted(pair) + self.tx_run(pair, TxMode::Quiet);
        if found > 0 {
            add(&self.stats.polled_frames, found as u64);
        }
        found > 0
    }

    // ---- control queue ----

    fn ctrl_run(&self) {
        let Some(index) = self.ctrl_index else { return };
        let mut guard = self.ctrl.lock().unwrap();
        let Some(queue) = guard.as_mut() else { return };
        let mut used = 0;
        while let Some(chain) = queue.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            let mut command = Vec::new();
            let mut ack = None;
            for desc in chain {
                let dlen = desc.len() as usize;
                if desc.is_write_only() {
                    ack = Some(desc.addr());
                    break;
                }
                if command.len() + dlen > 4096 {
                    break;
                }
                let at = command.len();
                command.resize(at + dlen, 0);
                if self
                    .mem
                    .read_slice(&mut command[at..], desc.addr())
                    .is_err()
                {
                    command.truncate(at);
                    break;
                }
            }
            let status = self.ctrl_command(&command);
            let mut written = 0;
            if let Some(ack) = ack {
                if self.mem.write_obj(status, ack).is_ok() {
                    written = 1;
                }
            }
            if queue.add_used(&self.mem, head, written).is_err() {
                self.fatal(index, "descriptor head out of range");
                return;
            }
            used += 1;
        }
        if used > 0 {
            self.signal(index, queue);
        }
    }

    fn ctrl_command(&self, command: &[u8]) -> u8 {
        let (ok, err) = (VIRTIO_NET_OK as u8, VIRTIO_NET_ERR as u8);
        let [class, cmd, data @ ..] = command else {
            return err;
        };
        match (u32::from(*class), u32::from(*cmd)) {
            // Filtering is the host bridge's business; accepting keeps Linux happy.
            (VIRTIO_NET_CTRL_RX, _) | (VIRTIO_NET_CTRL_MAC, _) | (VIRTIO_NET_CTRL_VLAN, _) => ok,
            (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) => {
                let Some(&[lo, hi]) = data.get(..2).map(|d| <&[u8; 2]>::try_from(d).unwrap())
                else {
                    return err;
                };
                let pairs = usize::from(u16::from_le_bytes([lo, hi]));
                if pairs == 0 || pairs > self.pairs.len() {
                    return err;
                }
                log::debug!("virtio-net: {pairs} queue pair(s) in use");
                self.set_active_pairs(pairs);
                ok
            }
            _ => err,
        }
    }
}

impl QueueHandler for NetHandler {
    fn process_queue(&self, queue: usize) {
        if self.paused.load(Ordering::SeqCst) {
            return;
        }
        if Some(queue) == self.ctrl_index {
            self.ctrl_run();
            return;
        }
        let Some(pair) = self.pair_of(queue) else {
            log::debug!("virtio-net: kick for unused queue {queue} ignored");
            return;
        };
        if queue == pair.tx_index {
            if !self.reply_poll.is_zero() {
                // SAFETY: sched_getcpu has no arguments and no side effects.
                let cpu = unsafe { libc::sched_getcpu() };
                pair.kick_cpu.store(cpu, Ordering::Relaxed);
                if self.since_rx(pair) < self.reply_poll {
                    // A transmit soon enough after a receive that the I/O thread's wait
                    // would have caught it: request/response traffic, worth waiting for
                    // the next reply. Slower answers (a guest that takes an interrupt
                    // first: ~40 us under PVM) would only make every wait fruitless.
                    pair.replies_follow.store(true, Ordering::Relaxed);
                }
            }
            let mode = match self.tx_inline {
                Some(n) => TxMode::Inline(n),
                None => TxMode::Drain,
            };
            self.tx_run(pair, mode);
        } else {
            self.rx_buffers_posted(pair);
        }
    }

    fn completion_fd(&self, queue: usize) -> Option<RawFd> {
        let pair = self.pair_of(queue)?;
        (queue == pair.rx_index).then(|| pair.readiness.as_raw_fd())
    }

    /// The tap is readable, or a vCPU handed TX work over. Only the I/O thread calls this,
    /// so the wait for a reply never keeps a vCPU from its guest.
    fn process_completions(&self, queue: usize) {
        if let Some(pair) = self.pair_of(queue).filter(|p| queue == p.rx_index) {
            if self.paused.load(Ordering::SeqCst) {
                // Quiet the readiness descriptor so the I/O thread sleeps; a handed-off TX
                // burst stays flagged and goes out when resume looks at the queues.
                let _ = pair.handoff.read();
                return;
            }
            self.take_handoff(pair);
            // Kicks go quiet before the frames reach the guest: a polling guest can answer
            // within a microsecond or two, before a later suppression would land.
            let wait = !self.reply_poll.is_zero()
                && pair.replies_follow.load(Ordering::Relaxed)
                && !self.on_the_vcpus_cpu(pair)
                && self.suppress_tx_kicks(pair);
            if self.rx_run(pair) > 0 && wait {
                self.wait_for_reply(pair);
            } else if wait {
                self.tx_hand_back(pair);
            }
        }
    }

    fn poll_queue(&self, queue: usize) -> bool {
        if self.paused.load(Ordering::SeqCst) {
            return false;
        }
        if Some(queue) == self.ctrl_index {
            self.ctrl_run();
            return false;
        }
        match self.pair_of(queue) {
            Some(pair) => self.poll_pair(pair),
            None => false,
        }
    }

    fn rearm(&self, queue: usize) {
        if self.paused.load(Ordering::SeqCst) {
            return;
        }
        if let Some(pair) = self.pair_of(queue) {
            self.tx_run(pair, TxMode::Drain);
        }
    }

    /// Pause stops the tap feeding the guest as well as the rings feeding the tap: the tap
    /// leaves the I/O thread's watch (frames wait in it, bounded, as when the guest has no
    /// buffers), and taking each queue's lock waits out a pass already under way. Resume looks
    /// at every queue, which watches the tap again where buffers are posted.
    fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        if paused {
            for pair in &self.pairs {
                drop(pair.rx.lock().unwrap());
                drop(pair.tx.lock().unwrap());
                self.watch_tap(pair, false);
            }
            drop(self.ctrl.lock().unwrap());
        }
    }

    /// Nothing is ever in flight: a frame is written or read whole within one call.
    fn busy(&self, _queue: usize) -> bool {
        false
    }

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    /// A frame read from the tap that waits in an RX queue's bounce buffer for guest buffers
    /// is not saved: to the guest it is a frame the wire lost.
    fn queue_position(&self, queue: usize) -> Option<QueuePosition> {
        let at = |q: &Queue| QueuePosition {
            next_avail: q.next_avail(),
            next_used: q.next_used(),
            event_idx: q.event_idx_enabled(),
        };
        if Some(queue) == self.ctrl_index {
            return self.ctrl.lock().unwrap().as_ref().map(at);
        }
        let pair = self.pair_of(queue)?;
        if queue == pair.rx_index {
            pair.rx.lock().unwrap().as_ref().map(|rx| at(&rx.queue))
        } else {
            pair.tx.lock().unwrap().as_ref().map(|tx| at(&tx.queue))
        }
    }
}
