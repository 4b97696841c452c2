//! A kickvm run with `--api-socket`, for the control API tests: start it, talk HTTP to it,
//! collect its output.

#![allow(dead_code)] // each test binary uses a different subset

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{self, RunOutput};

pub struct ApiVm {
    child: Option<Child>,
    pub socket: PathBuf,
    pub dir: PathBuf,
}

impl ApiVm {
    /// Boots `kernel` with `--api-socket` in a scratch dir named `name`; waits for the socket.
    /// The virtio crate logs at info level so the exit summary (per-queue counters) is on
    /// stderr.
    pub fn start(name: &str, kernel: &Path, cmdline: &str, extra: &[&str]) -> Self {
        let dir = common::scratch_dir(name);
        let socket = dir.join("api.sock");
        let _ = std::fs::remove_file(&socket);
        Self::start_at(&dir, &socket, kernel, cmdline, extra)
    }

    /// Like [`ApiVm::start`] with the socket at `socket` (whatever is there already).
    pub fn start_at(
        dir: &Path,
        socket: &Path,
        kernel: &Path,
        cmdline: &str,
        extra: &[&str],
    ) -> Self {
        common::require_kvm();
        let mut args: Vec<String> = vec![
            "run".into(),
            "--kernel".into(),
            kernel.display().to_string(),
            "--cmdline".into(),
            cmdline.into(),
            "--api-socket".into(),
            socket.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = common::spawn_kickvm_with_queue_log(&args);
        Self::adopt(child, dir, socket)
    }

    /// Runs `command` (which ends in kickvm with `--api-socket socket`, e.g. through
    /// `unshare`), logging like [`ApiVm::start`]; waits for the socket.
    pub fn start_command(mut command: std::process::Command, dir: &Path, socket: &Path) -> Self {
        common::require_kvm();
        let child = command
            .env("RUST_LOG", "warn,kickvm_virtio=info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("cannot start the command");
        Self::adopt(child, dir, socket)
    }

    fn adopt(child: Child, dir: &Path, socket: &Path) -> Self {
        let mut vm = ApiVm {
            child: Some(child),
            socket: socket.to_path_buf(),
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&vm.socket).is_err() {
            if let Some(status) = vm.child.as_mut().unwrap().try_wait().unwrap() {
                let output = vm.finish(Duration::from_secs(1));
                panic!("kickvm ended ({status}) before its API socket appeared:\n{output}");
            }
            assert!(
                Instant::now() < deadline,
                "the API socket {} never appeared",
                vm.socket.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        vm
    }

    /// Sends raw bytes, returns (status, JSON body or Null).
    pub fn raw(&self, request: &[u8]) -> (u16, Value) {
        let mut stream = UnixStream::connect(&self.socket).expect("connecting to the API");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        stream.write_all(request).unwrap();
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .expect("reading the response");
        parse_response(&response)
    }

    /// One API call; `body` is sent with a Content-Length.
    pub fn call(&self, method: &str, operation: &str, body: Option<&str>) -> (u16, Value) {
        let body = body.unwrap_or("");
        let request = format!(
            "{method} /api/v1/{operation} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.raw(request.as_bytes())
    }

    /// A call that must succeed (2xx); returns its body.
    pub fn ok(&self, method: &str, operation: &str, body: Option<&str>) -> Value {
        let (status, value) = self.call(method, operation, body);
        assert!(
            (200..300).contains(&status),
            "{method} {operation} answered {status}: {value}"
        );
        value
    }

    pub fn info(&self) -> Value {
        self.ok("GET", "vm.info", None)
    }

    /// The device with `id` in vm.info.
    pub fn device(&self, id: &str) -> Value {
        self.info()["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id)
            .unwrap_or_else(|| panic!("no device {id} in vm.info"))
            .clone()
    }

    /// `id`'s first queue in vm.counters.
    pub fn queue_counters(&self, id: &str) -> Value {
        let counters = self.ok("GET", "vm.counters", None);
        counters["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id)
            .unwrap_or_else(|| panic!("no device {id} in vm.counters"))["queues"][0]
            .clone()
    }

    /// Waits (up to 30 s) until the guest's driver has set `id` up.
    pub fn wait_until_active(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.device(id)["active"] != true {
            assert!(Instant::now() < deadline, "the guest never set up {id}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn set_ioeventfd(&self, id: &str, on: bool) -> Value {
        let body = format!(
            r#"{{"id": "{id}", "ioeventfd": "{}"}}"#,
            if on { "on" } else { "off" }
        );
        self.ok("PUT", "vm.device-ioeventfd", Some(&body))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("kickvm is running").id()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Waits for kickvm to end (killing it after `timeout`).
    pub fn finish(&mut self, timeout: Duration) -> RunOutput {
        let child = self.child.take().expect("finish called once");
        common::wait_with_timeout(child, timeout)
    }
}

impl Drop for ApiVm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn parse_response(response: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("response without a header end: {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    let value = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {body:?}"))
    };
    (status, value)
}

/// Makes a zero-filled raw image of `bytes` in `dir`.
pub fn image(dir: &Path, name: &str, bytes: u64) -> PathBuf {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).expect("creating an image");
    file.set_len(bytes).expect("sizing an image");
    path
}

/// The per-queue summary kickvm-virtio logs at exit: (device, queue) -> field -> value.
pub fn exit_queue_counters(
    stderr: &str,
) -> Vec<(String, usize, std::collections::HashMap<String, String>)> {
    stderr
        .lines()
        .filter_map(|line| {
            let rest = &line[line.find("] ")? + 2..];
            let (device, rest) = rest.split_once(" queue ")?;
            let (index, fields) = rest.split_once(": mode=")?;
            let index: usize = index.parse().ok()?;
            let map: std::collections::HashMap<String, String> = format!("mode={fields}")
                .split_whitespace()
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            Some((device.to_string(), index, map))
        })
        .filter(|(_, _, map)| map.contains_key("kicks_exit"))
        .collect()
}
