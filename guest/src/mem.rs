//! The memory functions the compiler calls. The host target leaves them to
//! libc, which this freestanding guest does not link. Volatile accesses keep
//! LLVM from recognising the loops and turning them back into calls.

use core::ptr::{read_volatile, write_volatile};

const WORD: usize = core::mem::size_of::<u64>();

fn both_aligned(a: usize, b: usize) -> bool {
    (a | b).is_multiple_of(WORD)
}

/// # Safety
/// Standard C `memcpy` contract.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    let mut i = 0;
    if both_aligned(dest as usize, src as usize) {
        while i + WORD <= n {
            // SAFETY: in bounds per the memcpy contract, and 8-byte aligned.
            unsafe {
                write_volatile(
                    dest.add(i) as *mut u64,
                    read_volatile(src.add(i) as *const u64),
                )
            };
            i += WORD;
        }
    }
    while i < n {
        // SAFETY: in bounds per the memcpy contract.
        unsafe { write_volatile(dest.add(i), read_volatile(src.add(i))) };
        i += 1;
    }
    dest
}

/// # Safety
/// Standard C `memmove` contract.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize) <= (src as usize) || (dest as usize) >= (src as usize) + n {
        // SAFETY: a forward copy is correct when dest does not start inside src.
        return unsafe { memcpy(dest, src, n) };
    }
    let mut i = n;
    while i > 0 {
        i -= 1;
        // SAFETY: in bounds per the memmove contract; backwards for overlap.
        unsafe { write_volatile(dest.add(i), read_volatile(src.add(i))) };
    }
    dest
}

/// # Safety
/// Standard C `memset` contract.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, value: i32, n: usize) -> *mut u8 {
    let byte = value as u8;
    let mut i = 0;
    if (dest as usize).is_multiple_of(WORD) {
        let word = u64::from_ne_bytes([byte; WORD]);
        while i + WORD <= n {
            // SAFETY: in bounds per the memset contract, and 8-byte aligned.
            unsafe { write_volatile(dest.add(i) as *mut u64, word) };
            i += WORD;
        }
    }
    while i < n {
        // SAFETY: in bounds per the memset contract.
        unsafe { write_volatile(dest.add(i), byte) };
        i += 1;
    }
    dest
}

/// # Safety
/// Standard C `memcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: in bounds per the memcmp contract.
        let (x, y) = unsafe { (read_volatile(a.add(i)), read_volatile(b.add(i))) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// # Safety
/// Standard C `bcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
