//! Starting the APs (INIT-SIPI-SIPI from CPL3) and giving them work.
//!
//! CPU index 0 is the BSP; APs get 1.. in firmware-table order. Each CPU has
//! its own TSS (RSP0 for interrupts, the I/O bitmap), kernel and user stack.
//! An AP that reached Rust reports in, then waits on its work slot.

use crate::boot;
use crate::boot::{
    ap_trampoline_end, ap_trampoline_start, ApBootSlot, APIC_ID_TO_CPU, AP_BOOT_SLOTS,
    AP_TRAMPOLINE_ADDR, FIRST_TSS_SELECTOR, GDT, MAX_CPUS, TSS_BYTES,
};
use crate::topology::Cpus;
use crate::{lapic, tsc, x86::pause};
use core::ptr::addr_of_mut;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, AtomicUsize, Ordering};

const TSS_RSP0_OFFSET: usize = 4;
const TSS_IOMAP_BASE_OFFSET: usize = 102;
const TSS_HEADER_BYTES: u16 = 104;

#[repr(C, align(16))]
struct Tss([u8; TSS_BYTES]);

// Index 0 (the BSP) uses the TSS in boot.rs.
static mut AP_TSS: [Tss; MAX_CPUS] = [const { Tss([0; TSS_BYTES]) }; MAX_CPUS];

static CPUS_STARTED: AtomicUsize = AtomicUsize::new(1);
static CPU_COUNT: AtomicUsize = AtomicUsize::new(1);
static STARTED: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
static APIC_IDS: [AtomicU8; MAX_CPUS] = [const { AtomicU8::new(0) }; MAX_CPUS];

/// Records the BSP's xAPIC id as CPU 0's.
pub fn init_bsp() {
    APIC_IDS[0].store(lapic::id(), Ordering::Relaxed);
}

/// The xAPIC id of CPU `index`.
pub fn apic_id(index: usize) -> u8 {
    APIC_IDS[index].load(Ordering::Relaxed)
}

/// Number of CPUs running Rust at CPL3 (BSP included).
pub fn started() -> usize {
    CPUS_STARTED.load(Ordering::Acquire)
}

/// Number of CPUs that are running and accept work (indexes 0..n).
pub fn online() -> usize {
    CPU_COUNT.load(Ordering::Acquire)
}

/// Fills in CPU `index`'s TSS, its GDT descriptor and its boot slot.
fn prepare_cpu(index: usize) {
    // SAFETY: the BSP alone writes these before the AP is sent a SIPI; the
    // AP reads them only after.
    unsafe {
        let tss = &mut (*addr_of_mut!(AP_TSS))[index].0;
        let kernel_top = boot::kernel_stack_top(index);
        let user_top = boot::user_stack_top(index);
        tss[TSS_RSP0_OFFSET..TSS_RSP0_OFFSET + 8].copy_from_slice(&kernel_top.to_le_bytes());
        tss[TSS_IOMAP_BASE_OFFSET..TSS_IOMAP_BASE_OFFSET + 2]
            .copy_from_slice(&TSS_HEADER_BYTES.to_le_bytes());
        tss[TSS_BYTES - 1] = 0xff;

        let base = tss.as_ptr() as u64;
        let limit = (TSS_BYTES - 1) as u64;
        let low = (limit & 0xffff)
            | (base & 0xff_ffff) << 16
            | 0x89 << 40 // present, DPL 0, available 64-bit TSS
            | ((limit >> 16) & 0xf) << 48
            | ((base >> 24) & 0xff) << 56;
        let slot = (FIRST_TSS_SELECTOR + 16 * index) / 8;
        let gdt = addr_of_mut!(GDT) as *mut u64;
        gdt.add(slot).write_volatile(low);
        gdt.add(slot + 1).write_volatile(base >> 32);

        (*addr_of_mut!(AP_BOOT_SLOTS))[index] = ApBootSlot {
            kernel_stack_top: kernel_top,
            // Rust is entered as if called: rsp % 16 == 8.
            user_stack_top: user_top - 8,
        };
    }
}

fn copy_trampoline() {
    // SAFETY: the trampoline is a byte blob in the image; 0x8000 is low RAM
    // (the loader's start info was copied out before this).
    unsafe {
        let start = &ap_trampoline_start as *const u8;
        let len = &ap_trampoline_end as *const u8 as usize - start as usize;
        core::ptr::copy_nonoverlapping(start, AP_TRAMPOLINE_ADDR as *mut u8, len);
    }
}

/// Starts every CPU in `cpus` but the one running this; waits up to
/// `timeout_ms` for each to report in. Returns how many CPUs run (BSP
/// included).
pub fn start_aps(cpus: &Cpus, timeout_ms: u64) -> usize {
    let bsp_id = lapic::id();
    let mut index_to_apic = [0u8; MAX_CPUS];
    let mut n = 1;
    for &id in cpus.ids() {
        if id == bsp_id || n >= MAX_CPUS {
            continue;
        }
        index_to_apic[n] = id;
        APIC_IDS[n].store(id, Ordering::Relaxed);
        // SAFETY: only the BSP writes the table, before any SIPI.
        unsafe { (*addr_of_mut!(APIC_ID_TO_CPU))[id as usize] = n as u8 };
        prepare_cpu(n);
        n += 1;
    }
    if n == 1 {
        return 1;
    }
    copy_trampoline();
    let sipi_page = (AP_TRAMPOLINE_ADDR >> 12) as u8;
    let all_started = || (1..n).all(|i| STARTED[i].load(Ordering::Acquire));

    for &id in &index_to_apic[1..n] {
        lapic::send_init(id);
    }
    // Modern and virtual CPUs need no 10 ms INIT settle time (Linux skips it).
    for &id in &index_to_apic[1..n] {
        lapic::send_startup(id, sipi_page);
    }
    let first_wait_end = tsc::now_ns() + 20_000_000;
    while !all_started() && tsc::now_ns() < first_wait_end {
        pause();
    }
    // The second SIPI of the INIT-SIPI-SIPI sequence, for CPUs that missed
    // the first; a CPU already running ignores it.
    for i in 1..n {
        if !STARTED[i].load(Ordering::Acquire) {
            lapic::send_startup(index_to_apic[i], sipi_page);
        }
    }
    let end = tsc::now_ns() + timeout_ms * 1_000_000;
    while !all_started() && tsc::now_ns() < end {
        pause();
    }
    // Only a contiguous prefix of indexes gets work.
    let online = (1..n)
        .find(|&i| !STARTED[i].load(Ordering::Acquire))
        .unwrap_or(n);
    CPU_COUNT.store(online, Ordering::Release);
    started()
}

/// A job for one CPU: `func(cpu_index, arg)`.
pub type Job = fn(usize, usize);

const SLOT_IDLE: u32 = 0;
const SLOT_POSTED: u32 = 1;
const SLOT_DONE: u32 = 2;

struct WorkSlot {
    state: AtomicU32,
    func: AtomicUsize,
    arg: AtomicUsize,
}

static WORK: [WorkSlot; MAX_CPUS] = [const {
    WorkSlot {
        state: AtomicU32::new(SLOT_IDLE),
        func: AtomicUsize::new(0),
        arg: AtomicUsize::new(0),
    }
}; MAX_CPUS];

/// Runs `job(cpu, arg)` on every online CPU (the caller runs index 0) and
/// returns when all have finished.
pub fn run_on_all(job: Job, arg: usize) {
    let n = online();
    for slot in &WORK[1..n] {
        slot.func.store(job as usize, Ordering::Relaxed);
        slot.arg.store(arg, Ordering::Relaxed);
        slot.state.store(SLOT_POSTED, Ordering::Release);
    }
    job(0, arg);
    for slot in &WORK[1..n] {
        while slot.state.load(Ordering::Acquire) != SLOT_DONE {
            pause();
        }
        slot.state.store(SLOT_IDLE, Ordering::Relaxed);
    }
}

/// Rust entry of every AP, at CPL3 on its own stack.
#[no_mangle]
extern "C" fn ap_main(cpu: usize) -> ! {
    lapic::enable();
    STARTED[cpu].store(true, Ordering::Release);
    CPUS_STARTED.fetch_add(1, Ordering::AcqRel);
    let slot = &WORK[cpu];
    loop {
        if slot.state.load(Ordering::Acquire) == SLOT_POSTED {
            let func = slot.func.load(Ordering::Relaxed);
            let arg = slot.arg.load(Ordering::Relaxed);
            // SAFETY: `run_on_all` stored a valid `Job` before posting.
            let job: Job = unsafe { core::mem::transmute::<usize, Job>(func) };
            job(cpu, arg);
            slot.state.store(SLOT_DONE, Ordering::Release);
        }
        pause();
    }
}
