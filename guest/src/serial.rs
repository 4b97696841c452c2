//! COM1 output. Lines are formatted into a buffer, then written whole under a
//! spinlock so several CPUs never interleave inside a line.

use crate::x86::{inb, outb, pause};
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

const COM1: u16 = 0x3f8;
const LINE_STATUS: u16 = COM1 + 5;
const TRANSMIT_EMPTY: u8 = 0x20;
/// With the FIFO enabled, this many bytes fit after the UART reports empty.
const FIFO_BYTES: usize = 16;
const LINE_CAPACITY: usize = 512;

static LOCK: AtomicBool = AtomicBool::new(false);

pub fn init() {
    outb(COM1 + 1, 0x00); // no UART interrupts
    outb(COM1 + 3, 0x80); // DLAB
    outb(COM1, 0x01); // 115200 baud
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); // 8N1
    outb(COM1 + 2, 0x07); // FIFO on, cleared
    outb(COM1 + 4, 0x03); // DTR | RTS
}

fn wait_transmit_empty() {
    // Bounded: a UART that never drains (or is absent, reading 0xff) must
    // not hang the guest.
    for _ in 0..100_000 {
        if inb(LINE_STATUS) & TRANSMIT_EMPTY != 0 {
            return;
        }
        pause();
    }
}

fn write_bytes(bytes: &[u8]) {
    for chunk in bytes.chunks(FIFO_BYTES) {
        wait_transmit_empty();
        for &b in chunk {
            outb(COM1, b);
        }
    }
}

/// A line being built; sent with its newline when dropped.
pub struct Line {
    buf: [u8; LINE_CAPACITY],
    len: usize,
}

impl Line {
    pub const fn new() -> Self {
        Self {
            buf: [0; LINE_CAPACITY],
            len: 0,
        }
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = LINE_CAPACITY - 1 - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        self.buf[self.len] = b'\n';
        let bytes = &self.buf[..self.len + 1];
        // A CPU that faulted while holding the lock must not silence the
        // fault report forever: give up waiting after a while.
        let mut locked = false;
        for _ in 0..50_000_000u64 {
            if LOCK
                .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                locked = true;
                break;
            }
            pause();
        }
        write_bytes(bytes);
        if locked {
            LOCK.store(false, Ordering::Release);
        }
    }
}

/// Prints one line on COM1 (a newline is appended).
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut line = $crate::serial::Line::new();
        let _ = write!(line, $($arg)*);
    }};
}
