//! `workload=net-rx ip=A.B.C.D/N secs=N`: counts the UDP datagrams (and payload bytes) sent
//! to the address for N seconds, each CPU on its own queue pair; answers ARP and ICMP echo.
//! `pps` and `mbps` (payload bits) are over the time from the first datagram to the last. A
//! datagram to port 9 ends the run early (it is not counted).

use super::net_common::{self as common, Counts};
use crate::net::stack::Host;
use crate::{println, smp, tsc, x86, Boot};
use core::sync::atomic::{AtomicU64, Ordering};

const NAME: &str = "net-rx";
static COUNTS: Counts = Counts::new();
static FIRST_TSC: AtomicU64 = AtomicU64::new(u64::MAX);
static LAST_TSC: AtomicU64 = AtomicU64::new(0);
static mut SETUP: Option<common::Setup> = None;

fn count_cpu(cpu: usize, _: usize) {
    // SAFETY: written by the BSP before `run_on_all`, read-only afterwards.
    let setup = unsafe { (*core::ptr::addr_of!(SETUP)).as_ref().unwrap() };
    let Some(dev) = common::device() else { return };
    if cpu >= dev.pair_count {
        return;
    }
    let pair = dev.pair(cpu);
    let mut host = Host::new(dev.mac, setup.addr);
    let deadline = common::deadline_after_secs(setup.secs);
    while x86::rdtsc() < deadline && !common::stopped() {
        let before = Counts::get(&COUNTS.udp);
        if common::serve(pair, &mut host, &COUNTS, false, |_, _| {}) == 0 {
            common::wait_a_little(pair, deadline);
        } else if Counts::get(&COUNTS.udp) != before {
            let now = x86::rdtsc();
            FIRST_TSC.fetch_min(now, Ordering::Relaxed);
            LAST_TSC.fetch_max(now, Ordering::Relaxed);
        }
    }
}

pub fn run(boot: &Boot) -> bool {
    let setup = match common::setup(&boot.cmdline) {
        Ok(s) => s,
        Err(f) => return common::report_failure(NAME, &f),
    };
    let dev = match common::open(&setup) {
        Ok(d) => d,
        Err(f) => return common::report_failure(NAME, &f),
    };
    let kind = setup.opts.kind.name();
    // SAFETY: before any other CPU runs `count_cpu`.
    unsafe { *core::ptr::addr_of_mut!(SETUP) = Some(setup) };
    smp::run_on_all(count_cpu, 0);
    let packets = Counts::get(&COUNTS.udp);
    let bytes = Counts::get(&COUNTS.udp_bytes);
    let (first, last) = (
        FIRST_TSC.load(Ordering::Relaxed),
        LAST_TSC.load(Ordering::Relaxed),
    );
    let ns = if last > first {
        tsc::ticks_to_ns(last - first).max(1)
    } else {
        1
    };
    let (pps, mbps) = if packets > 1 {
        (
            (packets - 1) as u128 * 1_000_000_000 / ns as u128,
            bytes as u128 * 8 * 1000 / ns as u128,
        )
    } else {
        (0, 0)
    };
    println!(
        "RESULT workload={} status=ok packets={} bytes={} pps={} mbps={} active_ms={} frames={} arp={} icmp={} kicks={} transport={} pairs={}",
        NAME,
        packets,
        bytes,
        pps,
        mbps,
        ns / 1_000_000,
        Counts::get(&COUNTS.frames),
        Counts::get(&COUNTS.arp),
        Counts::get(&COUNTS.icmp),
        dev.kicks(),
        kind,
        dev.pair_count,
    );
    true
}
