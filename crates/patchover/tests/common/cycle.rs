//! Helpers for the patch cycle tests: two LCs with a signing key, bundles, and a client load
//! whose every request has a deadline.

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{Client, Topo, http, http_ready, http_within, unix_ms};

pub fn sha256_hex(data: &[u8]) -> String {
    // sha256 via the system tool keeps the test free of extra crates.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("x");
    fs::write(&f, data).unwrap();
    let out = std::process::Command::new("sha256sum")
        .arg(&f)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// A topology of two LCs, a signing key, and the config that trusts it.
pub struct Cycle {
    pub t: Topo,
    pub key: PathBuf,
}

impl Cycle {
    pub fn new(n_lcs: usize, extra: &str) -> Cycle {
        Cycle::with_layout(n_lcs, extra, false)
    }

    /// `shared_identity`: the `path` mode layout (one MAC and address for all LCs).
    pub fn with_layout(n_lcs: usize, extra: &str, shared_identity: bool) -> Cycle {
        Cycle::build(n_lcs, extra, shared_identity, false)
    }

    /// The same on QEMU LCs (the kernel and disks of `image build-demo --qemu`).
    pub fn qemu(n_lcs: usize, extra: &str, shared_identity: bool) -> Cycle {
        Cycle::build(n_lcs, extra, shared_identity, true)
    }

    /// The `seamless` layout: own addresses, clients routed through the host (see
    /// [`Topo::routed`]).
    pub fn routed(n_lcs: usize, extra: &str) -> Cycle {
        Cycle::build_with(n_lcs, extra, |t| t.routed = true, false)
    }

    /// `ns` LCs with an ext4 image as application disk (see [`Topo::app_image`]).
    pub fn app_image(n_lcs: usize, extra: &str) -> Cycle {
        Cycle::build_with(n_lcs, extra, |t| t.app_image = true, false)
    }

    /// The `seamless` layout on QEMU LCs.
    pub fn qemu_routed(n_lcs: usize, extra: &str) -> Cycle {
        Cycle::build_with(n_lcs, extra, |t| t.routed = true, true)
    }

    fn build(n_lcs: usize, extra: &str, shared_identity: bool, qemu: bool) -> Cycle {
        Cycle::build_with(n_lcs, extra, |t| t.shared_identity = shared_identity, qemu)
    }

    fn build_with(n_lcs: usize, extra: &str, layout: impl FnOnce(&mut Topo), qemu: bool) -> Cycle {
        let mem = if qemu { 160 } else { 96 };
        let lcs: Vec<(u32, u32, u64)> = (0..n_lcs).map(|i| (i as u32 % 2, 40, mem)).collect();
        let mut t = Topo::new(&lcs);
        layout(&mut t);
        if qemu {
            t.use_qemu("");
        }
        let key = t.dir.path().join("release.key");
        let pubkey = t.dir.path().join("release.pub");
        t.po_ok(&[
            "bundle",
            "keygen",
            "--public",
            pubkey.to_str().unwrap(),
            "--secret",
            key.to_str().unwrap(),
        ]);
        t.write_config(&format!(
            "\n[bundles]\ntrusted_keys = [\"{}\"]\n{extra}",
            pubkey.display()
        ));
        t.build_image(0, "1.0.0");
        // The standby's disks exist (any content): the run replaces them with the copy.
        for l in &t.lcs[1..] {
            let (sys, app) = t.disks(l);
            if t.qemu.is_some() {
                fs::write(&sys, b"").unwrap();
                fs::write(&app, b"").unwrap();
            } else if t.app_image {
                fs::create_dir_all(&sys).unwrap();
                fs::write(&app, b"").unwrap();
            } else {
                fs::create_dir_all(&sys).unwrap();
                fs::create_dir_all(&app).unwrap();
            }
        }
        Cycle { t, key }
    }

    /// Makes, signs and imports a bundle; `steps` is the manifest's step/check part.
    pub fn bundle(&self, id: &str, steps: &str, payload: &[(&str, &[u8])]) {
        let dir = self.t.dir.path().join(format!("b-{id}"));
        fs::create_dir_all(dir.join("payload")).unwrap();
        for (name, data) in payload {
            fs::write(dir.join("payload").join(name), data).unwrap();
        }
        fs::write(
            dir.join("manifest.toml"),
            format!(
                "format = 1\nid = \"{id}\"\ntitle = \"test bundle {id}\"\ncategory = \"security\"\nseverity = \"high\"\npublished = 2026-11-25T00:00:00Z\n{steps}"
            ),
        )
        .unwrap();
        self.t.sign_and_import(&dir, &self.key, id);
    }

    /// `stamp-1`: a script bundle that writes the patch's date to /etc/demo/last-patch (the
    /// crash tests' patch: a cycle with something to apply and nothing to check).
    pub fn stamp_bundle(&self) {
        self.bundle(
            "stamp-1",
            "[[step]]\nkind = \"script\"\nfile = \"stamp.sh\"\n",
            &[("stamp.sh", b"date > /etc/demo/last-patch\n")],
        );
    }

    /// The bundle that upgrades the demo service from 1.0.0 to 1.0.1.
    pub fn upgrade_bundle(&self) {
        let steps = format!(
            "[[step]]\nkind = \"replace\"\npath = \"/etc/demo/version\"\nfile = \"version\"\nold_sha256 = \"{}\"\n\n[[check]]\nkind = \"file_hash\"\npath = \"/etc/demo/version\"\nsha256 = \"{}\"\n\n[[check]]\nkind = \"command_output\"\ncommand = [\"/bin/cat\", \"/etc/demo/version\"]\ncontains = \"1.0.1\"\n",
            sha256_hex(b"1.0.0\n"),
            sha256_hex(b"1.0.1\n")
        );
        self.bundle("demo-1.0.1", &steps, &[("version", b"1.0.1\n")]);
    }

    /// The `seamless` start: LC 0 booted, the host's service NAT pointed at it; a client routed
    /// through the host.
    pub fn start_seamless(&self) -> Client {
        let a = &self.t.lcs[0].id;
        self.t.po_ok(&["lc", "boot", a]);
        self.t.po_ok(&["net", "setup", a]);
        Client::routed(&self.t)
    }

    pub fn start_service(&self) {
        let a = &self.t.lcs[0].id;
        self.t.po_ok(&["lc", "boot", a]);
        self.t.po_ok(&["service", "assign", a]);
    }
}

/// A client that writes (and reads back) without pause until stopped; every request has a
/// deadline, so a hung request counts as failed.
/// Requests that succeeded, the failures, and the acknowledged writes (key → value).
pub type LoadResult = (u64, Vec<String>, BTreeMap<String, String>);

pub struct Load {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<LoadResult>>,
}

impl Load {
    /// A load whose requests fail if they take 2 s or more.
    pub fn start(client: &Client, service: String) -> Load {
        Load::with_deadline(client, service, Duration::from_secs(2))
    }

    pub fn with_deadline(client: &Client, service: String, deadline: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        // The sockets wait at least as long as the deadline, which then judges each request.
        let timeout = deadline.max(Duration::from_secs(7));
        let handle = client.spawn(move || {
            let mut ok = 0u64;
            let mut failures = Vec::new();
            let mut acked = BTreeMap::new();
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                let key = format!("k{n}");
                let val = format!("v{n}");
                let (t, at) = (Instant::now(), unix_ms());
                match http_within(
                    &service,
                    "PUT",
                    &format!("/kv/{key}"),
                    val.as_bytes(),
                    timeout,
                ) {
                    Ok((201, _)) if t.elapsed() < deadline => {
                        ok += 1;
                        acked.insert(key.clone(), val);
                    }
                    Ok((status, body)) => failures.push(format!(
                        "PUT {key}: {status} {} after {:?} (sent at unix ms {at})",
                        String::from_utf8_lossy(&body),
                        t.elapsed(),
                    )),
                    Err(e) => failures.push(format!(
                        "PUT {key}: {e} after {:?} (sent at unix ms {at})",
                        t.elapsed()
                    )),
                }
                if n.is_multiple_of(5) {
                    let (t, at) = (Instant::now(), unix_ms());
                    match http_within(&service, "GET", "/version", b"", timeout) {
                        Ok((200, _)) if t.elapsed() < deadline => ok += 1,
                        Ok((status, _)) => failures.push(format!(
                            "GET /version: {status} after {:?} (sent at unix ms {at})",
                            t.elapsed()
                        )),
                        Err(e) => failures.push(format!(
                            "GET /version: {e} after {:?} (sent at unix ms {at})",
                            t.elapsed()
                        )),
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (ok, failures, acked)
        });
        Load {
            stop,
            handle: Some(handle),
        }
    }

    pub fn finish(mut self) -> LoadResult {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

/// A client that keeps one connection alive and writes on it without pause, opening a new one
/// only when the server answers `Connection: close`. It records which LC answered each
/// request, so a request answered by another LC than its connection's first answer (the old
/// service forwarding it) is seen.
pub struct KeepAlive {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<KeepAliveResult>>,
}

/// Requests that succeeded, failures, acknowledged writes, and the requests answered by an LC
/// other than the one their connection started with.
pub type KeepAliveResult = (u64, Vec<String>, BTreeMap<String, String>, u64);

impl KeepAlive {
    pub fn start(client: &Client, service: String, deadline: Duration) -> KeepAlive {
        use std::io::{BufReader, Write};
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = client.spawn(move || {
            let addr: std::net::SocketAddr = format!("{service}:80").parse().unwrap();
            let (mut ok, mut failures, mut acked, mut moved) =
                (0u64, Vec::new(), BTreeMap::new(), 0u64);
            let mut conn: Option<(BufReader<std::net::TcpStream>, Option<String>)> = None;
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                let (key, val) = (format!("ka{n}"), format!("w{n}"));
                let t = Instant::now();
                type Conn = Option<(BufReader<std::net::TcpStream>, Option<String>)>;
                let attempt = |conn: &mut Conn| -> std::io::Result<(u16, String, bool)> {
                    if conn.is_none() {
                        let st = std::net::TcpStream::connect_timeout(&addr, deadline)?;
                        st.set_read_timeout(Some(deadline))?;
                        st.set_nodelay(true)?;
                        *conn = Some((BufReader::new(st), None));
                    }
                    let (r, _) = conn.as_mut().unwrap();
                    // One write: pieces would meet Nagle and delayed ACKs (40 ms each).
                    r.get_mut().write_all(
                        format!(
                            "PUT /kv/{key} HTTP/1.1\r\nHost: s\r\nContent-Length: {}\r\n\r\n{val}",
                            val.len()
                        )
                        .as_bytes(),
                    )?;
                    read_answer(r)
                };
                let reused = conn.as_ref().is_some_and(|c| c.1.is_some());
                let mut res = attempt(&mut conn);
                // RFC 9112 §9.3.1: a request on a reused connection that the server closed
                // without answering is sent again on a new one (PUT is idempotent).
                if reused
                    && matches!(&res, Err(e) if matches!(e.kind(), std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe))
                {
                    conn = None;
                    res = attempt(&mut conn);
                }
                match res {
                    Ok((201, by, close)) if t.elapsed() < deadline => {
                        ok += 1;
                        acked.insert(key, val);
                        let first = &mut conn.as_mut().unwrap().1;
                        match first {
                            None => *first = Some(by),
                            Some(f) if *f != by => moved += 1,
                            _ => {}
                        }
                        if close {
                            conn = None;
                        }
                    }
                    Ok((status, by, _)) => {
                        failures.push(format!(
                            "PUT {key}: {status} from {by} after {:?} (ended at unix ms {})",
                            t.elapsed(),
                            unix_ms()
                        ));
                        conn = None;
                    }
                    Err(e) => {
                        failures.push(format!(
                            "PUT {key} on a kept-alive connection: {e} after {:?} (ended at unix ms {})",
                            t.elapsed(),
                            unix_ms()
                        ));
                        conn = None;
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (ok, failures, acked, moved)
        });
        KeepAlive {
            stop,
            handle: Some(handle),
        }
    }

    pub fn finish(mut self) -> KeepAliveResult {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

/// Reads one HTTP/1.1 answer: its status, who served it (`X-Served-By`), and whether the
/// server closes the connection after it.
fn read_answer(
    r: &mut std::io::BufReader<std::net::TcpStream>,
) -> std::io::Result<(u16, String, bool)> {
    use std::io::{BufRead, Read};
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "closed before answering",
        ));
    }
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|x| x.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("status line {line:?}")))?;
    let (mut len, mut by, mut close) = (0usize, String::new(), false);
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end().to_ascii_lowercase();
        if h.is_empty() {
            break;
        }
        if let Some(v) = h.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        } else if let Some(v) = h.strip_prefix("x-served-by:") {
            by = v.trim().to_owned();
        } else if h.starts_with("connection:") && h.contains("close") {
            close = true;
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok((status, by, close))
}

/// One read a [`Reads`] client got answered.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The LC that answered (`X-Served-By`).
    pub by: String,
    /// When the request was sent and when its answer was read, unix ms.
    pub sent_ms: u128,
    pub done_ms: u128,
    /// The connection it went on (counted from 1).
    pub conn: u64,
}

/// What a [`Reads`] client saw: the answers, the failed requests, and the connections the
/// server closed (a drained service closes kept-alive connections).
pub type ReadsResult = (Vec<Answer>, Vec<String>, u64);

/// A client that only reads (`GET /version`, which writes nothing on the server), every request
/// with a 2 s deadline, either on a new connection each (`keep: None`) or on a kept-alive
/// connection that the client itself closes after `keep` (as browsers and `wrk` do).
pub struct Reads {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<ReadsResult>>,
}

impl Reads {
    pub fn start(client: &Client, service: String, keep: Option<Duration>) -> Reads {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = client.spawn(move || read_loop(&s, &service, keep));
        Reads {
            stop,
            handle: Some(handle),
        }
    }

    pub fn finish(mut self) -> ReadsResult {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

fn read_loop(stop: &AtomicBool, service: &str, keep: Option<Duration>) -> ReadsResult {
    use std::io::Write;
    let deadline = Duration::from_secs(2);
    let addr: std::net::SocketAddr = format!("{service}:80").parse().unwrap();
    let (mut answers, mut failures, mut closed) = (Vec::new(), Vec::new(), 0u64);
    let mut conn: Option<(std::io::BufReader<std::net::TcpStream>, Instant)> = None;
    let mut n_conn = 0u64;
    let req = match keep {
        Some(_) => "GET /version HTTP/1.1\r\nHost: s\r\n\r\n",
        None => "GET /version HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n",
    };
    while !stop.load(Ordering::Relaxed) {
        if conn
            .as_ref()
            .is_some_and(|(_, at)| keep.is_none_or(|k| at.elapsed() >= k))
        {
            conn = None; // the client closes it
        }
        let (t, sent_ms) = (Instant::now(), unix_ms());
        let res = (|| -> std::io::Result<(u16, String, bool)> {
            if conn.is_none() {
                let st = std::net::TcpStream::connect_timeout(&addr, deadline)?;
                st.set_read_timeout(Some(deadline))?;
                st.set_nodelay(true)?;
                n_conn += 1;
                conn = Some((std::io::BufReader::new(st), Instant::now()));
            }
            let (r, _) = conn.as_mut().unwrap();
            r.get_mut().write_all(req.as_bytes())?;
            read_answer(r)
        })();
        match res {
            Ok((200, by, close)) if t.elapsed() < deadline => {
                answers.push(Answer {
                    by,
                    sent_ms,
                    done_ms: unix_ms(),
                    conn: n_conn,
                });
                if close {
                    closed += u64::from(keep.is_some());
                    conn = None;
                }
            }
            Ok((status, by, _)) => {
                failures.push(format!(
                    "GET /version: {status} from {by} after {:?} (sent at unix ms {sent_ms})",
                    t.elapsed()
                ));
                conn = None;
            }
            Err(e) => {
                failures.push(format!(
                    "GET /version on connection {n_conn}: {e} after {:?} (sent at unix ms {sent_ms})",
                    t.elapsed()
                ));
                conn = None;
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    (answers, failures, closed)
}

/// Runs `args` (a `patch` or a `rollback`, with `--json` added) while `client` writes with a
/// per-request `deadline`; the run must end `ok` with no failed request and at least
/// `min_requests` served. Returns the run's report and the acknowledged writes. `settle` is
/// the load's time before and after the run.
pub fn run_under_load(
    c: &Cycle,
    client: &Client,
    deadline: Duration,
    settle: Duration,
    min_requests: u64,
    args: &[&str],
) -> (serde_json::Value, BTreeMap<String, String>) {
    let load = Load::with_deadline(client, c.t.service(), deadline);
    std::thread::sleep(settle);
    let report = c.t.po_json(args);
    std::thread::sleep(settle);
    let (ok, failures, acked) = load.finish();
    eprintln!(
        "{args:?}: {ok} requests, {} failed, {} writes acknowledged; steps: {}",
        failures.len(),
        acked.len(),
        report["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| format!(
                "{}={:.0}ms",
                s["step"].as_str().unwrap_or("?"),
                s["ms"].as_f64().unwrap_or(0.0)
            ))
            .collect::<Vec<_>>()
            .join(" ")
    );
    assert_eq!(report["outcome"], "ok", "{args:?}: {report:#}");
    assert!(
        failures.is_empty(),
        "{args:?}: {} failed requests of {}: {:?}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(10)]
    );
    assert!(ok > min_requests, "{args:?}: the load ran: {ok}");
    (report, acked)
}

pub fn assert_all_there(client: &Client, service: &str, acked: &BTreeMap<String, String>) {
    let service = service.to_owned();
    let acked = acked.clone();
    let lost = client.run(move || {
        acked
            .iter()
            .filter(|(k, v)| !matches!(http(&service, "GET", &format!("/kv/{k}"), b""), Ok((200, b)) if b == v.as_bytes()))
            .map(|(k, _)| k.clone())
            .collect::<Vec<_>>()
    });
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}

pub fn version(client: &Client, service: &str) -> String {
    let s = service.to_owned();
    let (st, body) = client.run(move || http_ready(&s, "/version"));
    assert_eq!(st, 200);
    String::from_utf8(body).unwrap().trim().to_owned()
}

/// Failed requests of a [`Load`] and a [`Reads`] (each says when it was sent, unix ms) around
/// a failure of the service from `from_ms` (e.g. its process killed) to `to_ms` (answered
/// again): sent in the 2 s before it (in flight), inside it, and outside both.
pub struct FailureSplit<'a> {
    pub in_flight: usize,
    pub inside: usize,
    pub outside: Vec<&'a String>,
}

pub fn split_failures<'a>(
    failures: impl IntoIterator<Item = &'a String>,
    from_ms: u128,
    to_ms: u128,
) -> FailureSplit<'a> {
    let sent = |f: &str| -> u128 {
        let at = f.rsplit("sent at unix ms ").next().unwrap();
        at.trim_end_matches(')').parse().unwrap()
    };
    let mut split = FailureSplit {
        in_flight: 0,
        inside: 0,
        outside: Vec::new(),
    };
    for f in failures {
        match sent(f) {
            s if (from_ms.saturating_sub(2000)..from_ms).contains(&s) => split.in_flight += 1,
            s if (from_ms..=to_ms).contains(&s) => split.inside += 1,
            _ => split.outside.push(f),
        }
    }
    split
}

/// The first answer `by` an LC sent after `after_ms`.
pub fn first_answer_by<'a>(answers: &'a [Answer], by: &str, after_ms: u128) -> Option<&'a Answer> {
    answers.iter().find(|x| x.by == by && x.sent_ms > after_ms)
}

/// The phases a `path`/`readdress` switch of the patch cycle reports (issue 26), for `ns` and
/// `qemu` LCs alike: the switcher's, its window split into the take-over's.
pub const PAUSED_SWITCH_PHASES: [&str; 12] = [
    "prepare",
    "hold",
    "drain",
    "stop",
    "last_catch_up",
    "freeze",
    "attach",
    "restart",
    "window",
    "move",
    "check",
    "release",
];

/// Checks a paused switch's phases in the run's journal (the switch step's detail) and
/// returns them as `name ms` for the log: each named as [`PAUSED_SWITCH_PHASES`], none
/// negative, and the pause exactly those from the drain to the release.
pub fn switch_phases(run: &serde_json::Value) -> String {
    let step = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == "switch" && s["state"] == "done")
        .unwrap_or_else(|| panic!("no switch: {run:#}"));
    let detail = &step["detail"];
    let phases = detail["phases"].as_array().expect("phases").clone();
    let names: Vec<&str> = phases.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, PAUSED_SWITCH_PHASES, "{detail:#}");
    let ms: Vec<f64> = phases.iter().map(|p| p["ms"].as_f64().unwrap()).collect();
    assert!(ms.iter().all(|m| *m >= 0.0), "{detail:#}");
    let paused: f64 = ms[2..].iter().sum();
    let pause = detail["pause_ms"].as_f64().unwrap();
    assert!(
        (paused - pause).abs() < 0.01,
        "{paused} != {pause}: {detail:#}"
    );
    names
        .iter()
        .zip(&ms)
        .map(|(n, m)| format!("{n} {m:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}
