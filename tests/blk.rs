//! virtio-blk end to end: `kickvm run --disk ...` boots the test guest's `blk-verify` and the
//! image files are checked on the host afterwards. Covers both transports with ioeventfd on
//! and off, polled and interrupt completions, two vCPUs on their own queues, four disks, a
//! read-only disk, SIGKILL right after a flush, the notify mode and kick counters (exit log and
//! control API), and bad `--disk` input. Needs /dev/kvm.

mod api_vm;
mod blk_pattern;
mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use api_vm::{exit_queue_counters, ApiVm};
use common::RunOutput;

const MIB: u64 = 1 << 20;
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// The VM tests run one at a time: on two busy cores, guests spinning on their rings starve
/// each other's I/O threads and a run measures the machine, not kickvm.
static ONE_VM_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn take_turn() -> std::sync::MutexGuard<'static, ()> {
    ONE_VM_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A scratch directory for images, removed when the test ends (pass or fail).
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = common::scratch_dir(&format!("blk-{name}"));
        Scratch(dir)
    }

    /// A sparse image of `bytes`, all zero.
    fn image(&self, name: &str, bytes: u64) -> PathBuf {
        api_vm::image(&self.0, name, bytes)
    }

    /// An image of `bytes` filled with `byte` (so "untouched" is distinguishable from zeroed).
    fn filled_image(&self, name: &str, bytes: u64, byte: u8) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, vec![byte; bytes as usize]).expect("writing an image");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn disk_arg(path: &Path, options: &str) -> String {
    if options.is_empty() {
        format!("path={}", path.display())
    } else {
        format!("path={},{options}", path.display())
    }
}

fn run_guest(cmdline: &str, extra: &[String]) -> RunOutput {
    common::run_test_guest_with_queue_log(cmdline, extra, RUN_TIMEOUT)
}

/// kickvm's stdout read as it comes, for tests that act on a line while the guest runs.
struct LiveStdout {
    lines: mpsc::Receiver<String>,
    reader: std::thread::JoinHandle<()>,
    /// Every line read so far.
    seen: String,
}

impl LiveStdout {
    fn new(child: &mut std::process::Child) -> Self {
        let stdout = child.stdout.take().expect("kickvm's stdout is piped");
        let (lines_tx, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        LiveStdout {
            lines,
            reader,
            seen: String::new(),
        }
    }

    /// Reads lines until one satisfies `wanted` (true) or the output ends or RUN_TIMEOUT
    /// passes (false).
    fn wait_for(&mut self, wanted: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + RUN_TIMEOUT;
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push_str(&line);
            self.seen.push('\n');
            if wanted(&line) {
                return true;
            }
        }
        false
    }

    /// The lines after those read so far, once the process has ended.
    fn rest(self) -> String {
        let _ = self.reader.join();
        self.lines.try_iter().map(|l| l + "\n").collect()
    }
}

/// Asserts a clean blk-verify run over `disks` disks and returns its RESULT fields.
fn assert_verified(output: &RunOutput, disks: usize) -> HashMap<String, String> {
    output.assert_exit_code(0);
    let result = output.result("blk-verify");
    assert_eq!(result["status"], "ok", "{output}");
    assert_eq!(result["errors"], "0", "{output}");
    assert_eq!(result["disks"], disks.to_string(), "{output}");
    assert!(
        output.stdout.lines().any(|l| l == "DONE status=ok"),
        "{output}"
    );
    let flushed = output
        .stdout
        .lines()
        .filter(|l| l.starts_with("FLUSHED disk="))
        .count();
    assert_eq!(
        flushed.to_string(),
        result["flushes"],
        "one FLUSHED line per flush:\n{output}"
    );
    result
}

/// blk-verify with `seed` on a fresh 8 MiB image `name` (`--disk` options `options`, guest
/// words `guest`, kickvm arguments `vm_args` before the disk), asserted clean; returns the run,
/// its RESULT fields and the image, for the pattern check.
fn verify_fresh_disk(
    scratch: &Scratch,
    name: &str,
    seed: u64,
    options: &str,
    guest: &str,
    vm_args: &[&str],
) -> (RunOutput, HashMap<String, String>, PathBuf) {
    let image = scratch.image(name, 8 * MIB);
    let mut args: Vec<String> = vm_args.iter().map(|a| a.to_string()).collect();
    args.extend(["--disk".into(), disk_arg(&image, options)]);
    let output = run_guest(&format!("workload=blk-verify seed={seed} {guest}"), &args);
    let result = assert_verified(&output, 1);
    (output, result, image)
}

/// The guest's `DISK index=0 ...` line.
fn first_disk_line<'a>(output: &'a RunOutput, what: &str) -> &'a str {
    output
        .stdout
        .lines()
        .find(|l| l.starts_with("DISK index=0 "))
        .unwrap_or_else(|| panic!("{what}: no DISK line\n{output}"))
}

/// The exit summary's counters for `device`, one map per queue in queue order.
fn queue_summaries(output: &RunOutput, device: &str) -> Vec<HashMap<String, String>> {
    let mut queues: Vec<(usize, HashMap<String, String>)> = exit_queue_counters(&output.stderr)
        .into_iter()
        .filter(|(id, _, _)| id == device)
        .map(|(_, index, counters)| (index, counters))
        .collect();
    queues.sort_by_key(|(index, _)| *index);
    queues.into_iter().map(|(_, counters)| counters).collect()
}

fn count(counters: &HashMap<String, String>, key: &str) -> u64 {
    counters
        .get(key)
        .unwrap_or_else(|| panic!("no `{key}` in {counters:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("`{key}` is not a number in {counters:?}"))
}

/// ioeventfd on: every kick went through the eventfd, none was a notify exit; off: the
/// reverse. `mode` is the summary's notify mode the run ended in.
fn assert_notify_path(counters: &HashMap<String, String>, ioeventfd: bool, what: &str) {
    let by_eventfd = count(counters, "kicks_ioeventfd");
    let by_exit = count(counters, "kicks_exit");
    if ioeventfd {
        assert_eq!(counters["mode"], "ioeventfd", "{what}: {counters:?}");
        assert!(
            by_eventfd > 0 && by_exit == 0,
            "{what}: ioeventfd on must give eventfd kicks and no notify exits: {counters:?}"
        );
    } else {
        assert_eq!(counters["mode"], "sync", "{what}: {counters:?}");
        assert!(
            by_exit > 0 && by_eventfd == 0,
            "{what}: ioeventfd off must give notify exits and no eventfd kicks: {counters:?}"
        );
    }
}

#[test]
fn blk_verify_passes_on_both_transports_with_ioeventfd_on_and_off_polled_and_by_interrupt() {
    let _turn = take_turn();
    let scratch = Scratch::new("matrix");
    let mut seed = 100;
    for transport in ["modern", "legacy"] {
        for ioeventfd in [true, false] {
            for completion in ["poll", "irq"] {
                seed += 1;
                let what = format!(
                    "transport={transport} ioeventfd={} completion={completion}",
                    if ioeventfd { "on" } else { "off" }
                );
                let (output, result, image) = verify_fresh_disk(
                    &scratch,
                    &format!("{transport}-{ioeventfd}-{completion}.img"),
                    seed,
                    &format!("ioeventfd={}", if ioeventfd { "on" } else { "off" }),
                    &format!("transport={transport} completion={completion}"),
                    &[],
                );
                assert_eq!(result["transport"], transport, "{what}\n{output}");
                assert_eq!(result["completion"], completion, "{what}\n{output}");
                assert_eq!(result["blocks"], (8 * MIB / 512).to_string(), "{what}");
                assert_eq!(result["flushes"], "1", "{what}");
                if completion == "irq" {
                    assert_ne!(
                        result["interrupts"], "0",
                        "{what}: completions came by interrupt"
                    );
                } else {
                    assert_eq!(
                        (result["irqs"].as_str(), result["interrupts"].as_str()),
                        ("0", "0"),
                        "{what}: polling waits for no interrupt and gets none"
                    );
                }
                let disk_line = first_disk_line(&output, &what);
                assert!(
                    disk_line.contains(&format!("transport={transport} ")),
                    "{what}: {disk_line}"
                );
                let queues = queue_summaries(&output, "disk0");
                assert_eq!(queues.len(), 1, "{what}: one queue summary\n{output}");
                assert_notify_path(&queues[0], ioeventfd, &what);
                // Every kick the guest made reached the device by the path in force.
                let guest_kicks: u64 = result["kicks"].parse().unwrap();
                assert_eq!(
                    count(&queues[0], "kicks_ioeventfd") + count(&queues[0], "kicks_exit"),
                    guest_kicks,
                    "{what}: kicks made vs handled\n{output}"
                );
                blk_pattern::assert_image(&image, seed, 0, 0);
            }
        }
    }
}

/// A guest without MSI-X: completions by the function's INTx line (level-triggered, through
/// the IOAPIC, re-raised by KVM's resample while the ISR holds something), on both transports,
/// two queues sharing the line, ioeventfd on and off. The guest's handler reads the ISR before
/// its EOI, so the line interrupts about once per completion the device signalled; a handler
/// that did not (tried) took ~100 times as many.
#[test]
fn blk_verify_passes_by_intx_interrupts_on_both_transports_with_ioeventfd_on_and_off() {
    let _turn = take_turn();
    let scratch = Scratch::new("intx");
    let mut seed = 300;
    for transport in ["modern", "legacy"] {
        for ioeventfd in ["on", "off"] {
            seed += 1;
            let what = format!("transport={transport} ioeventfd={ioeventfd}");
            let (output, result, image) = verify_fresh_disk(
                &scratch,
                &format!("{transport}-{ioeventfd}.img"),
                seed,
                &format!("ioeventfd={ioeventfd},queues=2,transport={transport}"),
                &format!("transport={transport} completion=irq irq=intx"),
                &["--cpus", "2"],
            );
            assert_eq!(result["irq"], "intx", "{what}\n{output}");
            let taken: u64 = result["interrupts"].parse().unwrap();
            let queues = queue_summaries(&output, "disk0");
            assert_eq!(queues.len(), 2, "{what}: two queue summaries\n{output}");
            let sent: u64 = queues.iter().map(|q| count(q, "interrupts_sent")).sum();
            for queue in &queues {
                assert_notify_path(queue, ioeventfd == "on", &what);
                assert!(count(queue, "interrupts_sent") > 0, "{what}: {queue:?}");
            }
            assert!(
                taken > 0 && taken < 3 * sent,
                "{what}: the guest took {taken} INTx interrupts for {sent} the device sent\n{output}"
            );
            blk_pattern::assert_image(&image, seed, 0, 0);
        }
    }
}

/// The guest gives every BAR of the running device a new address (after DRIVER_OK, when kickvm
/// has registered the doorbells' ioeventfds), then does all its I/O: the registers answer at
/// the new addresses, every kick still arrives by ioeventfd (none exits: with the move of the
/// registrations taken out, tried, every kick exited), and the MSI-X interrupts keep coming,
/// on both transports.
#[test]
fn a_guest_that_moves_the_bars_keeps_its_ioeventfd_kicks_and_interrupts() {
    let _turn = take_turn();
    let scratch = Scratch::new("bars");
    let mut seed = 400;
    for transport in ["modern", "legacy"] {
        let mut registers = Vec::new();
        for bars in ["keep", "move"] {
            seed += 1;
            let what = format!("transport={transport} bars={bars}");
            let (output, result, image) = verify_fresh_disk(
                &scratch,
                &format!("{transport}-{bars}.img"),
                seed,
                &format!("queues=2,transport={transport}"),
                &format!("transport={transport} completion=irq bars={bars}"),
                &["--cpus", "2"],
            );
            assert_ne!(
                result["interrupts"], "0",
                "{what}: MSI-X interrupts\n{output}"
            );
            let disk_line = first_disk_line(&output, &what);
            let regs = disk_line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("regs="))
                .unwrap_or_else(|| panic!("{what}: {disk_line}"))
                .to_string();
            registers.push(regs);
            let queues = queue_summaries(&output, "disk0");
            assert_eq!(queues.len(), 2, "{what}\n{output}");
            for queue in &queues {
                assert_notify_path(queue, true, &what);
            }
            blk_pattern::assert_image(&image, seed, 0, 0);
        }
        assert_ne!(
            registers[0], registers[1],
            "transport={transport}: bars=move put the registers elsewhere"
        );
    }
}

/// Every I/O engine serves the same guest: the pattern verifies and lands in the image.
/// `completion=irq` re-arms the queue's interrupt after every harvest, as Linux's drivers do,
/// so a request the device completes inside the kick's exit (sync mode) is still signalled;
/// `irq_arm=on-wait` asks only when the guest has to wait, and those completions come unsignalled.
#[test]
fn interrupt_completion_signals_every_completion_unless_armed_only_on_wait() {
    let _turn = take_turn();
    let scratch = Scratch::new("irq-arm");
    let image = scratch.image("disk.img", 8 * MIB);
    let disk = ["--disk".to_string(), disk_arg(&image, "ioeventfd=off")];
    let run = |arm: &str| {
        let output = run_guest(
            &format!("workload=blk-bench rw=randread qd=1 secs=1 completion=irq irq_arm={arm}"),
            &disk,
        );
        output.assert_exit_code(0);
        let r = output.result("blk-bench");
        assert_eq!(r["status"], "ok", "{output}");
        let num = |key: &str| r[key].parse::<u64>().expect("a number");
        (num("ops"), num("interrupts"))
    };
    let (ops, interrupts) = run("always");
    assert!(
        ops > 100 && interrupts * 10 >= ops * 9,
        "always: {interrupts} interrupts for {ops} requests"
    );
    let (ops, interrupts) = run("on-wait");
    assert!(
        ops > 100 && interrupts * 10 < ops,
        "on-wait: {interrupts} interrupts for {ops} requests completed inside their kick"
    );
}

/// `irq_wait=halt`: the guest halts (through a self-IPI to a CPL0 handler) instead of
/// spinning while it waits for its interrupt; no completion is slept through.
#[test]
fn blk_verify_passes_with_a_guest_that_halts_while_it_waits() {
    let _turn = take_turn();
    let scratch = Scratch::new("irq-halt");
    for ioeventfd in ["on", "off"] {
        let image = scratch.image(&format!("{ioeventfd}.img"), 8 * MIB);
        let output = run_guest(
            "workload=blk-verify seed=7 loops=3 completion=irq irq_wait=halt",
            &[
                "--disk".into(),
                disk_arg(&image, &format!("ioeventfd={ioeventfd}")),
            ],
        );
        let result = assert_verified(&output, 1);
        assert_ne!(result["interrupts"], "0", "ioeventfd={ioeventfd}\n{output}");
    }
}

#[test]
fn blk_verify_passes_on_every_io_engine() {
    let _turn = take_turn();
    let scratch = Scratch::new("engines");
    for (seed, engine) in (30u64..).zip(["io_uring", "threads", "sync", "mmap"]) {
        let image = scratch.image(&format!("{engine}.img"), 8 * MIB);
        let output = run_guest(
            &format!("workload=blk-verify seed={seed} loops=2"),
            &[
                "--disk".into(),
                disk_arg(&image, &format!("engine={engine}")),
            ],
        );
        assert_verified(&output, 1);
        blk_pattern::assert_image(&image, seed + 1, 0, 0);
    }
}

/// A device that offers only one interface (kickvm `transport=modern|legacy`) is found and
/// verified by a guest that takes whatever each device has.
#[test]
fn blk_verify_passes_on_modern_only_and_legacy_only_devices() {
    let _turn = take_turn();
    let scratch = Scratch::new("pure");
    let modern = scratch.image("modern.img", 8 * MIB);
    let legacy = scratch.image("legacy.img", 16 * MIB);
    let output = run_guest(
        "workload=blk-verify seed=5 transport=auto",
        &[
            "--disk".into(),
            disk_arg(&modern, "transport=modern"),
            "--disk".into(),
            disk_arg(&legacy, "transport=legacy,ioeventfd=off"),
        ],
    );
    assert_verified(&output, 2);
    let transports: Vec<&str> = output
        .stdout
        .lines()
        .filter(|l| l.starts_with("DISK index="))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("transport=")))
        .collect();
    assert_eq!(
        transports,
        ["transport=modern", "transport=legacy"],
        "{output}"
    );
    assert_notify_path(&queue_summaries(&output, "disk0")[0], true, "modern disk");
    assert_notify_path(&queue_summaries(&output, "disk1")[0], false, "legacy disk");
    blk_pattern::assert_image(&modern, 5, 0, 0);
    blk_pattern::assert_image(&legacy, 5, 1, 0);
}

#[test]
fn two_vcpus_each_drive_their_own_queue() {
    let _turn = take_turn();
    let scratch = Scratch::new("mq");
    let image = scratch.image("mq.img", 32 * MIB);
    for completion in ["poll", "irq"] {
        let output = run_guest(
            &format!("workload=blk-verify seed=21 loops=2 completion={completion}"),
            &[
                "--cpus".into(),
                "2".into(),
                "--disk".into(),
                disk_arg(&image, "queues=2"),
            ],
        );
        let result = assert_verified(&output, 1);
        assert_eq!(result["threads"], "2", "{output}");
        assert!(
            output
                .stdout
                .lines()
                .any(|l| l.starts_with("DISK index=0 ") && l.contains(" queues=2 ")),
            "the guest sees two queues:\n{output}"
        );
        let queues = queue_summaries(&output, "disk0");
        assert_eq!(queues.len(), 2, "two queue summaries:\n{output}");
        // Each vCPU's thread writes and reads every other one of the 512 extents on its own
        // queue, in each of the 2 loops: 256 * 2 * 2 requests (queue 0 also carries GET_ID,
        // the flushes and the range checks).
        for (index, queue) in queues.iter().enumerate() {
            assert!(
                count(queue, "requests") >= 1024,
                "{completion}: queue {index} carried its vCPU's share: {queue:?}"
            );
            assert_notify_path(queue, true, &format!("{completion} queue {index}"));
        }
        if completion == "irq" {
            assert_ne!(result["interrupts"], "0");
            for (index, queue) in queues.iter().enumerate() {
                assert!(
                    count(queue, "interrupts_sent") > 0,
                    "queue {index} interrupted its vCPU: {queue:?}"
                );
            }
        }
        blk_pattern::assert_image(&image, 22, 0, 0);
    }
}

#[test]
fn eight_disks_at_once_each_hold_their_own_pattern() {
    let _turn = take_turn();
    let scratch = Scratch::new("eight");
    // Different sizes (one not a whole number of extents), transports and notify settings.
    let sizes = [
        8 * MIB,
        12 * MIB,
        16 * MIB + 3 * 512,
        24 * MIB,
        4 * MIB,
        6 * MIB,
        8 * MIB,
        4 * MIB + 512,
    ];
    let options = [
        "ioeventfd=on",
        "ioeventfd=off",
        "ioeventfd=on,queues=2,serial=kickvm-blk-test-2",
        "ioeventfd=off,queues=2",
        "ioeventfd=on,transport=legacy",
        "ioeventfd=off,transport=legacy",
        "ioeventfd=on,transport=modern,engine=threads",
        "ioeventfd=on,queues=2,engine=sync,serial=kickvm-blk-test-7",
    ];
    let images: Vec<PathBuf> = sizes
        .iter()
        .enumerate()
        .map(|(d, &bytes)| scratch.image(&format!("disk{d}.img"), bytes))
        .collect();
    let mut args = vec!["--cpus".to_string(), "2".to_string()];
    for (image, options) in images.iter().zip(options) {
        args.push("--disk".into());
        args.push(disk_arg(image, options));
    }
    // transport=auto: modern where offered, else legacy (disks 4 and 5 are legacy-only).
    let output = run_guest(
        "workload=blk-verify seed=77 completion=irq transport=auto",
        &args,
    );
    let result = assert_verified(&output, 8);
    let total_sectors: u64 = sizes.iter().map(|b| b / 512).sum();
    assert_eq!(result["blocks"], total_sectors.to_string(), "{output}");
    assert_eq!(result["flushes"], "8");
    let ids: Vec<&str> = output
        .stdout
        .lines()
        .filter(|l| l.starts_with("ID disk="))
        .collect();
    let expected_ids: Vec<String> = (0..8)
        .map(|d| match d {
            2 | 7 => format!("ID disk={d} id=kickvm-blk-test-{d}"),
            _ => format!("ID disk={d} id=-"),
        })
        .collect();
    assert_eq!(
        ids, expected_ids,
        "GET_ID answers each disk's serial:\n{output}"
    );
    for (d, image) in images.iter().enumerate() {
        let queues = queue_summaries(&output, &format!("disk{d}"));
        assert!(!queues.is_empty(), "disk{d} has an exit summary:\n{output}");
        for queue in &queues {
            assert_notify_path(
                queue,
                options[d].contains("ioeventfd=on"),
                &format!("disk{d}"),
            );
        }
        blk_pattern::assert_image(image, 77, d as u64, 0);
    }
}

/// Above 64 MiB blk-verify writes every `stride`-th extent plus the last: the extents between
/// must keep their old bytes, so a request landing at the wrong offset shows.
#[test]
fn a_disk_over_64_mib_holds_the_pattern_on_the_strided_extents_and_old_bytes_between() {
    let _turn = take_turn();
    let scratch = Scratch::new("strided");
    // 1153 extents (the last one short): stride 2, so every other extent is left alone.
    let bytes = 72 * MIB + 7 * 512;
    let image = scratch.filled_image("big.img", bytes, 0x5A);
    let output = run_guest(
        "workload=blk-verify seed=44 completion=irq",
        &[
            "--cpus".into(),
            "2".into(),
            "--disk".into(),
            disk_arg(&image, "queues=2"),
        ],
    );
    let result = assert_verified(&output, 1);
    let written = blk_pattern::written_sectors(bytes / 512).len();
    assert!(written < (bytes / 512) as usize, "the disk is strided");
    assert_eq!(result["blocks"], written.to_string(), "{output}");
    blk_pattern::assert_image(&image, 44, 0, 0x5A);
}

/// An image whose size is not a multiple of 512 is a disk of its whole sectors: the pattern
/// fills them, the tail keeps its bytes and the file does not grow.
#[test]
fn an_image_with_a_partial_last_sector_keeps_its_tail_and_its_size() {
    let _turn = take_turn();
    let scratch = Scratch::new("partial");
    let bytes = MIB + 300;
    let image = scratch.filled_image("partial.img", bytes, 0x5A);
    let output = run_guest(
        "workload=blk-verify seed=12",
        &["--disk".into(), disk_arg(&image, "")],
    );
    let result = assert_verified(&output, 1);
    assert_eq!(result["blocks"], (MIB / 512).to_string(), "{output}");
    let data = std::fs::read(&image).unwrap();
    assert_eq!(data.len() as u64, bytes, "the image kept its size");
    assert!(
        data[MIB as usize..].iter().all(|&b| b == 0x5A),
        "the partial sector at the end was left alone"
    );
    let whole = scratch.0.join("whole.img");
    std::fs::write(&whole, &data[..MIB as usize]).unwrap();
    blk_pattern::assert_image(&whole, 12, 0, 0x5A);
}

#[test]
fn a_readonly_disk_refuses_writes_and_its_image_is_unchanged() {
    let _turn = take_turn();
    let scratch = Scratch::new("ro");
    let writable = scratch.image("rw.img", 8 * MIB);
    let protected = scratch.filled_image("ro.img", 8 * MIB, 0xA5);
    for transport in ["modern", "legacy"] {
        let output = run_guest(
            &format!("workload=blk-verify seed=9 transport={transport}"),
            &[
                "--disk".into(),
                disk_arg(&writable, ""),
                "--disk".into(),
                disk_arg(&protected, "readonly=on"),
            ],
        );
        let result = assert_verified(&output, 2);
        assert_eq!(result["ro_disks"], "1", "{transport}\n{output}");
        assert_eq!(result["ro_refused"], "1", "{transport}\n{output}");
        assert!(
            output
                .stdout
                .lines()
                .any(|l| l.starts_with("DISK index=1 ") && l.contains(" ro=1 ")),
            "{transport}: the guest sees VIRTIO_BLK_F_RO:\n{output}"
        );
        blk_pattern::assert_image(&writable, 9, 0, 0);
        let data = std::fs::read(&protected).unwrap();
        assert!(
            data.iter().all(|&b| b == 0xA5),
            "{transport}: the read-only image changed"
        );
    }
}

/// Runs blk-verify with `hold=1` on one disk, reads the serial output as it comes, and
/// SIGKILLs kickvm on the `FLUSHED` line. Returns what kickvm printed.
fn kill_after_first_flush(image: &Path, seed: u64, disk_options: &str) -> String {
    common::require_kvm();
    let mut child = Command::new(common::kickvm_binary())
        .args(["run", "--kernel"])
        .arg(common::test_guest())
        .args([
            "--cmdline",
            &format!("workload=blk-verify seed={seed} hold=1"),
            "--disk",
            &disk_arg(image, disk_options),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("cannot start kickvm");
    let mut live = LiveStdout::new(&mut child);
    let flushed = live.wait_for(|line| line == "FLUSHED disk=0 loop=0");
    // SAFETY: sending a signal to our own child process, which has not been reaped yet.
    let killed = unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let status = child.wait().expect("waiting for kickvm");
    let seen = live.seen.clone();
    live.rest();
    assert!(flushed, "no FLUSHED line (kickvm ended: {status}):\n{seen}");
    assert_eq!(killed, 0, "kickvm was still alive at the FLUSHED line");
    assert!(
        std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGKILL),
        "kickvm died of the SIGKILL, not by itself: {status}\n{seen}"
    );
    assert!(
        !seen.contains("RESULT "),
        "the guest held after the flush:\n{seen}"
    );
    seen
}

#[test]
fn data_flushed_before_a_sigkill_is_in_the_image() {
    let _turn = take_turn();
    let scratch = Scratch::new("sigkill");
    for (options, seed) in [
        ("", 31),
        ("ioeventfd=off", 32),
        ("engine=threads", 33),
        ("direct=on", 34),
    ] {
        let image = scratch.image(&format!("kill-{seed}.img"), 16 * MIB);
        kill_after_first_flush(&image, seed, options);
        // Everything the guest wrote before its flush completed is in the file, and nothing
        // else changed (hold=1 stops the guest before the verify and range checks).
        blk_pattern::assert_image(&image, seed, 0, 0);
    }
}

/// vm.counters and vm.info show which path the kicks took, while the guest is held after its
/// flush (so the counts are final), for both transports and both settings.
#[test]
fn control_api_counters_show_no_notify_exits_with_ioeventfd_and_only_exits_without() {
    let _turn = take_turn();
    let scratch = Scratch::new("api-counters");
    for transport in ["modern", "legacy"] {
        for ioeventfd in [true, false] {
            let what = format!("{transport} ioeventfd={ioeventfd}");
            let image = scratch.image(&format!("{transport}-{ioeventfd}.img"), 8 * MIB);
            let disk = disk_arg(
                &image,
                &format!("ioeventfd={}", if ioeventfd { "on" } else { "off" }),
            );
            let mut vm = ApiVm::start(
                &format!("blk-api-{transport}-{ioeventfd}"),
                common::test_guest(),
                &format!("workload=blk-verify seed=3 hold=1 transport={transport}"),
                &["--disk", &disk],
            );
            // Wait for the guest to hold: GET_ID, one write per 64 KiB extent, the flush.
            let deadline = Instant::now() + RUN_TIMEOUT;
            let requests_at_hold = 1 + 8 * MIB / (64 << 10) + 1;
            let queue = loop {
                let counters = vm.ok("GET", "vm.counters", None);
                let queue = counters["devices"][0]["queues"][0].clone();
                if queue["requests"].as_u64().unwrap_or(0) >= requests_at_hold {
                    break queue;
                }
                assert!(
                    Instant::now() < deadline,
                    "{what}: the guest never got through its writes: {counters}"
                );
                std::thread::sleep(Duration::from_millis(10));
            };
            let by_exit = queue["kicks_exit"].as_u64().unwrap();
            let by_eventfd = queue["kicks_ioeventfd"].as_u64().unwrap();
            let device = vm.device("disk0");
            if ioeventfd {
                assert!(by_eventfd > 0 && by_exit == 0, "{what}: {queue}");
                assert_eq!(
                    device["queues"][0]["notify"], "ioeventfd",
                    "{what}: {device}"
                );
            } else {
                assert!(by_exit > 0 && by_eventfd == 0, "{what}: {queue}");
                assert_eq!(device["queues"][0]["notify"], "sync", "{what}: {device}");
                assert_eq!(
                    device["queues"][0]["reason"], "ioeventfd-off",
                    "{what}: {device}"
                );
            }
            assert_eq!(vm.call("PUT", "vm.kill", None).0, 204, "{what}");
            let output = vm.finish(RUN_TIMEOUT);
            output.assert_exit_code(0);
            // The exit summary agrees with what the API said.
            let summary = &queue_summaries(&output, "disk0")[0];
            assert_notify_path(summary, ioeventfd, &what);
            assert_eq!(count(summary, "kicks_exit"), by_exit, "{what}");
            assert_eq!(count(summary, "kicks_ioeventfd"), by_eventfd, "{what}");
        }
    }
}

#[test]
fn bad_disk_options_are_one_line_usage_errors() {
    let scratch = Scratch::new("bad-input");
    let image = scratch.image("ok.img", MIB);
    let image = image.to_str().unwrap();
    let cases = [
        (format!("path={image},bogus=1"), "unknown option `bogus`"),
        (format!("path={image},ioeventfd=maybe"), "ioeventfd=maybe"),
        (format!("path={image},queues=0"), "queues=0"),
        (format!("path={image},enospc=maybe"), "report or pause"),
        (
            format!("path={image},enospc=pause"),
            "enospc=pause needs --api-socket",
        ),
        ("readonly=on".to_string(), "path=PATH"),
    ];
    for (disk, fragment) in &cases {
        let output = common::run_kickvm(
            &["run", "--kernel", "/dev/null", "--disk", disk],
            RUN_TIMEOUT,
        );
        common::assert_one_line_error(&output, fragment);
    }
}

#[test]
fn a_disk_path_that_is_missing_or_a_directory_is_a_one_line_usage_error() {
    common::require_kvm();
    let guest = common::test_guest().to_str().unwrap().to_string();
    let scratch = Scratch::new("bad-path");
    let missing = scratch.0.join("missing.img");
    let directory = scratch.0.clone();
    for (path, fragment) in [(&missing, "No such file"), (&directory, "directory")] {
        let disk = disk_arg(path, "");
        let output = common::run_kickvm(&["run", "--kernel", &guest, "--disk", &disk], RUN_TIMEOUT);
        common::assert_one_line_error(&output, fragment);
        assert!(
            output.stderr.contains(path.to_str().unwrap()),
            "the error names the path:\n{output}"
        );
    }
    assert!(!missing.exists(), "a missing image is not created");
}

#[test]
fn one_image_behind_two_disks_of_a_vm_is_a_one_line_error() {
    common::require_kvm();
    let guest = common::test_guest().to_str().unwrap().to_string();
    let scratch = Scratch::new("same-image");
    let image = scratch.image("one.img", MIB);
    // The same file by another name, even read-only, is the same image.
    let other_name = scratch.0.join("link.img");
    std::os::unix::fs::symlink(&image, &other_name).unwrap();
    let output = common::run_kickvm(
        &[
            "run",
            "--kernel",
            &guest,
            "--disk",
            &disk_arg(&image, ""),
            "--disk",
            &disk_arg(&other_name, "readonly=on"),
        ],
        RUN_TIMEOUT,
    );
    common::assert_one_line_error(&output, "is already disk disk0 of this VM");
}

#[test]
fn more_disks_than_pci_slots_is_a_one_line_error() {
    common::require_kvm();
    let guest = common::test_guest().to_str().unwrap().to_string();
    let scratch = Scratch::new("slots");
    let mut args = vec!["run".to_string(), "--kernel".into(), guest];
    for d in 0..32 {
        args.push("--disk".into());
        args.push(disk_arg(&scratch.image(&format!("d{d}.img"), MIB), ""));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = common::run_kickvm(&args, RUN_TIMEOUT);
    common::assert_one_line_error(&output, "disk31: all 31 PCI slots are taken");
}

/// A qcow2 file handed to `--disk` by mistake: served as raw, the guest would see the
/// container's metadata and its first write would wreck the image. kickvm refuses it in one
/// line and leaves it untouched; `format=raw` says the disk really is raw (a guest may write
/// such a header at its start), and then it is served.
#[test]
fn an_image_with_a_qcow2_header_is_refused_unless_declared_raw() {
    let _turn = take_turn();
    common::require_kvm();
    let guest = common::test_guest().to_str().unwrap().to_string();
    let scratch = Scratch::new("qcow2");
    let image = scratch.image("disk.qcow2", 4 * MIB);
    let header = b"QFI\xfb\x00\x00\x00\x03";
    std::fs::write(&image, {
        let mut bytes = std::fs::read(&image).unwrap();
        bytes[..header.len()].copy_from_slice(header);
        bytes
    })
    .unwrap();
    let output = common::run_kickvm(
        &[
            "run",
            "--kernel",
            &guest,
            "--disk",
            &disk_arg(&image, ""),
            "--cmdline",
            "workload=blk-verify seed=9",
        ],
        RUN_TIMEOUT,
    );
    common::assert_one_line_error(&output, "qcow2");
    assert!(
        output.stderr.contains(image.to_str().unwrap()) && output.stderr.contains("format=raw"),
        "the error names the image and the way out:\n{output}"
    );
    assert_eq!(
        &std::fs::read(&image).unwrap()[..header.len()],
        header,
        "the image is untouched"
    );
    let output = run_guest(
        "workload=blk-verify seed=9",
        &["--disk".into(), disk_arg(&image, "format=raw")],
    );
    assert_verified(&output, 1);
    blk_pattern::assert_image(&image, 9, 0, 0);
}

/// Two VMs on one image would corrupt it: while one kickvm has it open for writing, a second
/// (writing or reading) is refused in one line; `lock=off` overrides; once the first is gone
/// the image opens again.
#[test]
fn an_image_in_use_by_another_kickvm_is_refused_unless_lock_off() {
    let _turn = take_turn();
    common::require_kvm();
    let guest = common::test_guest().to_str().unwrap().to_string();
    let scratch = Scratch::new("lock");
    let image = scratch.image("shared.img", 4 * MIB);
    let mut first = common::spawn_kickvm(&[
        "run",
        "--kernel",
        &guest,
        "--disk",
        &disk_arg(&image, ""),
        "--cmdline",
        "workload=blk-verify seed=4 hold=1",
    ]);
    let mut live = LiveStdout::new(&mut first);
    let holding = live.wait_for(|line| line == "FLUSHED disk=0 loop=0");
    let second = |options: &str| {
        common::run_kickvm(
            &[
                "run",
                "--kernel",
                &guest,
                "--disk",
                &disk_arg(&image, options),
                "--cmdline",
                "workload=blk-verify seed=5",
            ],
            RUN_TIMEOUT,
        )
    };
    let writer = second("");
    let reader = second("readonly=on");
    let unlocked = second("readonly=on,lock=off");
    // SAFETY: signalling our own child, not yet reaped.
    unsafe { libc::kill(first.id() as i32, libc::SIGKILL) };
    let _ = first.wait();
    let seen = live.seen.clone();
    live.rest();
    assert!(holding, "the first VM never held its image:\n{seen}");
    common::assert_one_line_error(&writer, "in use by another process");
    common::assert_one_line_error(&reader, "being written by another process");
    assert!(writer.stderr.contains("lock=off"), "{writer}");
    unlocked.assert_exit_code(0);
    assert_eq!(unlocked.result("blk-verify")["ro_disks"], "1", "{unlocked}");
    let after = run_guest(
        "workload=blk-verify seed=6",
        &["--disk".into(), disk_arg(&image, "")],
    );
    assert_verified(&after, 1);
}

/// The host file system fills up under a writing guest (`enospc=pause`): the write that does
/// not fit is held and the VM paused, and `vm.info` says why; once space is freed and the VM
/// resumed, the write is made again and the guest verifies every block. Nothing was lost and
/// the guest saw no error. (A 20 MiB tmpfs in a private mount namespace, 12 MiB of it taken
/// by a filler file, is the full disk; the test frees it through /proc/PID/root.)
#[test]
fn a_full_host_file_system_pauses_the_vm_until_space_is_freed_and_loses_no_write() {
    let _turn = take_turn();
    let dir = common::scratch_dir("enospc");
    let mount_point = dir.join("mnt");
    std::fs::create_dir_all(&mount_point).unwrap();
    let socket = dir.join("api.sock");
    let script = r#"mount -t tmpfs -o size=20m kickvm-enospc "$1" &&
        head -c 12M /dev/zero > "$1/filler" && truncate -s 16M "$1/disk.img" &&
        exec "$2" run --kernel "$3" --api-socket "$4" --disk "path=$1/disk.img,enospc=pause" \
            --cmdline "workload=blk-verify seed=12""#;
    let mut command = Command::new("unshare");
    command
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(&mount_point)
        .arg(common::kickvm_binary())
        .arg(common::test_guest())
        .arg(&socket);
    let mut vm = ApiVm::start_command(command, &dir, &socket);
    let deadline = Instant::now() + RUN_TIMEOUT;
    let paused = loop {
        let info = vm.info();
        if info["state"] == "paused" || Instant::now() > deadline {
            break info;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(paused["state"], "paused", "{paused}");
    let reason = paused["pause_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("disk.img") && reason.contains("no space left on device"),
        "{paused}"
    );
    // The kickvm process is the one unshare became; its root sees the tmpfs.
    let filler = format!("/proc/{}/root{}/filler", vm.pid(), mount_point.display());
    std::fs::remove_file(&filler).unwrap_or_else(|e| panic!("removing {filler}: {e}"));
    assert_eq!(vm.call("PUT", "vm.resume", None).0, 204);
    let output = vm.finish(RUN_TIMEOUT);
    output.assert_exit_code(0);
    let result = output.result("blk-verify");
    assert_eq!(
        (result["status"].as_str(), result["errors"].as_str()),
        ("ok", "0"),
        "{output}"
    );
    assert_eq!(result["blocks"], (16 * MIB / 512).to_string(), "{output}");
    assert!(
        output.stderr.contains("no space left on the host"),
        "{output}"
    );
}

/// Someone truncates the image under a guest that is reading it through the default engine's
/// copies from a mapping: the copy's SIGBUS is caught, the reads past the new end are answered
/// through io_uring (zeros), and kickvm and the guest run to the end.
#[test]
fn truncating_the_image_under_a_reading_guest_does_not_take_kickvm_down() {
    let _turn = take_turn();
    common::require_kvm();
    let scratch = Scratch::new("truncate");
    // Written just now, so the host's page cache holds it and reads are copied from the start.
    let image = scratch.filled_image("t.img", 16 * MIB, 0x5a);
    let guest = common::test_guest().to_str().unwrap().to_string();
    let disk = disk_arg(&image, "");
    let mut child = common::spawn_kickvm(&[
        "run",
        "--kernel",
        &guest,
        "--disk",
        &disk,
        "--cmdline",
        "workload=blk-bench rw=randread qd=8 secs=2 completion=poll",
    ]);
    let mut live = LiveStdout::new(&mut child);
    assert!(
        live.wait_for(|line| line.starts_with("DISK index=0")),
        "the guest never found its disk:\n{}",
        live.seen
    );
    std::thread::sleep(Duration::from_millis(300));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    let mut output = common::wait_with_timeout(child, RUN_TIMEOUT);
    let seen = live.seen.clone();
    output.stdout = seen + &live.rest();
    output.assert_exit_code(0);
    let result = output.result("blk-bench");
    assert_eq!(result["status"], "ok", "{output}");
    assert_eq!(result["errors"], "0", "{output}");
    let faults = output.stderr.matches("is gone from the image").count();
    assert_eq!(
        faults, 1,
        "one warning, then reads go through io_uring:\n{output}"
    );
}
