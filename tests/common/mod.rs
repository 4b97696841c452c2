//! Helpers shared by the end-to-end tests: build the test guest once, run kickvm with a
//! deadline, and read the guest's `RESULT` records.

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub fn kickvm_binary() -> &'static str {
    env!("CARGO_BIN_EXE_kickvm")
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Tests that boot a VM need KVM; without it they fail here, loudly, rather than skip.
pub fn require_kvm() {
    let kvm = Path::new("/dev/kvm");
    assert!(
        kvm.exists(),
        "/dev/kvm does not exist: these tests boot VMs and need KVM"
    );
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(kvm) {
        panic!("cannot open /dev/kvm ({e}): these tests boot VMs and need KVM");
    }
}

/// Builds the test guest (guest/build.sh) once per test binary; returns its path.
pub fn test_guest() -> &'static Path {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST.get_or_init(|| {
        let script = repo_root().join("guest/build.sh");
        let output = Command::new("sh")
            .arg(&script)
            .env_remove("RUSTFLAGS")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        if !output.status.success() {
            panic!(
                "building the test guest failed ({}):\n{}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let path = PathBuf::from(
            stdout
                .lines()
                .last()
                .expect("guest/build.sh printed no path")
                .trim(),
        );
        assert!(
            path.is_file(),
            "guest/build.sh reported {} but it does not exist",
            path.display()
        );
        path
    })
}

/// What a kickvm run left behind.
#[derive(Debug)]
pub struct RunOutput {
    /// None when kickvm was killed by a signal (including our own timeout kill).
    pub code: Option<i32>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl RunOutput {
    /// The fields of the first `RESULT workload=NAME ...` line on the serial output.
    pub fn result(&self, workload: &str) -> HashMap<String, String> {
        let prefix = format!("RESULT workload={workload} ");
        let line = self
            .stdout
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` line in the guest output:\n{self}"));
        line.split_whitespace()
            .skip(1)
            .filter_map(|word| word.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The loop number of disk `disk`'s last `FLUSHED` line (blk-verify).
    pub fn last_flushed_loop(&self, disk: usize) -> u64 {
        let prefix = format!("FLUSHED disk={disk} loop=");
        self.stdout
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("no `{prefix}` line:\n{self}"))
            .trim()
            .parse()
            .expect("a loop number")
    }

    pub fn assert_exit_code(&self, expected: i32) {
        assert!(!self.timed_out, "kickvm did not finish in time:\n{self}");
        assert_eq!(self.code, Some(expected), "unexpected exit status:\n{self}");
    }
}

impl std::fmt::Display for RunOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit code {:?} after {:?}{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code,
            self.elapsed,
            if self.timed_out { " (timed out)" } else { "" },
            self.stdout,
            self.stderr
        )
    }
}

/// Starts kickvm with `args`; stdin is /dev/null, stdout and stderr are captured.
pub fn spawn_kickvm(args: &[&str]) -> Child {
    Command::new(kickvm_binary())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start kickvm")
}

/// Waits for `child` at most `timeout` (then kills it), collecting its output.
pub fn wait_with_timeout(mut child: Child, timeout: Duration) -> RunOutput {
    let start = Instant::now();
    // A caller may have taken a pipe to read it live; then that output is not collected here.
    let stdout_reader = spawn_collector(child.stdout.take());
    let stderr_reader = spawn_collector(child.stderr.take());
    let mut timed_out = false;
    let status: ExitStatus = loop {
        if let Some(status) = child.try_wait().expect("waiting for kickvm") {
            break status;
        }
        if start.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("waiting for the killed kickvm");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = start.elapsed();
    RunOutput {
        code: status.code(),
        timed_out,
        stdout: String::from_utf8_lossy(&stdout_reader.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&stderr_reader.join().unwrap()).into_owned(),
        elapsed,
    }
}

fn spawn_collector<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

pub fn run_kickvm(args: &[&str], timeout: Duration) -> RunOutput {
    wait_with_timeout(spawn_kickvm(args), timeout)
}

/// Boots the test guest with `workload=NAME` and extra kickvm arguments.
pub fn run_test_guest(cmdline: &str, extra: &[&str], timeout: Duration) -> RunOutput {
    require_kvm();
    let guest = test_guest().to_str().expect("UTF-8 path").to_string();
    let mut args = vec!["run", "--kernel", &guest, "--cmdline", cmdline];
    args.extend_from_slice(extra);
    run_kickvm(&args, timeout)
}

/// Starts kickvm with `args` and the virtio crate logging at info level, so the per-queue exit
/// summary (notify mode and kick counters) is on stderr; stdout and stderr are piped.
pub fn spawn_kickvm_with_queue_log<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Child {
    Command::new(kickvm_binary())
        .args(args)
        .env("RUST_LOG", "warn,kickvm_virtio=info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start kickvm")
}

/// Boots the test guest like [`run_test_guest`], with the queue exit log on stderr.
pub fn run_test_guest_with_queue_log<S: AsRef<std::ffi::OsStr>>(
    cmdline: &str,
    extra: &[S],
    timeout: Duration,
) -> RunOutput {
    require_kvm();
    let mut args: Vec<std::ffi::OsString> = vec![
        "run".into(),
        "--kernel".into(),
        test_guest().into(),
        "--cmdline".into(),
        cmdline.into(),
    ];
    args.extend(extra.iter().map(|a| a.as_ref().to_os_string()));
    wait_with_timeout(spawn_kickvm_with_queue_log(&args), timeout)
}

/// A scratch directory unique to this test process and `name`.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kickvm-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating a scratch directory");
    dir
}

/// Writes a minimal PVH ELF whose entry disables interrupts and halts forever: a guest that
/// never ends by itself, for tests that stop the VM from outside.
pub fn write_halting_pvh_elf(path: &Path) {
    write_pvh_elf(path, &[0xfa, 0xf4, 0xeb, 0xfd]); // cli; hlt; jmp hlt
}

/// Writes a minimal PVH ELF that runs `code` (32-bit protected mode, no stack) at its entry.
pub fn write_pvh_elf(path: &Path, code: &[u8]) {
    const LOAD_ADDR: u64 = 0x10_0000;
    const EHDR_LEN: usize = 64;
    const PHDR_LEN: usize = 56;
    let code_offset = EHDR_LEN + 2 * PHDR_LEN;
    // Notes must start 4-aligned; the padding (nop) follows the code and is never reached.
    let mut code = code.to_vec();
    code.resize(code.len().next_multiple_of(4), 0x90);
    let code = code.as_slice();
    let note_offset = code_offset + code.len();
    let entry = LOAD_ADDR + code_offset as u64;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // name size
    note.extend_from_slice(&4u32.to_le_bytes()); // descriptor size
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(entry as u32).to_le_bytes());
    let file_len = note_offset + note.len();

    let mut elf = Vec::with_capacity(file_len);
    elf.extend_from_slice(b"\x7fELF");
    elf.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&entry.to_le_bytes());
    elf.extend_from_slice(&(EHDR_LEN as u64).to_le_bytes()); // program headers
    elf.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    elf.extend_from_slice(&0u32.to_le_bytes());
    elf.extend_from_slice(&(EHDR_LEN as u16).to_le_bytes());
    elf.extend_from_slice(&(PHDR_LEN as u16).to_le_bytes());
    elf.extend_from_slice(&2u16.to_le_bytes());
    elf.extend_from_slice(&[0; 6]); // section header size, count, name index
    let mut phdr = |kind: u32, offset: usize, len: usize, addr: u64| {
        elf.extend_from_slice(&kind.to_le_bytes());
        elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
        elf.extend_from_slice(&(offset as u64).to_le_bytes());
        elf.extend_from_slice(&addr.to_le_bytes());
        elf.extend_from_slice(&addr.to_le_bytes());
        elf.extend_from_slice(&(len as u64).to_le_bytes());
        elf.extend_from_slice(&(len as u64).to_le_bytes());
        elf.extend_from_slice(&4u64.to_le_bytes());
    };
    phdr(1, 0, file_len, LOAD_ADDR); // PT_LOAD of the whole file
    phdr(4, note_offset, note.len(), LOAD_ADDR + note_offset as u64); // PT_NOTE
    elf.extend_from_slice(code);
    elf.extend_from_slice(&note);
    std::fs::write(path, elf).expect("writing the halting guest");
}

/// Asserts kickvm explained a refusal in exactly one line on stderr, without panicking.
pub fn assert_one_line_error(output: &RunOutput, expected_fragment: &str) {
    output.assert_exit_code(2);
    let stderr = output.stderr.trim_end();
    assert_eq!(
        stderr.lines().count(),
        1,
        "expected one line on stderr:\n{output}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "kickvm panicked:\n{output}"
    );
    assert!(
        stderr.contains(expected_fragment),
        "stderr does not mention `{expected_fragment}`:\n{output}"
    );
}
