//! The 16550 UART at 0x3f8 (vm-superio), its interrupt on IOAPIC pin 4 through an irqfd,
//! its output to stdout or a file, and guest input fed by the main thread.

use std::io::Write;

use kickvm_bus::BusDevice;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::vmm::snapshot::SerialSnapshot;

/// Raises the serial interrupt by signalling an eventfd that KVM routes to a GSI (irqfd).
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub type SerialOutput = Box<dyn Write + Send>;

pub struct SerialDevice {
    serial: Serial<IrqTrigger, NoEvents, SerialOutput>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, output: SerialOutput) -> Self {
        SerialDevice {
            serial: Serial::new(IrqTrigger(irq), output),
        }
    }

    /// The port as a snapshot saved it; an interrupt it had pending is raised again.
    pub fn from_snapshot(
        irq: EventFd,
        output: SerialOutput,
        saved: &SerialSnapshot,
    ) -> Result<Self, String> {
        let [dll, dlh, ier, iir, lcr, lsr, mcr, msr, scr] = saved.registers;
        let state = SerialState {
            baud_divisor_low: dll,
            baud_divisor_high: dlh,
            interrupt_enable: ier,
            interrupt_identification: iir,
            line_control: lcr,
            line_status: lsr,
            modem_control: mcr,
            modem_status: msr,
            scratch: scr,
            in_buffer: saved.in_buffer.clone(),
        };
        Serial::from_state(&state, IrqTrigger(irq), NoEvents, output)
            .map(|serial| SerialDevice { serial })
            .map_err(|e| format!("serial port state: {e:?}"))
    }

    pub fn snapshot(&self) -> SerialSnapshot {
        let s = self.serial.state();
        SerialSnapshot {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    /// Queues guest input; returns how many bytes the receive FIFO took.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.serial.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                log::debug!("serial input dropped: {e}");
                0
            }
        }
    }

    pub fn fifo_room(&self) -> usize {
        self.serial.fifo_capacity()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let value = self.serial.read(offset as u8);
        data.fill(value);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            if let Err(e) = self.serial.write(offset as u8, value) {
                log::warn!("serial output failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn registers_and_pending_input_survive_a_snapshot() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, Box::new(Capture::default()));
        dev.write(0x3f8, 7, &[0x5a]); // scratch
        dev.write(0x3f8, 3, &[0x03]); // 8N1
        dev.enqueue_input(b"ab");
        let saved = dev.snapshot();

        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut restored =
            SerialDevice::from_snapshot(irq, Box::new(Capture::default()), &saved).unwrap();
        let read = |d: &mut SerialDevice, offset| {
            let mut b = [0u8];
            d.read(0x3f8, offset, &mut b);
            b[0]
        };
        assert_eq!(read(&mut restored, 7), 0x5a);
        assert_eq!(read(&mut restored, 3), 0x03);
        assert_eq!(read(&mut restored, 0), b'a');
        assert_eq!(read(&mut restored, 0), b'b');
    }

    #[test]
    fn bytes_written_to_thr_reach_the_output() {
        let capture = Capture::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, Box::new(capture.clone()));
        for b in b"hi\n" {
            dev.write(0x3f8, 0, &[*b]);
        }
        assert_eq!(capture.0.lock().unwrap().as_slice(), b"hi\n");
    }

    #[test]
    fn input_is_readable_and_raises_the_interrupt_when_enabled() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(std::io::sink()));
        dev.write(0x3f8, 1, &[0x01]); // IER: received-data interrupt
        assert_eq!(dev.enqueue_input(b"x"), 1);
        assert_eq!(irq.read().unwrap(), 1);
        let mut lsr = [0u8];
        dev.read(0x3f8, 5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut rbr = [0u8];
        dev.read(0x3f8, 0, &mut rbr);
        assert_eq!(rbr[0], b'x');
    }
}
