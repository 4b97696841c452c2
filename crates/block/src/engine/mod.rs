mod sync;
mod thread_pool;

use std::sync::Arc;

use crate::{BlockEngine, BlockError, DiskImage, EngineKind};

pub(crate) fn open(
    image: &Arc<DiskImage>,
    kind: EngineKind,
    depth: usize,
) -> Result<Box<dyn BlockEngine>, BlockError> {
    let engine: Box<dyn BlockEngine> = match kind {
        EngineKind::Sync => Box::new(sync::SyncEngine::new(image.clone(), depth)?),
        EngineKind::ThreadPool => {
            Box::new(thread_pool::ThreadPoolEngine::new(image.clone(), depth)?)
        }
        EngineKind::IoUring | EngineKind::Auto => {
            return Err(BlockError::EngineUnavailable(kind.name()))
        }
    };
    log::debug!(
        "{}: {} engine, depth {depth}",
        image.path().display(),
        engine.kind()
    );
    Ok(engine)
}
