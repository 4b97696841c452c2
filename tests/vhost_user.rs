//! vhost-user-blk end to end: `kickvm run --disk socket=PATH` with QEMU's
//! `qemu-storage-daemon` as the backend (it ships with qemu-system-x86). The test guest's
//! `blk-verify` runs through the backend with the kick handed to the backend as a host notifier
//! (ioeventfd on: no notify exit reaches kickvm) or passed on by the vCPU thread (ioeventfd
//! off), polled and by interrupt, with two vCPUs on two queues; the image file holds the
//! pattern afterwards. A backend that gives up (this one refuses legacy drivers) fails the
//! device, not kickvm. Needs /dev/kvm.

mod api_vm;
mod blk_pattern;
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api_vm::exit_queue_counters;
use common::RunOutput;

const RUN_TIMEOUT: Duration = Duration::from_secs(60);
const IMAGE_BYTES: u64 = 4 << 20;

/// qemu-storage-daemon exporting one raw image as vhost-user-blk; killed and its files
/// removed on drop.
struct Backend {
    child: Child,
    dir: PathBuf,
    image: PathBuf,
    socket: PathBuf,
}

impl Backend {
    fn start(name: &str, queues: u16) -> Self {
        let dir = common::scratch_dir(&format!("vhost-user-{name}"));
        let image = api_vm::image(&dir, "disk.img", IMAGE_BYTES);
        let socket = dir.join("blk.sock");
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={}",
                image.display()
            ))
            .args(["--blockdev", "driver=raw,node-name=disk0,file=file0"])
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=disk0,writable=on,num-queues={queues},\
                 addr.type=unix,addr.path={}",
                socket.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("backend.log")).unwrap())
            .spawn()
            .expect("cannot start qemu-storage-daemon (installed with qemu-system-x86)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not create {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Backend {
            child,
            dir,
            image,
            socket,
        }
    }

    fn disk_arg(&self, options: &str) -> String {
        format!("socket={},{options}", self.socket.display())
    }

    /// A VM with the control API running blk-verify on this backend's disk until the power
    /// button ends it, once the guest's driver has the disk up.
    fn endless_blk_verify(&self, name: &str, seed: u64) -> api_vm::ApiVm {
        let disk = self.disk_arg("ioeventfd=on");
        let vm = api_vm::ApiVm::start(
            name,
            common::test_guest(),
            &format!("workload=blk-verify seed={seed} loops=1000000 completion=irq"),
            &["--disk", &disk],
        );
        vm.wait_until_active("disk0");
        vm
    }

    /// Stops the daemon (so everything it wrote is in the file) and returns the image path.
    fn stop(&mut self) -> &Path {
        let _ = self.child.kill();
        let _ = self.child.wait();
        &self.image
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("backend.log")).unwrap_or_default();
            eprintln!("--- qemu-storage-daemon's stderr ---\n{log}");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run_guest(cmdline: &str, extra: &[&str]) -> RunOutput {
    common::run_test_guest_with_queue_log(cmdline, extra, RUN_TIMEOUT)
}

fn assert_verified(output: &RunOutput) {
    output.assert_exit_code(0);
    let result = output.result("blk-verify");
    assert_eq!(result["status"], "ok", "{output}");
    assert_eq!(result["errors"], "0", "{output}");
    assert_eq!(result["disks"], "1", "{output}");
    assert!(result["blocks"].parse::<u64>().unwrap() > 0, "{output}");
}

/// ioeventfd on: the backend owns the kick (host notifier), no kick exits to kickvm; off: every
/// kick exits and kickvm passes it on.
fn assert_kick_path(output: &RunOutput, ioeventfd: bool, what: &str) {
    let queues: Vec<_> = exit_queue_counters(&output.stderr)
        .into_iter()
        .filter(|(device, _, _)| device == "disk0")
        .collect();
    assert!(!queues.is_empty(), "{what}: no exit summary:\n{output}");
    let exits: u64 = queues
        .iter()
        .map(|(_, _, c)| c["kicks_exit"].parse::<u64>().unwrap())
        .sum();
    if ioeventfd {
        for (_, index, counters) in &queues {
            assert_eq!(
                counters["mode"], "host",
                "{what} queue {index}: {counters:?}"
            );
        }
        assert_eq!(
            exits, 0,
            "{what}: kicks exited with a host notifier:\n{output}"
        );
    } else {
        assert!(
            exits > 0,
            "{what}: no kick exited with ioeventfd off:\n{output}"
        );
    }
}

/// disk0's queues' interrupt paths from the exit summary, in queue order.
fn interrupt_paths(output: &RunOutput) -> Vec<String> {
    let mut queues: Vec<(usize, String)> = exit_queue_counters(&output.stderr)
        .into_iter()
        .filter(|(device, _, _)| device == "disk0")
        .map(|(_, index, c)| (index, c["interrupts"].clone()))
        .collect();
    queues.sort();
    queues.into_iter().map(|(_, path)| path).collect()
}

#[test]
fn blk_verify_through_a_vhost_user_backend_with_ioeventfd_on_and_off_polled_and_by_interrupt() {
    let cases = [
        ("on", "poll"),
        ("off", "irq"),
        ("off", "poll"),
        ("on", "irq"),
    ];
    for (seed, (ioeventfd, completion)) in (60u64..).zip(cases) {
        let what = format!("ioeventfd={ioeventfd} {completion}");
        let mut backend = Backend::start(&format!("{ioeventfd}-{completion}"), 1);
        let disk = backend.disk_arg(&format!("ioeventfd={ioeventfd}"));
        let output = run_guest(
            &format!("workload=blk-verify seed={seed} completion={completion}"),
            &["--disk", &disk],
        );
        assert_verified(&output);
        assert_kick_path(&output, ioeventfd == "on", &what);
        // By interrupt the backend signals the queue's MSI-X irqfd itself; polled (no
        // vector) kickvm relays whatever it signals.
        let expected_path = if completion == "irq" {
            "direct"
        } else {
            "relayed"
        };
        assert_eq!(
            interrupt_paths(&output),
            [expected_path],
            "{what}:\n{output}"
        );
        if completion == "irq" {
            let result = output.result("blk-verify");
            assert!(
                result["interrupts"].parse::<u64>().unwrap() > 0,
                "{what}: the backend's completions reached the guest as interrupts:\n{output}"
            );
        }
        blk_pattern::assert_image(backend.stop(), seed, 0, 0);
    }
}

#[test]
fn two_vcpus_drive_two_backend_queues() {
    let mut backend = Backend::start("mq", 2);
    let disk = backend.disk_arg("queues=2");
    let output = run_guest(
        "workload=blk-verify seed=70 completion=irq",
        &["--cpus", "2", "--disk", &disk],
    );
    assert_verified(&output);
    let result = output.result("blk-verify");
    assert_eq!(result["threads"], "2", "{output}");
    assert_eq!(
        interrupt_paths(&output),
        ["direct", "direct"],
        "each queue's completions went from the backend to its own vector:\n{output}"
    );
    assert_kick_path(&output, true, "two queues");
    blk_pattern::assert_image(backend.stop(), 70, 0, 0);
}

#[test]
fn pause_and_resume_stop_and_restart_the_backend_rings_losing_nothing() {
    const CYCLES: u64 = 40;
    let mut backend = Backend::start("pause", 1);
    let mut vm = backend.endless_blk_verify("vhost-user-pause-vm", 80);
    for cycle in 0..CYCLES {
        assert_eq!(vm.call("PUT", "vm.pause", None).0, 204, "cycle {cycle}");
        std::thread::sleep(Duration::from_millis(5 + (cycle * 7) % 20));
        assert_eq!(vm.call("PUT", "vm.resume", None).0, 204, "cycle {cycle}");
        std::thread::sleep(Duration::from_millis(10 + (cycle * 13) % 30));
    }
    assert_eq!(vm.call("PUT", "vm.shutdown", None).0, 202);
    let output = vm.finish(RUN_TIMEOUT);
    assert_verified(&output);
    let result = output.result("blk-verify");
    assert_eq!(result["shutdown"], "power-button", "{output}");
    let last_loop = output.last_flushed_loop(0);
    blk_pattern::assert_image(backend.stop(), 80 + last_loop, 0, 0);
}

#[test]
fn a_backend_that_refuses_the_driver_fails_the_device_and_kickvm_runs_on() {
    let backend = Backend::start("legacy", 1);
    // libvhost-user refuses legacy (pre-1.0) drivers and drops the connection.
    let disk = backend.disk_arg("transport=transitional");
    let output = run_guest(
        "workload=blk-verify seed=1 transport=legacy",
        &["--disk", &disk],
    );
    output.assert_exit_code(0);
    let result = output.result("blk-verify");
    assert_eq!(result["status"], "fail", "{output}");
    assert_eq!(result["reason"], "device-failed", "{output}");
    assert!(
        output.stderr.contains("cannot activate"),
        "kickvm says why:\n{output}"
    );
}

#[test]
fn a_missing_vhost_user_socket_is_a_one_line_usage_error() {
    let dir = common::scratch_dir("vhost-user-missing");
    let socket = dir.join("nobody-listens.sock");
    let disk = format!("socket={}", socket.display());
    let output = common::run_kickvm(
        &[
            "run",
            "--kernel",
            &common::test_guest().display().to_string(),
            "--disk",
            &disk,
        ],
        Duration::from_secs(20),
    );
    output.assert_exit_code(2);
    common::assert_one_line_error(&output, "nobody-listens.sock");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_backend_that_dies_mid_run_fails_the_device_and_kickvm_stays_in_control() {
    let mut backend = Backend::start("dies", 1);
    let mut vm = backend.endless_blk_verify("vhost-user-dies-vm", 90);
    std::thread::sleep(Duration::from_millis(100));
    backend.stop();
    const NEEDS_RESET: u64 = 0x40;
    let deadline = Instant::now() + Duration::from_secs(10);
    while vm.device("disk0")["status"].as_u64().unwrap() & NEEDS_RESET == 0 {
        assert!(
            Instant::now() < deadline,
            "NEEDS_RESET not set 10 s after the backend died"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // A pause does not wait for requests a dead backend will never complete.
    let asked = Instant::now();
    assert_eq!(vm.call("PUT", "vm.pause", None).0, 204);
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "pause took {:?}",
        asked.elapsed()
    );
    assert_eq!(vm.call("PUT", "vm.resume", None).0, 204);
    // The guest waits on its disk forever; the grace period ends it.
    let body = r#"{"timeout_secs": 1}"#;
    assert_eq!(vm.call("PUT", "vm.shutdown", Some(body)).0, 202);
    let output = vm.finish(RUN_TIMEOUT);
    output.assert_exit_code(0);
    assert!(
        output.stderr.contains("disk0: the backend hung up"),
        "{output}"
    );
}
