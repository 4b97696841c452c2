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
    assert_eq!(
        result["power_button"], "acpi-ged",
        "the DSDT's GED power button was found and routed:\n{output}"
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

/// 32-bit code: echo every byte received on COM1 back to COM1; after a `q`, reset.
const SERIAL_ECHO_GUEST: &[u8] = &[
    0x66, 0xba, 0xfd, 0x03, // 0:  mov dx, 0x3fd (line status)
    0xec, //                   4:  in al, dx
    0xa8, 0x01, //             5:  test al, 1 (data ready)
    0x74, 0xfb, //             7:  jz 4
    0x66, 0xba, 0xf8, 0x03, // 9:  mov dx, 0x3f8 (data)
    0xec, //                   13: in al, dx
    0xee, //                   14: out dx, al
    0x3c, b'q', //             15: cmp al, 'q'
    0x75, 0xed, //             17: jne 0
    0xb0, 0xfe, //             19: mov al, 0xfe
    0xe6, 0x64, //             21: out 0x64, al (i8042 reset)
    0xf4, //                   23: hlt
    0xeb, 0xfd, //             24: jmp 23
];

/// Opens a pseudo-terminal pair: (master, slave).
fn open_pty() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    // SAFETY: plain libc pty calls; every returned descriptor is checked and then owned by a
    // File.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        assert!(master >= 0, "posix_openpt failed");
        assert_eq!(libc::grantpt(master), 0);
        assert_eq!(libc::unlockpt(master), 0);
        let name = libc::ptsname(master);
        assert!(!name.is_null(), "ptsname failed");
        let slave = libc::open(name, libc::O_RDWR | libc::O_NOCTTY);
        assert!(slave >= 0, "opening the pty slave failed");
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    }
}

fn local_flags(terminal: &std::fs::File) -> libc::tcflag_t {
    use std::os::fd::AsRawFd;
    // SAFETY: termios is plain data, filled by tcgetattr on a valid descriptor.
    unsafe {
        let mut termios: libc::termios = std::mem::zeroed();
        assert_eq!(libc::tcgetattr(terminal.as_raw_fd(), &mut termios), 0);
        termios.c_lflag
    }
}

#[test]
fn keystrokes_on_a_terminal_reach_the_guest_and_the_terminal_is_restored() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    common::require_kvm();
    let dir = common::scratch_dir("serial-echo");
    let kernel = dir.join("echo.elf");
    common::write_pvh_elf(&kernel, SERIAL_ECHO_GUEST);
    let (mut master, slave) = open_pty();
    let cooked = local_flags(&slave);
    assert_ne!(
        cooked & libc::ICANON,
        0,
        "a new pty starts in canonical mode"
    );

    let child = Command::new(common::kickvm_binary())
        .args(["run", "--kernel", kernel.to_str().unwrap()])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start kickvm");
    // Raw mode delivers each byte at once; in canonical mode nothing would arrive before a
    // newline, and the guest would never see the `q`.
    std::thread::sleep(Duration::from_millis(300));
    master.write_all(b"hi q").unwrap();
    let output = common::wait_with_timeout(child, Duration::from_secs(20));
    output.assert_exit_code(0);
    assert_eq!(output.stdout, "hi q", "guest echo:\n{output}");
    assert_eq!(
        local_flags(&slave),
        cooked,
        "terminal settings not restored"
    );
    let _ = std::fs::remove_dir_all(dir);
}
