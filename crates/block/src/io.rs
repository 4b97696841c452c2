//! Blocking system calls shared by the sync and thread-pool engines, and the pieces of request
//! bookkeeping the io_uring engine reuses (iovec cursors, the zero buffer).

use std::io;
use std::os::unix::io::AsRawFd;

use crate::{BlockError, DiskImage, HostBuffer, InlineVec, Request, RequestKind};

/// Bytes of zeros that write-zeroes writes from when the file system cannot zero a range.
pub(crate) const ZERO_CHUNK: usize = 64 * 1024;
/// Zero buffers per write: 1 MiB per system call.
pub(crate) const ZERO_IOVECS: usize = 16;

/// Page-aligned so it also serves `O_DIRECT` images.
#[repr(C, align(4096))]
pub(crate) struct ZeroBuffer(pub(crate) [u8; ZERO_CHUNK]);
pub(crate) static ZEROES: ZeroBuffer = ZeroBuffer([0; ZERO_CHUNK]);

/// How write-zeroes makes a range read as zeros, in the order tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ZeroMethod {
    PunchHole,
    ZeroRange,
    WriteZeros,
}

impl ZeroMethod {
    /// The first method worth trying for this image.
    pub(crate) fn first(image: &DiskImage, unmap: bool) -> ZeroMethod {
        if unmap && image.supports_discard() {
            ZeroMethod::PunchHole
        } else {
            ZeroMethod::ZeroRange.or_next(image)
        }
    }

    /// The method to fall back to when this one is refused by the file system.
    pub(crate) fn next(self, image: &DiskImage) -> ZeroMethod {
        match self {
            ZeroMethod::PunchHole => ZeroMethod::ZeroRange.or_next(image),
            ZeroMethod::ZeroRange => {
                image.disable_zero_range();
                ZeroMethod::WriteZeros
            }
            ZeroMethod::WriteZeros => ZeroMethod::WriteZeros,
        }
    }

    fn or_next(self, image: &DiskImage) -> ZeroMethod {
        if self == ZeroMethod::ZeroRange && !image.zero_range_enabled() {
            ZeroMethod::WriteZeros
        } else {
            self
        }
    }

    /// The fallocate mode, for the methods that are one.
    pub(crate) fn fallocate_mode(self) -> Option<libc::c_int> {
        match self {
            ZeroMethod::PunchHole => Some(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE),
            ZeroMethod::ZeroRange => Some(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE),
            ZeroMethod::WriteZeros => None,
        }
    }
}

/// True for the errors with which a file system says it cannot do an fallocate mode.
pub(crate) fn is_unsupported_errno(errno: i32) -> bool {
    errno == libc::EOPNOTSUPP || errno == libc::ENOTSUP || errno == libc::ENOSYS
}

/// Iovecs a cursor holds without a heap allocation (a request's usual one data buffer).
const INLINE_IOVECS: usize = 4;

/// The iovecs of a transfer, consumed from the front as bytes move.
pub(crate) struct IoVecCursor {
    iovecs: InlineVec<libc::iovec, INLINE_IOVECS>,
    start: usize,
}

impl IoVecCursor {
    fn empty() -> Self {
        IoVecCursor {
            iovecs: InlineVec::new(libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }),
            start: 0,
        }
    }

    pub(crate) fn new(buffers: &[HostBuffer]) -> Self {
        let mut cursor = IoVecCursor::empty();
        for b in buffers.iter().filter(|b| !b.is_empty()) {
            cursor.iovecs.push(libc::iovec {
                iov_base: b.addr().cast(),
                iov_len: b.len(),
            });
        }
        cursor
    }

    /// Up to 1 MiB of the zero buffer, for writing zeros over `len` bytes.
    pub(crate) fn zeroes(len: u64) -> Self {
        let mut cursor = IoVecCursor::empty();
        let mut left = len;
        while left > 0 && cursor.iovecs.len() < ZERO_IOVECS {
            let chunk = left.min(ZERO_CHUNK as u64) as usize;
            cursor.iovecs.push(libc::iovec {
                // The kernel only reads from this buffer (it backs writes).
                iov_base: ZEROES.0.as_ptr() as *mut libc::c_void,
                iov_len: chunk,
            });
            left -= chunk as u64;
        }
        cursor
    }

    pub(crate) fn remaining(&self) -> &[libc::iovec] {
        &self.iovecs[self.start..]
    }

    pub(crate) fn is_done(&self) -> bool {
        self.start == self.iovecs.len()
    }

    /// Drops the first `n` bytes.
    pub(crate) fn advance(&mut self, mut n: usize) {
        while n > 0 && self.start < self.iovecs.len() {
            let start = self.start;
            let iov = &mut self.iovecs[start];
            if n >= iov.iov_len {
                n -= iov.iov_len;
                self.start += 1;
            } else {
                // SAFETY: n < iov_len, so the new base stays inside the same buffer.
                iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(n) }.cast();
                iov.iov_len -= n;
                n = 0;
            }
        }
    }

    /// Fills what is left with zeros (a read that met the end of the file).
    pub(crate) fn zero_fill(&mut self) {
        for iov in self.remaining() {
            // SAFETY: the buffers are writable host memory for the life of the request
            // (HostBuffer::new's contract) and this is a Read, so writing them is expected.
            unsafe { std::ptr::write_bytes(iov.iov_base.cast::<u8>(), 0, iov.iov_len) };
        }
        self.start = self.iovecs.len();
    }
}

fn retryable(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN))
}

/// Runs a request to completion on the calling thread. The request must have been validated.
pub(crate) fn execute(image: &DiskImage, request: &Request, len: u64) -> Result<u32, BlockError> {
    let fd = image.file().as_raw_fd();
    match request.kind {
        RequestKind::Read => {
            let mut cursor = IoVecCursor::new(&request.buffers);
            let mut offset = request.offset;
            while !cursor.is_done() {
                let iov = cursor.remaining();
                // SAFETY: the iovecs describe writable host memory valid for the request's
                // life (HostBuffer::new's contract); their count is at most UIO_MAXIOV.
                let n = unsafe {
                    libc::preadv(
                        fd,
                        iov.as_ptr(),
                        iov.len() as libc::c_int,
                        offset as libc::off_t,
                    )
                };
                match n {
                    0 => cursor.zero_fill(),
                    n if n > 0 => {
                        cursor.advance(n as usize);
                        offset += n as u64;
                    }
                    _ => {
                        let e = io::Error::last_os_error();
                        if !retryable(&e) {
                            return Err(e.into());
                        }
                    }
                }
            }
            Ok(len as u32)
        }
        RequestKind::Write => {
            write_all(fd, IoVecCursor::new(&request.buffers), request.offset)?;
            Ok(len as u32)
        }
        RequestKind::Flush => {
            loop {
                // SAFETY: fdatasync on an fd the image owns.
                if unsafe { libc::fdatasync(fd) } == 0 {
                    break;
                }
                let e = io::Error::last_os_error();
                if !retryable(&e) {
                    return Err(e.into());
                }
            }
            Ok(0)
        }
        RequestKind::Discard => {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            fallocate(fd, mode, request.offset, len)?;
            Ok(0)
        }
        RequestKind::WriteZeroes { unmap } => {
            let mut method = ZeroMethod::first(image, unmap);
            loop {
                let Some(mode) = method.fallocate_mode() else {
                    write_zeros(fd, request.offset, len)?;
                    return Ok(0);
                };
                match fallocate(fd, mode, request.offset, len) {
                    Ok(()) => return Ok(0),
                    Err(e) if e.raw_os_error().is_some_and(is_unsupported_errno) => {
                        method = method.next(image);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
}

fn write_all(fd: libc::c_int, mut cursor: IoVecCursor, mut offset: u64) -> io::Result<()> {
    while !cursor.is_done() {
        let iov = cursor.remaining();
        // SAFETY: the iovecs describe readable host memory valid for the request's life
        // (HostBuffer::new's contract, or the static zero buffer); at most UIO_MAXIOV of them.
        let n = unsafe {
            libc::pwritev(
                fd,
                iov.as_ptr(),
                iov.len() as libc::c_int,
                offset as libc::off_t,
            )
        };
        match n {
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n if n > 0 => {
                cursor.advance(n as usize);
                offset += n as u64;
            }
            _ => {
                let e = io::Error::last_os_error();
                if !retryable(&e) {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

fn write_zeros(fd: libc::c_int, mut offset: u64, len: u64) -> io::Result<()> {
    let end = offset + len;
    while offset < end {
        let cursor = IoVecCursor::zeroes(end - offset);
        let chunk: u64 = cursor.remaining().iter().map(|v| v.iov_len as u64).sum();
        write_all(fd, cursor, offset)?;
        offset += chunk;
    }
    Ok(())
}

fn fallocate(fd: libc::c_int, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    loop {
        // SAFETY: fallocate on an fd the image owns; the range was validated against its size.
        let rc = unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if !retryable(&e) {
            return Err(e);
        }
    }
}
