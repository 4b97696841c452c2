//! What the block workloads share: driver options from the command line,
//! and finding and opening the virtio-blk disks.

use crate::blk::{self, Completion, Disk, IrqArm, IrqSource, IrqWait, Options};
use crate::start_info::Cmdline;
use crate::virtio::Kind;
use crate::{pci, println, smp};

/// As many as bus 0 has slots for (31 besides the host bridge).
pub const MAX_DISKS: usize = 31;

/// Why a workload could not start; printed as `reason=...`.
pub struct Failure {
    pub reason: &'static str,
    pub detail: &'static str,
}

impl Failure {
    pub fn bad_argument(key: &'static str) -> Self {
        Failure {
            reason: "bad-argument",
            detail: key,
        }
    }
}

pub fn on_off(cmdline: &Cmdline, key: &'static str, default: bool) -> Result<bool, Failure> {
    choice(
        cmdline,
        key,
        if default { "on" } else { "off" },
        &[
            ("on", true),
            ("1", true),
            ("yes", true),
            ("off", false),
            ("0", false),
            ("no", false),
        ],
    )
}

/// `completion=poll|irq`, for every driver.
pub fn completion(cmdline: &Cmdline) -> Result<Completion, Failure> {
    choice(
        cmdline,
        "completion",
        "poll",
        &[("poll", Completion::Poll), ("irq", Completion::Irq)],
    )
}

/// The value `key=` names among `choices` (`default` when absent).
pub fn choice<T: Copy>(
    cmdline: &Cmdline,
    key: &'static str,
    default: &str,
    choices: &[(&str, T)],
) -> Result<T, Failure> {
    let given = cmdline.get(key).unwrap_or(default);
    choices
        .iter()
        .find(|(name, _)| *name == given)
        .map(|&(_, value)| value)
        .ok_or(Failure::bad_argument(key))
}

/// Reads `transport=` (`modern`, `legacy`, or `auto`: modern where the
/// device has it, else legacy), `completion=`, `irq=` (`msix` or `intx`),
/// `irq_arm=`, `irq_wait=`, `bars=` (`keep`, or `move` each disk's BARs once
/// it runs), `event_idx=`, `indirect=`.
pub fn options(cmdline: &Cmdline, max_request_bytes: u32) -> Result<Options, Failure> {
    let (kind, either_transport) = choice(
        cmdline,
        "transport",
        "modern",
        &[
            ("modern", (Kind::Modern, false)),
            ("legacy", (Kind::Legacy, false)),
            ("auto", (Kind::Modern, true)),
        ],
    )?;
    let completion = completion(cmdline)?;
    let irq_source = choice(
        cmdline,
        "irq",
        "msix",
        &[("msix", IrqSource::Msix), ("intx", IrqSource::Intx)],
    )?;
    let irq_arm = choice(
        cmdline,
        "irq_arm",
        "always",
        &[("always", IrqArm::Always), ("on-wait", IrqArm::OnWait)],
    )?;
    let irq_wait = choice(
        cmdline,
        "irq_wait",
        "spin",
        &[("spin", IrqWait::Spin), ("halt", IrqWait::Halt)],
    )?;
    if irq_wait == IrqWait::Halt && completion == Completion::Irq {
        smp::run_on_all(|_, _| crate::lapic::start_wake_tick(), 0);
    }
    Ok(Options {
        kind,
        either_transport,
        completion,
        irq_source,
        irq_arm,
        irq_wait,
        move_bars: choice(cmdline, "bars", "keep", &[("keep", false), ("move", true)])?,
        event_idx: on_off(cmdline, "event_idx", true)?,
        indirect: on_off(cmdline, "indirect", true)?,
        queues: smp::online(),
        max_request_bytes,
    })
}

pub struct Disks {
    pub disks: [Option<Disk>; MAX_DISKS],
    pub count: usize,
}

impl Disks {
    pub fn iter(&self) -> impl Iterator<Item = &Disk> {
        self.disks[..self.count].iter().flatten()
    }
}

/// Big, so kept off the stack; a run opens its disks once.
static mut DISKS: Disks = Disks {
    disks: [const { None }; MAX_DISKS],
    count: 0,
};

/// Opens every virtio-blk function on bus 0 (at most `limit`), in
/// bus/device/function order, printing a `DISK` line for each.
pub fn open_all(opts: &Options, limit: usize) -> Result<&'static Disks, Failure> {
    let bus = pci::enumerate();
    // SAFETY: only the BSP opens disks, once per run, before any thread
    // uses them.
    let disks = unsafe { &mut *core::ptr::addr_of_mut!(DISKS) };
    for f in bus.iter().filter(|f| blk::is_blk(f)) {
        if disks.count >= limit.min(MAX_DISKS) {
            break;
        }
        let disk = blk::open(*f, opts).and_then(|mut disk| {
            if opts.move_bars {
                disk.move_bars()?;
            }
            Ok(disk)
        });
        let disk = disk.map_err(|e| {
            println!(
                "DISK index={} pci={} error={}",
                disks.count,
                f.addr,
                e.reason()
            );
            Failure {
                reason: e.reason(),
                detail: "",
            }
        })?;
        println!(
            "DISK index={} pci={} transport={} regs={:#x} sectors={} blk_size={} ro={} queues={} features={:#x} event_idx={} indirect={}",
            disks.count,
            f.addr,
            disk.transport.kind.name(),
            disk.transport.registers(),
            disk.capacity,
            disk.blk_size,
            disk.read_only as u8,
            disk.queue_count,
            disk.features,
            disk.has(crate::virtio::F_EVENT_IDX) as u8,
            disk.has(crate::virtio::F_INDIRECT_DESC) as u8,
        );
        disks.disks[disks.count] = Some(disk);
        disks.count += 1;
    }
    if disks.count == 0 {
        return Err(Failure {
            reason: "no-disk",
            detail: "",
        });
    }
    Ok(disks)
}

/// Prints the `RESULT` line of a workload that could not start.
pub fn report_failure(workload: &str, f: &Failure) -> bool {
    if f.detail.is_empty() {
        println!(
            "RESULT workload={} status=fail reason={}",
            workload, f.reason
        );
    } else {
        println!(
            "RESULT workload={} status=fail reason={} key={}",
            workload, f.reason, f.detail
        );
    }
    false
}
