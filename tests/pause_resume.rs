//! The notifier state machine under change, end to end: while the test guest's blk-verify
//! runs on two disks with 2 vCPUs, 200 pause/resume cycles at random short intervals and 200
//! run-time switches of ioeventfd on one disk lose nothing: no verify error, no request slower
//! than 1 s beyond the time the VM was paused, and every guest kick is in the counters.
//! Needs /dev/kvm.

mod api_vm;
mod common;

use std::time::{Duration, Instant};

use api_vm::{exit_queue_counters, image, ApiVm};

const CYCLES: usize = 200;
/// blk-verify rounds: more than any machine gets through during the cycles (a round of two
/// 1 MiB disks takes 0.01-0.1 s here; the cycles take 2-4 s); the power button ends them.
const LOOPS: u32 = 1_000_000;

/// xorshift64*: reproducible random intervals (the seed is printed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A pause of 0..max_us microseconds.
    fn sleep(&mut self, max_us: u64) {
        std::thread::sleep(Duration::from_micros(self.next() % max_us));
    }
}

/// The most paused time inside any window of `length` (windows starting at a pause start
/// include the maximum).
fn max_paused_within(pauses: &[(Instant, Instant)], length: Duration) -> Duration {
    pauses
        .iter()
        .map(|&(start, _)| {
            let end = start + length;
            pauses
                .iter()
                .map(|&(s, e)| {
                    let (s, e) = (s.max(start), e.min(end));
                    e.saturating_duration_since(s)
                })
                .sum::<Duration>()
        })
        .max()
        .unwrap_or_default()
}

#[test]
fn pause_resume_and_ioeventfd_switches_during_blk_verify_lose_no_request_and_no_kick() {
    cycles_under_blk_verify("pause-resume-modern", "");
}

/// The same over the legacy interface (port-I/O doorbells) with completions by MSI-X
/// interrupt, so interrupts raised while the VM is paused must reach the guest on resume.
#[test]
fn pause_resume_and_ioeventfd_switches_lose_nothing_on_legacy_doorbells_with_interrupts() {
    cycles_under_blk_verify("pause-resume-legacy", "transport=legacy completion=irq");
}

/// The VM tests run one at a time: on two cores, two guests spinning on their rings starve
/// each other's I/O threads and the latency bound measures the machine, not kickvm.
static ONE_VM_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn cycles_under_blk_verify(name: &str, guest_args: &str) {
    let _turn = ONE_VM_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = common::scratch_dir(&format!("{name}-files"));
    let a = image(&dir, "a.img", 1 << 20);
    let b = image(&dir, "b.img", 1 << 20);
    let disk_a = format!("path={}", a.display());
    let disk_b = format!("path={}", b.display());
    let mut vm = ApiVm::start(
        name,
        common::test_guest(),
        &format!("workload=blk-verify loops={LOOPS} {guest_args}"),
        &["--cpus", "2", "--disk", &disk_a, "--disk", &disk_b],
    );
    vm.wait_until_active("disk0");

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("random intervals: seed {seed:#x}");
    let mut rng = Rng(seed);
    let mut pauses: Vec<(Instant, Instant)> = Vec::with_capacity(CYCLES);
    let before = vm.queue_counters("disk0");
    let started = Instant::now();
    for cycle in 0..CYCLES {
        assert!(
            vm.is_running(),
            "the guest finished after {cycle} cycles: raise LOOPS"
        );
        // Switch 1 of 5 while paused, the rest with I/O in flight.
        let switch_while_paused = cycle % 5 == 4;
        let ioeventfd = cycle % 2 == 1;
        if !switch_while_paused {
            let device = vm.set_ioeventfd("disk0", ioeventfd);
            let expected = if ioeventfd { "ioeventfd" } else { "sync" };
            assert_eq!(device["queues"][0]["notify"], expected, "cycle {cycle}");
        }
        rng.sleep(3000);
        let pause_start = Instant::now();
        assert_eq!(
            vm.call("PUT", "vm.pause", None).0,
            204,
            "cycle {cycle}: pause"
        );
        if switch_while_paused {
            let device = vm.set_ioeventfd("disk0", ioeventfd);
            let why = if ioeventfd {
                "vm-paused"
            } else {
                "ioeventfd-off"
            };
            assert_eq!(device["queues"][0]["reason"], why, "cycle {cycle}");
        }
        rng.sleep(2000);
        assert_eq!(
            vm.call("PUT", "vm.resume", None).0,
            204,
            "cycle {cycle}: resume"
        );
        pauses.push((pause_start, Instant::now()));
        rng.sleep(3000);
    }
    let cycles_took = started.elapsed();
    let after = vm.queue_counters("disk0");
    assert!(
        after["requests"].as_u64() > before["requests"].as_u64(),
        "disk0 did I/O while its notify mode was switched: {before} -> {after}"
    );
    assert_eq!(vm.device("disk0")["queues"][0]["notify"], "ioeventfd");

    // The power button ends blk-verify after the loop each disk is in, then the image checks.
    assert_eq!(vm.call("PUT", "vm.shutdown", None).0, 202);
    let output = vm.finish(Duration::from_secs(300));
    output.assert_exit_code(0);
    let result = output.result("blk-verify");
    assert_eq!(result["status"], "ok", "{output}");
    assert_eq!(result["errors"], "0", "{output}");
    assert_eq!(result["disks"], "2");
    assert_eq!(result["shutdown"], "power-button", "{output}");
    if guest_args.contains("completion=irq") {
        assert_ne!(result["interrupts"], "0", "completions came by interrupt");
    }

    // No request slower than 1 s beyond the time paused around it.
    let max_latency = Duration::from_micros(result["max_lat_us"].parse().unwrap());
    let paused = max_paused_within(&pauses, max_latency);
    assert!(
        max_latency.saturating_sub(paused) <= Duration::from_secs(1),
        "slowest request {max_latency:?}, of which at most {paused:?} paused"
    );

    // Every kick the guest made is in the counters, by one path or the other.
    let queues = exit_queue_counters(&output.stderr);
    assert_eq!(
        queues.len(),
        2,
        "one exit summary per disk queue:\n{output}"
    );
    let field = |map: &std::collections::HashMap<String, String>, key: &str| -> u64 {
        map[key].parse().unwrap()
    };
    let mut host_kicks = 0;
    for (device, _, counters) in &queues {
        host_kicks += field(counters, "kicks_ioeventfd") + field(counters, "kicks_exit")
            - field(counters, "kicks_replayed");
        if device == "disk0" {
            assert!(
                field(counters, "kicks_exit") > 0 && field(counters, "kicks_ioeventfd") > 0,
                "disk0's kicks took both paths: {counters:?}"
            );
        }
    }
    let guest_kicks: u64 = result["kicks"].parse().unwrap();
    assert_eq!(
        host_kicks, guest_kicks,
        "kicks the guest made vs kicks the VMM handled:\n{output}"
    );
    eprintln!(
        "{name}: {CYCLES} cycles in {cycles_took:?}; slowest request {max_latency:?}; \
         {guest_kicks} kicks"
    );
}

#[test]
fn the_paused_window_bound_counts_only_overlapping_pauses() {
    let t = Instant::now();
    let ms = Duration::from_millis;
    let pauses = [
        (t, t + ms(10)),
        (t + ms(50), t + ms(60)),
        (t + ms(500), t + ms(515)),
    ];
    // Two short pauses inside one window outweigh the longer one alone.
    assert_eq!(max_paused_within(&pauses, ms(60)), ms(20));
    assert_eq!(max_paused_within(&pauses, ms(1000)), ms(35));
    assert_eq!(max_paused_within(&pauses, ms(5)), ms(5));
}
