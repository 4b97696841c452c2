//! Raw mode for the terminal on stdin while it feeds the guest's serial port, restored when
//! the VM ends. Output processing and signal keys stay on (as QEMU's stdio console does):
//! Ctrl-C stops the VM, and a guest's "\n" still starts a new line.

pub fn stdin_is_terminal() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(libc::STDIN_FILENO) == 1 }
}

pub struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    /// Switches stdin to raw input; None (and a debug log) when that is not possible.
    pub fn enter() -> Option<RawMode> {
        // SAFETY: termios is plain data, filled by tcgetattr before use.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios for tcgetattr to fill.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            log::debug!(
                "stdin: tcgetattr failed: {}",
                std::io::Error::last_os_error()
            );
            return None;
        }
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios copy.
        unsafe { libc::cfmakeraw(&mut raw) };
        raw.c_oflag = saved.c_oflag;
        raw.c_lflag |= libc::ISIG;
        // SAFETY: `raw` is a valid termios derived from the current one.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            log::debug!(
                "stdin: tcsetattr failed: {}",
                std::io::Error::last_os_error()
            );
            return None;
        }
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enter` on the same descriptor.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) } != 0 {
            log::warn!(
                "cannot restore the terminal: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}
