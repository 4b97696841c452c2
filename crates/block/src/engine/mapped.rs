//! Reads of page-cached data copied straight out of a shared mapping of the image, in front of
//! another engine that does everything else.
//!
//! For a read the page cache already holds, the system call, the kernel's page-cache lookup
//! and its iov_iter are most of the cost; a copy from a mapping of the file is what is left.
//! Measured on this host (4 KiB random reads at depth 32, polled, one I/O thread): io_uring
//! ~300k IOPS, copies from the mapping ~480k; a `mincore` check per read to learn whether the
//! page is cached brought the copies back down to ~290k, as any system call per request does.
//!
//! So residency is not asked per read, it is remembered: a page counts as cached if it was
//! when the guest first touched its 2 MiB chunk of the image (one `mincore` per chunk), or
//! once a read or write of it has gone through the inner engine (which put it in the page
//! cache), and only such pages are copied. A page first touched by the guest is read by the inner engine with the rest
//! of its batch in flight, never by a page fault on the I/O thread; a page the host evicted
//! since is read in by a fault on the I/O thread, which stalls this queue for that one read
//! (as the `sync` engine always does). `engine=mmap` copies every read (no first-touch
//! rule) in front of the `sync` engine: for images known to be cached.
//!
//! Faults cannot take the VMM down: a copy that touches a page the file no longer backs
//! (truncated under the VMM) or cannot read in (a disk error) is caught by
//! [`GuardedMapping`] and the read goes to the inner engine instead, which answers it as it
//! would any read there (zeros past the end, an I/O error).

use std::os::unix::io::RawFd;
use std::sync::Arc;

use crate::mapping::GuardedMapping;
use crate::{BlockEngine, BlockError, Completion, DiskImage, EngineKind, Request, RequestKind};

const PAGE_SHIFT: u32 = 12;
/// Pages whose residency one `mincore` learns, when the guest first touches any of them
/// (2 MiB of image). Asking costs ~130 ns a page here (the page-cache lookup), so a chunk is
/// ~70 us once; 128 MiB chunks stalled the queue ~4.5 ms at each first touch.
const CHUNK_PAGES: u64 = 512;

/// Which pages of the image are known to be in the page cache: one bit per 4 KiB page, plus
/// one per chunk saying whether the page cache was asked about it yet. A chunk starts as what
/// the page cache holds of it when the guest first touches it, so an image the host has cached
/// is copied from the start. Both bitmaps are allocated zeroed, which the kernel backs lazily:
/// a large image costs memory only where the guest goes.
struct SeenPages {
    seen: Vec<u64>,
    asked: Vec<u64>,
    residency: Vec<u8>,
}

fn test_bit(words: &[u64], bit: u64) -> bool {
    words
        .get((bit / 64) as usize)
        .is_some_and(|w| w & (1 << (bit % 64)) != 0)
}

fn set_bit(words: &mut [u64], bit: u64) {
    if let Some(w) = words.get_mut((bit / 64) as usize) {
        *w |= 1 << (bit % 64);
    }
}

impl SeenPages {
    fn new(size: u64) -> Self {
        let pages = size.div_ceil(1 << PAGE_SHIFT);
        SeenPages {
            seen: vec![0; pages.div_ceil(64) as usize],
            asked: vec![0; pages.div_ceil(CHUNK_PAGES).div_ceil(64) as usize],
            residency: Vec::new(),
        }
    }

    fn pages(offset: u64, len: u64) -> std::ops::Range<u64> {
        (offset >> PAGE_SHIFT)..(offset + len.max(1)).div_ceil(1 << PAGE_SHIFT)
    }

    /// Asks the page cache about `page`'s chunk the first time it is looked at.
    fn ask_once(&mut self, page: u64, map: &GuardedMapping) {
        let chunk = page / CHUNK_PAGES;
        if test_bit(&self.asked, chunk) || page >= self.seen.len() as u64 * 64 {
            return;
        }
        set_bit(&mut self.asked, chunk);
        let first = chunk * CHUNK_PAGES;
        let start = (first << PAGE_SHIFT) as usize;
        if map.resident(
            start,
            (CHUNK_PAGES << PAGE_SHIFT) as usize,
            &mut self.residency,
        ) {
            for (i, _) in self
                .residency
                .iter()
                .enumerate()
                .filter(|(_, b)| *b & 1 != 0)
            {
                set_bit(&mut self.seen, first + i as u64);
            }
        }
    }

    fn all(&mut self, offset: u64, len: u64, map: &GuardedMapping) -> bool {
        Self::pages(offset, len).all(|page| {
            self.ask_once(page, map);
            test_bit(&self.seen, page)
        })
    }

    fn mark(&mut self, offset: u64, len: u64, map: &GuardedMapping) {
        for page in Self::pages(offset, len) {
            self.ask_once(page, map);
            set_bit(&mut self.seen, page);
        }
    }
}

pub(crate) struct MappedReads {
    inner: Box<dyn BlockEngine>,
    image: Arc<DiskImage>,
    map: GuardedMapping,
    /// `None`: every page is copied (`engine=mmap`).
    seen: Option<SeenPages>,
    kind: EngineKind,
    /// A copy faulted: the image is not what it was (truncated, failing), and no more reads
    /// are copied from it.
    given_up: bool,
    /// Reads copied in `submit`, until the next reap.
    ready: Vec<Completion>,
}

impl MappedReads {
    /// Puts mapped reads in front of `inner`, or returns `inner` alone when the image cannot
    /// be mapped (O_DIRECT, empty, no address space or guard slot left).
    pub(crate) fn wrap(
        inner: Box<dyn BlockEngine>,
        image: &Arc<DiskImage>,
        first_touch_through_inner: bool,
        kind: EngineKind,
    ) -> Box<dyn BlockEngine> {
        let size = image.size_bytes();
        if image.direct_io_alignment().is_some() || size == 0 {
            return inner;
        }
        let Ok(len) = usize::try_from(size) else {
            return inner;
        };
        let map = match GuardedMapping::new(image.file(), len) {
            Ok(Some(map)) => map,
            Ok(None) => return inner,
            Err(e) => {
                log::info!(
                    "{}: reads go through the {} engine only (cannot map the image: {e})",
                    image.path().display(),
                    inner.kind()
                );
                return inner;
            }
        };
        Box::new(MappedReads {
            inner,
            image: image.clone(),
            map,
            seen: first_touch_through_inner.then(|| SeenPages::new(size)),
            kind,
            given_up: false,
            ready: Vec::new(),
        })
    }

    /// Copies a read whose pages are known cached; `Err` gives the request back when it must
    /// go to the inner engine (not all of it seen, or the copy faulted).
    fn try_copy(&mut self, request: Request) -> Result<Result<(), Request>, BlockError> {
        if request.kind != RequestKind::Read || self.given_up {
            return Ok(Err(request));
        }
        let len = request.validate(&self.image)?;
        let end = request.offset + len;
        if end > self.map.len() as u64
            || self
                .seen
                .as_mut()
                .is_some_and(|s| !s.all(request.offset, len, &self.map))
        {
            return Ok(Err(request));
        }
        if self.in_flight() >= self.depth() {
            return Err(BlockError::QueueFull {
                depth: self.depth(),
            });
        }
        let mut offset = request.offset as usize;
        for buffer in request.buffers.iter() {
            // SAFETY: `offset..offset + len` lies inside the mapping (checked above against
            // the image size, which is the mapping's length); the buffer is writable host memory
            // for the request's life (HostBuffer::new's contract), which is guest or test
            // memory, never this read-only file mapping; the image keeps the file open.
            let copied = unsafe { self.map.copy_to(offset, buffer.addr(), buffer.len()) };
            if copied.is_err() {
                log::warn!(
                    "{}: a page at offset {offset} is gone from the image (truncated?) or \
                     unreadable; every read goes through the {} engine from now on",
                    self.image.path().display(),
                    self.inner.kind()
                );
                self.given_up = true;
                return Ok(Err(request));
            }
            offset += buffer.len();
        }
        self.ready.push(Completion {
            user_data: request.user_data,
            result: Ok(len as u32),
        });
        Ok(Ok(()))
    }
}

impl BlockEngine for MappedReads {
    fn kind(&self) -> EngineKind {
        self.kind
    }

    fn submit(&mut self, request: Request) -> Result<(), BlockError> {
        let request = match self.try_copy(request)? {
            Ok(()) => return Ok(()),
            Err(request) => request,
        };
        if self.ready.len() + self.inner.in_flight() >= self.depth() {
            return Err(BlockError::QueueFull {
                depth: self.depth(),
            });
        }
        let touches_data = matches!(request.kind, RequestKind::Read | RequestKind::Write);
        let (offset, len) = (request.offset, request.byte_len());
        self.inner.submit(request)?;
        if touches_data {
            if let Some(seen) = &mut self.seen {
                seen.mark(offset, len, &self.map);
            }
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<(), BlockError> {
        self.inner.commit()
    }

    fn completion_fd(&self) -> RawFd {
        self.inner.completion_fd()
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.ready);
        self.inner.reap(out);
    }

    fn in_flight(&self) -> usize {
        self.ready.len() + self.inner.in_flight()
    }

    fn depth(&self) -> usize {
        self.inner.depth()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::Write;

    #[test]
    fn seen_pages_start_as_the_page_cache_holds_them_and_remember_what_is_marked() {
        let size = 2 * CHUNK_PAGES << PAGE_SHIFT;
        let mut file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        file.set_len(size).unwrap();
        // Written pages are in the page cache; the rest of the sparse file is not.
        file.write_all(&[1u8; 8192]).unwrap();
        let map = GuardedMapping::new(&file, size as usize).unwrap().unwrap();
        let mut seen = SeenPages::new(size);
        assert!(
            seen.all(0, 8192, &map),
            "cached when its chunk was first looked at"
        );
        assert!(!seen.all(0, 8193, &map));
        seen.mark(16384, 8192, &map);
        assert!(seen.all(16384, 8192, &map));
        assert!(seen.all(17000, 100, &map));
        assert!(
            !seen.all(8192, 8192, &map),
            "page 2 was neither cached nor marked"
        );
        // A range crossing into the second chunk.
        let boundary = CHUNK_PAGES << PAGE_SHIFT;
        seen.mark(boundary - 4096, 8192, &map);
        assert!(seen.all(boundary - 4096, 8192, &map));
        assert!(!seen.all(boundary, 8192, &map));
        // Past the end: never seen, and marking is ignored rather than a panic.
        seen.mark(size, 4096, &map);
        assert!(!seen.all(size, 4096, &map));
    }
}
