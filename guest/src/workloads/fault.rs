//! `workload=fault`: a deliberate triple fault, so VMMs can show they report
//! a crashed guest. Software interrupts (`int N`) from CPL3 do not reach the
//! guest's IDT under PVM, so the fault is made without CPL0 code: CPL3 clears
//! the (user-writable) IDT, then raises #UD, whose delivery fails, as do the
//! #NP and #DF that follow.

use crate::boot::IDT;
use crate::println;

pub fn run() -> bool {
    println!("RESULT workload=fault status=ok action=triple-fault");
    // SAFETY: deliberately ends the VM; the IDT is never used again.
    unsafe {
        let idt = core::ptr::addr_of_mut!(IDT) as *mut u64;
        for i in 0..2 * 256 {
            idt.add(i).write_volatile(0);
        }
        core::arch::asm!("ud2", options(noreturn));
    }
}

/// `workload=exception`: a CPU exception at CPL3 with the IDT intact; the
/// handler reports it (`EXCEPTION vector=6 ...`) and the run fails.
pub fn run_exception() -> bool {
    // SAFETY: ud2 raises #UD, whose handler ends the run.
    unsafe { core::arch::asm!("ud2", options(noreturn)) };
}
