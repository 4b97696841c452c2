//! `--net tap=NAME[,mac=MAC][,ioeventfd=on|off|auto][,transport=transitional|modern|legacy]
//! [,queues=N][,id=ID][,queue_size=N][,poll_us=N][,tx_inline=N]` parsed into a [`NetConfig`].

use std::str::FromStr;

use super::device::{DEFAULT_QUEUE_SIZE, MAX_QUEUE_PAIRS};
use crate::transport::TransportKind;

/// With `ioeventfd=on`, how long the I/O thread keeps polling a pair after its last progress
/// (0: it sleeps in epoll right away). Measured harmful on a 2-core host, hence 0.
pub const DEFAULT_POLL_US: u32 = 0;
/// With `auto`, how long the I/O thread waits for a reply after delivering frames (0: never;
/// `poll_us=N` sets it). It was off for a while: its timeout meeting the guest's next frame
/// made the TX ring look out of range (NEEDS_RESET, a stalled echo); fixed in `tx_run`.
pub const DEFAULT_REPLY_POLL_US: u32 = 30;
/// With `auto`, how many TX frames the vCPU sends on its kick before it hands the rest of a
/// burst to the I/O thread; 0: it sends the whole burst. Handing off measured worse here (see
/// `IoeventfdPolicy`), hence 0.
pub const DEFAULT_TX_INLINE: u16 = 0;

/// How kicks reach the device, and what `auto` is.
///
/// What `bench/net.py` measured on the development host (PVM KVM, 2 cores, 1 vCPU whose guest
/// spins while it waits, so one core is always the vCPU's; figures in the README):
/// * `on` (ioeventfd) did not beat `off` (sync exits) on either axis here. Guest-to-host
///   packet rates were lower in most rounds (e.g. 64 B: 17-30k vs 44-67k pps): with
///   ioeventfd the I/O thread's `writev` and the host stack's work on those frames run on the
///   one free core beside the receiving process, while a sync kick does them on the vCPU's
///   core. The 200-byte echo round trip was a tie (median 105-118 µs vs 114-131 µs).
/// * Tried for `auto` and dropped: ioeventfd plus the I/O thread's bounded poll (50 µs, TX
///   kicks off meanwhile; still `on,poll_us=N`): round trips got worse (171 µs) because the
///   poll burns the free core the host side needs. Sync kicks with bursts beyond 8 frames
///   handed to the I/O thread (still `tx_inline=N`): 1400-byte streams fell to 9-13k pps
///   against 30-60k for `off`, for the same reason.
/// * `auto` (chosen): sync kicks, the vCPU sending whole bursts as `off` does, plus one thing
///   neither plain mode has: after delivering frames the I/O thread suppresses TX kicks and
///   waits up to `poll_us` (30 µs) for the guest's answer, sending it itself, so a reply costs
///   the guest no exit. It only waits while transmits follow receives (request/response); a
///   fruitless wait turns it off until a transmit again comes soon enough after a receive
///   that the wait would have caught it (within `poll_us`), so floods in either direction,
///   and guests that take an interrupt before answering, pay nothing. Echo round trips: median 24-45 µs in the runs
///   where the I/O thread and the vCPU ran on different cores, against ~110 µs for `on` and
///   `off`; but when the scheduler put both on one core the wait only delayed the reply
///   (136-152 µs, every wait fruitless), so the I/O thread now waits only when it runs on
///   another CPU than the last kick did, and `auto` is then `off` (93-118 µs vs 93-110 µs).
///   In the 3-round table this gives `auto` the TX rates of `off` but no reliable round-trip
///   win: the goal of beating both plain modes on every row is not met on this host.
///   Session 2: the wait's stall was a false "available index out of range" in `tx_run`
///   (fixed); with it back on by default, 5 interleaved rounds each (load 2.5-4.4): polled
///   echo median 34 µs (22-92) vs 110 (51-110) without it and 88 for `off`; at heavier load
///   94 (92-96) vs 93 (25-118) and 99 for `off`; by interrupt 108 (93-131) vs 106 (100-123),
///   `off` 104. It helps when the I/O thread finds a free core and costs nothing measurable
///   otherwise, so it stays on. The whole table (3 interleaved rounds, load 0.6-2.4, polled):
///   `auto` echo 37 µs (33-117), p99 77, against `off` 71 / 123 and QEMU's best 66 / 121;
///   g2h and h2g pps above QEMU's best on every row but h2g 1400 B (98k vs 106k, with rounds
///   of 55-112k vs 100-112k: there the Python source, not the device, sets the rate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoeventfdPolicy {
    On,
    Off,
    Auto,
}

impl IoeventfdPolicy {
    pub fn name(self) -> &'static str {
        match self {
            IoeventfdPolicy::On => "on",
            IoeventfdPolicy::Off => "off",
            IoeventfdPolicy::Auto => "auto",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetConfigError {
    #[error("--net needs tap=NAME")]
    MissingTap,
    #[error("--net: unknown option `{0}` (known: tap, mac, ioeventfd, transport, queues, id, queue_size, poll_us, tx_inline)")]
    UnknownOption(String),
    #[error("--net: option `{0}` given twice")]
    Duplicate(String),
    #[error("--net: `{key}={value}`: expected {expected}")]
    BadValue {
        key: String,
        value: String,
        expected: &'static str,
    },
}

/// One `--net`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The host tap interface; opened if it exists, else created (and gone at exit).
    pub tap: String,
    /// The guest's MAC address; `52:54:00:12:34:5N` (N: the device's index) by default.
    pub mac: Option<[u8; 6]>,
    pub ioeventfd: IoeventfdPolicy,
    pub transport: TransportKind,
    /// Queue pairs (and tap queues); one per vCPU is what multiqueue guests want.
    pub queues: u16,
    /// The device's name in reports; `net<N>` by default.
    pub id: Option<String>,
    pub queue_size: u16,
    /// `ioeventfd=on`: the I/O thread's poll after activity; `auto`: its wait for a reply
    /// after delivering frames. None: the mode's default.
    pub poll_us: Option<u32>,
    /// `ioeventfd=auto`: TX frames sent on the kick before a burst goes to the I/O thread.
    pub tx_inline: u16,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            tap: String::new(),
            mac: None,
            ioeventfd: IoeventfdPolicy::Auto,
            transport: TransportKind::Transitional,
            queues: 1,
            id: None,
            queue_size: DEFAULT_QUEUE_SIZE,
            poll_us: None,
            tx_inline: DEFAULT_TX_INLINE,
        }
    }
}

fn bad(key: &str, value: &str, expected: &'static str) -> NetConfigError {
    NetConfigError::BadValue {
        key: key.into(),
        value: value.into(),
        expected,
    }
}

/// `aa:bb:cc:dd:ee:ff`, unicast.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    (parts.next().is_none() && mac[0] & 1 == 0).then_some(mac)
}

impl FromStr for NetConfig {
    type Err = NetConfigError;

    fn from_str(s: &str) -> Result<Self, NetConfigError> {
        let mut config = NetConfig::default();
        let mut seen: Vec<&str> = Vec::new();
        for item in s.split(',').filter(|i| !i.is_empty()) {
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            if seen.contains(&key) {
                return Err(NetConfigError::Duplicate(key.into()));
            }
            seen.push(key);
            match key {
                "tap" => {
                    // IFNAMSIZ is 16 with the NUL.
                    if value.is_empty() {
                        return Err(NetConfigError::MissingTap);
                    }
                    if value.len() > 15 || value.contains(['/', ' ', ':']) {
                        return Err(bad(
                            key,
                            value,
                            "an interface name of at most 15 characters",
                        ));
                    }
                    config.tap = value.into();
                }
                "mac" => {
                    config.mac =
                        Some(parse_mac(value).ok_or_else(|| {
                            bad(key, value, "a unicast MAC like 52:54:00:12:34:56")
                        })?)
                }
                "ioeventfd" => {
                    config.ioeventfd = match value {
                        "on" | "true" | "yes" | "1" => IoeventfdPolicy::On,
                        "off" | "false" | "no" | "0" => IoeventfdPolicy::Off,
                        "auto" => IoeventfdPolicy::Auto,
                        _ => return Err(bad(key, value, "on, off or auto")),
                    }
                }
                "transport" => {
                    config.transport = value
                        .parse()
                        .map_err(|_| bad(key, value, "transitional, modern or legacy"))?
                }
                "queues" => {
                    config.queues = value
                        .parse()
                        .ok()
                        .filter(|&n| (1..=MAX_QUEUE_PAIRS).contains(&n))
                        .ok_or_else(|| bad(key, value, "a number of queue pairs from 1 to 16"))?
                }
                "queue_size" => {
                    config.queue_size = value
                        .parse::<u16>()
                        .ok()
                        .filter(|n| n.is_power_of_two() && (16..=4096).contains(n))
                        .ok_or_else(|| bad(key, value, "a power of two from 16 to 4096"))?
                }
                "id" if !value.is_empty() && !value.contains(char::is_whitespace) => {
                    config.id = Some(value.into())
                }
                "id" => return Err(bad(key, value, "a name without spaces")),
                "poll_us" => {
                    config.poll_us = value
                        .parse()
                        .ok()
                        .map(Some)
                        .filter(|&n| n <= Some(10_000))
                        .ok_or_else(|| bad(key, value, "microseconds from 0 to 10000"))?
                }
                "tx_inline" => {
                    config.tx_inline = value
                        .parse()
                        .ok()
                        .filter(|n| *n <= 1024)
                        .ok_or_else(|| bad(key, value, "a number of frames from 0 to 1024"))?
                }
                other => return Err(NetConfigError::UnknownOption(other.into())),
            }
        }
        if config.tap.is_empty() {
            return Err(NetConfigError::MissingTap);
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_alone_gives_the_defaults() {
        let c: NetConfig = "tap=tap0".parse().unwrap();
        assert_eq!(
            c,
            NetConfig {
                tap: "tap0".into(),
                ..Default::default()
            }
        );
        assert_eq!(c.ioeventfd, IoeventfdPolicy::Auto);
    }

    #[test]
    fn every_option_is_parsed() {
        let c: NetConfig = "tap=t1,mac=02:00:00:aa:bb:cc,ioeventfd=off,transport=legacy,queues=2,\
                            id=lan,queue_size=512,poll_us=20,tx_inline=4"
            .parse()
            .unwrap();
        assert_eq!(c.mac, Some([2, 0, 0, 0xaa, 0xbb, 0xcc]));
        assert_eq!(c.ioeventfd, IoeventfdPolicy::Off);
        assert_eq!(c.transport, TransportKind::Legacy);
        assert_eq!(
            (c.queues, c.queue_size, c.poll_us, c.tx_inline),
            (2, 512, Some(20), 4)
        );
        assert_eq!(c.id.as_deref(), Some("lan"));
    }

    #[test]
    fn mistakes_get_typed_errors_naming_the_option() {
        let err = |s: &str| s.parse::<NetConfig>().unwrap_err();
        assert_eq!(err("mac=02:00:00:00:00:01"), NetConfigError::MissingTap);
        assert_eq!(err("tap="), NetConfigError::MissingTap);
        assert_eq!(
            err("tap=a,foo=1"),
            NetConfigError::UnknownOption("foo".into())
        );
        assert_eq!(err("tap=a,tap=b"), NetConfigError::Duplicate("tap".into()));
        // Multicast bit set, short, and junk.
        for mac in ["01:00:00:00:00:01", "02:00:00:00:01", "zz:00:00:00:00:01"] {
            assert!(matches!(
                err(&format!("tap=a,mac={mac}")),
                NetConfigError::BadValue { .. }
            ));
        }
        assert!(matches!(
            err("tap=a,queues=0"),
            NetConfigError::BadValue { .. }
        ));
        assert!(matches!(
            err("tap=a,queue_size=100"),
            NetConfigError::BadValue { .. }
        ));
        assert!(matches!(
            err("tap=abcdefghijklmnop"),
            NetConfigError::BadValue { .. }
        ));
        assert_eq!(
            err("tap=a,ioeventfd=maybe").to_string(),
            "--net: `ioeventfd=maybe`: expected on, off or auto"
        );
    }
}
