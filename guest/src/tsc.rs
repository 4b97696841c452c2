//! TSC frequency and delays. `rdtsc` runs natively at CPL3.

use crate::x86::{cpuid, inb, outb, rdtsc};
use core::sync::atomic::{AtomicU64, Ordering};

static TSC_KHZ: AtomicU64 = AtomicU64::new(0);

/// Where the frequency came from, for the `info` report.
#[derive(Clone, Copy)]
pub enum Source {
    HypervisorLeaf,
    Cpuid15,
    Pit,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::HypervisorLeaf => "cpuid-0x40000010",
            Source::Cpuid15 => "cpuid-0x15",
            Source::Pit => "pit",
        }
    }
}

pub fn khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

/// Finds the TSC frequency once; later calls to `khz` return it.
pub fn init() -> Source {
    let (khz, source) = from_hypervisor_leaf()
        .map(|k| (k, Source::HypervisorLeaf))
        .or_else(|| from_cpuid_15().map(|k| (k, Source::Cpuid15)))
        .unwrap_or_else(|| (calibrate_with_pit(), Source::Pit));
    TSC_KHZ.store(khz.max(1), Ordering::Relaxed);
    source
}

fn from_hypervisor_leaf() -> Option<u64> {
    let max = cpuid(0x4000_0000, 0).eax;
    if !(0x4000_0010..0x4000_00ff).contains(&max) {
        return None;
    }
    let khz = cpuid(0x4000_0010, 0).eax as u64;
    (khz != 0).then_some(khz)
}

fn from_cpuid_15() -> Option<u64> {
    if cpuid(0, 0).eax < 0x15 {
        return None;
    }
    let r = cpuid(0x15, 0);
    if r.eax == 0 || r.ebx == 0 || r.ecx == 0 {
        return None;
    }
    Some(r.ecx as u64 * r.ebx as u64 / r.eax as u64 / 1000)
}

const PIT_HZ: u64 = 1_193_182;
const PIT_CONTROL: u16 = 0x43;
const PIT_CHANNEL2: u16 = 0x42;
const SPEAKER_PORT: u16 = 0x61;
/// PIT ticks between the two samples (~5 ms).
const CALIBRATION_TICKS: u16 = 5_966;
/// Samples per end point; the one whose latch exit was quickest wins.
const SAMPLES: usize = 4;

/// Latches PIT channel 2 and returns (TSC at the latch, count). The TSC is
/// the midpoint around the latch command, whose exit may be slow or
/// preempted; `window` says how uncertain the pairing is.
fn sample() -> (u64, u16, u64) {
    let before = rdtsc();
    outb(PIT_CONTROL, 0b1000_0000); // latch channel 2
    let after = rdtsc();
    let low = inb(PIT_CHANNEL2) as u16;
    let high = inb(PIT_CHANNEL2) as u16;
    (before / 2 + after / 2, high << 8 | low, after - before)
}

fn best_sample() -> (u64, u16) {
    let mut best = sample();
    for _ in 1..SAMPLES {
        let s = sample();
        if s.2 < best.2 {
            best = s;
        }
    }
    (best.0, best.1)
}

/// Port 0x61 bit 5: channel 2's OUT, which in mode 0 rises at terminal count
/// and stays high until the channel is programmed again.
const OUT2_HIGH: u8 = 1 << 5;
/// Calibrations tried before the last one is taken as it is.
const CALIBRATION_TRIES: usize = 5;

/// Reads PIT channel 2's count at two moments ~5 ms apart and compares
/// with the TSC. Only the latch exits' duration adds error, so a preempted
/// vCPU thread (a busy host) does not skew the result, unless it was
/// preempted for longer than the counter's 55 ms: the count then wrapped and
/// the TSC ticks of 60 ms would be taken for 5 ms. OUT2 shows the wrap, and
/// such a calibration is done again.
fn calibrate_with_pit() -> u64 {
    let mut khz = 0;
    for _ in 0..CALIBRATION_TRIES {
        let (measured, wrapped) = calibrate_once();
        khz = measured;
        if !wrapped {
            break;
        }
    }
    khz
}

fn calibrate_once() -> (u64, bool) {
    // Gate channel 2 on, speaker off.
    outb(SPEAKER_PORT, (inb(SPEAKER_PORT) & !0x02) | 0x01);
    // Channel 2, lobyte/hibyte, mode 0, counting down from 0xFFFF (55 ms).
    outb(PIT_CONTROL, 0b1011_0000);
    outb(PIT_CHANNEL2, 0xFF);
    outb(PIT_CHANNEL2, 0xFF);
    let (tsc_start, count_start) = best_sample();
    let mut polls = 0u32;
    loop {
        let (_, count, _) = sample();
        polls += 1;
        if count_start.wrapping_sub(count) >= CALIBRATION_TICKS || polls > 1_000_000 {
            break;
        }
    }
    let (tsc_end, count_end) = best_sample();
    let wrapped = inb(SPEAKER_PORT) & OUT2_HIGH != 0;
    let pit_ticks = count_start.wrapping_sub(count_end).max(1) as u64;
    ((tsc_end - tsc_start) * PIT_HZ / pit_ticks / 1000, wrapped)
}

pub fn now_ns() -> u64 {
    ticks_to_ns(rdtsc())
}

pub fn ticks_to_ns(ticks: u64) -> u64 {
    (ticks as u128 * 1_000_000 / khz() as u128) as u64
}

pub fn ns_to_ticks(ns: u64) -> u64 {
    (ns as u128 * khz() as u128 / 1_000_000) as u64
}
