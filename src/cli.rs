//! The command line and the configuration it produces.
//!
//! Flags that describe one thing with several properties (`--serial file=PATH`, and later
//! `--disk path=IMG,ioeventfd=on`) take a comma-separated option string, parsed by
//! [`OptionString`]; repeatable flags collect into a `Vec` in [`VmConfig`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

use clap::{Args, Parser, Subcommand};

/// The smallest guest we agree to build: boot structures, the MP table and a small kernel.
pub const MIN_MEMORY_BYTES: u64 = 16 << 20;
/// The MP table describes processors by 8-bit APIC id, and 0xff is the broadcast id.
pub const MAX_CPUS: u8 = 254;
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, Parser)]
#[command(
    name = "kickvm",
    version,
    about = "A KVM virtual machine monitor built around fast userspace virtio I/O",
    long_about = "kickvm boots a Linux kernel (bzImage or ELF vmlinux) or a PVH ELF kernel on \
                  KVM (x86-64).\n\nExit status of `kickvm run`: 0 the guest reset or powered off, \
                  1 the VM failed at run time (KVM error, emulation failure), 2 usage or \
                  configuration error, 3 the guest crashed (triple fault), 128+N stopped by signal \
                  N (SIGINT, SIGTERM).\n\nSIGUSR1 makes every vCPU log its registers.\n\n\
                  Logging: set RUST_LOG (error, warn, info, debug, trace)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a kernel and run the VM until the guest resets, powers off or crashes.
    Run(RunArgs),
    /// Control a running VM through its --api-socket.
    Remote(RemoteArgs),
}

#[derive(Debug, Args)]
pub struct RemoteArgs {
    /// The VM's control socket (`kickvm run --api-socket PATH`).
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,

    #[command(subcommand)]
    pub command: RemoteCommandArgs,
}

#[derive(Debug, Clone, Subcommand)]
pub enum RemoteCommandArgs {
    /// Run state, vCPUs, memory, devices and each queue's notify mode and why (JSON).
    Info,
    /// Stop the vCPUs and quiesce the devices; returns once the VM is quiescent.
    Pause,
    /// Undo pause.
    Resume,
    /// Ask the guest to shut down (ACPI power button); it powers off when done.
    Shutdown {
        /// End the VM (requests in flight complete first) if the guest is still running this
        /// many seconds later.
        #[arg(long, value_name = "SECS")]
        timeout_secs: Option<u64>,
    },
    /// End the VM at once.
    Kill,
    /// Switch a device's ioeventfd on or off at run time.
    Ioeventfd {
        /// Device id (`disk0`, `net0`, or the `id=` given to --disk/--net).
        device: String,
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Counters as tables: per-vCPU exits by reason, per-queue kicks, requests, interrupts.
    Stats,
    /// Counters as JSON.
    Counters,
    /// Write a snapshot of the paused VM into DIR (created if missing); `kickvm run` with the
    /// same options and `--restore DIR` continues it.
    Snapshot {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

impl From<RemoteCommandArgs> for crate::remote::RemoteCommand {
    fn from(args: RemoteCommandArgs) -> Self {
        use crate::remote::RemoteCommand as R;
        match args {
            RemoteCommandArgs::Info => R::Info,
            RemoteCommandArgs::Pause => R::Pause,
            RemoteCommandArgs::Resume => R::Resume,
            RemoteCommandArgs::Shutdown { timeout_secs } => R::Shutdown { timeout_secs },
            RemoteCommandArgs::Kill => R::Kill,
            RemoteCommandArgs::Ioeventfd { device, state } => R::Ioeventfd {
                device,
                on: state == "on",
            },
            RemoteCommandArgs::Stats => R::Stats,
            RemoteCommandArgs::Counters => R::Counters,
            RemoteCommandArgs::Snapshot { dir } => R::Snapshot { dir },
        }
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kernel to boot: a Linux bzImage, an ELF vmlinux, or a PVH ELF (XEN_ELFNOTE_PHYS32_ENTRY).
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,

    /// Initial ramdisk, loaded high in RAM below 3 GiB and passed to the kernel.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,

    /// Kernel command line (for PVH kernels it reaches the guest through hvm_start_info).
    #[arg(long, value_name = "STR", default_value = "")]
    pub cmdline: String,

    /// Number of vCPUs (1-254). All are listed in the MP table; the guest starts the APs.
    #[arg(long, value_name = "N", default_value = "1", value_parser = parse_cpus)]
    pub cpus: u8,

    /// Guest RAM: a number with a K, M, G or T suffix (binary units; a bare number means MiB).
    /// RAM above 3 GiB continues at 4 GiB, around the 32-bit PCI hole.
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_memory)]
    pub memory: u64,

    /// Where the 16550 serial port (0x3f8, IRQ 4) goes: `stdout`, `file=PATH` or `off`.
    /// With `stdout` and a terminal on stdin, keystrokes go to the guest (raw mode).
    #[arg(long, value_name = "stdout|file=PATH|off", default_value = "stdout")]
    pub serial: SerialConfig,

    /// CPU model shown to the guest: `host` (all KVM supports), `pvm-safe` (avoids what the PVM
    /// CPL0 emulator cannot run: hides CMPXCHG16B and the other CPUID bits this KVM lets a VMM
    /// clear, and appends `noxsave clearcpuid=popcnt,...` to a Linux kernel's command line, since
    /// PVM passes the host's other CPUID bits through), or `auto` (pvm-safe when /sys/module/kvm_pvm exists).
    #[arg(long, value_name = "auto|host|pvm-safe", default_value = "auto")]
    pub cpu: CpuConfig,

    /// A virtio-blk disk on a raw image; repeatable. `path=PATH[,readonly=on]
    /// [,ioeventfd=on|off][,transport=transitional|modern|legacy][,direct=on][,serial=ID]
    /// [,queues=N][,id=NAME][,queue_size=N][,engine=auto|io_uring|threads|sync|mmap][,poll_us=N]
    /// [,format=raw][,lock=off][,enospc=report|pause]`. ioeventfd=on (default): kicks go to
    /// the disk's I/O thread without a userspace exit. An image that starts with a qcow2, VMDK,
    /// VHDX, VDI, QED or LUKS header is refused unless `format=raw` declares it raw; one another
    /// process has locked (another VM) is refused unless `lock=off`. `enospc=pause` (with
    /// --api-socket): a write the host file system has no room for pauses the VM until space
    /// is freed and it is resumed, instead of failing in the guest.
    /// Or `socket=PATH[,ioeventfd=..][,transport=..][,queues=N][,id=..][,queue_size=N]`: a
    /// vhost-user-blk backend serves the queues (the kick goes from KVM straight to it).
    #[arg(long, value_name = "path=PATH,... | socket=PATH,...")]
    pub disk: Vec<kickvm_virtio::BlkConfig>,

    /// A virtio-net device on a host tap; repeatable. `tap=NAME[,mac=MAC]
    /// [,ioeventfd=on|off|auto][,transport=transitional|modern|legacy][,queues=N][,id=NAME]
    /// [,queue_size=N][,poll_us=N]`. A missing tap is created (and gone at exit).
    /// ioeventfd=auto (default): ioeventfd plus a bounded poll after activity.
    #[arg(long, value_name = "tap=NAME,...")]
    pub net: Vec<kickvm_virtio::NetConfig>,

    /// Refuse KVM ioeventfd registrations beyond N (as a kernel with a small I/O bus does);
    /// devices that hit the cap run their queues in sync mode.
    #[arg(long, value_name = "N")]
    pub max_ioeventfds: Option<usize>,

    /// Serve the control API (HTTP/1.1, JSON) on this unix socket, created owner-only and
    /// removed at exit: `kickvm remote --api-socket PATH ...`, or
    /// `curl --unix-socket PATH http://localhost/api/v1/vm.info`.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Continue a VM from a snapshot directory (`vm.snapshot`) instead of booting: guest RAM,
    /// vCPUs, interrupt controllers and devices as they were. Give the options the VM had
    /// (--cpus, --memory, --disk, --net in the same order); a snapshot that does not match
    /// them is refused. The kernel is not loaded again.
    #[arg(long, value_name = "DIR")]
    pub restore: Option<PathBuf>,
}

/// Everything needed to build a VM; the CLI is one way to make it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u8,
    pub memory_bytes: u64,
    pub serial: SerialConfig,
    pub cpu: CpuConfig,
    pub disks: Vec<kickvm_virtio::BlkConfig>,
    pub nets: Vec<kickvm_virtio::NetConfig>,
    pub max_ioeventfds: Option<usize>,
    pub api_socket: Option<PathBuf>,
    /// A snapshot directory to continue from instead of booting the kernel.
    pub restore: Option<PathBuf>,
}

impl From<RunArgs> for VmConfig {
    fn from(args: RunArgs) -> Self {
        VmConfig {
            kernel: args.kernel,
            initramfs: args.initramfs,
            cmdline: args.cmdline,
            cpus: args.cpus,
            memory_bytes: args.memory,
            serial: args.serial,
            cpu: args.cpu,
            disks: args.disk,
            nets: args.net,
            max_ioeventfds: args.max_ioeventfds,
            api_socket: args.api_socket,
            restore: args.restore,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialConfig {
    Stdout,
    File(PathBuf),
    Off,
}

impl FromStr for SerialConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut opts = OptionString::parse(s)?;
        let serial = match opts.take_bare().as_deref() {
            Some("stdout") => SerialConfig::Stdout,
            Some("off") => SerialConfig::Off,
            None => match opts.take("file") {
                Some(path) if !path.is_empty() => SerialConfig::File(PathBuf::from(path)),
                _ => return Err("expected `stdout`, `file=PATH` or `off`".into()),
            },
            Some(other) => {
                return Err(format!(
                    "unknown serial mode `{other}`: expected `stdout`, `file=PATH` or `off`"
                ))
            }
        };
        opts.finish()?;
        Ok(serial)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuProfile {
    /// Decide at start-up: `PvmSafe` when the host KVM is kvm_pvm.
    Auto,
    Host,
    PvmSafe,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuConfig {
    pub profile: CpuProfile,
}

impl FromStr for CpuConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut opts = OptionString::parse(s)?;
        let profile = match opts.take_bare().or_else(|| opts.take("profile")).as_deref() {
            Some("auto") | None => CpuProfile::Auto,
            Some("host") => CpuProfile::Host,
            Some("pvm-safe") => CpuProfile::PvmSafe,
            Some(other) => {
                return Err(format!(
                    "unknown CPU profile `{other}`: expected `auto`, `host` or `pvm-safe`"
                ))
            }
        };
        opts.finish()?;
        Ok(CpuConfig { profile })
    }
}

/// A comma-separated option string: `word,key=value,key=value`. At most one bare word (a mode
/// or a profile); keys may appear once. Take what you know, then [`OptionString::finish`]
/// rejects the rest, so a typo is an error rather than silently ignored.
#[derive(Debug, Default)]
pub struct OptionString {
    bare: Option<String>,
    pairs: BTreeMap<String, String>,
}

impl OptionString {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut opts = OptionString::default();
        for item in s.split(',').filter(|item| !item.is_empty()) {
            match item.split_once('=') {
                Some((key, value)) => {
                    if opts
                        .pairs
                        .insert(key.to_string(), value.to_string())
                        .is_some()
                    {
                        return Err(format!("option `{key}` given twice"));
                    }
                }
                None if opts.bare.is_none() => opts.bare = Some(item.to_string()),
                None => return Err(format!("unexpected word `{item}`: expected key=value")),
            }
        }
        Ok(opts)
    }

    pub fn take_bare(&mut self) -> Option<String> {
        self.bare.take()
    }

    pub fn take(&mut self, key: &str) -> Option<String> {
        self.pairs.remove(key)
    }

    /// Takes `key` and parses it; `Ok(None)` when absent.
    pub fn take_parsed<T: FromStr>(&mut self, key: &str) -> Result<Option<T>, String>
    where
        T::Err: std::fmt::Display,
    {
        self.take(key)
            .map(|v| v.parse().map_err(|e| format!("bad value for `{key}`: {e}")))
            .transpose()
    }

    /// Fails on anything not taken yet.
    pub fn finish(self) -> Result<(), String> {
        if let Some(bare) = self.bare {
            return Err(format!("unexpected word `{bare}`"));
        }
        match self.pairs.keys().next() {
            Some(key) => Err(format!("unknown option `{key}`")),
            None => Ok(()),
        }
    }
}

fn parse_cpus(s: &str) -> Result<u8, String> {
    match s.parse::<u32>() {
        Ok(n) if (1..=u32::from(MAX_CPUS)).contains(&n) => Ok(n as u8),
        Ok(_) => Err(format!("the number of vCPUs must be 1 to {MAX_CPUS}")),
        Err(_) => Err("expected a number of vCPUs".into()),
    }
}

/// Parses `512M`, `2G`, `1536m`, `4GiB`, `1T`; a bare number is MiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(split);
    let value: u64 = digits.parse().map_err(|_| {
        format!("`{s}` is not a size: expected a number with a K, M, G or T suffix")
    })?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 20,
        "k" | "kb" | "kib" => 10,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "unknown size suffix `{suffix}` in `{s}`: use K, M, G or T"
            ))
        }
    };
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("size `{s}` is too large"))
}

fn parse_memory(s: &str) -> Result<u64, String> {
    let bytes = parse_size(s)?;
    if bytes < MIN_MEMORY_BYTES {
        return Err(format!(
            "guest memory must be at least {} MiB",
            MIN_MEMORY_BYTES >> 20
        ));
    }
    if bytes % PAGE_SIZE != 0 {
        return Err("guest memory must be a multiple of 4 KiB".into());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn sizes_accept_binary_suffixes_and_bare_mib() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("256"), Ok(256 << 20));
    }

    #[test]
    fn sizes_reject_unknown_suffix_and_garbage() {
        assert!(parse_size("1Q").unwrap_err().contains("suffix"));
        assert!(parse_size("G").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999999999T").is_err());
        assert!(parse_size("99999999T").is_err());
    }

    #[test]
    fn memory_must_be_large_enough_and_page_aligned() {
        assert!(parse_memory("1M").is_err());
        assert!(parse_memory("16385K").is_err());
        assert_eq!(parse_memory("16M"), Ok(16 << 20));
    }

    #[test]
    fn cpus_must_be_between_one_and_max() {
        assert!(parse_cpus("0").is_err());
        assert_eq!(parse_cpus("4"), Ok(4));
        assert!(parse_cpus("255").is_err());
        assert!(parse_cpus("two").is_err());
    }

    #[test]
    fn serial_modes_parse() {
        assert_eq!("stdout".parse(), Ok(SerialConfig::Stdout));
        assert_eq!("off".parse(), Ok(SerialConfig::Off));
        assert_eq!(
            "file=/tmp/x".parse(),
            Ok(SerialConfig::File(PathBuf::from("/tmp/x")))
        );
        assert!("file=".parse::<SerialConfig>().is_err());
        assert!("tty".parse::<SerialConfig>().is_err());
        assert!("file=/x,mode=raw".parse::<SerialConfig>().is_err());
    }

    #[test]
    fn option_strings_reject_unknown_and_duplicate_keys() {
        let mut opts = OptionString::parse("path=/a,ioeventfd=on").unwrap();
        assert_eq!(opts.take("path").as_deref(), Some("/a"));
        assert_eq!(opts.finish(), Err("unknown option `ioeventfd`".into()));
        assert!(OptionString::parse("a=1,a=2").is_err());
        let mut opts = OptionString::parse("queue_size=128").unwrap();
        assert_eq!(opts.take_parsed::<u16>("queue_size"), Ok(Some(128)));
        let mut opts = OptionString::parse("queue_size=x").unwrap();
        assert!(opts.take_parsed::<u16>("queue_size").is_err());
    }

    #[test]
    fn cpu_profiles_parse() {
        assert_eq!(
            "host".parse::<CpuConfig>().unwrap().profile,
            CpuProfile::Host
        );
        assert_eq!(
            "pvm-safe".parse::<CpuConfig>().unwrap().profile,
            CpuProfile::PvmSafe
        );
        assert!("max".parse::<CpuConfig>().is_err());
    }

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
