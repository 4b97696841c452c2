//! The baseline engine: each request runs to completion inside `submit`.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{io, BlockEngine, BlockError, Completion, DiskImage, EngineKind, Request};

pub(crate) struct SyncEngine {
    image: Arc<DiskImage>,
    depth: usize,
    ready: Vec<Completion>,
    /// Never written: every request has finished when `commit` returns, and the reap that
    /// must follow a commit collects it. It exists so the device's epoll set looks the same
    /// whatever the engine.
    eventfd: EventFd,
}

impl SyncEngine {
    pub(crate) fn new(image: Arc<DiskImage>, depth: usize) -> Result<Self, BlockError> {
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(|source| BlockError::EngineSetup {
            engine: "sync",
            source,
        })?;
        Ok(SyncEngine {
            image,
            depth,
            ready: Vec::new(),
            eventfd,
        })
    }
}

impl BlockEngine for SyncEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Sync
    }

    fn submit(&mut self, request: Request) -> Result<(), BlockError> {
        let len = request.validate(&self.image)?;
        if self.ready.len() >= self.depth {
            return Err(BlockError::QueueFull { depth: self.depth });
        }
        let result = io::execute(&self.image, &request, len);
        self.ready.push(Completion {
            user_data: request.user_data,
            result,
        });
        Ok(())
    }

    fn commit(&mut self) -> Result<(), BlockError> {
        Ok(())
    }

    fn completion_fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.ready);
    }

    fn in_flight(&self) -> usize {
        self.ready.len()
    }

    fn depth(&self) -> usize {
        self.depth
    }
}
