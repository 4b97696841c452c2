//! Memory for rings and data buffers: a bump allocator over RAM from the
//! PVH memory map, above the image. Physical = virtual (identity map), so an
//! allocation's address is what devices are given.

use crate::start_info::{MemmapEntry, MEMMAP_TYPE_RAM};
use core::sync::atomic::{AtomicU64, Ordering};

extern "C" {
    static __image_end: u8;
}

/// Keep allocations in the 4 GiB identity map, below the PCI hole.
const LIMIT: u64 = 0xC000_0000;
static NEXT: AtomicU64 = AtomicU64::new(0);
static END: AtomicU64 = AtomicU64::new(0);

/// Picks the largest RAM range above the image and below 3 GiB.
pub fn init(memmap: &[MemmapEntry]) {
    // SAFETY: only the symbol's address is used.
    let image_end = unsafe { &__image_end as *const u8 as u64 };
    let floor = (image_end.max(crate::boot::STACKS_END) + 0xFFFF) & !0xFFFF;
    let best = memmap
        .iter()
        .filter(|e| e.kind == MEMMAP_TYPE_RAM)
        .map(|e| (e.addr.max(floor), (e.addr + e.size).min(LIMIT)))
        .filter(|(start, end)| end > start)
        .max_by_key(|(start, end)| end - start);
    if let Some((start, end)) = best {
        NEXT.store(start, Ordering::Relaxed);
        END.store(end, Ordering::Relaxed);
    }
}

/// A zeroed, `align`-aligned block of `size` bytes, or `None` when RAM runs out.
pub fn alloc(size: usize, align: usize) -> Option<&'static mut [u8]> {
    let align = align.max(16) as u64;
    let mut start;
    loop {
        let next = NEXT.load(Ordering::Relaxed);
        start = (next + align - 1) & !(align - 1);
        let end = start.checked_add(size as u64)?;
        if next == 0 || end > END.load(Ordering::Relaxed) {
            return None;
        }
        if NEXT
            .compare_exchange(next, end, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            break;
        }
    }
    // SAFETY: [start, start + size) is RAM from the memory map, handed out
    // once by the bump pointer above.
    let block = unsafe { core::slice::from_raw_parts_mut(start as *mut u8, size) };
    block.fill(0);
    Some(block)
}

/// Allocates a `T`-array of `count` zeroed elements.
///
/// # Safety
/// All-zero bytes must be a valid `T`.
pub unsafe fn alloc_array<T>(count: usize) -> Option<&'static mut [T]> {
    let bytes = alloc(
        count * core::mem::size_of::<T>(),
        core::mem::align_of::<T>(),
    )?;
    // SAFETY: the block is sized and aligned for `count` `T`s and zeroed,
    // which the caller vouches is a valid `T`.
    Some(unsafe { core::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut T, count) })
}

pub fn phys<T: ?Sized>(p: &T) -> u64 {
    p as *const T as *const u8 as u64
}
