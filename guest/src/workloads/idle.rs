//! `workload=idle [secs=N]`: does nothing until the ACPI power button is
//! pressed (the host's `vm.shutdown`), then powers off; with `secs=N` it gives
//! up after N seconds. `RESULT workload=idle status=ok ended=power-button|timeout
//! ms=N`; without a power button and without `secs`, it fails at once
//! (`reason=no-power-button`), since nothing could end it.

use crate::{power_button, println, tsc, x86, Boot};

pub fn run(boot: &Boot) -> bool {
    let secs = match boot.cmdline.number("secs", 0) {
        Ok(s) => s,
        Err(_) => {
            println!("RESULT workload=idle status=fail reason=bad-argument detail=secs");
            return false;
        }
    };
    if secs == 0 && !power_button::armed() {
        println!("RESULT workload=idle status=fail reason=no-power-button");
        return false;
    }
    println!(
        "IDLE power_button={}",
        if power_button::armed() {
            "acpi-ged"
        } else {
            "none"
        }
    );
    let start = tsc::now_ns();
    let limit_ns = secs.saturating_mul(1_000_000_000);
    let ended = loop {
        if power_button::pressed() {
            break "power-button";
        }
        if secs != 0 && tsc::now_ns() - start >= limit_ns {
            break "timeout";
        }
        x86::pause();
    };
    println!(
        "RESULT workload=idle status=ok ended={} ms={}",
        ended,
        (tsc::now_ns() - start) / 1_000_000
    );
    true
}
