//! Marking guest pages that the host wrote without going through `vm-memory`'s accessors.
//!
//! Writes through `Bytes` (used rings, status bytes, headers) mark guest RAM's dirty bitmap
//! themselves. Data that the kernel writes into guest buffers through host pointers (a block
//! read submitted to io_uring, a frame `readv` from a tap) does not: its device marks it here,
//! after the write has completed, so that a live migration collecting the bitmap either sees
//! the mark or copied the page after the write.

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::GuestMemoryMmap;

/// Marks `len` bytes at `addr` written. Ranges outside guest RAM are ignored: the device
/// checked every buffer before handing it to the host.
pub fn mark_written(mem: &GuestMemoryMmap, addr: GuestAddress, len: usize) {
    if len == 0 {
        return;
    }
    if let Ok(slice) = mem.get_slice(addr, len) {
        slice.bitmap().mark_dirty(0, len);
    }
}

/// Marks the first `written` bytes of `segments` (guest address, length), in order.
pub fn mark_segments_written(
    mem: &GuestMemoryMmap,
    segments: impl IntoIterator<Item = (GuestAddress, usize)>,
    mut written: usize,
) {
    for (addr, len) in segments {
        if written == 0 {
            break;
        }
        let part = len.min(written);
        mark_written(mem, addr, part);
        written -= part;
    }
}

/// The page numbers set in one region's bitmap words.
pub fn pages(words: &[u64]) -> Vec<u64> {
    let mut pages = Vec::new();
    for (index, &word) in words.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            pages.push(index as u64 * 64 + u64::from(bits.trailing_zeros()));
            bits &= bits - 1;
        }
    }
    pages
}

/// Per RAM region, in order: a bitmap (one bit per 4 KiB page, 64 to a word) of the pages
/// written through guest memory since the last call, which clears them.
pub fn take_written(mem: &GuestMemoryMmap) -> Vec<Vec<u64>> {
    mem.iter()
        .map(|region| {
            let mapping: &vm_memory::MmapRegion<vm_memory::bitmap::AtomicBitmap> = region;
            mapping.bitmap().get_and_reset()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn dirty_pages(mem: &GuestMemoryMmap) -> Vec<u64> {
        pages(&take_written(mem)[0])
    }

    #[test]
    fn host_writes_are_marked_only_where_they_landed() {
        let mem = crate::test_utils::guest_memory(64 << 12);
        mark_segments_written(
            &mem,
            [(GuestAddress(0x1ff0), 0x20), (GuestAddress(0x8000), 0x3000)],
            0x20 + 0x1001,
        );
        // The first segment straddles pages 1 and 2; of the second only 0x1001 bytes were
        // written: pages 8 and 9.
        assert_eq!(dirty_pages(&mem), vec![1, 2, 8, 9]);
        // Taken: cleared.
        assert_eq!(dirty_pages(&mem), Vec::<u64>::new());
        // Out of range: ignored, nothing marked, no panic.
        mark_written(&mem, GuestAddress(64 << 12), 16);
        assert_eq!(dirty_pages(&mem), Vec::<u64>::new());
    }

    #[test]
    fn writes_through_vm_memory_mark_the_bitmap_by_themselves() {
        let mem = crate::test_utils::guest_memory(64 << 12);
        mem.write_obj(7u16, GuestAddress(0x5002)).unwrap();
        assert_eq!(dirty_pages(&mem), vec![5]);
    }
}
