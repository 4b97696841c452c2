//! The virtio-net header in front of every frame, in both directions. The tap is given the
//! same header size (TUNSETVNETHDRSZ), so frames pass between guest and tap unchanged; what
//! the device must do is refuse a TX header asking for an offload the guest did not
//! negotiate, and tell the tap which offloads the guest accepts on RX (TUNSETOFFLOAD).

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;

/// Length of the header with `num_buffers` (virtio 1.x, or MRG_RXBUF).
pub const HEADER_LEN: usize = 12;
/// Length of the legacy header without `num_buffers`.
pub const LEGACY_HEADER_LEN: usize = 10;
/// Offset of `num_buffers`, which the device fills on RX with MRG_RXBUF.
pub const NUM_BUFFERS_OFFSET: usize = 10;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// The header length the negotiated features imply (the same for RX and TX).
pub fn vnet_header_len(acked: u64) -> usize {
    if acked & (bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF)) != 0 {
        HEADER_LEN
    } else {
        LEGACY_HEADER_LEN
    }
}

/// TUNSETOFFLOAD flags: what the tap may hand the guest (partial checksums, large TCP
/// segments), by the guest's RX features.
pub fn tap_offload_flags(acked: u64) -> u32 {
    let has = |b| acked & bit(b) != 0;
    let mut flags = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= libc::TUN_F_CSUM;
        // Segmentation offloads need checksum offload (virtio 1.x 5.1.3.1).
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= libc::TUN_F_TSO6;
        }
        if has(VIRTIO_NET_F_GUEST_ECN) && flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
            flags |= libc::TUN_F_TSO_ECN;
        }
    }
    flags
}

/// The fields of a header (little-endian on the wire; legacy x86 guests are too).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TxHeaderError {
    #[error("chain of {0} bytes is shorter than the virtio-net header")]
    Short(usize),
    #[error("frame of {0} bytes is larger than 64 KiB")]
    TooLarge(usize),
    #[error("checksum offload requested without VIRTIO_NET_F_CSUM")]
    CsumNotNegotiated,
    #[error("checksum at {start}+{offset} lies outside the {len}-byte frame")]
    CsumOutsideFrame { start: u16, offset: u16, len: usize },
    #[error("GSO type {0:#x} not negotiated")]
    GsoNotNegotiated(u8),
    #[error("GSO type {0:#x} unknown")]
    GsoUnknown(u8),
    #[error("GSO without a segment size")]
    GsoSizeZero,
}

impl VnetHeader {
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < LEGACY_HEADER_LEN {
            return None;
        }
        let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
        Some(Self {
            flags: bytes[0],
            gso_type: bytes[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: if bytes.len() >= HEADER_LEN {
                u16_at(10)
            } else {
                0
            },
        })
    }

    pub fn write(&self, out: &mut [u8]) {
        out[0] = self.flags;
        out[1] = self.gso_type;
        out[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        out[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        out[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        out[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        if out.len() >= HEADER_LEN {
            out[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        }
    }

    /// Whether a guest that negotiated `acked` may send this header in front of a
    /// `frame_len`-byte frame. The tap would refuse most bad headers too; checking here keeps
    /// the reason in the device's log and the count in its statistics.
    pub fn check_tx(&self, frame_len: usize, acked: u64) -> Result<(), TxHeaderError> {
        let has = |b| acked & bit(b) != 0;
        if frame_len > super::MAX_FRAME_LEN {
            return Err(TxHeaderError::TooLarge(frame_len));
        }
        if u32::from(self.flags) & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            if !has(VIRTIO_NET_F_CSUM) {
                return Err(TxHeaderError::CsumNotNegotiated);
            }
            let end = usize::from(self.csum_start) + usize::from(self.csum_offset) + 2;
            if end > frame_len {
                return Err(TxHeaderError::CsumOutsideFrame {
                    start: self.csum_start,
                    offset: self.csum_offset,
                    len: frame_len,
                });
            }
        }
        let ecn = u32::from(self.gso_type) & VIRTIO_NET_HDR_GSO_ECN != 0;
        let needed = match u32::from(self.gso_type) & !VIRTIO_NET_HDR_GSO_ECN {
            VIRTIO_NET_HDR_GSO_NONE if !ecn => return Ok(()),
            VIRTIO_NET_HDR_GSO_NONE => return Err(TxHeaderError::GsoUnknown(self.gso_type)),
            VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_HDR_GSO_UDP => VIRTIO_NET_F_HOST_UFO,
            _ => return Err(TxHeaderError::GsoUnknown(self.gso_type)),
        };
        if !has(needed) || (ecn && !has(VIRTIO_NET_F_HOST_ECN)) {
            return Err(TxHeaderError::GsoNotNegotiated(self.gso_type));
        }
        if self.gso_size == 0 {
            return Err(TxHeaderError::GsoSizeZero);
        }
        Ok(())
    }
}
