//! A virtio-blk queue's event handler: on a kick or a completion, reap what finished, take
//! everything the driver made available, submit it to the engine in one batch, and signal the
//! guest once for the batch (if EVENT_IDX says it wants to hear).
//!
//! While requests are in flight the queue leaves driver notifications off: each completion
//! batch looks at the available ring anyway, so a kick would only cost the guest an exit (or
//! wake this thread) for nothing. Notifications are enabled again, and the ring re-checked,
//! when the queue goes idle.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::GuestMemoryMmap;
use kickvm_block::{BlockEngine, BlockError, Completion, Request, RequestKind};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::request::{parse, Parsed, RequestLimits, Segments};
use super::*;
use crate::counters::QueueCounters;
use crate::device::{QueueHandler, VirtioInterrupt};
use crate::pause::PauseRequests;
use crate::snapshot::QueuePosition;

/// Requests taken from the ring before those finished so far are returned to the driver.
/// Page-cache hits complete inside the engine's commit, so a whole ring's worth in one commit
/// comes back all at once, long after the driver could have refilled the first buffers: at 4k
/// randread qd32 the driver (spinning, or waiting for its interrupt) sat idle while this
/// thread read all 32. In chunks it reuses and resubmits them while the rest are read, and
/// with interrupt completion the interrupt is on its way meanwhile. See the commit message
/// for the measured effect of the size.
const COMPLETION_CHUNK: usize = 8;

/// Completions handed back before the guest is interrupted mid-batch (the rest of the batch
/// interrupts, if the driver still wants it, when the thread runs out of requests). An
/// interrupt costs a PVM guest its CPL0 handler, emulated; every chunk's interrupt came to one
/// per ~16 requests at 4k randread qd32. Measured there by interrupt, 7 interleaved rounds:
/// notify every 8: 116k-186k IOPS, median ~170k; every 16: 156k-198k, median ~187k; only at
/// the end (32): 124k-148k.
const NOTIFY_CHUNK: usize = 16;

struct InFlight {
    status: GuestAddress,
    used_len: u32,
    /// Guest buffers the engine writes through host addresses: marked written on completion.
    fills: Segments,
    /// A copy of a write, write-zeroes or flush, kept to make it again if the host file
    /// system is full (only when the disk pauses the VM for that).
    retry: Option<Request>,
}

pub struct BlkQueue {
    queue: Queue,
    engine: Box<dyn BlockEngine>,
    /// By descriptor head index: unique while the chain is in flight.
    in_flight: Vec<Option<InFlight>>,
    completions: Vec<Completion>,
    /// The driver broke the ring; nothing more is taken from it until reset.
    broken: bool,
    /// Heads of requests that failed for want of space, made again on resume.
    held: Vec<u16>,
}

impl BlkQueue {
    pub fn new(queue: Queue, engine: Box<dyn BlockEngine>) -> Self {
        let size = usize::from(queue.size());
        Self {
            queue,
            engine,
            in_flight: (0..size).map(|_| None).collect(),
            held: Vec::new(),
            completions: Vec::with_capacity(size),
            broken: false,
        }
    }
}

pub struct BlkHandler {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    counters: Arc<[QueueCounters]>,
    limits: RequestLimits,
    /// Indexed by queue; `None` for a queue the driver did not enable, or after reset.
    queues: Vec<Mutex<Option<BlkQueue>>>,
    completion_fds: Vec<Option<RawFd>>,
    in_flight: Vec<AtomicUsize>,
    /// VM paused: requests in flight complete, nothing new is taken from the rings.
    paused: AtomicBool,
    /// `enospc=pause`: where to ask for the pause, and the image's name for the reason.
    pause_on_no_space: Option<(Arc<PauseRequests>, String)>,
}

/// A request that failed because the host file system (or the user's quota) is full.
fn is_no_space(e: &BlockError) -> bool {
    matches!(e, BlockError::Io(io) if matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)))
}

enum Outcome {
    Done,
    Fatal(&'static str),
}

impl BlkHandler {
    pub fn new(
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        counters: Arc<[QueueCounters]>,
        limits: RequestLimits,
        queues: Vec<Option<BlkQueue>>,
        pause_on_no_space: Option<(Arc<PauseRequests>, String)>,
    ) -> Self {
        let completion_fds = queues
            .iter()
            .map(|q| q.as_ref().map(|q| q.engine.completion_fd()))
            .collect();
        let in_flight = queues.iter().map(|_| AtomicUsize::new(0)).collect();
        Self {
            mem,
            interrupt,
            counters,
            limits,
            queues: queues.into_iter().map(Mutex::new).collect(),
            completion_fds,
            in_flight,
            paused: AtomicBool::new(false),
            pause_on_no_space,
        }
    }

    /// Device reset: drops every engine, which waits for its requests in flight, so no guest
    /// buffer is touched after this returns.
    pub fn shut_down(&self) {
        for (queue, count) in self.queues.iter().zip(&self.in_flight) {
            drop(queue.lock().unwrap().take());
            count.store(0, Ordering::SeqCst);
        }
    }

    /// Writes held for want of host space, across the queues: a snapshot would lose them.
    pub fn held_requests(&self) -> usize {
        self.queues
            .iter()
            .map(|q| q.lock().unwrap().as_ref().map_or(0, |q| q.held.len()))
            .sum()
    }

    /// Reaps, takes what is available, submits. With `rearm`, ends by enabling driver
    /// notifications (unless requests are in flight); without, leaves them off because the
    /// caller (the polling I/O thread) will come back. Returns whether anything happened.
    fn run(&self, index: usize, rearm: bool) -> bool {
        let Some(slot) = self.queues.get(index) else {
            log::debug!("virtio-blk: kick for nonexistent queue {index} ignored");
            return false;
        };
        let mut guard = slot.lock().unwrap();
        let Some(state) = guard.as_mut() else {
            return false;
        };
        if state.broken {
            // Keep the engine's completion fd from staying readable; the guest gets nothing
            // more from a broken ring.
            state.engine.reap(&mut state.completions);
            state.completions.clear();
            return false;
        }
        let counters = &self.counters[index];
        let mut used = self.reap(state);
        let mut popped = 0;
        let mut early_used = false;
        let outcome = if self.paused.load(Ordering::SeqCst) {
            Outcome::Done
        } else {
            self.take_available(
                state,
                index,
                counters,
                (&mut used, &mut popped, &mut early_used),
                rearm,
            )
        };
        match outcome {
            Outcome::Done => {}
            Outcome::Fatal(reason) => {
                log::warn!("virtio-blk queue {index}: {reason}; device needs reset");
                state.broken = true;
                self.interrupt.set_needs_reset();
            }
        }
        self.in_flight[index].store(state.engine.in_flight(), Ordering::Relaxed);
        if used > 0 {
            self.notify_guest(state, index, counters);
        }
        used > 0 || popped > 0 || early_used
    }

    /// Interrupts the guest for what was added to the used ring since the last call, if
    /// EVENT_IDX (used_event) says it wants to hear.
    fn notify_guest(&self, state: &mut BlkQueue, index: usize, counters: &QueueCounters) {
        match state.queue.needs_notification(&self.mem) {
            Ok(true) => self.interrupt.signal_queue(index),
            Ok(false) => QueueCounters::add(&counters.interrupts_suppressed, 1),
            // Unreadable used_event: interrupt anyway, a spurious one is harmless.
            Err(_) => self.interrupt.signal_queue(index),
        }
    }

    fn take_available(
        &self,
        state: &mut BlkQueue,
        index: usize,
        counters: &QueueCounters,
        (used, total_popped, early_used): (&mut usize, &mut usize, &mut bool),
        rearm: bool,
    ) -> Outcome {
        if state.queue.disable_notification(&self.mem).is_err() {
            return Outcome::Fatal("used ring not writable");
        }
        loop {
            let mut popped = 0;
            let mut submitted = false;
            let mut unreaped = 0;
            while let Some(chain) = state.queue.pop_descriptor_chain(&self.mem) {
                // Only for the polling I/O thread: on the vCPU thread (sync mode) the driver
                // waits for the exit to return anyway, and chunks would only add commits.
                if unreaped == COMPLETION_CHUNK && !rearm {
                    // Start what is submitted and hand back what finished before taking
                    // more, so the driver can reuse those buffers, and hear about them,
                    // while this thread reads the rest.
                    if let Err(e) = state.engine.commit() {
                        log::error!("virtio-blk: engine failed: {e}");
                        return Outcome::Fatal("block engine failed");
                    }
                    *used += self.reap(state);
                    if *used >= NOTIFY_CHUNK && state.queue.event_idx_enabled() {
                        // Without EVENT_IDX every call would interrupt; with it, only
                        // the first after the driver asked does. Unnotified completions
                        // add up across chunks until there are NOTIFY_CHUNK of them.
                        self.notify_guest(state, index, counters);
                        *used = 0;
                        *early_used = true;
                    }
                    unreaped = 0;
                    submitted = false;
                }
                popped += 1;
                *total_popped += 1;
                QueueCounters::add(&counters.requests, 1);
                let head = chain.head_index();
                match parse(chain, &self.mem, &self.limits) {
                    Parsed::Submit {
                        request,
                        status,
                        used_len,
                        fills,
                    } => {
                        let bytes = request.byte_len();
                        let retry = (self.pause_on_no_space.is_some()
                            && request.kind != RequestKind::Read)
                            .then(|| request.clone());
                        match state.engine.submit(request) {
                            Ok(()) => {
                                QueueCounters::add(&counters.bytes, bytes);
                                state.in_flight[usize::from(head)] = Some(InFlight {
                                    status,
                                    used_len,
                                    fills,
                                    retry,
                                });
                                submitted = true;
                                unreaped += 1;
                            }
                            Err(e) => {
                                log::debug!("virtio-blk chain {head}: engine refused: {e}");
                                let value = if e.is_unsupported() {
                                    VIRTIO_BLK_S_UNSUPP
                                } else {
                                    VIRTIO_BLK_S_IOERR
                                };
                                if let Some(o) = self.complete(state, head, status, value, 1) {
                                    return o;
                                }
                                *used += 1;
                            }
                        }
                    }
                    Parsed::Answer {
                        status,
                        value,
                        used_len,
                    } => {
                        if let Some(o) = self.complete(state, head, status, value, used_len) {
                            return o;
                        }
                        *used += 1;
                    }
                    Parsed::Broken { reason, fatal } => {
                        log::debug!("virtio-blk chain {head}: {reason}");
                        if state.queue.add_used(&self.mem, head, 0).is_err() || fatal {
                            return Outcome::Fatal(reason);
                        }
                        *used += 1;
                    }
                }
            }
            if submitted {
                if let Err(e) = state.engine.commit() {
                    log::error!("virtio-blk: engine failed: {e}");
                    return Outcome::Fatal("block engine failed");
                }
                // Some engines finish during commit.
                *used += self.reap(state);
            }
            if popped == 0 && self.avail_index_out_of_range(&state.queue) {
                return Outcome::Fatal("available index out of range");
            }
            if !rearm || state.engine.in_flight() > 0 {
                // The poller or the completions come back here; kicks meanwhile are wasted.
                return Outcome::Done;
            }
            match state.queue.enable_notification(&self.mem) {
                Ok(false) => return Outcome::Done,
                // Nothing could be popped although the index says there is more: either the
                // driver published just now (go round again), or its index is beyond the ring.
                Ok(true) if popped == 0 && self.avail_index_out_of_range(&state.queue) => {
                    return Outcome::Fatal("available index out of range");
                }
                Ok(true) => continue,
                Err(_) => return Outcome::Fatal("available ring unreadable"),
            }
        }
    }

    fn avail_index_out_of_range(&self, queue: &Queue) -> bool {
        match queue.avail_idx(&self.mem, std::sync::atomic::Ordering::Acquire) {
            Ok(idx) => (idx - std::num::Wrapping(queue.next_avail())).0 > queue.size(),
            Err(_) => true,
        }
    }

    fn complete(
        &self,
        state: &mut BlkQueue,
        head: u16,
        status: GuestAddress,
        value: u8,
        used_len: u32,
    ) -> Option<Outcome> {
        // The status address was checked against guest memory when the chain was parsed.
        let _ = self.mem.write_obj(value, status);
        state
            .queue
            .add_used(&self.mem, head, used_len)
            .err()
            .map(|_| Outcome::Fatal("descriptor head out of range"))
    }

    fn reap(&self, state: &mut BlkQueue) -> usize {
        let mut completions = std::mem::take(&mut state.completions);
        state.engine.reap(&mut completions);
        let mut used = 0;
        let mut held_now = 0;
        for completion in completions.drain(..) {
            let head = completion.user_data as usize;
            if self.pause_on_no_space.is_some()
                && completion.result.as_ref().is_err_and(is_no_space)
                && state
                    .in_flight
                    .get(head)
                    .is_some_and(|f| f.as_ref().is_some_and(|f| f.retry.is_some()))
            {
                // Kept in flight: the guest hears nothing until it is made again.
                state.held.push(head as u16);
                held_now += 1;
                continue;
            }
            let Some(in_flight) = state.in_flight.get_mut(head).and_then(Option::take) else {
                log::error!("virtio-blk: completion for unknown head {head}");
                continue;
            };
            // Even a failed read may have filled part of its buffers.
            for &(addr, len, _) in in_flight.fills.iter() {
                crate::dirty::mark_written(&self.mem, addr, len as usize);
            }
            let (value, used_len) = match completion.result {
                Ok(_) => (VIRTIO_BLK_S_OK, in_flight.used_len),
                Err(e) => {
                    log::debug!("virtio-blk chain {head}: {e}");
                    (
                        if e.is_unsupported() {
                            VIRTIO_BLK_S_UNSUPP
                        } else {
                            VIRTIO_BLK_S_IOERR
                        },
                        1,
                    )
                }
            };
            if self
                .complete(state, head as u16, in_flight.status, value, used_len)
                .is_some()
            {
                state.broken = true;
            }
            used += 1;
        }
        state.completions = completions;
        if held_now > 0 {
            if let Some((requests, image)) = &self.pause_on_no_space {
                log::warn!(
                    "{image}: no space left on the host for {held_now} write(s); pausing the VM \
                     (free space, then resume it: they are made again)"
                );
                requests.request(format!("{image}: no space left on device"));
            }
        }
        used
    }

    /// Makes again the requests held for want of space (on resume). A request the engine
    /// refuses now is answered IOERR.
    fn retry_held(&self, index: usize) {
        let Some(slot) = self.queues.get(index) else {
            return;
        };
        let mut guard = slot.lock().unwrap();
        let Some(state) = guard.as_mut() else {
            return;
        };
        if state.held.is_empty() {
            return;
        }
        let mut used = 0;
        for head in std::mem::take(&mut state.held) {
            let retry = state.in_flight[usize::from(head)]
                .as_ref()
                .and_then(|f| f.retry.clone());
            let refused = match retry {
                Some(request) => state.engine.submit(request).err(),
                None => continue,
            };
            if let Some(e) = refused {
                log::debug!("virtio-blk chain {head}: engine refused the retry: {e}");
                if let Some(in_flight) = state.in_flight[usize::from(head)].take() {
                    if self
                        .complete(state, head, in_flight.status, VIRTIO_BLK_S_IOERR, 1)
                        .is_some()
                    {
                        state.broken = true;
                    }
                    used += 1;
                }
            }
        }
        if let Err(e) = state.engine.commit() {
            log::error!("virtio-blk: engine failed: {e}");
        }
        used += self.reap(state);
        self.in_flight[index].store(state.engine.in_flight(), Ordering::Relaxed);
        if used > 0 {
            self.notify_guest(state, index, &self.counters[index]);
        }
    }
}

impl QueueHandler for BlkHandler {
    fn process_queue(&self, queue: usize) {
        self.run(queue, true);
    }

    fn poll_queue(&self, queue: usize) -> bool {
        self.run(queue, false)
    }

    fn rearm(&self, queue: usize) {
        self.run(queue, true);
    }

    fn completion_fd(&self, queue: usize) -> Option<RawFd> {
        self.completion_fds.get(queue).copied().flatten()
    }

    fn process_completions(&self, queue: usize) {
        self.run(queue, true);
    }

    /// A driver that kicks with nothing new (kick-bench) then pays only KVM's part of a kick,
    /// and the I/O thread leaves the CPU to the vCPU instead of spinning next to it.
    fn doze_on_idle_kicks(&self) -> bool {
        true
    }

    fn busy(&self, queue: usize) -> bool {
        self.in_flight
            .get(queue)
            .is_some_and(|n| n.load(Ordering::Relaxed) > 0)
    }

    fn num_queues(&self) -> usize {
        self.queues.len()
    }

    fn queue_position(&self, queue: usize) -> Option<QueuePosition> {
        let guard = self.queues.get(queue)?.lock().unwrap();
        let q = &guard.as_ref()?.queue;
        Some(QueuePosition {
            next_avail: q.next_avail(),
            next_used: q.next_used(),
            event_idx: q.event_idx_enabled(),
        })
    }

    fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        // A run that started before the flag was set finishes before this returns.
        for queue in &self.queues {
            drop(queue.lock().unwrap());
        }
        if !paused {
            for index in 0..self.queues.len() {
                self.retry_held(index);
            }
        }
    }
}
