//! The PVH `hvm_start_info` block: command line, memory map, RSDP.

use crate::x86::phys_slice;

const MAGIC: u32 = 0x336e_c578;
pub const MEMMAP_TYPE_RAM: u32 = 1;

#[repr(C)]
struct RawStartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

#[derive(Clone, Copy)]
#[repr(C)]
pub struct MemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
    pub reserved: u32,
}

pub struct StartInfo {
    pub cmdline: &'static str,
    pub rsdp_paddr: u64,
    pub memmap: &'static [MemmapEntry],
}

/// Longest command line read; a longer one is cut here.
const CMDLINE_MAX: usize = 4096;

impl StartInfo {
    /// Reads the block the loader left at `paddr`; `None` if it is not one.
    pub fn read(paddr: u64) -> Option<StartInfo> {
        if paddr == 0 {
            return None;
        }
        // SAFETY: the loader put the block at `paddr` in identity-mapped RAM.
        let raw = unsafe { &*(paddr as *const RawStartInfo) };
        if raw.magic != MAGIC {
            return None;
        }
        let cmdline = if raw.cmdline_paddr == 0 {
            ""
        } else {
            c_string(raw.cmdline_paddr)
        };
        let memmap = if raw.version >= 1 && raw.memmap_paddr != 0 {
            // SAFETY: version >= 1 blocks carry `memmap_entries` entries at
            // `memmap_paddr`, in RAM the loader reserved for them.
            unsafe {
                core::slice::from_raw_parts(
                    raw.memmap_paddr as *const MemmapEntry,
                    raw.memmap_entries as usize,
                )
            }
        } else {
            &[]
        };
        Some(StartInfo {
            cmdline,
            rsdp_paddr: raw.rsdp_paddr,
            memmap,
        })
    }
}

fn c_string(paddr: u64) -> &'static str {
    // SAFETY: the command line is a NUL-terminated string in RAM; reading is
    // bounded by CMDLINE_MAX.
    let bytes = unsafe { phys_slice(paddr, CMDLINE_MAX) };
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(CMDLINE_MAX);
    match core::str::from_utf8(&bytes[..len]) {
        Ok(s) => s,
        Err(e) => core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
    }
}

/// The guest command line: space-separated `key=value` words.
#[derive(Clone, Copy)]
pub struct Cmdline(pub &'static str);

impl Cmdline {
    /// The value of the last `key=value` word with this key.
    pub fn get(&self, key: &str) -> Option<&'static str> {
        self.0
            .split_ascii_whitespace()
            .filter_map(|word| word.split_once('='))
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
            .next_back()
    }

    pub fn get_or(&self, key: &str, default: &'static str) -> &'static str {
        self.get(key).unwrap_or(default)
    }

    /// A number (decimal, or hex with 0x, optional k/m/g suffix);
    /// `Err(value)` if present but not a number.
    pub fn number(&self, key: &str, default: u64) -> Result<u64, &'static str> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => parse_number(v).ok_or(v),
        }
    }
}

pub fn parse_number(s: &str) -> Option<u64> {
    let (digits, scale) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1u64 << 10),
        b'm' | b'M' => (&s[..s.len() - 1], 1 << 20),
        b'g' | b'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let value = if let Some(hex) = digits.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).ok()?
    } else {
        digits.parse::<u64>().ok()?
    };
    value.checked_mul(scale)
}
