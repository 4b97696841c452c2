//! Devices asking the VMM to pause the VM: a disk whose host file system is full holds the
//! writes that failed and asks for a pause, so the guest sees no error; once space is freed
//! and the VM resumed, the writes are made again.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A VM-wide mailbox: devices post why they need the VM paused; the VMM's main loop watches
/// [`PauseRequests::event_fd`] and pauses.
#[derive(Debug)]
pub struct PauseRequests {
    event: EventFd,
    reasons: Mutex<Vec<String>>,
}

impl PauseRequests {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            event: EventFd::new(EFD_NONBLOCK)?,
            reasons: Mutex::new(Vec::new()),
        })
    }

    /// Asks for a pause, saying why (one line for the log and `vm.info`).
    pub fn request(&self, reason: String) {
        self.reasons.lock().unwrap().push(reason);
        if let Err(e) = self.event.write(1) {
            log::error!("cannot signal a pause request: {e}");
        }
    }

    /// Readable while requests wait.
    pub fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// The reasons posted since the last call.
    pub fn take(&self) -> Vec<String> {
        let _ = self.event.read();
        std::mem::take(&mut *self.reasons.lock().unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_wake_the_reader_and_are_taken_once() {
        let requests = PauseRequests::new().unwrap();
        requests.request("disk0: full".into());
        requests.request("disk1: full".into());
        let mut fd = libc::pollfd {
            fd: requests.event_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        assert_eq!(unsafe { libc::poll(&mut fd, 1, 0) }, 1);
        assert_eq!(requests.take(), ["disk0: full", "disk1: full"]);
        assert!(requests.take().is_empty());
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut fd, 1, 0) }, 0, "drained");
    }
}
