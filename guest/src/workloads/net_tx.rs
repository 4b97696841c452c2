//! `workload=net-tx ip=A.B.C.D/N dst=A.B.C.D:PORT size=N secs=N`: resolves the destination's
//! MAC by ARP, then sends UDP datagrams of `size` payload bytes (the first 8 a sequence
//! number) as fast as the queue takes them for N seconds, each CPU on its own queue pair.
//! `mbps` counts UDP payload bits.

use super::net_common::{self as common, Counts, Failure};
use crate::net::stack::{self, Host, MAX_UDP_PAYLOAD};
use crate::{println, smp, tsc, x86, Boot};
use core::sync::atomic::{AtomicU64, Ordering};

const NAME: &str = "net-tx";
const ARP_TIMEOUT_NS: u64 = 5_000_000_000;
const ARP_RETRY_NS: u64 = 200_000_000;
const BATCH: usize = 32;
const SRC_PORT_BASE: u16 = 40000;

static COUNTS: Counts = Counts::new();
static SENT: AtomicU64 = AtomicU64::new(0);
static ELAPSED_NS: AtomicU64 = AtomicU64::new(0);

struct Job {
    setup: common::Setup,
    dst: ([u8; 4], u16),
    dst_mac: [u8; 6],
    size: usize,
}

static mut JOB: Option<Job> = None;

fn send_cpu(cpu: usize, _: usize) {
    // SAFETY: written by the BSP before `run_on_all`, read-only afterwards.
    let job = unsafe { (*core::ptr::addr_of!(JOB)).as_ref().unwrap() };
    let Some(dev) = common::device() else { return };
    if cpu >= dev.pair_count {
        return;
    }
    let pair = dev.pair(cpu);
    let mut host = Host::new(dev.mac, job.setup.addr);
    let start = x86::rdtsc();
    let deadline = common::deadline_after_secs(job.setup.secs);
    let mut seq = 0u64;
    while x86::rdtsc() < deadline {
        let mut queued = 0;
        while queued < BATCH {
            let ok = pair.send(
                |out| {
                    host.udp(
                        job.dst_mac,
                        job.dst,
                        SRC_PORT_BASE + cpu as u16,
                        seq,
                        job.size,
                        out,
                    )
                },
                false,
            );
            if !ok {
                break;
            }
            seq += 1;
            queued += 1;
        }
        pair.flush();
        // Keep answering ARP while sending; nothing else is expected.
        common::serve(pair, &mut host, &COUNTS, false, |_, _| {});
        if queued == 0 {
            x86::pause();
        }
    }
    // Let the device take what is queued before the count is reported.
    let drain_until = x86::rdtsc() + tsc::ns_to_ticks(1_000_000_000);
    while x86::rdtsc() < drain_until && !pair.tx_idle() {
        pair.flush();
        x86::pause();
    }
    SENT.fetch_add(seq, Ordering::Relaxed);
    ELAPSED_NS.fetch_max(
        tsc::ticks_to_ns(x86::rdtsc().min(deadline) - start),
        Ordering::Relaxed,
    );
}

/// Asks for `ip`'s MAC until a reply comes; answers ARP meanwhile.
fn resolve(dev: &crate::net::NetDevice, host: &mut Host, ip: [u8; 4]) -> Option<[u8; 6]> {
    let pair = dev.pair(0);
    let give_up = x86::rdtsc() + tsc::ns_to_ticks(ARP_TIMEOUT_NS);
    let mut found = None;
    while found.is_none() && x86::rdtsc() < give_up {
        pair.send(|out| host.arp_request(ip, out), true);
        let retry = (x86::rdtsc() + tsc::ns_to_ticks(ARP_RETRY_NS)).min(give_up);
        while found.is_none() && x86::rdtsc() < retry {
            let n = common::serve(pair, host, &COUNTS, false, |from, mac| {
                if from == ip {
                    found = Some(mac);
                }
            });
            if n == 0 {
                pair.wait_rx(retry);
            }
        }
    }
    found
}

pub fn run(boot: &Boot) -> bool {
    let setup = match common::setup(&boot.cmdline) {
        Ok(s) => s,
        Err(f) => return common::report_failure(NAME, &f),
    };
    let Some(dst) = boot.cmdline.get("dst").and_then(stack::parse_endpoint) else {
        return common::report_failure(NAME, &Failure::bad_argument("dst"));
    };
    let size = match boot.cmdline.number("size", 64) {
        Ok(n) if (8..=MAX_UDP_PAYLOAD as u64).contains(&n) => n as usize,
        _ => return common::report_failure(NAME, &Failure::bad_argument("size")),
    };
    let dev = match common::open(&setup) {
        Ok(d) => d,
        Err(f) => return common::report_failure(NAME, &f),
    };
    let mut host = Host::new(dev.mac, setup.addr);
    let Some(dst_mac) = resolve(dev, &mut host, dst.0) else {
        return common::report_failure(
            NAME,
            &Failure {
                reason: "arp-timeout",
                detail: "",
            },
        );
    };
    let kind = setup.opts.kind.name();
    // SAFETY: before any other CPU runs `send_cpu`.
    unsafe {
        *core::ptr::addr_of_mut!(JOB) = Some(Job {
            setup,
            dst,
            dst_mac,
            size,
        })
    };
    let kicks_before = dev.kicks();
    smp::run_on_all(send_cpu, 0);
    let packets = SENT.load(Ordering::Relaxed);
    let ns = ELAPSED_NS.load(Ordering::Relaxed).max(1);
    let pps = packets as u128 * 1_000_000_000 / ns as u128;
    let mbps = packets as u128 * size as u128 * 8 * 1000 / ns as u128;
    println!(
        "RESULT workload={} status=ok packets={} pps={} mbps={} size={} elapsed_ms={} kicks={} transport={} pairs={}",
        NAME,
        packets,
        pps,
        mbps,
        size,
        ns / 1_000_000,
        dev.kicks() - kicks_before,
        kind,
        dev.pair_count,
    );
    true
}
