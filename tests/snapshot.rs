//! Snapshot and restore, end to end: the test guest's blk-verify is paused mid-run, written
//! to a snapshot (`vm.snapshot`), its kickvm killed, and a new kickvm started from the
//! snapshot (`--restore`) finishes the run with no verify error, its disk's kicks arriving by
//! ioeventfd again. Bad snapshots and mismatched options are one-line errors. Needs /dev/kvm.

mod api_vm;
mod common;

use std::path::Path;
use std::time::Duration;

use api_vm::{exit_queue_counters, image, ApiVm};

/// blk-verify rounds: more than run before the power button ends them.
const LOOPS: u32 = 1_000_000;

fn snapshot_url(dir: &Path) -> String {
    format!(r#"{{"destination_url": "file://{}"}}"#, dir.display())
}

#[test]
fn a_vm_restored_from_a_snapshot_mid_blk_verify_finishes_it_with_no_error_modern() {
    snapshot_and_restore_under_blk_verify("snap-modern", "completion=irq", "ioeventfd=on");
}

#[test]
fn a_vm_restored_from_a_snapshot_mid_blk_verify_finishes_it_with_no_error_legacy_polled() {
    snapshot_and_restore_under_blk_verify(
        "snap-legacy",
        "transport=legacy completion=poll",
        "ioeventfd=on",
    );
}

#[test]
fn a_vm_restored_from_a_snapshot_mid_blk_verify_finishes_it_with_no_error_intx() {
    snapshot_and_restore_under_blk_verify("snap-intx", "completion=irq irq=intx", "ioeventfd=on");
}

/// The guest gave the disk's BARs new addresses before the snapshot: the restored device
/// answers, and its doorbells are ioeventfds, at those.
#[test]
fn a_vm_restored_from_a_snapshot_mid_blk_verify_finishes_it_with_no_error_moved_bars() {
    snapshot_and_restore_under_blk_verify("snap-bars", "completion=irq bars=move", "ioeventfd=on");
    snapshot_and_restore_under_blk_verify(
        "snap-bars-legacy",
        "transport=legacy completion=irq bars=move",
        "ioeventfd=on",
    );
}

#[test]
fn a_vm_restored_from_a_snapshot_mid_blk_verify_finishes_it_with_no_error_sync_kicks() {
    snapshot_and_restore_under_blk_verify("snap-sync", "completion=irq", "ioeventfd=off");
}

fn snapshot_and_restore_under_blk_verify(name: &str, guest_args: &str, ioeventfd: &str) {
    let files = common::scratch_dir(&format!("{name}-files"));
    let disk = format!(
        "path={},{ioeventfd}",
        image(&files, "a.img", 1 << 20).display()
    );
    let snapshot = files.join("snapshot");
    let cmdline = format!("workload=blk-verify loops={LOOPS} {guest_args}");
    let options = ["--cpus", "2", "--memory", "128M", "--disk", &disk];

    let mut first = ApiVm::start(name, common::test_guest(), &cmdline, &options);
    first.wait_until_active("disk0");
    std::thread::sleep(Duration::from_millis(300));
    let (status, body) = first.call("PUT", "vm.snapshot", Some(&snapshot_url(&snapshot)));
    assert_eq!(status, 409, "a running VM is not snapshotted: {body}");
    assert_eq!(first.call("PUT", "vm.pause", None).0, 204);
    let before = first.queue_counters("disk0");
    assert!(before["requests"].as_u64().unwrap() > 0, "{before}");
    let (status, body) = first.call("PUT", "vm.snapshot", Some(&snapshot_url(&snapshot)));
    assert_eq!(status, 204, "{body}");
    assert_eq!(first.call("PUT", "vm.kill", None).0, 204);
    first.finish(Duration::from_secs(30)).assert_exit_code(0);

    let restore_dir = snapshot.display().to_string();
    let mut restored_options = options.to_vec();
    restored_options.extend(["--restore", &restore_dir]);
    let mut second = ApiVm::start(
        &format!("{name}-restored"),
        common::test_guest(),
        &cmdline,
        &restored_options,
    );
    let device = second.device("disk0");
    assert_eq!(device["active"], true, "restored active: {device}");
    let expected_mode = if ioeventfd == "ioeventfd=on" {
        "ioeventfd"
    } else {
        "sync"
    };
    assert_eq!(device["queues"][0]["notify"], expected_mode, "{device}");
    // The guest goes on where it was: its disk serves requests without the driver setting
    // it up again.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while second.queue_counters("disk0")["requests"].as_u64().unwrap() < 1000 {
        assert!(
            std::time::Instant::now() < deadline,
            "the restored guest did no I/O: {}",
            second.queue_counters("disk0")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(second.call("PUT", "vm.shutdown", None).0, 202);
    let output = second.finish(Duration::from_secs(120));
    output.assert_exit_code(0);
    let result = output.result("blk-verify");
    assert_eq!(result["status"], "ok", "{output}");
    assert_eq!(result["errors"], "0", "{output}");
    assert_eq!(result["shutdown"], "power-button", "{output}");
    // The guest counted its kicks from boot; the restored kickvm saw those after the restore,
    // by the path the disk's ioeventfd setting asks for.
    let queues = exit_queue_counters(&output.stderr);
    let counters = &queues
        .iter()
        .find(|(device, queue, _)| device == "disk0" && *queue == 0)
        .unwrap_or_else(|| panic!("no exit summary for disk0:\n{output}"))
        .2;
    let count = |key: &str| counters[key].parse::<u64>().unwrap();
    if ioeventfd == "ioeventfd=on" {
        assert!(count("kicks_ioeventfd") > 0, "{counters:?}");
        assert_eq!(count("kicks_exit"), 0, "{counters:?}");
    } else {
        assert!(count("kicks_exit") > 0, "{counters:?}");
    }
    let _ = std::fs::remove_dir_all(&files);
}

#[test]
fn restoring_with_other_options_or_from_a_bad_snapshot_is_a_one_line_error() {
    let files = common::scratch_dir("snap-bad-files");
    let disk = format!("path={}", image(&files, "a.img", 1 << 20).display());
    let snapshot = files.join("snapshot");
    let guest = common::test_guest().display().to_string();

    let mut vm = ApiVm::start(
        "snap-bad",
        common::test_guest(),
        &format!("workload=blk-verify loops={LOOPS}"),
        &["--cpus", "2", "--memory", "128M", "--disk", &disk],
    );
    vm.wait_until_active("disk0");
    assert_eq!(vm.call("PUT", "vm.pause", None).0, 204);
    // `kickvm remote snapshot` is the same call.
    let remote = std::process::Command::new(common::kickvm_binary())
        .args([
            "remote",
            "--api-socket",
            vm.socket.to_str().unwrap(),
            "snapshot",
        ])
        .arg(&snapshot)
        .output()
        .unwrap();
    assert!(remote.status.success(), "{remote:?}");
    assert!(snapshot.join("state.json").exists() && snapshot.join("memory").exists());
    assert_eq!(vm.call("PUT", "vm.kill", None).0, 204);
    vm.finish(Duration::from_secs(30)).assert_exit_code(0);

    let restore = |extra: &[&str]| {
        let mut args = vec!["run", "--kernel", &guest];
        args.extend_from_slice(extra);
        common::run_kickvm(&args, Duration::from_secs(30))
    };
    let snap = snapshot.display().to_string();
    let cases: [(&[&str], &str); 4] = [
        (
            &[
                "--cpus",
                "1",
                "--memory",
                "128M",
                "--disk",
                &disk,
                "--restore",
                &snap,
            ],
            "the snapshot was taken with --cpus 2",
        ),
        (
            &[
                "--cpus",
                "2",
                "--memory",
                "256M",
                "--disk",
                &disk,
                "--restore",
                &snap,
            ],
            "the snapshot was taken with --memory 128M",
        ),
        (
            &["--cpus", "2", "--memory", "128M", "--restore", &snap],
            "disk0",
        ),
        (
            &[
                "--cpus",
                "2",
                "--memory",
                "128M",
                "--disk",
                &disk,
                "--restore",
                "/nonexistent/snap",
            ],
            "/nonexistent/snap",
        ),
    ];
    for (args, expected) in cases {
        let output = restore(args);
        output.assert_exit_code(2);
        common::assert_one_line_error(&output, expected);
    }
    std::fs::write(snapshot.join("state.json"), b"{\"format\": 1, \"cpus\": 2}").unwrap();
    let output = restore(&[
        "--cpus",
        "2",
        "--memory",
        "128M",
        "--disk",
        &disk,
        "--restore",
        &snap,
    ]);
    output.assert_exit_code(2);
    common::assert_one_line_error(&output, "not a kickvm snapshot");
    let _ = std::fs::remove_dir_all(&files);
}
