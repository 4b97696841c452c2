//! Firmware-style BAR placement: each BAR naturally aligned, packed upward in its window.

use std::ops::Range;

use crate::config::BarKind;

/// The 32-bit PCI MMIO window of kickvm's memory layout (below the IOAPIC).
pub const MMIO32_WINDOW: Range<u64> = 0xc000_0000..0xfc00_0000;
/// The port range handed out to I/O BARs.
pub const IO_WINDOW: Range<u64> = 0xc000..0x1_0000;

#[derive(Debug, Clone)]
struct Window {
    next: u64,
    end: u64,
}

impl Window {
    fn new(range: Range<u64>) -> Self {
        Self {
            next: range.start,
            end: range.end,
        }
    }

    fn allocate(&mut self, size: u64) -> Option<u64> {
        let base = self.next.checked_next_multiple_of(size)?;
        let end = base.checked_add(size)?;
        (end <= self.end).then(|| {
            self.next = end;
            base
        })
    }
}

#[derive(Debug, Clone)]
pub struct BarAllocator {
    io: Window,
    mmio32: Window,
    mmio64: Option<Window>,
}

impl Default for BarAllocator {
    fn default() -> Self {
        Self::new(IO_WINDOW, MMIO32_WINDOW, None)
    }
}

impl BarAllocator {
    pub fn new(io: Range<u64>, mmio32: Range<u64>, mmio64: Option<Range<u64>>) -> Self {
        Self {
            io: Window::new(io),
            mmio32: Window::new(mmio32),
            mmio64: mmio64.map(Window::new),
        }
    }

    /// A base for a BAR of `size` bytes (a power of two). 64-bit BARs go below 4 GiB while the
    /// 32-bit window has room, so guests that identity-map only 4 GiB reach them.
    pub fn allocate(&mut self, kind: BarKind, size: u64) -> Option<u64> {
        match kind {
            BarKind::Io => self.io.allocate(size),
            BarKind::Mem32 => self.mmio32.allocate(size),
            BarKind::Mem64 => self
                .mmio32
                .allocate(size)
                .or_else(|| self.mmio64.as_mut()?.allocate(size)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_are_naturally_aligned_and_do_not_overlap() {
        let mut a = BarAllocator::default();
        assert_eq!(a.allocate(BarKind::Mem32, 0x1000), Some(0xc000_0000));
        assert_eq!(a.allocate(BarKind::Mem64, 0x4000), Some(0xc000_4000));
        assert_eq!(a.allocate(BarKind::Mem32, 0x1000), Some(0xc000_8000));
        assert_eq!(a.allocate(BarKind::Io, 0x40), Some(0xc000));
        assert_eq!(a.allocate(BarKind::Io, 0x100), Some(0xc100));
    }

    #[test]
    fn exhausted_windows_return_none_and_64bit_bars_spill_above_4g() {
        let mut a = BarAllocator::new(
            0xc000..0xc080,
            0xc000_0000..0xc000_2000,
            Some(1 << 36..1 << 37),
        );
        assert!(a.allocate(BarKind::Io, 0x80).is_some());
        assert_eq!(a.allocate(BarKind::Io, 4), None);
        assert!(a.allocate(BarKind::Mem32, 0x2000).is_some());
        assert_eq!(a.allocate(BarKind::Mem32, 0x10), None);
        assert_eq!(a.allocate(BarKind::Mem64, 0x1000), Some(1 << 36));
    }
}
