//! Snapshots: a paused VM written to a directory, and a VM built again from one.
//!
//! `DIR/state.json` holds the format version, what the VM was built with (vCPUs, RAM size,
//! RAM layout), each vCPU's KVM state, the in-kernel irqchip, PIT and clock, the serial port
//! and every PCI device ([`kickvm_virtio::PciSnapshot`]); `DIR/memory` holds guest RAM, region
//! after region, with pages of zeroes left as holes (a fresh 512 MiB guest takes what it
//! touched, not 512 MiB).
//!
//! Restoring takes the same command line as the VM had (as QEMU's `-incoming` does): the
//! devices are attached again from it, and the snapshot refuses a configuration that does not
//! match what it saved. Only state that KVM or the devices cannot rebuild is saved: CPUID, the
//! boot tables and the kernel are not loaded again, because guest RAM already holds them.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::memory::GuestMemoryMmap;
use super::vcpu::VcpuHandle;
use crate::devices::serial::SerialDevice;

/// Bumped whenever `state.json` changes shape; a snapshot of another version is refused.
pub const FORMAT_VERSION: u32 = 1;
const STATE_FILE: &str = "state.json";
const MEMORY_FILE: &str = "memory";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the VM must be paused for a snapshot (vm.pause first)")]
    NotPaused,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a kickvm snapshot: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: snapshot format {found}, this kickvm reads format {FORMAT_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("the snapshot was taken with {what} {saved}, this VM has {now}: restore with the same options")]
    Mismatch {
        what: &'static str,
        saved: String,
        now: String,
    },
    #[error("{path}: guest memory is {found} bytes, the snapshot says {expected}")]
    MemorySize {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("vCPU {vcpu}: {what} failed: {source}")]
    Vcpu {
        vcpu: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {0} did not hand over its state (has it stopped?)")]
    VcpuGone(u8),
    #[error(transparent)]
    Devices(#[from] kickvm_virtio::SnapshotError),
    #[error("{0}")]
    Serial(String),
}

impl SnapshotError {
    /// A problem with what the user asked for (a bad or mismatched snapshot), not with the host.
    pub fn is_config_error(&self) -> bool {
        matches!(
            self,
            SnapshotError::Parse { .. }
                | SnapshotError::Version { .. }
                | SnapshotError::Mismatch { .. }
                | SnapshotError::MemorySize { .. }
                | SnapshotError::Devices(_)
                | SnapshotError::Serial(_)
        ) || matches!(self, SnapshotError::Io { source, .. }
            if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// One vCPU as KVM holds it. CPUID is not saved: the restored VM sets the same from the same
/// options.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// Every MSR in KVM's save list that this vCPU would read.
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

impl VcpuState {
    /// Reads the state of a vCPU that is out of KVM_RUN, with any I/O it exited for completed
    /// (see `Vcpu::complete_pending_exit`).
    pub fn save(fd: &VcpuFd, index: u8, msr_list: &[u32]) -> Result<Self, SnapshotError> {
        let err = |what| {
            move |source| SnapshotError::Vcpu {
                vcpu: index,
                what,
                source,
            }
        };
        Ok(VcpuState {
            mp_state: fd.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?,
            regs: fd.get_regs().map_err(err("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(err("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(err("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(err("KVM_GET_XCRS"))?,
            debugregs: fd.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?,
            lapic: fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?,
            msrs: read_msrs(fd, msr_list),
            events: fd.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// Loads the state into a vCPU that has its CPUID but has not run. The order is KVM's:
    /// the MP state and registers first, the LAPIC before the MSRs that depend on it (the TSC
    /// deadline), pending events last.
    pub fn restore(&self, fd: &VcpuFd, index: u8) -> Result<(), SnapshotError> {
        let err = |what| {
            move |source| SnapshotError::Vcpu {
                vcpu: index,
                what,
                source,
            }
        };
        fd.set_mp_state(self.mp_state)
            .map_err(err("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(err("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(err("KVM_SET_SREGS"))?;
        // SAFETY: the buffer is a whole kvm_xsave as KVM_GET_XSAVE filled it (the legacy 4 KiB
        // region, which is all KVM_SET_XSAVE reads); nothing in it is a pointer.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(err("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(err("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(err("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(err("KVM_SET_LAPIC"))?;
        for chunk in self.msrs.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
            let msrs = Msrs::from_entries(chunk).expect("a chunk fits a kvm_msrs");
            let set = fd.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
            if set != chunk.len() {
                log::warn!(
                    "vCPU {index}: KVM took {set} of {} saved MSRs; MSR {:#x} was refused",
                    chunk.len(),
                    chunk[set].index
                );
            }
        }
        fd.set_vcpu_events(&self.events)
            .map_err(err("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// MSRs one at a time: KVM_GET_MSRS stops at the first it refuses, and which it refuses
/// depends on the CPU model (PVM refuses several in its own list).
fn read_msrs(fd: &VcpuFd, msr_list: &[u32]) -> Vec<kvm_msr_entry> {
    let mut saved = Vec::with_capacity(msr_list.len());
    for &index in msr_list {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .expect("one entry fits a kvm_msrs");
        if let Ok(1) = fd.get_msrs(&mut msrs) {
            saved.push(msrs.as_slice()[0]);
        }
    }
    saved
}

/// The VM-wide in-kernel state: PICs, IOAPIC, PIT and kvmclock.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl VmState {
    pub fn save(vm: &VmFd) -> Result<Self, SnapshotError> {
        let err = |what| move |source| SnapshotError::Kvm { what, source };
        let chip = |chip_id| {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip)
                .map_err(err("KVM_GET_IRQCHIP"))
                .map(|()| chip)
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(err("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(err("KVM_GET_CLOCK"))?,
        })
    }

    pub fn restore(&self, vm: &VmFd) -> Result<(), SnapshotError> {
        let err = |what| move |source| SnapshotError::Kvm { what, source };
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(chip).map_err(err("KVM_SET_IRQCHIP"))?;
        }
        vm.set_pit2(&self.pit).map_err(err("KVM_SET_PIT2"))?;
        // The flags KVM_GET_CLOCK reports (TSC stable, realtime) are not inputs of
        // KVM_SET_CLOCK: the guest's clock goes on from the saved value.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(err("KVM_SET_CLOCK"))?;
        Ok(())
    }
}

/// The 16550's registers and receive FIFO (vm-superio's `SerialState`, which is not serde).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SerialSnapshot {
    pub registers: [u8; 9],
    pub in_buffer: Vec<u8>,
}

/// A RAM region: where it is and how long, so a restore on another layout is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRegion {
    pub guest_address: u64,
    pub size: u64,
}

/// Everything in `state.json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub format: u32,
    pub kickvm_version: String,
    pub cpus: u8,
    pub ram: Vec<RamRegion>,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: Option<SerialSnapshot>,
    pub devices: kickvm_virtio::PciSnapshot,
}

impl Snapshot {
    /// Writes `state.json` and the memory file into `dir` (created if missing; an existing
    /// snapshot there is replaced, the state file last, so a half-written snapshot is never
    /// taken for a whole one).
    pub fn write(&self, dir: &Path, memory: &GuestMemoryMmap) -> Result<(), SnapshotError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SnapshotError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let state_path = dir.join(STATE_FILE);
        match std::fs::remove_file(&state_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&state_path)(e)),
            _ => {}
        }
        let memory_path = dir.join(MEMORY_FILE);
        write_memory(&memory_path, memory).map_err(io(&memory_path))?;
        let json = serde_json::to_vec(self).expect("snapshot state serialises");
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let mut file = File::create(&tmp).map_err(io(&tmp))?;
        file.write_all(&json).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &state_path).map_err(io(&state_path))?;
        Ok(())
    }

    /// Reads `state.json` from `dir`, refusing another format version.
    pub fn read(dir: &Path) -> Result<Self, SnapshotError> {
        let path = dir.join(STATE_FILE);
        let bytes = std::fs::read(&path).map_err(|source| SnapshotError::Io {
            path: path.clone(),
            source,
        })?;
        #[derive(Deserialize)]
        struct Header {
            format: u32,
        }
        let header: Header =
            serde_json::from_slice(&bytes).map_err(|source| SnapshotError::Parse {
                path: path.clone(),
                source,
            })?;
        if header.format != FORMAT_VERSION {
            return Err(SnapshotError::Version {
                path,
                found: header.format,
            });
        }
        serde_json::from_slice(&bytes).map_err(|source| SnapshotError::Parse { path, source })
    }

    /// Checks the snapshot against the VM being built from the command line.
    pub fn check_matches(&self, cpus: u8, memory: &GuestMemoryMmap) -> Result<(), SnapshotError> {
        if self.cpus != cpus || self.vcpus.len() != usize::from(cpus) {
            return Err(SnapshotError::Mismatch {
                what: "--cpus",
                saved: self.cpus.to_string(),
                now: cpus.to_string(),
            });
        }
        let ram = ram_regions(memory);
        if self.ram != ram {
            let total = |r: &[RamRegion]| r.iter().map(|r| r.size).sum::<u64>() >> 20;
            return Err(SnapshotError::Mismatch {
                what: "--memory",
                saved: format!("{}M", total(&self.ram)),
                now: format!("{}M", total(&ram)),
            });
        }
        Ok(())
    }

    /// Fills guest RAM from `dir`'s memory file.
    pub fn load_memory(dir: &Path, memory: &GuestMemoryMmap) -> Result<(), SnapshotError> {
        let path = dir.join(MEMORY_FILE);
        read_memory(&path, memory)
    }
}

/// What a snapshot is read from: the parts of a running VM, paused.
pub struct Sources<'a> {
    pub vm_fd: &'a VmFd,
    pub vcpus: &'a [VcpuHandle],
    pub memory: &'a GuestMemoryMmap,
    pub serial: Option<&'a Mutex<SerialDevice>>,
    pub pci: &'a kickvm_virtio::PciDevices,
}

/// Writes a snapshot of the paused VM into `dir`. The devices are asked first: one that
/// cannot be saved (a vhost-user backend) refuses before anything is written.
pub fn capture(sources: &Sources, dir: &Path) -> Result<(), SnapshotError> {
    let devices = sources.pci.snapshot()?;
    let vcpus = sources
        .vcpus
        .iter()
        .map(VcpuHandle::save_state)
        .collect::<Result<Vec<_>, _>>()?;
    let snapshot = Snapshot {
        format: FORMAT_VERSION,
        kickvm_version: env!("CARGO_PKG_VERSION").to_string(),
        cpus: vcpus.len() as u8,
        ram: ram_regions(sources.memory),
        vm: VmState::save(sources.vm_fd)?,
        vcpus,
        serial: sources.serial.map(|s| s.lock().unwrap().snapshot()),
        devices,
    };
    snapshot.write(dir, sources.memory)
}

pub fn ram_regions(memory: &GuestMemoryMmap) -> Vec<RamRegion> {
    memory
        .iter()
        .map(|r| RamRegion {
            guest_address: r.start_addr().0,
            size: r.len(),
        })
        .collect()
}

/// Guest pages are compared and written in chunks of this size; zero chunks become holes.
const CHUNK: usize = 64 << 10;

/// Host-side view of a whole region. Every region is one live mapping owned by `memory`.
fn region_bytes(region: &vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>) -> &[u8] {
    // SAFETY: the mapping is `region.len()` bytes long and lives as long as `memory`. The
    // vCPUs are parked and the devices paused while a snapshot is written, and no vCPU has
    // run yet when one is read back, so nothing writes the range while the slice exists.
    unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) }
}

fn write_memory(path: &Path, memory: &GuestMemoryMmap) -> std::io::Result<()> {
    let mut file = File::create(path)?;
    let pagemap = File::open("/proc/self/pagemap").ok();
    let mut offset = 0u64;
    for region in memory.iter() {
        let bytes = region_bytes(region);
        let backed = pagemap
            .as_ref()
            .and_then(|pagemap| backed_chunks(pagemap, bytes).ok());
        for (index, chunk) in bytes.chunks(CHUNK).enumerate() {
            // A chunk with no page in RAM or swap was never written: it reads as zeroes, so
            // it need not be read at all (reading 2 GiB of untouched RAM took ~1.3 s).
            let maybe_data = backed.as_ref().is_none_or(|b| b[index]);
            if maybe_data && chunk.iter().any(|&b| b != 0) {
                file.seek(SeekFrom::Start(offset))?;
                file.write_all(chunk)?;
            }
            offset += chunk.len() as u64;
        }
    }
    file.set_len(offset)?;
    file.sync_all()
}

/// For each [`CHUNK`] of `bytes`, whether any of its pages is present or swapped out, from
/// this process's page map (bit 63 present, bit 62 swapped; readable without privileges).
fn backed_chunks(pagemap: &File, bytes: &[u8]) -> std::io::Result<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    const PAGE: usize = 4096;
    const PRESENT_OR_SWAPPED: u64 = 3 << 62;
    let first_page = bytes.as_ptr() as usize / PAGE;
    let pages = bytes.len().div_ceil(PAGE);
    let mut entries = vec![0u8; pages * 8];
    pagemap.read_exact_at(&mut entries, (first_page * 8) as u64)?;
    Ok(entries
        .chunks(CHUNK / PAGE * 8)
        .map(|chunk| {
            chunk
                .chunks_exact(8)
                .any(|e| u64::from_ne_bytes(e.try_into().unwrap()) & PRESENT_OR_SWAPPED != 0)
        })
        .collect())
}

fn read_memory(path: &Path, memory: &GuestMemoryMmap) -> Result<(), SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let expected: u64 = memory.iter().map(|r| r.len()).sum();
    let found = file.metadata().map_err(io)?.len();
    if found != expected {
        return Err(SnapshotError::MemorySize {
            path: path.to_path_buf(),
            expected,
            found,
        });
    }
    let mut offset = 0u64;
    for region in memory.iter() {
        let len = region.len();
        let mut at = 0u64;
        while at < len {
            // Holes are zero pages, which fresh guest RAM already is: skip them untouched.
            let Some(data) = seek_data(&file, offset + at).map_err(io)? else {
                break;
            };
            if data >= offset + len {
                break;
            }
            let hole = seek_hole(&file, data).map_err(io)?.min(offset + len);
            let start = (data - offset) as usize;
            let end = (hole - offset) as usize;
            // SAFETY: as in `region_bytes`; this range of the mapping is written only here,
            // before any vCPU or device thread runs.
            let dst =
                unsafe { std::slice::from_raw_parts_mut(region.as_ptr().add(start), end - start) };
            file.seek(SeekFrom::Start(data)).map_err(io)?;
            file.read_exact(dst).map_err(io)?;
            at = hole - offset;
        }
        offset += len;
    }
    Ok(())
}

fn seek_data(file: &File, from: u64) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek on a descriptor we own; it does not touch memory.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, libc::SEEK_DATA) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        // ENXIO: no data at or after `from`.
        return if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    Ok(Some(rc as u64))
}

fn seek_hole(file: &File, from: u64) -> std::io::Result<u64> {
    // SAFETY: as in `seek_data`.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, libc::SEEK_HOLE) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn memory() -> GuestMemoryMmap {
        super::super::memory::create_guest_memory(32 << 20, false).unwrap()
    }

    #[test]
    fn memory_round_trips_through_a_sparse_file() {
        let dir = tempdir();
        let path = dir.join(MEMORY_FILE);
        let saved = memory();
        saved
            .write_obj(0x1234_5678u32, GuestAddress(0x1000))
            .unwrap();
        saved
            .write_obj(0xdead_beefu32, GuestAddress((32 << 20) - 4))
            .unwrap();
        write_memory(&path, &saved).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 32 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "{} blocks: not sparse",
            meta.blocks()
        );

        let restored = memory();
        restored.write_obj(0xffu8, GuestAddress(0x10_0000)).unwrap();
        read_memory(&path, &restored).unwrap();
        assert_eq!(
            restored.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0x1234_5678
        );
        let end = GuestAddress((32 << 20) - 4);
        assert_eq!(restored.read_obj::<u32>(end).unwrap(), 0xdead_beef);
        // Fresh RAM is zero where the snapshot has holes; this byte was written only to see
        // that holes are skipped, not read.
        assert_eq!(
            restored.read_obj::<u8>(GuestAddress(0x10_0000)).unwrap(),
            0xff
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_memory_file_of_another_size_is_refused() {
        let dir = tempdir();
        let path = dir.join(MEMORY_FILE);
        write_memory(&path, &memory()).unwrap();
        let bigger = super::super::memory::create_guest_memory(64 << 20, false).unwrap();
        let err = read_memory(&path, &bigger).unwrap_err();
        assert!(matches!(err, SnapshotError::MemorySize { .. }), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_missing_or_foreign_state_file_is_a_configuration_error() {
        let dir = tempdir();
        let err = Snapshot::read(&dir).unwrap_err();
        assert!(err.is_config_error(), "{err}");
        std::fs::write(dir.join(STATE_FILE), b"{\"format\": 99}").unwrap();
        let err = Snapshot::read(&dir).unwrap_err();
        assert!(
            matches!(err, SnapshotError::Version { found: 99, .. }),
            "{err}"
        );
        std::fs::write(dir.join(STATE_FILE), b"not json").unwrap();
        let err = Snapshot::read(&dir).unwrap_err();
        assert!(matches!(err, SnapshotError::Parse { .. }), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "kickvm-snapshot-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
