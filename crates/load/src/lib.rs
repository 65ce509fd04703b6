//! An open-model, constant-rate HTTP load generator that records every request's fate.
//!
//! To prove "zero failed requests" the load tool must not hide failures. Closed-loop tools
//! (wrk, ab) wait for an answer before sending the next request, so a stalled server slows the
//! tool down and the stall never shows up in the numbers (coordinated omission), and they put no
//! deadline on a request, so a request the old server will never answer is not an error. Here
//! request *i* is due at `start + i / rate` whatever happened before; its latency is measured
//! from that due time; it fails if it has no complete answer by `due + deadline`. Every outcome is
//! counted by kind (ok, refused, reset, timeout, 5xx, other) and every latency goes into an HDR
//! histogram and a per-second timeline. Raw samples are kept so a benchmark can cut windows
//! (e.g. around each switch) out of one run.

pub mod http;
pub mod server;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

/// The load run could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("load: bad URL {url:?}: {why}")]
    Url { url: String, why: String },
    #[error("load: bad setting: {0}")]
    Setting(String),
    #[error("load: cannot join network namespace {path}")]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("load: cannot start the runtime")]
    Runtime(#[source] std::io::Error),
}

/// How requests use connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnMode {
    /// A new connection per request (`Connection: close`).
    New,
    /// Requests reuse idle keep-alive connections; new ones open when none is idle.
    Keepalive,
    /// Every other request is `New`, the rest `Keepalive`.
    Mixed,
}

impl std::str::FromStr for ConnMode {
    type Err = String;
    fn from_str(s: &str) -> Result<ConnMode, String> {
        match s {
            "new" => Ok(ConnMode::New),
            "keepalive" => Ok(ConnMode::Keepalive),
            "mixed" => Ok(ConnMode::Mixed),
            _ => Err(format!(
                "unknown connection mode {s:?}: use new, keepalive or mixed"
            )),
        }
    }
}

/// What to send, how fast, for how long.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadConfig {
    pub target: SocketAddr,
    pub host: String,
    pub path: String,
    /// Requests per second.
    pub rate: f64,
    pub duration: Duration,
    pub connections: ConnMode,
    /// A request without a complete answer this long after it was due is a timeout.
    pub deadline: Duration,
    /// Network namespace the client sockets live in (`None`: this process's).
    pub netns: Option<PathBuf>,
    /// Ends the run early: no request is sent once it is set (those already sent finish), so a
    /// caller whose work takes an unknown time keeps the load on exactly as long as it needs.
    #[serde(skip)]
    pub stop: StopFlag,
}

/// A flag another thread sets to end a load run before its duration ([`LoadConfig::stop`]).
#[derive(Debug, Clone, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    /// Asks the run to send no more requests.
    pub fn stop(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A stop flag is how a run is driven, not what it sends: two configs compare equal whatever
/// their flags.
impl PartialEq for StopFlag {
    fn eq(&self, _: &StopFlag) -> bool {
        true
    }
}

impl LoadConfig {
    /// A config for `url` (`http://host:port/path`) with defaults: 1 s deadline.
    pub fn for_url(
        url: &str,
        rate: f64,
        duration: Duration,
        connections: ConnMode,
    ) -> Result<LoadConfig, LoadError> {
        let (target, host, path) = parse_url(url)?;
        Ok(LoadConfig {
            target,
            host,
            path,
            rate,
            duration,
            connections,
            deadline: Duration::from_secs(1),
            netns: None,
            stop: StopFlag::default(),
        })
    }
}

/// Parses `500ms`, `10s`, `2m` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?}: write e.g. 500ms, 10s or 2m");
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

/// Splits `http://host:port/path`.
pub fn parse_url(url: &str) -> Result<(SocketAddr, String, String), LoadError> {
    let bad = |why: &str| LoadError::Url {
        url: url.to_string(),
        why: why.to_string(),
    };
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad("only http:// URLs are supported"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if hostport.is_empty() {
        return Err(bad("no host"));
    }
    let with_port = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    let target = with_port
        .to_socket_addrs()
        .map_err(|_| bad("cannot resolve the host"))?
        .next()
        .ok_or_else(|| bad("the host has no address"))?;
    Ok((target, hostport.to_string(), path.to_string()))
}

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Refused,
    Reset,
    Timeout,
    #[serde(rename = "5xx")]
    Status5xx,
    Other,
}

/// One request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// When it was due, from the start of the run.
    pub due_us: u64,
    /// From due time to complete answer (or to the failure).
    pub latency_us: u64,
    pub outcome: Outcome,
    /// It was retried once on a new connection because its reused connection closed first.
    pub retried: bool,
}

/// Failed requests by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failed {
    pub refused: u64,
    pub reset: u64,
    pub timeout: u64,
    #[serde(rename = "5xx")]
    pub status_5xx: u64,
    pub other: u64,
}

impl Failed {
    pub fn total(&self) -> u64 {
        self.refused + self.reset + self.timeout + self.status_5xx + self.other
    }
    fn add(&mut self, o: Outcome) {
        match o {
            Outcome::Ok => {}
            Outcome::Refused => self.refused += 1,
            Outcome::Reset => self.reset += 1,
            Outcome::Timeout => self.timeout += 1,
            Outcome::Status5xx => self.status_5xx += 1,
            Outcome::Other => self.other += 1,
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// Counts and latencies of a set of samples.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub total: u64,
    pub ok: u64,
    pub failed: Failed,
    pub failed_total: u64,
    pub retried: u64,
    pub latency: Latency,
}

impl Summary {
    /// Summarises the samples `keep` selects.
    pub fn of<'a>(samples: impl IntoIterator<Item = &'a Sample>) -> Summary {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds");
        let mut s = Summary::default();
        for x in samples {
            s.total += 1;
            if x.outcome == Outcome::Ok {
                s.ok += 1;
            }
            if x.retried {
                s.retried += 1;
            }
            s.failed.add(x.outcome);
            h.saturating_record(x.latency_us.max(1));
        }
        s.failed_total = s.failed.total();
        if s.total > 0 {
            let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
            s.latency = Latency {
                p50_ms: q(0.5),
                p99_ms: q(0.99),
                p999_ms: q(0.999),
                max_ms: h.max() as f64 / 1000.0,
            };
        }
        s
    }
}

/// One second of the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Second {
    pub second: u64,
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// The result of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    pub rate: f64,
    pub duration_s: f64,
    /// Achieved send rate (requests started per second of the run).
    pub achieved_rate: f64,
    /// Latest a request was started after its due time (the generator keeping up).
    pub max_send_lag_ms: f64,
    #[serde(flatten)]
    pub summary: Summary,
    pub timeline: Vec<Second>,
    #[serde(skip)]
    pub samples: Vec<Sample>,
    /// When request 0 was due (sample times count from here).
    #[serde(skip)]
    pub started: Option<Instant>,
    /// The same moment on the wall clock, in unix milliseconds (to put the samples beside a
    /// run's journal, whose times are the wall clock's).
    #[serde(skip)]
    pub started_unix_ms: Option<f64>,
}

fn timeline(samples: &[Sample]) -> Vec<Second> {
    let secs = samples
        .iter()
        .map(|s| s.due_us / 1_000_000)
        .max()
        .map_or(0, |m| m + 1);
    (0..secs)
        .map(|sec| {
            let in_sec: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.due_us / 1_000_000 == sec)
                .collect();
            let sum = Summary::of(in_sec.iter().copied());
            Second {
                second: sec,
                sent: sum.total,
                ok: sum.ok,
                failed: sum.failed_total,
                p99_ms: sum.latency.p99_ms,
                max_ms: sum.latency.max_ms,
            }
        })
        .collect()
}

/// Runs the load and returns when every request has finished or timed out.
pub fn run(cfg: &LoadConfig) -> Result<LoadReport, LoadError> {
    if !(cfg.rate > 0.0 && cfg.rate.is_finite()) {
        return Err(LoadError::Setting(format!(
            "rate {} must be a positive number",
            cfg.rate
        )));
    }
    if cfg.duration.is_zero() || cfg.deadline.is_zero() {
        return Err(LoadError::Setting(
            "duration and deadline must be above zero".into(),
        ));
    }
    let cfg = cfg.clone();
    std::thread::scope(|s| {
        s.spawn(move || {
            if let Some(ns) = &cfg.netns {
                enter_netns(ns)?;
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(LoadError::Runtime)?;
            Ok(rt.block_on(drive(cfg)))
        })
        .join()
        .unwrap_or_else(|_| {
            Err(LoadError::Runtime(std::io::Error::other(
                "load thread panicked",
            )))
        })
    })
}

fn enter_netns(path: &Path) -> Result<(), LoadError> {
    let f = std::fs::File::open(path).map_err(|source| LoadError::Netns {
        path: path.to_path_buf(),
        source,
    })?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| LoadError::Netns {
        path: path.to_path_buf(),
        source: e.into(),
    })
}

type Pool = Arc<Mutex<Vec<TcpStream>>>;

async fn drive(cfg: LoadConfig) -> LoadReport {
    let n = (cfg.rate * cfg.duration.as_secs_f64()).round() as u64;
    let interval = 1.0 / cfg.rate;
    let pool: Pool = Arc::new(Mutex::new(Vec::new()));
    let req_ka: Arc<[u8]> = http::request(&cfg.host, &cfg.path, true).into();
    let req_new: Arc<[u8]> = http::request(&cfg.host, &cfg.path, false).into();
    let start_std = Instant::now();
    let start_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let start = tokio::time::Instant::from_std(start_std);
    let mut tasks = Vec::with_capacity(n as usize);
    let mut max_lag = Duration::ZERO;
    for i in 0..n {
        let due = start + Duration::from_secs_f64(i as f64 * interval);
        tokio::time::sleep_until(due).await;
        if cfg.stop.is_stopped() {
            break;
        }
        max_lag = max_lag.max(tokio::time::Instant::now().saturating_duration_since(due));
        let keepalive = match cfg.connections {
            ConnMode::New => false,
            ConnMode::Keepalive => true,
            ConnMode::Mixed => i % 2 == 1,
        };
        let pool = pool.clone();
        let req = if keepalive {
            req_ka.clone()
        } else {
            req_new.clone()
        };
        let target = cfg.target;
        let deadline = due + cfg.deadline;
        tasks.push(tokio::spawn(async move {
            let (outcome, retried) = match tokio::time::timeout_at(
                deadline,
                one(target, &req, keepalive, &pool),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => (Outcome::Timeout, false),
            };
            let end = tokio::time::Instant::now().min(deadline);
            Sample {
                due_us: due.duration_since(start).as_micros() as u64,
                latency_us: end.saturating_duration_since(due).as_micros() as u64,
                outcome,
                retried,
            }
        }));
    }
    let sent_for = start.elapsed();
    let sent = tasks.len() as u64;
    let mut samples = Vec::with_capacity(tasks.len());
    for t in tasks {
        if let Ok(s) = t.await {
            samples.push(s);
        }
    }
    samples.sort_by_key(|s| s.due_us);
    let summary = Summary::of(&samples);
    LoadReport {
        rate: cfg.rate,
        // Stopped early: as long as it sent.
        duration_s: match sent < n {
            true => sent_for.as_secs_f64(),
            false => cfg.duration.as_secs_f64(),
        },
        achieved_rate: sent as f64 / (sent_for.as_secs_f64() + interval),
        max_send_lag_ms: max_lag.as_secs_f64() * 1000.0,
        summary,
        timeline: timeline(&samples),
        samples,
        started: Some(start_std),
        started_unix_ms: Some(start_unix_ms),
    }
}

fn classify(e: &std::io::Error) -> Outcome {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => Outcome::Refused,
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
            Outcome::Reset
        }
        K::TimedOut => Outcome::Timeout,
        _ => Outcome::Other,
    }
}

/// Whether a pooled connection is still usable: not closed by the peer, nothing unread.
fn still_open(s: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

async fn one(target: SocketAddr, req: &[u8], keepalive: bool, pool: &Pool) -> (Outcome, bool) {
    let mut retried = false;
    loop {
        // A retry always takes a new connection.
        let pooled = if keepalive && !retried {
            let mut p = pool.lock().unwrap_or_else(|e| e.into_inner());
            let mut got = None;
            while let Some(s) = p.pop() {
                if still_open(&s) {
                    got = Some(s);
                    break;
                }
            }
            got
        } else {
            None
        };
        let reused = pooled.is_some();
        let mut s = match pooled {
            Some(s) => s,
            None => match TcpStream::connect(target).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    s
                }
                Err(e) => {
                    tracing::debug!(error = %e, retried, "connect failed");
                    return (classify(&e), retried);
                }
            },
        };
        match http::fetch(&mut s, req).await {
            Ok(r) => {
                if keepalive && !r.close {
                    pool.lock().unwrap_or_else(|e| e.into_inner()).push(s);
                } else if !keepalive {
                    // Let the server close first so the TIME_WAIT stays on its side; the answer
                    // is complete, so this is not part of the request's latency.
                    tokio::spawn(async move {
                        let mut b = [0u8; 64];
                        let _ = tokio::time::timeout(
                            Duration::from_secs(1),
                            tokio::io::AsyncReadExt::read(&mut s, &mut b),
                        )
                        .await;
                    });
                }
                let o = if r.status >= 500 {
                    Outcome::Status5xx
                } else {
                    Outcome::Ok
                };
                return (o, retried);
            }
            // RFC 9112 §9.3.1: a GET that got no byte back on a reused connection the server
            // closed may be retried on a new connection; every HTTP client does so.
            Err(e)
                if reused && !e.got_bytes && !retried && classify(&e.error) == Outcome::Reset =>
            {
                retried = true;
            }
            Err(e) => {
                tracing::debug!(error = %e.error, reused, retried, got_bytes = e.got_bytes, "request failed");
                return (classify(&e.error), retried);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let (sa, host, path) = parse_url("http://127.0.0.1:8080/version").unwrap();
        assert_eq!(sa, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(host, "127.0.0.1:8080");
        assert_eq!(path, "/version");
        let (sa, _, path) = parse_url("http://127.0.0.1").unwrap();
        assert_eq!(sa.port(), 80);
        assert_eq!(path, "/");
        assert!(parse_url("https://x/").is_err());
        assert!(parse_url("http:///x").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("3h").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn summary_counts_failures_by_kind() {
        let mk = |o, l| Sample {
            due_us: 0,
            latency_us: l,
            outcome: o,
            retried: false,
        };
        let s = Summary::of(&[
            mk(Outcome::Ok, 1000),
            mk(Outcome::Ok, 2000),
            mk(Outcome::Refused, 10),
            mk(Outcome::Timeout, 1_000_000),
            mk(Outcome::Status5xx, 5000),
        ]);
        assert_eq!(s.total, 5);
        assert_eq!(s.ok, 2);
        assert_eq!(s.failed_total, 3);
        assert_eq!(s.failed.refused, 1);
        assert_eq!(s.failed.timeout, 1);
        assert!((s.latency.max_ms - 1000.0).abs() < 1.0);
    }

    #[test]
    fn bad_settings_are_rejected() {
        let mut c = LoadConfig::for_url(
            "http://127.0.0.1:9/",
            10.0,
            Duration::from_secs(1),
            ConnMode::New,
        )
        .unwrap();
        c.rate = 0.0;
        assert!(matches!(run(&c), Err(LoadError::Setting(_))));
    }
}
