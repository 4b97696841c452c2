//! The control API (`--api-socket`) end to end: every error case answers with JSON and the
//! right status and changes nothing; info names devices, transports and notify modes;
//! `--max-ioeventfds 1` leaves one of two disks in sync mode and both verify; shutdown, kill
//! and signals remove the socket. Needs /dev/kvm.

mod api_vm;
mod blk_pattern;
mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use api_vm::{exit_queue_counters, image, ApiVm};
use serde_json::{json, Value};

/// A VM that never ends by itself (the halting guest) with two disks that no driver touches.
fn idle_vm(name: &str) -> ApiVm {
    let dir = common::scratch_dir(&format!("{name}-files"));
    let kernel = dir.join("halt.elf");
    common::write_halting_pvh_elf(&kernel);
    let a = image(&dir, "a.img", 1 << 20);
    let b = image(&dir, "b.img", 1 << 20);
    let disk_a = format!("path={}", a.display());
    let disk_b = format!(
        "path={},id=data,transport=legacy,ioeventfd=off,readonly=on,engine=threads",
        b.display()
    );
    ApiVm::start(
        name,
        &kernel,
        "",
        &["--cpus", "2", "--disk", &disk_a, "--disk", &disk_b],
    )
}

/// Waits until the guest's drivers have started every device (the API answers as soon as
/// kickvm starts; the guest gets there a little later).
fn wait_for_drivers(vm: &ApiVm, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while vm.info()["devices"]
        .as_array()
        .is_some_and(|d| d.iter().any(|d| d["active"] != true))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest's drivers did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_error(answer: (u16, Value), status: u16, fragment: &str, what: &str) {
    let (got, body) = answer;
    assert_eq!(got, status, "{what}: status (body {body})");
    let message = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no `error` string in {body}"));
    assert!(
        message.contains(fragment),
        "{what}: error `{message}` does not mention `{fragment}`"
    );
}

#[test]
fn every_api_error_is_json_with_its_status_and_changes_nothing() {
    let vm = idle_vm("api-errors");
    let before = vm.info();
    assert_eq!(before["state"], "running");

    let cases: Vec<(&str, (u16, Value), u16, &str)> = vec![
        ("garbage", vm.raw(b"HELLO\r\n\r\n"), 400, "request line"),
        (
            "bad version",
            vm.raw(b"GET /api/v1/vm.info HTTP/9\r\n\r\n"),
            400,
            "version",
        ),
        (
            "bad header",
            vm.raw(b"GET /api/v1/vm.info HTTP/1.1\r\nno colon here\r\n\r\n"),
            400,
            "colon",
        ),
        (
            "bad length",
            vm.raw(b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            400,
            "Content-Length",
        ),
        (
            "chunked",
            vm.raw(b"PUT /api/v1/vm.pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            501,
            "Transfer-Encoding",
        ),
        (
            "unknown path",
            vm.call("GET", "vm.nothing", None),
            404,
            "vm.nothing",
        ),
        (
            "outside the API",
            vm.raw(b"GET /index.html HTTP/1.1\r\n\r\n"),
            404,
            "/index.html",
        ),
        ("PUT info", vm.call("PUT", "vm.info", None), 405, "GET"),
        ("GET pause", vm.call("GET", "vm.pause", None), 405, "PUT"),
        (
            "DELETE kill",
            vm.call("DELETE", "vm.kill", None),
            405,
            "PUT",
        ),
        (
            "resume running",
            vm.call("PUT", "vm.resume", None),
            409,
            "not paused",
        ),
        (
            "body not JSON",
            vm.call("PUT", "vm.device-ioeventfd", Some("{id: disk0")),
            400,
            "JSON",
        ),
        (
            "body not an object",
            vm.call("PUT", "vm.device-ioeventfd", Some("[]")),
            400,
            "object",
        ),
        (
            "no id",
            vm.call(
                "PUT",
                "vm.device-ioeventfd",
                Some(r#"{"ioeventfd": "off"}"#),
            ),
            400,
            "id",
        ),
        (
            "bad switch",
            vm.call(
                "PUT",
                "vm.device-ioeventfd",
                Some(r#"{"id": "disk0", "ioeventfd": "sometimes"}"#),
            ),
            400,
            "ioeventfd",
        ),
        (
            "unknown field",
            vm.call(
                "PUT",
                "vm.device-ioeventfd",
                Some(r#"{"id": "disk0", "ioeventfd": "off", "force": true}"#),
            ),
            400,
            "force",
        ),
        (
            "unknown device",
            vm.call(
                "PUT",
                "vm.device-ioeventfd",
                Some(r#"{"id": "disk9", "ioeventfd": "off"}"#),
            ),
            404,
            "disk9",
        ),
    ];
    for (what, answer, status, fragment) in cases {
        assert_error(answer, status, fragment, what);
    }
    assert_eq!(vm.info(), before, "an error changed the VM");

    // Pausing a paused VM: 409, and the VM stays paused (then resumes normally).
    assert_eq!(vm.call("PUT", "vm.pause", None).0, 204);
    let paused = vm.info();
    assert_eq!(paused["state"], "paused");
    assert_error(
        vm.call("PUT", "vm.pause", None),
        409,
        "already paused",
        "pause paused",
    );
    assert_eq!(vm.info(), paused, "a refused pause changed the VM");
    assert_eq!(vm.call("PUT", "vm.resume", None).0, 204);
    assert_eq!(vm.info(), before, "pause and resume left a trace");
}

#[test]
fn info_names_each_device_with_its_transport_and_each_queue_with_its_notify_mode() {
    let mut vm = idle_vm("api-info");
    let mode = std::fs::metadata(&vm.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the socket is owner-only");

    let info = vm.info();
    assert_eq!(info["vcpus"], 2);
    assert_eq!(info["memory_bytes"], 512u64 << 20);
    let devices = info["devices"].as_array().unwrap();
    let ids: Vec<&str> = devices.iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["disk0", "data"], "default and given ids, in order");
    let disk0 = &devices[0];
    assert_eq!(disk0["type"], "virtio-blk");
    assert_eq!(disk0["transport"], "transitional");
    assert_eq!(disk0["ioeventfd"], "on");
    // No driver: every queue is in sync mode, and info says why.
    assert_eq!(disk0["queues"][0]["notify"], "sync");
    assert_eq!(disk0["queues"][0]["reason"], "driver-not-ready");
    let backend = &disk0["backend"];
    assert!(
        backend["path"].as_str().unwrap().ends_with("a.img"),
        "{backend}"
    );
    assert_eq!(backend["size_bytes"], 1u64 << 20, "{backend}");
    assert_eq!(
        (
            &backend["readonly"],
            &backend["direct"],
            &backend["engine"],
            &backend["locked"],
            &backend["enospc"],
        ),
        (
            &json!(false),
            &json!(false),
            &json!("auto"),
            &json!(true),
            &json!("report")
        ),
        "{backend}"
    );
    let data = &devices[1];
    assert_eq!(
        (&data["backend"]["readonly"], &data["backend"]["engine"]),
        (&json!(true), &json!("threads")),
        "{data}"
    );
    assert_eq!(data["transport"], "legacy");
    assert_eq!(data["ioeventfd"], "off");
    assert_eq!(data["queues"][0]["reason"], "ioeventfd-off");

    // The switch is the device property; with no driver the queue stays sync for that reason.
    let switched = vm.set_ioeventfd("data", true);
    assert_eq!(switched["ioeventfd"], "on");
    assert_eq!(switched["queues"][0]["reason"], "driver-not-ready");
    assert_eq!(vm.device("data")["ioeventfd"], "on");

    let counters = vm.ok("GET", "vm.counters", None);
    assert_eq!(counters["vcpus"].as_array().unwrap().len(), 2);
    assert!(counters["vcpus"][0]["exits"]["io_out"].is_u64());
    assert_eq!(counters["devices"][1]["id"], "data");
    assert_eq!(counters["devices"][0]["queues"][0]["requests"], 0);

    // kickvm remote speaks the same API.
    let remote = |args: &[&str]| {
        let mut all = vec!["remote", "--api-socket", vm.socket.to_str().unwrap()];
        all.extend_from_slice(args);
        common::run_kickvm(&all, Duration::from_secs(30))
    };
    let stats = remote(&["stats"]);
    stats.assert_exit_code(0);
    assert!(
        stats.stdout.contains("kicks_ioeventfd") && stats.stdout.contains("data"),
        "{stats}"
    );
    let refused = remote(&["ioeventfd", "disk7", "off"]);
    refused.assert_exit_code(1);
    assert!(refused.stderr.contains("no device `disk7`"), "{refused}");

    assert_eq!(vm.call("PUT", "vm.kill", None).0, 204);
    let output = vm.finish(Duration::from_secs(30));
    output.assert_exit_code(0);
    assert!(!vm.socket.exists(), "the socket is removed at exit");
}

#[test]
fn shutdown_presses_the_power_button_and_the_guest_powers_off() {
    let mut vm = ApiVm::start(
        "api-shutdown",
        common::test_guest(),
        "workload=idle",
        &["--cpus", "2"],
    );
    assert_eq!(
        vm.info()["power_button"],
        serde_json::json!({"presses": 0, "taken_by_guest": 0})
    );
    let (status, body) = vm.call("PUT", "vm.shutdown", None);
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["requested"], "acpi-power-button");
    let output = vm.finish(Duration::from_secs(30));
    output.assert_exit_code(0);
    let result = output.result("idle");
    assert_eq!(result["status"], "ok", "{output}");
    assert_eq!(result["ended"], "power-button", "{output}");
    assert!(
        !output.stderr.contains("grace period"),
        "the guest powered off by itself, no grace period ended it:\n{output}"
    );
    assert!(!vm.socket.exists(), "the socket is removed at exit");
}

#[test]
fn a_guest_that_ignores_the_power_button_is_ended_after_the_grace_period() {
    let mut vm = idle_vm("api-shutdown-grace");
    let pressed = std::time::Instant::now();
    // Through the CLI client, which sends `{"timeout_secs": 1}`.
    let remote = std::process::Command::new(common::kickvm_binary())
        .args(["remote", "--api-socket"])
        .arg(&vm.socket)
        .args(["shutdown", "--timeout-secs", "1"])
        .output()
        .unwrap();
    assert!(remote.status.success(), "{remote:?}");
    assert!(vm.info()["shutdown_deadline_secs"].as_f64().unwrap() <= 1.0);
    // The halting guest has no ACPI: the press is never taken, the VM runs on until the end of
    // the grace period.
    std::thread::sleep(Duration::from_millis(300));
    let info = vm.info();
    assert_eq!(info["state"], "running");
    assert_eq!(info["power_button"]["presses"], 1);
    assert_eq!(info["power_button"]["taken_by_guest"], 0);
    let output = vm.finish(Duration::from_secs(30));
    output.assert_exit_code(0);
    assert!(
        pressed.elapsed() >= Duration::from_secs(1),
        "ended before its grace period"
    );
    assert!(
        output
            .stderr
            .contains("did not power off within its grace period"),
        "{output}"
    );
    assert!(!vm.socket.exists(), "the socket is removed at exit");
}

#[test]
fn shutdown_during_blk_verify_lets_the_guest_flush_and_the_image_holds_its_last_loop() {
    let dir = common::scratch_dir("api-shutdown-blk-files");
    let disk = image(&dir, "a.img", 1 << 20);
    let disk_arg = format!("path={}", disk.display());
    let mut vm = ApiVm::start(
        "api-shutdown-blk",
        common::test_guest(),
        "workload=blk-verify seed=40 loops=100000",
        &["--disk", &disk_arg],
    );
    wait_for_drivers(&vm, Duration::from_secs(20));
    // Let a few loops pass, so the press lands in the middle of the work.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(vm.call("PUT", "vm.shutdown", None).0, 202);
    let output = vm.finish(Duration::from_secs(60));
    output.assert_exit_code(0);
    let result = output.result("blk-verify");
    assert_eq!(result["status"], "ok", "{output}");
    assert_eq!(result["errors"], "0", "{output}");
    assert_eq!(
        result.get("shutdown").map(String::as_str),
        Some("power-button"),
        "{output}"
    );
    let last_loop = output.last_flushed_loop(0);
    assert!(
        last_loop < 99_999,
        "the press did not end the loops early:\n{output}"
    );
    blk_pattern::assert_image(&disk, 40 + last_loop, 0, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn shutdown_of_a_paused_vm_is_refused_and_changes_nothing() {
    let vm = idle_vm("api-shutdown-paused");
    assert_eq!(vm.call("PUT", "vm.pause", None).0, 204);
    let paused = vm.info();
    assert_error(
        vm.call("PUT", "vm.shutdown", None),
        409,
        "paused",
        "shutdown paused",
    );
    assert_eq!(vm.info(), paused, "a refused shutdown changed the VM");
    assert_error(
        vm.call("PUT", "vm.shutdown", Some(r#"{"timeout_secs": "soon"}"#)),
        400,
        "timeout_secs",
        "shutdown bad body",
    );
}

#[test]
fn a_client_that_sends_nothing_does_not_hold_up_another() {
    let vm = idle_vm("api-silent-client");
    // Connected, silent: its thread waits up to the 5 s client timeout for a request.
    let _silent = std::os::unix::net::UnixStream::connect(&vm.socket).unwrap();
    let start = std::time::Instant::now();
    assert_eq!(vm.info()["state"], "running");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "info waited {:?} behind a silent client",
        start.elapsed()
    );
}

#[test]
fn kill_ends_a_paused_vm() {
    let mut vm = idle_vm("api-kill-paused");
    assert_eq!(vm.call("PUT", "vm.pause", None).0, 204);
    assert_eq!(vm.call("PUT", "vm.kill", None).0, 204);
    let output = vm.finish(Duration::from_secs(30));
    output.assert_exit_code(0);
    assert!(!vm.socket.exists(), "the socket is removed at exit");
}

#[test]
fn sigterm_ends_the_vm_and_removes_the_socket() {
    let mut vm = idle_vm("api-sigterm");
    let pid = {
        // The API answers, so kickvm is up; find its pid through the child handle.
        vm.info();
        vm.pid()
    };
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let output = vm.finish(Duration::from_secs(30));
    output.assert_exit_code(128 + libc::SIGTERM);
    assert!(!vm.socket.exists(), "the socket is removed at exit");
}

#[test]
fn a_stale_socket_is_replaced_and_a_live_one_refused() {
    let dir = common::scratch_dir("api-live-files");
    let kernel = dir.join("halt.elf");
    common::write_halting_pvh_elf(&kernel);
    // A socket file left behind by a process that is gone.
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let vm = ApiVm::start_at(&dir, &stale, &kernel, "", &[]);
    assert_eq!(vm.info()["state"], "running");
    let socket = vm.socket.to_str().unwrap();
    let second = common::run_kickvm(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--api-socket",
            socket,
        ],
        Duration::from_secs(30),
    );
    common::assert_one_line_error(&second, "another process is serving this socket");
    assert!(
        vm.info()["state"] == "running",
        "the first VM's socket still works"
    );
}

#[test]
fn max_ioeventfds_1_puts_one_of_two_disks_in_sync_mode_and_both_verify() {
    let dir = common::scratch_dir("api-cap-files");
    let a = image(&dir, "a.img", 1 << 20);
    let b = image(&dir, "b.img", 1 << 20);
    let disk_a = format!("path={},transport=modern", a.display());
    let disk_b = format!("path={},transport=modern", b.display());
    let mut vm = ApiVm::start(
        "api-cap",
        common::test_guest(),
        "workload=blk-verify loops=40",
        &[
            "--cpus",
            "2",
            "--max-ioeventfds",
            "1",
            "--disk",
            &disk_a,
            "--disk",
            &disk_b,
        ],
    );
    // Wait until both drivers are up, then read the modes once.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let devices = loop {
        let info = vm.info();
        let devices = info["devices"].as_array().unwrap().clone();
        if devices.iter().all(|d| d["active"] == true) {
            break devices;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "drivers never came up: {info}"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let modes: Vec<(&str, &str)> = devices
        .iter()
        .map(|d| {
            (
                d["id"].as_str().unwrap(),
                d["queues"][0]["notify"].as_str().unwrap(),
            )
        })
        .collect();
    let fast: Vec<_> = modes.iter().filter(|(_, m)| *m == "ioeventfd").collect();
    let sync: Vec<_> = devices
        .iter()
        .filter(|d| d["queues"][0]["notify"] == "sync")
        .collect();
    assert_eq!(fast.len(), 1, "one disk in ioeventfd mode: {modes:?}");
    assert_eq!(sync.len(), 1, "one disk in sync mode: {modes:?}");
    let refused = &sync[0]["queues"][0];
    assert_eq!(refused["reason"], "kvm-refused", "{refused}");
    assert!(
        refused["refusal"]
            .as_str()
            .is_some_and(|r| r.contains("--max-ioeventfds")),
        "info says the cap refused it: {refused}"
    );
    let sync_id = sync[0]["id"].as_str().unwrap().to_string();

    let output = vm.finish(Duration::from_secs(120));
    output.assert_exit_code(0);
    let result = output.result("blk-verify");
    assert_eq!(result["status"], "ok", "{output}");
    assert_eq!(result["disks"], "2");
    assert_eq!(result["errors"], "0");
    // The counters show which path each disk's kicks took.
    let queues = exit_queue_counters(&output.stderr);
    assert_eq!(
        queues.len(),
        2,
        "one exit summary per disk queue:\n{output}"
    );
    for (device, _, counters) in queues {
        let by_exit: u64 = counters["kicks_exit"].parse().unwrap();
        let by_eventfd: u64 = counters["kicks_ioeventfd"].parse().unwrap();
        if device == sync_id {
            assert!(by_exit > 0 && by_eventfd == 0, "{device}: {counters:?}");
        } else {
            assert!(by_eventfd > 0 && by_exit == 0, "{device}: {counters:?}");
        }
    }
}

#[test]
fn a_socket_path_that_cannot_be_created_is_a_one_line_usage_error() {
    let dir = common::scratch_dir("api-bad-path");
    let kernel = dir.join("halt.elf");
    common::write_halting_pvh_elf(&kernel);
    let output = common::run_kickvm(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--api-socket",
            "/nonexistent-dir/api.sock",
        ],
        Duration::from_secs(30),
    );
    common::assert_one_line_error(&output, "--api-socket /nonexistent-dir/api.sock");

    // A regular file in the way is not replaced.
    let file = dir.join("not-a-socket");
    std::fs::write(&file, "keep me").unwrap();
    let output = common::run_kickvm(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--api-socket",
            file.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    common::assert_one_line_error(&output, "not a socket");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

#[test]
fn remote_without_a_vm_says_so_in_one_line() {
    let output = common::run_kickvm(
        &[
            "remote",
            "--api-socket",
            "/nonexistent-dir/api.sock",
            "info",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(output.code, Some(1), "{output}");
    assert_eq!(output.stderr.trim_end().lines().count(), 1, "{output}");
    assert!(
        output.stderr.contains("cannot reach the API socket"),
        "{output}"
    );
}
