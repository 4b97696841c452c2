//! Thin wrappers over the x86 instructions the guest uses from CPL3. Port I/O
//! is allowed by the all-zero I/O bitmap in every CPU's TSS.

use core::arch::asm;

pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    };
    value
}

pub fn outw(port: u16, value: u16) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    };
}

pub fn inw(port: u16) -> u16 {
    let value: u16;
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe {
        asm!("in ax, dx", in("dx") port, out("ax") value, options(nomem, nostack, preserves_flags))
    };
    value
}

pub fn outl(port: u16, value: u32) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    };
}

pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    };
    value
}

pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads the time-stamp counter.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    ((hi as u64) << 32) | lo as u64
}

pub struct CpuidResult {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    #[allow(dead_code)] // part of the instruction's result; no caller needs it yet
    pub edx: u32,
}

pub fn cpuid(leaf: u32, subleaf: u32) -> CpuidResult {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    CpuidResult {
        eax: r.eax,
        ebx: r.ebx,
        ecx: r.ecx,
        edx: r.edx,
    }
}

pub fn pause() {
    core::hint::spin_loop();
}

/// Reads a 32-bit device register at a physical (identity-mapped) address.
pub fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: the caller names a device register inside the identity map.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

pub fn mmio_write32(addr: u64, value: u32) {
    // SAFETY: the caller names a device register inside the identity map.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

pub fn mmio_read16(addr: u64) -> u16 {
    // SAFETY: the caller names a device register inside the identity map.
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}

pub fn mmio_write16(addr: u64, value: u16) {
    // SAFETY: the caller names a device register inside the identity map.
    unsafe { core::ptr::write_volatile(addr as *mut u16, value) }
}

pub fn mmio_read8(addr: u64) -> u8 {
    // SAFETY: the caller names a device register inside the identity map.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

pub fn mmio_write8(addr: u64, value: u8) {
    // SAFETY: the caller names a device register inside the identity map.
    unsafe { core::ptr::write_volatile(addr as *mut u8, value) }
}

/// Reads `len` bytes of physical memory (identity mapped) as a slice.
///
/// # Safety
/// The range must be mapped, and nothing may write it while the slice lives.
pub unsafe fn phys_slice(addr: u64, len: usize) -> &'static [u8] {
    // SAFETY: forwarded to the caller.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len) }
}
