//! The host side: a Linux tap device, one file descriptor per queue pair.
//!
//! An existing tap is opened; a missing one is created by the same TUNSETIFF, brought up,
//! and disappears by itself when kickvm's descriptors close (it is not made persistent).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// What the device needs from its host side; the tap, or a socket pair in tests.
pub trait NetBackend: Send + Sync {
    /// Number of queues (one per virtqueue pair).
    fn queues(&self) -> usize;
    /// Queue `queue`'s descriptor: frames (header first) are read and written whole.
    fn queue_fd(&self, queue: usize) -> RawFd;
    /// The virtio-net header length the guest negotiated.
    fn set_vnet_header_len(&self, len: usize) -> io::Result<()>;
    /// TUNSETOFFLOAD flags: what the host may send the guest.
    fn set_offload(&self, flags: u32) -> io::Result<()>;
    /// Attaches or detaches a queue, so the host steers no frame to a queue pair the guest
    /// does not use.
    fn set_queue_enabled(&self, queue: usize, enabled: bool) -> io::Result<()>;
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot open /dev/net/tun: {0} (is the tun module loaded?)")]
    OpenTun(io::Error),
    #[error("tap {name}: no permission ({source}); kickvm needs CAP_NET_ADMIN or a tap owned by its user")]
    Permission { name: String, source: io::Error },
    #[error("tap {name}: exists with other flags ({source}); for queues>1 create it with `ip tuntap add {name} mode tap multi_queue`, for one queue without multi_queue")]
    Flags { name: String, source: io::Error },
    #[error("tap {name}: already in use by another process ({source})")]
    Busy { name: String, source: io::Error },
    #[error("tap {name}: {what}: {source}")]
    Ioctl {
        name: String,
        what: &'static str,
        source: io::Error,
    },
    #[error("tap {0}: the kernel's tap has no IFF_VNET_HDR")]
    NoVnetHeader(String),
}

pub struct Tap {
    name: String,
    queues: Vec<OwnedFd>,
    created: bool,
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req
}

fn ioctl_int(fd: RawFd, request: libc::Ioctl, value: libc::c_int) -> io::Result<()> {
    // SAFETY: the tap ioctls used with this helper read one int from the pointer given.
    let ret = unsafe { libc::ioctl(fd, request, &value as *const libc::c_int) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Tap {
    /// Opens `name` with `queues` queues (IFF_MULTI_QUEUE when more than one), creating it if
    /// it does not exist.
    pub fn open(name: &str, queues: usize) -> Result<Self, TapError> {
        let existed = Path::new("/sys/class/net").join(name).exists();
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if queues > 1 {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let mut fds = Vec::with_capacity(queues);
        for _ in 0..queues {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open("/dev/net/tun")
                .map_err(TapError::OpenTun)?;
            let mut req = ifreq(name);
            req.ifr_ifru.ifru_flags = flags as libc::c_short;
            // SAFETY: TUNSETIFF reads and writes the ifreq, which lives across the call.
            let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
            if ret < 0 {
                let source = io::Error::last_os_error();
                let name = name.to_string();
                return Err(match source.raw_os_error() {
                    Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission { name, source },
                    Some(libc::EINVAL) if existed => TapError::Flags { name, source },
                    Some(libc::EBUSY) => TapError::Busy { name, source },
                    _ => TapError::Ioctl {
                        name,
                        what: "TUNSETIFF",
                        source,
                    },
                });
            }
            fds.push(OwnedFd::from(file));
        }
        let tap = Tap {
            name: name.to_string(),
            queues: fds,
            created: !existed,
        };
        tap.check_vnet_header()?;
        if tap.created {
            tap.bring_up()?;
            log::info!("tap {name}: created ({queues} queue(s)); removed when kickvm exits");
        }
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether kickvm created the interface (then it goes away with kickvm).
    pub fn created(&self) -> bool {
        self.created
    }

    fn check_vnet_header(&self) -> Result<(), TapError> {
        let mut features: libc::c_uint = 0;
        // SAFETY: TUNGETFEATURES writes one unsigned int.
        let ret = unsafe { libc::ioctl(self.queue_fd(0), libc::TUNGETFEATURES, &mut features) };
        if ret < 0 {
            return Err(self.ioctl_error("TUNGETFEATURES", io::Error::last_os_error()));
        }
        if features & libc::IFF_VNET_HDR as libc::c_uint == 0 {
            return Err(TapError::NoVnetHeader(self.name.clone()));
        }
        Ok(())
    }

    fn bring_up(&self) -> Result<(), TapError> {
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(self.ioctl_error("socket for SIOCSIFFLAGS", io::Error::last_os_error()));
        }
        // SAFETY: `sock` is a new descriptor nobody else owns.
        let sock = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(sock) };
        let mut req = ifreq(&self.name);
        // SAFETY: SIOCGIFFLAGS fills ifru_flags of the ifreq that lives across the call.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
            return Err(self.ioctl_error("SIOCGIFFLAGS", io::Error::last_os_error()));
        }
        // SAFETY: the union member SIOCGIFFLAGS just wrote.
        unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        // SAFETY: SIOCSIFFLAGS reads the ifreq.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
            return Err(self.ioctl_error("SIOCSIFFLAGS (bring up)", io::Error::last_os_error()));
        }
        Ok(())
    }

    fn ioctl_error(&self, what: &'static str, source: io::Error) -> TapError {
        TapError::Ioctl {
            name: self.name.clone(),
            what,
            source,
        }
    }
}

impl NetBackend for Tap {
    fn queues(&self) -> usize {
        self.queues.len()
    }

    fn queue_fd(&self, queue: usize) -> RawFd {
        self.queues[queue].as_raw_fd()
    }

    fn set_vnet_header_len(&self, len: usize) -> io::Result<()> {
        // The size is per device; every queue shares it.
        ioctl_int(self.queue_fd(0), libc::TUNSETVNETHDRSZ, len as libc::c_int)
    }

    fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        let ret = unsafe {
            libc::ioctl(
                self.queue_fd(0),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn set_queue_enabled(&self, queue: usize, enabled: bool) -> io::Result<()> {
        if self.queues.len() == 1 {
            return Ok(());
        }
        let mut req = ifreq("");
        req.ifr_ifru.ifru_flags = if enabled {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        } as libc::c_short;
        // SAFETY: TUNSETQUEUE reads the ifreq's flags.
        let ret = unsafe { libc::ioctl(self.queue_fd(queue), libc::TUNSETQUEUE, &req) };
        if ret < 0 {
            let e = io::Error::last_os_error();
            // Attaching an attached queue (or detaching a detached one) is not an error here.
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }
}
