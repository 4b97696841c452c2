//! vCPU threads: each runs KVM_RUN in a loop and dispatches port-I/O and MMIO exits to the
//! buses. A [`VcpuHandle`] lets the main thread kick its vCPU out of KVM_RUN (a signal that
//! sets `immediate_exit`, so a kick that lands just before KVM_RUN is not lost), and pause,
//! resume or stop it through a shared run state. A paused vCPU hands over its KVM state on
//! request ([`VcpuHandle::save_state`]), for snapshots.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use kickvm_bus::Bus;
use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::exit::{ExitNotifier, VmExitReason};
use super::snapshot::{SnapshotError, VcpuState};

/// Offset from SIGRTMIN of the signal that kicks a vCPU thread out of KVM_RUN.
const KICK_SIGNAL_OFFSET: i32 = 0;

fn kick_signal() -> i32 {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

thread_local! {
    /// This thread's kvm_run page, so the kick signal handler can set `immediate_exit`.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick_signal(
    _signal: libc::c_int,
    _info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set while the VcpuFd that
        // owns it is alive on this thread and cleared before it is dropped; a signal handler
        // on the same thread cannot race with the KVM_RUN caller, and the kernel reads the
        // field only on the next KVM_RUN.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// Installs the process-wide kick signal handler. Call once before starting vCPU threads.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), handle_kick_signal)
}

/// What the main thread wants a vCPU to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum VcpuRunState {
    Running = 0,
    Paused = 1,
    Stopping = 2,
}

impl VcpuRunState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => VcpuRunState::Running,
            1 => VcpuRunState::Paused,
            _ => VcpuRunState::Stopping,
        }
    }
}

/// Why KVM_RUN returned, for the per-vCPU exit counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    /// Kicked out (signal / immediate_exit): pause, stop, register dump.
    Interrupted,
    Hlt,
    Shutdown,
    SystemEvent,
    InternalError,
    FailEntry,
    Other,
}

impl ExitKind {
    pub const ALL: [ExitKind; 11] = [
        ExitKind::IoIn,
        ExitKind::IoOut,
        ExitKind::MmioRead,
        ExitKind::MmioWrite,
        ExitKind::Interrupted,
        ExitKind::Hlt,
        ExitKind::Shutdown,
        ExitKind::SystemEvent,
        ExitKind::InternalError,
        ExitKind::FailEntry,
        ExitKind::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ExitKind::IoIn => "io_in",
            ExitKind::IoOut => "io_out",
            ExitKind::MmioRead => "mmio_read",
            ExitKind::MmioWrite => "mmio_write",
            ExitKind::Interrupted => "interrupted",
            ExitKind::Hlt => "hlt",
            ExitKind::Shutdown => "shutdown",
            ExitKind::SystemEvent => "system_event",
            ExitKind::InternalError => "internal_error",
            ExitKind::FailEntry => "fail_entry",
            ExitKind::Other => "other",
        }
    }

    fn of(exit: &Result<VcpuExit, kvm_ioctls::Error>) -> Self {
        match exit {
            Ok(VcpuExit::IoIn(..)) => ExitKind::IoIn,
            Ok(VcpuExit::IoOut(..)) => ExitKind::IoOut,
            Ok(VcpuExit::MmioRead(..)) => ExitKind::MmioRead,
            Ok(VcpuExit::MmioWrite(..)) => ExitKind::MmioWrite,
            Ok(VcpuExit::Hlt) => ExitKind::Hlt,
            Ok(VcpuExit::Shutdown) => ExitKind::Shutdown,
            Ok(VcpuExit::SystemEvent(..)) => ExitKind::SystemEvent,
            Ok(VcpuExit::InternalError) => ExitKind::InternalError,
            Ok(VcpuExit::FailEntry(..)) => ExitKind::FailEntry,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                ExitKind::Interrupted
            }
            _ => ExitKind::Other,
        }
    }
}

/// Exit counts of one vCPU, readable from any thread.
#[derive(Debug, Default)]
pub struct VcpuStats {
    pub pio_exits: AtomicU64,
    pub mmio_exits: AtomicU64,
    pub unclaimed_accesses: AtomicU64,
    pub interrupted_runs: AtomicU64,
    /// Every KVM_RUN return by [`ExitKind`] (indexed by its discriminant): one relaxed add.
    exits: [AtomicU64; ExitKind::ALL.len()],
}

impl VcpuStats {
    pub fn exits(&self, kind: ExitKind) -> u64 {
        self.exits[kind as usize].load(Ordering::Relaxed)
    }
}

/// State shared between a vCPU thread and whoever controls it.
#[derive(Debug)]
pub struct VcpuShared {
    /// Requested state; read by the vCPU on every loop iteration (an atomic load).
    requested: AtomicU8,
    /// The state the vCPU thread has reached, for callers that wait for it (pause barrier).
    reached: Mutex<VcpuRunState>,
    changed: Condvar,
    /// Set by [`VcpuHandle::request_register_dump`]; the vCPU logs its registers when kicked.
    dump_registers: AtomicBool,
    /// Set by [`VcpuHandle::save_state`]; the parked vCPU answers in `saved_state`.
    save_requested: AtomicBool,
    saved_state: Mutex<Option<Result<VcpuState, SnapshotError>>>,
    pub stats: VcpuStats,
}

impl VcpuShared {
    fn new() -> Self {
        VcpuShared {
            requested: AtomicU8::new(VcpuRunState::Running as u8),
            reached: Mutex::new(VcpuRunState::Running),
            changed: Condvar::new(),
            dump_registers: AtomicBool::new(false),
            save_requested: AtomicBool::new(false),
            saved_state: Mutex::new(None),
            stats: VcpuStats::default(),
        }
    }

    fn requested(&self) -> VcpuRunState {
        VcpuRunState::from_u8(self.requested.load(Ordering::Acquire))
    }

    fn set_reached(&self, state: VcpuRunState) {
        *self.reached.lock().unwrap() = state;
        self.changed.notify_all();
    }
}

/// The main thread's handle on a running vCPU thread.
pub struct VcpuHandle {
    index: u8,
    shared: Arc<VcpuShared>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    pub fn index(&self) -> u8 {
        self.index
    }

    pub fn shared(&self) -> &Arc<VcpuShared> {
        &self.shared
    }

    /// Forces the vCPU out of KVM_RUN (or makes its next KVM_RUN return at once).
    pub fn kick(&self) {
        if let Some(thread) = &self.thread {
            // SAFETY: the pthread_t comes from a JoinHandle we still hold, so the thread has
            // not been joined and the id is valid; the signal has a handler installed.
            let ret = unsafe { libc::pthread_kill(thread.as_pthread_t(), kick_signal()) };
            if ret != 0 {
                log::debug!("kicking vCPU {}: pthread_kill returned {ret}", self.index);
            }
        }
    }

    fn request(&self, state: VcpuRunState) {
        let _guard = self.shared.reached.lock().unwrap();
        self.shared.requested.store(state as u8, Ordering::Release);
        self.shared.changed.notify_all();
        drop(_guard);
        self.kick();
    }

    /// Takes the vCPU out of guest mode and holds it until [`VcpuHandle::resume`]; returns once
    /// the vCPU thread is parked (or has stopped).
    pub fn pause(&self) {
        self.request(VcpuRunState::Paused);
        let reached = self.shared.reached.lock().unwrap();
        let _parked = self
            .shared
            .changed
            .wait_while(reached, |s| *s == VcpuRunState::Running)
            .unwrap();
    }

    pub fn resume(&self) {
        if self.shared.requested() == VcpuRunState::Paused {
            self.request(VcpuRunState::Running);
        }
    }

    /// The KVM state of this paused vCPU, read by its own thread (KVM takes vCPU ioctls only
    /// from the thread that runs it).
    pub fn save_state(&self) -> Result<VcpuState, SnapshotError> {
        *self.shared.saved_state.lock().unwrap() = None;
        self.shared.save_requested.store(true, Ordering::Release);
        let reached = self.shared.reached.lock().unwrap();
        if *reached != VcpuRunState::Paused {
            self.shared.save_requested.store(false, Ordering::Release);
            return Err(SnapshotError::NotPaused);
        }
        self.shared.changed.notify_all();
        let reached = self
            .shared
            .changed
            .wait_while(reached, |s| {
                *s == VcpuRunState::Paused && self.shared.saved_state.lock().unwrap().is_none()
            })
            .unwrap();
        drop(reached);
        self.shared
            .saved_state
            .lock()
            .unwrap()
            .take()
            .unwrap_or(Err(SnapshotError::VcpuGone(self.index)))
    }

    /// Makes the vCPU log its registers (at warn level) the next time it leaves KVM_RUN, which
    /// the kick forces: how a user sees where a silent guest is (SIGUSR1 to kickvm).
    pub fn request_register_dump(&self) {
        self.shared.dump_registers.store(true, Ordering::Release);
        self.kick();
    }

    /// Asks the vCPU thread to leave its loop; [`VcpuHandle::join`] waits for it.
    pub fn request_stop(&self) {
        self.request(VcpuRunState::Stopping);
    }

    pub fn join(mut self) {
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("vCPU {} thread panicked", self.index);
            }
        }
    }
}

/// A vCPU ready to run, moved into its thread by [`Vcpu::start`].
pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
    pub pio_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub exit: Arc<ExitNotifier>,
    /// The MSRs a snapshot saves (KVM's list of MSRs to save).
    pub msr_list: Arc<[u32]>,
}

impl Vcpu {
    pub fn start(self) -> std::io::Result<VcpuHandle> {
        let shared = Arc::new(VcpuShared::new());
        let index = self.index;
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || self.run(&thread_shared))?;
        Ok(VcpuHandle {
            index,
            shared,
            thread: Some(thread),
        })
    }

    fn run(mut self, shared: &VcpuShared) {
        KVM_RUN.with(|run| run.set(self.fd.get_kvm_run()));
        self.run_loop(shared);
        KVM_RUN.with(|run| run.set(std::ptr::null_mut()));
        shared.set_reached(VcpuRunState::Stopping);
        let stats = &shared.stats;
        log::debug!(
            "vCPU {} stopped: {} PIO exits, {} MMIO exits, {} unclaimed, {} interrupted",
            self.index,
            stats.pio_exits.load(Ordering::Relaxed),
            stats.mmio_exits.load(Ordering::Relaxed),
            stats.unclaimed_accesses.load(Ordering::Relaxed),
            stats.interrupted_runs.load(Ordering::Relaxed),
        );
    }

    fn run_loop(&mut self, shared: &VcpuShared) {
        loop {
            match shared.requested() {
                VcpuRunState::Running => {}
                VcpuRunState::Paused => {
                    if !self.wait_while_paused(shared) {
                        return;
                    }
                }
                VcpuRunState::Stopping => return,
            }
            match self.run_once(shared) {
                Ok(true) => {}
                Ok(false) => return,
                Err(reason) => {
                    self.exit.notify(reason);
                    return;
                }
            }
        }
    }

    /// Parks a paused vCPU until it is resumed (true) or stopped (false), handing over its
    /// state when asked.
    fn wait_while_paused(&mut self, shared: &VcpuShared) -> bool {
        let mut reached = shared.reached.lock().unwrap();
        *reached = VcpuRunState::Paused;
        shared.changed.notify_all();
        while shared.requested() == VcpuRunState::Paused {
            if shared.save_requested.swap(false, Ordering::AcqRel) {
                drop(reached);
                let state = self
                    .complete_pending_exit()
                    .and_then(|()| VcpuState::save(&self.fd, self.index, &self.msr_list));
                *shared.saved_state.lock().unwrap() = Some(state);
                reached = shared.reached.lock().unwrap();
                shared.changed.notify_all();
                continue;
            }
            reached = shared.changed.wait(reached).unwrap();
        }
        let requested = shared.requested();
        *reached = requested;
        shared.changed.notify_all();
        requested == VcpuRunState::Running
    }

    /// Lets KVM finish the instruction the last exit was for (an IN or MMIO read takes its
    /// value from kvm_run on the next KVM_RUN), without running guest code: KVM_RUN with
    /// `immediate_exit` completes it and returns EINTR. Saved before that, the registers
    /// would miss the value read.
    fn complete_pending_exit(&mut self) -> Result<(), SnapshotError> {
        self.fd.set_kvm_immediate_exit(1);
        let result = self.fd.run().map(|_| ());
        self.fd.set_kvm_immediate_exit(0);
        match result {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(source) => Err(SnapshotError::Vcpu {
                vcpu: self.index,
                what: "KVM_RUN (completing the last exit)",
                source,
            }),
            Ok(()) => Ok(()),
        }
    }

    /// One KVM_RUN and the handling of its exit. Ok(false): this vCPU is done (the VM is
    /// ending). The PIO/MMIO paths allocate nothing.
    fn run_once(&mut self, shared: &VcpuShared) -> Result<bool, VmExitReason> {
        let index = self.index;
        let stats = &shared.stats;
        let exit = self.fd.run();
        stats.exits[ExitKind::of(&exit) as usize].fetch_add(1, Ordering::Relaxed);
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                stats.pio_exits.fetch_add(1, Ordering::Relaxed);
                if !self.pio_bus.read(u64::from(port), data) {
                    stats.unclaimed_accesses.fetch_add(1, Ordering::Relaxed);
                    data.fill(0xff);
                    log::debug!("vCPU {index}: unclaimed port read {port:#x}");
                }
                Ok(true)
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                stats.pio_exits.fetch_add(1, Ordering::Relaxed);
                if !self.pio_bus.write(u64::from(port), data) {
                    stats.unclaimed_accesses.fetch_add(1, Ordering::Relaxed);
                    log::debug!("vCPU {index}: unclaimed port write {port:#x} <- {data:x?}");
                }
                Ok(true)
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                stats.mmio_exits.fetch_add(1, Ordering::Relaxed);
                if !self.mmio_bus.read(addr, data) {
                    stats.unclaimed_accesses.fetch_add(1, Ordering::Relaxed);
                    data.fill(0xff);
                    log::debug!("vCPU {index}: unclaimed MMIO read {addr:#x}");
                }
                Ok(true)
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                stats.mmio_exits.fetch_add(1, Ordering::Relaxed);
                if !self.mmio_bus.write(addr, data) {
                    stats.unclaimed_accesses.fetch_add(1, Ordering::Relaxed);
                    log::debug!("vCPU {index}: unclaimed MMIO write {addr:#x} <- {data:x?}");
                }
                Ok(true)
            }
            Ok(VcpuExit::Shutdown) => Err(VmExitReason::Crashed {
                vcpu: index,
                detail: "triple fault (KVM_EXIT_SHUTDOWN)".into(),
                registers: describe_registers(&self.fd),
            }),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Err(VmExitReason::PowerOff),
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => Err(VmExitReason::Reset),
                _ => Err(VmExitReason::Crashed {
                    vcpu: index,
                    detail: format!("KVM system event {kind}"),
                    registers: describe_registers(&self.fd),
                }),
            },
            Ok(VcpuExit::Hlt) => {
                // With the in-kernel LAPIC KVM handles HLT itself; an HLT exit means this vCPU
                // cannot be woken again.
                log::info!("vCPU {index} halted for good");
                Ok(false)
            }
            Ok(VcpuExit::InternalError) => {
                if self.complete_unemulated_instruction() {
                    return Ok(true);
                }
                let detail = internal_error_detail(&mut self.fd);
                Err(VmExitReason::Failed {
                    vcpu: index,
                    detail,
                    registers: describe_registers(&self.fd),
                })
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => Err(VmExitReason::Failed {
                vcpu: index,
                detail: format!(
                    "KVM could not enter the guest (hardware entry failure {reason:#x} on host CPU {cpu})"
                ),
                registers: describe_registers(&self.fd),
            }),
            Ok(other) => Err(VmExitReason::Failed {
                vcpu: index,
                detail: format!("unexpected KVM exit {other:?}"),
                registers: describe_registers(&self.fd),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                stats.interrupted_runs.fetch_add(1, Ordering::Relaxed);
                if shared.dump_registers.swap(false, Ordering::AcqRel) {
                    log::warn!(
                        "vCPU {index} registers (mp_state {:?}):\n{}",
                        self.fd.get_mp_state().map(|s| s.mp_state),
                        describe_registers(&self.fd)
                    );
                }
                Ok(true)
            }
            Err(e) => Err(VmExitReason::Failed {
                vcpu: index,
                detail: format!("KVM_RUN failed: {e}"),
                registers: describe_registers(&self.fd),
            }),
        }
    }
}

impl Vcpu {
    /// Carries out, as the CPU would, the few one-byte instructions that KVM's emulator
    /// rejects but whose effect is simple (PVM emulates guest CPL0 code; Linux executes these
    /// at boot): `int3` moves RIP past itself and raises #BP (Linux tests its breakpoint
    /// handler, and patches live code through int3); `fwait` raises #MF when an unmasked x87
    /// exception is pending, else does nothing. Returns false, changing nothing, for any
    /// other failure.
    fn complete_unemulated_instruction(&mut self) -> bool {
        const INT3: u8 = 0xcc;
        const FWAIT: u8 = 0x9b;
        const BP_VECTOR: u8 = 3;
        const MF_VECTOR: u8 = 16;
        const X87_EXCEPTION_BITS: u16 = 0x3f;
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR; `emulation_failure` overlays
        // `internal` and is what KVM fills in for the emulation suberror.
        let failure = unsafe { run.__bindgen_anon_1.emulation_failure };
        // SAFETY: plain bytes; meaningful when the INSTRUCTION_BYTES flag is set (checked).
        let insn = unsafe { failure.__bindgen_anon_1.__bindgen_anon_1 };
        let has_bytes = failure.flags
            & u64::from(kvm_bindings::KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)
            != 0;
        if failure.suberror != KVM_INTERNAL_ERROR_EMULATION || !has_bytes || insn.insn_size == 0 {
            return false;
        }
        let (advance, exception) = match insn.insn_bytes[0] {
            INT3 => (1, Some(BP_VECTOR)),
            FWAIT => match self.fd.get_fpu() {
                Ok(fpu) if fpu.fsw & !fpu.fcw & X87_EXCEPTION_BITS != 0 => (0, Some(MF_VECTOR)),
                Ok(_) => (1, None),
                Err(_) => return false,
            },
            _ => return false,
        };
        let Ok(mut regs) = self.fd.get_regs() else {
            return false;
        };
        regs.rip += advance;
        if self.fd.set_regs(&regs).is_err() {
            return false;
        }
        if let Some(vector) = exception {
            let Ok(mut events) = self.fd.get_vcpu_events() else {
                return false;
            };
            events.exception.injected = 1;
            events.exception.nr = vector;
            events.exception.has_error_code = 0;
            events.exception.error_code = 0;
            if self.fd.set_vcpu_events(&events).is_err() {
                return false;
            }
        }
        log::debug!(
            "vCPU {}: completed unemulated instruction {:#04x} at {:#x} (exception {:?})",
            self.index,
            insn.insn_bytes[0],
            regs.rip - advance,
            exception
        );
        true
    }
}

const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
const KVM_INTERNAL_ERROR_SIMUL_EX: u32 = 2;
const KVM_INTERNAL_ERROR_DELIVERY_EV: u32 = 3;

fn internal_error_detail(fd: &mut VcpuFd) -> String {
    let run = fd.get_kvm_run();
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the union member
    // KVM filled in.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let what = match internal.suberror {
        KVM_INTERNAL_ERROR_EMULATION => "emulation failure (an instruction KVM cannot emulate)",
        KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
        KVM_INTERNAL_ERROR_DELIVERY_EV => "failure while delivering an event",
        _ => "internal error",
    };
    let count = (internal.ndata as usize).min(internal.data.len());
    format!(
        "KVM internal error: {what} (suberror {}, data {:x?})",
        internal.suberror,
        &internal.data[..count]
    )
}

/// A multi-line dump of the vCPU's registers, for crash and failure reports.
pub fn describe_registers(fd: &VcpuFd) -> String {
    let mut out = String::new();
    match fd.get_regs() {
        Ok(r) => {
            out += &format!(
                "  rip={:#018x} rsp={:#018x} rflags={:#010x}\n  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n  rsi={:#018x} rdi={:#018x} rbp={:#018x}\n  r8 ={:#018x} r9 ={:#018x} r10={:#018x} r11={:#018x}\n  r12={:#018x} r13={:#018x} r14={:#018x} r15={:#018x}\n",
                r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8,
                r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15
            );
        }
        Err(e) => out += &format!("  (registers unavailable: {e})\n"),
    }
    match fd.get_sregs() {
        Ok(s) => {
            out += &format!(
                "  cs={:#06x} (base {:#x}, dpl {}, l {}) ss={:#06x} ds={:#06x} tr={:#06x}\n  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}\n  gdt={:#x}+{:#x} idt={:#x}+{:#x}",
                s.cs.selector, s.cs.base, s.cs.dpl, s.cs.l, s.ss.selector, s.ds.selector,
                s.tr.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.gdt.base, s.gdt.limit,
                s.idt.base, s.idt.limit
            );
        }
        Err(e) => out += &format!("  (system registers unavailable: {e})"),
    }
    out
}
