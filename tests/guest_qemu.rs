//! The test guest under QEMU (`-kernel`, unchanged ELF): proof that its drivers follow the
//! spec rather than kickvm's reading of it. It reports the CPUs and memory QEMU gives it, and
//! its virtio-blk driver passes blk-verify on QEMU's virtio-blk-pci in every mode, leaving
//! exactly the documented pattern in the image files. Needs /dev/kvm and qemu-system-x86_64.

mod blk_pattern;
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use blk_pattern::{assert_image, written_sectors, SECTOR};
use common::{require_kvm, scratch_dir, test_guest, wait_with_timeout, RunOutput};

/// QEMU's firmware runs emulated at CPL0 under PVM: seconds before the guest starts.
const QEMU_TIMEOUT: Duration = Duration::from_secs(180);
const QEMU: &str = "qemu-system-x86_64";

fn run_qemu(cpus: u32, memory: &str, cmdline: &str, extra: &[String]) -> RunOutput {
    require_kvm();
    let guest = test_guest();
    let child = Command::new(QEMU)
        .args(["-enable-kvm", "-M", "q35", "-nographic", "-display", "none"])
        .args(["-serial", "stdio", "-monitor", "none", "-no-reboot"])
        .args(["-smp", &cpus.to_string(), "-m", memory])
        .arg("-kernel")
        .arg(guest)
        .args(["-append", cmdline])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {QEMU} ({e}): install qemu-system-x86"));
    let output = wait_with_timeout(child, QEMU_TIMEOUT);
    assert!(!output.timed_out, "QEMU did not finish in time:\n{output}");
    output
}

/// The fields of the `RESULT workload=NAME` line; QEMU's firmware output precedes it on the
/// same line, so the record is found anywhere in a line.
fn result(output: &RunOutput, workload: &str) -> HashMap<String, String> {
    let marker = format!("RESULT workload={workload} ");
    let line = output
        .stdout
        .lines()
        .find_map(|l| l.find(&marker).map(|at| &l[at..]))
        .unwrap_or_else(|| panic!("no `{marker}` line in the guest output:\n{output}"));
    line.split_whitespace()
        .skip(1)
        .filter_map(|word| word.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn assert_info(cpus: u32, memory: &str, expected_mib: u64) {
    let output = run_qemu(cpus, memory, "workload=info", &[]);
    let r = result(&output, "info");
    assert_eq!(r["status"], "ok", "{output}");
    assert_eq!(r["cpus"], cpus.to_string(), "CPUs listed:\n{output}");
    assert_eq!(
        r["cpus_started"],
        cpus.to_string(),
        "CPUs started:\n{output}"
    );
    let mib: u64 = r["mem_mib"].parse().expect("mem_mib is a number");
    // SeaBIOS keeps a little RAM for itself and the BIOS area below 1 MiB is reserved.
    assert!(
        (expected_mib - 2..=expected_mib).contains(&mib),
        "guest sees {mib} MiB of {expected_mib} MiB:\n{output}"
    );
    assert!(output.stdout.contains("DONE status=ok"), "{output}");
    assert_eq!(
        r["power_button"], "none",
        "q35 has no GED; the guest must not route a pin it does not own:\n{output}"
    );
}

#[test]
fn qemu_one_vcpu_512m_is_reported() {
    assert_info(1, "512M", 512);
}

#[test]
fn qemu_two_vcpus_all_start() {
    assert_info(2, "512M", 512);
}

#[test]
fn qemu_four_vcpus_4g_all_start_and_memory_is_reported() {
    assert_info(4, "4G", 4096);
}

#[test]
fn qemu_unknown_workload_fails_cleanly() {
    let output = run_qemu(1, "128M", "workload=no-such-thing", &[]);
    let r = result(&output, "no-such-thing");
    assert_eq!(r["status"], "fail", "{output}");
    assert_eq!(r["reason"], "unknown-workload", "{output}");
    assert!(output.stdout.contains("DONE status=fail"), "{output}");
}

// ---- blk-verify (the pattern lives in tests/blk_pattern) ----

struct Disk {
    path: PathBuf,
    readonly: bool,
}

fn image(dir: &Path, name: &str, bytes: u64, fill: u8) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, vec![fill; bytes as usize]).expect("creating a disk image");
    path
}

/// QEMU arguments for virtio-blk-pci disks; `device_props` go on every device.
fn disk_args(disks: &[Disk], device_props: &str) -> Vec<String> {
    let mut args = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let ro = if d.readonly { ",readonly=on" } else { "" };
        args.push("-drive".to_string());
        args.push(format!(
            "file={},if=none,id=d{i},format=raw{ro}",
            d.path.display()
        ));
        args.push("-device".to_string());
        args.push(format!("virtio-blk-pci,drive=d{i}{device_props}"));
    }
    args
}

fn blk_verify(name: &str, cpus: u32, cmdline: &str, device_props: &str, sizes: &[u64]) {
    let dir = scratch_dir(name);
    let seed = 0x5eed_0000 + sizes.len() as u64 * 7 + cpus as u64;
    let disks: Vec<Disk> = sizes
        .iter()
        .enumerate()
        .map(|(i, &bytes)| Disk {
            path: image(&dir, &format!("d{i}.img"), bytes, 0xA5),
            readonly: false,
        })
        .collect();
    let output = run_qemu(
        cpus,
        "512M",
        &format!("workload=blk-verify seed={seed} {cmdline}"),
        &disk_args(&disks, device_props),
    );
    let r = result(&output, "blk-verify");
    assert_eq!(r["status"], "ok", "{output}");
    assert_eq!(r["errors"], "0", "{output}");
    assert_eq!(r["disks"], sizes.len().to_string(), "{output}");
    assert_eq!(r["threads"], cpus.to_string(), "{output}");
    let expected_blocks: usize = sizes
        .iter()
        .map(|&b| written_sectors(b / SECTOR as u64).len())
        .sum();
    assert_eq!(r["blocks"], expected_blocks.to_string(), "{output}");
    if cmdline.contains("completion=irq") {
        let interrupts: u64 = r["interrupts"].parse().expect("interrupts is a number");
        assert!(interrupts > 0, "no MSI-X interrupt taken:\n{output}");
    } else {
        assert_eq!(r["irqs"], "0", "{output}");
    }
    // QEMU's write-zeroes must zero; its default discard=ignore keeps the data.
    assert_eq!(r["write_zeroes"], "zeroed", "{output}");
    for (i, d) in disks.iter().enumerate() {
        assert_image(&d.path, seed, i as u64, 0xA5);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn qemu_blk_verify_modern_polled() {
    blk_verify(
        "qemu-modern-poll",
        1,
        "transport=modern completion=poll",
        ",ioeventfd=on,disable-legacy=on",
        &[8 << 20],
    );
}

#[test]
fn qemu_blk_verify_legacy_polled() {
    blk_verify(
        "qemu-legacy-poll",
        1,
        "transport=legacy completion=poll",
        ",ioeventfd=on,disable-modern=on",
        &[8 << 20],
    );
}

#[test]
fn qemu_blk_verify_modern_interrupts_ioeventfd_off() {
    blk_verify(
        "qemu-modern-irq",
        1,
        "transport=modern completion=irq",
        ",ioeventfd=off",
        &[8 << 20],
    );
}

#[test]
fn qemu_blk_verify_legacy_interrupts_without_event_idx_or_indirect() {
    blk_verify(
        "qemu-legacy-irq-plain",
        1,
        "transport=legacy completion=irq event_idx=off indirect=off",
        ",ioeventfd=on",
        &[4 << 20],
    );
}

#[test]
fn qemu_blk_verify_two_vcpus_own_queues_four_disks() {
    // The 80 MiB disk takes the strided (every other extent) path.
    blk_verify(
        "qemu-2cpu-4disks",
        2,
        "completion=irq",
        ",ioeventfd=on,num-queues=2",
        &[8 << 20, 4 << 20, 2 << 20, 80 << 20],
    );
}

#[test]
fn qemu_blk_verify_two_vcpus_share_one_queue() {
    blk_verify(
        "qemu-2cpu-1queue",
        2,
        "completion=poll",
        ",ioeventfd=on,num-queues=1",
        &[8 << 20],
    );
}

#[test]
fn qemu_read_only_disk_refuses_writes_and_keeps_its_data() {
    let dir = scratch_dir("qemu-readonly");
    let writable = Disk {
        path: image(&dir, "rw.img", 4 << 20, 0),
        readonly: false,
    };
    let readonly = Disk {
        path: image(&dir, "ro.img", 1 << 20, 0x3C),
        readonly: true,
    };
    let output = run_qemu(
        1,
        "256M",
        "workload=blk-verify seed=99",
        &disk_args(&[writable, readonly], ",ioeventfd=on"),
    );
    let r = result(&output, "blk-verify");
    assert_eq!(r["status"], "ok", "{output}");
    assert_eq!(r["ro_disks"], "1", "{output}");
    assert_eq!(r["ro_refused"], "1", "{output}");
    let data = std::fs::read(dir.join("ro.img")).unwrap();
    assert!(
        data.iter().all(|&b| b == 0x3C),
        "the read-only image changed"
    );
    assert_image(&dir.join("rw.img"), 99, 0, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn qemu_blk_bench_and_kick_bench_report_figures() {
    let dir = scratch_dir("qemu-bench");
    let disk = Disk {
        path: image(&dir, "bench.img", 16 << 20, 0),
        readonly: false,
    };
    let args = disk_args(&[disk], ",ioeventfd=on");
    let output = run_qemu(
        1,
        "256M",
        "workload=blk-bench rw=randread bs=4096 qd=8 secs=1",
        &args,
    );
    let r = result(&output, "blk-bench");
    assert_eq!(r["status"], "ok", "{output}");
    let iops: u64 = r["iops"].parse().unwrap();
    let p50: u64 = r["lat_p50_us"].parse().unwrap();
    let p99: u64 = r["lat_p99_us"].parse().unwrap();
    assert!(iops > 0 && p50 <= p99, "{output}");

    let output = run_qemu(1, "256M", "workload=kick-bench n=2000", &args);
    let r = result(&output, "kick-bench");
    assert_eq!(r["status"], "ok", "{output}");
    assert_eq!(r["n"], "2000", "{output}");
    let ns: u64 = r["ns_per_kick"].parse().unwrap();
    assert!(ns > 0, "{output}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn qemu_blk_verify_modern_bar_above_4g_is_mapped() {
    // A 2 GiB ivshmem BAR fills SeaBIOS's 32-bit window, so the virtio-blk 64-bit BAR is
    // placed above 4 GiB, beyond the guest's boot-time identity map.
    let dir = scratch_dir("qemu-high-bar");
    let disk = Disk {
        path: image(&dir, "d0.img", 4 << 20, 0),
        readonly: false,
    };
    let mut args: Vec<String> = [
        "-object",
        "memory-backend-ram,id=shm,size=2G",
        "-device",
        "ivshmem-plain,memdev=shm",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(disk_args(&[disk], ",disable-legacy=on"));
    let output = run_qemu(1, "256M", "workload=blk-verify seed=4242", &args);
    let r = result(&output, "blk-verify");
    assert_eq!(r["status"], "ok", "{output}");
    let regs = output
        .stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("regs=0x"))
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .unwrap_or_else(|| panic!("no regs= on the DISK line:\n{output}"));
    assert!(
        regs >= 1 << 32,
        "the BAR stayed below 4 GiB ({regs:#x}):\n{output}"
    );
    assert_image(&dir.join("d0.img"), 4242, 0, 0);
    let _ = std::fs::remove_dir_all(&dir);
}
