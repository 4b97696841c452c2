//! Why a VM ended, and the one-shot notifier through which vCPU threads and devices report
//! it to the main thread. The first report wins; later ones (the other vCPUs being stopped,
//! a second reset write) are ignored.

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExitReason {
    /// The guest asked for a reset (i8042 reset command, KVM reset event).
    Reset,
    /// The guest powered off (ACPI S5, KVM shutdown event).
    PowerOff,
    /// The guest crashed: a triple fault or a crash event.
    Crashed {
        vcpu: u8,
        detail: String,
        registers: String,
    },
    /// KVM could not go on running the guest (internal error, emulation failure).
    Failed {
        vcpu: u8,
        detail: String,
        registers: String,
    },
    /// The VMM received a termination signal.
    Signal(i32),
    /// `vm.shutdown` with a grace period the guest let pass: the VM was paused (I/O
    /// quiescent), then ended.
    ApiShutdown,
    /// `vm.kill` on the control API: the VM was ended at once.
    ApiKill,
}

impl VmExitReason {
    /// The process exit status for this ending (see `kickvm --help`).
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExitReason::Reset
            | VmExitReason::PowerOff
            | VmExitReason::ApiShutdown
            | VmExitReason::ApiKill => 0,
            VmExitReason::Failed { .. } => 1,
            VmExitReason::Crashed { .. } => 3,
            VmExitReason::Signal(signal) => 128 + signal,
        }
    }
}

/// Wakes the main thread (through an eventfd) with the reason the VM should end.
pub struct ExitNotifier {
    reason: Mutex<Option<VmExitReason>>,
    event: EventFd,
}

impl ExitNotifier {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitNotifier {
            reason: Mutex::new(None),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub fn notify(&self, reason: VmExitReason) {
        let mut slot = self.reason.lock().unwrap();
        if slot.is_none() {
            log::debug!("VM ending: {reason:?}");
            *slot = Some(reason);
        }
        drop(slot);
        if let Err(e) = self.event.write(1) {
            log::error!("cannot wake the main thread to end the VM: {e}");
        }
    }

    pub fn reason(&self) -> Option<VmExitReason> {
        self.reason.lock().unwrap().clone()
    }

    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reported_reason_wins() {
        let notifier = ExitNotifier::new().unwrap();
        notifier.notify(VmExitReason::Reset);
        notifier.notify(VmExitReason::Signal(15));
        assert_eq!(notifier.reason(), Some(VmExitReason::Reset));
        assert_eq!(notifier.event().read().unwrap(), 2);
    }

    #[test]
    fn exit_codes_follow_the_documented_contract() {
        assert_eq!(VmExitReason::Reset.exit_code(), 0);
        assert_eq!(VmExitReason::PowerOff.exit_code(), 0);
        let failed = VmExitReason::Failed {
            vcpu: 0,
            detail: String::new(),
            registers: String::new(),
        };
        assert_eq!(failed.exit_code(), 1);
        let crashed = VmExitReason::Crashed {
            vcpu: 0,
            detail: String::new(),
            registers: String::new(),
        };
        assert_eq!(crashed.exit_code(), 3);
        assert_eq!(VmExitReason::Signal(libc::SIGTERM).exit_code(), 143);
    }
}
