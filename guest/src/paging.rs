//! Mapping device memory above 4 GiB (boot.rs maps 0..4 GiB). The page
//! tables are user-writable like the rest of the identity map, so CPL3 adds
//! entries itself; a not-present entry is never cached, so no flush is needed.

use crate::sync::SpinLock;

const PAGE_2M: u64 = 1 << 21;
const PRESENT_WRITE_USER: u64 = 0x7;
const LARGE_UNCACHED: u64 = 0x80 | 0x18;
const TABLES: usize = 16;

#[repr(C, align(4096))]
struct Table([u64; 512]);

static mut SPARE: [Table; TABLES] = [const { Table([0; 512]) }; TABLES];
static NEXT_SPARE: SpinLock<usize> = SpinLock::new(0);

fn cr3() -> u64 {
    extern "C" {
        static pml4: u64;
    }
    // SAFETY: only the symbol's address is taken.
    unsafe { &pml4 as *const u64 as u64 }
}

/// The table an entry points to, allocating a spare one if it is empty.
fn next_level(entry: *mut u64, spare: &mut usize) -> Option<*mut u64> {
    // SAFETY: `entry` is a page-table entry inside the identity map.
    unsafe {
        let value = entry.read_volatile();
        if value & 1 != 0 {
            return Some((value & 0x000F_FFFF_FFFF_F000) as *mut u64);
        }
        if *spare >= TABLES {
            return None;
        }
        let table = core::ptr::addr_of_mut!(SPARE[*spare]) as *mut u64;
        *spare += 1;
        entry.write_volatile(table as u64 | PRESENT_WRITE_USER);
        Some(table)
    }
}

/// Identity-maps [addr, addr + len) with uncached 2 MiB user pages.
/// Returns false if the spare tables ran out.
pub fn map_device(addr: u64, len: u64) -> bool {
    if addr + len <= 1 << 32 {
        return true;
    }
    let mut spare = NEXT_SPARE.lock();
    let mut page = addr & !(PAGE_2M - 1);
    while page < addr + len {
        let pml4 = cr3() as *mut u64;
        let l4 = (page >> 39) & 511;
        let l3 = (page >> 30) & 511;
        let l2 = (page >> 21) & 511;
        // SAFETY: indexes are < 512 within 4 KiB tables.
        let Some(pdpt) = next_level(unsafe { pml4.add(l4 as usize) }, &mut spare) else {
            return false;
        };
        // SAFETY: as above.
        let Some(pd) = next_level(unsafe { pdpt.add(l3 as usize) }, &mut spare) else {
            return false;
        };
        // SAFETY: as above; the entry was not present or already maps this page.
        unsafe {
            pd.add(l2 as usize)
                .write_volatile(page | PRESENT_WRITE_USER | LARGE_UNCACHED)
        };
        page += PAGE_2M;
    }
    true
}
