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
use std::time::{Duration, Instant};

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

    /// Forgets everything known: every chunk will be asked about again.
    fn forget(&mut self) {
        self.seen = vec![0; self.seen.len()];
        self.asked = vec![0; self.asked.len()];
    }

    /// Marks pages a request through the inner engine put in the page cache (a chunk asked
    /// later only adds to them).
    fn mark(&mut self, offset: u64, len: u64) {
        for page in Self::pages(offset, len) {
            set_bit(&mut self.seen, page);
        }
    }
}

/// Notices the page cache losing pages the bitmap says it holds (an image larger than the
/// memory the host gives its cache): copies that took a page fault's time, not a copy's. Then
/// the mapping only hurts (each fault reads one page with the whole queue waiting, where
/// io_uring keeps the queue's reads in flight: 25k against 56k IOPS at depth 32 with the cache
/// held to a third of the image), so reads go to the inner engine for a while, the bitmap is
/// forgotten, and the page cache is asked again afterwards. Repeated trips back off, up to a
/// minute at a time.
struct EvictionWatch {
    /// The thread's major page faults when last looked at (after a slow copy).
    major_faults: u64,
    window_start: Instant,
    slow_in_window: u32,
    off_until: Option<Instant>,
    backoff: Duration,
    last_trip: Option<Instant>,
    /// Copies until the next one is timed.
    untimed_left: u32,
}

/// A copy slower than this plus a nanosecond per byte (1 GB/s, well under a cold memcpy) may
/// have waited for the disk; it did if the thread's major-fault count moved (asked only then:
/// a system call). Other slow copies are preemption, or the first write to a huge page of
/// guest memory (zeroing 2 MiB: 30-90 us here).
const SLOW_COPY: Duration = Duration::from_micros(20);
/// One copy in this many is timed: reading the clock twice per copy was 4% of a busy I/O
/// thread's time, and a page cache that is losing the image slows most copies, not one in
/// eight.
const TIME_ONE_COPY_IN: u32 = 8;
/// Slow timed copies within [`SLOW_WINDOW`] that turn copying off.
const SLOW_COPIES_TO_TRIP: u32 = 8;
const SLOW_WINDOW: Duration = Duration::from_millis(100);
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const LONGEST_BACKOFF: Duration = Duration::from_secs(64);

impl EvictionWatch {
    fn new(now: Instant) -> Self {
        EvictionWatch {
            major_faults: 0,
            window_start: now,
            slow_in_window: 0,
            off_until: None,
            backoff: FIRST_BACKOFF,
            last_trip: None,
            untimed_left: 0,
        }
    }

    /// Whether to time the next copy (one in [`TIME_ONE_COPY_IN`]).
    fn time_this_copy(&mut self) -> bool {
        if self.untimed_left == 0 {
            self.untimed_left = TIME_ONE_COPY_IN - 1;
            true
        } else {
            self.untimed_left -= 1;
            false
        }
    }

    /// Whether copying was turned off (and not yet found due to resume).
    fn is_off(&self) -> bool {
        self.off_until.is_some()
    }

    /// Whether reads may be copied now; `now` is only asked while copying is off.
    fn copies_allowed(&mut self, now: impl FnOnce() -> Instant) -> bool {
        match self.off_until {
            Some(until) if now() < until => false,
            Some(_) => {
                self.off_until = None;
                true
            }
            None => true,
        }
    }

    /// Records a copy of `len` bytes that took `elapsed`, ending at `now`; `major_faults` reads
    /// the thread's count. Returns the pause if this turns copying off.
    fn record(
        &mut self,
        now: Instant,
        elapsed: Duration,
        len: u64,
        major_faults: impl FnOnce() -> u64,
    ) -> Option<Duration> {
        if elapsed <= SLOW_COPY + Duration::from_nanos(len) {
            return None;
        }
        let faults = major_faults();
        let waited_for_disk = faults > self.major_faults;
        self.major_faults = faults;
        if !waited_for_disk {
            return None;
        }
        if now.duration_since(self.window_start) > SLOW_WINDOW {
            self.window_start = now;
            self.slow_in_window = 0;
        }
        self.slow_in_window += 1;
        if self.slow_in_window < SLOW_COPIES_TO_TRIP {
            return None;
        }
        let tripped_recently = self
            .last_trip
            .is_some_and(|t| now.duration_since(t) < self.backoff * 4);
        self.backoff = if tripped_recently {
            (self.backoff * 2).min(LONGEST_BACKOFF)
        } else {
            FIRST_BACKOFF
        };
        self.off_until = Some(now + self.backoff);
        self.last_trip = Some(now);
        self.slow_in_window = 0;
        Some(self.backoff)
    }
}

/// The calling thread's major page faults so far (0 if unknown).
fn thread_major_faults() -> u64 {
    // SAFETY: getrusage writes one rusage, which a zeroed value is valid for.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_THREAD, &mut usage) == 0 {
            usage.ru_majflt as u64
        } else {
            0
        }
    }
}

pub(crate) struct MappedReads {
    inner: Box<dyn BlockEngine>,
    image: Arc<DiskImage>,
    map: GuardedMapping,
    /// `None`: every page is copied (`engine=mmap`).
    seen: Option<SeenPages>,
    /// Watches the copies of pages `seen` says are cached.
    evictions: EvictionWatch,
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
            evictions: EvictionWatch::new(Instant::now()),
            kind,
            given_up: false,
            ready: Vec::new(),
        })
    }

    /// Copies a read whose pages are known cached; `Err` gives the request back when it must
    /// go to the inner engine (not all of it seen, or the copy faulted).
    fn try_copy(&mut self, request: Request) -> Result<Result<(), Request>, BlockError> {
        let tracked = self.seen.is_some();
        if request.kind != RequestKind::Read
            || self.given_up
            || (tracked && !self.evictions.copies_allowed(Instant::now))
        {
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
        let started = (tracked && self.evictions.time_this_copy()).then(Instant::now);
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
        if let Some(started) = started {
            let now = Instant::now();
            if let Some(off) = self
                .evictions
                .record(now, now - started, len, thread_major_faults)
            {
                log::info!(
                    "{}: the page cache is losing the image's pages (copies waiting on the \
                     disk); reads go through the {} engine for {off:?}",
                    self.image.path().display(),
                    self.inner.kind()
                );
                if let Some(seen) = &mut self.seen {
                    seen.forget();
                }
            }
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
        if self.in_flight() >= self.depth() {
            return Err(BlockError::QueueFull {
                depth: self.depth(),
            });
        }
        let touches_data = matches!(request.kind, RequestKind::Read | RequestKind::Write);
        let (offset, len) = (request.offset, request.byte_len());
        self.inner.submit(request)?;
        if touches_data && !self.evictions.is_off() {
            if let Some(seen) = &mut self.seen {
                seen.mark(offset, len);
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
    fn eviction_watch_turns_copies_off_after_a_burst_of_disk_waits_and_backs_off_when_it_recurs() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut watch = EvictionWatch::new(t0);
        let fault = Duration::from_millis(2);
        // Each call is a new major fault: the copy waited for the disk.
        let faults = std::cell::Cell::new(0u64);
        let disk = || {
            faults.set(faults.get() + 1);
            faults.get()
        };
        // Fast copies, slow ones without a major fault (preemption, huge-page zeroing), and
        // disk waits spread thin never trip it.
        for i in 0..100 {
            assert_eq!(
                watch.record(ms(i), Duration::from_micros(3), 4096, disk),
                None
            );
        }
        for i in 0..20 {
            assert_eq!(watch.record(ms(200 + i), fault, 4096, || 0), None);
        }
        for i in 0..20 {
            assert_eq!(watch.record(ms(1000 + i * 200), fault, 4096, disk), None);
        }
        // A 128 KiB copy may take longer than a 4 KiB one before it counts as slow.
        assert_eq!(
            watch.record(ms(6000), Duration::from_micros(100), 131072, || u64::MAX),
            None
        );
        // Eight disk waits within 100 ms trip it for a second.
        for i in 0..7 {
            assert_eq!(watch.record(ms(10_000 + i), fault, 4096, disk), None);
        }
        assert_eq!(
            watch.record(ms(10_007), fault, 4096, disk),
            Some(FIRST_BACKOFF)
        );
        assert!(!watch.copies_allowed(|| ms(10_500)));
        assert!(watch.copies_allowed(|| ms(11_008)));
        // Tripping again soon after doubles the pause; much later starts over.
        for i in 0..8 {
            watch.record(ms(11_100 + i), fault, 4096, disk);
        }
        assert!(!watch.copies_allowed(|| ms(12_500)));
        assert!(watch.copies_allowed(|| ms(13_200)));
        for i in 0..8 {
            watch.record(ms(100_000 + i), fault, 4096, disk);
        }
        assert!(watch.copies_allowed(|| ms(101_100)), "a second, not four");
    }

    #[test]
    fn eviction_watch_times_the_first_copy_and_then_one_in_eight() {
        let mut watch = EvictionWatch::new(Instant::now());
        let timed: Vec<bool> = (0..24).map(|_| watch.time_this_copy()).collect();
        let expected: Vec<bool> = (0..24)
            .map(|i| i % TIME_ONE_COPY_IN as usize == 0)
            .collect();
        assert_eq!(timed, expected);
    }

    #[test]
    fn seen_pages_start_as_the_page_cache_holds_them_and_remember_what_is_marked() {
        let size = (2 * CHUNK_PAGES) << PAGE_SHIFT;
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
        seen.mark(16384, 8192);
        assert!(seen.all(16384, 8192, &map));
        assert!(seen.all(17000, 100, &map));
        assert!(
            !seen.all(8192, 8192, &map),
            "page 2 was neither cached nor marked"
        );
        // A range crossing into the second chunk.
        let boundary = CHUNK_PAGES << PAGE_SHIFT;
        seen.mark(boundary - 4096, 8192);
        assert!(seen.all(boundary - 4096, 8192, &map));
        assert!(!seen.all(boundary, 8192, &map));
        // Past the end: never seen, and marking is ignored rather than a panic.
        seen.mark(size, 4096);
        assert!(!seen.all(size, 4096, &map));
    }
}
