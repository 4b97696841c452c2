//! `workload=info`: what the guest sees of its machine.

use crate::{println, tsc, Boot};

pub fn run(boot: &Boot) -> bool {
    let ram_bytes: u64 = boot
        .memmap
        .iter()
        .filter(|e| e.kind == crate::start_info::MEMMAP_TYPE_RAM)
        .map(|e| e.size)
        .sum();
    let mem_mib = (ram_bytes + (1 << 19)) >> 20;
    let ok = boot.aps_all_started && !boot.memmap.is_empty();
    println!(
        "RESULT workload=info status={} cpus={} cpus_started={} mem_mib={} mem_kib={} tsc_khz={} tsc_source={} cpu_table={} power_button={}",
        if ok { "ok" } else { "fail" },
        boot.cpus_listed,
        boot.cpus_started,
        mem_mib,
        ram_bytes >> 10,
        tsc::khz(),
        boot.tsc_source.name(),
        boot.cpu_source,
        if boot.power_button_gsi.is_some() { "acpi-ged" } else { "none" },
    );
    ok
}
