//! What the device asks of an engine, and what it gets back.

use crate::{BlockError, DiskImage, InlineVec};

/// Most buffers one request may carry (the kernel's `UIO_MAXIOV`). The device's `SEG_MAX`
/// should not exceed it.
pub const MAX_SEGMENTS: usize = libc::UIO_MAXIOV as usize;

/// One contiguous piece of host memory (normally inside guest RAM) that a request reads into
/// or writes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostBuffer {
    addr: *mut u8,
    len: usize,
}

// SAFETY: a HostBuffer is an address and a length; the contract of `HostBuffer::new` makes the
// memory valid from any thread for as long as the request that carries it is in flight.
unsafe impl Send for HostBuffer {}

impl HostBuffer {
    /// # Safety
    ///
    /// `addr..addr+len` must be mapped host memory, writable for a [`RequestKind::Read`] and
    /// readable for a [`RequestKind::Write`], from the moment the request carrying this buffer
    /// is submitted until its [`Completion`] has been reaped (or `submit` returned an error, or
    /// the engine was dropped: dropping waits for every request in flight). Nothing else may
    /// rely on its contents meanwhile: the engine reads or writes it from another thread or
    /// from the kernel. The caller (the virtio device) bounds-checks the guest's descriptors
    /// against guest memory before building these; guest memory stays mapped for the VM's
    /// life.
    ///
    /// With vm-memory, build one per region piece: `GuestMemory::get_slices(addr, len, ..)`
    /// yields `VolatileSlice`s (a buffer may cross from one region to the next), and
    /// `slice.ptr_guard_mut().as_ptr()` with `slice.len()` gives the arguments.
    pub unsafe fn new(addr: *mut u8, len: usize) -> Self {
        HostBuffer { addr, len }
    }

    pub fn addr(&self) -> *mut u8 {
        self.addr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Buffers a request holds without a heap allocation; more spill to a `Vec`.
pub const INLINE_BUFFERS: usize = 4;

/// A request's buffers, in order. Up to [`INLINE_BUFFERS`] live inline: a virtio-blk request
/// usually has one data buffer, and building it then allocates nothing.
#[derive(Debug, Clone)]
pub struct Buffers(InlineVec<HostBuffer, INLINE_BUFFERS>);

impl Buffers {
    const EMPTY: HostBuffer = HostBuffer {
        addr: std::ptr::null_mut(),
        len: 0,
    };

    pub fn new() -> Self {
        Buffers(InlineVec::new(Self::EMPTY))
    }

    pub fn push(&mut self, buffer: HostBuffer) {
        self.0.push(buffer);
    }
}

impl Default for Buffers {
    fn default() -> Self {
        Self::new()
    }
}

impl std::ops::Deref for Buffers {
    type Target = [HostBuffer];

    fn deref(&self) -> &[HostBuffer] {
        &self.0
    }
}

impl From<Vec<HostBuffer>> for Buffers {
    fn from(buffers: Vec<HostBuffer>) -> Self {
        buffers.into_iter().collect()
    }
}

impl FromIterator<HostBuffer> for Buffers {
    fn from_iter<I: IntoIterator<Item = HostBuffer>>(iter: I) -> Self {
        let mut buffers = Buffers::new();
        for b in iter {
            buffers.push(b);
        }
        buffers
    }
}

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// Fill the buffers from the image, starting at `offset`.
    Read,
    /// Write the buffers to the image, starting at `offset`.
    Write,
    /// Make every write completed so far durable (`fdatasync`). Completes only once the data
    /// is on stable storage.
    Flush,
    /// Deallocate `offset..offset+len`; it reads back as zeros afterwards.
    Discard,
    /// Make `offset..offset+len` read as zeros; `unmap` allows deallocating it.
    WriteZeroes { unmap: bool },
}

/// One block request. Read and Write move the bytes of `buffers` (in order) at `offset`;
/// Discard and WriteZeroes cover `len` bytes at `offset`; Flush uses neither.
#[derive(Debug, Clone)]
pub struct Request {
    pub kind: RequestKind,
    /// Byte offset into the image.
    pub offset: u64,
    /// Length in bytes for Discard and WriteZeroes; ignored otherwise.
    pub len: u64,
    pub buffers: Buffers,
    /// Returned untouched in the request's [`Completion`] (e.g. the descriptor chain head).
    pub user_data: u64,
}

impl Request {
    pub fn read(offset: u64, buffers: impl Into<Buffers>, user_data: u64) -> Self {
        Request {
            kind: RequestKind::Read,
            offset,
            len: 0,
            buffers: buffers.into(),
            user_data,
        }
    }

    pub fn write(offset: u64, buffers: impl Into<Buffers>, user_data: u64) -> Self {
        Request {
            kind: RequestKind::Write,
            offset,
            len: 0,
            buffers: buffers.into(),
            user_data,
        }
    }

    pub fn flush(user_data: u64) -> Self {
        Request {
            kind: RequestKind::Flush,
            offset: 0,
            len: 0,
            buffers: Buffers::new(),
            user_data,
        }
    }

    pub fn discard(offset: u64, len: u64, user_data: u64) -> Self {
        Request {
            kind: RequestKind::Discard,
            offset,
            len,
            buffers: Buffers::new(),
            user_data,
        }
    }

    pub fn write_zeroes(offset: u64, len: u64, unmap: bool, user_data: u64) -> Self {
        Request {
            kind: RequestKind::WriteZeroes { unmap },
            offset,
            len,
            buffers: Buffers::new(),
            user_data,
        }
    }

    /// Bytes the request covers in the image.
    pub fn byte_len(&self) -> u64 {
        match self.kind {
            RequestKind::Read | RequestKind::Write => {
                self.buffers.iter().map(|b| b.len as u64).sum()
            }
            RequestKind::Flush => 0,
            RequestKind::Discard | RequestKind::WriteZeroes { .. } => self.len,
        }
    }

    /// Every check an engine makes before starting a request. Returns the request's length.
    pub(crate) fn validate(&self, image: &DiskImage) -> Result<u64, BlockError> {
        let writes = !matches!(self.kind, RequestKind::Read | RequestKind::Flush);
        if writes && image.is_readonly() {
            return Err(BlockError::ReadOnly);
        }
        if self.kind == RequestKind::Discard && !image.supports_discard() {
            return Err(BlockError::Unsupported("discard"));
        }
        if self.kind == RequestKind::Flush {
            return Ok(0);
        }
        if self.buffers.len() > MAX_SEGMENTS {
            return Err(BlockError::TooManySegments {
                count: self.buffers.len(),
                max: MAX_SEGMENTS,
            });
        }
        let len = self.byte_len();
        let size = image.size_bytes();
        if self.offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(BlockError::OutOfRange {
                offset: self.offset,
                len,
                size,
            });
        }
        if matches!(self.kind, RequestKind::Read | RequestKind::Write) && len > u32::MAX as u64 {
            return Err(BlockError::TooLarge(len));
        }
        if let Some(align) = image.direct_io_alignment() {
            let misaligned = |what, value: u64, to: u32| {
                (!value.is_multiple_of(u64::from(to))).then_some(BlockError::Misaligned {
                    what,
                    value,
                    align: u64::from(to),
                })
            };
            if let Some(e) = misaligned("offset", self.offset, align.offset)
                .or_else(|| misaligned("length", len, align.offset))
            {
                return Err(e);
            }
            for b in self.buffers.iter() {
                if let Some(e) = misaligned("buffer address", b.addr as u64, align.memory)
                    .or_else(|| misaligned("buffer length", b.len as u64, align.memory))
                {
                    return Err(e);
                }
            }
        }
        Ok(len)
    }
}

/// The outcome of one request.
#[derive(Debug)]
pub struct Completion {
    pub user_data: u64,
    /// Bytes moved (Read, Write); 0 for the other kinds. A read that meets the end of the file
    /// early (the file shrank) has the rest of its buffers zero-filled and still reports the
    /// full length.
    pub result: Result<u32, BlockError>,
}
