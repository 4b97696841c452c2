//! `workload=blk-bench rw=randread|randwrite|read|write bs=N qd=N secs=N`:
//! I/O on the first virtio-blk disk from one thread per vCPU, each with its
//! own queue when the device has enough (multiqueue), else sharing them;
//! `qd` requests in flight per thread.

use super::disks::{self, Failure};
use crate::blk::{self, Disk, Request, SubmitError, SECTOR, S_OK};
use crate::boot::MAX_CPUS;
use crate::{dma, println, smp, tsc, x86, Boot};
use core::sync::atomic::{AtomicU64, Ordering};

const MAX_BLOCK_BYTES: u64 = 1 << 20;
const MAX_DEPTH: usize = 256;
/// Latency histogram: 1 µs buckets below 1 ms, 100 µs buckets to 100 ms.
const FINE_BUCKETS: u64 = 1000;
const COARSE_STEP_US: u64 = 100;
const BUCKETS: usize = 1000 + 990 + 1;

fn bucket(us: u64) -> usize {
    if us < FINE_BUCKETS {
        us as usize
    } else {
        (FINE_BUCKETS + (us - FINE_BUCKETS) / COARSE_STEP_US).min(BUCKETS as u64 - 1) as usize
    }
}

fn bucket_us(b: usize) -> u64 {
    let b = b as u64;
    if b < FINE_BUCKETS {
        b
    } else {
        FINE_BUCKETS + (b - FINE_BUCKETS) * COARSE_STEP_US
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pattern {
    RandRead,
    RandWrite,
    Read,
    Write,
}

impl Pattern {
    fn parse(s: &str) -> Option<Pattern> {
        match s {
            "randread" => Some(Pattern::RandRead),
            "randwrite" => Some(Pattern::RandWrite),
            "read" => Some(Pattern::Read),
            "write" => Some(Pattern::Write),
            _ => None,
        }
    }

    fn writes(self) -> bool {
        matches!(self, Pattern::RandWrite | Pattern::Write)
    }

    fn random(self) -> bool {
        matches!(self, Pattern::RandRead | Pattern::RandWrite)
    }
}

struct ThreadStats {
    ops: AtomicU64,
    errors: AtomicU64,
    timeouts: AtomicU64,
    elapsed_ns: AtomicU64,
    histogram: u64,
}

struct Job<'a> {
    disk: &'a Disk,
    pattern: Pattern,
    block_bytes: u64,
    depth: usize,
    threads: usize,
    start_tsc: u64,
    deadline_tsc: u64,
    buffers: [u64; MAX_CPUS],
    stats: [ThreadStats; MAX_CPUS],
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// One thread's requests in flight and what it has measured.
struct Flight<'a> {
    started: [u64; MAX_DEPTH],
    buffer_of_slot: [usize; MAX_DEPTH],
    free_buffers: [usize; MAX_DEPTH],
    free_count: usize,
    /// Slots in flight, tracked only on a queue shared with other threads.
    own: [u16; MAX_DEPTH],
    own_count: usize,
    histogram: &'a mut [u32],
    ops: u64,
    errors: u64,
}

impl Flight<'_> {
    fn complete(&mut self, slot: u16, status: u8) {
        let us = tsc::ticks_to_ns(x86::rdtsc() - self.started[slot as usize]) / 1000;
        self.histogram[bucket(us)] += 1;
        self.free_buffers[self.free_count] = self.buffer_of_slot[slot as usize];
        self.free_count += 1;
        self.ops += 1;
        if status != S_OK {
            self.errors += 1;
        }
    }

    /// Completes this thread's slots that any thread harvested.
    fn collect_shared(&mut self, queue: &blk::BlkQueue) -> usize {
        queue.reap_shared();
        let mut done = 0;
        let mut i = 0;
        while i < self.own_count {
            let slot = self.own[i];
            if let Some(status) = queue.take_if_done(slot) {
                self.complete(slot, status);
                self.own_count -= 1;
                self.own[i] = self.own[self.own_count];
                done += 1;
            } else {
                i += 1;
            }
        }
        done
    }
}

fn thread(cpu: usize, arg: usize) {
    // SAFETY: `arg` is the `Job` that `run_on_all` keeps alive until every
    // thread returned.
    let job = unsafe { &*(arg as *const Job) };
    if cpu >= job.threads {
        return;
    }
    let stats = &job.stats[cpu];
    let queue = job.disk.queue(cpu);
    let shared = job.threads > job.disk.queue_count;
    let blocks = job.disk.capacity * SECTOR / job.block_bytes;
    let (region_start, region_len) = if job.pattern.random() {
        (0, blocks)
    } else {
        let per = (blocks / job.threads as u64).max(1);
        (per * cpu as u64, per)
    };
    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ ((cpu as u64 + 1) << 32);
    let mut cursor = 0u64;
    let kind = if job.pattern.writes() {
        blk::T_OUT
    } else {
        blk::T_IN
    };
    let mut flight = Flight {
        started: [0; MAX_DEPTH],
        buffer_of_slot: [0; MAX_DEPTH],
        free_buffers: [0; MAX_DEPTH],
        free_count: job.depth,
        own: [0; MAX_DEPTH],
        own_count: 0,
        // SAFETY: each thread has its own BUCKETS-entry histogram.
        histogram: unsafe { core::slice::from_raw_parts_mut(stats.histogram as *mut u32, BUCKETS) },
        ops: 0,
        errors: 0,
    };
    for (i, b) in flight.free_buffers.iter_mut().enumerate().take(job.depth) {
        *b = i;
    }
    let mut timeouts = 0u64;
    while x86::rdtsc() < job.start_tsc {
        x86::pause();
    }
    loop {
        let submitting = x86::rdtsc() < job.deadline_tsc;
        let mut submitted = false;
        while submitting && flight.free_count > 0 {
            let block = if job.pattern.random() {
                region_start + xorshift(&mut rng) % region_len
            } else {
                let b = region_start + cursor;
                cursor = (cursor + 1) % region_len;
                b
            };
            let buffer = flight.free_buffers[flight.free_count - 1];
            let req = Request {
                kind,
                sector: block * job.block_bytes / SECTOR,
                buf: job.buffers[cpu] + buffer as u64 * job.block_bytes,
                len: job.block_bytes as u32,
            };
            match queue.submit(&req) {
                Ok(slot) => {
                    flight.free_count -= 1;
                    flight.started[slot as usize] = x86::rdtsc();
                    flight.buffer_of_slot[slot as usize] = buffer;
                    if shared {
                        flight.own[flight.own_count] = slot;
                        flight.own_count += 1;
                    }
                    submitted = true;
                }
                Err(SubmitError::Full) => break,
                Err(SubmitError::TooLarge) => {
                    flight.errors += 1;
                    break;
                }
            }
        }
        if submitted {
            queue.publish();
        }
        if flight.free_count == job.depth {
            if !submitting {
                break;
            }
            continue;
        }
        let completed = if shared {
            flight.collect_shared(queue)
        } else {
            queue.reap(|slot, status| flight.complete(slot, status))
        };
        if completed == 0 {
            let waited = if shared {
                let own = &flight.own[..flight.own_count];
                queue.wait_until(&|| own.iter().any(|&slot| queue.is_done(slot)))
            } else {
                queue.wait()
            };
            if !waited {
                timeouts += 1;
                break;
            }
        }
    }
    stats.ops.store(flight.ops, Ordering::Relaxed);
    stats.errors.store(flight.errors, Ordering::Relaxed);
    stats.timeouts.store(timeouts, Ordering::Relaxed);
    stats.elapsed_ns.store(
        tsc::ticks_to_ns(x86::rdtsc() - job.start_tsc),
        Ordering::Relaxed,
    );
}

fn percentile(histogram: &[u64], total: u64, fraction_per_mille: u64) -> u64 {
    let target = (total * fraction_per_mille).div_ceil(1000).max(1);
    let mut seen = 0;
    for (b, &count) in histogram.iter().enumerate() {
        seen += count;
        if seen >= target {
            return bucket_us(b);
        }
    }
    0
}

pub fn run(boot: &Boot) -> bool {
    const NAME: &str = "blk-bench";
    let bad = |key: &'static str| {
        disks::report_failure(
            NAME,
            &Failure {
                reason: "bad-argument",
                detail: key,
            },
        )
    };
    let Some(pattern) = Pattern::parse(boot.cmdline.get_or("rw", "randread")) else {
        return bad("rw");
    };
    let block_bytes = match boot.cmdline.number("bs", 4096) {
        Ok(b) if b >= SECTOR && b % SECTOR == 0 && b <= MAX_BLOCK_BYTES => b,
        _ => return bad("bs"),
    };
    let qd = match boot.cmdline.number("qd", 1) {
        Ok(q) if (1..=MAX_DEPTH as u64).contains(&q) => q as usize,
        _ => return bad("qd"),
    };
    let secs = match boot.cmdline.number("secs", 5) {
        Ok(s) if s >= 1 => s,
        _ => return bad("secs"),
    };
    let opts = match disks::options(&boot.cmdline, block_bytes as u32) {
        Ok(o) => o,
        Err(f) => return disks::report_failure(NAME, &f),
    };
    let all = match disks::open_all(&opts, 1) {
        Ok(d) => d,
        Err(f) => return disks::report_failure(NAME, &f),
    };
    let Some(disk) = all.iter().next() else {
        return bad("disk");
    };
    if disk.capacity * SECTOR < block_bytes {
        return disks::report_failure(
            NAME,
            &Failure {
                reason: "disk-too-small",
                detail: "",
            },
        );
    }
    if pattern.writes() && disk.read_only {
        return disks::report_failure(
            NAME,
            &Failure {
                reason: "read-only-disk",
                detail: "",
            },
        );
    }
    // Threads beyond the device's queues share them; each gets its share
    // of a queue's entries.
    let threads = smp::online();
    let sharers = threads.div_ceil(disk.queue_count);
    let depth = qd.min(disk.queue(0).capacity() as usize / sharers).max(1);
    let mut job = Job {
        disk,
        pattern,
        block_bytes,
        depth,
        threads,
        start_tsc: 0,
        deadline_tsc: 0,
        buffers: [0; MAX_CPUS],
        stats: [const {
            ThreadStats {
                ops: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                timeouts: AtomicU64::new(0),
                elapsed_ns: AtomicU64::new(0),
                histogram: 0,
            }
        }; MAX_CPUS],
    };
    for cpu in 0..threads {
        let buffers = dma::alloc((block_bytes as usize) * depth, 4096);
        let histogram = dma::alloc(BUCKETS * 4, 64);
        match (buffers, histogram) {
            (Some(b), Some(h)) => {
                job.buffers[cpu] = dma::phys(&b[0]);
                job.stats[cpu].histogram = dma::phys(&h[0]);
            }
            _ => {
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
    let kicks_before = disk.kicks();
    let irqs_before = disk.interrupts_waited();
    let interrupts_before = disk.interrupts_taken();
    // A short head start lets every AP see the job before the clock starts.
    job.start_tsc = x86::rdtsc() + tsc::ns_to_ticks(1_000_000);
    job.deadline_tsc = job.start_tsc + tsc::ns_to_ticks(secs * 1_000_000_000);
    smp::run_on_all(thread, &job as *const Job as usize);

    let mut histogram = [0u64; BUCKETS];
    let (mut ops, mut errors, mut timeouts, mut elapsed_ns) = (0u64, 0u64, 0u64, 1u64);
    for s in &job.stats[..threads] {
        ops += s.ops.load(Ordering::Relaxed);
        errors += s.errors.load(Ordering::Relaxed);
        timeouts += s.timeouts.load(Ordering::Relaxed);
        elapsed_ns = elapsed_ns.max(s.elapsed_ns.load(Ordering::Relaxed));
        // SAFETY: the thread filled its histogram and has returned.
        let h = unsafe { core::slice::from_raw_parts(s.histogram as *const u32, BUCKETS) };
        for (total, &count) in histogram.iter_mut().zip(h) {
            *total += count as u64;
        }
    }
    let iops = ops as u128 * 1_000_000_000 / elapsed_ns as u128;
    let mibps = ops as u128 * block_bytes as u128 * 1_000_000_000 / elapsed_ns as u128 / (1 << 20);
    let ok = errors == 0 && timeouts == 0 && ops > 0;
    println!(
        "RESULT workload={} status={} iops={} mibps={} lat_p50_us={} lat_p99_us={} ops={} errors={} timeouts={} rw={} bs={} qd={} threads={} secs={} kicks={} irqs={} transport={} completion={} interrupts={} irq={}",
        NAME,
        if ok { "ok" } else { "fail" },
        iops,
        mibps,
        percentile(&histogram, ops, 500),
        percentile(&histogram, ops, 990),
        ops,
        errors,
        timeouts,
        boot.cmdline.get_or("rw", "randread"),
        block_bytes,
        depth,
        threads,
        secs,
        disk.kicks() - kicks_before,
        disk.interrupts_waited() - irqs_before,
        if opts.either_transport { "auto" } else { opts.kind.name() },
        opts.completion.name(),
        disk.interrupts_taken() - interrupts_before,
        opts.irq_name(),
    );
    ok
}
