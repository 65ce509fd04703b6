//! The service check: is the right service answering at an address?
//!
//! A switch is only done when the service answers on the service address *from the standby*.
//! What a check asks is its [`Probe`]: a plain HTTP/1.1 GET (e.g. `/version`) that must answer
//! the expected status, with an expected string in the body when one is set; a TCP connect to
//! the port; or a program run inside the LC by its backend ([`RunInLc`]). Which LC answered is
//! not read from the answer: a check made inside an LC to one of that LC's own addresses
//! ([`own_address`]) can only be accepted by that LC, so a reply from the old LC or from a
//! stranger does not count; a program run inside the LC is in it by construction.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::lc::{GuestOutput, HttpAnswer, InLc, InLcError};
use crate::netns::{NetnsError, NsWorker, in_netns};
use crate::switch::BoxError;

/// The check failed.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("service check")]
    Netns(#[from] NetnsError),
    #[error("service check: GET {addr}{path} failed")]
    Io {
        addr: SocketAddr,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("service check: {0}")]
    Mismatch(Box<Mismatch>),
    /// The check through the service address passed, but the checking namespace sent it to
    /// another NIC than the standby's: another machine answered.
    #[error(
        "service check: {addr} was answered by {seen} (the checking namespace's neighbour entry), not by {lc}'s NIC {want}; another machine holds the address",
        seen = seen.map_or("no known MAC".to_string(), |m| m.to_string())
    )]
    OtherAnswerer {
        addr: Ipv4Addr,
        seen: Option<patchover_core::MacAddr>,
        lc: String,
        want: patchover_core::MacAddr,
    },
    #[error("service check: TCP connect to {addr} failed")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// A `command` check's program ran and did not pass; `answer` is the end of its output.
    #[error(
        "service check: `{command}` in {lc} {how}; its last words: {answer:?}",
        command = argv.join(" "),
        how = match (status, timed_out) {
            (_, true) => "timed out".to_string(),
            (Some(c), _) => format!("exited with {c}"),
            (None, _) => "was killed".to_string(),
        }
    )]
    Command {
        lc: String,
        argv: Vec<String>,
        status: Option<i32>,
        timed_out: bool,
        answer: String,
    },
    #[error("service check: cannot run `{command}` in {lc}", command = argv.join(" "))]
    Run {
        lc: String,
        argv: Vec<String>,
        #[source]
        source: BoxError,
    },
    #[error(
        "service check: a command check runs its program in {lc} through the LC's backend, and this check was made without it"
    )]
    NoRunner { lc: String },
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

/// What a check asks (`[service] health`'s `kind`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Probe {
    /// `GET path`, judged by `status` and `expect`.
    #[default]
    Http,
    /// `GET path` over TLS, trusting what the config says; judged as [`Probe::Http`].
    Https(patchover_core::TlsTrust),
    /// A TCP connect to the port; passes when it is accepted.
    Tcp,
    /// A program run inside the LC by its backend ([`RunInLc`]); passes on exit 0. A check
    /// made from outside any LC (through the service address) connects to the port instead.
    Command { argv: Vec<String> },
}

/// What to ask and what the answer must contain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// What the check asks; `path`, `expect` and `status` are an HTTP check's.
    #[serde(default)]
    pub probe: Probe,
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
            probe: Probe::Http,
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

/// Runs a program inside one LC by its backend, for `command` checks: in an `ns` LC's
/// namespaces and cgroups, in a VM's guest through its agent.
pub trait RunInLc {
    /// Runs `argv`, killed after `timeout`.
    fn run(&self, argv: &[String], timeout: Duration) -> Result<GuestOutput, BoxError>;
}

/// Where a check is made from: inside an LC, by its way in ([`InLc`]) and, for `command`
/// checks, by its backend ([`RunInLc`]).
#[derive(Clone, Copy)]
pub struct Inside<'a> {
    pub lc: &'a dyn InLc,
    pub run: Option<&'a dyn RunInLc>,
}

impl<'a> Inside<'a> {
    /// Inside `lc`; a `command` check fails with [`HealthError::NoRunner`].
    pub fn of(lc: &'a dyn InLc) -> Inside<'a> {
        Inside { lc, run: None }
    }

    /// The same, running `command` checks' programs by `run`.
    pub fn running(self, run: &'a dyn RunInLc) -> Inside<'a> {
        Inside {
            run: Some(run),
            ..self
        }
    }
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

/// [`check_in`] to one of the LC's own addresses, proven so before and after the check
/// ([`own_address`]): passes only when the LC itself answered.
pub fn check_own(
    at: Inside<'_>,
    iface: &str,
    addr: Ipv4Addr,
    hc: &HealthCheck,
) -> Result<(), HealthError> {
    own_address(at.lc, iface, addr)?;
    check_in(at, addr, hc)?;
    own_address(at.lc, iface, addr)
}

/// Runs the check once from `netns` against `addr`.
pub fn check_once(
    netns: Option<&Path>,
    addr: Ipv4Addr,
    hc: &HealthCheck,
) -> Result<(), HealthError> {
    let sa = SocketAddr::from((addr, hc.port));
    in_netns(netns, || attempt_here(sa, hc, None))?
}

/// Runs `attempt` until it passes or `patience` is over; `attempt` is given the time left
/// (at least a second). The last failure is the check's answer.
fn retry(
    patience: Duration,
    mut attempt: impl FnMut(Duration) -> Result<(), HealthError>,
) -> Result<(), HealthError> {
    let start = Instant::now();
    loop {
        let left = patience
            .saturating_sub(start.elapsed())
            .max(Duration::from_secs(1));
        match attempt(left) {
            Ok(()) => return Ok(()),
            Err(e) if start.elapsed() >= patience => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "service check: retrying");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Runs the check from `netns` until it passes or `hc.patience` is over. With `via`, every
/// attempt leaves through that device (see [`connect`]).
pub fn check(
    netns: Option<&Path>,
    addr: Ipv4Addr,
    hc: &HealthCheck,
    via: Option<&str>,
) -> Result<(), HealthError> {
    let sa = SocketAddr::from((addr, hc.port));
    retry(hc.patience, |_| {
        in_netns(netns, || attempt_here(sa, hc, via))?
    })
}

/// Runs the check on `worker`'s namespace until it passes or `hc.patience` is over; with
/// `via`, as [`check`].
pub fn check_on(
    worker: &NsWorker,
    addr: Ipv4Addr,
    hc: &HealthCheck,
    via: Option<&str>,
) -> Result<(), HealthError> {
    let sa = SocketAddr::from((addr, hc.port));
    retry(hc.patience, |_| {
        let (h, dev) = (hc.clone(), via.map(str::to_owned));
        worker.run(move || attempt_here(sa, &h, dev.as_deref()))?
    })
}

/// Runs the check from inside an LC (its namespace or its guest) until it passes or
/// `hc.patience` is over.
pub fn check_in(at: Inside<'_>, addr: Ipv4Addr, hc: &HealthCheck) -> Result<(), HealthError> {
    let sa = SocketAddr::from((addr, hc.port));
    retry(hc.patience, |left| match &hc.probe {
        Probe::Http => at
            .lc
            .http_get(sa, &hc.path, hc.timeout)
            .map_err(HealthError::from)
            .and_then(|a| judge(sa, hc, a)),
        Probe::Https(trust) => at
            .lc
            .https_get(sa, &hc.path, trust, hc.timeout)
            .map_err(HealthError::from)
            .and_then(|a| judge(sa, hc, a)),
        Probe::Tcp => Ok(at.lc.connect(sa, hc.timeout)?),
        Probe::Command { argv } => run_in(at, argv, left),
    })
}

/// One run of a `command` check's program inside the LC, bounded by `timeout`.
fn run_in(at: Inside<'_>, argv: &[String], timeout: Duration) -> Result<(), HealthError> {
    let lc = at.lc.describe();
    let Some(run) = at.run else {
        return Err(HealthError::NoRunner { lc });
    };
    let out = run.run(argv, timeout).map_err(|source| HealthError::Run {
        lc: lc.clone(),
        argv: argv.to_vec(),
        source,
    })?;
    if out.status == Some(0) && !out.timed_out {
        return Ok(());
    }
    Err(HealthError::Command {
        lc,
        argv: argv.to_vec(),
        status: out.status,
        timed_out: out.timed_out,
        answer: last_words(&out),
    })
}

/// The end of a program's output (standard output, then standard error), at most 200
/// characters: a failed check's last answer.
fn last_words(out: &GuestOutput) -> String {
    let all = format!("{}\n{}", out.stdout.trim(), out.stderr.trim());
    let all = all.trim();
    let n = all.chars().count();
    all.chars().skip(n.saturating_sub(200)).collect()
}

/// One attempt of `hc` from the calling thread's namespace (bound to device `via`, if given).
/// A `command` check cannot run its program from here (outside any LC): it connects to the
/// port.
fn attempt_here(sa: SocketAddr, hc: &HealthCheck, via: Option<&str>) -> Result<(), HealthError> {
    match &hc.probe {
        Probe::Http => get(sa, hc, via),
        Probe::Https(trust) => {
            let answer =
                crate::tls::get(trust, sa, &hc.path, hc.timeout, via).map_err(|source| {
                    HealthError::Io {
                        addr: sa,
                        path: hc.path.clone(),
                        source,
                    }
                })?;
            judge(sa, hc, answer)
        }
        Probe::Tcp | Probe::Command { .. } => connect(sa, hc.timeout, via)
            .map(drop)
            .map_err(|source| HealthError::Connect { addr: sa, source }),
    }
}

fn get(sa: SocketAddr, hc: &HealthCheck, via: Option<&str>) -> Result<(), HealthError> {
    let answer =
        http_get_here(sa, &hc.path, hc.timeout, via).map_err(|source| HealthError::Io {
            addr: sa,
            path: hc.path.clone(),
            source,
        })?;
    judge(sa, hc, answer)
}

/// One TCP connect to `sa` from the calling thread's namespace, closed at once.
pub(crate) fn connect_here(sa: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    connect(sa, timeout, None).map(drop)
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

/// One plain HTTP/1.1 `GET path` to `sa` from the calling thread's namespace, bound to device
/// `via` if given (see [`connect`]).
pub(crate) fn http_get_here(
    sa: SocketAddr,
    path: &str,
    timeout: Duration,
    via: Option<&str>,
) -> std::io::Result<HttpAnswer> {
    let mut s = connect_for_get(sa, timeout, via)?;
    exchange(&mut s, &sa.to_string(), path)
}

/// A connection to `sa` (bound to device `via`, if given: see [`connect`]) whose reads and
/// writes time out after `timeout`.
pub(crate) fn connect_for_get(
    sa: SocketAddr,
    timeout: Duration,
    via: Option<&str>,
) -> std::io::Result<TcpStream> {
    let s = connect(sa, timeout, via)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

/// Sends `GET path` (with `Host: host`) on `s` and reads the answer to its end.
pub(crate) fn exchange(
    s: &mut (impl Read + Write),
    host: &str,
    path: &str,
) -> std::io::Result<HttpAnswer> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: patchover-check\r\n\r\n"
    );
    s.write_all(req.as_bytes())?;
    s.flush()?;
    let buf = crate::tls::read_answer(s)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok(HttpAnswer {
        status_line: head.lines().next().unwrap_or("").to_string(),
        body: body.to_string(),
    })
}

/// A TCP connection to `sa` within `timeout`. With `via`, the socket is bound to that device
/// (`SO_BINDTODEVICE`) before it connects, so it leaves through it whatever the namespace's
/// routes say: the switch's check goes out on the switch's bridge, where the service
/// address's neighbour entry was pointed at the standby, even when another interface of the
/// host has an address in the same subnet and its older route wins (a second bridge with the
/// same addresses: issue 19's timed-out check).
fn connect(sa: SocketAddr, timeout: Duration, via: Option<&str>) -> std::io::Result<TcpStream> {
    let Some(dev) = via else {
        return TcpStream::connect_timeout(&sa, timeout);
    };
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(sa), Type::STREAM, Some(Protocol::TCP))?;
    s.bind_device(Some(dev.as_bytes())).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot bind the check to device {dev}: {e}"),
        )
    })?;
    s.connect_timeout(&sa.into(), timeout)?;
    Ok(s.into())
}
