//! The floor under every virtqueue kick: a bare KVM VM whose guest, running at CPL3 in long
//! mode, writes one 16-bit value to an MMIO address in a loop, as a modern virtio notify does.
//!
//! Three settings, interleaved over several rounds:
//! * `exit`: nothing claims the address, every write is a KVM_EXIT_MMIO back to this loop;
//! * `ioeventfd`: the address is a registered ioeventfd that nobody waits on;
//! * `ioeventfd+waiter`: the same, with a thread blocked in read(2) on the eventfd, as a device's
//!   I/O thread would be, so every write also wakes a thread.
//!
//! Usage: `kick-floor [--kicks N] [--rounds N]`. Prints one `FLOOR` line per setting with the
//! median and min-max of the per-kick cost in nanoseconds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 2 << 20;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const GDT: u64 = 0x4000;
const CODE: u64 = 0x10000;
const STACK_TOP: u64 = 0x1f_0000;
/// Just past RAM: no memory slot, so a write here is MMIO.
const NOTIFY_ADDR: u64 = 0x20_0000;
const DONE_ADDR: u64 = 0x20_0010;

/// `loop: mov [NOTIFY_ADDR], ax; dec rcx; jnz loop; mov byte [DONE_ADDR], 1; jmp loop`
const GUEST_CODE: [u8; 23] = [
    0x66, 0x89, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, 0x48, 0xff, 0xc9, 0x75, 0xf3, 0xc6, 0x04, 0x25,
    0x10, 0x00, 0x20, 0x00, 0x01, 0xeb, 0xe9,
];

struct Guest {
    _vm: VmFd,
    vcpu: VcpuFd,
    _mem: Mapping,
}

/// Anonymous host memory backing the guest's RAM.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> Result<Self> {
        // SAFETY: an anonymous private mapping with no address hint; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!(
                "mmap of guest memory failed: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    fn write(&mut self, addr: u64, bytes: &[u8]) {
        let start = addr as usize;
        assert!(start + bytes.len() <= self.len);
        // SAFETY: the range was just checked to lie inside the mapping, which we own.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(start), bytes.len()) }
    }

    fn write_u64(&mut self, addr: u64, value: u64) {
        self.write(addr, &value.to_le_bytes());
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; nothing uses the mapping after this.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 3,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn build_guest(kvm: &Kvm) -> Result<Guest> {
    let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
    let mut mem = Mapping::new(MEM_SIZE)?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem.ptr as u64,
        flags: 0,
    };
    // SAFETY: the region is backed by `mem`, which lives as long as the VM (both in `Guest`).
    unsafe { vm.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION")?;

    // Identity map of the first 4 MiB with user-accessible 2 MiB pages: RAM and the MMIO page.
    const PRESENT_RW_USER: u64 = 0x7;
    const HUGE: u64 = 0x80;
    mem.write_u64(PML4, PDPT | PRESENT_RW_USER);
    mem.write_u64(PDPT, PD | PRESENT_RW_USER);
    mem.write_u64(PD, PRESENT_RW_USER | HUGE);
    mem.write_u64(PD + 8, 0x20_0000 | PRESENT_RW_USER | HUGE);
    // GDT: null, kernel code/data, user data (0x2b), user code (0x33), like Linux's layout.
    let gdt: [u64; 7] = [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0,
        0,
        0x00cf_f300_0000_ffff,
        0x00af_fb00_0000_ffff,
    ];
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_u64(GDT + 8 * i as u64, *entry);
    }
    mem.write(CODE, &GUEST_CODE);

    let vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU")?;
    let mut sregs = vcpu.get_sregs()?;
    sregs.cr3 = PML4;
    sregs.cr4 = 1 << 5; // PAE
    sregs.cr0 = 0x8000_0001 | (1 << 16); // PG | PE | WP
    sregs.efer = (1 << 8) | (1 << 10); // LME | LMA
    sregs.gdt.base = GDT;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.cs = segment(0x33, true);
    let data = segment(0x2b, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.ss = data;
    sregs.fs = data;
    sregs.gs = data;
    vcpu.set_sregs(&sregs)?;
    Ok(Guest {
        _vm: vm,
        vcpu,
        _mem: mem,
    })
}

/// Runs `kicks` notify writes and returns the wall time per kick in nanoseconds.
fn run_round(guest: &mut Guest, kicks: u64) -> Result<f64> {
    let mut regs = guest.vcpu.get_regs()?;
    regs.rip = CODE;
    regs.rsp = STACK_TOP;
    regs.rcx = kicks;
    regs.rflags = 0x2;
    guest.vcpu.set_regs(&regs)?;
    let start = Instant::now();
    loop {
        match guest.vcpu.run().context("KVM_RUN")? {
            VcpuExit::MmioWrite(NOTIFY_ADDR, _) => {}
            VcpuExit::MmioWrite(DONE_ADDR, _) => break,
            other => bail!("unexpected exit from the floor guest: {other:?}"),
        }
    }
    Ok(start.elapsed().as_nanos() as f64 / kicks as f64)
}

#[derive(Clone, Copy, PartialEq)]
enum Setting {
    Exit,
    Ioeventfd,
    IoeventfdWithWaiter,
}

impl Setting {
    fn name(self) -> &'static str {
        match self {
            Setting::Exit => "exit",
            Setting::Ioeventfd => "ioeventfd",
            Setting::IoeventfdWithWaiter => "ioeventfd+waiter",
        }
    }
}

fn measure(kvm: &Kvm, setting: Setting, kicks: u64) -> Result<f64> {
    let mut guest = build_guest(kvm)?;
    let eventfd = EventFd::new(libc::EFD_NONBLOCK)?;
    if setting != Setting::Exit {
        guest
            ._vm
            .register_ioevent(&eventfd, &IoEventAddress::Mmio(NOTIFY_ADDR), NoDatamatch)
            .context("KVM_IOEVENTFD")?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let waiter = (setting == Setting::IoeventfdWithWaiter)
        .then(|| -> Result<_> {
            let fd = eventfd.try_clone()?;
            let stop = stop.clone();
            Ok(std::thread::spawn(move || {
                let mut pollfd = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&fd),
                    events: libc::POLLIN,
                    revents: 0,
                };
                while !stop.load(Ordering::Relaxed) {
                    // SAFETY: one valid pollfd for the duration of the call.
                    if unsafe { libc::poll(&mut pollfd, 1, 100) } > 0 {
                        let _ = fd.read();
                    }
                }
            }))
        })
        .transpose()?;
    // One short warm-up round faults in the guest pages and the exit path.
    run_round(&mut guest, 1000)?;
    let result = run_round(&mut guest, kicks);
    stop.store(true, Ordering::Relaxed);
    if let Some(handle) = waiter {
        let _ = handle.join();
    }
    result
}

fn parse_args() -> Result<(u64, usize)> {
    let mut kicks = 200_000;
    let mut rounds = 5;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> Result<u64> {
            args.next()
                .with_context(|| format!("{name} needs a value"))?
                .parse()
                .with_context(|| format!("{name} takes a positive number"))
        };
        match arg.as_str() {
            "--kicks" => kicks = value("--kicks")?,
            "--rounds" => rounds = value("--rounds")? as usize,
            "-h" | "--help" => {
                println!("usage: kick-floor [--kicks N] [--rounds N]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if kicks == 0 || rounds == 0 {
        bail!("--kicks and --rounds must be at least 1");
    }
    Ok((kicks, rounds))
}

fn main() {
    if let Err(e) = run() {
        eprintln!("kick-floor: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let (kicks, rounds) = parse_args()?;
    let kvm = Kvm::new().context("cannot open /dev/kvm")?;
    let settings = [
        Setting::Exit,
        Setting::Ioeventfd,
        Setting::IoeventfdWithWaiter,
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); settings.len()];
    for _ in 0..rounds {
        for (i, &setting) in settings.iter().enumerate() {
            samples[i].push(measure(&kvm, setting, kicks)?);
        }
    }
    for (setting, mut s) in settings.iter().zip(samples) {
        s.sort_by(f64::total_cmp);
        println!(
            "FLOOR setting={} ns_per_kick={:.0} min={:.0} max={:.0} rounds={} kicks={}",
            setting.name(),
            s[s.len() / 2],
            s[0],
            s[s.len() - 1],
            rounds,
            kicks
        );
    }
    Ok(())
}
