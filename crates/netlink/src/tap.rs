//! Persistent tap devices (a VM's NIC on the host).
//!
//! The kernel refuses to create a tun or tap device through `RTM_NEWLINK` ("tun/tap creation
//! via rtnetlink is not supported"): one is made by `TUNSETIFF` on `/dev/net/tun` and kept
//! after the descriptor closes by `TUNSETPERSIST`, as `ip tuntap add` does. QEMU later attaches
//! to it by name with its own `TUNSETIFF`.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

/// Creating a tap device failed.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap {name:?}: the name must be 1 to 15 bytes without '/', ':' or whitespace")]
    BadName { name: String },
    #[error("tap {name:?}: cannot open /dev/net/tun (needs root and the tun module)")]
    Open {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("tap {name:?}: {what} failed")]
    Ioctl {
        name: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl TapError {
    /// The OS error underneath, if there is one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            TapError::BadName { .. } => Some(libc::EINVAL),
            TapError::Open { source, .. } | TapError::Ioctl { source, .. } => source.raw_os_error(),
        }
    }
}

/// `struct ifreq` as `TUNSETIFF` reads it: the name, then `ifr_flags` (the union is 24 bytes).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// `name` as the kernel takes an interface name: 1 to 15 bytes, no '/', ':', NUL or space.
fn check_name(name: &str) -> Result<&[u8], TapError> {
    let bytes = name.as_bytes();
    let bad = |b: &u8| matches!(b, b'/' | b':' | 0) || b.is_ascii_whitespace();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.iter().any(bad) {
        return Err(TapError::BadName { name: name.into() });
    }
    Ok(bytes)
}

/// Creates tap device `name` in the calling thread's network namespace, down and on no
/// bridge, persistent (it stays after this returns, until it is deleted).
pub fn create(name: &str) -> Result<(), TapError> {
    let bytes = check_name(name)?;
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|source| TapError::Open {
            name: name.into(),
            source,
        })?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..bytes.len()].copy_from_slice(bytes);
    let ioctl = |what: &'static str, request, arg: libc::c_ulong| {
        // SAFETY: `tun` is an open /dev/net/tun; TUNSETIFF reads (and writes back) the
        // `IfReq` `arg` points to, which outlives the call; TUNSETPERSIST takes an integer.
        if unsafe { libc::ioctl(tun.as_raw_fd(), request, arg) } < 0 {
            return Err(TapError::Ioctl {
                name: name.into(),
                what,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    };
    ioctl(
        "TUNSETIFF",
        libc::TUNSETIFF,
        &mut req as *mut IfReq as libc::c_ulong,
    )?;
    ioctl("TUNSETPERSIST", libc::TUNSETPERSIST, 1)
}
