//! Gratuitous ARP: telling the segment that an address now lives at another MAC.
//!
//! After `readdress` moves the service address to the standby, every neighbour still has the
//! old MAC cached. A gratuitous ARP (sender = target = the service address) makes Linux and most
//! other stacks override their entry at once (Linux overrides even inside `locktime` for GARP).
//! Neighbours miss single frames, so the switcher sends a burst and repeats it later.
//! The frames are written on a raw `AF_PACKET` socket opened inside the LC's namespace, so they
//! leave from the LC's own interface exactly as if the LC had sent them.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use patchover_core::MacAddr;
use serde::{Deserialize, Serialize};

use crate::netns::{NetnsError, in_netns};

/// Sending a gratuitous ARP failed.
#[derive(Debug, thiserror::Error)]
pub enum GarpError {
    #[error("gratuitous ARP")]
    Netns(#[from] NetnsError),
    #[error("gratuitous ARP: interface {iface:?} not found in {netns:?}")]
    NoInterface {
        iface: String,
        netns: Option<PathBuf>,
        #[source]
        source: nix::Error,
    },
    #[error("gratuitous ARP: cannot open a packet socket (needs root)")]
    Socket(#[source] std::io::Error),
    #[error("gratuitous ARP: cannot send on {iface:?}")]
    Send {
        iface: String,
        #[source]
        source: std::io::Error,
    },
}

/// How many announcements to send and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GarpConfig {
    /// Frames in the burst right after the switch.
    pub count: u32,
    /// Gap between frames of a burst.
    pub interval: Duration,
    /// Later repeats of the burst, measured from the switch (neighbours that missed the first).
    pub refresh_after: Vec<Duration>,
}

impl Default for GarpConfig {
    fn default() -> Self {
        GarpConfig {
            count: 3,
            interval: Duration::from_millis(5),
            refresh_after: vec![Duration::from_secs(1), Duration::from_secs(5)],
        }
    }
}

/// Builds one gratuitous ARP frame (`op` 1 = request, 2 = reply).
pub fn frame(mac: MacAddr, ip: Ipv4Addr, op: u16) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac.0);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&op.to_be_bytes());
    f[22..28].copy_from_slice(&mac.0);
    f[28..32].copy_from_slice(&ip.octets());
    // target hardware address stays zero (request) / broadcast-equivalent for replies
    if op == 2 {
        f[32..38].copy_from_slice(&[0xff; 6]);
    }
    f[38..42].copy_from_slice(&ip.octets());
    f
}

/// Builds the ARP request a neighbour at `from_mac`/`from_ip` would send to ask the LC at
/// `to_mac` for `target`: unicast, so only that LC sees it. An LC that holds `target` answers
/// it and, as every Linux stack does for a request addressed to one of its own addresses,
/// keeps the asker's MAC in its neighbour table (see `hold`'s neighbour priming).
pub fn request_for(
    from_mac: MacAddr,
    from_ip: Ipv4Addr,
    to_mac: MacAddr,
    target: Ipv4Addr,
) -> [u8; 42] {
    let mut f = frame(from_mac, from_ip, 1);
    f[0..6].copy_from_slice(&to_mac.0);
    f[38..42].copy_from_slice(&target.octets());
    f
}

/// Sends `count` gratuitous ARP request+reply pairs for `ip` at `mac` from `iface` in `netns`.
pub fn announce(
    netns: Option<&Path>,
    iface: &str,
    mac: MacAddr,
    ip: Ipv4Addr,
    count: u32,
    interval: Duration,
) -> Result<u32, GarpError> {
    let netns_owned = netns.map(Path::to_path_buf);
    in_netns(netns, move || {
        announce_here(netns_owned, iface, mac, ip, count, interval)
    })?
}

/// [`announce`] from the calling thread's namespace (`netns` is only named in errors).
pub fn announce_here(
    netns: Option<PathBuf>,
    iface: &str,
    mac: MacAddr,
    ip: Ipv4Addr,
    count: u32,
    interval: Duration,
) -> Result<u32, GarpError> {
    let sender = Sender::open_here(netns, iface)?;
    let mut sent = 0;
    for i in 0..count {
        sender.send(mac, ip)?;
        sent += 1;
        if i + 1 < count {
            std::thread::sleep(interval);
        }
    }
    tracing::debug!(%ip, %mac, iface, sent, "gratuitous ARP sent");
    Ok(sent)
}

/// Asks who has `ip` on `iface` of the calling thread's namespace (an ARP probe: sender address
/// 0.0.0.0, so no neighbour cache learns anything) and returns the MACs that answer within
/// `wait`. `own_mac` is the interface's MAC, the probe's sender.
///
/// The probe is sent [`PROBES`] times, spread over `wait` (as RFC 5227 sends several probes):
/// one probe lost, or one answer late on a loaded host, does not hide an owner.
/// How many probes [`who_has_here`] sends within its wait.
pub const PROBES: u32 = 3;

/// How long the switcher listens for another owner of the service address before it moves it:
/// long enough for an answer delayed by a loaded host (30 ms missed one under a CI run), and
/// spent before the pause, not in it.
pub const CONFLICT_WAIT: Duration = Duration::from_millis(300);

pub fn who_has_here(
    netns: Option<PathBuf>,
    iface: &str,
    own_mac: MacAddr,
    ip: Ipv4Addr,
    wait: Duration,
) -> Result<Vec<MacAddr>, GarpError> {
    use std::os::fd::AsRawFd;
    let ifindex =
        nix::net::if_::if_nametoindex(iface).map_err(|source| GarpError::NoInterface {
            iface: iface.to_string(),
            netns,
            source,
        })?;
    let proto = (libc::ETH_P_ARP as u16).to_be();
    // SAFETY: plain socket(2) call; the returned fd is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    if fd < 0 {
        return Err(GarpError::Socket(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh, valid descriptor that nothing else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    let sl = std::mem::size_of::<libc::sockaddr_ll>() as u32;
    let io = |source| GarpError::Send {
        iface: iface.to_string(),
        source,
    };
    // SAFETY: `addr` is a valid sockaddr_ll of length `sl`; the socket is open.
    if unsafe { libc::bind(sock.as_raw_fd(), (&raw const addr).cast(), sl) } != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    let mut probe = frame(own_mac, Ipv4Addr::UNSPECIFIED, 1);
    probe[38..42].copy_from_slice(&ip.octets());
    let send = || {
        // SAFETY: `probe` and `addr` are valid for the lengths passed.
        let n = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                probe.as_ptr().cast(),
                probe.len(),
                0,
                (&raw const addr).cast(),
                sl,
            )
        };
        if n < 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
        Ok(())
    };
    let start = std::time::Instant::now();
    let deadline = start + wait;
    let mut sent = 0u32;
    let mut owners = Vec::new();
    let mut buf = [0u8; 128];
    loop {
        let now = std::time::Instant::now();
        if now >= deadline {
            break;
        }
        // Probe k goes out at k/PROBES of the wait.
        if sent < PROBES && now >= start + wait * sent / PROBES {
            send()?;
            sent += 1;
        }
        let next = if sent < PROBES {
            (start + wait * sent / PROBES).min(deadline)
        } else {
            deadline
        };
        let left = next.saturating_duration_since(std::time::Instant::now());
        let tv = libc::timeval {
            tv_sec: left.as_secs() as libc::time_t,
            tv_usec: left.subsec_micros().max(1) as libc::suseconds_t,
        };
        // SAFETY: setting SO_RCVTIMEO with a valid timeval of the right size.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        // SAFETY: `buf` is valid for its length; the socket is open.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                // The timeout (time for the next probe, or the end) or a signal.
                Some(libc::EAGAIN | libc::EINTR) => continue,
                _ => return Err(io(std::io::Error::last_os_error())),
            }
        }
        if let Some(mac) = arp_reply_from(&buf[..n as usize], ip)
            && !owners.contains(&mac)
        {
            owners.push(mac);
        }
    }
    Ok(owners)
}

/// The sender MAC of an ARP reply that says "`ip` is at …".
fn arp_reply_from(f: &[u8], ip: Ipv4Addr) -> Option<MacAddr> {
    if f.len() < 42 || f[12..14] != [0x08, 0x06] || f[20..22] != [0, 2] || f[28..32] != ip.octets()
    {
        return None;
    }
    let mut m = [0u8; 6];
    m.copy_from_slice(&f[22..28]);
    Some(MacAddr(m))
}

/// A packet socket opened ahead of time on one interface.
///
/// Closing a packet socket waits for an RCU grace period (`synchronize_net`), milliseconds on a
/// busy host; the switcher opens the sender before its pause and drops it after.
pub struct Sender {
    sock: std::os::fd::OwnedFd,
    addr: libc::sockaddr_ll,
    iface: String,
}

impl Sender {
    /// Opens a sender on `iface` of the calling thread's namespace. Protocol 0: it never
    /// receives, so nothing queues up on it.
    pub fn open_here(netns: Option<PathBuf>, iface: &str) -> Result<Sender, GarpError> {
        let ifindex =
            nix::net::if_::if_nametoindex(iface).map_err(|source| GarpError::NoInterface {
                iface: iface.to_string(),
                netns,
                source,
            })?;
        // SAFETY: plain socket(2) call; the returned fd is checked and owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if fd < 0 {
            return Err(GarpError::Socket(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh, valid descriptor that nothing else owns.
        let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        Ok(Sender {
            sock,
            addr,
            iface: iface.to_string(),
        })
    }

    /// Sends one request+reply pair announcing `ip` at `mac`.
    pub fn send(&self, mac: MacAddr, ip: Ipv4Addr) -> Result<(), GarpError> {
        for op in [1u16, 2u16] {
            self.send_frame(&frame(mac, ip, op))?;
        }
        Ok(())
    }

    /// Writes one whole Ethernet frame (header included) on the interface.
    pub fn send_frame(&self, f: &[u8]) -> Result<(), GarpError> {
        use std::os::fd::AsRawFd;
        // SAFETY: `f` and `self.addr` are valid for the lengths passed; the socket is open.
        let n = unsafe {
            libc::sendto(
                self.sock.as_raw_fd(),
                f.as_ptr().cast(),
                f.len(),
                0,
                (&raw const self.addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(GarpError::Send {
                iface: self.iface.clone(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_replies_for_the_address_only() {
        let mac = MacAddr([2, 0, 0, 0, 0, 7]);
        let ip = Ipv4Addr::new(10, 0, 0, 1);
        assert_eq!(arp_reply_from(&frame(mac, ip, 2), ip), Some(mac));
        assert_eq!(arp_reply_from(&frame(mac, ip, 1), ip), None, "a request");
        assert_eq!(
            arp_reply_from(&frame(mac, ip, 2), Ipv4Addr::new(10, 0, 0, 2)),
            None
        );
        assert_eq!(arp_reply_from(&[0u8; 20], ip), None);
    }

    #[test]
    fn request_for_asks_one_lc_on_behalf_of_a_neighbour() {
        let (client, lc) = (MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 2]));
        let (cip, sip) = (Ipv4Addr::new(10, 0, 0, 200), Ipv4Addr::new(10, 0, 0, 10));
        let f = request_for(client, cip, lc, sip);
        assert_eq!(&f[0..6], &lc.0, "unicast to the LC");
        assert_eq!(&f[6..12], &client.0);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1], "a request");
        assert_eq!(&f[22..28], &client.0, "sender MAC");
        assert_eq!(&f[28..32], &cip.octets(), "sender IP");
        assert_eq!(&f[32..38], &[0; 6]);
        assert_eq!(&f[38..42], &sip.octets(), "target IP");
    }

    #[test]
    fn frame_is_a_gratuitous_arp_request() {
        let mac = MacAddr([2, 0, 0, 0, 0, 9]);
        let ip = Ipv4Addr::new(10, 1, 2, 3);
        let f = frame(mac, ip, 1);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac.0);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1]);
        assert_eq!(&f[28..32], &ip.octets(), "sender IP");
        assert_eq!(&f[38..42], &ip.octets(), "target IP equals sender IP");
        assert_eq!(&f[32..38], &[0; 6]);
        let r = frame(mac, ip, 2);
        assert_eq!(&r[20..22], &[0, 2]);
    }
}
