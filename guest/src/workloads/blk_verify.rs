//! `workload=blk-verify seed=N [loops=N]`: writes a known pattern to every
//! virtio-blk disk, flushes, reads it back and compares; checks DISCARD and
//! WRITE_ZEROES; checks that a read-only disk refuses writes.
//!
//! The pattern (the host-side test recomputes it; keep it stable):
//! sector `s` (512 bytes) of disk `d` (index in PCI bus/device/function
//! order among virtio-blk functions) for seed `n` is 64 little-endian u64
//! words. With `state = n * 0x9E3779B97F4A7C15 ^ (d << 56) ^ s` (wrapping),
//! words 0..62 are successive splitmix64 outputs of `state`:
//! `state += 0x9E3779B97F4A7C15; z = state; z = (z ^ z >> 30) *
//! 0xBF58476D1CE4E5B9; z = (z ^ z >> 27) * 0x94D049BB133111EB; z ^ z >> 31`,
//! and word 63 is the XOR of words 0..62 (the block's checksum).
//!
//! Which sectors are written: the disk is cut into 64 KiB extents (128
//! sectors; the last may be short). A disk of at most 64 MiB gets every
//! extent. A larger one gets extents `e` with `e % stride == 0`, where
//! `stride = ceil(extents / 1024)`, plus the last extent. Loop `k` (of
//! `loops`, default 1) writes with seed `seed + k`, so the image ends up
//! holding the pattern for `seed + loops - 1` in those sectors, and the
//! rest of the disk is untouched. The DISCARD / WRITE_ZEROES checks work
//! on sectors of extent 0 and rewrite the pattern there afterwards.
//!
//! A press of the ACPI power button (the host's `vm.shutdown`) ends the loops
//! early: each disk finishes the loop it is in (at least one), the RESULT line
//! ends with `shutdown=power-button`, and the guest powers off.
//!
//! After each FLUSH completes: `FLUSHED disk=D loop=K`. With `hold=1` the
//! guest then spins at CPL3 forever, printing nothing, so a host-side test
//! can kill the VMM while the disk holds exactly loop 0's flushed pattern.
//!
//! `max_lat_us` in the RESULT line: the slowest read or write of the pattern
//! passes, from submission to completion (time the VM spent paused included).

use super::disks::{self, Failure};
use crate::blk::{self, Disk, Request, SECTOR, S_IOERR, S_OK};
use crate::boot::MAX_CPUS;
use crate::{dma, power_button, println, smp, tsc, x86, Boot};
use core::sync::atomic::{AtomicU64, Ordering};

/// The slowest request of the run, submit to completion, in TSC ticks (`max_lat_us`).
static MAX_LATENCY_TICKS: AtomicU64 = AtomicU64::new(0);

const EXTENT_SECTORS: u64 = 128;
const EXTENT_BYTES: u32 = (EXTENT_SECTORS * SECTOR) as u32;
const ALL_EXTENTS_UP_TO: u64 = 1024;
const WORDS: usize = (SECTOR / 8) as usize;
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The pattern of one sector, as documented above.
pub fn fill_sector(seed: u64, disk: u64, sector: u64, out: &mut [u64; WORDS]) {
    let mut state = seed.wrapping_mul(GOLDEN) ^ (disk << 56) ^ sector;
    let mut checksum = 0;
    for word in out.iter_mut().take(WORDS - 1) {
        state = state.wrapping_add(GOLDEN);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        *word = z;
        checksum ^= z;
    }
    out[WORDS - 1] = checksum;
}

/// The extents a disk of `capacity` sectors gets written.
#[derive(Clone, Copy)]
struct Extents {
    capacity: u64,
    total: u64,
    stride: u64,
}

impl Extents {
    fn new(capacity: u64) -> Extents {
        let total = capacity.div_ceil(EXTENT_SECTORS);
        let stride = if total <= ALL_EXTENTS_UP_TO {
            1
        } else {
            total.div_ceil(ALL_EXTENTS_UP_TO)
        };
        Extents {
            capacity,
            total,
            stride,
        }
    }

    fn regular(&self) -> u64 {
        self.total.div_ceil(self.stride)
    }

    fn count(&self) -> u64 {
        let last_is_regular = self.total == 0 || (self.total - 1).is_multiple_of(self.stride);
        self.regular() + if last_is_regular { 0 } else { 1 }
    }

    /// Sector range of the `j`-th written extent.
    fn nth(&self, j: u64) -> (u64, u64) {
        let e = if j < self.regular() {
            j * self.stride
        } else {
            self.total - 1
        };
        let start = e * EXTENT_SECTORS;
        (start, (start + EXTENT_SECTORS).min(self.capacity))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Write,
    Verify,
}

struct Job<'a> {
    disk: &'a Disk,
    disk_index: u64,
    seed: u64,
    phase: Phase,
    extents: Extents,
    threads: u64,
    io_bytes: u32,
    buffers: [u64; MAX_CPUS],
    blocks: AtomicU64,
    errors: AtomicU64,
}

impl Job<'_> {
    // Each CPU touches only its own buffer, and one borrow at a time.
    #[allow(clippy::mut_from_ref)]
    fn buffer(&self, cpu: usize) -> &mut [u64] {
        // SAFETY: each CPU has its own EXTENT_BYTES buffer.
        unsafe {
            core::slice::from_raw_parts_mut(
                self.buffers[cpu] as *mut u64,
                EXTENT_BYTES as usize / 8,
            )
        }
    }

    fn error(&self, what: &str, sector: u64, status: Option<u8>) {
        if self.errors.fetch_add(1, Ordering::Relaxed) < 8 {
            match status {
                Some(s) => println!(
                    "ERROR disk={} sector={} {} status={}",
                    self.disk_index, sector, what, s
                ),
                None => println!("ERROR disk={} sector={} {}", self.disk_index, sector, what),
            }
        }
    }

    /// Writes or reads `[start, end)` through CPU `cpu`'s buffer.
    fn transfer(&self, cpu: usize, kind: u32, start: u64, end: u64) -> bool {
        let queue = self.disk.queue(cpu);
        let buf = self.buffers[cpu];
        let mut sector = start;
        let mut ok = true;
        while sector < end {
            let sectors = (end - sector).min(self.io_bytes as u64 / SECTOR);
            let req = Request {
                kind,
                sector,
                buf: buf + (sector - start) * SECTOR,
                len: (sectors * SECTOR) as u32,
            };
            let started = x86::rdtsc();
            let result = queue.run(&req);
            MAX_LATENCY_TICKS.fetch_max(x86::rdtsc().wrapping_sub(started), Ordering::Relaxed);
            match result {
                Ok(S_OK) => {}
                Ok(status) => {
                    self.error(
                        if kind == blk::T_OUT {
                            "write-failed"
                        } else {
                            "read-failed"
                        },
                        sector,
                        Some(status),
                    );
                    ok = false;
                }
                Err(()) => {
                    self.error("timeout", sector, None);
                    ok = false;
                }
            }
            sector += sectors;
        }
        ok
    }

    /// Fills the buffer with the pattern for `[start, end)`.
    fn fill(&self, cpu: usize, start: u64, end: u64) {
        let buffer = self.buffer(cpu);
        for (i, sector) in (start..end).enumerate() {
            let words: &mut [u64; WORDS] = (&mut buffer[i * WORDS..(i + 1) * WORDS])
                .try_into()
                .expect("a sector is WORDS words");
            fill_sector(self.seed, self.disk_index, sector, words);
        }
    }

    /// Compares the buffer with the pattern for `[start, end)`.
    fn check(&self, cpu: usize, start: u64, end: u64) {
        let buffer = self.buffer(cpu);
        let mut expected = [0u64; WORDS];
        for (i, sector) in (start..end).enumerate() {
            fill_sector(self.seed, self.disk_index, sector, &mut expected);
            if buffer[i * WORDS..(i + 1) * WORDS] != expected {
                self.error("mismatch", sector, None);
            } else {
                self.blocks.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn extent(&self, cpu: usize, start: u64, end: u64) {
        match self.phase {
            Phase::Write => {
                self.fill(cpu, start, end);
                self.transfer(cpu, blk::T_OUT, start, end);
            }
            Phase::Verify => {
                // Poison first so a read that transfers nothing cannot pass.
                self.buffer(cpu).fill(0xDEAD_BEEF_DEAD_BEEF);
                if self.transfer(cpu, blk::T_IN, start, end) {
                    self.check(cpu, start, end);
                }
            }
        }
    }
}

fn thread(cpu: usize, arg: usize) {
    // SAFETY: `arg` is the `Job` that `run_on_all` keeps alive until every
    // thread returned.
    let job = unsafe { &*(arg as *const Job) };
    let mut j = cpu as u64;
    while j < job.extents.count() {
        let (start, end) = job.extents.nth(j);
        job.extent(cpu, start, end);
        j += job.threads;
    }
}

fn run_phase(job: &mut Job, phase: Phase) {
    job.phase = phase;
    smp::run_on_all(thread, job as *const Job as usize);
}

/// Outcome of the DISCARD / WRITE_ZEROES checks on one disk.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RangeCheck {
    Unsupported,
    Zeroed,
    /// DISCARD succeeded but the data stayed (the spec allows it).
    Kept,
    Failed,
    /// Disks disagreed (one zeroed, another kept).
    Mixed,
}

impl RangeCheck {
    fn name(self) -> &'static str {
        match self {
            RangeCheck::Unsupported => "unsupported",
            RangeCheck::Zeroed => "zeroed",
            RangeCheck::Kept => "kept",
            RangeCheck::Failed => "failed",
            RangeCheck::Mixed => "mixed",
        }
    }
}

/// Sends DISCARD or WRITE_ZEROES over `[start, start + n)`, reads it back,
/// then restores the pattern there.
fn check_range(job: &Job, kind: u32, start: u64, n: u64) -> RangeCheck {
    let queue = job.disk.queue(0);
    let req = Request {
        kind,
        sector: start,
        buf: 0,
        len: (n * SECTOR) as u32,
    };
    match queue.run(&req) {
        Ok(S_OK) => {}
        Ok(status) => {
            job.error(
                if kind == blk::T_DISCARD {
                    "discard-failed"
                } else {
                    "write-zeroes-failed"
                },
                start,
                Some(status),
            );
            return RangeCheck::Failed;
        }
        Err(()) => {
            job.error("timeout", start, None);
            return RangeCheck::Failed;
        }
    }
    job.buffer(0).fill(0xDEAD_BEEF_DEAD_BEEF);
    if !job.transfer(0, blk::T_IN, start, start + n) {
        return RangeCheck::Failed;
    }
    let zero = job.buffer(0)[..(n * SECTOR / 8) as usize]
        .iter()
        .all(|&w| w == 0);
    let result = match (zero, kind) {
        (true, _) => RangeCheck::Zeroed,
        (false, blk::T_DISCARD) => RangeCheck::Kept,
        (false, _) => {
            job.error("write-zeroes-not-zero", start, None);
            RangeCheck::Failed
        }
    };
    job.fill(0, start, start + n);
    job.transfer(0, blk::T_OUT, start, start + n);
    job.buffer(0).fill(0);
    if job.transfer(0, blk::T_IN, start, start + n) {
        job.check(0, start, start + n);
    }
    result
}

/// Merges per-disk outcomes into one word for the RESULT line.
fn merge(a: Option<RangeCheck>, b: RangeCheck) -> Option<RangeCheck> {
    match a {
        None => Some(b),
        Some(x) if x == b => Some(x),
        Some(RangeCheck::Failed) => Some(RangeCheck::Failed),
        Some(_) if b == RangeCheck::Failed => Some(RangeCheck::Failed),
        Some(_) => Some(RangeCheck::Mixed),
    }
}

#[derive(Default)]
struct Totals {
    disks: u64,
    blocks: u64,
    errors: u64,
    ro_disks: u64,
    ro_refused: u64,
    flushes: u64,
}

/// A read-only disk must fail a write with IOERR and keep its data.
fn check_read_only(job: &Job, totals: &mut Totals) {
    totals.ro_disks += 1;
    let sectors = job.disk.capacity.min(8);
    if sectors == 0 {
        return;
    }
    job.buffer(0).fill(0);
    if !job.transfer(0, blk::T_IN, 0, sectors) {
        return;
    }
    let mut before = [0u64; 8 * WORDS];
    before[..(sectors as usize) * WORDS]
        .copy_from_slice(&job.buffer(0)[..(sectors as usize) * WORDS]);
    job.fill(0, 0, sectors);
    let req = Request {
        kind: blk::T_OUT,
        sector: 0,
        buf: job.buffers[0],
        len: (sectors * SECTOR) as u32,
    };
    match job.disk.queue(0).run(&req) {
        Ok(S_IOERR) => totals.ro_refused += 1,
        Ok(status) => job.error("read-only-write-not-refused", 0, Some(status)),
        Err(()) => job.error("timeout", 0, None),
    }
    job.buffer(0).fill(0);
    if job.transfer(0, blk::T_IN, 0, sectors)
        && job.buffer(0)[..(sectors as usize) * WORDS] != before[..(sectors as usize) * WORDS]
    {
        job.error("read-only-data-changed", 0, None);
    }
}

/// GET_ID: the device's serial, printed on an `ID` line.
fn read_id(job: &Job) {
    let req = Request {
        kind: blk::T_GET_ID,
        sector: 0,
        buf: job.buffers[0],
        len: blk::GET_ID_BYTES,
    };
    job.buffer(0).fill(0);
    match job.disk.queue(0).run(&req) {
        Ok(S_OK) => {
            // SAFETY: the buffer holds at least GET_ID_BYTES bytes.
            let bytes = unsafe {
                core::slice::from_raw_parts(job.buffers[0] as *const u8, blk::GET_ID_BYTES as usize)
            };
            let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            let id = core::str::from_utf8(&bytes[..len]).unwrap_or("?");
            println!(
                "ID disk={} id={}",
                job.disk_index,
                if id.is_empty() { "-" } else { id }
            );
        }
        Ok(blk::S_UNSUPP) => println!("ID disk={} id=unsupported", job.disk_index),
        Ok(status) => job.error("get-id-failed", 0, Some(status)),
        Err(()) => job.error("timeout", 0, None),
    }
}

pub fn run(boot: &Boot) -> bool {
    const NAME: &str = "blk-verify";
    let seed = match boot.cmdline.number("seed", 1) {
        Ok(s) => s,
        Err(_) => return disks::report_failure(NAME, &Failure::bad_argument("seed")),
    };
    let loops = match boot.cmdline.number("loops", 1) {
        Ok(l) if l >= 1 => l,
        _ => return disks::report_failure(NAME, &Failure::bad_argument("loops")),
    };
    let hold = match boot.cmdline.number("hold", 0) {
        Ok(h) if h <= 1 => h == 1,
        _ => return disks::report_failure(NAME, &Failure::bad_argument("hold")),
    };
    let opts = match disks::options(&boot.cmdline, EXTENT_BYTES) {
        Ok(o) => o,
        Err(f) => return disks::report_failure(NAME, &f),
    };
    let all = match disks::open_all(&opts, disks::MAX_DISKS) {
        Ok(d) => d,
        Err(f) => return disks::report_failure(NAME, &f),
    };
    let threads = smp::online();
    let mut buffers = [0u64; MAX_CPUS];
    for b in buffers.iter_mut().take(threads) {
        match dma::alloc(EXTENT_BYTES as usize, 4096) {
            Some(block) => *b = dma::phys(&block[0]),
            None => {
                return disks::report_failure(
                    NAME,
                    &Failure {
                        reason: "out-of-memory",
                        detail: "",
                    },
                )
            }
        }
    }
    let mut totals = Totals::default();
    let mut discard = None;
    let mut write_zeroes = None;
    for (index, disk) in all.iter().enumerate() {
        totals.disks += 1;
        let mut job = Job {
            disk,
            disk_index: index as u64,
            seed,
            phase: Phase::Write,
            extents: Extents::new(disk.capacity),
            threads: threads as u64,
            io_bytes: EXTENT_BYTES,
            buffers,
            blocks: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        };
        read_id(&job);
        if disk.read_only {
            check_read_only(&job, &mut totals);
        } else {
            for k in 0..loops {
                job.seed = seed.wrapping_add(k);
                run_phase(&mut job, Phase::Write);
                if disk.has(blk::F_FLUSH) {
                    let flush = Request {
                        kind: blk::T_FLUSH,
                        sector: 0,
                        buf: 0,
                        len: 0,
                    };
                    match disk.queue(0).run(&flush) {
                        Ok(S_OK) => {
                            totals.flushes += 1;
                            println!("FLUSHED disk={} loop={}", index, k);
                            if hold {
                                // The host kills the VM now; nothing after this may touch a disk.
                                loop {
                                    x86::pause();
                                }
                            }
                        }
                        Ok(status) => job.error("flush-failed", 0, Some(status)),
                        Err(()) => job.error("timeout", 0, None),
                    }
                }
                run_phase(&mut job, Phase::Verify);
                if power_button::pressed() {
                    break;
                }
            }
            let verified = job.blocks.load(Ordering::Relaxed);
            // Ranges inside extent 0, aligned as the device asks.
            let align = (disk.discard_alignment as u64).max(8);
            let n = 16u64.div_ceil(align) * align;
            let discard_start = align;
            let zeroes_start = discard_start + n;
            let fits = |start: u64, max: u32| {
                start + n <= disk.capacity.min(EXTENT_SECTORS) && n <= max as u64
            };
            let d = if disk.has(blk::F_DISCARD) && fits(discard_start, disk.max_discard_sectors) {
                check_range(&job, blk::T_DISCARD, discard_start, n)
            } else {
                RangeCheck::Unsupported
            };
            let w = if disk.has(blk::F_WRITE_ZEROES)
                && fits(zeroes_start, disk.max_write_zeroes_sectors)
            {
                check_range(&job, blk::T_WRITE_ZEROES, zeroes_start, n)
            } else {
                RangeCheck::Unsupported
            };
            // The range checks re-verify a few sectors; `blocks` counts the
            // main passes only.
            job.blocks.store(verified, Ordering::Relaxed);
            discard = merge(discard, d);
            write_zeroes = merge(write_zeroes, w);
        }
        totals.blocks += job.blocks.load(Ordering::Relaxed);
        totals.errors += job.errors.load(Ordering::Relaxed);
    }
    let kicks: u64 = all.iter().map(|d| d.kicks()).sum();
    let waits: u64 = all.iter().map(|d| d.interrupts_waited()).sum();
    let interrupts = blk::interrupts_taken_by(all.iter());
    let ok = totals.errors == 0 && totals.ro_refused == totals.ro_disks;
    println!(
        "RESULT workload={} status={} disks={} blocks={} errors={} ro_disks={} ro_refused={} discard={} write_zeroes={} flushes={} threads={} kicks={} irqs={} max_lat_us={} transport={} completion={} interrupts={} irq={}{}",
        NAME,
        if ok { "ok" } else { "fail" },
        totals.disks,
        totals.blocks,
        totals.errors,
        totals.ro_disks,
        totals.ro_refused,
        discard.map_or("n/a", |r| r.name()),
        write_zeroes.map_or("n/a", |r| r.name()),
        totals.flushes,
        threads,
        kicks,
        waits,
        tsc::ticks_to_ns(MAX_LATENCY_TICKS.load(Ordering::Relaxed)) / 1000,
        if opts.either_transport { "auto" } else { opts.kind.name() },
        opts.completion.name(),
        interrupts,
        opts.irq_name(),
        if power_button::pressed() { " shutdown=power-button" } else { "" },
    );
    ok
}
