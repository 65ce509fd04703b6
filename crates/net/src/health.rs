//! The service check: is the right service answering at an address?
//!
//! A switch is only done when the service answers on the service address *from the standby*.
//! The check is a plain HTTP/1.1 GET (e.g. `/version`) whose body must contain an expected
//! string that identifies the standby (its version, its LC id), so a reply from the old LC or
//! from a stranger holding the address does not count.

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
}

/// An answer that was not the expected one.
#[derive(Debug)]
pub struct Mismatch {
    pub addr: SocketAddr,
    pub path: String,
    pub status_line: String,
    pub expect: String,
    pub body: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GET http://{}{} answered {:?}; expected 200 with {:?} in the body, got {:?}",
            self.addr, self.path, self.status_line, self.expect, self.body
        )
    }
}

/// What to ask and what the answer must contain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub port: u16,
    /// e.g. `/version`.
    pub path: String,
    /// A substring the standby's answer must contain; empty accepts any 200.
    pub expect: String,
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
            timeout: Duration::from_millis(500),
            patience: Duration::from_secs(2),
        }
    }

    /// The same check expecting another identity (used for the way back).
    pub fn expecting(&self, expect: &str) -> HealthCheck {
        HealthCheck {
            expect: expect.to_string(),
            ..self.clone()
        }
    }
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

/// Whether `answer` passes `hc`: status 200 and the expected text in the body.
fn judge(sa: SocketAddr, hc: &HealthCheck, answer: HttpAnswer) -> Result<(), HealthError> {
    if answer.status() == Some(200) && answer.body.contains(&hc.expect) {
        return Ok(());
    }
    Err(HealthError::Mismatch(Box::new(Mismatch {
        addr: sa,
        path: hc.path.clone(),
        status_line: answer.status_line,
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
