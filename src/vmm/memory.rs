//! Guest RAM: anonymous, lazily-populated mappings (MAP_NORESERVE) registered with KVM, with
//! transparent huge pages asked for.
//! Nothing here touches guest pages; the kernel faults them in as the guest (or the loader)
//! first writes them. When another process must reach guest memory (a vhost-user backend) it
//! is a memfd mapped shared instead, passed to that process by file descriptor.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout;

pub use kickvm_virtio::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {size_mib} MiB of guest memory: {source}")]
    Map {
        size_mib: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot create the shared guest memory file: {0}")]
    SharedFile(std::io::Error),
    #[error("KVM refused guest memory slot {slot}: {source}")]
    RegisterSlot {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

/// Maps `mem_size` bytes of guest RAM laid out around the 32-bit PCI hole; `shared`: backed by
/// one memfd (sealed against shrinking), each region at its offset in it.
pub fn create_guest_memory(mem_size: u64, shared: bool) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges = layout::ram_ranges(mem_size);
    let map_err = |source| MemoryError::Map {
        size_mib: mem_size >> 20,
        source,
    };
    if !shared {
        let ranges: Vec<(GuestAddress, usize)> = ranges
            .into_iter()
            .map(|(start, len)| (GuestAddress(start), len as usize))
            .collect();
        let memory = GuestMemoryMmap::from_ranges(&ranges).map_err(map_err)?;
        advise_huge_pages(&memory);
        return Ok(memory);
    }
    let file = Arc::new(shared_memory_file(mem_size).map_err(MemoryError::SharedFile)?);
    let mut offset = 0u64;
    let regions: Vec<_> = ranges
        .into_iter()
        .map(|(start, len)| {
            let region = (
                GuestAddress(start),
                len as usize,
                Some(FileOffset::from_arc(file.clone(), offset)),
            );
            offset += len;
            region
        })
        .collect();
    GuestMemoryMmap::from_ranges_with_files(&regions).map_err(map_err)
}

/// Asks for transparent huge pages on anonymous guest RAM (hosts with THP in `madvise` mode
/// give them only when asked, as QEMU and cloud-hypervisor do): one TLB entry then covers 2 MiB
/// of guest memory for the guest's own accesses (a two-dimensional page walk under EPT/NPT) and
/// for the device threads copying into it. Advice only: a host without THP keeps 4 KiB pages.
fn advise_huge_pages(memory: &GuestMemoryMmap) {
    for region in memory.iter() {
        // SAFETY: madvise only changes how the kernel backs exactly this live mapping, which
        // `memory` owns; MADV_HUGEPAGE does not change its contents.
        let rc = unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        if rc != 0 {
            log::debug!(
                "guest RAM keeps small pages: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

fn shared_memory_file(size: u64) -> std::io::Result<File> {
    // SAFETY: the name is a NUL-terminated string; memfd_create has no other preconditions.
    let fd = unsafe {
        libc::memfd_create(
            c"kickvm-guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create just returned this descriptor, which nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    // Neither kickvm nor the backend may shrink it under the other's mappings.
    // SAFETY: fcntl on a descriptor we own, with an integer argument.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// Gives every RAM region its own KVM memory slot, numbered from 0.
pub fn register_with_kvm(vm: &VmFd, memory: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in memory.iter().enumerate() {
        let slot = slot as u32;
        let kvm_region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the host range belongs to `memory`, which the caller keeps alive for as long
        // as the VM exists (the Vm owns both), and the slot covers exactly that mapping.
        unsafe { vm.set_user_memory_region(kvm_region) }
            .map_err(|source| MemoryError::RegisterSlot { slot, source })?;
    }
    Ok(())
}

/// Bytes of guest RAM resident in host memory (pages the guest or the loader touched), by
/// `mincore(2)` over every region. Reported at exit so the VMM's own overhead, peak RSS minus
/// this, can be measured.
pub fn resident_bytes(memory: &GuestMemoryMmap) -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize;
    let mut vec = Vec::new();
    let mut resident = 0u64;
    for region in memory.iter() {
        let len = region.len() as usize;
        vec.resize(len.div_ceil(page), 0u8);
        // SAFETY: the range is exactly one live mapping owned by `memory`, and `vec` has one
        // byte per page of it, as mincore requires.
        let rc = unsafe { libc::mincore(region.as_ptr().cast(), len, vec.as_mut_ptr()) };
        if rc == 0 {
            resident += vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * page as u64;
        }
    }
    resident
}

/// This process's peak resident set (VmHWM), which, unlike `ru_maxrss`, starts at exec and so
/// does not include whatever the launching process had mapped before it.
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The VmFlags line of the mapping that starts at `addr`, from /proc/self/smaps.
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{addr:x}-");
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
        assert!(lines.next().is_some(), "no mapping at {start}");
        lines
            .find(|l| l.starts_with("VmFlags:"))
            .unwrap()
            .to_string()
    }

    #[test]
    fn anonymous_guest_ram_asks_for_huge_pages_and_shared_ram_is_a_shared_mapping() {
        let memory = create_guest_memory(64 << 20, false).unwrap();
        let region = memory.iter().next().unwrap();
        let flags = vm_flags(region.as_ptr() as usize);
        assert!(flags.contains(" hg"), "{flags}");

        let shared = create_guest_memory(64 << 20, true).unwrap();
        let region = shared.iter().next().unwrap();
        let flags = vm_flags(region.as_ptr() as usize);
        assert!(flags.contains(" sh"), "{flags}");
    }
}
