//! The test guest's blk-verify pattern (guest/README.md), recomputed on the host so tests can
//! check what a run left in an image file. Use with `mod blk_pattern;` in a test crate.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::Path;

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
pub const SECTOR: usize = 512;
const EXTENT_SECTORS: u64 = 128;
/// Disks up to this many 64 KiB extents are written whole.
const ALL_EXTENTS_UP_TO: u64 = 1024;

/// Sector `sector` of disk `disk` (index among virtio-blk functions in PCI order) after
/// `blk-verify seed=SEED` (with `loops=L`, the seed is SEED + L - 1).
pub fn sector(seed: u64, disk: u64, sector: u64) -> [u8; SECTOR] {
    let mut state = seed.wrapping_mul(GOLDEN) ^ (disk << 56) ^ sector;
    let mut out = [0u8; SECTOR];
    let mut checksum = 0u64;
    for i in 0..63 {
        state = state.wrapping_add(GOLDEN);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        out[i * 8..i * 8 + 8].copy_from_slice(&z.to_le_bytes());
        checksum ^= z;
    }
    out[504..].copy_from_slice(&checksum.to_le_bytes());
    out
}

/// The sectors blk-verify writes on a disk of `sectors` sectors, in order.
pub fn written_sectors(sectors: u64) -> Vec<u64> {
    let extents = sectors.div_ceil(EXTENT_SECTORS);
    let stride = if extents <= ALL_EXTENTS_UP_TO {
        1
    } else {
        extents.div_ceil(ALL_EXTENTS_UP_TO)
    };
    (0..extents)
        .filter(|e| e % stride == 0 || *e == extents - 1)
        .flat_map(|e| e * EXTENT_SECTORS..((e + 1) * EXTENT_SECTORS).min(sectors))
        .collect()
}

/// Panics unless the image holds the pattern for (`seed`, `disk`) in every sector blk-verify
/// writes, and every other sector is all `untouched` bytes.
pub fn assert_image(path: &Path, seed: u64, disk: u64, untouched: u8) {
    let data = std::fs::read(path)
        .unwrap_or_else(|e| panic!("reading the disk image {}: {e}", path.display()));
    let sectors = (data.len() / SECTOR) as u64;
    let written = written_sectors(sectors);
    let mut is_written = vec![false; sectors as usize];
    let mut differ = Vec::new();
    for &s in &written {
        is_written[s as usize] = true;
        let at = s as usize * SECTOR;
        if data[at..at + SECTOR] != sector(seed, disk, s) {
            differ.push(s);
        }
    }
    assert!(
        differ.is_empty(),
        "{}: {} of {} written sectors differ from the pattern (first: {:?})",
        path.display(),
        differ.len(),
        written.len(),
        &differ[..differ.len().min(8)]
    );
    let stray: Vec<usize> = (0..sectors as usize)
        .filter(|&s| !is_written[s])
        .filter(|&s| {
            data[s * SECTOR..(s + 1) * SECTOR]
                .iter()
                .any(|&b| b != untouched)
        })
        .collect();
    assert!(
        stray.is_empty(),
        "{}: {} sectors outside the pattern were changed (first: {:?})",
        path.display(),
        stray.len(),
        &stray[..stray.len().min(8)]
    );
}

#[test]
fn blk_pattern_checksum_word_is_the_xor_of_the_others() {
    let s = sector(7, 1, 12345);
    let words: Vec<u64> = s
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(words[..63].iter().fold(0, |a, w| a ^ w), words[63]);
    assert_ne!(sector(7, 1, 12345), sector(7, 2, 12345));
    assert_ne!(sector(7, 1, 12345), sector(8, 1, 12345));
}

#[test]
fn blk_pattern_large_disks_get_a_strided_subset_with_the_last_extent() {
    assert_eq!(written_sectors(1000).len(), 1000);
    let big = written_sectors(2048 * 128 + 5);
    // 2049 extents, stride 3: extents 0, 3, ..., 2046 (683 of them), then the short last one.
    assert_eq!(big.len(), 683 * 128 + 5);
    assert_eq!(*big.last().unwrap(), 2048 * 128 + 4);
}
