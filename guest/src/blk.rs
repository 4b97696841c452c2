//! virtio-blk driver: feature negotiation, one split queue per worker
//! thread (multiqueue when offered), requests through indirect descriptor
//! tables when offered, completion by polling or by interrupt (MSI-X, or INTx
//! through the IOAPIC).

use crate::boot::{self, INTERRUPT_COUNTS};
use crate::pci::{self, Function, Msix};

use crate::sync::SpinLock;
use crate::virtio::queue::{Desc, Layout, Queue, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use crate::virtio::{self, Error, Kind, Transport};
use crate::{dma, ioapic, lapic, smp, tsc, x86};
use core::sync::atomic::{AtomicU32, AtomicU8, Ordering};

pub const DEVICE_ID_TRANSITIONAL: u16 = 0x1001;
pub const DEVICE_ID_MODERN: u16 = 0x1042;

pub const F_SIZE_MAX: u64 = 1 << 1;
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_MQ: u64 = 1 << 12;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// Status byte value before the device writes one.
const S_PENDING: u8 = 0xFF;

pub const SECTOR: u64 = 512;
pub const GET_ID_BYTES: u32 = 20;
const MAX_QUEUES: usize = 16;
/// Data segments one request may have (when SIZE_MAX forces splitting).
const MAX_SEGMENTS: usize = 16;
const WANTED_QUEUE_SIZE: u16 = 256;
/// First MSI-X vector handed out; each queue gets its own.
const FIRST_VECTOR: u8 = 0x40;
/// 0xE0..0xEF belong to the virtio-net driver.
const LAST_VECTOR: u8 = 0xDF;
static NEXT_VECTOR: AtomicU8 = AtomicU8::new(FIRST_VECTOR);
/// A completion (or its interrupt) that does not come within this long is
/// reported as a timeout rather than hanging the run.
const COMPLETION_TIMEOUT_NS: u64 = 10_000_000_000;

pub use crate::virtio::{Completion, IrqSource};

/// When a queue completed by interrupt asks for one (`irq_arm=`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum IrqArm {
    /// After every harvest, so every completion is signalled (what Linux does).
    Always,
    /// Only when a thread runs out of work and waits: a completion that is ready by then
    /// (a device that finished inside the kick's exit) is taken with no interrupt.
    OnWait,
}

/// How a thread waits for its queue's interrupt (`irq_wait=`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum IrqWait {
    /// Spinning at CPL3: the vCPU keeps its host CPU.
    Spin,
    /// Halting, as an idle OS does: the vCPU's host thread sleeps until the interrupt.
    Halt,
}

/// Driver options from the command line.
#[derive(Clone, Copy)]
pub struct Options {
    pub kind: Kind,
    /// Fall back to the other transport when the device lacks `kind`.
    pub either_transport: bool,
    pub completion: Completion,
    pub irq_source: IrqSource,
    pub irq_arm: IrqArm,
    pub irq_wait: IrqWait,
    /// `bars=move`: each disk's BARs get new addresses once it is running.
    pub move_bars: bool,
    pub event_idx: bool,
    pub indirect: bool,
    /// Queues wanted (one per worker thread); fewer if the device has fewer.
    pub queues: usize,
    /// Largest data length of one request, to size descriptor chains.
    pub max_request_bytes: u32,
}

impl Options {
    /// The `irq=` a RESULT line reports: the interrupt used, `none` when polling.
    pub fn irq_name(&self) -> &'static str {
        match self.completion {
            Completion::Poll => "none",
            Completion::Irq => self.irq_source.name(),
        }
    }
}

/// Per-request memory the device reads and writes: the header, the
/// discard/write-zeroes range, the status byte and the indirect table.
#[repr(C, align(64))]
struct SlotMem {
    header_type: u32,
    header_reserved: u32,
    header_sector: u64,
    range_sector: u64,
    range_sectors: u32,
    range_flags: u32,
    status: u8,
    _pad: [u8; 15],
    table: [Desc; 2 + MAX_SEGMENTS],
}

const SLOT_FREE: u8 = 0;
const SLOT_IN_FLIGHT: u8 = 1;
const SLOT_DONE: u8 = 2;

struct SlotState {
    state: AtomicU8,
    status: AtomicU8,
}

struct Ring {
    queue: Queue,
    free: &'static mut [u16],
    free_count: usize,
}

pub struct BlkQueue {
    ring: SpinLock<Ring>,
    mem: &'static mut [SlotMem],
    slots: &'static [SlotState],
    slot_count: u16,
    /// Ring descriptors per request without indirect tables (0 = indirect).
    descs_per_slot: u16,
    size_max: u32,
    pub vector: Option<u8>,
    pub interrupts_waited: AtomicU32,
    completion: Completion,
    irq_arm: IrqArm,
    irq_wait: IrqWait,
}

// SAFETY: `mem` entries are written only by the holder of the slot, which
// `ring`'s free list hands out once.
unsafe impl Sync for BlkQueue {}

/// A request for `submit`.
#[derive(Clone, Copy)]
pub struct Request {
    pub kind: u32,
    pub sector: u64,
    /// Data buffer (guest-physical) and length; for DISCARD/WRITE_ZEROES the
    /// length in bytes of the range at `sector`.
    pub buf: u64,
    pub len: u32,
}

pub enum SubmitError {
    Full,
    TooLarge,
}

impl BlkQueue {
    /// `vector`: the MSI-X vector already routed to table entry `index`.
    fn new(
        transport: &Transport,
        index: u16,
        opts: &Options,
        size_max: u32,
        seg_max: u32,
        vector: Option<u8>,
    ) -> Result<BlkQueue, Error> {
        let max = transport.queue_max_size(index);
        if max == 0 {
            return Err(Error::QueueMissing);
        }
        let size = match transport.kind {
            // Legacy queues have the size the device chose.
            Kind::Legacy => max,
            Kind::Modern => {
                let wanted = max.min(WANTED_QUEUE_SIZE);
                1 << (15 - wanted.leading_zeros())
            }
        };
        let segments = segments_needed(opts.max_request_bytes, size_max).max(1) as u16;
        if segments as usize > MAX_SEGMENTS || (seg_max != 0 && segments as u32 > seg_max) {
            return Err(Error::QueueTooSmall);
        }
        let descs_per_slot = if opts.indirect { 0 } else { 2 + segments };
        let slot_count = if opts.indirect {
            size
        } else {
            size / descs_per_slot
        };
        let slot_count = slot_count.min(WANTED_QUEUE_SIZE);
        if slot_count == 0 {
            return Err(Error::QueueTooSmall);
        }
        let layout = Layout::alloc(size).ok_or(Error::OutOfMemory)?;
        let msix_entry = if vector.is_some() {
            index
        } else {
            virtio::NO_VECTOR
        };
        let doorbell = transport.activate_queue(index, &layout, msix_entry)?;
        let mut queue = Queue::new(index, &layout, doorbell, opts.event_idx);
        if opts.completion == Completion::Poll {
            queue.disable_interrupts();
        }
        // SAFETY: all-zero bytes are valid for both types.
        let mem = unsafe { dma::alloc_array::<SlotMem>(slot_count as usize) }
            .ok_or(Error::OutOfMemory)?;
        // SAFETY: as above.
        let slots = unsafe { dma::alloc_array::<SlotState>(slot_count as usize) }
            .ok_or(Error::OutOfMemory)?;
        // SAFETY: zero is a valid u16.
        let free =
            unsafe { dma::alloc_array::<u16>(slot_count as usize) }.ok_or(Error::OutOfMemory)?;
        let ring = Ring {
            queue,
            free,
            free_count: slot_count as usize,
        };
        for (i, f) in ring.free[..slot_count as usize].iter_mut().enumerate() {
            *f = (slot_count as usize - 1 - i) as u16;
        }
        Ok(BlkQueue {
            ring: SpinLock::new(ring),
            mem,
            slots,
            slot_count,
            descs_per_slot,
            size_max,
            vector,
            interrupts_waited: AtomicU32::new(0),
            completion: opts.completion,
            irq_arm: opts.irq_arm,
            irq_wait: opts.irq_wait,
        })
    }

    pub fn capacity(&self) -> u16 {
        self.slot_count
    }

    /// Builds and offers one request; visible to the device after `publish`.
    pub fn submit(&self, req: &Request) -> Result<u16, SubmitError> {
        let segments = if matches!(req.kind, T_IN | T_OUT | T_GET_ID) {
            segments_needed(req.len, self.size_max)
        } else {
            0
        };
        if segments > MAX_SEGMENTS
            || (self.descs_per_slot != 0 && 2 + segments as u16 > self.descs_per_slot)
        {
            return Err(SubmitError::TooLarge);
        }
        let mut ring = self.ring.lock();
        if ring.free_count == 0 {
            return Err(SubmitError::Full);
        }
        ring.free_count -= 1;
        let slot = ring.free[ring.free_count];
        self.slots[slot as usize]
            .state
            .store(SLOT_IN_FLIGHT, Ordering::Relaxed);
        // SAFETY: the slot is ours until it is returned to the free list.
        let mem = unsafe { &mut *(self.mem.as_ptr().add(slot as usize) as *mut SlotMem) };
        mem.header_type = req.kind;
        mem.header_reserved = 0;
        mem.header_sector = if matches!(req.kind, T_IN | T_OUT) {
            req.sector
        } else {
            0
        };
        mem.status = S_PENDING;
        let mut chain = [Desc::default(); 2 + MAX_SEGMENTS];
        let mut n = 0;
        chain[n] = Desc {
            addr: dma::phys(mem),
            len: 16,
            flags: 0,
            next: 0,
        };
        n += 1;
        match req.kind {
            T_IN | T_OUT | T_GET_ID => {
                let write = if req.kind == T_OUT { 0 } else { DESC_F_WRITE };
                let piece = if self.size_max == 0 {
                    req.len
                } else {
                    self.size_max
                };
                let mut done = 0u32;
                while done < req.len {
                    let len = piece.min(req.len - done);
                    chain[n] = Desc {
                        addr: req.buf + done as u64,
                        len,
                        flags: write,
                        next: 0,
                    };
                    n += 1;
                    done += len;
                }
            }
            T_DISCARD | T_WRITE_ZEROES => {
                mem.range_sector = req.sector;
                mem.range_sectors = req.len / SECTOR as u32;
                mem.range_flags = 0;
                chain[n] = Desc {
                    addr: dma::phys(&mem.range_sector),
                    len: 16,
                    flags: 0,
                    next: 0,
                };
                n += 1;
            }
            _ => {}
        }
        chain[n] = Desc {
            addr: dma::phys(&mem.status),
            len: 1,
            flags: DESC_F_WRITE,
            next: 0,
        };
        n += 1;
        // Link the chain; `next` is table-relative for indirect tables.
        let first = if self.descs_per_slot == 0 {
            0
        } else {
            slot * self.descs_per_slot
        };
        for (i, d) in chain[..n - 1].iter_mut().enumerate() {
            d.flags |= DESC_F_NEXT;
            d.next = first + i as u16 + 1;
        }
        let head = if self.descs_per_slot == 0 {
            mem.table[..n].copy_from_slice(&chain[..n]);
            let head = slot;
            ring.queue.set_desc(
                head,
                Desc {
                    addr: dma::phys(&mem.table[0]),
                    len: 16 * n as u32,
                    flags: DESC_F_INDIRECT,
                    next: 0,
                },
            );
            head
        } else {
            for (i, d) in chain[..n].iter().enumerate() {
                ring.queue.set_desc(first + i as u16, *d);
            }
            first
        };
        ring.queue.push_avail(head);
        Ok(slot)
    }

    /// Makes submitted requests visible, kicking the device if it wants.
    pub fn publish(&self) {
        self.ring.lock().queue.publish();
    }

    pub fn kicks(&self) -> u64 {
        self.ring.lock().queue.kicks
    }

    /// Harvests used entries for a thread that owns the queue alone: calls
    /// `f(slot, status)` for each and frees its slot. Returns how many.
    pub fn reap(&self, mut f: impl FnMut(u16, u8)) -> usize {
        self.harvest(true, &mut f)
    }

    /// Harvests used entries on a queue threads share: marks each slot done
    /// with its status; its owner frees it (`run`).
    pub fn reap_shared(&self) -> usize {
        self.harvest(false, &mut |_, _| {})
    }

    fn harvest(&self, free_slots: bool, f: &mut dyn FnMut(u16, u8)) -> usize {
        let mut ring = self.ring.lock();
        let mut count = 0;
        while let Some((id, _len)) = ring.queue.pop_used() {
            let slot = if self.descs_per_slot == 0 {
                id as u16
            } else {
                (id / self.descs_per_slot as u32) as u16
            };
            if slot >= self.slot_count {
                continue;
            }
            // SAFETY: the device finished with the slot; reading its status.
            let status = unsafe { core::ptr::read_volatile(&self.mem[slot as usize].status) };
            let state = &self.slots[slot as usize];
            state.status.store(status, Ordering::Relaxed);
            state.state.store(SLOT_DONE, Ordering::Release);
            if free_slots {
                let free = ring.free_count;
                ring.free[free] = slot;
                ring.free_count = free + 1;
            }
            count += 1;
            f(slot, status);
        }
        match self.completion {
            Completion::Poll => ring.queue.disable_interrupts(),
            // Re-armed at once, as Linux's virtio drivers do after a harvest: the next
            // completion is signalled even if it is ready before anyone waits for it.
            Completion::Irq if self.irq_arm == IrqArm::Always => ring.queue.enable_interrupts(),
            Completion::Irq => {}
        }
        count
    }

    /// Whether the device finished `slot` (harvested by any thread).
    pub fn is_done(&self, slot: u16) -> bool {
        self.slots[slot as usize].state.load(Ordering::Acquire) == SLOT_DONE
    }

    /// The status of `slot` if it is done, freeing it; for shared queues.
    pub fn take_if_done(&self, slot: u16) -> Option<u8> {
        if !self.is_done(slot) {
            return None;
        }
        let status = self.slots[slot as usize].status.load(Ordering::Relaxed);
        self.release(slot);
        Some(status)
    }

    fn release(&self, slot: u16) {
        let mut ring = self.ring.lock();
        self.slots[slot as usize]
            .state
            .store(SLOT_FREE, Ordering::Relaxed);
        let free = ring.free_count;
        ring.free[free] = slot;
        ring.free_count = free + 1;
    }

    /// Waits for the next completion: spinning on the used ring when
    /// polling; for the queue's interrupt when completion=irq. Returns early
    /// once `done()` (another thread harvested what we wait for). False if
    /// nothing came within COMPLETION_TIMEOUT_NS.
    pub fn wait(&self) -> bool {
        self.wait_until(&|| false)
    }

    pub fn wait_until(&self, done: &dyn Fn() -> bool) -> bool {
        match (self.completion, self.vector) {
            (Completion::Irq, Some(vector)) => {
                let counter = &INTERRUPT_COUNTS[vector as usize];
                let seen = counter.load(Ordering::Acquire);
                {
                    let mut ring = self.ring.lock();
                    ring.queue.enable_interrupts();
                    if ring.queue.has_used() || ring.queue.in_flight() == 0 {
                        return true;
                    }
                }
                let deadline = x86::rdtsc() + tsc::ns_to_ticks(COMPLETION_TIMEOUT_NS);
                while counter.load(Ordering::Acquire) == seen {
                    if done() {
                        return true;
                    }
                    if x86::rdtsc() > deadline {
                        return false;
                    }
                    match self.irq_wait {
                        IrqWait::Spin => x86::pause(),
                        IrqWait::Halt => crate::lapic::halt_until_changed(counter, seen),
                    }
                }
                self.interrupts_waited.fetch_add(1, Ordering::Relaxed);
                true
            }
            _ => {
                let deadline = x86::rdtsc() + tsc::ns_to_ticks(COMPLETION_TIMEOUT_NS);
                while !self.ring.lock().queue.has_used() && !done() {
                    if x86::rdtsc() > deadline {
                        return false;
                    }
                    x86::pause();
                }
                true
            }
        }
    }

    /// One request, start to finish; safe on a queue other threads use the
    /// same way. `Err(())` if it timed out (the device or its interrupt never
    /// came back).
    pub fn run(&self, req: &Request) -> Result<u8, ()> {
        let slot = loop {
            match self.submit(req) {
                Ok(slot) => break slot,
                Err(SubmitError::TooLarge) => return Ok(S_UNSUPP),
                Err(SubmitError::Full) => {
                    self.reap_shared();
                    x86::pause();
                }
            }
        };
        self.publish();
        let state = &self.slots[slot as usize];
        let done = || state.state.load(Ordering::Acquire) == SLOT_DONE;
        while !done() {
            if self.reap_shared() == 0 && !done() && !self.wait_until(&done) {
                return Err(());
            }
        }
        let status = state.status.load(Ordering::Relaxed);
        self.release(slot);
        Ok(status)
    }

    pub fn doorbell(&self) -> virtio::Doorbell {
        self.ring.lock().queue.doorbell()
    }
}

fn segments_needed(len: u32, size_max: u32) -> usize {
    if size_max == 0 {
        1
    } else {
        len.div_ceil(size_max) as usize
    }
}

/// A virtio-blk disk, ready (DRIVER_OK).
pub struct Disk {
    pub transport: Transport,
    pub features: u64,
    pub capacity: u64,
    pub blk_size: u32,
    pub read_only: bool,
    pub max_discard_sectors: u32,
    pub discard_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub queues: [Option<BlkQueue>; MAX_QUEUES],
    pub queue_count: usize,
}

impl Disk {
    pub fn queue(&self, i: usize) -> &BlkQueue {
        self.queues[i % self.queue_count]
            .as_ref()
            .expect("queue_count queues exist")
    }

    pub fn has(&self, feature: u64) -> bool {
        self.features & feature != 0
    }

    pub fn kicks(&self) -> u64 {
        self.queues.iter().flatten().map(|q| q.kicks()).sum()
    }

    pub fn interrupts_waited(&self) -> u64 {
        self.queues
            .iter()
            .flatten()
            .map(|q| q.interrupts_waited.load(Ordering::Relaxed) as u64)
            .sum()
    }

    /// Interrupts taken on the disk's queue vectors so far (waited for or not).
    pub fn interrupts_taken(&self) -> u64 {
        interrupts_taken_by([self])
    }

    /// Gives every BAR of the live device a new address (`bars=move`: after DRIVER_OK, so
    /// the VMM must move what it registered on the old ones) and follows it: registers,
    /// doorbells and the INTx handler's ISR address. The MSI-X table's entries stay in the
    /// device.
    pub fn move_bars(&mut self) -> Result<(), Error> {
        let old_isr = self.transport.isr_source();
        let mut function = self.transport.function;
        if !pci::move_bars(&mut function) {
            return Err(Error::BarsNotMoved);
        }
        self.transport = self.transport.moved(function)?;
        for (index, queue) in self.queues.iter().enumerate() {
            if let Some(queue) = queue {
                let doorbell = self.transport.doorbell(index as u16);
                queue.ring.lock().queue.set_doorbell(doorbell);
            }
        }
        boot::replace_intx_source(old_isr, self.transport.isr_source());
        Ok(())
    }
}

/// Interrupts taken on the vectors of `disks`' queues, each vector counted
/// once: the queues of an INTx device share one, and so do devices on one line.
pub fn interrupts_taken_by<'a>(disks: impl IntoIterator<Item = &'a Disk>) -> u64 {
    let mut counted = [false; 256];
    disks
        .into_iter()
        .flat_map(|d| d.queues.iter().flatten())
        .filter_map(|q| q.vector)
        .filter(|&v| !core::mem::replace(&mut counted[v as usize], true))
        .map(|v| INTERRUPT_COUNTS[v as usize].load(Ordering::Relaxed))
        .sum()
}

pub fn is_blk(f: &Function) -> bool {
    f.vendor == virtio::VENDOR_ID
        && (f.device == DEVICE_ID_TRANSITIONAL || f.device == DEVICE_ID_MODERN)
}

// Device configuration offsets.
const CFG_CAPACITY: u16 = 0;
const CFG_SIZE_MAX: u16 = 8;
const CFG_SEG_MAX: u16 = 12;
const CFG_BLK_SIZE: u16 = 20;
const CFG_NUM_QUEUES: u16 = 34;
const CFG_MAX_DISCARD_SECTORS: u16 = 36;
const CFG_DISCARD_ALIGNMENT: u16 = 44;
const CFG_MAX_WRITE_ZEROES_SECTORS: u16 = 48;

/// Routes the function's INTx line to its vector on this CPU (level-triggered,
/// as kickvm wires PCI lines: GSIs 16..23, named in the Interrupt Line
/// register as firmware would) and has the interrupt stub read the device's
/// ISR. Every queue of the device shares that vector.
fn route_intx(transport: &Transport) -> Result<u8, Error> {
    let gsi = u32::from(transport.function.addr.read8(pci::INTERRUPT_LINE));
    if !(16..16 + boot::INTX_LINES as u32).contains(&gsi) {
        return Err(Error::NoIntxLine);
    }
    let vector = boot::INTX_FIRST_VECTOR + (gsi - 16) as u8;
    if !boot::add_intx_source(vector, transport.isr_source())
        || !ioapic::route(gsi, vector, lapic::id(), ioapic::Trigger::Level)
    {
        return Err(Error::NoIntxLine);
    }
    Ok(vector)
}

/// Initialises the disk at `f` in the spec's order: reset, ACKNOWLEDGE,
/// DRIVER, features (FEATURES_OK), queues, DRIVER_OK.
pub fn open(f: Function, opts: &Options) -> Result<Disk, Error> {
    let mut bits = pci::COMMAND_MEMORY | pci::COMMAND_IO | pci::COMMAND_BUS_MASTER;
    let mut clear = 0;
    if opts.completion == Completion::Poll {
        bits |= pci::COMMAND_INTX_DISABLE;
    } else {
        clear |= pci::COMMAND_INTX_DISABLE;
    }
    f.set_command_bits(bits, clear);
    let mut transport = match Transport::new(f, opts.kind) {
        Err(Error::NoModernTransport) if opts.either_transport => Transport::new(f, Kind::Legacy)?,
        other => other?,
    };
    transport.reset();
    transport.add_status(virtio::STATUS_ACKNOWLEDGE);
    transport.add_status(virtio::STATUS_DRIVER);
    let offered = transport.device_features();
    let mut wanted =
        F_SIZE_MAX | F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH | F_MQ | F_DISCARD | F_WRITE_ZEROES;
    if opts.event_idx {
        wanted |= virtio::F_EVENT_IDX;
    }
    if opts.indirect {
        wanted |= virtio::F_INDIRECT_DESC;
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
    let mut queue_opts = *opts;
    queue_opts.event_idx = features & virtio::F_EVENT_IDX != 0;
    queue_opts.indirect = features & virtio::F_INDIRECT_DESC != 0;

    let size_max = if features & F_SIZE_MAX != 0 {
        transport.read_config(CFG_SIZE_MAX, 4)
    } else {
        0
    };
    let seg_max = if features & F_SEG_MAX != 0 {
        transport.read_config(CFG_SEG_MAX, 4)
    } else {
        0
    };
    let device_queues = if features & F_MQ != 0 {
        transport.read_config(CFG_NUM_QUEUES, 2).max(1) as usize
    } else {
        1
    };
    let queue_count = device_queues
        .min(opts.queues.max(1))
        .min(MAX_QUEUES)
        .min(transport.num_queues().max(1) as usize);

    let intx_vector = if opts.completion == Completion::Irq && opts.irq_source == IrqSource::Intx {
        Some(route_intx(&transport)?)
    } else {
        None
    };
    let msix = if opts.completion == Completion::Irq && intx_vector.is_none() {
        let m = Msix::find(&transport.function).ok_or(Error::MsixMissing)?;
        if (m.size as usize) < queue_count {
            return Err(Error::MsixMissing);
        }
        transport.enable_msix(&m);
        Some(m)
    } else {
        None
    };
    let mut queues: [Option<BlkQueue>; MAX_QUEUES] = [const { None }; MAX_QUEUES];
    for (i, q) in queues.iter_mut().enumerate().take(queue_count) {
        let vector = match &msix {
            Some(m) => {
                let vector = NEXT_VECTOR.fetch_add(1, Ordering::Relaxed);
                if vector > LAST_VECTOR {
                    return Err(Error::MsixVectorRejected);
                }
                // The queue's interrupt goes to the CPU whose thread uses it.
                let cpu = i % smp::online();
                m.route(i as u16, smp::apic_id(cpu), vector);
                Some(vector)
            }
            None => intx_vector,
        };
        match BlkQueue::new(&transport, i as u16, &queue_opts, size_max, seg_max, vector) {
            Ok(queue) => *q = Some(queue),
            Err(e) => {
                transport.add_status(virtio::STATUS_FAILED);
                return Err(e);
            }
        }
    }
    let cfg32 = |off: u16| transport.read_config(off, 4);
    let disk = Disk {
        capacity: transport.read_config64(CFG_CAPACITY),
        blk_size: if features & F_BLK_SIZE != 0 {
            cfg32(CFG_BLK_SIZE)
        } else {
            512
        },
        read_only: features & F_RO != 0,
        max_discard_sectors: if features & F_DISCARD != 0 {
            cfg32(CFG_MAX_DISCARD_SECTORS)
        } else {
            0
        },
        discard_alignment: if features & F_DISCARD != 0 {
            cfg32(CFG_DISCARD_ALIGNMENT)
        } else {
            0
        },
        max_write_zeroes_sectors: if features & F_WRITE_ZEROES != 0 {
            cfg32(CFG_MAX_WRITE_ZEROES_SECTORS)
        } else {
            0
        },
        features,
        queues,
        queue_count,
        transport,
    };
    disk.transport.add_status(virtio::STATUS_DRIVER_OK);
    if disk.transport.status() & (virtio::STATUS_NEEDS_RESET | virtio::STATUS_FAILED) != 0 {
        return Err(Error::DeviceFailed);
    }
    Ok(disk)
}
