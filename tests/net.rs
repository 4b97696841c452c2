//! virtio-net end to end: the test guest's network personality behind `--net tap=...`, with
//! the host side in a network namespace each test creates and removes (nothing leaves it).
//! The host peer is `tests/net_peer.py` under `ip netns exec`. Every run is bounded in time.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const HOST_IP: &str = "10.0.0.1";
const GUEST_IP: &str = "10.0.0.2";
const TAP: &str = "ktap0";
/// From kickvm's start to the guest's `NET` line.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// VMs run one at a time: the machine has two cores, and timing-bound peers would starve.
static ONE_VM: Mutex<()> = Mutex::new(());

/// A network namespace with a tap at 10.0.0.1/24; removed (tap included) on drop.
struct Netns {
    name: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("cannot run ip(8)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    fn new(queues: usize) -> Netns {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "kvmtest-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        let mut tap = vec![
            "netns", "exec", &ns.name, "ip", "tuntap", "add", "dev", TAP, "mode", "tap",
        ];
        if queues > 1 {
            tap.push("multi_queue");
        }
        ip(&tap);
        ip(&[
            "netns",
            "exec",
            &ns.name,
            "ip",
            "addr",
            "add",
            "10.0.0.1/24",
            "dev",
            TAP,
        ]);
        ip(&["netns", "exec", &ns.name, "ip", "link", "set", TAP, "up"]);
        ip(&["netns", "exec", &ns.name, "ip", "link", "set", "lo", "up"]);
        // No IPv6 neighbour discovery chatter on the tap: it would blur the frame counts.
        for key in [
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ] {
            let _ = ns.command("sysctl").args(["-qw", key]).status();
        }
        let _ = ns
            .command("sysctl")
            .args(["-qw", &format!("net.ipv6.conf.{TAP}.disable_ipv6=1")])
            .status();
        ns
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs the peer script; its last line's `key=value` words.
    fn peer(&self, args: &[&str], timeout: Duration) -> HashMap<String, String> {
        let script = repo_root().join("tests/net_peer.py");
        let mut c = self.command("timeout");
        c.arg(format!("{}", timeout.as_secs().max(1)))
            .arg("python3")
            .arg(&script)
            .args(args);
        let out = c.output().expect("cannot run the peer");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "peer {args:?} failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        fields(stdout.lines().last().unwrap_or(""))
    }

    /// Packets the tap dropped on the way to the guest (its TX queue was full).
    fn tap_tx_dropped(&self) -> u64 {
        let out = self
            .command("cat")
            .arg(format!("/sys/class/net/{TAP}/statistics/tx_dropped"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn fields(line: &str) -> HashMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn num(map: &HashMap<String, String>, key: &str) -> u64 {
    map.get(key)
        .unwrap_or_else(|| panic!("no `{key}` in {map:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("`{key}` is not a number in {map:?}"))
}

/// A running guest whose serial output is read live.
struct Vm {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    net_line: mpsc::Receiver<String>,
}

impl Vm {
    fn boot(ns: &Netns, cmdline: &str, net: &str, cpus: u8) -> Vm {
        require_kvm();
        let guest = test_guest().to_str().unwrap().to_string();
        let mut kickvm = ns.command(kickvm_binary());
        kickvm
            .args(["run", "--kernel", &guest, "--cmdline", cmdline])
            .args(["--cpus", &cpus.to_string(), "--net", net]);
        Vm::spawn(kickvm)
    }

    /// The same guest under QEMU's virtio-net-pci on the namespace's tap.
    fn boot_qemu(ns: &Netns, cmdline: &str, ioeventfd: &str) -> Vm {
        require_kvm();
        let guest = test_guest().to_str().unwrap().to_string();
        let mut qemu = ns.command("qemu-system-x86_64");
        qemu.args([
            "-enable-kvm",
            "-M",
            "q35",
            "-smp",
            "1",
            "-m",
            "256M",
            "-kernel",
            &guest,
        ])
        .args([
            "-append",
            cmdline,
            "-nographic",
            "-monitor",
            "none",
            "-serial",
            "stdio",
        ])
        .args(["-no-reboot", "-display", "none", "-netdev"])
        .arg(format!(
            "tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off"
        ))
        .arg("-device")
        .arg(format!(
            "virtio-net-pci,netdev=n0,ioeventfd={ioeventfd},romfile="
        ));
        Vm::spawn(qemu)
    }

    fn spawn(mut command: Command) -> Vm {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start the VMM (qemu-system-x86 installed?)");
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, net_line) = mpsc::channel();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // QEMU's firmware may leave its last words on the same line.
                if line.contains("NET index=") {
                    let _ = tx.send(line.clone());
                }
                sink.lock().unwrap().push(line);
            }
        });
        Vm {
            child,
            lines,
            net_line,
        }
    }

    /// Waits for the guest's `NET` line (the driver is up).
    fn wait_net_up(&mut self) -> HashMap<String, String> {
        match self.net_line.recv_timeout(BOOT_TIMEOUT) {
            Ok(line) => {
                let f = fields(&line[line.find("NET index=").unwrap_or(0)..]);
                assert!(!f.contains_key("error"), "the guest driver failed: {line}");
                f
            }
            Err(_) => {
                let _ = self.child.kill();
                let out = wait_with_timeout(
                    std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap()),
                    Duration::from_secs(5),
                );
                panic!(
                    "no NET line from the guest:\n{}\n{out}",
                    self.lines.lock().unwrap().join("\n")
                );
            }
        }
    }

    /// Waits for kickvm to end (the guest's `secs` ran out) and returns the RESULT fields.
    fn finish(self, workload: &str, timeout: Duration) -> HashMap<String, String> {
        let out = wait_with_timeout(self.child, timeout);
        // The reader thread sees EOF once kickvm is gone.
        std::thread::sleep(Duration::from_millis(100));
        let lines = self.lines.lock().unwrap().join("\n");
        assert!(
            !out.timed_out,
            "kickvm did not finish in time:\n{lines}\n{out}"
        );
        assert!(
            lines.contains("DONE status=ok"),
            "the guest did not finish cleanly:\n{lines}\n{out}"
        );
        let prefix = format!("RESULT workload={workload} ");
        let line = lines
            .lines()
            .find_map(|l| l.find(&prefix).map(|at| &l[at..]))
            .unwrap_or_else(|| panic!("no {prefix} line:\n{lines}\n{out}"));
        let f = fields(line);
        assert_eq!(f.get("status").map(String::as_str), Some("ok"), "{line}");
        f
    }
}

struct Mode {
    ioeventfd: &'static str,
    transport: &'static str,
    completion: &'static str,
}

impl Mode {
    fn net(&self) -> String {
        format!("tap={TAP},ioeventfd={}", self.ioeventfd)
    }
    fn guest(&self) -> String {
        format!(
            "transport={} completion={}",
            self.transport, self.completion
        )
    }
}

/// Boots net-echo, pings it, echoes `echo_bytes` of UDP in datagrams of several sizes, and
/// checks every reply came back byte-identical with at most 1% of datagrams retried. `secs`
/// bounds the guest's run; the host ends it early (a datagram to port 9) when done.
fn ping_and_echo(mode: &Mode, echo_bytes: u64, secs: u64) {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::new(1);
    let mut vm = Vm::boot(
        &ns,
        &format!(
            "workload=net-echo ip={GUEST_IP}/24 secs={secs} {}",
            mode.guest()
        ),
        &mode.net(),
        1,
    );
    let net = vm.wait_net_up();
    assert_eq!(net["transport"], mode.transport);
    let started = Instant::now();
    let ping = ns.peer(&["ping", GUEST_IP, "10"], Duration::from_secs(20));
    assert_eq!(num(&ping, "ok"), 10, "pings lost or corrupted: {ping:?}");
    let echo = ns.peer(
        &[
            "echo",
            GUEST_IP,
            &echo_bytes.to_string(),
            "1,64,200,512,1000,1472",
            &(secs - 10).to_string(),
        ],
        Duration::from_secs(secs),
    );
    let label = format!("{} {} {}", mode.net(), mode.guest(), mode.ioeventfd);
    let datagrams = num(&echo, "datagrams");
    assert_eq!(
        num(&echo, "mismatches"),
        0,
        "{label}: echo replies differ: {echo:?}"
    );
    assert_eq!(
        num(&echo, "lost"),
        0,
        "{label}: datagrams never echoed: {echo:?}"
    );
    assert!(
        num(&echo, "retries") * 100 <= datagrams,
        "{label}: more than 1% retried: {echo:?}"
    );
    assert!(
        num(&echo, "bytes") >= echo_bytes,
        "{label}: echo did not finish: {echo:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(secs),
        "traffic outlasted the guest's {secs} s window; raise secs"
    );
    ns.peer(&["stop", GUEST_IP], Duration::from_secs(10));
    let result = vm.finish("net-echo", Duration::from_secs(60));
    assert!(num(&result, "icmp") >= 10, "{result:?}");
    assert!(num(&result, "udp") >= datagrams, "{result:?}");
}

#[test]
fn host_pings_the_guest_and_megabytes_of_udp_echo_come_back_identical() {
    ping_and_echo(
        &Mode {
            ioeventfd: "auto",
            transport: "modern",
            completion: "poll",
        },
        3 << 20,
        150,
    );
}

#[test]
fn ping_and_echo_work_with_every_notify_mode_transport_and_completion() {
    // `auto,poll_us=30`: the reply wait, whose timeout meeting the guest's next frame once
    // made the device declare the TX ring broken (NEEDS_RESET) and the echo stall.
    for ioeventfd in ["on", "off", "auto", "auto,poll_us=30"] {
        for transport in ["modern", "legacy"] {
            for completion in ["poll", "irq"] {
                ping_and_echo(
                    &Mode {
                        ioeventfd,
                        transport,
                        completion,
                    },
                    256 << 10,
                    60,
                );
            }
        }
    }
}

/// The guest sends as fast as it can; the host sink must see every datagram the guest's
/// device took, once: loss allowed is 0.5% (host socket or backlog), duplicates none.
fn tx_counts_match(mode: &Mode) {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::new(1);
    let script = repo_root().join("tests/net_peer.py");
    let mut sink = ns
        .command("timeout")
        .args(["90", "python3"])
        .arg(&script)
        .args(["sink", &format!("{HOST_IP}:9000"), "3"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut sink_out = BufReader::new(sink.stdout.take().unwrap()).lines();
    assert_eq!(sink_out.next().unwrap().unwrap(), "sink ready");
    let mut vm = Vm::boot(
        &ns,
        &format!(
            "workload=net-tx ip={GUEST_IP}/24 dst={HOST_IP}:9000 size=200 secs=3 {}",
            mode.guest()
        ),
        &mode.net(),
        1,
    );
    vm.wait_net_up();
    let result = vm.finish("net-tx", Duration::from_secs(60));
    let line = sink_out.last().unwrap().unwrap();
    let _ = sink.wait();
    let seen = fields(&line);
    let sent = num(&result, "packets");
    let got = num(&seen, "packets");
    assert!(sent > 1000, "the guest hardly sent: {result:?}");
    assert_eq!(got, num(&seen, "unique"), "duplicated datagrams: {seen:?}");
    assert!(
        got <= sent,
        "host saw more than the guest sent: {seen:?} vs {result:?}"
    );
    assert!(
        got * 1000 >= sent * 995,
        "more than 0.5% lost: host {got} of {sent}"
    );
    assert_eq!(num(&seen, "bytes"), got * 200);
}

#[test]
fn guest_to_host_udp_counts_match_with_ioeventfd_on_off_and_auto() {
    for ioeventfd in ["on", "off", "auto"] {
        tx_counts_match(&Mode {
            ioeventfd,
            transport: "modern",
            completion: "poll",
        });
    }
    tx_counts_match(&Mode {
        ioeventfd: "auto",
        transport: "legacy",
        completion: "irq",
    });
}

/// The host sends as fast as sendto allows, more than the guest can take: every datagram is
/// either counted by the guest or dropped by the tap's bounded queue (its tx_dropped), within
/// 0.5% (frames still queued when the guest stops counting).
fn rx_counts_match(mode: &Mode) {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::new(1);
    let mut vm = Vm::boot(
        &ns,
        &format!("workload=net-rx ip={GUEST_IP}/24 secs=120 {}", mode.guest()),
        &mode.net(),
        1,
    );
    vm.wait_net_up();
    // Resolve the guest's MAC first: datagrams sent while ARP is pending are dropped by the
    // host's neighbour queue, before the tap could count them.
    assert_eq!(
        num(
            &ns.peer(&["ping", GUEST_IP, "1"], Duration::from_secs(10)),
            "ok"
        ),
        1
    );
    let dropped_before = ns.tap_tx_dropped();
    let source = ns.peer(
        &["source", &format!("{GUEST_IP}:9001"), "200", "2"],
        Duration::from_secs(20),
    );
    // Let the guest drain the tap's queue before it is told to stop.
    std::thread::sleep(Duration::from_millis(500));
    let dropped = ns.tap_tx_dropped() - dropped_before;
    ns.peer(&["stop", GUEST_IP], Duration::from_secs(10));
    let result = vm.finish("net-rx", Duration::from_secs(60));
    let sent = num(&source, "packets");
    let got = num(&result, "packets");
    assert!(got > 1000, "the guest hardly received: {result:?}");
    assert!(
        got <= sent,
        "guest counted more than was sent: {result:?} vs {source:?}"
    );
    assert_eq!(num(&result, "bytes"), got * 200);
    // The tap also drops the odd frame of the host's own (ARP) while the guest is flooded.
    let accounted = got + dropped;
    assert!(
        accounted <= sent + 16 && accounted * 1000 >= sent * 995,
        "sent {sent}, guest {got} + tap dropped {dropped} = {accounted}"
    );
}

#[test]
fn host_to_guest_udp_counts_match_with_ioeventfd_on_off_and_auto() {
    for ioeventfd in ["on", "off", "auto"] {
        rx_counts_match(&Mode {
            ioeventfd,
            transport: "modern",
            completion: "poll",
        });
    }
    rx_counts_match(&Mode {
        ioeventfd: "auto",
        transport: "legacy",
        completion: "irq",
    });
}

/// A guest serving pings and UDP echo is paused, snapshotted and killed; a kickvm restored
/// from the snapshot on the same tap answers again, where the guest left off (its counters
/// include the pings before the snapshot).
#[test]
fn a_vm_restored_from_a_snapshot_answers_pings_and_echo_on_the_same_tap() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::new(2);
    let dir = scratch_dir("net-snapshot");
    let socket = dir.join("api.sock");
    let snapshot = dir.join("snapshot");
    let guest = test_guest().to_str().unwrap().to_string();
    let cmdline = format!("workload=net-echo ip={GUEST_IP}/24 secs=60");
    let net = format!("tap={TAP},queues=2");
    let start = |restore: bool| {
        let _ = std::fs::remove_file(&socket);
        let mut kickvm = ns.command(kickvm_binary());
        kickvm
            .args(["run", "--kernel", &guest, "--cmdline", &cmdline])
            .args(["--cpus", "2", "--net", &net, "--api-socket"])
            .arg(&socket);
        if restore {
            kickvm.arg("--restore").arg(&snapshot);
        }
        Vm::spawn(kickvm)
    };
    let remote = |args: &[&str]| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "no API socket");
            std::thread::sleep(Duration::from_millis(5));
        }
        let out = Command::new(kickvm_binary())
            .arg("remote")
            .arg("--api-socket")
            .arg(&socket)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "remote {args:?}: {out:?}");
    };

    let mut first = start(false);
    assert_eq!(first.wait_net_up()["pairs"], "2");
    let ping = ns.peer(&["ping", GUEST_IP, "5"], Duration::from_secs(20));
    assert_eq!(num(&ping, "ok"), 5);
    remote(&["pause"]);
    remote(&["snapshot", snapshot.to_str().unwrap()]);
    remote(&["kill"]);
    let out = wait_with_timeout(first.child, Duration::from_secs(30));
    out.assert_exit_code(0);

    let second = start(true);
    let ping = ns.peer(&["ping", GUEST_IP, "10"], Duration::from_secs(20));
    assert_eq!(num(&ping, "ok"), 10, "the restored guest answers: {ping:?}");
    let echo = ns.peer(
        &["echo", GUEST_IP, "200000", "64,1000", "45"],
        Duration::from_secs(50),
    );
    assert_eq!(
        (num(&echo, "mismatches"), num(&echo, "lost")),
        (0, 0),
        "{echo:?}"
    );
    assert!(num(&echo, "bytes") >= 200000, "{echo:?}");
    ns.peer(&["stop", GUEST_IP], Duration::from_secs(10));
    let result = second.finish("net-echo", Duration::from_secs(60));
    assert!(
        num(&result, "icmp") >= 15,
        "pings before and after: {result:?}"
    );
    assert_eq!(result["pairs"], "2");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_vcpus_get_a_queue_pair_each_and_both_echo() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::new(2);
    let mut vm = Vm::boot(
        &ns,
        &format!("workload=net-echo ip={GUEST_IP}/24 secs=60"),
        &format!("tap={TAP},queues=2"),
        2,
    );
    let net = vm.wait_net_up();
    assert_eq!(net["pairs"], "2");
    let ping = ns.peer(&["ping", GUEST_IP, "5"], Duration::from_secs(20));
    assert_eq!(num(&ping, "ok"), 5);
    let echo = ns.peer(
        // Two spinning vCPUs leave no core free for the peer: allow it time.
        &["echo", GUEST_IP, "200000", "64,1000", "45"],
        Duration::from_secs(50),
    );
    assert!(
        num(&echo, "bytes") >= 200000,
        "echo did not finish: {echo:?}"
    );
    assert_eq!(
        (num(&echo, "mismatches"), num(&echo, "lost")),
        (0, 0),
        "{echo:?}"
    );
    ns.peer(&["stop", GUEST_IP], Duration::from_secs(10));
    let result = vm.finish("net-echo", Duration::from_secs(60));
    assert_eq!(result["pairs"], "2");
}

#[test]
fn a_tap_that_cannot_be_opened_is_one_clear_error() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    // An existing single-queue tap cannot be opened with two queues.
    let ns = Netns::new(1);
    let guest = test_guest().to_str().unwrap().to_string();
    let child = ns
        .command(kickvm_binary())
        .args([
            "run",
            "--kernel",
            &guest,
            "--net",
            &format!("tap={TAP},queues=2"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_with_timeout(child, Duration::from_secs(30));
    assert_ne!(out.code, Some(0), "{out}");
    assert!(
        out.stderr.contains("multi_queue"),
        "the error should say how to fix it:\n{out}"
    );
}

#[test]
fn a_missing_tap_is_created_and_gone_after_exit() {
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let ns = Netns::new(1);
    let mut vm = Vm::boot(
        &ns,
        &format!("workload=net-echo ip={GUEST_IP}/24 secs=3"),
        "tap=knew0",
        1,
    );
    vm.wait_net_up();
    let exists = |ns: &Netns| {
        ns.command("ip")
            .args(["link", "show", "knew0"])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(exists(&ns), "kickvm should have created knew0");
    vm.finish("net-echo", Duration::from_secs(60));
    assert!(!exists(&ns), "knew0 should be gone with kickvm");
}

#[test]
fn the_guest_driver_works_unchanged_under_qemu_virtio_net_pci() {
    for (ioeventfd, transport, completion) in [("on", "modern", "poll"), ("off", "legacy", "irq")] {
        let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
        let ns = Netns::new(1);
        let cmdline = format!(
            "workload=net-echo ip={GUEST_IP}/24 secs=60 transport={transport} completion={completion}"
        );
        let mut vm = Vm::boot_qemu(&ns, &cmdline, ioeventfd);
        vm.wait_net_up();
        let ping = ns.peer(&["ping", GUEST_IP, "5"], Duration::from_secs(20));
        assert_eq!(num(&ping, "ok"), 5, "{ping:?}");
        let echo = ns.peer(
            &["echo", GUEST_IP, "262144", "1,200,1472"],
            Duration::from_secs(8),
        );
        assert_eq!(
            (num(&echo, "mismatches"), num(&echo, "lost")),
            (0, 0),
            "{echo:?}"
        );
        ns.peer(&["stop", GUEST_IP], Duration::from_secs(10));
        let result = vm.finish("net-echo", Duration::from_secs(60));
        assert!(num(&result, "udp") >= num(&echo, "datagrams"), "{result:?}");
    }
}
