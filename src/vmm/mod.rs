//! The VM lifecycle: [`Vm::new`] builds everything from a [`VmConfig`] (KVM VM, irqchip, PIT,
//! memory, buses, legacy devices, kernel, vCPUs); [`Vm::run`] starts the vCPU threads and
//! serves the main thread's loop (exit reports, signals, serial input) until the VM ends.

pub mod boot;
pub mod cpu;
pub mod exit;
pub mod irq;
pub mod layout;
pub mod memory;
pub mod snapshot;
pub mod terminal;
pub mod vcpu;

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kickvm_bus::Bus;
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::cli::{CpuProfile, SerialConfig, VmConfig};
use crate::devices::acpi::{AcpiGed, AcpiShutdown, GedEvents};
use crate::devices::i8042::I8042;
use crate::devices::serial::{SerialDevice, SerialOutput};
use boot::{BootConfig, BootError};
use cpu::{CpuError, CpuModel};
use exit::{ExitNotifier, VmExitReason};
use memory::{GuestMemoryMmap, MemoryError};
use vcpu::{Vcpu, VcpuHandle};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot use /dev/kvm: {0} (is KVM loaded, and may this user open /dev/kvm?)")]
    KvmUnavailable(kvm_ioctls::Error),
    #[error("--cpus {requested}: this host's KVM supports at most {max} vCPUs")]
    TooManyVcpus { requested: u8, max: usize },
    #[error("cannot open serial output file {path}: {source}")]
    SerialFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Cpu(#[from] CpuError),
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("{what} failed: {source}")]
    Host {
        what: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pci(#[from] kickvm_virtio::AttachError),
    #[error("restoring {dir}: {source}")]
    Restore {
        dir: PathBuf,
        source: snapshot::SnapshotError,
    },
    #[error("cannot place {what} on the {bus} bus: {source}")]
    Bus {
        what: &'static str,
        bus: &'static str,
        source: kickvm_bus::BusError,
    },
}

impl VmError {
    /// True for problems with what the user asked for (exit status 2), false for failures of
    /// the host or KVM while building or running the VM (exit status 1).
    pub fn is_config_error(&self) -> bool {
        match self {
            VmError::KvmUnavailable(_)
            | VmError::TooManyVcpus { .. }
            | VmError::SerialFile { .. } => true,
            VmError::Boot(e) => e.is_config_error(),
            VmError::Memory(MemoryError::Map { .. }) => true,
            VmError::Restore { source, .. } => source.is_config_error(),
            VmError::Pci(e) => matches!(
                e,
                kickvm_virtio::AttachError::Image { .. }
                    | kickvm_virtio::AttachError::Device { .. }
                    | kickvm_virtio::AttachError::DuplicateId(_)
                    | kickvm_virtio::AttachError::SameImage { .. }
                    | kickvm_virtio::AttachError::Plug {
                        source: kickvm_virtio::PlugError::Pci(kickvm_pci::PciError::NoFreeSlot),
                        ..
                    }
                    | kickvm_virtio::AttachError::VhostUser {
                        source: kickvm_virtio::vhost_user::VhostUserError::Connect { .. }
                            | kickvm_virtio::vhost_user::VhostUserError::Missing { .. },
                        ..
                    }
            ),
            _ => false,
        }
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn host_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Host { what, source }
}

/// A built VM, ready to run. Devices added before [`Vm::run`] go on [`Vm::pio_bus`] /
/// [`Vm::mmio_bus`]; their interrupts use irqfds on [`Vm::vm_fd`].
pub struct Vm {
    vm_fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
    pio_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    exit: Arc<ExitNotifier>,
    serial: Option<Arc<Mutex<SerialDevice>>>,
    serial_to_stdout: bool,
    /// The ACPI power button (through the GED) with which `vm.shutdown` asks the guest.
    ged: Arc<GedEvents>,
    vcpus: Vec<VcpuFd>,
    /// The MSRs a vCPU's snapshot holds: KVM's list of MSRs to save.
    msr_list: Arc<[u32]>,
    /// PCI root, GSI routing and the virtio devices; their I/O threads live as long as this.
    pci: kickvm_virtio::PciDevices,
    /// The control API (`--api-socket`), served while the VM runs; its socket goes with it.
    api: Option<crate::api::ApiServer>,
    // Kept open for the VM's lifetime: the VmFd does not hold a reference to it.
    _kvm: Kvm,
}

impl Vm {
    pub fn new(config: &VmConfig) -> Result<Self, VmError> {
        // Before the devices' I/O threads exist, so they inherit it; the signals wait for the
        // main loop's signalfd.
        block_control_signals();
        let serial_output = open_serial_output(&config.serial)?;

        let kvm = Kvm::new().map_err(VmError::KvmUnavailable)?;
        let max_vcpus = kvm.get_max_vcpus();
        if usize::from(config.cpus) > max_vcpus {
            return Err(VmError::TooManyVcpus {
                requested: config.cpus,
                max: max_vcpus,
            });
        }
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm_fd
            .set_identity_map_address(layout::KVM_IDENTITY_MAP_START)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm_fd
            .set_tss_address(layout::KVM_TSS_START as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        log::debug!("VM created with in-kernel irqchip and PIT");

        // A vhost-user backend maps guest memory itself: it must be a shareable file.
        let shared_memory = config.disks.iter().any(|d| d.vhost_user.is_some());
        let memory = memory::create_guest_memory(config.memory_bytes, shared_memory)?;
        memory::register_with_kvm(&vm_fd, &memory)?;
        log::debug!("guest memory registered");

        let restore_err = |dir: &std::path::Path| {
            let dir = dir.to_path_buf();
            move |source| VmError::Restore { dir, source }
        };
        let restoring = match &config.restore {
            Some(dir) => {
                let saved = snapshot::Snapshot::read(dir).map_err(restore_err(dir))?;
                saved
                    .check_matches(config.cpus, &memory)
                    .map_err(restore_err(dir))?;
                snapshot::Snapshot::load_memory(dir, &memory).map_err(restore_err(dir))?;
                log::debug!("guest memory restored from {}", dir.display());
                Some((dir.as_path(), saved))
            }
            None => None,
        };

        let exit = Arc::new(ExitNotifier::new().map_err(host_err("creating the exit eventfd"))?);
        let pio_bus = Arc::new(Bus::new());
        let mmio_bus = Arc::new(Bus::new());

        let serial_to_stdout = config.serial == SerialConfig::Stdout;
        let serial =
            match serial_output {
                Some(output) => {
                    let irq = EventFd::new(libc::EFD_NONBLOCK)
                        .map_err(host_err("creating the serial irqfd"))?;
                    vm_fd
                        .register_irqfd(&irq, layout::SERIAL_IRQ)
                        .map_err(kvm_err("KVM_IRQFD (serial)"))?;
                    let device =
                        match restoring.as_ref().and_then(|(_, s)| s.serial.as_ref()) {
                            Some(saved) => SerialDevice::from_snapshot(irq, output, saved)
                                .map_err(|detail| VmError::Restore {
                                    dir: config.restore.clone().unwrap_or_default(),
                                    source: snapshot::SnapshotError::Serial(detail),
                                })?,
                            None => SerialDevice::new(irq, output),
                        };
                    let serial = Arc::new(Mutex::new(device));
                    insert_pio(
                        &pio_bus,
                        serial.clone(),
                        "serial port",
                        layout::SERIAL_PORT_BASE,
                        layout::SERIAL_PORT_LEN,
                    )?;
                    Some(serial)
                }
                None => None,
            };
        insert_pio(
            &pio_bus,
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
            "i8042",
            layout::I8042_PORT_BASE,
            layout::I8042_PORT_LEN,
        )?;
        insert_pio(
            &pio_bus,
            Arc::new(Mutex::new(AcpiShutdown::new(exit.clone()))),
            "ACPI sleep control",
            layout::ACPI_SHUTDOWN_PORT,
            layout::ACPI_SHUTDOWN_PORT_LEN,
        )?;
        let ged_interrupt =
            EventFd::new(libc::EFD_NONBLOCK).map_err(host_err("creating the GED irqfd"))?;
        vm_fd
            .register_irqfd(&ged_interrupt, layout::ACPI_GED_GSI)
            .map_err(kvm_err("KVM_IRQFD (ACPI GED)"))?;
        let ged = Arc::new(GedEvents::new(ged_interrupt));
        insert_pio(
            &pio_bus,
            Arc::new(Mutex::new(AcpiGed::new(ged.clone()))),
            "ACPI generic event device",
            layout::ACPI_GED_PORT,
            layout::ACPI_GED_PORT_LEN,
        )?;

        let vm_fd = Arc::new(vm_fd);
        let mut pci = crate::devices::pci_devices::attach(
            &vm_fd,
            &memory,
            &pio_bus,
            &mmio_bus,
            &config.disks,
            &config.nets,
            config.max_ioeventfds,
            usize::from(config.cpus),
        )?;

        let model = match config.cpu.profile {
            CpuProfile::Host => CpuModel::Host,
            CpuProfile::PvmSafe => CpuModel::PvmSafe,
            CpuProfile::Auto if cpu::host_is_pvm() => CpuModel::PvmSafe,
            CpuProfile::Auto => CpuModel::Host,
        };
        let mut vcpus = Vec::with_capacity(usize::from(config.cpus));
        for index in 0..config.cpus {
            let fd = vm_fd
                .create_vcpu(u64::from(index))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            vcpus.push(fd);
        }
        let tsc_khz = vcpus[0]
            .get_tsc_khz()
            .inspect_err(|e| log::debug!("KVM_GET_TSC_KHZ: {e}"))
            .ok()
            .filter(|&khz| khz > 0);
        let base_cpuid = cpu::base_cpuid(&kvm, model, tsc_khz)?;

        if let Some((dir, saved)) = &restoring {
            // Guest RAM already holds the kernel and boot tables; the vCPUs, irqchip and
            // devices take up where the snapshot left them.
            // The devices last: restoring them may complete requests and send interrupts,
            // which a later KVM_SET_LAPIC or KVM_SET_IRQCHIP would wipe.
            saved.vm.restore(&vm_fd).map_err(restore_err(dir))?;
            for (index, (fd, state)) in vcpus.iter().zip(&saved.vcpus).enumerate() {
                cpu::set_cpuid(fd, index as u8, config.cpus, &base_cpuid)?;
                state.restore(fd, index as u8).map_err(restore_err(dir))?;
            }
            pci.restore(&saved.devices)
                .map_err(|e| restore_err(dir)(snapshot::SnapshotError::Devices(e)))?;
            log::info!("VM restored from {}", dir.display());
        } else {
            let entry = boot::load(
                &memory,
                &BootConfig {
                    kernel: &config.kernel,
                    initramfs: config.initramfs.as_deref(),
                    cmdline: &config.cmdline,
                    mem_size: config.memory_bytes,
                    cpus: config.cpus,
                    linux_extra_args: match model {
                        CpuModel::PvmSafe => cpu::PVM_LINUX_KERNEL_ARGS,
                        CpuModel::Host => &[],
                    },
                },
            )?;
            cpu::write_boot_tables(&memory, &entry)?;
            log::debug!("kernel loaded, boot tables written");
            for (index, fd) in vcpus.iter().enumerate() {
                cpu::configure_vcpu(fd, index as u8, config.cpus, &base_cpuid, &entry)?;
            }
        }
        let msr_list: Arc<[u32]> = kvm
            .get_msr_index_list()
            .map(|list| list.as_slice().into())
            .unwrap_or_else(|e| {
                log::warn!("KVM_GET_MSR_INDEX_LIST: {e}; snapshots will hold no MSRs");
                Arc::from(Vec::new())
            });

        Ok(Vm {
            vm_fd,
            memory,
            pio_bus,
            mmio_bus,
            exit,
            serial,
            serial_to_stdout,
            ged,
            vcpus,
            msr_list,
            pci,
            api: None,
            _kvm: kvm,
        })
    }

    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm_fd
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    pub fn pio_bus(&self) -> &Arc<Bus> {
        &self.pio_bus
    }

    pub fn mmio_bus(&self) -> &Arc<Bus> {
        &self.mmio_bus
    }

    /// The PCI devices (`--disk`), by id, for reports and run-time control.
    pub fn pci(&self) -> &kickvm_virtio::PciDevices {
        &self.pci
    }

    /// Serve `api`'s requests from the main loop while the VM runs.
    pub fn attach_api(&mut self, api: crate::api::ApiServer) {
        self.api = Some(api);
    }

    /// Devices that can end the VM (reset, power-off) report through this.
    pub fn exit_notifier(&self) -> &Arc<ExitNotifier> {
        &self.exit
    }

    /// Runs the VM until it ends; returns why it ended.
    pub fn run(mut self) -> Result<VmExitReason, VmError> {
        vcpu::install_kick_handler()
            .map_err(|e| host_err("installing the vCPU kick signal handler")(e.into()))?;
        // Blocked here, before the vCPU threads exist, so only the signalfd sees them.
        let signals = ControlSignals::block()?;

        let terminal = if self.serial_to_stdout && terminal::stdin_is_terminal() {
            terminal::RawMode::enter()
        } else {
            None
        };

        let mut handles: Vec<VcpuHandle> = Vec::with_capacity(self.vcpus.len());
        for (index, fd) in self.vcpus.drain(..).enumerate() {
            let vcpu = Vcpu {
                index: index as u8,
                fd,
                pio_bus: self.pio_bus.clone(),
                mmio_bus: self.mmio_bus.clone(),
                exit: self.exit.clone(),
                msr_list: self.msr_list.clone(),
            };
            match vcpu.start() {
                Ok(handle) => handles.push(handle),
                Err(e) => {
                    stop_vcpus(handles);
                    return Err(host_err("starting a vCPU thread")(e));
                }
            }
        }

        let result = self.main_loop(&signals, terminal.is_some(), &handles);
        stop_vcpus(handles);
        let touched_kib = memory::resident_bytes(&self.memory) >> 10;
        match memory::peak_rss_kib() {
            Some(peak) => log::info!(
                "guest memory touched: {touched_kib} KiB; kickvm peak RSS {peak} KiB, \
                 overhead {} KiB",
                peak.saturating_sub(touched_kib)
            ),
            None => log::info!("guest memory touched: {touched_kib} KiB"),
        }
        drop(terminal);
        result
    }

    fn main_loop(
        &self,
        signals: &ControlSignals,
        forward_stdin: bool,
        handles: &[VcpuHandle],
    ) -> Result<VmExitReason, VmError> {
        const EXIT: u64 = 0;
        const SIGNAL: u64 = 1;
        const STDIN: u64 = 2;
        const API: u64 = 3;
        const PAUSE: u64 = 4;
        let epoll = Epoll::new().map_err(host_err("epoll_create"))?;
        let add = |fd: i32, token: u64| {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(host_err("epoll_ctl"))
        };
        add(self.exit.event().as_raw_fd(), EXIT)?;
        add(signals.fd.as_raw_fd(), SIGNAL)?;
        let forward_stdin = forward_stdin && self.serial.is_some();
        if forward_stdin {
            add(libc::STDIN_FILENO, STDIN)?;
        }
        if let Some(api) = &self.api {
            add(api.wake_fd(), API)?;
        }
        add(self.pci.pause_requests().event_fd(), PAUSE)?;
        let mut run_control = crate::api::RunControl::new();

        let mut events = [EpollEvent::default(); 4];
        loop {
            let timeout_ms = run_control.shutdown_deadline().map_or(-1, |deadline| {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                // Rounded up, so the wait does not end just before the deadline.
                i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
            });
            if timeout_ms == 0 {
                run_control.shutdown_grace_expired(&self.api_view(handles));
                continue;
            }
            let count = match epoll.wait(timeout_ms, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(host_err("epoll_wait")(e)),
            };
            for event in &events[..count] {
                match event.data() {
                    EXIT => {
                        if let Some(reason) = self.exit.reason() {
                            return Ok(reason);
                        }
                    }
                    SIGNAL => match signals.read()? {
                        libc::SIGUSR1 => handles.iter().for_each(VcpuHandle::request_register_dump),
                        signal => {
                            log::info!("signal {signal} received: stopping the VM");
                            self.exit.notify(VmExitReason::Signal(signal));
                        }
                    },
                    STDIN => self.forward_input(&epoll)?,
                    API => self.serve_api(&mut run_control, handles),
                    PAUSE => {
                        let reasons = self.pci.pause_requests().take();
                        run_control.pause_for_devices(&self.api_view(handles), reasons);
                    }
                    _ => {}
                }
            }
        }
    }

    fn api_view<'a>(&'a self, handles: &'a [VcpuHandle]) -> crate::api::VmView<'a> {
        crate::api::VmView {
            vcpus: handles,
            pci: &self.pci,
            exit: &self.exit,
            memory: &self.memory,
            ged: &self.ged,
            vm_fd: &self.vm_fd,
            serial: self.serial.as_deref(),
        }
    }

    /// Carries out the control API's waiting requests (pause and resume block this thread
    /// until the VM is quiescent / running again).
    fn serve_api(&self, run_control: &mut crate::api::RunControl, handles: &[VcpuHandle]) {
        let Some(api) = &self.api else { return };
        let view = self.api_view(handles);
        for request in api.take_requests() {
            let response = run_control.execute(&request.action, &view);
            request.respond(response);
        }
    }

    /// Moves what the user typed into the serial receive FIFO. What the FIFO cannot take is
    /// dropped, as a real UART drops characters on overrun.
    fn forward_input(&self, epoll: &Epoll) -> Result<(), VmError> {
        let mut buf = [0u8; 64];
        // SAFETY: fd 0 stays open for the process lifetime; ManuallyDrop keeps File from
        // closing it.
        let mut stdin =
            std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(libc::STDIN_FILENO) });
        match stdin.read(&mut buf) {
            Ok(0) => {
                // End of input: stop watching it.
                let _ = epoll.ctl(
                    ControlOperation::Delete,
                    libc::STDIN_FILENO,
                    EpollEvent::default(),
                );
            }
            Ok(n) => {
                if let Some(serial) = &self.serial {
                    let taken = serial.lock().unwrap().enqueue_input(&buf[..n]);
                    if taken < n {
                        log::debug!(
                            "serial receive FIFO full: {} input bytes dropped",
                            n - taken
                        );
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(host_err("reading stdin")(e)),
        }
        Ok(())
    }
}

fn insert_pio(
    bus: &Bus,
    device: kickvm_bus::SharedDevice,
    what: &'static str,
    base: u64,
    len: u64,
) -> Result<(), VmError> {
    bus.insert(device, base, len)
        .map_err(|source| VmError::Bus {
            what,
            bus: "port I/O",
            source,
        })
}

fn open_serial_output(config: &SerialConfig) -> Result<Option<SerialOutput>, VmError> {
    Ok(match config {
        SerialConfig::Stdout => Some(Box::new(std::io::stdout())),
        SerialConfig::File(path) => {
            let file = File::create(path).map_err(|source| VmError::SerialFile {
                path: path.clone(),
                source,
            })?;
            Some(Box::new(file))
        }
        SerialConfig::Off => None,
    })
}

/// Kicks every vCPU out of KVM_RUN, asks it to stop, and joins its thread.
fn stop_vcpus(handles: Vec<VcpuHandle>) {
    for handle in &handles {
        handle.request_stop();
    }
    for handle in handles {
        handle.join();
    }
}

/// Blocks SIGINT, SIGTERM and SIGUSR1 in the calling thread and returns that set. Called before
/// any other thread is created (threads inherit the mask): a process-directed signal is taken
/// by a thread that does not block it, and an I/O thread taking SIGTERM would end the process
/// on the spot, without the main loop's clean stop.
pub fn block_control_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the calls only modify it and this thread's mask.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    set
}

/// SIGINT and SIGTERM (stop the VM) and SIGUSR1 (log every vCPU's registers), blocked and
/// delivered through a signalfd to the main loop.
struct ControlSignals {
    fd: OwnedFd,
}

impl ControlSignals {
    fn block() -> Result<Self, VmError> {
        let set = block_control_signals();
        // SAFETY: `set` is a valid sigset_t; signalfd only reads it.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(host_err("signalfd")(std::io::Error::last_os_error()));
        }
        // SAFETY: signalfd returned a new descriptor that nothing else owns.
        Ok(ControlSignals {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn read(&self) -> Result<i32, VmError> {
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info`, which is that large.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                &mut info as *mut _ as *mut libc::c_void,
                size,
            )
        };
        if n != size as isize {
            return Err(host_err("reading the signalfd")(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(info.ssi_signo as i32)
    }
}
