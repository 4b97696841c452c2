//! Behaviour every engine must show, run against each of them.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::*;

/// A file under the temp dir (or `dir`), removed on drop.
pub(crate) struct TempImage {
    path: PathBuf,
}

impl TempImage {
    pub(crate) fn new(size: u64) -> Self {
        Self::in_dir(&std::env::temp_dir(), size)
    }

    pub(crate) fn in_dir(dir: &Path, size: u64) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let path = dir.join(format!(
            "kickvm-block-test-{}-{}.img",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let file = fs::File::create(&path).unwrap();
        file.set_len(size).unwrap();
        TempImage { path }
    }

    fn open(&self, options: DiskOptions) -> Arc<DiskImage> {
        Arc::new(DiskImage::open(&self.path, options).unwrap())
    }

    fn contents(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut file = fs::File::open(&self.path).unwrap();
        file.seek(SeekFrom::Start(offset)).unwrap();
        let mut data = vec![0; len];
        file.read_exact(&mut data).unwrap();
        data
    }

    /// Someone else truncates the file (the image keeps its opening size).
    fn truncate(&self, len: u64) {
        let file = fs::OpenOptions::new().write(true).open(&self.path).unwrap();
        file.set_len(len).unwrap();
    }

    fn fill(&self, offset: u64, data: &[u8]) {
        let mut file = fs::OpenOptions::new().write(true).open(&self.path).unwrap();
        file.seek(SeekFrom::Start(offset)).unwrap();
        file.write_all(data).unwrap();
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Memory aligned for `O_DIRECT`, standing in for guest RAM.
pub(crate) struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    pub(crate) fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: the layout has a non-zero size (callers never ask for 0 bytes).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        AlignedBuf { ptr, layout }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr owns layout.size() initialised bytes for the buffer's life.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }

    /// A HostBuffer over `range` of this allocation.
    pub(crate) fn host(&mut self, range: std::ops::Range<usize>) -> HostBuffer {
        assert!(range.end <= self.layout.size());
        // SAFETY: the range lies inside this allocation, which every test keeps alive until
        // the request using it has been reaped.
        unsafe { HostBuffer::new(self.ptr.add(range.start), range.len()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn fd_readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    rc == 1 && pfd.revents & libc::POLLIN != 0
}

/// Waits on the completion fd, as the device's epoll loop does, until `count` completions are
/// in; fails the test after 10 s.
fn reap_n(engine: &mut dyn BlockEngine, count: usize) -> Vec<Completion> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut out = Vec::new();
    engine.reap(&mut out);
    while out.len() < count {
        assert!(
            Instant::now() < deadline,
            "only {} of {count} completions arrived",
            out.len()
        );
        if fd_readable(engine.completion_fd(), 100) {
            engine.reap(&mut out);
        }
    }
    assert_eq!(out.len(), count, "more completions than requests");
    out
}

/// Reads the first `buf`-length bytes of the image into `buf`, poisoned with 0xAA first,
/// asserts the engine reported all of them read, and returns what arrived.
fn read_from_start<'a>(
    engine: &mut dyn BlockEngine,
    buf: &'a mut AlignedBuf,
    user_data: u64,
) -> &'a [u8] {
    let len = buf.as_mut_slice().len();
    buf.as_mut_slice().fill(0xAA);
    let request = Request::read(0, vec![buf.host(0..len)], user_data);
    assert_eq!(run_one(engine, request).unwrap() as usize, len);
    buf.as_mut_slice()
}

fn run_one(engine: &mut dyn BlockEngine, request: Request) -> Result<u32, BlockError> {
    let user_data = request.user_data;
    engine.submit(request)?;
    engine.commit().unwrap();
    let mut done = reap_n(engine, 1);
    let completion = done.pop().unwrap();
    assert_eq!(completion.user_data, user_data);
    completion.result
}

fn engine(image: &Arc<DiskImage>, kind: EngineKind, depth: u32) -> Box<dyn BlockEngine> {
    let engine = open_engine(image, kind, depth).unwrap();
    let unmappable = image.direct_io_alignment().is_some() || image.size_bytes() == 0;
    match kind {
        EngineKind::Auto => {}
        // An image that cannot be mapped is read by the engine behind the mapping.
        EngineKind::Mmap if unmappable => assert_eq!(engine.kind(), EngineKind::Sync),
        _ => assert_eq!(engine.kind(), kind),
    }
    engine
}

fn write_read_round_trip_with_several_buffers(kind: EngineKind) {
    let tmp = TempImage::new(1 << 20);
    let image = tmp.open(DiskOptions::default());
    let mut e = engine(&image, kind, 16);
    let data = pattern(1, 512 + 4096 + 1536);
    // Three pieces scattered in memory, as a guest's descriptor chain may be.
    let mut mem = AlignedBuf::new(16384);
    mem.as_mut_slice()[100..612].copy_from_slice(&data[..512]);
    mem.as_mut_slice()[4096..8192].copy_from_slice(&data[512..4608]);
    mem.as_mut_slice()[9000..10536].copy_from_slice(&data[4608..]);
    let bufs = vec![
        mem.host(100..612),
        mem.host(4096..8192),
        mem.host(9000..10536),
    ];
    assert_eq!(
        run_one(&mut *e, Request::write(8192, bufs, 7)).unwrap(),
        6144
    );
    assert_eq!(tmp.contents(8192, data.len()), data, "file holds the write");

    let mut dst = AlignedBuf::new(8192);
    let bufs = vec![
        dst.host(0..1000),
        dst.host(2000..3000),
        dst.host(4000..8144),
    ];
    assert_eq!(
        run_one(&mut *e, Request::read(8192, bufs, 8)).unwrap(),
        6144
    );
    let got = dst.as_mut_slice();
    let mut read_back = got[0..1000].to_vec();
    read_back.extend_from_slice(&got[2000..3000]);
    read_back.extend_from_slice(&got[4000..8144]);
    assert_eq!(read_back, data);
}

fn many_requests_in_flight_all_complete_with_right_data(kind: EngineKind) {
    const N: usize = 64;
    const BS: usize = 4096;
    let tmp = TempImage::new((N * BS * 2) as u64);
    let image = tmp.open(DiskOptions::default());
    let mut e = engine(&image, kind, N as u32);
    let mut src = AlignedBuf::new(N * BS);
    for i in 0..N {
        src.as_mut_slice()[i * BS..(i + 1) * BS].copy_from_slice(&pattern(i as u64 + 100, BS));
    }
    // Block i goes to slot (i * 37) % (2N): scattered, not sequential.
    let slot = |i: usize| ((i * 37) % (2 * N) * BS) as u64;
    for i in 0..N {
        let buf = src.host(i * BS..(i + 1) * BS);
        e.submit(Request::write(slot(i), vec![buf], i as u64))
            .unwrap();
    }
    assert_eq!(e.in_flight(), N);
    e.commit().unwrap();
    let mut seen: Vec<u64> = reap_n(&mut *e, N)
        .into_iter()
        .map(|c| {
            assert_eq!(c.result.unwrap(), BS as u32);
            c.user_data
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..N as u64).collect::<Vec<_>>());
    assert_eq!(e.in_flight(), 0);

    let mut dst = AlignedBuf::new(N * BS);
    for i in 0..N {
        let buf = dst.host(i * BS..(i + 1) * BS);
        e.submit(Request::read(slot(i), vec![buf], 1000 + i as u64))
            .unwrap();
    }
    e.commit().unwrap();
    for c in reap_n(&mut *e, N) {
        assert_eq!(c.result.unwrap(), BS as u32);
    }
    assert_eq!(dst.as_mut_slice(), src.as_mut_slice());
}

fn flush_completes_after_writes(kind: EngineKind) {
    let tmp = TempImage::new(1 << 20);
    let image = tmp.open(DiskOptions::default());
    let mut e = engine(&image, kind, 8);
    let mut src = AlignedBuf::new(4096);
    src.as_mut_slice().copy_from_slice(&pattern(3, 4096));
    assert_eq!(
        run_one(&mut *e, Request::write(0, vec![src.host(0..4096)], 1)).unwrap(),
        4096
    );
    assert_eq!(run_one(&mut *e, Request::flush(2)).unwrap(), 0);
    assert_eq!(tmp.contents(0, 4096), src.as_mut_slice());
}

fn discard_reads_back_as_zeros(kind: EngineKind) {
    let tmp = TempImage::new(1 << 20);
    tmp.fill(0, &pattern(4, 1 << 20));
    let image = tmp.open(DiskOptions::default());
    assert!(
        image.supports_discard(),
        "the temp dir's file system ({}) punches holes, so discard must be offered",
        std::env::temp_dir().display()
    );
    let mut e = engine(&image, kind, 8);
    assert_eq!(
        run_one(&mut *e, Request::discard(65536, 131072, 1)).unwrap(),
        0
    );
    let mut dst = AlignedBuf::new(65536 * 4);
    let bufs = vec![dst.host(0..65536 * 4)];
    run_one(&mut *e, Request::read(0, bufs, 2)).unwrap();
    let got = dst.as_mut_slice();
    let before = pattern(4, 1 << 20);
    assert_eq!(
        &got[..65536],
        &before[..65536],
        "data before the range kept"
    );
    assert!(got[65536..196608].iter().all(|&b| b == 0), "range zeroed");
    assert_eq!(&got[196608..], &before[196608..262144], "data after kept");
}

fn write_zeroes_reads_back_as_zeros(kind: EngineKind) {
    for (dir, unmap) in [
        (std::env::temp_dir(), false),
        (std::env::temp_dir(), true),
        // tmpfs refuses FALLOC_FL_ZERO_RANGE: the engine must fall back to writing zeros.
        (PathBuf::from("/dev/shm"), false),
    ] {
        let tmp = TempImage::in_dir(&dir, 4 << 20);
        let before = pattern(5, 4 << 20);
        tmp.fill(0, &before);
        let image = tmp.open(DiskOptions::default());
        assert!(image.supports_write_zeroes());
        let mut e = engine(&image, kind, 8);
        // 3 MiB + 512: more than one fallback write, and not a multiple of it.
        let (start, len) = (4096u64, (3 << 20) + 512u64);
        assert_eq!(
            run_one(&mut *e, Request::write_zeroes(start, len, unmap, 1)).unwrap(),
            0,
            "{} unmap={unmap}",
            dir.display()
        );
        let after = tmp.contents(0, 4 << 20);
        let (s, end) = (start as usize, (start + len) as usize);
        assert_eq!(&after[..s], &before[..s], "{} unmap={unmap}", dir.display());
        assert!(after[s..end].iter().all(|&b| b == 0), "{}", dir.display());
        assert_eq!(
            &after[end..],
            &before[end..],
            "{} unmap={unmap}",
            dir.display()
        );
    }
}

fn readonly_image_refuses_writes(kind: EngineKind) {
    let tmp = TempImage::new(1 << 20);
    tmp.fill(0, &pattern(6, 4096));
    let image = tmp.open(DiskOptions {
        readonly: true,
        direct: false,
        declared_raw: false,
        unlocked: false,
    });
    assert!(image.is_readonly());
    assert!(!image.supports_discard() && !image.supports_write_zeroes());
    let mut e = engine(&image, kind, 8);
    let mut src = AlignedBuf::new(4096);
    for request in [
        Request::write(0, vec![src.host(0..4096)], 1),
        Request::discard(0, 4096, 2),
        Request::write_zeroes(0, 4096, false, 3),
    ] {
        assert!(matches!(e.submit(request), Err(BlockError::ReadOnly)));
    }
    assert_eq!(e.in_flight(), 0);
    // Reads and flushes still work.
    assert_eq!(
        run_one(&mut *e, Request::read(0, vec![src.host(0..4096)], 4)).unwrap(),
        4096
    );
    assert_eq!(src.as_mut_slice(), &pattern(6, 4096)[..]);
    run_one(&mut *e, Request::flush(5)).unwrap();
    assert_eq!(tmp.contents(0, 4096), pattern(6, 4096), "file unchanged");
}

fn requests_beyond_the_end_are_refused(kind: EngineKind) {
    let size = 1 << 20;
    let tmp = TempImage::new(size);
    let image = tmp.open(DiskOptions::default());
    let mut e = engine(&image, kind, 8);
    let mut buf = AlignedBuf::new(8192);
    let refused = [
        Request::read(size - 4096, vec![buf.host(0..8192)], 1),
        Request::write(size, vec![buf.host(0..512)], 2),
        Request::read(u64::MAX - 100, vec![buf.host(0..4096)], 3),
        Request::discard(size - 512, 1024, 4),
        Request::write_zeroes(u64::MAX, 2, false, 5),
    ];
    for request in refused {
        let r = e.submit(request);
        assert!(matches!(r, Err(BlockError::OutOfRange { .. })), "{r:?}");
    }
    assert_eq!(e.in_flight(), 0);
    // The last block is still in range.
    let last = Request::read(size - 8192, vec![buf.host(0..8192)], 6);
    assert_eq!(run_one(&mut *e, last).unwrap(), 8192);
}

fn completion_fd_signals_what_finishes_after_the_reap(kind: EngineKind) {
    // O_DIRECT and 8 MiB: the write goes to the device and finishes well after the reap that
    // follows the commit, so only the completion fd can report it.
    let tmp = TempImage::new(16 << 20);
    let image = tmp.open(DiskOptions {
        readonly: false,
        direct: true,
        declared_raw: false,
        unlocked: false,
    });
    let mut e = engine(&image, kind, 8);
    assert!(!fd_readable(e.completion_fd(), 0), "idle engine signals");
    let mut buf = AlignedBuf::new(8 << 20);
    buf.as_mut_slice().fill(0x5A);
    e.submit(Request::write(0, vec![buf.host(0..8 << 20)], 1))
        .unwrap();
    e.commit().unwrap();
    let mut out = Vec::new();
    e.reap(&mut out);
    while e.in_flight() > 0 {
        assert!(
            fd_readable(e.completion_fd(), 10_000),
            "a request in flight finished without the completion fd saying so"
        );
        e.reap(&mut out);
    }
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].result.as_ref().unwrap(), &(8 << 20));
    e.reap(&mut out);
    assert!(
        !fd_readable(e.completion_fd(), 0),
        "still readable with nothing in flight"
    );
}

fn read_past_a_shrunken_end_is_zero_filled(kind: EngineKind) {
    let tmp = TempImage::new(1 << 20);
    tmp.fill(0, &pattern(7, 8192));
    let image = tmp.open(DiskOptions::default());
    let mut e = engine(&image, kind, 8);
    // Someone truncates the file behind the VMM's back; the image keeps its opening size.
    tmp.truncate(6000);
    let mut buf = AlignedBuf::new(8192);
    let data = read_from_start(&mut *e, &mut buf, 1);
    assert_eq!(&data[..6000], &pattern(7, 6000)[..]);
    assert!(data[6000..].iter().all(|&b| b == 0));
}

fn full_engine_refuses_more(kind: EngineKind) {
    let tmp = TempImage::new(1 << 20);
    let image = tmp.open(DiskOptions::default());
    let mut e = engine(&image, kind, 2);
    let mut buf = AlignedBuf::new(3 * 4096);
    e.submit(Request::read(0, vec![buf.host(0..4096)], 1))
        .unwrap();
    e.submit(Request::read(4096, vec![buf.host(4096..8192)], 2))
        .unwrap();
    let third = e.submit(Request::read(8192, vec![buf.host(8192..12288)], 3));
    assert!(
        matches!(third, Err(BlockError::QueueFull { depth: 2 })),
        "{third:?}"
    );
    e.commit().unwrap();
    reap_n(&mut *e, 2);
    assert_eq!(e.in_flight(), 0);
}

fn direct_io_round_trip_and_misaligned_refused(kind: EngineKind) {
    let tmp = TempImage::new(1 << 20);
    let image = tmp.open(DiskOptions {
        readonly: false,
        direct: true,
        declared_raw: false,
        unlocked: false,
    });
    let align = image.direct_io_alignment().expect("opened direct");
    assert!(align.memory <= 4096 && align.offset <= 4096);
    let mut e = engine(&image, kind, 8);
    let mut src = AlignedBuf::new(8192);
    src.as_mut_slice().copy_from_slice(&pattern(8, 8192));
    let bufs = vec![src.host(0..4096), src.host(4096..8192)];
    assert_eq!(
        run_one(&mut *e, Request::write(4096, bufs, 1)).unwrap(),
        8192
    );
    let mut dst = AlignedBuf::new(8192);
    assert_eq!(
        run_one(&mut *e, Request::read(4096, vec![dst.host(0..8192)], 2)).unwrap(),
        8192
    );
    assert_eq!(dst.as_mut_slice(), src.as_mut_slice());

    let off = u64::from(align.offset.max(2)) / 2;
    let misaligned_offset = Request::read(off, vec![dst.host(0..4096)], 3);
    assert!(matches!(
        e.submit(misaligned_offset),
        Err(BlockError::Misaligned { .. })
    ));
    if align.memory > 1 {
        let m = align.memory as usize / 2;
        let misaligned_buffer = Request::read(0, vec![dst.host(m..m + 4096)], 4);
        assert!(matches!(
            e.submit(misaligned_buffer),
            Err(BlockError::Misaligned { .. })
        ));
    }
}

macro_rules! engine_tests {
    ($($module:ident => $kind:expr),* $(,)?) => {$(
        mod $module {
            use super::*;
            #[test] fn write_read_round_trip_with_several_buffers() { super::write_read_round_trip_with_several_buffers($kind) }
            #[test] fn many_requests_in_flight_all_complete_with_right_data() { super::many_requests_in_flight_all_complete_with_right_data($kind) }
            #[test] fn flush_completes_after_writes() { super::flush_completes_after_writes($kind) }
            #[test] fn discard_reads_back_as_zeros() { super::discard_reads_back_as_zeros($kind) }
            #[test] fn write_zeroes_reads_back_as_zeros() { super::write_zeroes_reads_back_as_zeros($kind) }
            #[test] fn readonly_image_refuses_writes() { super::readonly_image_refuses_writes($kind) }
            #[test] fn requests_beyond_the_end_are_refused() { super::requests_beyond_the_end_are_refused($kind) }
            #[test] fn completion_fd_signals_what_finishes_after_the_reap() { super::completion_fd_signals_what_finishes_after_the_reap($kind) }
            #[test] fn read_past_a_shrunken_end_is_zero_filled() { super::read_past_a_shrunken_end_is_zero_filled($kind) }
            #[test] fn full_engine_refuses_more() { super::full_engine_refuses_more($kind) }
            #[test] fn direct_io_round_trip_and_misaligned_refused() { super::direct_io_round_trip_and_misaligned_refused($kind) }
            #[test] fn dropping_with_requests_in_flight_returns() { super::dropping_with_requests_in_flight_returns($kind) }
        }
    )*};
}

engine_tests! {
    sync => EngineKind::Sync,
    io_uring => EngineKind::IoUring,
    thread_pool => EngineKind::ThreadPool,
    mmap => EngineKind::Mmap,
    auto => EngineKind::Auto,
}

#[test]
fn buffers_keep_their_order_inline_and_once_spilled() {
    let mut mem = AlignedBuf::new(4096);
    let pieces: Vec<HostBuffer> = (0..INLINE_BUFFERS * 2 + 1)
        .map(|i| mem.host(i * 8..i * 8 + i + 1))
        .collect();
    for n in [0, 1, INLINE_BUFFERS, INLINE_BUFFERS + 1, pieces.len()] {
        let buffers: Buffers = pieces[..n].iter().copied().collect();
        assert_eq!(&buffers[..], &pieces[..n], "{n} buffers");
        let request = Request::read(0, pieces[..n].to_vec(), 1);
        assert_eq!(&request.buffers[..], &pieces[..n]);
        let cursor = crate::io::IoVecCursor::new(&request.buffers);
        let lens: Vec<usize> = cursor.remaining().iter().map(|v| v.iov_len).collect();
        assert_eq!(lens, (1..=n).collect::<Vec<_>>());
    }
}

#[test]
fn engine_kind_parses_its_names() {
    for kind in [
        EngineKind::Auto,
        EngineKind::IoUring,
        EngineKind::ThreadPool,
        EngineKind::Sync,
        EngineKind::Mmap,
    ] {
        assert_eq!(kind.name().parse::<EngineKind>(), Ok(kind));
    }
    assert!("fast".parse::<EngineKind>().is_err());
}

#[test]
fn opening_a_missing_image_names_it() {
    let err = DiskImage::open("/nonexistent/kickvm.img", DiskOptions::default()).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/kickvm.img"), "{err}");
}

#[test]
fn an_image_with_a_qcow2_header_is_refused_unless_declared_raw() {
    let tmp = TempImage::new(1 << 20);
    tmp.fill(0, b"QFI\xfb\x00\x00\x00\x03");
    for direct in [false, true] {
        let options = DiskOptions {
            readonly: false,
            direct,
            declared_raw: false,
            unlocked: false,
        };
        let err = DiskImage::open(&tmp.path, options).unwrap_err();
        assert!(
            matches!(
                err,
                BlockError::NotRaw {
                    format: "qcow2",
                    ..
                }
            ),
            "direct={direct}: {err}"
        );
        let message = err.to_string();
        assert!(
            message.contains(tmp.path.to_str().unwrap()) && message.contains("format=raw"),
            "{message}"
        );
        let declared = DiskImage::open(
            &tmp.path,
            DiskOptions {
                declared_raw: true,
                ..options
            },
        );
        assert!(declared.is_ok(), "direct={direct}: format=raw opens it");
    }
    // Raw images open, down to an empty one (nothing to recognise).
    tmp.fill(0, &[0; 8]);
    assert!(DiskImage::open(&tmp.path, DiskOptions::default()).is_ok());
    tmp.truncate(0);
    assert!(DiskImage::open(&tmp.path, DiskOptions::default()).is_ok());
}

#[test]
fn a_writable_image_is_locked_against_every_other_open_and_a_readonly_one_against_writers() {
    let tmp = TempImage::new(1 << 20);
    let open = |readonly: bool, unlocked: bool| {
        DiskImage::open(
            &tmp.path,
            DiskOptions {
                readonly,
                unlocked,
                ..DiskOptions::default()
            },
        )
    };
    let locked = |r: Result<DiskImage, BlockError>, readonly: bool| matches!(r, Err(BlockError::Locked { readonly: r, .. }) if r == readonly);
    let writer = open(false, false).unwrap();
    assert!(locked(open(false, false), false), "a second writer");
    assert!(locked(open(true, false), true), "a reader beside a writer");
    let err = open(false, false).unwrap_err().to_string();
    assert!(
        err.contains(tmp.path.to_str().unwrap()) && err.contains("lock=off"),
        "{err}"
    );
    assert!(open(false, true).is_ok(), "lock=off opens it anyway");
    drop(writer);
    let reader = open(true, false).unwrap();
    let another_reader = open(true, false).unwrap();
    assert!(locked(open(false, false), false), "a writer beside readers");
    drop((reader, another_reader));
    assert!(open(false, false).is_ok(), "the locks went with the images");
}

/// An io_uring instance keeps the image's file description alive until the kernel has torn it
/// down, after its fd is closed (~10 ms after a clean exit here, measured): the lock is
/// released by hand, so the image opens again at once.
#[test]
fn the_lock_is_gone_as_soon_as_an_image_served_by_io_uring_is_dropped() {
    let tmp = TempImage::new(1 << 20);
    let image = tmp.open(DiskOptions::default());
    let mut e = engine(&image, EngineKind::Auto, 8);
    let mut buf = AlignedBuf::new(4096);
    run_one(e.as_mut(), Request::write(0, vec![buf.host(0..4096)], 1)).unwrap();
    drop(e);
    drop(image);
    // One try, no waiting (DiskImage::open would wait out a lingering lock).
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&tmp.path)
        .unwrap();
    crate::image::lock_whole_file(&file, false).expect("the lock was released at drop");
}

#[test]
fn opening_a_directory_is_refused() {
    let err = DiskImage::open(
        std::env::temp_dir(),
        DiskOptions {
            readonly: true,
            direct: false,
            declared_raw: false,
            unlocked: false,
        },
    )
    .unwrap_err();
    assert!(matches!(err, BlockError::NotAnImage { .. }), "{err}");
}

#[test]
fn auto_picks_io_uring_when_the_host_allows_it() {
    let tmp = TempImage::new(1 << 20);
    let image = tmp.open(DiskOptions::default());
    let e = open_engine(&image, EngineKind::Auto, 8).unwrap();
    let expected = match io_uring_support() {
        Ok(()) => EngineKind::IoUring,
        Err(_) => EngineKind::ThreadPool,
    };
    assert_eq!(e.kind(), expected);
}

#[test]
fn auto_copies_cached_reads_that_stay_coherent_with_the_file_and_survive_its_truncation() {
    let tmp = TempImage::new(1 << 20);
    tmp.fill(0, &pattern(3, 16384));
    let image = tmp.open(DiskOptions::default());
    let mut e = engine(&image, EngineKind::Auto, 8);
    let mut buf = AlignedBuf::new(16384);
    // First touch goes through io_uring; the second read of the same pages is a copy.
    for _ in 0..2 {
        assert_eq!(
            read_from_start(&mut *e, &mut buf, 1),
            &pattern(3, 16384)[..]
        );
    }
    // Someone else rewrites the file: the copy sees it (same page cache).
    tmp.fill(0, &pattern(4, 16384));
    assert_eq!(
        read_from_start(&mut *e, &mut buf, 2),
        &pattern(4, 16384)[..]
    );
    // And truncates it: the copy faults (SIGBUS, caught), the inner engine zero-fills.
    tmp.truncate(4096);
    let data = read_from_start(&mut *e, &mut buf, 3);
    assert_eq!(&data[..4096], &pattern(4, 4096)[..]);
    assert!(data[4096..].iter().all(|&b| b == 0));
}

fn dropping_with_requests_in_flight_returns(kind: EngineKind) {
    let tmp = TempImage::new(4 << 20);
    let image = tmp.open(DiskOptions::default());
    let mut e = engine(&image, kind, 64);
    let mut buf = AlignedBuf::new(64 * 65536);
    for i in 0..64 {
        let b = buf.host(i * 65536..(i + 1) * 65536);
        e.submit(Request::read(i as u64 * 65536, vec![b], i as u64))
            .unwrap();
    }
    e.commit().unwrap();
    let started = Instant::now();
    drop(e);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn iovec_cursor_advances_through_partial_buffers() {
    let mut mem = AlignedBuf::new(4096);
    let bufs = [mem.host(0..100), mem.host(200..200), mem.host(300..400)];
    let mut cursor = crate::io::IoVecCursor::new(&bufs);
    assert_eq!(cursor.remaining().len(), 2, "empty buffers are dropped");
    cursor.advance(60);
    let first = cursor.remaining()[0];
    assert_eq!(first.iov_len, 40);
    assert_eq!(first.iov_base as usize, mem.host(60..60).addr() as usize);
    cursor.advance(40 + 50);
    assert_eq!(cursor.remaining().len(), 1);
    assert_eq!(cursor.remaining()[0].iov_len, 50);
    cursor.advance(50);
    assert!(cursor.is_done());
}

#[test]
fn zero_iovecs_cover_at_most_one_mebibyte() {
    let total = |len| -> u64 {
        crate::io::IoVecCursor::zeroes(len)
            .remaining()
            .iter()
            .map(|v| v.iov_len as u64)
            .sum()
    };
    assert_eq!(total(512), 512);
    assert_eq!(total(3 << 20), 1 << 20);
    assert_eq!(total((1 << 20) - 4096), (1 << 20) - 4096);
}
