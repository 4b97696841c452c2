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
const CALIBRATION_TICKS: u64 = 23_864; // ~20 ms

/// Counts TSC ticks while PIT channel 2 counts down ~10 ms once.
fn calibrate_with_pit() -> u64 {
    // Gate channel 2 on, speaker off.
    outb(SPEAKER_PORT, (inb(SPEAKER_PORT) & !0x02) | 0x01);
    // Channel 2, lobyte/hibyte, mode 0 (interrupt on terminal count).
    outb(PIT_CONTROL, 0b1011_0000);
    outb(PIT_CHANNEL2, (CALIBRATION_TICKS & 0xff) as u8);
    outb(PIT_CHANNEL2, (CALIBRATION_TICKS >> 8) as u8);
    let start = rdtsc();
    // Each port read is a VM exit; take the midpoint of the read that saw
    // OUT2 rise so the exit cost does not bias the result.
    let mut before_read = start;
    for _ in 0..10_000_000u32 {
        before_read = rdtsc();
        if inb(SPEAKER_PORT) & 0x20 != 0 {
            break;
        }
    }
    let ticks = (before_read + rdtsc()) / 2 - start;
    ticks * PIT_HZ / CALIBRATION_TICKS / 1000
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

pub fn delay_us(us: u64) {
    let end = rdtsc() + ns_to_ticks(us * 1000);
    while rdtsc() < end {
        core::hint::spin_loop();
    }
}
