//! The virtio 1.x vendor capabilities that tell a modern driver where the common, notify, ISR
//! and device configuration structures live, and the layout of kickvm's modern BAR.

pub const VIRTIO_PCI_CAP_ID: u8 = 0x09;
pub const CAP_COMMON_CFG: u8 = 1;
pub const CAP_NOTIFY_CFG: u8 = 2;
pub const CAP_ISR_CFG: u8 = 3;
pub const CAP_DEVICE_CFG: u8 = 4;
pub const CAP_PCI_CFG: u8 = 5;
/// Offset of `pci_cfg_data` in `struct virtio_pci_cfg_cap`.
pub const PCI_CFG_DATA: usize = 16;

/// Each structure gets its own 4 KiB page of the modern BAR.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
pub const COMMON_CFG_LEN: u64 = 0x38;
pub const ISR_OFFSET: u64 = 0x1000;
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
pub const REGION_LEN: u64 = 0x1000;
/// Queue q's doorbell is at NOTIFY_OFFSET + q * NOTIFY_OFF_MULTIPLIER (queue_notify_off = q).
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
pub const MODERN_BAR_SIZE: u64 = 0x4000;
/// Queues that fit in the notify page.
pub const MAX_QUEUES: usize = (REGION_LEN / NOTIFY_OFF_MULTIPLIER as u64) as usize;

/// `struct virtio_pci_cap` (plus `notify_off_multiplier` for the notify capability).
pub fn vendor_cap(cfg_type: u8, bar: u8, offset: u32, length: u32) -> Vec<u8> {
    let cap_len: u8 = if cfg_type == CAP_NOTIFY_CFG { 20 } else { 16 };
    let mut cap = vec![VIRTIO_PCI_CAP_ID, 0, cap_len, cfg_type, bar, 0, 0, 0];
    cap.extend_from_slice(&offset.to_le_bytes());
    cap.extend_from_slice(&length.to_le_bytes());
    if cfg_type == CAP_NOTIFY_CFG {
        cap.extend_from_slice(&NOTIFY_OFF_MULTIPLIER.to_le_bytes());
    }
    cap
}

/// `struct virtio_pci_cfg_cap`: a window into the BARs through configuration space. The driver
/// writes bar, offset and length, then reads or writes `pci_cfg_data`. Returns the capability
/// and its writable mask.
pub fn pci_cfg_cap() -> (Vec<u8>, Vec<u8>) {
    let mut cap = vendor_cap(CAP_PCI_CFG, 0, 0, 0);
    cap[2] = 20;
    cap.extend_from_slice(&[0; 4]);
    let mut writable = vec![0u8; cap.len()];
    writable[4] = 0xff;
    writable[8..20].fill(0xff);
    (cap, writable)
}
