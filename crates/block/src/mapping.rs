//! A read-only shared mapping of an image whose copies survive the file going away under
//! them.
//!
//! Touching a mapped page that the file no longer backs (the image was truncated by someone
//! else) or that the kernel cannot read in (a disk error during the page fault) raises SIGBUS,
//! which by default kills the whole VMM. A process-wide SIGBUS handler, installed with the
//! first mapping, recognises faults inside a registered mapping: it puts an anonymous zero
//! page over the faulting page, so the interrupted copy runs to its end, and marks the mapping
//! faulted. [`GuardedMapping::copy_to`] then reports the copy as failed and maps the file back
//! over the range it read, so the next copy sees the file again. Faults anywhere else go to
//! the handler that was there before (Rust's stack-overflow reporter) or the default action.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, Once, OnceLock};

/// Mappings that can be guarded at once (one per queue engine); a further one is refused and
/// its engine reads through system calls instead.
const SLOTS: usize = 256;

const PAGE: usize = 4096;

struct Slot {
    /// Start address; 0 while the slot is free. Published after `len`, cleared before it.
    start: AtomicUsize,
    len: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)] // only to build the array below
const FREE_SLOT: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};

static SLOTS_IN_USE: [Slot; SLOTS] = [FREE_SLOT; SLOTS];
/// Serialises taking and freeing slots (the handler only reads them).
static SLOT_ALLOCATION: Mutex<()> = Mutex::new(());
static INSTALL: Once = Once::new();
/// The SIGBUS disposition before ours; `None` if installing ours failed.
static PREVIOUS: OnceLock<Option<libc::sigaction>> = OnceLock::new();

/// The copy read a page the file does not back any more (or could not be read in); the
/// bytes copied from it are zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Faulted;

pub(crate) struct GuardedMapping {
    ptr: *mut u8,
    len: usize,
    slot: usize,
    fd: libc::c_int,
}

// SAFETY: the mapping is owned by this value and only read through it; the slot it holds is
// only written by the thread that copies (and the SIGBUS handler running on that thread).
unsafe impl Send for GuardedMapping {}

impl GuardedMapping {
    /// Maps `len` bytes of `file` read-only and shared; `Ok(None)` when the handler could not
    /// be installed or every slot is taken.
    pub(crate) fn new(file: &File, len: usize) -> std::io::Result<Option<Self>> {
        INSTALL.call_once(install_handler);
        if PREVIOUS.get().is_none_or(Option::is_none) || len == 0 {
            return Ok(None);
        }
        let fd = file.as_raw_fd();
        // SAFETY: a new shared read-only mapping of `file` with no address hint; checked
        // before use, unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // A page fault on the mapping must read the page it needs and nothing else: the kernel's
        // read-around for faults (128 KiB of neighbours, which a guest's random reads never
        // use) allocated page cache on every fault, and under memory pressure reclaimed it in
        // the copying thread. The guest's own readahead drives sequential reads.
        // SAFETY: advice on the mapping just made; it does not change its contents.
        unsafe { libc::madvise(ptr, len, libc::MADV_RANDOM) };
        let _guard = SLOT_ALLOCATION.lock().unwrap();
        let Some(slot) = SLOTS_IN_USE
            .iter()
            .position(|s| s.start.load(Ordering::Acquire) == 0)
        else {
            // SAFETY: the mapping just made, with its length; nothing else knows of it.
            unsafe { libc::munmap(ptr, len) };
            return Ok(None);
        };
        let entry = &SLOTS_IN_USE[slot];
        entry.faulted.store(false, Ordering::Relaxed);
        entry.len.store(len, Ordering::Release);
        entry.start.store(ptr as usize, Ordering::Release);
        Ok(Some(GuardedMapping {
            ptr: ptr.cast(),
            len,
            slot,
            fd,
        }))
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Copies `len` bytes at file offset `offset` to `dst`.
    ///
    /// # Safety
    /// `offset + len` must lie inside the mapping, `dst` must be valid for `len` bytes of
    /// writes and must not be inside this mapping, and the file descriptor the mapping was
    /// made from must still be open.
    pub(crate) unsafe fn copy_to(
        &self,
        offset: usize,
        dst: *mut u8,
        len: usize,
    ) -> Result<(), Faulted> {
        let slot = &SLOTS_IN_USE[self.slot];
        // SAFETY: the caller's contract; a page that faults is replaced by the handler, so the
        // copy finishes.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), dst, len) };
        if !slot.faulted.swap(false, Ordering::Acquire) {
            return Ok(());
        }
        self.remap(offset, len);
        Err(Faulted)
    }

    /// Maps the file back over the pages of `offset..offset + len`, where the handler may
    /// have put zero pages.
    fn remap(&self, offset: usize, len: usize) {
        let start = offset & !(PAGE - 1);
        let end = (offset + len).div_ceil(PAGE) * PAGE;
        let end = end.min(self.len.div_ceil(PAGE) * PAGE);
        // SAFETY: the range lies inside our own mapping (page-aligned, clamped to its end),
        // which MAP_FIXED replaces with the same file at the same offsets.
        let rc = unsafe {
            libc::mmap(
                self.ptr.add(start).cast(),
                end - start,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_FIXED,
                self.fd,
                start as libc::off_t,
            )
        };
        if rc == libc::MAP_FAILED {
            // The zero pages stay; the owner stops copying after a fault anyway.
            log::warn!(
                "cannot map the image back after a fault: {}",
                std::io::Error::last_os_error()
            );
        }
    }

    /// Which pages of `offset..offset + len` (page-aligned, inside the mapping) the page cache
    /// holds now: one byte per page in `out`, bit 0 set if resident (`mincore(2)`).
    pub(crate) fn resident(&self, offset: usize, len: usize, out: &mut Vec<u8>) -> bool {
        debug_assert_eq!(offset % PAGE, 0);
        let len = len.min(self.len.saturating_sub(offset));
        out.clear();
        out.resize(len.div_ceil(PAGE), 0);
        // SAFETY: the range starts page-aligned inside our live mapping and is clamped to
        // it; `out` has one byte per page of it.
        let rc = unsafe { libc::mincore(self.ptr.add(offset).cast(), len, out.as_mut_ptr()) };
        rc == 0
    }
}

impl Drop for GuardedMapping {
    fn drop(&mut self) {
        let _guard = SLOT_ALLOCATION.lock().unwrap();
        let slot = &SLOTS_IN_USE[self.slot];
        slot.start.store(0, Ordering::Release);
        slot.len.store(0, Ordering::Release);
        // SAFETY: our mapping, with its length; no copy is running (we hold `&mut self`).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn install_handler() {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; `on_sigbus` has the
    // SA_SIGINFO signature; the old disposition is written to `previous`.
    let previous = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
        libc::sigemptyset(&mut action.sa_mask);
        let mut previous: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, &action, &mut previous) == 0 {
            Some(previous)
        } else {
            log::warn!(
                "cannot install the SIGBUS handler: {}",
                std::io::Error::last_os_error()
            );
            None
        }
    };
    let _ = PREVIOUS.set(previous);
}

/// Async-signal-safe: atomics, mmap(2) and sigaction(2) only.
extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in &SLOTS_IN_USE {
        let start = slot.start.load(Ordering::Acquire);
        if start == 0 || addr < start || addr - start >= slot.len.load(Ordering::Acquire) {
            continue;
        }
        let page = addr & !(PAGE - 1);
        // SAFETY: `page` lies inside a live mapping this module made (its slot is set until
        // the owner unmaps it, and the owner is the thread that faulted); a private zero page
        // over it lets the interrupted copy finish.
        let rc = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                PAGE,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if rc != libc::MAP_FAILED {
            slot.faulted.store(true, Ordering::Release);
            return;
        }
        break;
    }
    // Not ours: whatever handled SIGBUS before.
    match PREVIOUS.get() {
        Some(Some(previous))
            if previous.sa_sigaction != libc::SIG_DFL && previous.sa_sigaction != libc::SIG_IGN =>
        {
            if previous.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous handler was installed with this signature.
                let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(previous.sa_sigaction) };
                handler(signal, info, context);
            } else {
                // SAFETY: the previous handler was installed with this signature.
                let handler: extern "C" fn(libc::c_int) =
                    unsafe { std::mem::transmute(previous.sa_sigaction) };
                handler(signal);
            }
        }
        _ => {
            // The default action: returning re-runs the faulting access, which now kills.
            // SAFETY: a zeroed sigaction with SIG_DFL is valid.
            unsafe {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &default, std::ptr::null_mut());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(bytes: &[u8]) -> File {
        let mut file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        file.write_all(bytes).unwrap();
        file
    }

    #[test]
    fn copies_what_the_file_holds() {
        let data: Vec<u8> = (0..3 * PAGE).map(|i| (i % 251) as u8).collect();
        let file = file_of(&data);
        let map = GuardedMapping::new(&file, data.len()).unwrap().unwrap();
        let mut out = vec![0u8; 5000];
        // SAFETY: inside the mapping; `out` is 5000 writable bytes.
        unsafe { map.copy_to(1000, out.as_mut_ptr(), out.len()) }.unwrap();
        assert_eq!(out, data[1000..6000]);
    }

    #[test]
    fn a_copy_from_a_truncated_file_fails_instead_of_killing_the_process_and_the_mapping_recovers()
    {
        let data = vec![0xabu8; 4 * PAGE];
        let file = file_of(&data);
        let map = GuardedMapping::new(&file, data.len()).unwrap().unwrap();
        file.set_len(PAGE as u64).unwrap();
        let mut out = vec![0x55u8; 2 * PAGE];
        // SAFETY: inside the mapping (the file behind it is shorter now, which is the point).
        let result = unsafe { map.copy_to(2 * PAGE, out.as_mut_ptr(), out.len()) };
        assert_eq!(result, Err(Faulted));
        // The page still backed by the file reads normally, both before and after the fault.
        let mut first = vec![0u8; PAGE];
        // SAFETY: inside the mapping and below the file's end.
        unsafe { map.copy_to(0, first.as_mut_ptr(), PAGE) }.unwrap();
        assert!(first.iter().all(|&b| b == 0xab));
        // Written again, the file is seen through the same mapping (not the handler's zeros).
        use std::os::unix::fs::FileExt;
        file.write_all_at(&[0xcd; PAGE], 3 * PAGE as u64).unwrap();
        let mut again = vec![0x55u8; PAGE];
        // SAFETY: inside the mapping and the file.
        unsafe { map.copy_to(3 * PAGE, again.as_mut_ptr(), PAGE) }.unwrap();
        assert!(again.iter().all(|&b| b == 0xcd));
    }
}
