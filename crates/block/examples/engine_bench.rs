//! 4 KiB random reads through each block engine, driven the way the virtio-blk I/O thread
//! drives them: keep `qd` requests in flight, reap on the completion eventfd, resubmit.
//!
//! ```text
//! cargo run --release -p kickvm-block --example engine_bench -- [--file PATH] [--size-mib N]
//!     [--secs S] [--rounds R] [--direct] [--engines sync,threads,io_uring] [--depths 1,32]
//! ```
//! Without `--file` it makes a temporary image (256 MiB) and reads it once so it sits in the
//! page cache, as `fio --invalidate=0` would see it. Rounds are interleaved across engines and
//! depths; it prints the median IOPS of the rounds with min-max.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kickvm_block::{open_engine, DiskImage, DiskOptions, EngineKind, HostBuffer, Request};

const BLOCK: usize = 4096;

struct Args {
    file: Option<PathBuf>,
    size_mib: u64,
    secs: f64,
    rounds: usize,
    direct: bool,
    engines: Vec<EngineKind>,
    depths: Vec<u32>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        file: None,
        size_mib: 256,
        secs: 3.0,
        rounds: 3,
        direct: false,
        engines: vec![
            EngineKind::Sync,
            EngineKind::ThreadPool,
            EngineKind::IoUring,
        ],
        depths: vec![1, 32],
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--file" => args.file = Some(PathBuf::from(value()?)),
            "--size-mib" => args.size_mib = value()?.parse().map_err(|e| format!("{e}"))?,
            "--secs" => args.secs = value()?.parse().map_err(|e| format!("{e}"))?,
            "--rounds" => args.rounds = value()?.parse().map_err(|e| format!("{e}"))?,
            "--direct" => args.direct = true,
            "--engines" => {
                args.engines = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--depths" => {
                args.depths = value()?
                    .split(',')
                    .map(|d| d.parse().map_err(|e| format!("depth {d}: {e}")))
                    .collect::<Result<_, _>>()?
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

/// A file of pseudo-random bytes, removed on drop unless it was given.
struct BenchFile {
    path: PathBuf,
    temporary: bool,
}

impl Drop for BenchFile {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn make_file(size_mib: u64) -> std::io::Result<BenchFile> {
    let path = std::env::temp_dir().join(format!("kickvm-engine-bench-{}.img", std::process::id()));
    let bench_file = BenchFile {
        path: path.clone(),
        temporary: true,
    };
    let mut file = std::fs::File::create(&path)?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for _ in 0..size_mib {
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        file.write_all(&chunk)?;
    }
    file.sync_all()?;
    Ok(bench_file)
}

/// Page-aligned buffers standing in for guest memory.
struct Buffers {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Buffers {
    fn new(count: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(count * BLOCK, 4096).unwrap();
        // SAFETY: non-zero size (count >= 1).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Buffers { ptr, layout }
    }

    fn slot(&self, i: usize) -> HostBuffer {
        // SAFETY: slot i lies inside the allocation, which outlives the engine using it (the
        // engine is dropped, waiting for its requests, before these buffers are).
        unsafe { HostBuffer::new(self.ptr.add(i * BLOCK), BLOCK) }
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

fn wait_readable(fd: i32) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, 1000) };
}

/// Runs one (engine, depth) pair for `secs`; returns IOPS.
fn run(image: &Arc<DiskImage>, kind: EngineKind, qd: u32, secs: f64, seed: u64) -> f64 {
    let buffers = Buffers::new(qd as usize);
    let mut engine = open_engine(image, kind, qd).unwrap_or_else(|e| {
        eprintln!("cannot open the {kind} engine: {e}");
        std::process::exit(1);
    });
    let blocks = image.size_bytes() / BLOCK as u64;
    let mut x = seed | 1;
    let mut next_offset = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % blocks) * BLOCK as u64
    };
    for slot in 0..qd as usize {
        let request = Request::read(next_offset(), vec![buffers.slot(slot)], slot as u64);
        engine.submit(request).expect("submit");
    }
    engine.commit().expect("commit");
    let mut completions = Vec::with_capacity(qd as usize);
    let mut done = 0u64;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    loop {
        engine.reap(&mut completions);
        if completions.is_empty() {
            wait_readable(engine.completion_fd());
            continue;
        }
        let now_done = Instant::now() >= deadline;
        for c in completions.drain(..) {
            if let Err(e) = c.result {
                eprintln!("read failed: {e}");
                std::process::exit(1);
            }
            done += 1;
            if !now_done {
                let slot = c.user_data as usize;
                let request = Request::read(next_offset(), vec![buffers.slot(slot)], c.user_data);
                engine.submit(request).expect("submit");
            }
        }
        if now_done {
            break;
        }
        engine.commit().expect("commit");
    }
    let elapsed = start.elapsed().as_secs_f64();
    drop(engine);
    done as f64 / elapsed
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("engine_bench: {e}");
        std::process::exit(2);
    });
    let bench_file = match &args.file {
        Some(path) => BenchFile {
            path: path.clone(),
            temporary: false,
        },
        None => make_file(args.size_mib).unwrap_or_else(|e| {
            eprintln!("engine_bench: cannot make a temporary image: {e}");
            std::process::exit(1);
        }),
    };
    let options = DiskOptions {
        readonly: true,
        direct: args.direct,
        declared_raw: false,
        unlocked: false,
    };
    let image = Arc::new(
        DiskImage::open(&bench_file.path, options).unwrap_or_else(|e| {
            eprintln!("engine_bench: {e}");
            std::process::exit(1);
        }),
    );
    if !args.direct {
        // Warm the page cache so every engine sees the same cached file.
        std::fs::read(&bench_file.path).ok();
    }
    println!(
        "4 KiB random reads on {} ({} MiB{}), {} s x {} rounds, io_uring: {}",
        bench_file.path.display(),
        image.size_bytes() >> 20,
        if args.direct {
            ", O_DIRECT"
        } else {
            ", page cache"
        },
        args.secs,
        args.rounds,
        match kickvm_block::io_uring_support() {
            Ok(()) => "available".to_string(),
            Err(why) => format!("unavailable ({why})"),
        }
    );
    let pairs: Vec<(EngineKind, u32)> = args
        .engines
        .iter()
        .flat_map(|&e| args.depths.iter().map(move |&d| (e, d)))
        .collect();
    let mut results = vec![Vec::new(); pairs.len()];
    for round in 0..args.rounds {
        for (i, &(kind, qd)) in pairs.iter().enumerate() {
            results[i].push(run(
                &image,
                kind,
                qd,
                args.secs,
                0x9E37 + round as u64 * 7 + i as u64,
            ));
        }
    }
    println!(
        "{:<10} {:>4} {:>12} {:>24}",
        "engine", "qd", "median IOPS", "min-max"
    );
    for (&(kind, qd), r) in pairs.iter().zip(results.iter_mut()) {
        r.sort_by(|a, b| a.total_cmp(b));
        println!(
            "{:<10} {:>4} {:>12.0} {:>24}",
            kind.name(),
            qd,
            r[r.len() / 2],
            format!("{:.0}-{:.0}", r[0], r[r.len() - 1])
        );
    }
}
