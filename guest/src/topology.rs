//! Which CPUs exist: the ACPI MADT if there is ACPI, else the MP table.

use crate::acpi::{self, bytes, checksum_ok, plausible, u16_at, u32_at};
use crate::boot::MAX_CPUS;

pub struct Cpus {
    /// xAPIC ids of the enabled CPUs, in table order.
    pub apic_ids: [u8; MAX_CPUS],
    pub count: usize,
    /// CPUs listed beyond MAX_CPUS (not started).
    pub dropped: usize,
    pub source: &'static str,
}

impl Cpus {
    fn empty(source: &'static str) -> Self {
        Self {
            apic_ids: [0; MAX_CPUS],
            count: 0,
            dropped: 0,
            source,
        }
    }

    fn push(&mut self, apic_id: u32) {
        if apic_id > 0xfe {
            // Needs x2APIC, which this guest does not drive.
            self.dropped += 1;
        } else if self.count < MAX_CPUS {
            self.apic_ids[self.count] = apic_id as u8;
            self.count += 1;
        } else {
            self.dropped += 1;
        }
    }

    pub fn ids(&self) -> &[u8] {
        &self.apic_ids[..self.count]
    }
}

pub fn discover(rsdp_hint: u64) -> Option<Cpus> {
    acpi::find_rsdp(rsdp_hint)
        .and_then(madt_cpus)
        .or_else(mp_table_cpus)
}

fn madt_cpus(rsdp: u64) -> Option<Cpus> {
    let m = acpi::find_table(rsdp, b"APIC")?;
    let mut cpus = Cpus::empty("acpi");
    let enabled = |flags: u32| flags & 1 != 0;
    for (kind, e) in acpi::madt_entries(m) {
        match kind {
            0 if e.len() >= 8 && enabled(u32_at(e, 4)) => cpus.push(e[3] as u32),
            9 if e.len() >= 16 && enabled(u32_at(e, 8)) => cpus.push(u32_at(e, 4)),
            _ => {}
        }
    }
    (cpus.count > 0).then_some(cpus)
}

fn find_mp_floating_pointer() -> Option<u64> {
    let ebda = (u16_at(bytes(0x40E, 2), 0) as u64) << 4;
    let mut areas = [(0u64, 0u64); 3];
    if (0x80000..0xA0000).contains(&ebda) {
        areas[0] = (ebda, ebda + 1024);
    }
    areas[1] = (0x9FC00, 0xA0000);
    areas[2] = (0xF0000, 0x100000);
    areas
        .iter()
        .filter(|(s, e)| e > s)
        .find_map(|&(start, end)| {
            (start..end - 16)
                .step_by(16)
                .find(|&a| bytes(a, 4) == b"_MP_" && checksum_ok(bytes(a, 16)))
        })
}

fn mp_table_cpus() -> Option<Cpus> {
    let pointer = find_mp_floating_pointer()?;
    let config = u32_at(bytes(pointer, 16), 4) as u64;
    if !plausible(config, 44) || bytes(config, 4) != b"PCMP" {
        return None;
    }
    let header = bytes(config, 44);
    let length = u16_at(header, 4) as u64;
    if !plausible(config, length) || !checksum_ok(bytes(config, length as usize)) {
        return None;
    }
    let table = bytes(config, length as usize);
    let entries = u16_at(header, 34);
    let mut cpus = Cpus::empty("mptable");
    let mut off = 44;
    for _ in 0..entries {
        let Some(&kind) = table.get(off) else { break };
        let len = if kind == 0 { 20 } else { 8 };
        if off + len > table.len() {
            break;
        }
        if kind == 0 && table[off + 3] & 1 != 0 {
            cpus.push(table[off + 1] as u32);
        }
        off += len;
    }
    (cpus.count > 0).then_some(cpus)
}
