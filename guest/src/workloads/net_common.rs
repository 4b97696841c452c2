//! What the network workloads share: driver options and the IP address from the command
//! line, opening the first virtio-net device, and the per-CPU loop's plumbing.

use crate::net::stack::{self, Addr, Host, Kind as FrameKind};
use crate::net::{self, NetDevice, Options, Pair, BUF_SIZE};
use crate::start_info::Cmdline;
use crate::virtio::Kind;
use crate::{pci, println, smp, tsc, x86};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::disks::{choice, completion, on_off};
pub use super::disks::{report_failure, Failure};

pub struct Setup {
    pub addr: Addr,
    pub secs: u64,
    pub opts: Options,
}

/// Reads `ip=`, `secs=`, `transport=`, `completion=`, `event_idx=`.
pub fn setup(cmdline: &Cmdline) -> Result<Setup, Failure> {
    let addr = cmdline
        .get("ip")
        .and_then(stack::parse_ip)
        .ok_or(Failure::bad_argument("ip"))?;
    let secs = match cmdline.number("secs", 10) {
        Ok(s) if (1..=3600).contains(&s) => s,
        _ => return Err(Failure::bad_argument("secs")),
    };
    let kind = choice(
        cmdline,
        "transport",
        "modern",
        &[("modern", Kind::Modern), ("legacy", Kind::Legacy)],
    )?;
    let completion = completion(cmdline)?;
    Ok(Setup {
        addr,
        secs,
        opts: Options {
            kind,
            completion,
            event_idx: on_off(cmdline, "event_idx", true)?,
            pairs: smp::online(),
        },
    })
}

static mut DEVICE: Option<NetDevice> = None;

/// Opens the first virtio-net function and prints its `NET` line (hosts wait for it before
/// sending).
pub fn open(s: &Setup) -> Result<&'static NetDevice, Failure> {
    let bus = pci::enumerate();
    let Some(f) = bus.iter().find(|f| net::is_net(f)) else {
        return Err(Failure {
            reason: "no-net",
            detail: "",
        });
    };
    let dev = net::open(*f, &s.opts).map_err(|e| {
        println!("NET index=0 pci={} error={}", f.addr, e.reason());
        Failure {
            reason: e.reason(),
            detail: "",
        }
    })?;
    let m = dev.mac;
    println!(
        "NET index=0 pci={} transport={} mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} ip={}.{}.{}.{}/{} pairs={} features={:#x} event_idx={} completion={}",
        f.addr,
        dev.transport.kind.name(),
        m[0], m[1], m[2], m[3], m[4], m[5],
        s.addr.ip[0], s.addr.ip[1], s.addr.ip[2], s.addr.ip[3], s.addr.prefix,
        dev.pair_count,
        dev.features,
        (dev.features & crate::virtio::F_EVENT_IDX != 0) as u8,
        s.opts.completion.name(),
    );
    // SAFETY: only the BSP opens the device, once per run, before other CPUs use it.
    unsafe {
        let slot = &mut *core::ptr::addr_of_mut!(DEVICE);
        *slot = Some(dev);
        Ok(slot.as_ref().unwrap())
    }
}

/// UDP port whose datagram ends a net-echo or net-rx run early (before `secs`), so a host
/// that is done need not wait out the bound.
pub const STOP_PORT: u16 = 9;
static STOP: AtomicBool = AtomicBool::new(false);

/// Whether a datagram to `STOP_PORT` arrived.
pub fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// The device `open` set up.
pub fn device() -> Option<&'static NetDevice> {
    // SAFETY: written once by `open` on the BSP before other CPUs call this.
    unsafe { (*core::ptr::addr_of!(DEVICE)).as_ref() }
}

/// Frames of each kind a run saw (all CPUs).
#[derive(Default)]
pub struct Counts {
    pub frames: AtomicU64,
    pub arp: AtomicU64,
    pub icmp: AtomicU64,
    pub udp: AtomicU64,
    pub udp_bytes: AtomicU64,
    pub echoed: AtomicU64,
}

impl Counts {
    pub const fn new() -> Counts {
        Counts {
            frames: AtomicU64::new(0),
            arp: AtomicU64::new(0),
            icmp: AtomicU64::new(0),
            udp: AtomicU64::new(0),
            udp_bytes: AtomicU64::new(0),
            echoed: AtomicU64::new(0),
        }
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Serves received frames on `pair`: answers ARP and ICMP (and UDP echo with `echo_udp`),
/// counts what came. Returns the frames handled and the ARP replies seen (for resolution).
pub fn serve(
    pair: &Pair,
    host: &mut Host,
    counts: &Counts,
    echo_udp: bool,
    mut on_arp_reply: impl FnMut([u8; 4], [u8; 6]),
) -> usize {
    let mut scratch = [0u8; BUF_SIZE];
    let mut replies = 0;
    let n = pair.receive(64, |frame| {
        let (kind, len) = host.handle(frame, &mut scratch, echo_udp);
        match kind {
            FrameKind::ArpRequest => add(&counts.arp, 1),
            FrameKind::ArpReply { ip, mac } => on_arp_reply(ip, mac),
            FrameKind::IcmpEcho => add(&counts.icmp, 1),
            FrameKind::Udp {
                port: STOP_PORT, ..
            } => STOP.store(true, Ordering::Relaxed),
            FrameKind::Udp { payload_len, .. } => {
                add(&counts.udp, 1);
                add(&counts.udp_bytes, payload_len as u64);
            }
            FrameKind::Other => {}
        }
        if len > 0 {
            // A full TX ring drops the answer, as a NIC would.
            if pair.send(
                |out| {
                    out[..len].copy_from_slice(&scratch[..len]);
                    len
                },
                false,
            ) {
                replies += 1;
            }
        }
    });
    add(&counts.frames, n as u64);
    if replies > 0 {
        add(&counts.echoed, replies);
        pair.flush();
    }
    n
}

pub fn deadline_after_secs(secs: u64) -> u64 {
    x86::rdtsc() + tsc::ns_to_ticks(secs * 1_000_000_000)
}

/// Waits at most this long for a frame before looking at the clock again.
pub const WAIT_SLICE_NS: u64 = 10_000_000;

pub fn wait_a_little(pair: &Pair, deadline: u64) {
    let until = (x86::rdtsc() + tsc::ns_to_ticks(WAIT_SLICE_NS)).min(deadline);
    pair.wait_rx(until);
}
