//! The host side of bench/net.py's packet-rate runs, native so that the benchmark measures the
//! VMM rather than a Python loop: one `sendto` per datagram capped host-to-guest rates, and one
//! `recvfrom` per datagram lost up to a tenth of what the guest sent at 200k pps.
//!
//! ```text
//! udp-peer source DST_IP:PORT SIZE SECS   sends SIZE-byte datagrams for SECS seconds in
//!                                         `sendmmsg` batches; each payload starts with its
//!                                         big-endian sequence number;
//!                                         prints `source packets=N errors=N`
//! udp-peer sink BIND_IP:PORT IDLE_SECS    counts datagrams (`recvmmsg` batches) until IDLE_SECS
//!                                         pass without one after the first (which it waits 60 s
//!                                         for); prints `sink ready` once bound, then
//!                                         `sink packets=N bytes=N unique=N rcvbuf=N`
//! ```
//!
//! The lines match tests/net_peer.py's `source` and `sink` (the fields after theirs are extra),
//! so net.py reads either the same way.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::{self, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

const USAGE: &str =
    "usage: udp-peer source DST_IP:PORT SIZE SECS | udp-peer sink BIND_IP:PORT IDLE_SECS";
/// Datagrams per `sendmmsg`/`recvmmsg`.
const BATCH: usize = 64;
const SEQ_LEN: usize = 8;
/// The largest UDP payload over IPv4.
const MAX_PAYLOAD: usize = 65507;
/// Big enough for any datagram, so none is truncated whatever the sender's size.
const RECV_BUF_LEN: usize = 65536;
/// The sink's socket buffer: a burst the sink is slow to drain waits here instead of being
/// dropped (the same figure tests/net_peer.py asks for).
const SINK_RCVBUF: libc::c_int = 64 << 20;
const FIRST_DATAGRAM_WAIT: Duration = Duration::from_secs(60);
/// Sequence numbers below this are kept in a bitmap (at most 16 MiB); the rest in a hash set.
const BITMAP_SEQS: u64 = 1 << 27;

#[derive(Debug, PartialEq)]
enum Command {
    Source {
        dst: SocketAddr,
        size: usize,
        duration: Duration,
    },
    Sink {
        bind: SocketAddr,
        idle: Duration,
    },
}

fn parse_args(args: &[String]) -> Result<Command, String> {
    match args {
        [mode, dst, size, secs] if mode == "source" => Ok(Command::Source {
            dst: parse_addr(dst, "DST_IP:PORT")?,
            size: parse_size(size)?,
            duration: parse_secs(secs, "SECS")?,
        }),
        [mode, bind, idle] if mode == "sink" => Ok(Command::Sink {
            bind: parse_addr(bind, "BIND_IP:PORT")?,
            idle: parse_secs(idle, "IDLE_SECS")?,
        }),
        [mode, ..] if mode == "source" => Err("source takes DST_IP:PORT SIZE SECS".into()),
        [mode, ..] if mode == "sink" => Err("sink takes BIND_IP:PORT IDLE_SECS".into()),
        [mode, ..] => Err(format!("unknown mode {mode:?}")),
        [] => Err("no mode given".into()),
    }
}

fn parse_addr(text: &str, what: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("{what} must be an address with a port, not {text:?}"))
}

fn parse_size(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(size) if (SEQ_LEN..=MAX_PAYLOAD).contains(&size) => Ok(size),
        _ => Err(format!(
            "SIZE must be {SEQ_LEN}..={MAX_PAYLOAD} bytes (the payload starts with an \
             {SEQ_LEN}-byte sequence number), not {text:?}"
        )),
    }
}

fn parse_secs(text: &str, what: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .filter(|secs| *secs > 0.0)
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .ok_or_else(|| format!("{what} must be a positive number of seconds, not {text:?}"))
}

/// `count` datagram buffers of `len` bytes each and the headers `sendmmsg`/`recvmmsg` take.
struct MsgBatch {
    buffers: Vec<u8>,
    len: usize,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

impl MsgBatch {
    fn new(count: usize, len: usize) -> Self {
        let iovec = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        // SAFETY: mmsghdr is a plain C struct (pointers, lengths, flags): all zeroes is a valid,
        // empty value, and `arm` fills in what the calls read before each one.
        let header: libc::mmsghdr = unsafe { std::mem::zeroed() };
        MsgBatch {
            buffers: vec![0; count * len],
            len,
            iovecs: vec![iovec; count],
            headers: vec![header; count],
        }
    }

    fn payloads_mut(&mut self) -> std::slice::ChunksExactMut<'_, u8> {
        self.buffers.chunks_exact_mut(self.len)
    }

    /// The `index`th datagram of the last `recv`.
    fn received(&self, index: usize) -> &[u8] {
        let start = index * self.len;
        let len = (self.headers[index].msg_len as usize).min(self.len);
        &self.buffers[start..start + len]
    }

    /// Points the first `count` headers at their buffers, afresh before every call so the
    /// pointers come from the latest borrow of `buffers`.
    fn arm(&mut self, count: usize) -> *mut libc::mmsghdr {
        let base = self.buffers.as_mut_ptr();
        for (index, iovec) in self.iovecs[..count].iter_mut().enumerate() {
            iovec.iov_base = base.wrapping_add(index * self.len).cast();
            iovec.iov_len = self.len;
        }
        let iovecs = self.iovecs.as_mut_ptr();
        for (index, header) in self.headers[..count].iter_mut().enumerate() {
            header.msg_hdr.msg_iov = iovecs.wrapping_add(index);
            header.msg_hdr.msg_iovlen = 1;
            header.msg_len = 0;
        }
        self.headers.as_mut_ptr()
    }

    /// Sends the first `count` payloads on the connected `socket`; returns how many the kernel
    /// took.
    fn send(&mut self, socket: &UdpSocket, count: usize) -> io::Result<usize> {
        let headers = self.arm(count);
        // SAFETY: `arm` pointed the first `count` headers at iovecs covering this batch's own
        // buffers, all alive and unborrowed for the call; the kernel only reads them.
        let sent = unsafe { libc::sendmmsg(socket.as_raw_fd(), headers, count as libc::c_uint, 0) };
        if sent < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(sent as usize)
        }
    }

    /// Waits (up to the socket's read timeout) for one datagram, then takes as many more as are
    /// queued, up to the batch size; returns how many arrived.
    fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        let count = self.headers.len();
        let headers = self.arm(count);
        // SAFETY: `arm` pointed every header at an iovec of `len` bytes inside this batch's own
        // buffers, all alive and unborrowed for the call: the kernel writes no more than that
        // into them, plus each datagram's length into its header; no timeout pointer.
        let got = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                headers,
                count as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if got < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(got as usize)
        }
    }
}

#[derive(Debug, Default, PartialEq)]
struct SourceCounts {
    /// Datagrams the kernel accepted.
    packets: u64,
    /// `sendmmsg` calls that failed with a transient error (and were retried).
    errors: u64,
}

fn source(dst: SocketAddr, size: usize, duration: Duration) -> Result<SourceCounts> {
    let local: SocketAddr = if dst.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let socket = UdpSocket::bind(local).context("binding the source socket")?;
    socket
        .connect(dst)
        .with_context(|| format!("connecting the source socket to {dst}"))?;
    send_until(&socket, size, Instant::now() + duration, u64::MAX)
}

/// Sends `size`-byte datagrams numbered from 0 on the connected `socket` until `deadline` or
/// `max_packets` sent. A number is used again if the kernel refused its datagram, so the ones
/// sent are 0..packets.
fn send_until(
    socket: &UdpSocket,
    size: usize,
    deadline: Instant,
    max_packets: u64,
) -> Result<SourceCounts> {
    let mut batch = MsgBatch::new(BATCH, size);
    let mut counts = SourceCounts::default();
    while counts.packets < max_packets && Instant::now() < deadline {
        let count = (max_packets - counts.packets).min(BATCH as u64) as usize;
        for (seq, payload) in (counts.packets..).zip(batch.payloads_mut().take(count)) {
            payload[..SEQ_LEN].copy_from_slice(&seq.to_be_bytes());
        }
        match batch.send(socket, count) {
            Ok(sent) => counts.packets += sent as u64,
            Err(err) if is_transient(&err) => counts.errors += 1,
            Err(err) => return Err(err).context("sendmmsg"),
        }
    }
    Ok(counts)
}

/// Errors a flood meets and outlives: a full queue, a signal, and the ICMP errors a connected
/// UDP socket reports once each (the peer not listening yet, a neighbour not answering).
fn is_transient(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(
            libc::ENOBUFS
                | libc::EAGAIN
                | libc::EINTR
                | libc::ENOMEM
                | libc::ECONNREFUSED
                | libc::EHOSTUNREACH
        )
    )
}

#[derive(Debug, Default, PartialEq)]
struct SinkCounts {
    packets: u64,
    bytes: u64,
    /// Distinct payload prefixes (sequence numbers).
    unique: u64,
}

fn sink(bind: SocketAddr, idle: Duration) -> Result<()> {
    let socket = UdpSocket::bind(bind).with_context(|| format!("binding the sink to {bind}"))?;
    let rcvbuf = enlarge_receive_buffer(&socket)?;
    emit("sink ready")?;
    let counts = receive_until_idle(&socket, FIRST_DATAGRAM_WAIT, idle)?;
    emit(&format!(
        "sink packets={} bytes={} unique={} rcvbuf={rcvbuf}",
        counts.packets, counts.bytes, counts.unique
    ))
}

/// Counts datagrams until `idle` passes without one, after waiting up to `first_wait` for the
/// first.
fn receive_until_idle(
    socket: &UdpSocket,
    first_wait: Duration,
    idle: Duration,
) -> Result<SinkCounts> {
    socket
        .set_read_timeout(Some(first_wait))
        .context("setting the sink's read timeout")?;
    let mut batch = MsgBatch::new(BATCH, RECV_BUF_LEN);
    let mut seen = SeqSet::default();
    let mut counts = SinkCounts::default();
    loop {
        let got = match batch.recv(socket) {
            Ok(got) => got,
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err).context("recvmmsg"),
        };
        if counts.packets == 0 && got > 0 {
            socket
                .set_read_timeout(Some(idle))
                .context("setting the sink's idle timeout")?;
        }
        for index in 0..got {
            let datagram = batch.received(index);
            counts.packets += 1;
            counts.bytes += datagram.len() as u64;
            seen.insert(&datagram[..datagram.len().min(SEQ_LEN)]);
        }
    }
    counts.unique = seen.len();
    Ok(counts)
}

/// Asks for SINK_RCVBUF bytes of socket buffer, past the system's cap if allowed
/// (SO_RCVBUFFORCE needs CAP_NET_ADMIN), and returns the size the kernel reports.
fn enlarge_receive_buffer(socket: &UdpSocket) -> Result<libc::c_int> {
    let fd = socket.as_raw_fd();
    if set_socket_option(fd, libc::SO_RCVBUFFORCE, SINK_RCVBUF).is_err() {
        set_socket_option(fd, libc::SO_RCVBUF, SINK_RCVBUF).context("setting SO_RCVBUF")?;
    }
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are live locals of the sizes `len` states; the kernel writes at
    // most `len` bytes into `value`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error()).context("reading SO_RCVBUF");
    }
    Ok(value)
}

fn set_socket_option(fd: libc::c_int, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: the kernel reads one c_int from `value`, a live local of that size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The distinct payload prefixes seen: full 8-byte sequence numbers in a growing bitmap, anything
/// else (huge numbers, datagrams shorter than 8 bytes) in a hash set keyed by length and bytes.
#[derive(Default)]
struct SeqSet {
    bitmap: Vec<u64>,
    others: HashSet<(u8, u64)>,
    distinct: u64,
}

impl SeqSet {
    fn insert(&mut self, prefix: &[u8]) {
        let mut bytes = [0u8; SEQ_LEN];
        bytes[..prefix.len()].copy_from_slice(prefix);
        let value = u64::from_be_bytes(bytes);
        let new = if prefix.len() == SEQ_LEN && value < BITMAP_SEQS {
            let word = (value / 64) as usize;
            if word >= self.bitmap.len() {
                self.bitmap.resize((word + 1).next_power_of_two(), 0);
            }
            let bit = 1u64 << (value % 64);
            let new = self.bitmap[word] & bit == 0;
            self.bitmap[word] |= bit;
            new
        } else {
            self.others.insert((prefix.len() as u8, value))
        };
        self.distinct += u64::from(new);
    }

    fn len(&self) -> u64 {
        self.distinct
    }
}

fn emit(line: &str) -> Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .context("writing to stdout")
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Source {
            dst,
            size,
            duration,
        } => {
            let counts = source(dst, size, duration)?;
            emit(&format!(
                "source packets={} errors={}",
                counts.packets, counts.errors
            ))
        }
        Command::Sink { bind, idle } => sink(bind, idle),
    }
}

fn main() -> ExitCode {
    let args: Result<Vec<String>, OsString> = std::env::args_os()
        .skip(1)
        .map(OsString::into_string)
        .collect();
    let command = match args
        .map_err(|arg| format!("argument {arg:?} is not UTF-8"))
        .and_then(|args| parse_args(&args))
    {
        Ok(command) => command,
        Err(msg) => {
            eprintln!("udp-peer: {msg}; {USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("udp-peer: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn parses_source_and_sink_arguments() {
        assert_eq!(
            parse_args(&args(&["source", "10.0.0.2:9001", "200", "3"])),
            Ok(Command::Source {
                dst: "10.0.0.2:9001".parse().unwrap(),
                size: 200,
                duration: Duration::from_secs(3),
            })
        );
        assert_eq!(
            parse_args(&args(&["sink", "10.0.0.1:9000", "0.5"])),
            Ok(Command::Sink {
                bind: "10.0.0.1:9000".parse().unwrap(),
                idle: Duration::from_millis(500),
            })
        );
    }

    #[test]
    fn rejects_bad_arguments_with_a_message() {
        for bad in [
            &[][..],
            &["flood", "10.0.0.2:9001"],
            &["source", "10.0.0.2", "200", "3"],
            &["source", "10.0.0.2:9001", "7", "3"],
            &["source", "10.0.0.2:9001", "65508", "3"],
            &["source", "10.0.0.2:9001", "200", "0"],
            &["source", "10.0.0.2:9001", "200", "-1"],
            &["source", "10.0.0.2:9001", "200", "nan"],
            &["source", "10.0.0.2:9001", "200", "inf"],
            &["source", "10.0.0.2:9001", "200"],
            &["sink", "10.0.0.1:9000"],
            &["sink", "10.0.0.1:9000", "3", "extra"],
        ] {
            let err = parse_args(&args(bad)).expect_err(&format!("{bad:?} was accepted"));
            assert!(!err.is_empty() && !err.contains('\n'), "{bad:?}: {err:?}");
        }
    }

    #[test]
    fn seq_set_counts_each_prefix_once() {
        let mut seen = SeqSet::default();
        for seq in [
            0u64,
            1,
            1000,
            1,
            0,
            BITMAP_SEQS + 5,
            BITMAP_SEQS + 5,
            u64::MAX,
        ] {
            seen.insert(&seq.to_be_bytes());
        }
        // Short prefixes differ from the 8-byte number they would pad to.
        seen.insert(&[0, 0, 0, 0]);
        seen.insert(&[0, 0, 0, 0]);
        seen.insert(&[]);
        assert_eq!(seen.len(), 5 + 2);
    }

    #[test]
    fn loopback_sink_counts_every_datagram_the_source_sent() {
        let sink_socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        // Even the default buffer holds these 200 small datagrams if the sink falls behind.
        enlarge_receive_buffer(&sink_socket).unwrap();
        let sink_addr = sink_socket.local_addr().unwrap();
        let sink = std::thread::spawn(move || {
            receive_until_idle(
                &sink_socket,
                Duration::from_secs(5),
                Duration::from_millis(200),
            )
        });
        let source_socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        source_socket.connect(sink_addr).unwrap();
        let far_deadline = Instant::now() + Duration::from_secs(5);
        // 200 = three full batches and a partial one.
        let sent = send_until(&source_socket, 64, far_deadline, 200).unwrap();
        assert_eq!(
            sent,
            SourceCounts {
                packets: 200,
                errors: 0
            }
        );
        let got = sink.join().unwrap().unwrap();
        assert_eq!(
            got,
            SinkCounts {
                packets: 200,
                bytes: 200 * 64,
                unique: 200
            }
        );
    }

    #[test]
    fn source_stops_at_its_deadline() {
        let target = UdpSocket::bind("127.0.0.1:0").unwrap();
        let source_socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        source_socket.connect(target.local_addr().unwrap()).unwrap();
        let start = Instant::now();
        let sent = send_until(
            &source_socket,
            200,
            start + Duration::from_millis(50),
            u64::MAX,
        )
        .unwrap();
        assert!(sent.packets > 0);
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn sink_reports_nothing_when_no_datagram_comes() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let got =
            receive_until_idle(&socket, Duration::from_millis(50), Duration::from_secs(5)).unwrap();
        assert_eq!(got, SinkCounts::default());
    }
}
