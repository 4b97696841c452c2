//! The io_uring engine: every request is one SQE (or a few, when a transfer comes back short
//! or write-zeroes falls back to writing), a batch starts with one `io_uring_enter`, and the
//! kernel signals the registered eventfd as completions are posted.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, OnceLock};

use io_uring::{opcode, squeue, types, IoUring, Probe};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::io::{is_unsupported_errno, IoVecCursor, ZeroMethod};
use crate::{BlockEngine, BlockError, Completion, DiskImage, EngineKind, Request, RequestKind};

/// The kernel's limit on ring entries (IORING_MAX_ENTRIES).
const MAX_RING_ENTRIES: usize = 32768;

/// Opcodes the engine issues; a kernel lacking any of them is treated as having no io_uring.
const REQUIRED_OPCODES: [u8; 4] = [
    opcode::Readv::CODE,
    opcode::Writev::CODE,
    opcode::Fsync::CODE,
    opcode::Fallocate::CODE,
];

/// Whether io_uring can serve block requests here; probed once per process. `Err` says why
/// not (seccomp, `kernel.io_uring_disabled`, an old kernel).
pub(crate) fn availability() -> &'static Result<(), String> {
    static AVAILABLE: OnceLock<Result<(), String>> = OnceLock::new();
    AVAILABLE.get_or_init(|| {
        let ring = IoUring::new(4).map_err(|e| format!("io_uring_setup failed: {e}"))?;
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| format!("cannot probe io_uring opcodes: {e}"))?;
        if let Some(missing) = REQUIRED_OPCODES.iter().find(|&&op| !probe.is_supported(op)) {
            return Err(format!("io_uring lacks opcode {missing}"));
        }
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(|e| e.to_string())?;
        ring.submitter()
            .register_eventfd(eventfd.as_raw_fd())
            .map_err(|e| format!("cannot register an eventfd with io_uring: {e}"))?;
        Ok(())
    })
}

/// A request in flight and how far it has got.
struct Op {
    user_data: u64,
    kind: RequestKind,
    /// Where the next SQE starts in the image.
    offset: u64,
    /// Bytes still to go (fallocate and zero writes); transfers track theirs in `cursor`.
    remaining: u64,
    /// The request's length, reported on success of a transfer.
    len: u64,
    cursor: IoVecCursor,
    zero_method: ZeroMethod,
}

enum Step {
    Done(Result<u32, BlockError>),
    Again,
    Stray,
}

pub(crate) struct IoUringEngine {
    ring: IoUring,
    image: Arc<DiskImage>,
    eventfd: EventFd,
    slots: Vec<Option<Op>>,
    free: Vec<usize>,
    /// Requests submitted and not yet reaped.
    in_flight: usize,
    /// SQEs pushed to the ring whose CQE has not been seen; Drop waits for them.
    sqes_out: usize,
    /// Finished requests waiting for the next reap.
    ready: Vec<Completion>,
    /// The kernel has the CQ flags word (5.8+), so eventfd notification can be switched off
    /// while this thread is collecting completions itself.
    can_mute: bool,
    /// The kernel signals the eventfd for new completions.
    notifying: bool,
    /// Reaps that must still read(2) the eventfd to clear a count it may hold. Muting is a
    /// flag the kernel reads just before it signals, so a completion racing the mute can
    /// signal after the reap that muted has read: enabling owes two reads (that reap's and
    /// the next one's), `retry_later` one.
    eventfd_reads_owed: u8,
    scratch: Vec<(u64, i32)>,
    depth: usize,
}

// SAFETY: the iovecs inside `Op`s point at caller memory that HostBuffer::new's contract makes
// usable from any thread; the ring itself is Send. The engine is used by one thread at a time.
unsafe impl Send for IoUringEngine {}

impl IoUringEngine {
    pub(crate) fn new(image: Arc<DiskImage>, depth: usize) -> Result<Self, BlockError> {
        if let Err(why) = availability() {
            log::debug!("io_uring unavailable: {why}");
            return Err(BlockError::EngineUnavailable("io_uring"));
        }
        let setup_error = |source| BlockError::EngineSetup {
            engine: "io_uring",
            source,
        };
        let entries = depth.min(MAX_RING_ENTRIES) as u32;
        // SUBMIT_ALL keeps submitting past an SQE that fails to start (5.18+), so one bad
        // request cannot leave the rest of a batch sitting in the ring.
        let ring = IoUring::builder()
            .setup_submit_all()
            .build(entries)
            .or_else(|_| IoUring::new(entries))
            .map_err(setup_error)?;
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(setup_error)?;
        ring.submitter()
            .register_eventfd(eventfd.as_raw_fd())
            .map_err(setup_error)?;
        // A registered file spares the kernel a file-table lookup and refcount per SQE.
        ring.submitter()
            .register_files(&[image.file().as_raw_fd()])
            .map_err(setup_error)?;
        // POLL_32BITS came in 5.9, after the CQ flags word (5.8): a safe sign it exists.
        let can_mute = ring.params().is_feature_poll_32bits();
        // At most one SQE per request is in the ring, and the completion queue is twice the
        // submission queue, so completions can never overflow.
        let depth = depth.min(ring.params().sq_entries() as usize);
        Ok(IoUringEngine {
            ring,
            image,
            eventfd,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            in_flight: 0,
            sqes_out: 0,
            ready: Vec::new(),
            can_mute,
            notifying: true,
            eventfd_reads_owed: 2,
            scratch: Vec::with_capacity(depth),
            depth,
        })
    }

    fn sqe(op: &Op) -> squeue::Entry {
        // The image's file, registered at index 0.
        let fd = types::Fixed(0);
        let entry = match op.kind {
            RequestKind::Read => {
                let iov = op.cursor.remaining();
                opcode::Readv::new(fd, iov.as_ptr(), iov.len() as u32)
                    .offset(op.offset)
                    .build()
            }
            RequestKind::Write => {
                let iov = op.cursor.remaining();
                opcode::Writev::new(fd, iov.as_ptr(), iov.len() as u32)
                    .offset(op.offset)
                    .build()
            }
            RequestKind::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            RequestKind::Discard => opcode::Fallocate::new(fd, op.remaining)
                .offset(op.offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            RequestKind::WriteZeroes { .. } => match op.zero_method.fallocate_mode() {
                Some(mode) => opcode::Fallocate::new(fd, op.remaining)
                    .offset(op.offset)
                    .mode(mode)
                    .build(),
                None => {
                    let iov = op.cursor.remaining();
                    opcode::Writev::new(fd, iov.as_ptr(), iov.len() as u32)
                        .offset(op.offset)
                        .build()
                }
            },
        };
        entry
    }

    /// Puts the slot's next SQE in the submission ring; a failure completes the request.
    fn push(&mut self, slot: usize) {
        let Some(op) = self.slots[slot].as_ref() else {
            return;
        };
        let entry = Self::sqe(op).user_data(slot as u64);
        // SAFETY: the SQE points at the slot's iovec array (inside the Op, or on the heap when
        // it spilled; the Op stays in place in `slots`, which never grows, until its CQE is
        // processed) and at caller buffers valid until the completion is reaped
        // (HostBuffer::new's contract), or at the static zero buffer.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_ok() {
            self.sqes_out += 1;
        } else {
            let err = io::Error::other("io_uring submission queue full");
            self.finish(slot, Err(err.into()));
        }
    }

    /// Tells the kernel about every SQE in the ring. On a transient error (the kernel short
    /// of memory) they stay there and the eventfd is signalled, so the device's next reap
    /// tries again.
    fn enter(&mut self) -> Result<(), BlockError> {
        while !self.ring.submission().is_empty() {
            match self.ring.submit() {
                Ok(0) => return self.retry_later("io_uring_enter took no SQE"),
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY)) => {
                    return self.retry_later(&e.to_string());
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn retry_later(&mut self, why: &str) -> Result<(), BlockError> {
        log::debug!("io_uring submission deferred: {why}");
        self.eventfd.write(1)?;
        self.eventfd_reads_owed = self.eventfd_reads_owed.max(1);
        Ok(())
    }

    fn finish(&mut self, slot: usize, result: Result<u32, BlockError>) {
        if let Some(op) = self.slots[slot].take() {
            self.free.push(slot);
            self.ready.push(Completion {
                user_data: op.user_data,
                result,
            });
        }
    }

    fn mute(&mut self) {
        if self.can_mute && self.notifying {
            self.ring.completion().disable_eventfd();
            self.notifying = false;
        }
    }

    /// Processes every CQE in the ring, resubmitting what is not finished.
    fn drain(&mut self) {
        let mut cqes = std::mem::take(&mut self.scratch);
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(slot, res) in &cqes {
            self.sqes_out -= 1;
            let slot = slot as usize;
            match self.step(slot, res) {
                Step::Done(result) => self.finish(slot, result),
                Step::Again => self.push(slot),
                Step::Stray => {}
            }
        }
        cqes.clear();
        self.scratch = cqes;
        if let Err(e) = self.enter() {
            log::error!("io_uring_enter failed while resubmitting: {e}");
        }
    }

    /// What a CQE means for its request.
    fn step(&mut self, slot: usize, res: i32) -> Step {
        let image = &self.image;
        let Some(op) = self.slots[slot].as_mut() else {
            log::error!("io_uring completion for unknown slot {slot}");
            return Step::Stray;
        };
        if res < 0 {
            let errno = -res;
            if errno == libc::EINTR || errno == libc::EAGAIN {
                return Step::Again;
            }
            let zeroing = matches!(op.kind, RequestKind::WriteZeroes { .. });
            if zeroing && op.zero_method != ZeroMethod::WriteZeros && is_unsupported_errno(errno) {
                op.zero_method = op.zero_method.next(image);
                if op.zero_method == ZeroMethod::WriteZeros {
                    op.cursor = IoVecCursor::zeroes(op.remaining);
                }
                return Step::Again;
            }
            return Step::Done(Err(io::Error::from_raw_os_error(errno).into()));
        }
        let n = res as u64;
        match op.kind {
            RequestKind::Read | RequestKind::Write => {
                if n == 0 {
                    if op.kind == RequestKind::Write {
                        return Step::Done(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
                    }
                    // End of file: the file shrank under us. Reads past it see zeros.
                    op.cursor.zero_fill();
                }
                op.cursor.advance(n as usize);
                op.offset += n;
                if op.cursor.is_done() {
                    Step::Done(Ok(op.len as u32))
                } else {
                    Step::Again
                }
            }
            RequestKind::Flush | RequestKind::Discard => Step::Done(Ok(0)),
            RequestKind::WriteZeroes { .. } => {
                if op.zero_method != ZeroMethod::WriteZeros {
                    return Step::Done(Ok(0));
                }
                if n == 0 {
                    return Step::Done(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
                }
                op.offset += n;
                op.remaining -= n;
                if op.remaining == 0 {
                    Step::Done(Ok(0))
                } else {
                    op.cursor = IoVecCursor::zeroes(op.remaining);
                    Step::Again
                }
            }
        }
    }
}

impl BlockEngine for IoUringEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::IoUring
    }

    fn submit(&mut self, request: Request) -> Result<(), BlockError> {
        let len = request.validate(&self.image)?;
        if self.in_flight >= self.depth {
            return Err(BlockError::QueueFull { depth: self.depth });
        }
        if request.kind == RequestKind::Write && self.image.direct_io_alignment().is_none() {
            // A buffered write is a copy into the page cache, but io_uring cannot start one
            // without blocking on file systems lacking async buffered writes (ext4 here), so
            // it hands each to an io-wq worker thread: a thread hand-off per write. Done
            // here it costs one pwritev. Measured, 4k randwrite qd32 ioeventfd=on: 79k IOPS
            // through io_uring (an iou-wrk thread at 35% CPU), 147k written inline.
            let result = crate::io::execute(&self.image, &request, len);
            self.in_flight += 1;
            self.ready.push(Completion {
                user_data: request.user_data,
                result,
            });
            return Ok(());
        }
        let Some(slot) = self.free.pop() else {
            return Err(BlockError::QueueFull { depth: self.depth });
        };
        let zero_method = match request.kind {
            RequestKind::WriteZeroes { unmap } => ZeroMethod::first(&self.image, unmap),
            _ => ZeroMethod::WriteZeros,
        };
        let cursor = match request.kind {
            RequestKind::Read | RequestKind::Write => IoVecCursor::new(&request.buffers),
            RequestKind::WriteZeroes { .. } if zero_method == ZeroMethod::WriteZeros => {
                IoVecCursor::zeroes(len)
            }
            _ => IoVecCursor::new(&[]),
        };
        let done_already = len == 0 && request.kind != RequestKind::Flush;
        self.slots[slot] = Some(Op {
            user_data: request.user_data,
            kind: request.kind,
            offset: request.offset,
            remaining: len,
            len,
            cursor,
            zero_method,
        });
        self.in_flight += 1;
        if done_already {
            // Nothing to move; the kernel would refuse a zero-length fallocate anyway.
            self.finish(slot, Ok(0));
            return Ok(());
        }
        self.push(slot);
        Ok(())
    }

    fn commit(&mut self) -> Result<(), BlockError> {
        // Page-cache hits complete inside io_uring_enter; the reap that must follow collects
        // them, so they need not signal the eventfd (and the reap need not read it).
        self.mute();
        self.enter()
    }

    fn completion_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        self.mute();
        if self.eventfd_reads_owed > 0 || self.notifying {
            // Reset before draining (and after muting): a CQE posted after the drain signals
            // it again only once notification is back on.
            let _ = self.eventfd.read();
            self.eventfd_reads_owed = self.eventfd_reads_owed.saturating_sub(1);
        }
        loop {
            self.drain();
            // With nothing in the kernel no CQE can come, so the eventfd stays muted and the
            // next reap needs no read(2): page-cache hits, which complete inside commit,
            // then cost one io_uring_enter and no other system call. (Measured: the read on
            // every reap was ~5% of the polling I/O thread's time at 4k randread qd32.)
            if !self.can_mute || self.sqes_out == 0 {
                break;
            }
            // Notify again before going idle, then look once more: a CQE posted while muted
            // and after the drain would otherwise never wake anyone.
            self.ring.completion().enable_eventfd();
            self.notifying = true;
            self.eventfd_reads_owed = 2;
            if self.ring.completion().is_empty() {
                break;
            }
            self.mute();
        }
        self.in_flight -= self.ready.len();
        out.append(&mut self.ready);
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn depth(&self) -> usize {
        self.depth
    }
}

impl Drop for IoUringEngine {
    fn drop(&mut self) {
        // The kernel may still be writing into caller buffers: wait for every SQE to complete.
        while self.sqes_out > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    log::error!(
                        "io_uring engine dropped with {} operations it cannot wait for: {e}",
                        self.sqes_out
                    );
                    return;
                }
            }
            let seen = self.ring.completion().count();
            self.sqes_out -= seen;
        }
    }
}
