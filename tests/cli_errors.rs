//! Bad input gives one clear line on stderr and exit status 2, never a panic.

mod common;

use std::time::Duration;

use common::{assert_one_line_error, run_kickvm, scratch_dir, RunOutput};

const TIMEOUT: Duration = Duration::from_secs(30);

fn run(args: &[&str]) -> RunOutput {
    run_kickvm(args, TIMEOUT)
}

fn guest() -> String {
    common::require_kvm();
    common::test_guest().to_str().unwrap().to_string()
}

#[test]
fn missing_kernel_file_is_a_usage_error() {
    let output = run(&["run", "--kernel", "/nonexistent/vmlinuz"]);
    assert_one_line_error(&output, "/nonexistent/vmlinuz");
}

#[test]
fn garbage_kernel_is_a_usage_error() {
    common::require_kvm();
    let dir = scratch_dir("garbage-kernel");
    let kernel = dir.join("garbage");
    let bytes: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&kernel, bytes).unwrap();
    let output = run(&["run", "--kernel", kernel.to_str().unwrap()]);
    assert_one_line_error(&output, "neither an ELF");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn empty_kernel_is_a_usage_error() {
    common::require_kvm();
    let dir = scratch_dir("empty-kernel");
    let kernel = dir.join("empty");
    std::fs::write(&kernel, b"").unwrap();
    let output = run(&["run", "--kernel", kernel.to_str().unwrap()]);
    assert_one_line_error(&output, "neither an ELF");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn truncated_elf_kernel_is_a_usage_error() {
    common::require_kvm();
    let dir = scratch_dir("truncated-elf");
    let kernel = dir.join("truncated");
    let mut bytes = std::fs::read(common::test_guest()).unwrap();
    bytes.truncate(40);
    std::fs::write(&kernel, bytes).unwrap();
    let output = run(&["run", "--kernel", kernel.to_str().unwrap()]);
    assert_one_line_error(&output, "cannot load kernel");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn initramfs_larger_than_memory_is_a_usage_error() {
    let guest = guest();
    let dir = scratch_dir("big-initramfs");
    let initramfs = dir.join("initramfs");
    // Sparse: 64 MiB that do not fit in a 32 MiB guest, without writing 64 MiB.
    std::fs::File::create(&initramfs)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let output = run(&[
        "run",
        "--kernel",
        &guest,
        "--memory",
        "32M",
        "--initramfs",
        initramfs.to_str().unwrap(),
    ]);
    assert_one_line_error(&output, "does not fit");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn missing_initramfs_is_a_usage_error() {
    let guest = guest();
    let output = run(&[
        "run",
        "--kernel",
        &guest,
        "--initramfs",
        "/nonexistent/initrd",
    ]);
    assert_one_line_error(&output, "/nonexistent/initrd");
}

#[test]
fn zero_cpus_is_a_usage_error() {
    let output = run(&["run", "--kernel", "/dev/null", "--cpus", "0"]);
    assert_one_line_error(&output, "--cpus");
}

#[test]
fn too_many_cpus_is_a_usage_error() {
    let output = run(&["run", "--kernel", "/dev/null", "--cpus", "255"]);
    assert_one_line_error(&output, "--cpus");
}

#[test]
fn unknown_memory_suffix_is_a_usage_error() {
    let output = run(&["run", "--kernel", "/dev/null", "--memory", "1Q"]);
    assert_one_line_error(&output, "--memory");
}

#[test]
fn too_little_memory_is_a_usage_error() {
    let output = run(&["run", "--kernel", "/dev/null", "--memory", "1M"]);
    assert_one_line_error(&output, "at least");
}

#[test]
fn unknown_serial_mode_is_a_usage_error() {
    let output = run(&["run", "--kernel", "/dev/null", "--serial", "tty"]);
    assert_one_line_error(&output, "--serial");
}

#[test]
fn unwritable_serial_file_is_a_usage_error() {
    let guest = guest();
    let output = run(&[
        "run",
        "--kernel",
        &guest,
        "--serial",
        "file=/nonexistent/dir/log",
    ]);
    assert_one_line_error(&output, "/nonexistent/dir/log");
}

#[test]
fn unknown_cpu_profile_is_a_usage_error() {
    let output = run(&["run", "--kernel", "/dev/null", "--cpu", "fastest"]);
    assert_one_line_error(&output, "--cpu");
}

#[test]
fn unknown_flag_is_a_usage_error() {
    let output = run(&["run", "--kernel", "/dev/null", "--turbo"]);
    assert_one_line_error(&output, "--turbo");
}

#[test]
fn missing_kernel_flag_is_a_usage_error() {
    let output = run(&["run"]);
    assert_one_line_error(&output, "--kernel");
}

/// Hides /dev/kvm in a private mount namespace (needs root and unshare(1), as in CI).
#[test]
fn missing_dev_kvm_is_a_usage_error() {
    let guest = guest();
    let script = format!(
        "mount -t tmpfs none /dev && exec {} run --kernel {guest}",
        common::kickvm_binary()
    );
    let output = run_kickvm_via("unshare", &["--mount", "sh", "-c", &script]);
    assert_one_line_error(&output, "/dev/kvm");
}

fn run_kickvm_via(program: &str, args: &[&str]) -> RunOutput {
    let child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    common::wait_with_timeout(child, TIMEOUT)
}

#[test]
fn help_documents_every_run_flag() {
    let output = run(&["run", "--help"]);
    output.assert_exit_code(0);
    for flag in [
        "--kernel",
        "--initramfs",
        "--cmdline",
        "--cpus",
        "--memory",
        "--serial",
        "--cpu",
    ] {
        assert!(
            output.stdout.contains(flag),
            "`run --help` lacks {flag}:\n{output}"
        );
    }
    let top = run(&["--help"]);
    top.assert_exit_code(0);
    assert!(top.stdout.contains("run"), "{top}");
    assert!(top.stdout.contains("Exit status"), "{top}");
}
