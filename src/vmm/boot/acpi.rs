//! Minimal ACPI tables: RSDP -> XSDT -> {FADT -> DSDT, MADT}. Many kernels (Debian's cloud
//! kernel among them) are built without MP-table parsing and learn their CPUs only from the
//! MADT. The FADT declares a hardware-reduced platform whose sleep-control register is the
//! port at 0x600 (writing SLP_TYP=5|SLP_EN powers off); the DSDT defines `_S5` for that, and
//! the Generic Event Device and power button through which `vm.shutdown` asks the guest to
//! shut down (`devices::acpi`).

use acpi_tables::aml;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use super::BootError;
use crate::vmm::layout;
use crate::vmm::memory::GuestMemoryMmap;

const OEM_ID: &[u8; 6] = b"KICKVM";
const OEM_TABLE_ID: &[u8; 8] = b"KICKVM  ";
const CREATOR_ID: &[u8; 4] = b"KVMM";
const HEADER_LEN: usize = 36;

const FADT_LEN: usize = 276;
const FADT_REVISION: u8 = 6;
const FADT_MINOR_REVISION: u8 = 5;
const FADT_FLAG_HW_REDUCED_ACPI: u32 = 1 << 20;
const FADT_DSDT_OFFSET: usize = 40;
const FADT_FLAGS_OFFSET: usize = 112;
const FADT_MINOR_VERSION_OFFSET: usize = 131;
const FADT_X_DSDT_OFFSET: usize = 140;
const FADT_SLEEP_CONTROL_OFFSET: usize = 244;
const FADT_SLEEP_STATUS_OFFSET: usize = 256;
const FADT_HYPERVISOR_ID_OFFSET: usize = 268;
const GAS_SYSTEM_IO: u8 = 1;
const GAS_ACCESS_BYTE: u8 = 1;

const MADT_PCAT_COMPAT: u32 = 1;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const MADT_LAPIC_ENABLED: u32 = 1;
const ALL_PROCESSORS: u8 = 0xff;

/// `Name (_S5, Package (4) { 5, 0, 0, 0 })`: SLP_TYP 5 for S5, as written to port 0x600.
const DSDT_S5_AML: &[u8] = &[
    0x08, b'_', b'S', b'5', b'_', 0x12, 0x07, 0x04, 0x0a, 0x05, 0x00, 0x00, 0x00,
];

/// The notification a control-method power button sends when pressed (ACPI 6.5, 4.8.3.1).
const POWER_BUTTON_PRESSED: usize = 0x80;

/// `\_SB.PWRB`, a control-method power button, and `\_SB.GED_`, the Generic Event Device
/// whose `_EVT` reads the event register and notifies the button:
///
/// ```text
/// Device (GED_) {
///     Name (_HID, "ACPI0013")
///     Name (_CRS, ResourceTemplate () { Interrupt (Edge, ActiveHigh, Exclusive) { GSI } })
///     OperationRegion (GDST, SystemIO, ACPI_GED_PORT, 1)
///     Field (GDST, ByteAcc, NoLock, WriteAsZeros) { GDAT, 8 }
///     Method (_EVT, 1, Serialized) {
///         Local0 = GDAT
///         If ((Local0 & 1) == 1) { Notify (\_SB.PWRB, 0x80) }
///     }
/// }
/// ```
fn power_button_aml() -> Vec<u8> {
    let zero = aml::ZERO;
    let button_hid = aml::EISAName::new("PNP0C0C");
    let ged_hid = "ACPI0013";
    let interrupt = aml::Interrupt::new(true, true, false, false, layout::ACPI_GED_GSI);
    let resources = aml::ResourceTemplate::new(vec![&interrupt]);
    let port = layout::ACPI_GED_PORT as usize;
    let port_len = layout::ACPI_GED_PORT_LEN as usize;
    let events = aml::Local(0);
    let event_bits = aml::Path::new("GDAT");
    let power_bit: usize = crate::devices::acpi::GED_EVENT_POWER_BUTTON.into();
    let masked = aml::And::new(&zero, &events, &power_bit);
    let button_path = aml::Path::new("\\_SB_.PWRB");
    let notify = aml::Notify::new(&button_path, &POWER_BUTTON_PRESSED);

    let mut bytes = Vec::new();
    // One statement: the AML builders borrow their children, which live until its end.
    aml::Scope::new(
        aml::Path::new("\\_SB_"),
        vec![
            &aml::Device::new(
                aml::Path::new("PWRB"),
                vec![
                    &aml::Name::new(aml::Path::new("_HID"), &button_hid),
                    &aml::Name::new(aml::Path::new("_UID"), &zero),
                ],
            ),
            &aml::Device::new(
                aml::Path::new("GED_"),
                vec![
                    &aml::Name::new(aml::Path::new("_HID"), &ged_hid),
                    &aml::Name::new(aml::Path::new("_UID"), &zero),
                    &aml::Name::new(aml::Path::new("_CRS"), &resources),
                    &aml::OpRegion::new(
                        aml::Path::new("GDST"),
                        aml::OpRegionSpace::SystemIO,
                        &port,
                        &port_len,
                    ),
                    &aml::Field::new(
                        aml::Path::new("GDST"),
                        aml::FieldAccessType::Byte,
                        aml::FieldLockRule::NoLock,
                        aml::FieldUpdateRule::WriteAsZeroes,
                        vec![aml::FieldEntry::Named(*b"GDAT", 8)],
                    ),
                    &aml::Method::new(
                        aml::Path::new("_EVT"),
                        1,
                        true,
                        vec![
                            &aml::Store::new(&events, &event_bits),
                            &aml::If::new(&aml::Equal::new(&masked, &power_bit), vec![&notify]),
                        ],
                    ),
                ],
            ),
        ],
    )
    .to_aml_bytes(&mut bytes);
    bytes
}

fn dsdt() -> Vec<u8> {
    let mut body = DSDT_S5_AML.to_vec();
    body.extend_from_slice(&power_button_aml());
    table(b"DSDT", 2, &body)
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}

/// A table with a standard header; `body` follows the header. The checksum is filled in.
fn table(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = HEADER_LEN + body.len();
    let mut t = Vec::with_capacity(len);
    t.extend_from_slice(signature);
    t.extend_from_slice(&(len as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

fn gas_io_byte(port: u64) -> [u8; 12] {
    let mut gas = [0u8; 12];
    gas[0] = GAS_SYSTEM_IO;
    gas[1] = 8; // register bit width
    gas[3] = GAS_ACCESS_BYTE;
    gas[4..].copy_from_slice(&port.to_le_bytes());
    gas
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut body = vec![0u8; FADT_LEN - HEADER_LEN];
    let at = |offset: usize| offset - HEADER_LEN;
    body[at(FADT_DSDT_OFFSET)..at(FADT_DSDT_OFFSET) + 4]
        .copy_from_slice(&(dsdt_addr as u32).to_le_bytes());
    body[at(FADT_FLAGS_OFFSET)..at(FADT_FLAGS_OFFSET) + 4]
        .copy_from_slice(&FADT_FLAG_HW_REDUCED_ACPI.to_le_bytes());
    body[at(FADT_MINOR_VERSION_OFFSET)] = FADT_MINOR_REVISION;
    body[at(FADT_X_DSDT_OFFSET)..at(FADT_X_DSDT_OFFSET) + 8]
        .copy_from_slice(&dsdt_addr.to_le_bytes());
    body[at(FADT_SLEEP_CONTROL_OFFSET)..at(FADT_SLEEP_CONTROL_OFFSET) + 12]
        .copy_from_slice(&gas_io_byte(layout::ACPI_SHUTDOWN_PORT));
    body[at(FADT_SLEEP_STATUS_OFFSET)..at(FADT_SLEEP_STATUS_OFFSET) + 12]
        .copy_from_slice(&gas_io_byte(layout::ACPI_SHUTDOWN_PORT + 1));
    body[at(FADT_HYPERVISOR_ID_OFFSET)..at(FADT_HYPERVISOR_ID_OFFSET) + 8]
        .copy_from_slice(b"KICKVM  ");
    table(b"FACP", FADT_REVISION, &body)
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(layout::APIC_START as u32).to_le_bytes());
    body.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for apic_id in 0..cpus {
        body.extend_from_slice(&[MADT_LOCAL_APIC, 8, apic_id, apic_id]);
        body.extend_from_slice(&MADT_LAPIC_ENABLED.to_le_bytes());
    }
    // IOAPIC id follows the CPUs' (as in the MP table); its pins are GSIs 0..23.
    body.extend_from_slice(&[MADT_IO_APIC, 12, cpus, 0]);
    body.extend_from_slice(&(layout::IOAPIC_START as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    body.extend_from_slice(&[MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, 0, 0, 1]);
    table(b"APIC", 5, &body)
}

fn rsdp(xsdt_addr: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0); // checksum of the first 20 bytes
    r.extend_from_slice(OEM_ID);
    r.push(2); // revision: ACPI 2.0+, XSDT
    r.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&xsdt_addr.to_le_bytes());
    r.push(0); // extended checksum
    r.extend_from_slice(&[0; 3]);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// The tables as (guest address, bytes), starting with the RSDP at `base`.
pub fn build(base: u64, cpus: u8) -> Vec<(u64, Vec<u8>)> {
    let align = |addr: u64| addr.next_multiple_of(16);
    let rsdp_addr = base;
    let dsdt_addr = align(rsdp_addr + 36);
    let dsdt = dsdt();
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let madt = madt(cpus);
    let xsdt_addr = align(madt_addr + madt.len() as u64);
    let mut xsdt_body = Vec::new();
    xsdt_body.extend_from_slice(&fadt_addr.to_le_bytes());
    xsdt_body.extend_from_slice(&madt_addr.to_le_bytes());
    let xsdt = table(b"XSDT", 1, &xsdt_body);
    vec![
        (rsdp_addr, rsdp(xsdt_addr)),
        (dsdt_addr, dsdt),
        (fadt_addr, fadt),
        (madt_addr, madt),
        (xsdt_addr, xsdt),
    ]
}

/// Writes the tables at ACPI_START; returns the RSDP address for the boot protocol.
pub fn write(mem: &GuestMemoryMmap, cpus: u8) -> Result<u64, BootError> {
    for (addr, bytes) in build(layout::ACPI_START, cpus) {
        debug_assert!(addr + bytes.len() as u64 <= layout::MPTABLE_START);
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(|e| BootError::WriteGuest {
                what: "ACPI tables",
                detail: e.to_string(),
            })?;
    }
    Ok(layout::ACPI_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn every_table_checksums_to_zero_and_has_its_length() {
        let tables = build(layout::ACPI_START, 4);
        let (_, rsdp) = &tables[0];
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        for (_, t) in &tables[1..] {
            assert_eq!(sum(t), 0, "{:?}", std::str::from_utf8(&t[..4]));
            let len = u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, t.len());
        }
    }

    #[test]
    fn xsdt_points_at_fadt_and_madt_and_rsdp_at_xsdt() {
        let tables = build(layout::ACPI_START, 2);
        let find = |sig: &[u8]| tables.iter().find(|(_, t)| &t[..4] == sig).unwrap();
        let (xsdt_addr, xsdt) = find(b"XSDT");
        let rsdp = &tables[0].1;
        assert_eq!(
            u64::from_le_bytes(rsdp[24..32].try_into().unwrap()),
            *xsdt_addr
        );
        let entries: Vec<u64> = xsdt[HEADER_LEN..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(entries, vec![find(b"FACP").0, find(b"APIC").0]);
        let (dsdt_addr, _) = find(b"DSDT");
        let fadt = &find(b"FACP").1;
        assert_eq!(
            u64::from_le_bytes(
                fadt[FADT_X_DSDT_OFFSET..FADT_X_DSDT_OFFSET + 8]
                    .try_into()
                    .unwrap()
            ),
            *dsdt_addr
        );
    }

    #[test]
    fn madt_lists_each_cpu_enabled_with_its_apic_id() {
        let madt = madt(3);
        let lapics: Vec<&[u8]> = madt[HEADER_LEN + 8..].chunks(8).take(3).collect();
        for (id, entry) in lapics.iter().enumerate() {
            assert_eq!(entry[0], MADT_LOCAL_APIC);
            assert_eq!(entry[3] as usize, id);
            assert_eq!(entry[4] & 1, 1);
        }
    }

    #[test]
    fn dsdt_has_the_power_button_and_the_ged_with_its_interrupt_and_register() {
        let dsdt = dsdt();
        let contains = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(contains(b"ACPI0013\0"), "the GED's _HID");
        // EisaId ("PNP0C0C") compressed: 0x41D00C0C as the AML DWord 0x0C0CD041.
        assert!(
            contains(&[0x0c, 0x41, 0xd0, 0x0c, 0x0c]),
            "the power button's _HID"
        );
        let mut interrupt = vec![0x89, 6, 0, 0b0011, 1];
        interrupt.extend_from_slice(&layout::ACPI_GED_GSI.to_le_bytes());
        assert!(
            contains(&interrupt),
            "an edge, active-high interrupt on the GED's GSI"
        );
        let port = (layout::ACPI_GED_PORT as u16).to_le_bytes();
        assert!(
            contains(&[b'G', b'D', b'S', b'T', 0x01, 0x0b, port[0], port[1]]),
            "a SystemIO region at the event register"
        );
        assert!(contains(b"_EVT"));
        assert_eq!(sum(&dsdt), 0);
    }

    #[test]
    fn tables_for_most_cpus_fit_below_the_mp_table() {
        let tables = build(layout::ACPI_START, 254);
        let (addr, last) = tables.last().unwrap();
        assert!(addr + last.len() as u64 <= layout::MPTABLE_START);
    }
}
