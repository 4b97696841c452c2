//! A split virtqueue (driver side), with EVENT_IDX notification suppression.

use super::Doorbell;
use crate::dma;
use core::sync::atomic::{fence, Ordering};

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;
/// Legacy devices need the used ring on its own page boundary.
const LEGACY_ALIGN: u64 = 4096;

#[derive(Clone, Copy, Default)]
#[repr(C)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// Guest-physical addresses of a queue's three parts.
pub struct Layout {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl Layout {
    /// Allocates rings for `size` entries in the legacy layout (which the
    /// modern transport accepts too): descriptors, available ring, then the
    /// used ring on the next 4 KiB boundary.
    pub fn alloc(size: u16) -> Option<Layout> {
        let n = size as u64;
        let avail_off = 16 * n;
        let used_off = (avail_off + 6 + 2 * n + LEGACY_ALIGN - 1) & !(LEGACY_ALIGN - 1);
        let total = used_off + ((6 + 8 * n + LEGACY_ALIGN - 1) & !(LEGACY_ALIGN - 1));
        let block = dma::alloc(total as usize, LEGACY_ALIGN as usize)?;
        let base = dma::phys(&block[0]);
        Some(Layout {
            size,
            desc: base,
            avail: base + avail_off,
            used: base + used_off,
        })
    }
}

pub struct Queue {
    pub index: u16,
    pub size: u16,
    desc: *mut Desc,
    avail: *mut u16,
    used: *mut u16,
    next_avail: u16,
    /// `next_avail` when the device was last notified (or told to look).
    notified_avail: u16,
    last_used: u16,
    event_idx: bool,
    doorbell: Doorbell,
    pub kicks: u64,
}

// SAFETY: the rings are plain memory; users serialise access with a lock.
unsafe impl Send for Queue {}

impl Queue {
    pub fn new(index: u16, layout: &Layout, doorbell: Doorbell, event_idx: bool) -> Queue {
        Queue {
            index,
            size: layout.size,
            desc: layout.desc as *mut Desc,
            avail: layout.avail as *mut u16,
            used: layout.used as *mut u16,
            next_avail: 0,
            notified_avail: 0,
            last_used: 0,
            event_idx,
            doorbell,
            kicks: 0,
        }
    }

    pub fn doorbell(&self) -> Doorbell {
        self.doorbell
    }

    /// Kicks go to `doorbell` from now on (the device's BAR moved).
    pub fn set_doorbell(&mut self, doorbell: Doorbell) {
        self.doorbell = doorbell;
    }

    /// Writes descriptor `i` of the ring's table.
    pub fn set_desc(&mut self, i: u16, d: Desc) {
        assert!(i < self.size);
        // SAFETY: `i` is inside the descriptor table.
        unsafe { self.desc.add(i as usize).write_volatile(d) };
    }

    /// Offers the chain starting at `head`; the device sees it after
    /// `publish`.
    pub fn push_avail(&mut self, head: u16) {
        let slot = (self.next_avail % self.size) as usize;
        // SAFETY: ring[slot] of the available ring (after flags and idx).
        unsafe { self.avail.add(2 + slot).write_volatile(head) };
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Makes pushed chains visible and kicks the device if it asked for it.
    pub fn publish(&mut self) {
        fence(Ordering::Release);
        // SAFETY: avail->idx.
        unsafe { self.avail.add(1).write_volatile(self.next_avail) };
        // The idx store must be visible before reading whether the device
        // wants a kick, or both sides may decide to wait for the other.
        fence(Ordering::SeqCst);
        let old = self.notified_avail;
        let new = self.next_avail;
        if old == new {
            return;
        }
        let kick = if self.event_idx {
            let event = self.avail_event();
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            // SAFETY: used->flags.
            let flags = unsafe { self.used.read_volatile() };
            flags & USED_F_NO_NOTIFY == 0
        };
        self.notified_avail = new;
        if kick {
            self.kicks += 1;
            self.doorbell.ring(self.index);
        }
    }

    fn avail_event(&self) -> u16 {
        // SAFETY: used->avail_event sits after the used ring's entries.
        unsafe {
            (self.used as *const u8)
                .add(4 + 8 * self.size as usize)
                .cast::<u16>()
                .read_volatile()
        }
    }

    /// The next used element `(id, len)`, if the device returned one.
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        // SAFETY: used->idx.
        let idx = unsafe { self.used.add(1).read_volatile() };
        if idx == self.last_used {
            return None;
        }
        fence(Ordering::Acquire);
        let slot = (self.last_used % self.size) as usize;
        // SAFETY: used->ring[slot].
        let elem = unsafe { (self.used as *const u8).add(4 + 8 * slot).cast::<u32>() };
        // SAFETY: as above.
        let (id, len) = unsafe { (elem.read_volatile(), elem.add(1).read_volatile()) };
        self.last_used = self.last_used.wrapping_add(1);
        Some((id, len))
    }

    /// Chains offered and not yet returned.
    pub fn in_flight(&self) -> u16 {
        self.next_avail.wrapping_sub(self.last_used)
    }

    fn set_used_event(&mut self, value: u16) {
        // SAFETY: avail->used_event sits after the available ring.
        unsafe { self.avail.add(2 + self.size as usize).write_volatile(value) };
    }

    fn set_avail_flags(&mut self, flags: u16) {
        // SAFETY: avail->flags.
        unsafe { self.avail.write_volatile(flags) };
    }

    /// Asks for an interrupt when the next chain is used.
    pub fn enable_interrupts(&mut self) {
        if self.event_idx {
            self.set_used_event(self.last_used);
        } else {
            self.set_avail_flags(0);
        }
        fence(Ordering::SeqCst);
    }

    /// Asks the device not to interrupt (polling). With EVENT_IDX the event
    /// index must trail what was consumed, so call this after each harvest.
    pub fn disable_interrupts(&mut self) {
        if self.event_idx {
            self.set_used_event(self.last_used.wrapping_sub(1));
        } else {
            self.set_avail_flags(AVAIL_F_NO_INTERRUPT);
        }
    }

    /// Whether used entries are waiting (no side effects).
    pub fn has_used(&self) -> bool {
        // SAFETY: used->idx.
        unsafe { self.used.add(1).read_volatile() != self.last_used }
    }
}
