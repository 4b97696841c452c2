//! A descriptor chain becomes a block request here, and every way a guest can get it wrong is
//! answered: with a status byte when one can be written, else by returning the chain unused.
//!
//! Layout (virtio 1.x 5.2.6): a device-readable 16-byte header `{type, reserved, sector}`, data
//! buffers, and a device-writable status byte, which is the last byte of the last descriptor.

use crate::GuestMemoryMmap;
use kickvm_block::{Buffers, HostBuffer, InlineVec, Request};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::*;

const HEADER_LEN: u32 = 16;
const DISCARD_SEGMENT_LEN: u32 = 16;
const DISCARD_FLAG_UNMAP: u32 = 1;

/// What the device knows when it checks a request.
#[derive(Debug, Clone)]
pub struct RequestLimits {
    pub capacity_bytes: u64,
    pub readonly: bool,
    pub serial: [u8; VIRTIO_BLK_ID_BYTES],
    pub seg_max: u32,
    pub discard: bool,
    pub write_zeroes: bool,
}

/// The outcome of parsing one chain.
// Returned by value once per request and taken apart at once: boxing the large variant would
// put a heap allocation on the I/O path.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Parsed {
    /// Hand to the engine; on completion write the status at `status` and return `used_len`.
    /// `fills`: the guest buffers the host writes through their host addresses (a read's),
    /// marked written on completion.
    Submit {
        request: Request,
        status: GuestAddress,
        used_len: u32,
        fills: Segments,
    },
    /// Answered without the engine (GET_ID, or a refused request).
    Answer {
        status: GuestAddress,
        value: u8,
        used_len: u32,
    },
    /// No status byte can be written: return the chain with nothing written. `fatal` when the
    /// chain itself is malformed (a loop, an index out of range): the queue is not usable.
    Broken { reason: &'static str, fatal: bool },
}

fn answer(status: GuestAddress, value: u8) -> Parsed {
    Parsed::Answer {
        status,
        value,
        used_len: 1,
    }
}

/// A chain's data segments `(address, length, device-writable)`; the usual one or two are kept
/// without a heap allocation (this runs for every request).
pub type Segments = InlineVec<(GuestAddress, u32, bool), INLINE_SEGMENTS>;

const INLINE_SEGMENTS: usize = 4;

fn no_fills() -> Segments {
    Segments::new((GuestAddress(0), 0, false))
}

/// Adds a data segment; empty ones carry nothing and are left out.
fn push_segment(segments: &mut Segments, segment: (GuestAddress, u32, bool)) {
    if segment.1 != 0 {
        segments.push(segment);
    }
}

pub fn parse(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    limits: &RequestLimits,
) -> Parsed {
    let head = chain.head_index();
    let mut descriptors = chain;
    let Some(header_desc) = descriptors.next() else {
        return Parsed::Broken {
            reason: "empty or unreadable descriptor chain",
            fatal: true,
        };
    };
    // Every descriptor between the header and the last one carries data.
    let mut segments = no_fills();
    let mut last = header_desc;
    let mut count = 1usize;
    for d in descriptors {
        if count >= 2 {
            push_segment(
                &mut segments,
                (last.addr(), last.len(), last.is_write_only()),
            );
        }
        last = d;
        count += 1;
    }
    let last = &last;
    if last.has_next() {
        // The chain iterator stops after queue-size descriptors or at an index out of range:
        // a loop, or a next pointer off the table.
        return Parsed::Broken {
            reason: "descriptor loop or next index out of range",
            fatal: true,
        };
    }
    if !last.is_write_only() || last.len() == 0 {
        return Parsed::Broken {
            reason: "last descriptor cannot hold the status byte",
            fatal: false,
        };
    }
    let Some(status) = last.addr().checked_add(u64::from(last.len()) - 1) else {
        return Parsed::Broken {
            reason: "status byte address overflows",
            fatal: false,
        };
    };
    if mem.get_slice(status, 1).is_err() {
        return Parsed::Broken {
            reason: "status byte outside guest memory",
            fatal: false,
        };
    }
    let ioerr = |reason: &str| {
        log::debug!("virtio-blk chain {head}: {reason}");
        answer(status, VIRTIO_BLK_S_IOERR)
    };

    if count < 2 {
        return ioerr("chain too short for header and status");
    }
    if header_desc.is_write_only() || header_desc.len() < HEADER_LEN {
        return ioerr("header descriptor is not a readable 16-byte buffer");
    }
    // One region lookup for the whole header (guest RAM regions are never adjacent, so a
    // header cannot straddle two) rather than one per field: region lookups were the I/O
    // thread's largest cost after the data copy.
    let Ok(header) = mem.get_slice(header_desc.addr(), HEADER_LEN as usize) else {
        return ioerr("header outside guest memory");
    };
    let (Ok(request_type), Ok(sector)) = (header.read_obj::<u32>(0), header.read_obj::<u64>(8))
    else {
        return ioerr("header outside guest memory");
    };

    // Data: every descriptor between header and status, plus the status descriptor's bytes
    // before the status byte (drivers may put the two together).
    if last.len() > 1 {
        push_segment(&mut segments, (last.addr(), last.len() - 1, true));
    }
    let data = &segments[..];

    match request_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let is_read = request_type == VIRTIO_BLK_T_IN;
            if data.is_empty() {
                return ioerr("read/write without data buffers");
            }
            if data.len() > limits.seg_max as usize {
                return ioerr("more data segments than SEG_MAX");
            }
            if data.iter().any(|&(_, _, writable)| writable != is_read) {
                return ioerr("data buffer in the wrong direction");
            }
            if !is_read && limits.readonly {
                return ioerr("write to a read-only disk");
            }
            let total: u64 = data.iter().map(|&(_, len, _)| u64::from(len)).sum();
            if !total.is_multiple_of(SECTOR_SIZE) {
                return ioerr("data length is not a multiple of 512");
            }
            let Some(offset) = sector.checked_mul(SECTOR_SIZE) else {
                return ioerr("sector number overflows");
            };
            if offset
                .checked_add(total)
                .is_none_or(|end| end > limits.capacity_bytes)
            {
                return ioerr("sector past the end of the disk");
            }
            let mut buffers = Buffers::new();
            for &(addr, len, _) in data {
                let Ok(slice) = mem.get_slice(addr, len as usize) else {
                    return ioerr("data buffer outside guest memory");
                };
                // SAFETY: the slice was bounds-checked against guest memory just now, and guest
                // memory stays mapped for the VM's life; the buffer is only used by this request
                // until its completion is reaped (or the engine is dropped at device reset).
                buffers
                    .push(unsafe { HostBuffer::new(slice.ptr_guard_mut().as_ptr(), len as usize) });
            }
            let user_data = u64::from(head);
            let (request, used_len, fills) = if is_read {
                let fills = segments.clone();
                (
                    Request::read(offset, buffers, user_data),
                    total as u32 + 1,
                    fills,
                )
            } else {
                (Request::write(offset, buffers, user_data), 1, no_fills())
            };
            Parsed::Submit {
                request,
                status,
                used_len,
                fills,
            }
        }
        VIRTIO_BLK_T_FLUSH => Parsed::Submit {
            request: Request::flush(u64::from(head)),
            status,
            used_len: 1,
            fills: no_fills(),
        },
        VIRTIO_BLK_T_GET_ID => {
            let Some(&(addr, len, writable)) = data.first() else {
                return ioerr("GET_ID without a buffer");
            };
            if !writable {
                return ioerr("GET_ID buffer is not writable");
            }
            let n = (len as usize).min(VIRTIO_BLK_ID_BYTES);
            if mem.write_slice(&limits.serial[..n], addr).is_err() {
                return ioerr("GET_ID buffer outside guest memory");
            }
            Parsed::Answer {
                status,
                value: VIRTIO_BLK_S_OK,
                used_len: n as u32 + 1,
            }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = request_type == VIRTIO_BLK_T_DISCARD;
            if (discard && !limits.discard) || (!discard && !limits.write_zeroes) {
                return answer(status, VIRTIO_BLK_S_UNSUPP);
            }
            if limits.readonly {
                return ioerr("discard/write-zeroes on a read-only disk");
            }
            let Some(&(addr, len, writable)) = data.first() else {
                return ioerr("discard/write-zeroes without a segment");
            };
            if writable || len < DISCARD_SEGMENT_LEN || data.len() > 1 {
                return ioerr("discard/write-zeroes needs exactly one readable 16-byte segment");
            }
            if len > DISCARD_SEGMENT_LEN {
                // max_discard_seg = max_write_zeroes_seg = 1
                return answer(status, VIRTIO_BLK_S_UNSUPP);
            }
            let segment_sector = mem.read_obj::<u64>(addr);
            let num_sectors = addr.checked_add(8).map(|a| mem.read_obj::<u32>(a));
            let flags = addr.checked_add(12).map(|a| mem.read_obj::<u32>(a));
            let (Ok(segment_sector), Some(Ok(num_sectors)), Some(Ok(flags))) =
                (segment_sector, num_sectors, flags)
            else {
                return ioerr("segment outside guest memory");
            };
            if (discard && flags != 0) || flags & !DISCARD_FLAG_UNMAP != 0 {
                return answer(status, VIRTIO_BLK_S_UNSUPP);
            }
            if num_sectors > MAX_DISCARD_SECTORS {
                return ioerr("segment larger than the advertised maximum");
            }
            let offset = segment_sector.checked_mul(SECTOR_SIZE);
            let len = u64::from(num_sectors) * SECTOR_SIZE;
            let Some(offset) = offset.filter(|o| {
                o.checked_add(len)
                    .is_some_and(|end| end <= limits.capacity_bytes)
            }) else {
                return ioerr("segment past the end of the disk");
            };
            let user_data = u64::from(head);
            let request = if discard {
                Request::discard(offset, len, user_data)
            } else {
                Request::write_zeroes(offset, len, flags & DISCARD_FLAG_UNMAP != 0, user_data)
            };
            Parsed::Submit {
                request,
                status,
                used_len: 1,
                fills: no_fills(),
            }
        }
        other => {
            log::debug!("virtio-blk chain {head}: unknown request type {other}");
            answer(status, VIRTIO_BLK_S_UNSUPP)
        }
    }
}
