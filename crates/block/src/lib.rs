//! Block backends: a raw image file served by an engine that keeps many requests in flight.
//!
//! The virtio-blk device owns one [`BlockEngine`] per queue, on that queue's I/O thread. Its
//! loop is:
//!
//! 1. pop descriptor chains, bounds-check them against guest memory, turn each into a
//!    [`Request`] and [`BlockEngine::submit`] it (a refused request is answered at once:
//!    `VIRTIO_BLK_S_UNSUPP` if [`BlockError::is_unsupported`], else `VIRTIO_BLK_S_IOERR`);
//! 2. [`BlockEngine::commit`] once per batch: one system call starts them all;
//! 3. [`BlockEngine::reap`] right after every commit (**required**: completions that are
//!    ready when commit returns, page-cache hits above all, do not signal the eventfd), and
//!    again whenever [`BlockEngine::completion_fd`], an eventfd in the same epoll set as the
//!    queue eventfds, becomes readable; write each [`Completion`]'s status, add it to the used
//!    ring, and signal the guest once per batch.
//!
//! Engines ([`EngineKind`]): `IoUring` (readv/writev/fsync/fallocate on a ring whose completions
//! signal the eventfd; writes to a page-cached image run inline in `submit`, since io_uring
//! would hand each to a worker thread on file systems without async buffered writes),
//! `ThreadPool` (worker threads doing preadv/pwritev), `Sync` (the request runs inside
//! `submit`; the simplest correct baseline), `Mmap` (every read copied out of a shared mapping
//! of the image, the rest as `Sync`: for images known to be cached, since a read of an
//! uncached page stalls the queue in a page fault). `Auto` takes io_uring when the host allows
//! it, else the thread pool, with reads of pages known to be in the page cache copied out of
//! a mapping in front of it (see `engine/mapped.rs`): no system call for a cached read, and
//! first touches still in flight on the ring.
//!
//! Durability: a Flush completes only after `fdatasync` returned, so every write completed
//! before the Flush was submitted is on stable storage when the Flush completes. Engines do
//! not order requests in flight against each other; the guest does not expect them to.

mod engine;
mod error;
mod format;
mod image;
mod inline_vec;
mod io;
mod mapping;
mod request;
#[cfg(test)]
mod tests;

use std::os::unix::io::RawFd;
use std::str::FromStr;
use std::sync::Arc;

pub use error::BlockError;
pub use image::{DirectIoAlignment, DiskImage, DiskOptions};
pub use inline_vec::InlineVec;
pub use request::{
    Buffers, Completion, HostBuffer, Request, RequestKind, INLINE_BUFFERS, MAX_SEGMENTS,
};

/// An I/O engine serving one image for one queue. Not shared between threads: each I/O
/// thread owns its own. Dropping an engine waits until no request is in flight any more, so
/// no buffer is touched afterwards.
pub trait BlockEngine: Send {
    /// Which engine this is (never [`EngineKind::Auto`]).
    fn kind(&self) -> EngineKind;

    /// Accepts a request. It may not start until [`BlockEngine::commit`]. On error the request
    /// was refused before touching its buffers and no completion will follow; errors are a
    /// bad request (read-only image, out of range, misaligned for `O_DIRECT`, unsupported) or
    /// [`BlockError::QueueFull`] when `depth` requests are already in flight.
    fn submit(&mut self, request: Request) -> Result<(), BlockError>;

    /// Starts every request submitted since the last commit. Requests that fail to start are
    /// reported as completions with an error, so `Err` here means the engine itself broke.
    /// Call [`BlockEngine::reap`] after it: what finished during the commit is only found
    /// there.
    fn commit(&mut self) -> Result<(), BlockError>;

    /// An eventfd that becomes readable when a request finishes after the last
    /// [`BlockEngine::reap`] (requests finished inside `commit` are left to the reap that
    /// follows it). Level-triggered epoll is the intended use; `reap` resets it. It may
    /// occasionally be readable with nothing to reap.
    fn completion_fd(&self) -> RawFd;

    /// Appends every finished request to `out` without blocking, and resets the eventfd.
    /// After a request's completion is reaped the engine no longer touches its buffers.
    fn reap(&mut self, out: &mut Vec<Completion>);

    /// Requests submitted and not yet reaped.
    fn in_flight(&self) -> usize;

    /// The most requests this engine keeps in flight at once.
    fn depth(&self) -> usize;
}

/// Which engine to run. Parsed from `auto`, `io_uring`, `threads`, `sync`, `mmap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineKind {
    #[default]
    Auto,
    IoUring,
    ThreadPool,
    Sync,
    /// Every read copied out of a shared mapping of the image, the rest run inline; for
    /// page-cached images only.
    Mmap,
}

impl EngineKind {
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Auto => "auto",
            EngineKind::IoUring => "io_uring",
            EngineKind::ThreadPool => "threads",
            EngineKind::Sync => "sync",
            EngineKind::Mmap => "mmap",
        }
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for EngineKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(EngineKind::Auto),
            "io_uring" | "io-uring" | "uring" => Ok(EngineKind::IoUring),
            "threads" | "thread-pool" | "threadpool" => Ok(EngineKind::ThreadPool),
            "sync" => Ok(EngineKind::Sync),
            "mmap" => Ok(EngineKind::Mmap),
            other => Err(format!(
                "unknown block engine '{other}' (expected auto, io_uring, threads, sync or mmap)"
            )),
        }
    }
}

/// Whether the io_uring engine can run on this host (probed once per process: ring setup,
/// the opcodes it needs, eventfd registration); the error says why not.
pub fn io_uring_support() -> Result<(), &'static str> {
    engine::io_uring_availability()
        .as_ref()
        .map(|_| ())
        .map_err(String::as_str)
}

/// Builds an engine for `image` that keeps up to `depth` requests in flight (the device passes
/// its queue size). `Auto` picks io_uring when the host allows it, else the thread pool, copies
/// reads of cached pages from a mapping in front of either, and logs the choice at info level.
pub fn open_engine(
    image: &Arc<DiskImage>,
    kind: EngineKind,
    depth: u32,
) -> Result<Box<dyn BlockEngine>, BlockError> {
    engine::open(image, kind, depth.max(1) as usize)
}
