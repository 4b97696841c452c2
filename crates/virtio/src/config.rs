//! `--disk path=PATH[,readonly=on][,ioeventfd=on|off][,transport=transitional|modern|legacy]
//! [,direct=on][,format=raw][,lock=on|off][,enospc=report|pause][,serial=ID][,queues=N][,id=NAME][,queue_size=N][,engine=auto|io_uring|threads|sync|mmap]
//! [,poll_us=N]` or `--disk socket=PATH[,ioeventfd=..][,transport=..][,queues=N][,id=..]
//! [,queue_size=N]` (a vhost-user-blk backend) parsed into a [`BlkConfig`].

use std::path::PathBuf;
use std::str::FromStr;

use kickvm_block::EngineKind;

use crate::blk::VIRTIO_BLK_ID_BYTES;
use crate::transport::TransportKind;

/// Default bound on the I/O thread's busy polling while requests are in flight.
pub const DEFAULT_POLL_US: u32 = 50;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlkConfigError {
    #[error("--disk needs path=PATH (a raw image) or socket=PATH (a vhost-user-blk backend)")]
    MissingPath,
    #[error("--disk: path= and socket= exclude each other (an image, or a vhost-user backend)")]
    PathAndSocket,
    #[error("--disk: `{0}` does not apply to a vhost-user disk (socket=): the backend decides")]
    NotForVhostUser(String),
    #[error("--disk: unknown option `{0}` (known: path, socket, readonly, ioeventfd, transport, direct, format, lock, enospc, serial, queues, id, queue_size, engine, poll_us)")]
    UnknownOption(String),
    #[error("--disk: option `{0}` given twice")]
    Duplicate(String),
    #[error("--disk: `{key}={value}`: expected {expected}")]
    BadValue {
        key: String,
        value: String,
        expected: &'static str,
    },
    #[error("--disk: serial `{0}` is longer than the 20 bytes virtio-blk can report")]
    SerialTooLong(String),
}

/// One `--disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlkConfig {
    pub path: PathBuf,
    /// `socket=PATH`: the disk is a vhost-user-blk backend listening there (`path` is empty).
    pub vhost_user: Option<PathBuf>,
    pub readonly: bool,
    /// The notify-path property: kicks through ioeventfd to the I/O thread (on) or as exits
    /// handled on the vCPU thread (off).
    pub ioeventfd: bool,
    pub transport: TransportKind,
    /// Open with O_DIRECT (bypass the host page cache).
    pub direct: bool,
    /// `format=raw`: the image is raw even if it starts like a qcow2 (or other) header.
    pub declared_raw: bool,
    /// Lock the image while it is open (exclusive when writable, shared when read-only).
    pub lock: bool,
    /// `enospc=pause`: a write the host has no space for pauses the VM (to be resumed once
    /// space is freed) instead of failing in the guest.
    pub pause_on_no_space: bool,
    pub serial: Option<String>,
    pub queues: u16,
    /// The device's name in reports and the control API; `disk<N>` by default.
    pub id: Option<String>,
    pub queue_size: u16,
    pub engine: EngineKind,
    pub poll_us: u32,
}

impl Default for BlkConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::new(),
            vhost_user: None,
            readonly: false,
            ioeventfd: true,
            transport: TransportKind::Transitional,
            direct: false,
            declared_raw: false,
            lock: true,
            pause_on_no_space: false,
            serial: None,
            queues: 1,
            id: None,
            queue_size: crate::blk::DEFAULT_QUEUE_SIZE,
            engine: EngineKind::Auto,
            poll_us: DEFAULT_POLL_US,
        }
    }
}

fn bad(key: &str, value: &str, expected: &'static str) -> BlkConfigError {
    BlkConfigError::BadValue {
        key: key.into(),
        value: value.into(),
        expected,
    }
}

fn on_off(key: &str, value: &str) -> Result<bool, BlkConfigError> {
    match value {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(bad(key, value, "on or off")),
    }
}

impl FromStr for BlkConfig {
    type Err = BlkConfigError;

    fn from_str(s: &str) -> Result<Self, BlkConfigError> {
        let mut config = BlkConfig::default();
        let mut seen: Vec<&str> = Vec::new();
        for item in s.split(',').filter(|i| !i.is_empty()) {
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            if seen.contains(&key) {
                return Err(BlkConfigError::Duplicate(key.into()));
            }
            seen.push(key);
            match key {
                "path" if !value.is_empty() => config.path = PathBuf::from(value),
                "path" => return Err(BlkConfigError::MissingPath),
                "socket" if !value.is_empty() => config.vhost_user = Some(PathBuf::from(value)),
                "socket" => return Err(bad(key, value, "the backend's unix socket path")),
                "readonly" => config.readonly = on_off(key, value)?,
                "ioeventfd" => config.ioeventfd = on_off(key, value)?,
                "direct" => config.direct = on_off(key, value)?,
                "format" if value == "raw" => config.declared_raw = true,
                "lock" => config.lock = on_off(key, value)?,
                "enospc" => {
                    config.pause_on_no_space = match value {
                        "report" => false,
                        "pause" => true,
                        _ => return Err(bad(key, value, "report or pause")),
                    }
                }
                "format" => return Err(bad(key, value, "raw (the only format kickvm serves)")),
                "transport" => {
                    config.transport = value
                        .parse()
                        .map_err(|_| bad(key, value, "transitional, modern or legacy"))?
                }
                "serial" => {
                    if value.len() > VIRTIO_BLK_ID_BYTES {
                        return Err(BlkConfigError::SerialTooLong(value.into()));
                    }
                    config.serial = Some(value.into());
                }
                "queues" => {
                    config.queues = value
                        .parse()
                        .ok()
                        .filter(|&n| (1..=crate::blk::MAX_QUEUES).contains(&n))
                        .ok_or_else(|| bad(key, value, "a number of queues from 1 to 64"))?
                }
                "queue_size" => {
                    config.queue_size = value
                        .parse::<u16>()
                        .ok()
                        .filter(|n| n.is_power_of_two() && (4..=32768).contains(n))
                        .ok_or_else(|| bad(key, value, "a power of two from 4 to 32768"))?
                }
                "id" if !value.is_empty() && !value.contains(char::is_whitespace) => {
                    config.id = Some(value.into())
                }
                "id" => return Err(bad(key, value, "a name without spaces")),
                "engine" => {
                    config.engine = value
                        .parse()
                        .map_err(|_| bad(key, value, "auto, io_uring, threads, sync or mmap"))?
                }
                "poll_us" => {
                    config.poll_us = value
                        .parse()
                        .ok()
                        .filter(|&n| n <= 1_000_000)
                        .ok_or_else(|| bad(key, value, "microseconds from 0 to 1000000"))?
                }
                other => return Err(BlkConfigError::UnknownOption(other.into())),
            }
        }
        if config.vhost_user.is_some() {
            // Backends built on libvhost-user (qemu-storage-daemon's) refuse legacy drivers:
            // offer the modern interface unless told otherwise.
            if !seen.contains(&"transport") {
                config.transport = TransportKind::Modern;
            }
            if seen.contains(&"path") {
                return Err(BlkConfigError::PathAndSocket);
            }
            const BACKEND_OPTIONS: [&str; 8] = [
                "readonly", "direct", "format", "lock", "enospc", "serial", "engine", "poll_us",
            ];
            if let Some(option) = seen.iter().find(|k| BACKEND_OPTIONS.contains(k)) {
                return Err(BlkConfigError::NotForVhostUser(option.to_string()));
            }
        } else if config.path.as_os_str().is_empty() {
            return Err(BlkConfigError::MissingPath);
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_alone_gives_the_defaults() {
        let c: BlkConfig = "path=/img".parse().unwrap();
        assert_eq!(
            c,
            BlkConfig {
                path: "/img".into(),
                ..Default::default()
            }
        );
        assert!(c.ioeventfd);
        assert_eq!(c.transport, TransportKind::Transitional);
    }

    #[test]
    fn every_option_is_parsed() {
        let c: BlkConfig = "path=/a.img,readonly=on,ioeventfd=off,transport=legacy,direct=on,\
                            format=raw,lock=off,enospc=pause,serial=SN1,queues=2,id=boot,\
                            queue_size=128,engine=sync,\
                            poll_us=0"
            .parse()
            .unwrap();
        assert!(c.readonly && !c.ioeventfd && c.direct && c.declared_raw && !c.lock);
        assert!(c.pause_on_no_space);
        assert_eq!(c.transport, TransportKind::Legacy);
        assert_eq!(c.serial.as_deref(), Some("SN1"));
        assert_eq!((c.queues, c.queue_size, c.poll_us), (2, 128, 0));
        assert_eq!(c.id.as_deref(), Some("boot"));
        assert_eq!(c.engine, EngineKind::Sync);
    }

    #[test]
    fn mistakes_get_typed_errors() {
        let err = |s: &str| s.parse::<BlkConfig>().unwrap_err();
        assert_eq!(err("readonly=on"), BlkConfigError::MissingPath);
        assert_eq!(err("path="), BlkConfigError::MissingPath);
        assert_eq!(
            err("path=/a,bogus=1"),
            BlkConfigError::UnknownOption("bogus".into())
        );
        assert_eq!(
            err("path=/a,path=/b"),
            BlkConfigError::Duplicate("path".into())
        );
        assert!(matches!(
            err("path=/a,ioeventfd=maybe"),
            BlkConfigError::BadValue { .. }
        ));
        assert!(matches!(
            err("path=/a,transport=pci"),
            BlkConfigError::BadValue { .. }
        ));
        assert!(matches!(
            err("path=/a,format=qcow2"),
            BlkConfigError::BadValue { .. }
        ));
        assert!(matches!(
            err("path=/a,queues=0"),
            BlkConfigError::BadValue { .. }
        ));
        assert!(matches!(
            err("path=/a,queue_size=100"),
            BlkConfigError::BadValue { .. }
        ));
        assert!(matches!(
            err("path=/a,serial=123456789012345678901"),
            BlkConfigError::SerialTooLong(_)
        ));
    }

    #[test]
    fn a_socket_makes_a_vhost_user_disk_and_excludes_image_options() {
        let c: BlkConfig = "socket=/run/blk.sock,queues=2,ioeventfd=off"
            .parse()
            .unwrap();
        assert_eq!(
            c.vhost_user.as_deref(),
            Some(std::path::Path::new("/run/blk.sock"))
        );
        assert_eq!((c.queues, c.ioeventfd), (2, false));
        assert_eq!(c.transport, TransportKind::Modern);
        let legacy: BlkConfig = "socket=/s,transport=transitional".parse().unwrap();
        assert_eq!(legacy.transport, TransportKind::Transitional);
        let err = |s: &str| s.parse::<BlkConfig>().unwrap_err();
        assert_eq!(err("socket=/s,path=/a"), BlkConfigError::PathAndSocket);
        assert_eq!(
            err("socket=/s,readonly=on"),
            BlkConfigError::NotForVhostUser("readonly".into())
        );
        assert_eq!(
            err("socket=/s,format=raw"),
            BlkConfigError::NotForVhostUser("format".into())
        );
        assert!(matches!(err("socket="), BlkConfigError::BadValue { .. }));
    }

    #[test]
    fn error_messages_name_the_option_and_what_was_expected() {
        let e = "path=/a,ioeventfd=maybe".parse::<BlkConfig>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "--disk: `ioeventfd=maybe`: expected on or off"
        );
    }
}
