//! Recognising image formats other than raw by their headers. kickvm serves raw images only;
//! handed a qcow2 (or VMDK, VHDX, ...) file, it would show the guest the container's metadata
//! as its disk, and the guest's first write to "sector 0" would destroy the image. So such a
//! file is refused unless the user declares it raw (`format=raw`: a raw disk whose guest happens
//! to have written one of these headers at its start).

/// Bytes of the image's start the check needs (the VDI signature is at 0x40).
pub const PROBE_BYTES: usize = 512;

/// (name, offset, magic). A header is one of these formats when its bytes at `offset` are
/// `magic`; the first match names it.
const SIGNATURES: &[(&str, usize, &[u8])] = &[
    ("qcow2", 0, b"QFI\xfb\x00\x00\x00\x02"),
    ("qcow2", 0, b"QFI\xfb\x00\x00\x00\x03"),
    ("qcow", 0, b"QFI\xfb\x00\x00\x00\x01"),
    ("QED", 0, b"QED\x00"),
    ("VMDK", 0, b"KDMV"),
    ("VMDK descriptor", 0, b"# Disk DescriptorFile"),
    ("VHDX", 0, b"vhdxfile"),
    // A dynamic VHD starts with a copy of its footer; a fixed one is raw data plus a footer
    // at the end, which serving as raw exposes (as one extra sector) but does not corrupt.
    ("dynamic VHD", 0, b"conectix"),
    ("VDI", 0x40, b"\x7f\x10\xda\xbe"),
    ("LUKS", 0, b"LUKS\xba\xbe"),
    ("Parallels", 0, b"WithoutFreeSpace"),
    ("Parallels", 0, b"WithouFreSpacExt"),
];

/// The name of the non-raw format `header` (an image's first bytes, up to [`PROBE_BYTES`])
/// starts with, if any.
pub fn foreign_format(header: &[u8]) -> Option<&'static str> {
    SIGNATURES
        .iter()
        .find(|(_, offset, magic)| header.get(*offset..offset + magic.len()) == Some(magic))
        .map(|&(name, _, _)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_with(offset: usize, magic: &[u8]) -> Vec<u8> {
        let mut header = vec![0u8; PROBE_BYTES];
        header[offset..offset + magic.len()].copy_from_slice(magic);
        header
    }

    #[test]
    fn each_container_format_is_named_by_its_header() {
        for (offset, magic, name) in [
            (0, &b"QFI\xfb\x00\x00\x00\x03"[..], "qcow2"),
            (0, b"QFI\xfb\x00\x00\x00\x02", "qcow2"),
            (0, b"QFI\xfb\x00\x00\x00\x01", "qcow"),
            (0, b"QED\x00", "QED"),
            (0, b"KDMV", "VMDK"),
            (0, b"vhdxfile", "VHDX"),
            (0, b"conectix", "dynamic VHD"),
            (0x40, b"\x7f\x10\xda\xbe", "VDI"),
            (0, b"LUKS\xba\xbe", "LUKS"),
        ] {
            assert_eq!(foreign_format(&header_with(offset, magic)), Some(name));
        }
    }

    #[test]
    fn raw_data_is_not_mistaken_for_a_format() {
        assert_eq!(foreign_format(&[0u8; PROBE_BYTES]), None);
        // An MBR, a short file, a header that only starts like qcow2, the VDI magic too early.
        let mut mbr = vec![0u8; PROBE_BYTES];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        assert_eq!(foreign_format(&mbr), None);
        assert_eq!(foreign_format(b"QFI"), None);
        assert_eq!(foreign_format(b"QFI\xfb\x00\x00\x00\x09"), None);
        assert_eq!(foreign_format(&header_with(0, b"\x7f\x10\xda\xbe")), None);
    }
}
