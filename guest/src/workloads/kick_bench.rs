//! `workload=kick-bench n=N`: writes queue 0's notify register N times with
//! no new buffers (a kick with nothing to do) on the first virtio-blk disk;
//! the cost of the notify path alone.

use super::disks::{self, Failure};
use crate::{println, tsc, x86, Boot};

const WARMUP_KICKS: u64 = 100;

pub fn run(boot: &Boot) -> bool {
    const NAME: &str = "kick-bench";
    let n = match boot.cmdline.number("n", 100_000) {
        Ok(n) if n > 0 => n,
        _ => return disks::report_failure(NAME, &Failure::bad_argument("n")),
    };
    let opts = match disks::options(&boot.cmdline, 4096) {
        Ok(o) => o,
        Err(f) => return disks::report_failure(NAME, &f),
    };
    let all = match disks::open_all(&opts, 1) {
        Ok(d) => d,
        Err(f) => return disks::report_failure(NAME, &f),
    };
    let Some(disk) = all.iter().next() else {
        return disks::report_failure(
            NAME,
            &Failure {
                reason: "no-disk",
                detail: "",
            },
        );
    };
    let doorbell = disk.queue(0).doorbell();
    for _ in 0..WARMUP_KICKS {
        doorbell.ring(0);
    }
    let start = x86::rdtsc();
    for _ in 0..n {
        doorbell.ring(0);
    }
    let elapsed_ns = tsc::ticks_to_ns(x86::rdtsc() - start);
    println!(
        "RESULT workload={} status=ok n={} ns_per_kick={} total_ms={} transport={}",
        NAME,
        n,
        elapsed_ns / n,
        elapsed_ns / 1_000_000,
        if opts.either_transport {
            "auto"
        } else {
            opts.kind.name()
        },
    );
    true
}
