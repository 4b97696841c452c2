//! virtio-net driver: both transports, one RX/TX queue pair per CPU (multiqueue through the
//! control queue when the device offers it), RX completion by polling or by MSI-X.
//!
//! No offloads are negotiated: frames are whole and checksummed both ways, and every RX
//! buffer holds a full 1514-byte frame, so neither MRG_RXBUF nor GSO is needed.

pub mod stack;

use crate::boot::INTERRUPT_COUNTS;
use crate::pci::{self, Function, Msix};
use crate::sync::SpinLock;
use crate::virtio::queue::{Desc, Layout, Queue, DESC_F_NEXT, DESC_F_WRITE};
use crate::virtio::{self, Error, Kind, Transport};
use crate::{dma, smp, tsc, x86};
use core::sync::atomic::{AtomicU8, Ordering};

pub const DEVICE_ID_TRANSITIONAL: u16 = 0x1000;
pub const DEVICE_ID_MODERN: u16 = 0x1041;

pub const F_MAC: u64 = 1 << 5;
pub const F_STATUS: u64 = 1 << 16;
pub const F_CTRL_VQ: u64 = 1 << 17;
pub const F_MQ: u64 = 1 << 22;

const CFG_MAC: u16 = 0;
const CFG_MAX_PAIRS: u16 = 8;
const CTRL_MQ: u8 = 4;
const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;

pub const MAX_PAIRS: usize = 8;
const WANTED_QUEUE_SIZE: u16 = 256;
/// One RX buffer: header and a full Ethernet frame.
pub const BUF_SIZE: usize = 2048;
pub const MAX_FRAME: usize = 1514;
/// Vectors for RX queues; blk hands out 0x40 upward.
const FIRST_VECTOR: u8 = 0xE0;
const LAST_VECTOR: u8 = 0xEF;
static NEXT_VECTOR: AtomicU8 = AtomicU8::new(FIRST_VECTOR);

pub use crate::virtio::Completion;

#[derive(Clone, Copy)]
pub struct Options {
    pub kind: Kind,
    pub completion: Completion,
    pub event_idx: bool,
    /// Queue pairs wanted (one per CPU); fewer if the device has fewer.
    pub pairs: usize,
}

#[repr(C, align(64))]
pub struct Buf(pub [u8; BUF_SIZE]);

struct Rx {
    queue: Queue,
    bufs: &'static mut [Buf],
}

struct Tx {
    queue: Queue,
    bufs: &'static mut [Buf],
    /// Slots (two descriptors each: header, frame) not in flight.
    free: &'static mut [u16],
    free_count: usize,
}

pub struct Pair {
    rx: SpinLock<Rx>,
    tx: SpinLock<Tx>,
    hdr_len: usize,
    pub vector: Option<u8>,
    completion: Completion,
}

impl Pair {
    fn new(
        t: &Transport,
        index: u16,
        opts: &Options,
        hdr_len: usize,
        vector: Option<u8>,
    ) -> Result<Pair, Error> {
        let rx_index = 2 * index;
        let tx_index = 2 * index + 1;
        let make = |q: u16, msix_entry: u16| -> Result<Queue, Error> {
            let max = t.queue_max_size(q);
            if max == 0 {
                return Err(Error::QueueMissing);
            }
            let size = match t.kind {
                Kind::Legacy => max,
                Kind::Modern => {
                    let wanted = max.min(WANTED_QUEUE_SIZE);
                    1 << (15 - wanted.leading_zeros())
                }
            };
            if !(4..=1024).contains(&size) {
                return Err(Error::QueueTooSmall);
            }
            let layout = Layout::alloc(size).ok_or(Error::OutOfMemory)?;
            let doorbell = t.activate_queue(q, &layout, msix_entry)?;
            Ok(Queue::new(q, &layout, doorbell, opts.event_idx))
        };
        let rx_entry = if vector.is_some() {
            index
        } else {
            virtio::NO_VECTOR
        };
        let mut rxq = make(rx_index, rx_entry)?;
        let mut txq = make(tx_index, virtio::NO_VECTOR)?;
        // SAFETY: all-zero bytes are a valid Buf and u16.
        let rx_bufs =
            unsafe { dma::alloc_array::<Buf>(rxq.size as usize) }.ok_or(Error::OutOfMemory)?;
        let slots = (txq.size / 2) as usize;
        // SAFETY: as above.
        let tx_bufs = unsafe { dma::alloc_array::<Buf>(slots) }.ok_or(Error::OutOfMemory)?;
        // SAFETY: as above.
        let free = unsafe { dma::alloc_array::<u16>(slots) }.ok_or(Error::OutOfMemory)?;
        for (i, f) in free.iter_mut().enumerate() {
            *f = (slots - 1 - i) as u16;
        }
        for (i, buf) in rx_bufs.iter().enumerate() {
            rxq.set_desc(
                i as u16,
                Desc {
                    addr: dma::phys(buf),
                    len: BUF_SIZE as u32,
                    flags: DESC_F_WRITE,
                    next: 0,
                },
            );
            rxq.push_avail(i as u16);
        }
        if opts.completion == Completion::Poll {
            rxq.disable_interrupts();
        }
        txq.disable_interrupts();
        Ok(Pair {
            rx: SpinLock::new(Rx {
                queue: rxq,
                bufs: rx_bufs,
            }),
            tx: SpinLock::new(Tx {
                queue: txq,
                bufs: tx_bufs,
                free,
                free_count: slots,
            }),
            hdr_len,
            vector,
            completion: opts.completion,
        })
    }

    /// Hands the posted RX buffers to the device (after DRIVER_OK).
    fn start(&self) {
        self.rx.lock().queue.publish();
    }

    /// Calls `f(frame)` for each received frame (at most `budget`), reposting the buffers;
    /// returns how many.
    pub fn receive(&self, budget: usize, mut f: impl FnMut(&[u8])) -> usize {
        let mut rx = self.rx.lock();
        let mut n = 0;
        while n < budget {
            let Some((id, len)) = rx.queue.pop_used() else {
                break;
            };
            let id = id as u16;
            if (id as usize) < rx.bufs.len() {
                let len = (len as usize).min(BUF_SIZE);
                if len > self.hdr_len {
                    f(&rx.bufs[id as usize].0[self.hdr_len..len]);
                }
                rx.queue.push_avail(id);
            }
            n += 1;
        }
        if n > 0 {
            rx.queue.publish();
        }
        if self.completion == Completion::Poll {
            rx.queue.disable_interrupts();
        }
        n
    }

    pub fn rx_ready(&self) -> bool {
        self.rx.lock().queue.has_used()
    }

    /// Waits until a frame arrives or `deadline` (TSC) passes: spinning when polling; for
    /// the RX interrupt otherwise.
    pub fn wait_rx(&self, deadline: u64) {
        match (self.completion, self.vector) {
            (Completion::Irq, Some(vector)) => {
                let counter = &INTERRUPT_COUNTS[vector as usize];
                let seen = counter.load(Ordering::Acquire);
                {
                    let mut rx = self.rx.lock();
                    rx.queue.enable_interrupts();
                    if rx.queue.has_used() {
                        return;
                    }
                }
                while counter.load(Ordering::Acquire) == seen && x86::rdtsc() < deadline {
                    x86::pause();
                }
            }
            _ => {
                while !self.rx_ready() && x86::rdtsc() < deadline {
                    x86::pause();
                }
            }
        }
    }

    fn reclaim(tx: &mut Tx) {
        while let Some((id, _)) = tx.queue.pop_used() {
            let slot = (id / 2) as usize;
            if slot < tx.bufs.len() {
                let free = tx.free_count;
                tx.free[free] = slot as u16;
                tx.free_count = free + 1;
            }
        }
        tx.queue.disable_interrupts();
    }

    /// Queues one frame built by `build` into a buffer of MAX_FRAME bytes (it returns the
    /// length); `publish` makes it visible (and kicks if the device asks). False if the ring
    /// is full.
    pub fn send(&self, build: impl FnOnce(&mut [u8]) -> usize, publish: bool) -> bool {
        let mut tx = self.tx.lock();
        if tx.free_count == 0 {
            Self::reclaim(&mut tx);
            if tx.free_count == 0 {
                if publish {
                    tx.queue.publish();
                }
                return false;
            }
        }
        tx.free_count -= 1;
        let slot = tx.free[tx.free_count];
        let hdr_len = self.hdr_len;
        let buf = &mut tx.bufs[slot as usize].0;
        buf[..hdr_len].fill(0);
        let len = build(&mut buf[64..64 + MAX_FRAME]).min(MAX_FRAME);
        let hdr_addr = dma::phys(&buf[0]);
        let frame_addr = dma::phys(&buf[64]);
        let first = slot * 2;
        tx.queue.set_desc(
            first,
            Desc {
                addr: hdr_addr,
                len: hdr_len as u32,
                flags: DESC_F_NEXT,
                next: first + 1,
            },
        );
        tx.queue.set_desc(
            first + 1,
            Desc {
                addr: frame_addr,
                len: len as u32,
                flags: 0,
                next: 0,
            },
        );
        tx.queue.push_avail(first);
        if publish {
            tx.queue.publish();
        }
        true
    }

    /// Whether every queued frame came back from the device.
    pub fn tx_idle(&self) -> bool {
        let mut tx = self.tx.lock();
        Self::reclaim(&mut tx);
        tx.free_count == tx.bufs.len()
    }

    pub fn flush(&self) {
        let mut tx = self.tx.lock();
        tx.queue.publish();
        Self::reclaim(&mut tx);
    }

    pub fn kicks(&self) -> u64 {
        self.rx.lock().queue.kicks + self.tx.lock().queue.kicks
    }
}

pub struct NetDevice {
    pub transport: Transport,
    pub features: u64,
    pub mac: [u8; 6],
    pub pairs: [Option<Pair>; MAX_PAIRS],
    pub pair_count: usize,
}

impl NetDevice {
    pub fn pair(&self, i: usize) -> &Pair {
        self.pairs[i % self.pair_count]
            .as_ref()
            .expect("pair_count pairs exist")
    }

    pub fn kicks(&self) -> u64 {
        self.pairs.iter().flatten().map(|p| p.kicks()).sum()
    }
}

pub fn is_net(f: &Function) -> bool {
    f.vendor == virtio::VENDOR_ID
        && (f.device == DEVICE_ID_TRANSITIONAL || f.device == DEVICE_ID_MODERN)
}

/// The control queue: set up with the others, used after DRIVER_OK, polled.
struct Control {
    queue: Queue,
    buf: &'static mut [u8],
}

impl Control {
    fn new(t: &Transport, index: u16, event_idx: bool) -> Result<Control, Error> {
        let max = t.queue_max_size(index);
        if max == 0 {
            return Err(Error::QueueMissing);
        }
        let size = match t.kind {
            Kind::Legacy => max,
            Kind::Modern => 1 << (15 - max.min(16).leading_zeros()),
        };
        let layout = Layout::alloc(size).ok_or(Error::OutOfMemory)?;
        let doorbell = t.activate_queue(index, &layout, virtio::NO_VECTOR)?;
        let mut queue = Queue::new(index, &layout, doorbell, event_idx);
        queue.disable_interrupts();
        let buf = dma::alloc(64, 64).ok_or(Error::OutOfMemory)?;
        Ok(Control { queue, buf })
    }

    /// Sends one command and waits (up to a second) for the device's ack.
    fn command(&mut self, class: u8, cmd: u8, data: &[u8]) -> bool {
        self.buf[0] = class;
        self.buf[1] = cmd;
        self.buf[2..2 + data.len()].copy_from_slice(data);
        self.buf[32] = 0xFF;
        let (cmd_addr, ack_addr) = (dma::phys(&self.buf[0]), dma::phys(&self.buf[32]));
        self.queue.set_desc(
            0,
            Desc {
                addr: cmd_addr,
                len: 2 + data.len() as u32,
                flags: DESC_F_NEXT,
                next: 1,
            },
        );
        self.queue.set_desc(
            1,
            Desc {
                addr: ack_addr,
                len: 1,
                flags: DESC_F_WRITE,
                next: 0,
            },
        );
        self.queue.push_avail(0);
        self.queue.publish();
        let deadline = x86::rdtsc() + tsc::ns_to_ticks(1_000_000_000);
        while self.queue.pop_used().is_none() {
            if x86::rdtsc() > deadline {
                return false;
            }
            x86::pause();
        }
        // SAFETY: the device wrote the ack byte; read it fresh.
        unsafe { core::ptr::read_volatile(&self.buf[32]) == 0 }
    }
}

/// Initialises the device at `f` in the spec's order: reset, ACKNOWLEDGE, DRIVER, features
/// (FEATURES_OK), queues, DRIVER_OK; then asks for one queue pair per CPU.
pub fn open(f: Function, opts: &Options) -> Result<NetDevice, Error> {
    let mut bits = pci::COMMAND_MEMORY | pci::COMMAND_IO | pci::COMMAND_BUS_MASTER;
    let mut clear = 0;
    if opts.completion == Completion::Poll {
        bits |= pci::COMMAND_INTX_DISABLE;
    } else {
        clear |= pci::COMMAND_INTX_DISABLE;
    }
    f.set_command_bits(bits, clear);
    let mut transport = Transport::new(f, opts.kind)?;
    transport.reset();
    transport.add_status(virtio::STATUS_ACKNOWLEDGE);
    transport.add_status(virtio::STATUS_DRIVER);
    let offered = transport.device_features();
    let mut wanted = F_MAC | F_STATUS;
    if opts.event_idx {
        wanted |= virtio::F_EVENT_IDX;
    }
    if opts.pairs > 1 {
        wanted |= F_CTRL_VQ | F_MQ;
    }
    let required = transport.required_features();
    if offered & required != required {
        transport.add_status(virtio::STATUS_FAILED);
        return Err(Error::FeaturesRejected);
    }
    let features = offered & (wanted | required);
    if let Err(e) = transport.negotiate(features) {
        transport.add_status(virtio::STATUS_FAILED);
        return Err(e);
    }
    let event_idx = features & virtio::F_EVENT_IDX != 0;
    let queue_opts = Options { event_idx, ..*opts };
    let mq = features & (F_MQ | F_CTRL_VQ) == F_MQ | F_CTRL_VQ;
    let device_pairs = if mq {
        transport.read_config(CFG_MAX_PAIRS, 2).max(1) as usize
    } else {
        1
    };
    let pair_count = device_pairs.min(opts.pairs.max(1)).min(MAX_PAIRS);
    // Virtio 1.x header: 12 bytes (num_buffers); legacy without MRG_RXBUF: 10.
    let hdr_len = if features & virtio::F_VERSION_1 != 0 {
        12
    } else {
        10
    };

    let msix = if opts.completion == Completion::Irq {
        let m = Msix::find(&transport.function).ok_or(Error::MsixMissing)?;
        if (m.size as usize) < pair_count {
            return Err(Error::MsixMissing);
        }
        transport.enable_msix(&m);
        Some(m)
    } else {
        None
    };
    let mut pairs: [Option<Pair>; MAX_PAIRS] = [const { None }; MAX_PAIRS];
    for (i, p) in pairs.iter_mut().enumerate().take(pair_count) {
        let vector = match &msix {
            Some(m) => {
                let vector = NEXT_VECTOR.fetch_add(1, Ordering::Relaxed);
                if vector > LAST_VECTOR {
                    return Err(Error::MsixVectorRejected);
                }
                // The pair's RX interrupt goes to the CPU that serves it; table entry i.
                m.route(i as u16, smp::apic_id(i % smp::online()), vector);
                Some(vector)
            }
            None => None,
        };
        match Pair::new(&transport, i as u16, &queue_opts, hdr_len, vector) {
            Ok(pair) => *p = Some(pair),
            Err(e) => {
                transport.add_status(virtio::STATUS_FAILED);
                return Err(e);
            }
        }
    }
    let mut control = if mq {
        Some(Control::new(
            &transport,
            2 * device_pairs as u16,
            event_idx,
        )?)
    } else {
        None
    };
    let mut mac = [0u8; 6];
    if features & F_MAC != 0 {
        for (i, b) in mac.iter_mut().enumerate() {
            *b = transport.read_config(CFG_MAC + i as u16, 1) as u8;
        }
    } else {
        mac = [0x02, 0, 0, 0, 0, 0x01];
    }
    transport.add_status(virtio::STATUS_DRIVER_OK);
    if transport.status() & (virtio::STATUS_NEEDS_RESET | virtio::STATUS_FAILED) != 0 {
        return Err(Error::DeviceFailed);
    }
    for p in pairs.iter().flatten() {
        p.start();
    }
    if let Some(c) = control.as_mut() {
        if pair_count > 1
            && !c.command(
                CTRL_MQ,
                CTRL_MQ_VQ_PAIRS_SET,
                &(pair_count as u16).to_le_bytes(),
            )
        {
            return Err(Error::DeviceFailed);
        }
    }
    Ok(NetDevice {
        transport,
        features,
        mac,
        pairs,
        pair_count,
    })
}
