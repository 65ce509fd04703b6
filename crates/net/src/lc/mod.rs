//! Working inside an LC: the few things the switcher does *from the LC's side*.
//!
//! The switcher reads, adds and removes addresses on the LC's interface, announces an address
//! from it (gratuitous ARP), asks the service over HTTP (or only connects to it) from inside the LC, and counts the TCP
//! connections the old LC still serves. How it gets in depends on the LC backend:
//!
//! - `ns` LCs share the host kernel: the switcher joins the LC's network namespace
//!   ([`LcAccess::Netns`], [`NsLc`]) and uses netlink, packet sockets and `sock_diag` directly,
//!   from one worker thread started before the switch pause.
//! - `qemu` LCs have their own kernel: the only way in is the agent channel (virtio-serial)
//!   ([`LcAccess::Agent`], [`AgentLc`]), which runs busybox programs in the guest (`ip`,
//!   `arping`, `wget`, `grep /proc/net/tcp`) and parses their output.
//!
//! Both sit behind one small trait, [`InLc`], so the switch logic has no second copy.

mod agent;
mod ns;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use patchover_core::{Ipv4Cidr, MacAddr};
use serde::{Deserialize, Serialize};

pub use agent::{AgentChannel, AgentLc, GuestExec, GuestOutput};
pub use ns::NsLc;

use crate::garp::GarpError;
use crate::netns::NetnsError;
use crate::rtnl::RtnlError;

/// How the host reaches into an LC.
///
/// Serialized as `{"netns": "/proc/1/ns/net"}` or `{"agent": {"socket": "…/agent.sock"}}`; a
/// bare path (the shape before the `qemu` backend, when endpoints had a `netns` field) reads
/// as [`LcAccess::Netns`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", from = "AccessRepr")]
pub enum LcAccess {
    /// The LC's network namespace (`ns` backend): `/proc/<pid>/ns/net` or `/run/netns/<name>`.
    Netns(PathBuf),
    /// The host end of the LC's agent channel (`qemu` backend): programs run in the guest.
    Agent { socket: PathBuf },
}

/// What [`LcAccess`] reads from: today's tagged form or an old bare namespace path.
#[derive(Deserialize)]
#[serde(untagged)]
enum AccessRepr {
    Bare(PathBuf),
    Tagged(Tagged),
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Tagged {
    Netns(PathBuf),
    Agent { socket: PathBuf },
}

impl From<AccessRepr> for LcAccess {
    fn from(r: AccessRepr) -> LcAccess {
        match r {
            AccessRepr::Bare(p) | AccessRepr::Tagged(Tagged::Netns(p)) => LcAccess::Netns(p),
            AccessRepr::Tagged(Tagged::Agent { socket }) => LcAccess::Agent { socket },
        }
    }
}

impl std::fmt::Display for LcAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LcAccess::Netns(p) => write!(f, "network namespace {}", p.display()),
            LcAccess::Agent { socket } => write!(f, "agent channel {}", socket.display()),
        }
    }
}

impl LcAccess {
    /// The namespace path, for `ns` LCs.
    pub fn netns(&self) -> Option<&Path> {
        match self {
            LcAccess::Netns(p) => Some(p),
            LcAccess::Agent { .. } => None,
        }
    }

    /// Opens the way in: a worker thread in the namespace (`ns`), or nothing yet (`agent`:
    /// every operation is one agent call on a fresh connection, so the LC backend's own agent
    /// calls are never locked out).
    pub fn open(&self) -> Result<Box<dyn InLc>, InLcError> {
        Ok(match self {
            LcAccess::Netns(p) => Box::new(NsLc::open(p)?),
            LcAccess::Agent { socket } => Box::new(AgentLc::new(socket)),
        })
    }
}

/// An HTTP answer as seen from inside the LC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer {
    /// e.g. `HTTP/1.1 200 OK`.
    pub status_line: String,
    pub body: String,
}

impl HttpAnswer {
    /// The status code, if the status line has one.
    pub fn status(&self) -> Option<u16> {
        self.status_line.split_whitespace().nth(1)?.parse().ok()
    }
}

/// Everything the switcher does inside an LC.
///
/// Each call is one operation; implementations keep what they opened (a namespace worker, a
/// netlink socket, a packet socket) for the next call, so a switch prepares before its pause
/// ([`InLc::prepare`]) and the pause itself only sends requests.
pub trait InLc: Send {
    /// What this is, for messages (`network namespace /proc/1/ns/net`).
    fn describe(&self) -> String;

    /// Opens ahead of time what the later calls on `iface` need: netlink for addresses,
    /// a packet socket for announcements. Also proves the LC is reachable.
    fn prepare(&self, iface: &str, addresses: bool, announce: bool) -> Result<(), InLcError>;

    /// The IPv4 addresses on `iface`.
    fn addresses(&self, iface: &str) -> Result<Vec<Ipv4Cidr>, InLcError>;

    /// Adds `cidr` to `iface`; adding an address that is already there is fine.
    fn add_address(&self, iface: &str, cidr: Ipv4Cidr) -> Result<(), InLcError>;

    /// Removes `cidr`'s address from `iface`; removing an absent address is fine.
    fn del_address(&self, iface: &str, cidr: Ipv4Cidr) -> Result<(), InLcError>;

    /// Sends `count` gratuitous ARP announcements of `ip` at `mac` from `iface`, `interval`
    /// apart (the agent's busybox `arping` keeps its own pace of about one a second); returns
    /// how many were sent.
    fn announce(
        &self,
        iface: &str,
        mac: MacAddr,
        ip: Ipv4Addr,
        count: u32,
        interval: Duration,
    ) -> Result<u32, InLcError>;

    /// One `GET path` to `addr` from inside the LC. `Ok` for any HTTP answer, `Err` when none
    /// came (refused, timed out, unreachable).
    fn http_get(
        &self,
        addr: SocketAddr,
        path: &str,
        timeout: Duration,
    ) -> Result<HttpAnswer, InLcError>;

    /// One `GET path` over TLS to `addr` from inside the LC, trusting `trust`. `Ok` for any
    /// HTTP answer, `Err` when none came (or the TLS handshake failed).
    fn https_get(
        &self,
        addr: SocketAddr,
        path: &str,
        trust: &patchover_core::TlsTrust,
        timeout: Duration,
    ) -> Result<HttpAnswer, InLcError>;

    /// One TCP connect to `addr` from inside the LC, closed at once. `Err` when it was not
    /// accepted (refused, timed out, unreachable).
    fn connect(&self, addr: SocketAddr, timeout: Duration) -> Result<(), InLcError>;

    /// TCP connections on local `port` that still carry or may carry a request (established,
    /// SYN_RECV, FIN_WAIT1, CLOSE_WAIT, LAST_ACK, CLOSING; not TIME_WAIT).
    fn busy_tcp_connections(&self, port: u16) -> Result<usize, InLcError>;

    /// The LC's network as seen from inside (the addresses and neighbour entries of `iface`,
    /// and, where the LC can tell, who listens on TCP `port`), on one bounded line, for the
    /// message of a failed check. Best effort: a part that cannot be read says why.
    fn network_state(&self, iface: &str, port: u16) -> String;
}

/// An operation inside an LC failed.
#[derive(Debug, thiserror::Error)]
pub enum InLcError {
    #[error("in the LC")]
    Netns(#[from] NetnsError),
    #[error("in the LC")]
    Rtnl(#[from] RtnlError),
    #[error("in the LC")]
    Garp(#[from] GarpError),
    #[error("GET https://{addr}{path} from inside the LC failed")]
    Https {
        addr: SocketAddr,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("GET http://{addr}{path} from inside the LC failed")]
    Http {
        addr: SocketAddr,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{lc}: an https check inside a VM is not done yet (the guest has no TLS client that checks what the config trusts); use kind = \"http\" or \"tcp\" for VMs"
    )]
    NoHttps { lc: String },
    #[error("TCP connect to {addr} from inside the LC failed")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("agent channel {socket}: cannot run {program:?} in the LC; is the VM booted?")]
    Agent {
        socket: PathBuf,
        program: String,
        #[source]
        source: patchover_agent::AgentError,
    },
    #[error(
        "agent channel {socket}: `{command}` in the LC {how}: {stderr}",
        how = match (status, timed_out) {
            (_, true) => "timed out".to_string(),
            (Some(c), _) => format!("exited with {c}"),
            (None, _) => "was killed".to_string(),
        }
    )]
    Command {
        socket: PathBuf,
        command: String,
        status: Option<i32>,
        timed_out: bool,
        stderr: String,
    },
    #[error("agent channel {socket}: cannot read the output of `{command}`: {why}")]
    Output {
        socket: PathBuf,
        command: String,
        why: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_serializes_tagged_and_reads_old_bare_paths() {
        let ns = LcAccess::Netns("/proc/7/ns/net".into());
        let s = serde_json::to_string(&ns).unwrap();
        assert_eq!(s, r#"{"netns":"/proc/7/ns/net"}"#);
        assert_eq!(serde_json::from_str::<LcAccess>(&s).unwrap(), ns);
        let ag = LcAccess::Agent {
            socket: "/run/po/lc/lc2/agent.sock".into(),
        };
        let s = serde_json::to_string(&ag).unwrap();
        assert_eq!(s, r#"{"agent":{"socket":"/run/po/lc/lc2/agent.sock"}}"#);
        assert_eq!(serde_json::from_str::<LcAccess>(&s).unwrap(), ag);
        assert_eq!(
            serde_json::from_str::<LcAccess>(r#""/run/netns/x""#).unwrap(),
            LcAccess::Netns("/run/netns/x".into())
        );
        assert!(serde_json::from_str::<LcAccess>(r#"{"vsock":3}"#).is_err());
    }

    #[test]
    fn status_code_of_an_answer() {
        let a = |s: &str| HttpAnswer {
            status_line: s.into(),
            body: String::new(),
        };
        assert_eq!(a("HTTP/1.1 200 OK").status(), Some(200));
        assert_eq!(a("HTTP/1.0 503 Service Unavailable").status(), Some(503));
        assert_eq!(a("").status(), None);
    }
}
