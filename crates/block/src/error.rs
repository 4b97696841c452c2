use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the block layer. A request that fails with one of these is
/// answered to the guest as `VIRTIO_BLK_S_UNSUPP` when [`BlockError::is_unsupported`] says so,
/// else as `VIRTIO_BLK_S_IOERR`.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("disk image {path} is not a regular file or block device")]
    NotAnImage { path: PathBuf },
    #[error(
        "disk image {path} is a {format} image, and kickvm serves raw images only: convert it \
         (qemu-img convert -O raw), or add format=raw if it is a raw disk that starts like one"
    )]
    NotRaw { path: PathBuf, format: &'static str },
    #[error(
        "disk image {path} is {} by another process (another VM?), which holds a lock on it; \
         add lock=off to open it anyway",
        if *readonly { "being written" } else { "in use" }
    )]
    Locked { path: PathBuf, readonly: bool },
    #[error("disk image {path} cannot be read: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("disk image {path} cannot be sized: {source}")]
    Size { path: PathBuf, source: io::Error },
    #[error("the disk image is read-only; writes, discards and write-zeroes are refused")]
    ReadOnly,
    #[error("request at byte {offset:#x} for {len:#x} bytes lies beyond the end of the {size:#x}-byte image")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("request of {0} bytes exceeds the 4 GiB a single request may move")]
    TooLarge(u64),
    #[error("request has {count} buffers, more than the {max} a single request may use")]
    TooManySegments { count: usize, max: usize },
    #[error("direct I/O needs {what} aligned to {align} bytes, got {value:#x}")]
    Misaligned {
        what: &'static str,
        value: u64,
        align: u64,
    },
    #[error("{0} is not supported by this disk image's file system")]
    Unsupported(&'static str),
    #[error("the engine already has {depth} requests in flight")]
    QueueFull { depth: usize },
    #[error("the {engine} engine could not be set up: {source}")]
    EngineSetup {
        engine: &'static str,
        source: io::Error,
    },
    #[error("the {0} engine is not available on this host")]
    EngineUnavailable(&'static str),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

impl BlockError {
    /// True for a request the device should answer with `VIRTIO_BLK_S_UNSUPP` rather than
    /// `VIRTIO_BLK_S_IOERR`.
    pub fn is_unsupported(&self) -> bool {
        matches!(self, BlockError::Unsupported(_))
    }
}
