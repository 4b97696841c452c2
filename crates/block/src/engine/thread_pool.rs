//! The fallback engine: a few worker threads each running one request at a time with
//! preadv/pwritev/fdatasync/fallocate, so requests in flight overlap without io_uring.

use std::collections::VecDeque;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{io, BlockEngine, BlockError, Completion, DiskImage, EngineKind, Request};

/// Most worker threads per engine. Page-cache hits are CPU-bound, so threads beyond the cores
/// only add switches; slow storage is what the extra ones are for.
const MAX_WORKERS: usize = 4;

struct Job {
    request: Request,
    len: u64,
}

#[derive(Default)]
struct Jobs {
    queue: VecDeque<Job>,
    shutdown: bool,
}

struct Shared {
    image: Arc<DiskImage>,
    jobs: Mutex<Jobs>,
    job_ready: Condvar,
    done: Mutex<Vec<Completion>>,
    eventfd: EventFd,
}

impl Shared {
    fn jobs(&self) -> MutexGuard<'_, Jobs> {
        // A worker never panics while holding the lock, but a poisoned queue is still usable.
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn done(&self) -> MutexGuard<'_, Vec<Completion>> {
        self.done.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(crate) struct ThreadPoolEngine {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    batch: Vec<Job>,
    in_flight: usize,
    depth: usize,
}

impl ThreadPoolEngine {
    pub(crate) fn new(image: Arc<DiskImage>, depth: usize) -> Result<Self, BlockError> {
        let setup_error = |source| BlockError::EngineSetup {
            engine: "threads",
            source,
        };
        let shared = Arc::new(Shared {
            image,
            jobs: Mutex::default(),
            job_ready: Condvar::new(),
            done: Mutex::default(),
            eventfd: EventFd::new(EFD_NONBLOCK).map_err(setup_error)?,
        });
        let mut engine = ThreadPoolEngine {
            shared,
            workers: Vec::new(),
            batch: Vec::new(),
            in_flight: 0,
            depth,
        };
        for i in 0..depth.min(MAX_WORKERS) {
            let shared = engine.shared.clone();
            let worker = std::thread::Builder::new()
                .name(format!("kickvm-blk-w{i}"))
                .spawn(move || work(&shared))
                .map_err(setup_error)?;
            // Pushed as soon as spawned, so Drop joins it even if a later spawn fails.
            engine.workers.push(worker);
        }
        Ok(engine)
    }
}

fn work(shared: &Shared) {
    loop {
        let job = {
            let mut jobs = shared.jobs();
            loop {
                if jobs.shutdown {
                    return;
                }
                if let Some(job) = jobs.queue.pop_front() {
                    break job;
                }
                jobs = shared
                    .job_ready
                    .wait(jobs)
                    .unwrap_or_else(|p| p.into_inner());
            }
        };
        let result = io::execute(&shared.image, &job.request, job.len);
        let completion = Completion {
            user_data: job.request.user_data,
            result,
        };
        let was_empty = {
            let mut done = shared.done();
            done.push(completion);
            done.len() == 1
        };
        // Only the first completion of a batch needs to wake the reaper: reap() resets the
        // eventfd before taking the list, so nothing pushed after the take goes unsignalled.
        if was_empty {
            if let Err(e) = shared.eventfd.write(1) {
                log::error!("block worker cannot signal its completion eventfd: {e}");
            }
        }
    }
}

impl BlockEngine for ThreadPoolEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::ThreadPool
    }

    fn submit(&mut self, request: Request) -> Result<(), BlockError> {
        let len = request.validate(&self.shared.image)?;
        if self.in_flight >= self.depth {
            return Err(BlockError::QueueFull { depth: self.depth });
        }
        self.in_flight += 1;
        self.batch.push(Job { request, len });
        Ok(())
    }

    fn commit(&mut self) -> Result<(), BlockError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let count = self.batch.len();
        self.shared.jobs().queue.extend(self.batch.drain(..));
        if count == 1 {
            self.shared.job_ready.notify_one();
        } else {
            self.shared.job_ready.notify_all();
        }
        Ok(())
    }

    fn completion_fd(&self) -> RawFd {
        self.shared.eventfd.as_raw_fd()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        // EAGAIN means it was not set; either way it is reset before the list is taken.
        let _ = self.shared.eventfd.read();
        let mut done = self.shared.done();
        self.in_flight -= done.len();
        out.append(&mut done);
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn depth(&self) -> usize {
        self.depth
    }
}

impl Drop for ThreadPoolEngine {
    fn drop(&mut self) {
        // Requests not yet started are dropped unstarted; running ones finish before the join
        // returns, so no buffer is touched once the engine is gone.
        {
            let mut jobs = self.shared.jobs();
            jobs.shutdown = true;
            jobs.queue.clear();
        }
        self.shared.job_ready.notify_all();
        for worker in self.workers.drain(..) {
            if worker.join().is_err() {
                log::error!("a block worker thread panicked");
            }
        }
    }
}
