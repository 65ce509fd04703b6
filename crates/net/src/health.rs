//! The service check: is the right service answering at an address?
//!
//! A switch is only done when the service answers on the service address *from the standby*.
//! The check is a plain HTTP/1.1 GET (e.g. `/version`) that must answer the expected status,
//! with an expected string in the body when one is set. Which LC answered is not read from the
//! body: a check made inside an LC to one of that LC's own addresses ([`own_address`]) can only
//! be accepted by that LC, so a reply from the old LC or from a stranger does not count.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::lc::{HttpAnswer, InLc, InLcError};
use crate::netns::{NetnsError, NsWorker, in_netns};

/// The check failed.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("service check")]
    Netns(#[from] NetnsError),
    #[error("service check: GET http://{addr}{path} failed")]
    Io {
        addr: SocketAddr,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("service check: {0}")]
    Mismatch(Box<Mismatch>),
    #[error("service check")]
    InLc(#[from] InLcError),
    /// The address checked is not the LC's own, so another machine would accept the check.
    #[error(
        "service check: {addr} is not an address of {lc} ({iface} has {has:?}), so another machine would answer the check"
    )]
    NotOwnAddress {
        lc: String,
        iface: String,
        addr: Ipv4Addr,
        has: Vec<String>,
    },
}

/// An answer that was not the expected one.
#[derive(Debug)]
pub struct Mismatch {
    pub addr: SocketAddr,
    pub path: String,
    pub status_line: String,
    /// The status expected.
    pub status: u16,
    pub expect: String,
    pub body: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GET http://{}{} answered {:?}; expected {} with {:?} in the body, got {:?}",
            self.addr, self.path, self.status_line, self.status, self.expect, self.body
        )
    }
}

/// What to ask and what the answer must contain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub port: u16,
    /// e.g. `/version`.
    pub path: String,
    /// A substring the standby's answer must contain; empty accepts any body.
    pub expect: String,
    /// The status the answer must have.
    #[serde(default = "ok_status")]
    pub status: u16,
    /// Per-attempt timeout.
    pub timeout: Duration,
    /// How long to keep retrying before giving up.
    pub patience: Duration,
}

impl HealthCheck {
    pub fn new(port: u16, path: &str, expect: &str) -> HealthCheck {
        HealthCheck {
            port,
            path: path.to_string(),
            expect: expect.to_string(),
            status: 200,
            timeout: Duration::from_millis(500),
            patience: Duration::from_secs(2),
        }
    }

    /// The same check expecting another identity in the body (used for the way back); an
    /// empty `expect` keeps this check's own expectation.
    pub fn expecting(&self, expect: &str) -> HealthCheck {
        if expect.is_empty() {
            return self.clone();
        }
        HealthCheck {
            expect: expect.to_string(),
            ..self.clone()
        }
    }
}

fn ok_status() -> u16 {
    200
}

/// Proves that a check made inside `lc` to `addr` is accepted by `lc` itself: `addr` is one of
/// the addresses on `lc`'s `iface`, and a connection to a local address never leaves the LC's
/// network stack (its namespace, or its guest's kernel). This, and not text the service
/// prints, is how patchover knows which LC answered.
pub fn own_address(lc: &dyn InLc, iface: &str, addr: Ipv4Addr) -> Result<(), HealthError> {
    let has = lc.addresses(iface)?;
    if has.iter().any(|c| c.addr == addr) {
        return Ok(());
    }
    Err(HealthError::NotOwnAddress {
        lc: lc.describe(),
        iface: iface.to_owned(),
        addr,
        has: has.iter().map(ToString::to_string).collect(),
    })
}

/// [`check_in`] to one of `lc`'s own addresses, proven so before and after the check
/// ([`own_address`]): passes only when `lc` itself answered.
pub fn check_own(
    lc: &dyn InLc,
    iface: &str,
    addr: Ipv4Addr,
    hc: &HealthCheck,
) -> Result<(), HealthError> {
    own_address(lc, iface, addr)?;
    check_in(lc, addr, hc)?;
    own_address(lc, iface, addr)
}

/// Runs the check once from `netns` against `addr`.
pub fn check_once(
    netns: Option<&Path>,
    addr: Ipv4Addr,
    hc: &HealthCheck,
) -> Result<(), HealthError> {
    let sa = SocketAddr::from((addr, hc.port));
    in_netns(netns, || get(sa, hc))?
}

/// Runs the check from `netns` until it passes or `hc.patience` is over.
pub fn check(netns: Option<&Path>, addr: Ipv4Addr, hc: &HealthCheck) -> Result<(), HealthError> {
    let start = Instant::now();
    let netns: Option<PathBuf> = netns.map(Path::to_path_buf);
    loop {
        match check_once(netns.as_deref(), addr, hc) {
            Ok(()) => return Ok(()),
            Err(e) if start.elapsed() >= hc.patience => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "service check: retrying");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Runs the check on `worker`'s namespace until it passes or `hc.patience` is over.
pub fn check_on(worker: &NsWorker, addr: Ipv4Addr, hc: &HealthCheck) -> Result<(), HealthError> {
    let start = Instant::now();
    let sa = SocketAddr::from((addr, hc.port));
    loop {
        let h = hc.clone();
        match worker.run(move || get(sa, &h))? {
            Ok(()) => return Ok(()),
            Err(e) if start.elapsed() >= hc.patience => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "service check: retrying");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Runs the check from inside an LC (its namespace or its guest) until it passes or
/// `hc.patience` is over.
pub fn check_in(lc: &dyn InLc, addr: Ipv4Addr, hc: &HealthCheck) -> Result<(), HealthError> {
    let start = Instant::now();
    let sa = SocketAddr::from((addr, hc.port));
    loop {
        let res = lc
            .http_get(sa, &hc.path, hc.timeout)
            .map_err(HealthError::from)
            .and_then(|a| judge(sa, hc, a));
        match res {
            Ok(()) => return Ok(()),
            Err(e) if start.elapsed() >= hc.patience => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "service check: retrying");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

fn get(sa: SocketAddr, hc: &HealthCheck) -> Result<(), HealthError> {
    let answer = http_get_here(sa, &hc.path, hc.timeout).map_err(|source| HealthError::Io {
        addr: sa,
        path: hc.path.clone(),
        source,
    })?;
    judge(sa, hc, answer)
}

/// Whether `answer` passes `hc`: the expected status and the expected text in the body.
fn judge(sa: SocketAddr, hc: &HealthCheck, answer: HttpAnswer) -> Result<(), HealthError> {
    if answer.status() == Some(hc.status) && answer.body.contains(&hc.expect) {
        return Ok(());
    }
    Err(HealthError::Mismatch(Box::new(Mismatch {
        addr: sa,
        path: hc.path.clone(),
        status_line: answer.status_line,
        status: hc.status,
        expect: hc.expect.clone(),
        body: answer.body.chars().take(200).collect(),
    })))
}

/// One plain HTTP/1.1 `GET path` to `sa` from the calling thread's namespace.
pub(crate) fn http_get_here(
    sa: SocketAddr,
    path: &str,
    timeout: Duration,
) -> std::io::Result<HttpAnswer> {
    let mut s = TcpStream::connect_timeout(&sa, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {sa}\r\nConnection: close\r\nUser-Agent: patchover-check\r\n\r\n"
    );
    s.write_all(req.as_bytes())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok(HttpAnswer {
        status_line: head.lines().next().unwrap_or("").to_string(),
        body: body.to_string(),
    })
}
