//! Interrupt delivery for a virtio-pci function: MSI-X when the driver enabled it (per-queue
//! and config vectors), otherwise INTx with the ISR register.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use kickvm_pci::{Delivery, IntxLine, MsixConfig};

use crate::counters::QueueCounters;
use crate::device::VirtioInterrupt;

pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;
pub const ISR_QUEUE: u8 = 0x1;
pub const ISR_CONFIG: u8 = 0x2;

pub struct PciInterrupt {
    msix: Arc<Mutex<MsixConfig>>,
    intx: Option<IntxLine>,
    intx_disabled: AtomicBool,
    isr: AtomicU8,
    needs_reset: AtomicBool,
    queue_vectors: Vec<AtomicU16>,
    config_vector: AtomicU16,
    counters: Arc<[QueueCounters]>,
}

impl PciInterrupt {
    pub fn new(
        msix: Arc<Mutex<MsixConfig>>,
        intx: Option<IntxLine>,
        num_queues: usize,
        counters: Arc<[QueueCounters]>,
    ) -> Self {
        Self {
            msix,
            intx,
            intx_disabled: AtomicBool::new(false),
            isr: AtomicU8::new(0),
            needs_reset: AtomicBool::new(false),
            queue_vectors: (0..num_queues)
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            counters,
        }
    }

    pub fn intx(&self) -> Option<&IntxLine> {
        self.intx.as_ref()
    }

    fn valid_vector(&self, vector: u16) -> u16 {
        if vector < self.msix.lock().unwrap().num_vectors() {
            vector
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    /// Stores the driver's choice; a vector the function does not have reads back as
    /// NO_VECTOR, which is how the driver learns the assignment failed.
    pub fn set_queue_vector(&self, queue: usize, vector: u16) {
        if let Some(slot) = self.queue_vectors.get(queue) {
            slot.store(self.valid_vector(vector), Ordering::SeqCst);
        }
    }

    pub fn queue_vector(&self, queue: usize) -> u16 {
        self.queue_vectors
            .get(queue)
            .map_or(VIRTIO_MSI_NO_VECTOR, |v| v.load(Ordering::SeqCst))
    }

    pub fn set_config_vector(&self, vector: u16) {
        self.config_vector
            .store(self.valid_vector(vector), Ordering::SeqCst);
    }

    pub fn config_vector(&self) -> u16 {
        self.config_vector.load(Ordering::SeqCst)
    }

    pub fn set_intx_disabled(&self, disabled: bool) {
        self.intx_disabled.store(disabled, Ordering::SeqCst);
    }

    /// The ISR without acknowledging it, for a snapshot.
    pub fn isr(&self) -> u8 {
        self.isr.load(Ordering::SeqCst)
    }

    /// A snapshot's ISR and NEEDS_RESET, set without sending anything: the interrupts they
    /// stand for were sent before the snapshot.
    pub fn restore(&self, isr: u8, needs_reset: bool) {
        self.isr.store(isr, Ordering::SeqCst);
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
    }

    /// Reading the ISR acknowledges it: the line drops at the guest's next EOI.
    pub fn read_isr(&self) -> u8 {
        self.isr.swap(0, Ordering::SeqCst)
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// The guest EOI'd the INTx line: raise it again while the ISR still has something.
    pub fn resample(&self) {
        if let Some(intx) = &self.intx {
            let _ = intx.resample_fd().read();
            if self.isr.load(Ordering::SeqCst) != 0 && !self.intx_disabled.load(Ordering::SeqCst) {
                intx.assert();
            }
        }
    }

    /// Device reset: vectors back to NO_VECTOR, ISR and NEEDS_RESET cleared.
    pub fn reset(&self) {
        for v in &self.queue_vectors {
            v.store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
        }
        self.config_vector
            .store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
        self.isr.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// Returns whether anything was sent (or left pending on a masked vector).
    fn deliver(&self, vector: u16, isr_bit: u8) -> bool {
        {
            let mut msix = self.msix.lock().unwrap();
            if msix.enabled() {
                return vector != VIRTIO_MSI_NO_VECTOR
                    && msix.trigger(vector) != Delivery::NotDelivered;
            }
        }
        self.isr.fetch_or(isr_bit, Ordering::SeqCst);
        match &self.intx {
            Some(intx) if !self.intx_disabled.load(Ordering::SeqCst) => {
                intx.assert();
                true
            }
            _ => false,
        }
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn signal_queue(&self, queue: usize) {
        let sent = self.deliver(self.queue_vector(queue), ISR_QUEUE);
        if let Some(counters) = self.counters.get(queue) {
            let counter = if sent {
                &counters.interrupts_sent
            } else {
                &counters.interrupts_suppressed
            };
            QueueCounters::add(counter, 1);
        }
    }

    fn signal_config(&self) {
        self.deliver(self.config_vector(), ISR_CONFIG);
    }

    fn set_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::SeqCst) {
            log::warn!("virtio device entered NEEDS_RESET");
        }
        self.signal_config();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::{router, MockChip};

    fn interrupt(with_intx: bool) -> (Arc<Mutex<MsixConfig>>, PciInterrupt) {
        let router = router();
        let msix = Arc::new(Mutex::new(MsixConfig::new(3, router.clone()).unwrap()));
        let intx = with_intx.then(|| IntxLine::new(Arc::new(MockChip::default()), 17).unwrap());
        let counters: Arc<[QueueCounters]> = (0..2).map(|_| QueueCounters::default()).collect();
        (msix.clone(), PciInterrupt::new(msix, intx, 2, counters))
    }

    fn line_raised(i: &PciInterrupt) -> bool {
        i.intx().unwrap().trigger_fd().read().is_ok()
    }

    #[test]
    fn without_msix_a_queue_interrupt_sets_isr_and_raises_intx_until_isr_is_read() {
        let (_msix, i) = interrupt(true);
        i.signal_queue(0);
        assert!(line_raised(&i));
        // EOI with the ISR still pending: the level line is raised again.
        i.intx().unwrap().resample_fd().write(1).unwrap();
        i.resample();
        assert!(line_raised(&i));
        assert_eq!(i.read_isr(), ISR_QUEUE);
        assert_eq!(i.read_isr(), 0, "reading the ISR acknowledges it");
        // EOI after the ISR was read: the line stays low.
        i.intx().unwrap().resample_fd().write(1).unwrap();
        i.resample();
        assert!(!line_raised(&i));
    }

    #[test]
    fn config_interrupt_sets_the_config_isr_bit_and_needs_reset_is_reported() {
        let (_msix, i) = interrupt(true);
        i.set_needs_reset();
        assert!(i.needs_reset());
        assert!(line_raised(&i));
        assert_eq!(i.read_isr(), ISR_CONFIG);
        i.reset();
        assert!(!i.needs_reset());
    }

    #[test]
    fn intx_disable_in_the_command_register_keeps_the_line_low() {
        let (_msix, i) = interrupt(true);
        i.set_intx_disabled(true);
        i.signal_queue(1);
        assert!(!line_raised(&i));
        assert_eq!(i.read_isr(), ISR_QUEUE);
    }

    #[test]
    fn with_msix_enabled_the_queue_vector_fires_and_intx_stays_low() {
        let (msix, i) = interrupt(true);
        msix.lock().unwrap().set_message_control(1 << 15);
        msix.lock()
            .unwrap()
            .write_table(16, &0xfee0_0000u32.to_le_bytes());
        msix.lock()
            .unwrap()
            .write_table(16 + 12, &0u32.to_le_bytes());
        i.set_queue_vector(1, 1);
        i.signal_queue(1);
        assert!(msix.lock().unwrap().irqfd(1).unwrap().read().is_ok());
        assert!(!line_raised(&i));
        assert_eq!(i.read_isr(), 0);
    }

    #[test]
    fn queue_with_no_vector_under_msix_counts_as_not_sent() {
        let (msix, i) = interrupt(false);
        msix.lock().unwrap().set_message_control(1 << 15);
        i.signal_queue(0);
        let c = i.counters[0].snapshot();
        assert_eq!((c.interrupts_sent, c.interrupts_suppressed), (0, 1));
    }
}
