//! `workload=net-echo ip=A.B.C.D/N secs=N`: for N seconds, answers ARP and ICMP echo for the
//! address and echoes UDP datagrams sent to port 7, each CPU on its own queue pair. A datagram
//! to port 9 ends the run early.

use super::net_common::{self as common, Counts};
use crate::net::stack::Host;
use crate::{println, smp, x86, Boot};

const NAME: &str = "net-echo";
static COUNTS: Counts = Counts::new();
static mut SETUP: Option<common::Setup> = None;

fn serve_cpu(cpu: usize, _: usize) {
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
        if common::serve(pair, &mut host, &COUNTS, true, |_, _| {}) == 0 {
            common::wait_a_little(pair, deadline);
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
    // SAFETY: before any other CPU runs `serve_cpu`.
    unsafe { *core::ptr::addr_of_mut!(SETUP) = Some(setup) };
    smp::run_on_all(serve_cpu, 0);
    let g = Counts::get;
    println!(
        "RESULT workload={} status=ok frames={} arp={} icmp={} udp={} udp_bytes={} replies={} kicks={} transport={} pairs={}",
        NAME,
        g(&COUNTS.frames),
        g(&COUNTS.arp),
        g(&COUNTS.icmp),
        g(&COUNTS.udp),
        g(&COUNTS.udp_bytes),
        g(&COUNTS.echoed),
        dev.kicks(),
        kind,
        dev.pair_count,
    );
    true
}
