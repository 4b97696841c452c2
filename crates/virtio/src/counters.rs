//! Per-queue counters: always on, one relaxed atomic add each.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct QueueCounters {
    /// Kicks that arrived through the ioeventfd (the eventfd's count, so coalesced kicks count).
    pub kicks_ioeventfd: AtomicU64,
    /// Kicks that exited to the vCPU thread (sync mode, or a write the ioeventfd did not match).
    pub kicks_exit: AtomicU64,
    /// Signals the VMM wrote to a kick eventfd itself (a kick kept over a pause, the look at
    /// every queue on resume); read back, they are in `kicks_ioeventfd` too, so the guest's
    /// kicks are `kicks_ioeventfd + kicks_exit - kicks_replayed`.
    pub kicks_replayed: AtomicU64,
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
    pub interrupts_sent: AtomicU64,
    /// Interrupts EVENT_IDX (used_event) or NO_INTERRUPT told us the guest did not want.
    pub interrupts_suppressed: AtomicU64,
}

/// A plain copy of [`QueueCounters`] for reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCountersSnapshot {
    pub kicks_ioeventfd: u64,
    pub kicks_exit: u64,
    pub kicks_replayed: u64,
    pub requests: u64,
    pub bytes: u64,
    pub interrupts_sent: u64,
    pub interrupts_suppressed: u64,
}

impl QueueCounters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Signals `kick` on the guest's behalf, counted as such.
    pub fn replay_kick(&self, kick: &vmm_sys_util::eventfd::EventFd) {
        if kick.write(1).is_ok() {
            Self::add(&self.kicks_replayed, 1);
        }
    }

    pub fn snapshot(&self) -> QueueCountersSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        QueueCountersSnapshot {
            kicks_ioeventfd: get(&self.kicks_ioeventfd),
            kicks_exit: get(&self.kicks_exit),
            kicks_replayed: get(&self.kicks_replayed),
            requests: get(&self.requests),
            bytes: get(&self.bytes),
            interrupts_sent: get(&self.interrupts_sent),
            interrupts_suppressed: get(&self.interrupts_suppressed),
        }
    }
}
