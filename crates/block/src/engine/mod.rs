mod mapped;
mod sync;
mod thread_pool;
mod uring;

pub(crate) use uring::availability as io_uring_availability;

use std::sync::Arc;

use crate::{BlockEngine, BlockError, DiskImage, EngineKind};

pub(crate) fn open(
    image: &Arc<DiskImage>,
    kind: EngineKind,
    depth: usize,
) -> Result<Box<dyn BlockEngine>, BlockError> {
    let engine: Box<dyn BlockEngine> = match kind {
        EngineKind::Sync => Box::new(sync::SyncEngine::new(image.clone(), depth)?),
        EngineKind::Mmap => mapped::MappedReads::wrap(
            Box::new(sync::SyncEngine::new(image.clone(), depth)?),
            image,
            false,
            EngineKind::Mmap,
        ),
        EngineKind::ThreadPool => {
            Box::new(thread_pool::ThreadPoolEngine::new(image.clone(), depth)?)
        }
        EngineKind::IoUring => Box::new(uring::IoUringEngine::new(image.clone(), depth)?),
        EngineKind::Auto => match io_uring_availability() {
            Ok(()) => {
                log::info!(
                    "{}: block engine io_uring, cached reads copied from a mapping",
                    image.path().display()
                );
                let inner = Box::new(uring::IoUringEngine::new(image.clone(), depth)?);
                mapped::MappedReads::wrap(inner, image, true, EngineKind::IoUring)
            }
            Err(why) => {
                log::info!(
                    "{}: block engine threads (io_uring unavailable: {why}), cached reads \
                     copied from a mapping",
                    image.path().display()
                );
                let inner = Box::new(thread_pool::ThreadPoolEngine::new(image.clone(), depth)?);
                mapped::MappedReads::wrap(inner, image, true, EngineKind::ThreadPool)
            }
        },
    };
    log::debug!(
        "{}: {} engine, depth {depth}",
        image.path().display(),
        engine.kind()
    );
    Ok(engine)
}
