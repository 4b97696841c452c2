//! Everything that runs at CPL0: the PVH entry, the AP trampoline, the
//! interrupt stubs and the static tables they use (page tables, GDT, IDT, TSS).
//!
//! CPL0 code is emulated one instruction at a time under PVM (~1 µs each) and
//! may not use SSE, so it is a few dozen hand-written instructions; the tables
//! are built at link time (`link.ld` splits addresses into descriptor fields).
//! All Rust code runs at CPL3.

use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

/// Upper bound on the CPUs the guest brings up (GDT TSS slots, stacks).
pub const MAX_CPUS: usize = 64;
/// GDT selector of the first TSS; CPU `i` uses `FIRST_TSS_SELECTOR + 16 * i`.
pub const FIRST_TSS_SELECTOR: usize = 0x30;
/// Bytes in a TSS with its I/O permission bitmap and terminator byte.
pub const TSS_BYTES: usize = 104 + 8192 + 1;
/// Physical address the AP trampoline is copied to (SIPI vector 0x08).
pub const AP_TRAMPOLINE_ADDR: usize = 0x8000;
/// Every CPU's stacks live in one fixed 256 KiB block from STACKS_BASE, each
/// stack above an unmapped guard page (4 KiB page tables cover the region):
/// guard, kernel (RSP0) stack, guard, user stack. An overflow faults (under
/// PVM a triple fault with CR2 in the guard page, since the exception handler
/// runs on the same stack) instead of silently overwriting what lies below.
pub const STACKS_BASE: u64 = 0x100_0000;
pub const CPU_STACKS_BYTES: u64 = 256 * 1024;
pub const STACKS_END: u64 = STACKS_BASE + MAX_CPUS as u64 * CPU_STACKS_BYTES;
const KERNEL_STACK_TOP: u64 = 12 * 1024;

pub fn kernel_stack_top(cpu: usize) -> u64 {
    STACKS_BASE + cpu as u64 * CPU_STACKS_BYTES + KERNEL_STACK_TOP
}

pub fn user_stack_top(cpu: usize) -> u64 {
    STACKS_BASE + (cpu as u64 + 1) * CPU_STACKS_BYTES
}

/// Interrupts taken per vector (all CPUs), counted by the CPL0 stubs.
#[no_mangle]
pub static INTERRUPT_COUNTS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];

/// Vectors of the PCI INTx lines (GSIs 16..23, `irq=intx`): one per line.
pub const INTX_FIRST_VECTOR: u8 = 0x38;
pub const INTX_LINES: usize = 8;
/// Four 8-byte entries: the stub finds a line's with a shift by 5.
const INTX_SOURCES_PER_LINE: usize = 4;
const _: () = assert!(INTX_SOURCES_PER_LINE * 8 == 1 << 5);
/// Marks an [`INTX_SOURCES`] entry as an I/O port (low 16 bits) rather than an
/// MMIO address.
pub const INTX_SOURCE_PORT: u64 = 1 << 63;

/// Per INTx vector, the ISR registers the CPL0 stub reads (which clears them)
/// before its EOI: the devices sharing that line. 0 = unused.
#[no_mangle]
pub static INTX_SOURCES: [[AtomicU64; INTX_SOURCES_PER_LINE]; INTX_LINES] =
    [const { [const { AtomicU64::new(0) }; INTX_SOURCES_PER_LINE] }; INTX_LINES];

/// Has the INTx vector `vector`'s stub read `source` (an MMIO address, or a
/// port with [`INTX_SOURCE_PORT`]). False if the vector is not an INTx one or
/// its line has no room left.
pub fn add_intx_source(vector: u8, source: u64) -> bool {
    let Some(line) = INTX_SOURCES.get(vector.wrapping_sub(INTX_FIRST_VECTOR) as usize) else {
        return false;
    };
    line.iter().any(|slot| {
        slot.compare_exchange(0, source, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    })
}

/// Has the INTx stubs read `new` wherever they read `old` (the device's BAR
/// moved).
pub fn replace_intx_source(old: u64, new: u64) {
    for slot in INTX_SOURCES.iter().flatten() {
        let _ = slot.compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// Per-CPU values an AP's CPL0 entry needs: its kernel (RSP0) stack top and
/// its user stack top. Index 0 (the BSP) is unused. Written by the BSP before
/// it sends SIPIs.
#[repr(C)]
pub struct ApBootSlot {
    pub kernel_stack_top: u64,
    pub user_stack_top: u64,
}

#[no_mangle]
pub static mut AP_BOOT_SLOTS: [ApBootSlot; MAX_CPUS] = [const {
    ApBootSlot {
        kernel_stack_top: 0,
        user_stack_top: 0,
    }
}; MAX_CPUS];

/// Maps an xAPIC id to the guest's CPU index (0xFF: not a CPU we started).
#[no_mangle]
pub static mut APIC_ID_TO_CPU: [u8; 256] = [0xFF; 256];

extern "C" {
    /// The `hvm_start_info` address the PVH entry received in `ebx`.
    pub static start_info_paddr: u32;
    #[link_name = "gdt"]
    pub static mut GDT: [u64; 6 + 2 * MAX_CPUS];
    pub static ap_trampoline_start: u8;
    pub static ap_trampoline_end: u8;
    /// The IDT; user-writable like everything in the identity map.
    #[link_name = "idt"]
    pub static mut IDT: [u64; 2 * 256];
}

global_asm!(
    r#"
    .set MAX_CPUS, {max_cpus}
    .set STACKS_BASE, {stacks_base}
    .set CPU_STACKS, {cpu_stacks}
    .set BSP_KERNEL_TOP, STACKS_BASE + {kernel_top}
    .set BSP_USER_TOP, STACKS_BASE + CPU_STACKS
    .set STACK_PD_FIRST, STACKS_BASE >> 21
    .set STACK_PDS, (MAX_CPUS * CPU_STACKS) >> 21

    .set USER_DATA, 0x1b
    .set USER_CODE, 0x23
    .set KERNEL_CODE, 0x08
    .set CR4_BITS, 0x620          /* PAE | OSFXSR | OSXMMEXCPT */
    .set CR0_BITS, 0x80010023     /* PG | WP | NE | MP | PE */
    .set EFER_MSR, 0xC0000080
    .set EFER_LME, 0x100

    /* ---- PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY ---- */
    .section .note.pvh, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long pvh_entry32

    /* ---- BSP entry: 32-bit protected mode, paging off, no stack ---- */
    .section .text.boot, "ax"
    .code32
    .global pvh_entry32
pvh_entry32:
    cli
    movl $BSP_KERNEL_TOP, %esp
    movl %ebx, start_info_paddr
    lgdt gdt_ptr
    movl $CR4_BITS, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $EFER_MSR, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl $CR0_BITS, %eax
    movl %eax, %cr0
    ljmp $KERNEL_CODE, $bsp_entry64

    .code64
bsp_entry64:
    lidt idt_ptr(%rip)
    movw ${first_tss}, %ax
    ltr %ax
    /* Mask both 8259s: firmware leaves the PIT running. */
    movb $0xff, %al
    outb %al, $0x21
    outb %al, $0xa1
    pushq $USER_DATA
    pushq $(BSP_USER_TOP - 8)
    pushq $0x202
    pushq $USER_CODE
    pushq $bsp_main
    iretq

    /* ---- AP entry, reached from the trampoline in 64-bit mode ---- */
ap_entry64:
    movl $0xFEE00020, %eax
    movl (%rax), %eax
    shrl $24, %eax
    movzbl APIC_ID_TO_CPU(%rax), %edi
    movl %edi, %ecx
    shll $4, %ecx
    movq AP_BOOT_SLOTS(%rcx), %rsp
    lidt idt_ptr(%rip)
    leal {first_tss}(%rcx), %eax
    ltr %ax
    pushq $USER_DATA
    pushq AP_BOOT_SLOTS+8(%rcx)
    pushq $0x202
    pushq $USER_CODE
    pushq $ap_main
    iretq

    /* ---- AP trampoline: copied to 0x8000, entered in real mode ---- */
    .section .rodata.ap_trampoline, "a"
    .code16
    .global ap_trampoline_start
    .global ap_trampoline_end
ap_trampoline_start:
    cli
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (ap_gdt_ptr - ap_trampoline_start)
    movl $CR4_BITS, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $EFER_MSR, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl $CR0_BITS, %eax
    movl %eax, %cr0
    ljmpl $KERNEL_CODE, $ap_entry64
    .balign 8
ap_gdt_ptr:
    .short gdt_end - gdt - 1
    .long gdt
ap_trampoline_end:
    .code64

    /* ---- exception stubs: DPL-3 code, no privilege change ---- */
    .section .text.exception_stubs, "ax"
    .global exception_stubs
    .balign 4096
exception_stubs:
    .set vec, 0
    .rept 32
    .balign 16
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp exception_common
    .set vec, vec + 1
    .endr

exception_common:
    movq %rsp, %rdi
    andq $-16, %rsp
    call exception_handler
    ud2

    /* ---- interrupt stubs: vectors 32..255, CPL0 (TSS.RSP0 stack) ---- */
    .section .text.interrupt_stubs, "ax"
    .global interrupt_stubs
    .balign 4096
interrupt_stubs:
    .set vec, 32
    .rept 224
    .balign 16
    pushq %rax
    movl $vec, %eax
    .if vec == {spurious}
    jmp spurious_common
    .elseif vec == {halt}
    jmp halt_common
    .elseif (vec >= {intx_first}) && (vec < {intx_first} + {intx_lines})
    jmp intx_common
    .else
    jmp interrupt_common
    .endif
    .set vec, vec + 1
    .endr

    /* A level-triggered PCI INTx line: the ISR of every device on it is read
       before the EOI, as an OS's handler does. Reading clears it; a line whose
       ISR is still set at the EOI is raised again by the VMM (KVM's resample),
       so without this each completion would interrupt until CPL3 got to it.
       Entries: 0 unused, bit 63 an I/O port, else an MMIO address. */
intx_common:
    pushq %rdx
    pushq %rsi
    pushq %rcx
    movq %rax, %rsi
    subq ${intx_first}, %rsi
    shlq $5, %rsi
    leaq INTX_SOURCES(%rsi), %rsi
    movl ${intx_per_line}, %ecx
1:
    movq (%rsi), %rdx
    testq %rdx, %rdx
    jz 3f
    js 2f
    movb (%rdx), %dl
    jmp 3f
2:
    pushq %rax
    inb %dx, %al
    popq %rax
3:
    addq $8, %rsi
    decl %ecx
    jnz 1b
    popq %rcx
    popq %rsi
    popq %rdx

interrupt_common:
    lock incq INTERRUPT_COUNTS(,%rax,8)
    movl $0xFEE000B0, %eax
    movl $0, (%rax)
    popq %rax
    iretq

    /* The halt vector (lapic::halt_until_changed): entered by a self-IPI with
       %rdi = &counter, %rsi = the value seen. EOI first (a power-button press
       shares this priority class), then sleep unless the counter moved: the
       check runs with IF=0 and `sti; hlt` opens no window, so an interrupt
       that came first is never slept through. %ecx = 1 tells the sender the
       handler ran; iretq restores no general registers. */
halt_common:
    movl $0xFEE000B0, %eax
    movl $0, (%rax)
    popq %rax
    movl $1, %ecx
    cmpq %rsi, (%rdi)
    jne 1f
    sti
    hlt
1:
    iretq

    /* The APIC's spurious vector: counted, but not in service, so no EOI. */
spurious_common:
    lock incq INTERRUPT_COUNTS(,%rax,8)
    popq %rax
    iretq

    /* ---- tables ---- */
    .section .data.boot_tables, "aw"
    .balign 4096
    .global pml4
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x7
    .quad pd + 0x1000 + 0x7
    .quad pd + 0x2000 + 0x7
    .quad pd + 0x3000 + 0x7
    .fill 508, 8, 0
    /* 0..4 GiB in 2 MiB pages, user accessible; 3..4 GiB (PCI holes,
       IOAPIC, LAPIC) uncached. */
pd:
    .set page, 0
    .rept 2048
    .if (page >= STACK_PD_FIRST) && (page < STACK_PD_FIRST + STACK_PDS)
    .quad stack_pts + ((page - STACK_PD_FIRST) << 12) + 0x7
    .elseif page >= 1536
    .quad (page << 21) + 0x9f
    .else
    .quad (page << 21) + 0x87
    .endif
    .set page, page + 1
    .endr

    .balign 16
    .global gdt
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF      /* 0x08 kernel code, 64-bit */
    .quad 0x00CF92000000FFFF      /* 0x10 kernel data */
    .quad 0x00CFF2000000FFFF      /* 0x18 user data */
    .quad 0x00AFFA000000FFFF      /* 0x20 user code, 64-bit */
    .quad 0                       /* 0x28 unused */
    .quad BSP_TSS_DESC_LO         /* 0x30 CPU 0 TSS; CPU i at 0x30 + 16 * i */
    .quad BSP_TSS_DESC_HI
    .fill 2 * (MAX_CPUS - 1), 8, 0
gdt_end:

    .balign 16
    .short 0
gdt_ptr:
    .short gdt_end - gdt - 1
    .quad gdt

    .balign 16
    .short 0
idt_ptr:
    .short 256 * 16 - 1
    .quad idt

    .global start_info_paddr
start_info_paddr:
    .long 0

    .balign 16
    .global idt
idt:
    .set vec, 0
    .rept 32
    /* No IST: PVM cannot deliver an exception through an IST gate to CPL3
       (a triple fault, measured), so a handler runs on the faulting stack. */
    .quad EXCEPTION_GATE_LO + vec * 16
    .quad EXCEPTION_GATE_HI
    .set vec, vec + 1
    .endr
    .set vec, 0
    .rept 224
    .quad INTERRUPT_GATE_LO + vec * 16
    .quad INTERRUPT_GATE_HI
    .set vec, vec + 1
    .endr

    /* CPU 0's TSS: RSP0 and an all-zero I/O bitmap (every port allowed at
       CPL3; PVM ignores IOPL) ended by the 0xff byte. */
    .balign 16
    .global bsp_tss
bsp_tss:
    .long 0
    .quad BSP_KERNEL_TOP
    .fill 88, 1, 0
    .short 0
    .short 104
    .fill 8192, 1, 0
    .byte 0xff

    /* 4 KiB pages for the stack region; pages 0 and 3 of each CPU's block
       are guards (see STACKS_BASE). */
    .balign 4096
stack_pts:
    .set page, 0
    .rept STACK_PDS * 512
    .if ((page % (CPU_STACKS >> 12)) == 0) || ((page % (CPU_STACKS >> 12)) == 3)
    .quad 0
    .else
    .quad STACKS_BASE + (page << 12) + 0x7
    .endif
    .set page, page + 1
    .endr
"#,
    max_cpus = const MAX_CPUS,
    stacks_base = const STACKS_BASE,
    cpu_stacks = const CPU_STACKS_BYTES,
    kernel_top = const KERNEL_STACK_TOP,
    first_tss = const FIRST_TSS_SELECTOR,
    spurious = const crate::lapic::SPURIOUS_VECTOR,
    halt = const crate::lapic::HALT_VECTOR,
    intx_first = const INTX_FIRST_VECTOR,
    intx_lines = const INTX_LINES,
    intx_per_line = const INTX_SOURCES_PER_LINE,
    options(att_syntax)
);
