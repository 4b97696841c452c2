//! Linux smoke test (slow; `make test-linux`): the Debian cloud kernel, booted as packaged
//! (bzImage) with a tiny initramfs, prints its banner, the e820 map and the CPU count on the
//! serial port within a bounded time. Under PVM the kernel's CPL0 code is emulated, so this
//! takes minutes; the test prints a timeline of how far Linux got and when.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const CPUS: u8 = 2;
const DEFAULT_TIMEOUT_SECS: u64 = 15 * 60;

/// Runs scripts/fetch-linux.sh (a no-op once cached) and returns (kernel, initramfs).
fn fetch_linux() -> (PathBuf, PathBuf) {
    let script = common::repo_root().join("scripts/fetch-linux.sh");
    let output = Command::new("bash")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        output.status.success(),
        "{} failed:\n{}{}",
        script.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut lines = stdout.lines().rev();
    let initramfs = PathBuf::from(lines.next().expect("initramfs path"));
    let kernel = PathBuf::from(lines.next().expect("kernel path"));
    (kernel, initramfs)
}

struct Milestone {
    name: &'static str,
    needle: String,
    required: bool,
    seen_at: Option<Duration>,
}

fn milestone(name: &'static str, needle: &str, required: bool) -> Milestone {
    Milestone {
        name,
        needle: needle.to_string(),
        required,
        seen_at: None,
    }
}

fn timeline(milestones: &[Milestone]) -> String {
    milestones
        .iter()
        .map(|m| match m.seen_at {
            Some(t) => format!("  {:>8.1} s  {}\n", t.as_secs_f64(), m.name),
            None => format!("  {:>10}  {} (not reached)\n", "-", m.name),
        })
        .collect()
}

#[test]
#[ignore = "slow: boots Linux, minutes under PVM; run with `make test-linux`"]
fn debian_cloud_kernel_prints_banner_e820_map_and_cpu_count() {
    common::require_kvm();
    let (kernel, initramfs) = fetch_linux();
    let timeout = Duration::from_secs(
        std::env::var("KICKVM_LINUX_TIMEOUT_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(DEFAULT_TIMEOUT_SECS),
    );
    let mut milestones = vec![
        milestone("first serial output", "", false),
        milestone("banner", "Linux version", true),
        milestone("e820 map", "BIOS-e820: [mem 0x0000000000100000-", true),
        milestone(
            "CPU count from the MADT",
            &format!("smpboot: Allowing {CPUS} CPUs"),
            true,
        ),
        milestone("serial console", "printk: console [ttyS0] enabled", false),
        milestone(
            "all CPUs up",
            &format!("Brought up 1 node, {CPUS} CPUs"),
            false,
        ),
        milestone("init started", "Run /init as init process", false),
    ];

    let start = Instant::now();
    let cpus = CPUS.to_string();
    let mut child = common::spawn_kickvm(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initramfs",
        initramfs.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 earlyprintk=serial panic=-1",
        "--cpus",
        &cpus,
        "--memory",
        "512M",
    ]);
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut serial = Vec::new();
    let outcome = loop {
        let remaining = timeout.saturating_sub(start.elapsed());
        match lines.recv_timeout(remaining.min(Duration::from_secs(1))) {
            Ok(line) => {
                let now = start.elapsed();
                for m in milestones.iter_mut().filter(|m| m.seen_at.is_none()) {
                    if line.contains(&m.needle) {
                        m.seen_at = Some(now);
                    }
                }
                serial.push(line);
                if milestones
                    .iter()
                    .all(|m| !m.required || m.seen_at.is_some())
                {
                    break "reached every required milestone";
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break "kickvm exited",
            Err(mpsc::RecvTimeoutError::Timeout) if start.elapsed() >= timeout => {
                break "timed out"
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    };

    // SAFETY: signalling the child we started; it may already have exited, which is harmless.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let output = common::wait_with_timeout(child, Duration::from_secs(10));
    let report = timeline(&milestones);
    eprintln!(
        "Linux smoke ({}): {outcome} after {:.1} s\n{report}",
        kernel.display(),
        start.elapsed().as_secs_f64()
    );
    let tail: Vec<&String> = serial.iter().rev().take(40).collect();
    let tail: String = tail.into_iter().rev().map(|l| format!("{l}\n")).collect();
    assert!(
        milestones.iter().all(|m| !m.required || m.seen_at.is_some()),
        "Linux did not get far enough ({outcome}):\n{report}--- last serial lines ---\n{tail}--- kickvm ---\n{output}"
    );
    let e820_lines = serial.iter().filter(|l| l.contains("BIOS-e820:")).count();
    assert!(
        e820_lines >= 3,
        "expected the low RAM, BIOS and high RAM e820 entries:\n{tail}"
    );
}
