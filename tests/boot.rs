//! The test guest booted by kickvm: every vCPU comes up, the memory map is complete, and the
//! exit status follows how the guest ended. Needs /dev/kvm.

mod common;

use std::time::Duration;

use common::{run_test_guest, RunOutput};

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

fn boot_info(cpus: u8, memory: &str) -> (RunOutput, std::collections::HashMap<String, String>) {
    let cpus = cpus.to_string();
    let output = run_test_guest(
        "workload=info",
        &["--cpus", &cpus, "--memory", memory],
        BOOT_TIMEOUT,
    );
    output.assert_exit_code(0);
    let result = output.result("info");
    assert_eq!(result["status"], "ok", "{output}");
    (output, result)
}

fn assert_cpus(cpus: u8) {
    let (output, result) = boot_info(cpus, "512M");
    let expected = cpus.to_string();
    assert_eq!(result["cpus"], expected, "CPUs listed:\n{output}");
    assert_eq!(result["cpus_started"], expected, "CPUs started:\n{output}");
    assert_eq!(
        result["cpu_table"], "acpi",
        "CPUs come from the MADT:\n{output}"
    );
}

/// The guest reports RAM rounded to the nearest MiB; the BIOS area (under 1 MiB) that the
/// memory map reserves may take it at most 1 MiB below what was asked.
fn assert_memory(memory: &str, expected_mib: u64) {
    let (output, result) = boot_info(1, memory);
    let mib: u64 = result["mem_mib"].parse().expect("mem_mib is a number");
    assert!(
        (expected_mib - 1..=expected_mib).contains(&mib),
        "guest sees {mib} MiB of {expected_mib} MiB:\n{output}"
    );
}

#[test]
fn one_vcpu_is_listed_and_running() {
    assert_cpus(1);
}

#[test]
fn two_vcpus_are_listed_and_started_by_the_guest() {
    assert_cpus(2);
}

#[test]
fn four_vcpus_are_listed_and_started_by_the_guest() {
    assert_cpus(4);
}

#[test]
fn guest_sees_all_of_512m() {
    assert_memory("512M", 512);
}

#[test]
fn guest_sees_all_of_4g_split_around_the_pci_hole() {
    assert_memory("4G", 4096);
}

#[test]
fn guest_reports_a_tsc_frequency() {
    let (output, result) = boot_info(1, "512M");
    let khz: u64 = result["tsc_khz"].parse().expect("tsc_khz is a number");
    assert!(khz > 100_000, "implausible TSC frequency:\n{output}");
}

#[test]
fn guest_reset_ends_the_vm_with_status_0() {
    let output = run_test_guest("workload=info", &[], BOOT_TIMEOUT);
    output.assert_exit_code(0);
    assert!(output.stdout.contains("DONE status=ok"), "{output}");
}

#[test]
fn guest_triple_fault_exits_3_with_the_registers() {
    let output = run_test_guest("workload=fault", &[], BOOT_TIMEOUT);
    output.assert_exit_code(3);
    assert_eq!(output.result("fault")["action"], "triple-fault");
    assert!(output.stderr.contains("triple fault"), "{output}");
    assert!(output.stderr.contains("rip="), "no registers:\n{output}");
    assert!(!output.stderr.contains("panicked"), "{output}");
}

#[test]
fn guest_exception_is_reported_on_serial_and_the_vm_ends() {
    let output = run_test_guest("workload=exception", &[], BOOT_TIMEOUT);
    output.assert_exit_code(0);
    assert!(
        output.stdout.contains("EXCEPTION vector=6"),
        "no exception report:\n{output}"
    );
    assert!(output.stdout.contains("DONE status=fail"), "{output}");
}

#[test]
fn serial_output_can_go_to_a_file() {
    let dir = common::scratch_dir("serial-file");
    let log = dir.join("serial.log");
    let serial = format!("file={}", log.display());
    let output = run_test_guest("workload=info", &["--serial", &serial], BOOT_TIMEOUT);
    output.assert_exit_code(0);
    assert!(
        !output.stdout.contains("RESULT"),
        "output went to stdout:\n{output}"
    );
    let written = std::fs::read_to_string(&log).expect("serial log written");
    assert!(
        written.contains("RESULT workload=info status=ok"),
        "{written}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn stop_with_signal(signal: i32) {
    common::require_kvm();
    let dir = common::scratch_dir(&format!("signal-{signal}"));
    let kernel = dir.join("halt.elf");
    common::write_halting_pvh_elf(&kernel);
    let child = common::spawn_kickvm(&["run", "--kernel", kernel.to_str().unwrap(), "--cpus", "2"]);
    // Let the VM get into KVM_RUN (the guest halts there for good).
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: sending a signal to the child we just started.
    let ret = unsafe { libc::kill(child.id() as i32, signal) };
    assert_eq!(ret, 0, "kill failed");
    let output = common::wait_with_timeout(child, Duration::from_secs(10));
    output.assert_exit_code(128 + signal);
    assert!(output.stderr.contains("stopped by signal"), "{output}");
    assert!(!output.stderr.contains("panicked"), "{output}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sigterm_stops_a_running_vm_cleanly() {
    stop_with_signal(libc::SIGTERM);
}

#[test]
fn sigint_stops_a_running_vm_cleanly() {
    stop_with_signal(libc::SIGINT);
}
