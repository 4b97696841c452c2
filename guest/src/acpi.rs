//! Finding ACPI tables: the RSDP (from the boot protocol or the BIOS area), the
//! XSDT or RSDT it points at, and the tables listed there.

use crate::x86::phys_slice;

pub fn bytes(addr: u64, len: usize) -> &'static [u8] {
    // SAFETY: firmware tables live in identity-mapped low memory and are not
    // written while the guest reads them.
    unsafe { phys_slice(addr, len) }
}

pub fn checksum_ok(data: &[u8]) -> bool {
    data.iter().fold(0u8, |a, &b| a.wrapping_add(b)) == 0
}

pub fn u16_at(d: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([d[off], d[off + 1]])
}

pub fn u32_at(d: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([d[off], d[off + 1], d[off + 2], d[off + 3]])
}

pub fn u64_at(d: &[u8], off: usize) -> u64 {
    u32_at(d, off) as u64 | (u32_at(d, off + 4) as u64) << 32
}

/// Tables must lie in the identity map and be of a sane size.
pub fn plausible(addr: u64, len: u64) -> bool {
    addr != 0 && (8..(1 << 20)).contains(&len) && addr + len < (1 << 32)
}

pub fn find_rsdp(hint: u64) -> Option<u64> {
    if hint != 0 && plausible(hint, 20) && bytes(hint, 8) == b"RSD PTR " {
        return Some(hint);
    }
    (0xE0000..0x100000u64)
        .step_by(16)
        .find(|&a| bytes(a, 8) == b"RSD PTR " && checksum_ok(bytes(a, 20)))
}

/// The whole table at `addr` (header included), if it is plausible.
fn table_at(addr: u64) -> Option<&'static [u8]> {
    if !plausible(addr, 36) {
        return None;
    }
    let len = u32_at(bytes(addr, 8), 4) as u64;
    plausible(addr, len).then(|| bytes(addr, len as usize))
}

/// The first table with `signature` that the root table lists.
pub fn find_table(rsdp: u64, signature: &[u8; 4]) -> Option<&'static [u8]> {
    let r = bytes(rsdp, 36);
    let revision = r[15];
    let (root, entry_size) = if revision >= 2 && u64_at(r, 24) != 0 {
        (u64_at(r, 24), 8)
    } else {
        (u32_at(r, 16) as u64, 4)
    };
    let root_table = table_at(root)?;
    (36..root_table.len())
        .step_by(entry_size)
        .filter(|off| off + entry_size <= root_table.len())
        .map(|off| {
            if entry_size == 8 {
                u64_at(root_table, off)
            } else {
                u32_at(root_table, off) as u64
            }
        })
        .filter_map(table_at)
        .find(|t| &t[..4] == signature)
}

/// The DSDT the FADT names (X_DSDT when set, else DSDT).
pub fn find_dsdt(rsdp: u64) -> Option<&'static [u8]> {
    let fadt = find_table(rsdp, b"FACP")?;
    let x_dsdt = if fadt.len() >= 148 {
        u64_at(fadt, 140)
    } else {
        0
    };
    let dsdt = if x_dsdt != 0 {
        x_dsdt
    } else if fadt.len() >= 44 {
        u32_at(fadt, 40) as u64
    } else {
        return None;
    };
    table_at(dsdt).filter(|t| &t[..4] == b"DSDT")
}

/// The MADT's interrupt controller structures as (type, whole entry), in table order; a
/// malformed length ends the walk.
pub fn madt_entries(madt: &'static [u8]) -> impl Iterator<Item = (u8, &'static [u8])> {
    let mut off = 44;
    core::iter::from_fn(move || {
        let header = madt.get(off..off + 2)?;
        let (kind, len) = (header[0], header[1] as usize);
        let entry = madt.get(off..off + len).filter(|_| len >= 2)?;
        off += len;
        Some((kind, entry))
    })
}
