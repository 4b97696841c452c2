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

/// `workload=exception [kind=ud|pf]`: a CPU exception at CPL3 with the IDT
/// intact; the handler reports it (`EXCEPTION vector=6|14 ...`) and the run
/// fails. `pf` reads the unmapped guard page at the bottom of the stacks.
pub fn run_exception(boot: &crate::Boot) -> bool {
    if boot.cmdline.get("kind") == Some("pf") {
        // SAFETY: deliberately faults; the page is a guard page, never mapped.
        let value = unsafe { core::ptr::read_volatile(crate::boot::STACKS_BASE as *const u64) };
        return value == 0;
    }
    // SAFETY: ud2 raises #UD, whose handler ends the run.
    unsafe { core::arch::asm!("ud2", options(noreturn)) };
}

/// `workload=stack-overflow`: unbounded recursion runs into the guard page
/// below the user stack. The #PF handler would run on that same stack (PVM
/// cannot deliver through an IST gate), so the VM triple-faults with CR2 in
/// the guard page: loud, where an unguarded overflow corrupted memory.
pub fn run_stack_overflow() -> bool {
    #[allow(unconditional_recursion)]
    fn recurse(depth: u64) -> u64 {
        let frame = [depth; 64];
        // black_box keeps the frame and the recursion from being optimised away.
        core::hint::black_box(&frame);
        recurse(depth + 1) + core::hint::black_box(frame[1])
    }
    recurse(0) > 0
}
