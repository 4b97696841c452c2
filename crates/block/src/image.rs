//! The raw image file and what its file system can do.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::format::{foreign_format, PROBE_BYTES};
use crate::BlockError;

/// Alignment assumed for `O_DIRECT` when the kernel does not report one (`statx` without
/// `STATX_DIOALIGN`): a page satisfies every file system and device in use today.
const FALLBACK_DIRECT_ALIGN: u32 = 4096;

/// How to open an image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskOptions {
    /// Open the file read-only; every write, discard and write-zeroes is refused.
    pub readonly: bool,
    /// Open with `O_DIRECT`, bypassing the host page cache. Every request's offset, length and
    /// buffer addresses must then be aligned to [`DiskImage::direct_io_alignment`]; misaligned
    /// requests are refused with [`BlockError::Misaligned`].
    pub direct: bool,
    /// The user declared the image raw (`format=raw`): its first bytes are the guest's and are
    /// not checked for another format's header.
    pub declared_raw: bool,
    /// `lock=off`: take no lock on the image (see [`DiskImage::open`]).
    pub unlocked: bool,
}

/// Alignment `O_DIRECT` requires of this image's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectIoAlignment {
    /// Every buffer's host address and length must be a multiple of this.
    pub memory: u32,
    /// Every request's byte offset and total length must be a multiple of this.
    pub offset: u32,
}

/// A raw disk image (regular file or block device), shared by every engine that serves it.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    path: PathBuf,
    size: u64,
    readonly: bool,
    direct: Option<DirectIoAlignment>,
    discard: bool,
    /// `FALLOC_FL_ZERO_RANGE` is tried first and forgotten once the file system refuses it, so
    /// later write-zeroes go straight to the fallback.
    zero_range: AtomicBool,
    /// The lock [`DiskImage::open`] took, released by hand on drop.
    locked: bool,
}

impl DiskImage {
    /// Opens the image and, unless `options.unlocked`, locks it for as long as it is open: a
    /// writable image exclusively, a read-only one shared, with an open file description lock
    /// over the whole file (what QEMU's image locking also conflicts with). Two VMs writing one
    /// image, or one reading what another writes, would corrupt or misread it; the second to
    /// come is refused instead (after [`LOCK_WAIT`], for a VM that was killed just now).
    pub fn open(path: impl AsRef<Path>, options: DiskOptions) -> Result<Self, BlockError> {
        let path = path.as_ref().to_path_buf();
        let mut open = OpenOptions::new();
        open.read(true).write(!options.readonly);
        if options.direct {
            open.custom_flags(libc::O_DIRECT);
        }
        let file = open.open(&path).map_err(|source| BlockError::Open {
            path: path.clone(),
            source,
        })?;
        let file_type = file
            .metadata()
            .map_err(|source| BlockError::Size {
                path: path.clone(),
                source,
            })?
            .file_type();
        if !file_type.is_file() && !file_type.is_block_device() {
            return Err(BlockError::NotAnImage { path });
        }
        let mut locked = false;
        if !options.unlocked {
            match lock_whole_file_waiting(&file, options.readonly) {
                Ok(()) => locked = true,
                Err(e) if held_by_another(&e) => {
                    return Err(BlockError::Locked {
                        path,
                        readonly: options.readonly,
                    })
                }
                // A file system without these locks (some network ones): serve it unlocked,
                // as QEMU does.
                Err(e) => log::warn!(
                    "{}: cannot lock the image ({e}); opened without a lock",
                    path.display()
                ),
            }
        }
        // Seeking to the end sizes block devices too, where metadata reports 0.
        let size = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.clone(),
                source,
            })?;
        let direct = options.direct.then(|| direct_io_alignment(&file));
        if !options.declared_raw {
            if let Some(format) = foreign_format(&read_header(&file, &path)?) {
                return Err(BlockError::NotRaw { path, format });
            }
        }
        let discard = !options.readonly && punch_hole_works(&file, size);
        log::debug!(
            "opened {} ({size} bytes, readonly={}, direct={:?}, discard={discard})",
            path.display(),
            options.readonly,
            direct
        );
        Ok(DiskImage {
            file,
            path,
            size,
            readonly: options.readonly,
            direct,
            discard,
            zero_range: AtomicBool::new(true),
            locked,
        })
    }

    /// The image's size in bytes, fixed when it was opened.
    pub fn size_bytes(&self) -> u64 {
        self.size
    }

    pub fn is_readonly(&self) -> bool {
        self.readonly
    }

    /// Whether this image holds its lock (not with `lock=off`, nor on a file system without
    /// such locks).
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    /// `Some` when opened with `O_DIRECT`: the alignment every request must keep.
    pub fn direct_io_alignment(&self) -> Option<DirectIoAlignment> {
        self.direct
    }

    /// The block size the device should advertise (`VIRTIO_BLK_F_BLK_SIZE`): 512 bytes, or the
    /// `O_DIRECT` offset alignment when larger, so a guest that honours it never sends a
    /// request the host would refuse.
    pub fn logical_block_size(&self) -> u32 {
        self.direct.map_or(512, |a| a.offset.max(512))
    }

    /// True when discard can be offered (`VIRTIO_BLK_F_DISCARD`): the image is writable and its
    /// file system punches holes. A discarded range reads back as zeros.
    pub fn supports_discard(&self) -> bool {
        self.discard
    }

    /// True when write-zeroes can be offered (`VIRTIO_BLK_F_WRITE_ZEROES`): any writable image,
    /// since the engines write zeros when the file system cannot zero a range itself.
    pub fn supports_write_zeroes(&self) -> bool {
        !self.readonly
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn zero_range_enabled(&self) -> bool {
        self.zero_range.load(Ordering::Relaxed)
    }

    pub(crate) fn disable_zero_range(&self) {
        if self.zero_range.swap(false, Ordering::Relaxed) {
            log::info!(
                "{}: file system refuses FALLOC_FL_ZERO_RANGE; write-zeroes will write zeros",
                self.path.display()
            );
        }
    }
}

/// The image's first [`PROBE_BYTES`] (fewer if it is shorter): one read of a whole 4 KiB block
/// into a buffer aligned for `O_DIRECT`, which the file may have been opened with (a file's
/// read comes back short only at its end).
fn read_header(file: &File, path: &Path) -> Result<Vec<u8>, BlockError> {
    #[repr(C, align(4096))]
    struct Block([u8; 4096]);
    let mut block = Box::new(Block([0; 4096]));
    let read = loop {
        match file.read_at(&mut block.0, 0) {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(BlockError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    };
    Ok(block.0[..read.min(PROBE_BYTES)].to_vec())
}

impl Drop for DiskImage {
    fn drop(&mut self) {
        // Closing the file would release the lock only once every reference to the open file
        // description is gone, and an io_uring instance keeps one until the kernel has torn it
        // down, 15-30 ms after its last fd closed: a VM started on the image right after this
        // one ended (QEMU as well) would find it still locked.
        if self.locked {
            if let Err(e) = set_lock(&self.file, libc::F_UNLCK) {
                log::warn!(
                    "{}: cannot release the image lock: {e}",
                    self.path.display()
                );
            }
        }
    }
}

/// How long a held lock is asked for again before the open is refused: a VM killed just now
/// still holds its lock until the kernel tears down its io_uring, after the process is gone
/// (15-30 ms measured here).
const LOCK_WAIT: Duration = Duration::from_secs(1);
const LOCK_RETRY: Duration = Duration::from_millis(5);

/// [`lock_whole_file`], asked again for up to [`LOCK_WAIT`] while another holds the lock.
fn lock_whole_file_waiting(file: &File, readonly: bool) -> io::Result<()> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match lock_whole_file(file, readonly) {
            Err(e) if held_by_another(&e) && Instant::now() < deadline => {
                std::thread::sleep(LOCK_RETRY)
            }
            other => return other,
        }
    }
}

/// Whether a lock request failed because another open file description holds a conflicting
/// lock (rather than because the file system has no such locks).
fn held_by_another(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES))
}

/// Takes an open file description lock on all of `file`: shared for reading, exclusive for
/// writing. It goes with the file description, so it lasts until the image is dropped.
pub(crate) fn lock_whole_file(file: &File, readonly: bool) -> io::Result<()> {
    set_lock(
        file,
        if readonly {
            libc::F_RDLCK
        } else {
            libc::F_WRLCK
        },
    )
}

/// Sets the open file description lock on all of `file` to `kind` (`F_RDLCK`, `F_WRLCK` or
/// `F_UNLCK`), without waiting.
fn set_lock(file: &File, kind: libc::c_int) -> io::Result<()> {
    // SAFETY: flock is plain old data; all-zero is a valid value (l_pid must be 0 for OFD locks).
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    // l_start 0, l_len 0: from the start to the end of the file, however it grows.
    // SAFETY: the fd is open and `lock` is a valid flock the call only reads.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn direct_io_alignment(file: &File) -> DirectIoAlignment {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: the fd is open, the path is a valid C string, `stx` is writable and sized for
    // the kernel's statx structure.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc == 0
        && stx.stx_mask & libc::STATX_DIOALIGN != 0
        && stx.stx_dio_mem_align != 0
        && stx.stx_dio_offset_align != 0
    {
        DirectIoAlignment {
            memory: stx.stx_dio_mem_align,
            offset: stx.stx_dio_offset_align,
        }
    } else {
        DirectIoAlignment {
            memory: FALLBACK_DIRECT_ALIGN,
            offset: FALLBACK_DIRECT_ALIGN,
        }
    }
}

/// Asks the file system to punch a hole just past the end of the file, which changes nothing
/// (KEEP_SIZE) but fails with EOPNOTSUPP where holes cannot be punched.
fn punch_hole_works(file: &File, size: u64) -> bool {
    let Ok(offset) = libc::off_t::try_from(size) else {
        return false;
    };
    // SAFETY: fallocate on an fd we own; the range lies beyond the data, so nothing changes.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            FALLBACK_DIRECT_ALIGN as libc::off_t,
        )
    };
    if rc != 0 {
        log::debug!(
            "punch-hole probe failed ({}); discard not offered",
            io::Error::last_os_error()
        );
    }
    rc == 0
}
