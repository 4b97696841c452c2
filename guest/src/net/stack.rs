//! A minimal IPv4 host: answers ARP for its address and ICMP echo, echoes UDP port 7, and
//! builds UDP datagrams. Frames are plain Ethernet II; IP fragments are not reassembled.

pub const ETH_HLEN: usize = 14;
pub const IP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
/// The largest UDP payload in one unfragmented 1500-byte IP packet.
pub const MAX_UDP_PAYLOAD: usize = 1500 - IP_HLEN - UDP_HLEN;
pub const ECHO_PORT: u16 = 7;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const PROTO_ICMP: u8 = 1;
const PROTO_UDP: u8 = 17;
const BROADCAST: [u8; 6] = [0xff; 6];

#[derive(Clone, Copy)]
pub struct Addr {
    pub ip: [u8; 4],
    pub prefix: u8,
}

/// `A.B.C.D/N` (N defaults to 24).
pub fn parse_ip(s: &str) -> Option<Addr> {
    let (ip, prefix) = match s.split_once('/') {
        Some((ip, p)) => (ip, p.parse::<u8>().ok().filter(|p| *p <= 32)?),
        None => (s, 24),
    };
    let mut out = [0u8; 4];
    let mut parts = ip.split('.');
    for b in &mut out {
        *b = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(Addr { ip: out, prefix })
}

/// `A.B.C.D:PORT`.
pub fn parse_endpoint(s: &str) -> Option<([u8; 4], u16)> {
    let (ip, port) = s.split_once(':')?;
    Some((parse_ip(ip)?.ip, port.parse().ok()?))
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u32) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// What a received frame was.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    ArpRequest,
    ArpReply { ip: [u8; 4], mac: [u8; 6] },
    IcmpEcho,
    Udp { port: u16, payload_len: usize },
    Other,
}

pub struct Host {
    pub mac: [u8; 6],
    pub addr: Addr,
    ip_id: u16,
}

impl Host {
    pub fn new(mac: [u8; 6], addr: Addr) -> Host {
        Host {
            mac,
            addr,
            ip_id: 1,
        }
    }

    /// Classifies `frame` and, when it calls for an answer (ARP request for us, ICMP echo,
    /// UDP to port 7 when `echo_udp`), writes the answer into `out` and returns its length.
    pub fn handle(&mut self, frame: &[u8], out: &mut [u8], echo_udp: bool) -> (Kind, usize) {
        if frame.len() < ETH_HLEN || (frame[..6] != self.mac && frame[..6] != BROADCAST) {
            return (Kind::Other, 0);
        }
        match be16(frame, 12) {
            ETHERTYPE_ARP => self.arp(frame, out),
            ETHERTYPE_IPV4 => self.ipv4(frame, out, echo_udp),
            _ => (Kind::Other, 0),
        }
    }

    fn arp(&self, frame: &[u8], out: &mut [u8]) -> (Kind, usize) {
        let a = &frame[ETH_HLEN..];
        // Ethernet/IPv4 ARP only.
        if a.len() < 28 || be16(a, 0) != 1 || be16(a, 2) != ETHERTYPE_IPV4 || a[4] != 6 || a[5] != 4
        {
            return (Kind::Other, 0);
        }
        let sender_mac: [u8; 6] = a[8..14].try_into().unwrap();
        let sender_ip: [u8; 4] = a[14..18].try_into().unwrap();
        match be16(a, 6) {
            1 if a[24..28] == self.addr.ip => {
                let len = ETH_HLEN + 28;
                out[..6].copy_from_slice(&sender_mac);
                out[6..12].copy_from_slice(&self.mac);
                put16(out, 12, ETHERTYPE_ARP);
                let r = &mut out[ETH_HLEN..len];
                r[..6].copy_from_slice(&a[..6]);
                put16(r, 6, 2);
                r[8..14].copy_from_slice(&self.mac);
                r[14..18].copy_from_slice(&self.addr.ip);
                r[18..24].copy_from_slice(&sender_mac);
                r[24..28].copy_from_slice(&sender_ip);
                (Kind::ArpRequest, len)
            }
            2 => (
                Kind::ArpReply {
                    ip: sender_ip,
                    mac: sender_mac,
                },
                0,
            ),
            _ => (Kind::Other, 0),
        }
    }

    fn ipv4(&mut self, frame: &[u8], out: &mut [u8], echo_udp: bool) -> (Kind, usize) {
        let ip = &frame[ETH_HLEN..];
        if ip.len() < IP_HLEN || ip[0] >> 4 != 4 {
            return (Kind::Other, 0);
        }
        let ihl = ((ip[0] & 0xf) as usize) * 4;
        let total = be16(ip, 2) as usize;
        if ihl < IP_HLEN || total < ihl || total > ip.len() || ip[16..20] != self.addr.ip {
            return (Kind::Other, 0);
        }
        // Fragments (MF set or an offset) are not reassembled.
        if be16(ip, 6) & 0x3fff != 0 {
            return (Kind::Other, 0);
        }
        let l4 = &ip[ihl..total];
        match ip[9] {
            PROTO_ICMP if l4.len() >= 8 && l4[0] == 8 => {
                let len = ETH_HLEN + total;
                out[..len].copy_from_slice(&frame[..len]);
                self.swap_headers(out, ihl);
                let icmp = &mut out[ETH_HLEN + ihl..len];
                icmp[0] = 0;
                put16(icmp, 2, 0);
                let c = checksum(icmp);
                put16(icmp, 2, c);
                (Kind::IcmpEcho, len)
            }
            PROTO_UDP if l4.len() >= UDP_HLEN => {
                let port = be16(l4, 2);
                let udp_len = (be16(l4, 4) as usize).clamp(UDP_HLEN, l4.len());
                let kind = Kind::Udp {
                    port,
                    payload_len: udp_len - UDP_HLEN,
                };
                if !(echo_udp && port == ECHO_PORT) {
                    return (kind, 0);
                }
                let len = ETH_HLEN + total;
                out[..len].copy_from_slice(&frame[..len]);
                self.swap_headers(out, ihl);
                let udp = &mut out[ETH_HLEN + ihl..];
                let (sport, dport) = (be16(udp, 0), be16(udp, 2));
                put16(udp, 0, dport);
                put16(udp, 2, sport);
                // A zero UDP checksum means "none" in IPv4.
                put16(udp, 6, 0);
                (kind, len)
            }
            _ => (Kind::Other, 0),
        }
    }

    /// Turns a copied request around: MACs and IPs swapped, fresh IP id and checksum.
    fn swap_headers(&mut self, out: &mut [u8], ihl: usize) {
        let mut src = [0u8; 6];
        src.copy_from_slice(&out[6..12]);
        out[..6].copy_from_slice(&src);
        out[6..12].copy_from_slice(&self.mac);
        let ip = &mut out[ETH_HLEN..ETH_HLEN + ihl];
        let mut sip = [0u8; 4];
        sip.copy_from_slice(&ip[12..16]);
        ip.copy_within(12..16, 16);
        ip[12..16].copy_from_slice(&sip);
        ip[16..20].copy_from_slice(&sip);
        ip[12..16].copy_from_slice(&self.addr.ip);
        ip[8] = 64;
        put16(ip, 4, self.next_id());
        put16(ip, 10, 0);
        let c = checksum(ip);
        put16(ip, 10, c);
    }

    fn next_id(&mut self) -> u16 {
        self.ip_id = self.ip_id.wrapping_add(1);
        self.ip_id
    }

    /// An ARP request for `ip` into `out`; returns its length.
    pub fn arp_request(&self, ip: [u8; 4], out: &mut [u8]) -> usize {
        let len = ETH_HLEN + 28;
        out[..6].copy_from_slice(&BROADCAST);
        out[6..12].copy_from_slice(&self.mac);
        put16(out, 12, ETHERTYPE_ARP);
        let r = &mut out[ETH_HLEN..len];
        put16(r, 0, 1);
        put16(r, 2, ETHERTYPE_IPV4);
        r[4] = 6;
        r[5] = 4;
        put16(r, 6, 1);
        r[8..14].copy_from_slice(&self.mac);
        r[14..18].copy_from_slice(&self.addr.ip);
        r[18..24].fill(0);
        r[24..28].copy_from_slice(&ip);
        len
    }

    /// A UDP datagram with `payload_len` bytes whose first 8 are `seq` (big-endian).
    pub fn udp(
        &mut self,
        dst_mac: [u8; 6],
        dst: ([u8; 4], u16),
        src_port: u16,
        seq: u64,
        payload_len: usize,
        out: &mut [u8],
    ) -> usize {
        let total = IP_HLEN + UDP_HLEN + payload_len;
        let len = ETH_HLEN + total;
        out[..6].copy_from_slice(&dst_mac);
        out[6..12].copy_from_slice(&self.mac);
        put16(out, 12, ETHERTYPE_IPV4);
        let id = self.next_id();
        let ip = &mut out[ETH_HLEN..ETH_HLEN + IP_HLEN];
        ip[0] = 0x45;
        ip[1] = 0;
        put16(ip, 2, total as u16);
        put16(ip, 4, id);
        put16(ip, 6, 0x4000); // don't fragment
        ip[8] = 64;
        ip[9] = PROTO_UDP;
        put16(ip, 10, 0);
        ip[12..16].copy_from_slice(&self.addr.ip);
        ip[16..20].copy_from_slice(&dst.0);
        let c = checksum(ip);
        put16(ip, 10, c);
        let udp = &mut out[ETH_HLEN + IP_HLEN..len];
        put16(udp, 0, src_port);
        put16(udp, 2, dst.1);
        put16(udp, 4, (UDP_HLEN + payload_len) as u16);
        put16(udp, 6, 0);
        let payload = &mut udp[UDP_HLEN..];
        let seq = seq.to_be_bytes();
        let n = payload.len().min(8);
        payload[..n].copy_from_slice(&seq[..n]);
        len
    }
}
