//! kickvm's test guest: a freestanding PVH program whose work runs at CPL3.
//!
//! `boot.rs` is the only CPL0 code. The BSP enters `bsp_main`, reads the
//! command line, finds the CPUs, starts the APs and runs the workload named
//! by `workload=`, printing `RESULT ...` and `DONE status=...` lines on COM1.

#![no_std]
#![no_main]

mod acpi;
mod blk;
mod boot;
mod dma;
mod ioapic;
mod lapic;
mod mem;
mod net;
mod paging;
mod pci;
mod power_button;
mod serial;
mod smp;
mod start_info;
mod sync;
mod topology;
mod tsc;
mod virtio;
mod workloads;
mod x86;

use core::fmt::Write as _;
use start_info::{Cmdline, MemmapEntry, StartInfo};

/// What a run learned at boot, handed to the workload.
pub struct Boot {
    pub cmdline: Cmdline,
    pub memmap: &'static [MemmapEntry],
    pub cpus_listed: usize,
    pub cpus_started: usize,
    pub cpu_source: &'static str,
    pub aps_all_started: bool,
    pub tsc_source: tsc::Source,
    /// The GSI of the ACPI power button's GED, if the platform has one.
    pub power_button_gsi: Option<u32>,
}

const CMDLINE_COPY_BYTES: usize = 4096;
const MEMMAP_COPY_ENTRIES: usize = 128;
static mut CMDLINE_COPY: [u8; CMDLINE_COPY_BYTES] = [0; CMDLINE_COPY_BYTES];
static mut MEMMAP_COPY: [MemmapEntry; MEMMAP_COPY_ENTRIES] = [MemmapEntry {
    addr: 0,
    size: 0,
    kind: 0,
    reserved: 0,
}; MEMMAP_COPY_ENTRIES];
const AP_START_TIMEOUT_MS: u64 = 5000;

/// Copies what the loader passed into the image, so low memory (the AP
/// trampoline goes to 0x8000) can be reused.
fn copy_start_info(info: &StartInfo) -> (Cmdline, &'static [MemmapEntry]) {
    // SAFETY: the BSP runs this once, before any other CPU is started.
    unsafe {
        let cmdline_copy = &mut *core::ptr::addr_of_mut!(CMDLINE_COPY);
        let len = info.cmdline.len().min(CMDLINE_COPY_BYTES);
        cmdline_copy[..len].copy_from_slice(&info.cmdline.as_bytes()[..len]);
        let cmdline = core::str::from_utf8(&cmdline_copy[..len]).unwrap_or("");
        let memmap_copy = &mut *core::ptr::addr_of_mut!(MEMMAP_COPY);
        let entries = info.memmap.len().min(MEMMAP_COPY_ENTRIES);
        memmap_copy[..entries].copy_from_slice(&info.memmap[..entries]);
        (Cmdline(cmdline), &memmap_copy[..entries])
    }
}

#[no_mangle]
extern "C" fn bsp_main() -> ! {
    serial::init();
    lapic::enable();
    smp::init_bsp();
    // SAFETY: written once by the PVH entry before any Rust ran.
    let paddr = unsafe { core::ptr::read_volatile(&boot::start_info_paddr) } as u64;
    let Some(info) = StartInfo::read(paddr) else {
        println!("RESULT workload=unknown status=fail reason=no-pvh-start-info");
        finish(false);
    };
    let (cmdline, memmap) = copy_start_info(&info);
    dma::init(memmap);
    let tsc_source = tsc::init();
    let cpus = topology::discover(info.rsdp_paddr);
    let (cpus_listed, cpu_source) = match &cpus {
        Some(c) => (c.count + c.dropped, c.source),
        None => (1, "none"),
    };
    let cpus_started = match &cpus {
        Some(c) => smp::start_aps(c, AP_START_TIMEOUT_MS),
        None => 1,
    };
    ioapic::init(info.rsdp_paddr);
    let power_button_gsi = power_button::arm(info.rsdp_paddr, lapic::id());
    let boot = Boot {
        cmdline,
        memmap,
        cpus_listed,
        cpus_started,
        cpu_source,
        // CPUs the guest cannot start (beyond MAX_CPUS, or x2APIC ids) count as
        // not started.
        aps_all_started: cpus_started == cpus_listed,
        tsc_source,
        power_button_gsi,
    };
    let ok = workloads::run(&boot);
    finish(ok);
}

/// Prints `DONE`, then ends the VM: i8042 reset, and ACPI S5 for VMMs
/// (cloud-hypervisor) that ignore the reset. After a power-button press the
/// guest powers off (S5) instead, as the button asked.
pub fn finish(ok: bool) -> ! {
    println!("DONE status={}", if ok { "ok" } else { "fail" });
    if power_button::pressed() {
        x86::outb(0x600, 0x34);
    }
    x86::outb(0x64, 0xFE);
    x86::outb(0x600, 0x34);
    loop {
        x86::pause();
    }
}

#[repr(C)]
struct ExceptionFrame {
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

/// Every CPU exception (vectors 0-31) ends the run here, at CPL3.
#[no_mangle]
extern "C" fn exception_handler(frame: &ExceptionFrame) -> ! {
    let mut line = serial::Line::new();
    let _ = write!(
        line,
        "EXCEPTION vector={} error={:#x} rip={:#x} rsp={:#x} cpu={}",
        frame.vector,
        frame.error,
        frame.rip,
        frame.rsp,
        lapic::id()
    );
    if frame.vector == 14 {
        let _ = write!(line, " (page fault; cr2 unreadable at CPL3)");
    }
    drop(line);
    let _ = frame.cs + frame.rflags + frame.ss;
    finish(false);
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut line = serial::Line::new();
    let _ = write!(line, "PANIC {}", info.message());
    if let Some(loc) = info.location() {
        let _ = write!(line, " at {}:{}", loc.file(), loc.line());
    }
    drop(line);
    finish(false);
}

#[no_mangle]
extern "C" fn rust_eh_personality() {}
