//! The demo service: a small HTTP/1.1 key-value store, the service every patchover test loads,
//! patches and checks.
//!
//! Why it is shaped like this: patchover's promise is "no failed request and no lost write".
//! So the service appends every write to a log on the LC's *application disk* and fsyncs it
//! before it answers 2xx (an acknowledged write is durable), replays that log at start, keeps
//! connections alive (so a switch must handle established flows), and reads its version string
//! from a file on the *system disk* (so a patch can change it and a check can see it).
//!
//! Routes: `PUT /kv/KEY` (body = value), `GET /kv/KEY`, `GET /version`, `GET /health`.
//!
//! Drain (for a switch): SIGUSR1 makes the service stop keeping connections alive — a request
//! in flight is answered with `Connection: close`, a keep-alive connection idle between
//! requests is closed — while it keeps accepting new ones; a new connection is not idle
//! before its first request, which is awaited and answered with `Connection: close` (see
//! `FIRST_REQUEST_GRACE`); SIGUSR2 undoes it.
//! Every response carries `X-Served-By: <hostname>` so a client can tell which LC answered.
//!
//! Hand-off (the patch cycle's `seamless` mode): park, then forward to the standby, over a
//! control socket (see [`handoff`]).
//!
//! `patchover-demo writer …` runs the disk-copy benchmark's writer instead (see [`writer`]).
//!
//! std only: the binary is linked statically and runs inside any rootfs.

mod handoff;
mod writer;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use ct_codecs::{Decoder, Encoder, Hex};

const MAX_HEADER: usize = 16 * 1024;
const MAX_BODY: usize = 1024 * 1024;
const MAX_KEY: usize = 200;
const MAX_CONNECTIONS: usize = 1024;
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often an idle connection looks at the drain flag.
const DRAIN_POLL: Duration = Duration::from_millis(10);
/// How long a draining service waits for the first request of a new connection. Such a
/// connection is not idle: its client sends its request right after the handshake, and only
/// a scheduler that did not run it yet stands between the two (under load, well over
/// `DRAIN_POLL`). Closing it then fails the request outright: a client may only retry on a
/// connection it *reused* (RFC 9112 §9.3.1; e.g. Go's net/http never retries a fresh one).
/// Bounded, so a client that connects and stays silent (a browser's preconnect) holds a switch
/// for about this long, not for the switch's whole drain deadline.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);
/// How long a forwarding service (the hand-off) keeps a connection that is idle between
/// requests: its client's next request is forwarded and answered with `Connection: close`.
const FORWARD_IDLE_GRACE: Duration = Duration::from_secs(1);

/// Set by SIGUSR1, cleared by SIGUSR2.
static DRAINING: AtomicBool = AtomicBool::new(false);

/// Where requests go: here, held (parked), or to the standby.
static GATE: LazyLock<handoff::Gate> = LazyLock::new(handoff::Gate::default);

extern "C" fn on_drain(_: libc::c_int) {
    DRAINING.store(true, Ordering::SeqCst);
}

extern "C" fn on_resume(_: libc::c_int) {
    DRAINING.store(false, Ordering::SeqCst);
}

fn install_signal_handlers() {
    // SAFETY: the handlers only store to an atomic, which is async-signal-safe; `signal` is
    // called before any thread starts.
    unsafe {
        libc::signal(
            libc::SIGUSR1,
            on_drain as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGUSR2,
            on_resume as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
}

struct Args {
    listen: String,
    data_dir: PathBuf,
    version_file: PathBuf,
    control: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: "0.0.0.0:80".to_owned(),
        data_dir: PathBuf::from("/data"),
        version_file: PathBuf::from("/etc/demo/version"),
        control: PathBuf::from(handoff::DEFAULT_CONTROL),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--listen" => args.listen = val()?,
            "--data" => args.data_dir = PathBuf::from(val()?),
            "--version-file" => args.version_file = PathBuf::from(val()?),
            "--control" => args.control = PathBuf::from(val()?),
            "--help" | "-h" => {
                return Err(
                    "usage: patchover-demo [--listen ADDR:PORT] [--data DIR] [--version-file FILE] [--control SOCKET]\n       patchover-demo ctl --help\n       patchover-demo writer --help"
                        .to_owned(),
                );
            }
            other => return Err(format!("unknown argument {other:?}; see --help")),
        }
    }
    Ok(args)
}

/// The store: the map in memory, the log on disk. One lock orders writes in the log as they
/// are acknowledged.
struct Store {
    inner: Mutex<StoreInner>,
    version: String,
    host: String,
    writes: AtomicUsize,
}

struct StoreInner {
    map: HashMap<String, Vec<u8>>,
    log: File,
}

fn hex(data: &[u8]) -> String {
    Hex::encode_to_string(data).expect("hex of a value fits")
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    Hex::decode_to_vec(s, None).ok()
}

impl Store {
    /// Opens the log and replays it. A torn last line (a write that was never acknowledged,
    /// since the fsync did not return) is dropped.
    fn open(data_dir: &Path, version: String, host: String) -> io::Result<Store> {
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join("kv.log");
        let mut map = HashMap::new();
        if let Ok(f) = File::open(&path) {
            for line in BufReader::new(f).split(b'\n') {
                let line = line?;
                let Ok(line) = std::str::from_utf8(&line) else {
                    continue;
                };
                if let Some((k, v)) = line.split_once('\t')
                    && let Some(v) = unhex(v)
                {
                    map.insert(k.to_owned(), v);
                }
            }
        }
        let log = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(Store {
            inner: Mutex::new(StoreInner { map, log }),
            version,
            host,
            writes: AtomicUsize::new(0),
        })
    }

    fn put(&self, key: &str, value: &[u8]) -> io::Result<()> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let line = format!("{key}\t{}\n", hex(value));
        inner.log.write_all(line.as_bytes())?;
        inner.log.sync_data()?;
        inner.map.insert(key.to_owned(), value.to_vec());
        self.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn get(&self, key: &str) -> Option<Vec<u8>> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.map.get(key).cloned()
    }

    fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .len()
    }
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= MAX_KEY
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
    keep_alive: bool,
}

enum ReadOutcome {
    Request(Request),
    Closed,
    Bad(u16, &'static str),
}

/// Waits for the first byte of the next request. `false`: close the connection (the peer
/// closed it, it was idle too long, or the service drains and the connection is idle between
/// requests). `opened`: when the connection was accepted if it has not sent a request yet
/// (`None` once it has): such a connection is given [`FIRST_REQUEST_GRACE`] from then to send
/// its first request even while the service drains.
fn wait_for_request(
    r: &mut BufReader<TcpStream>,
    opened: Option<std::time::Instant>,
) -> io::Result<bool> {
    let idle_since = std::time::Instant::now();
    r.get_ref().set_read_timeout(Some(DRAIN_POLL))?;
    let more = loop {
        match r.fill_buf() {
            Ok(buf) => break !buf.is_empty(),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                // A forwarding service keeps an idle connection a while: its client's next
                // request is one the hand-off must forward, and closing under it makes a
                // request in flight fail (a client may retry only what is idempotent).
                let closing = DRAINING.load(Ordering::SeqCst)
                    || (GATE.forwarding() && idle_since.elapsed() > FORWARD_IDLE_GRACE);
                let fresh = opened.is_some_and(|t| t.elapsed() < FIRST_REQUEST_GRACE);
                if (closing && !fresh) || idle_since.elapsed() > IDLE_TIMEOUT {
                    break false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    };
    r.get_ref().set_read_timeout(Some(IDLE_TIMEOUT))?;
    Ok(more)
}

fn read_request(r: &mut BufReader<TcpStream>) -> io::Result<ReadOutcome> {
    let mut head = Vec::new();
    loop {
        let n = r.read_until(b'\n', &mut head)?;
        if n == 0 {
            return Ok(if head.is_empty() {
                ReadOutcome::Closed
            } else {
                ReadOutcome::Bad(400, "truncated request")
            });
        }
        if head.len() > MAX_HEADER {
            return Ok(ReadOutcome::Bad(431, "header too large"));
        }
        if head == b"\r\n" || head == b"\n" {
            head.clear(); // tolerate blank lines between requests
            continue;
        }
        if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") {
            break;
        }
    }
    let Ok(text) = std::str::from_utf8(&head) else {
        return Ok(ReadOutcome::Bad(400, "header is not UTF-8"));
    };
    let mut lines = text.lines();
    let start = lines.next().unwrap_or_default();
    let mut parts = start.split(' ');
    let (Some(method), Some(path), Some(proto)) = (parts.next(), parts.next(), parts.next()) else {
        return Ok(ReadOutcome::Bad(400, "bad request line"));
    };
    let mut keep_alive = proto == "HTTP/1.1";
    let mut len = 0usize;
    for l in lines {
        let Some((name, value)) = l.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => match value.parse() {
                Ok(n) if n <= MAX_BODY => len = n,
                Ok(_) => return Ok(ReadOutcome::Bad(413, "body too large")),
                Err(_) => return Ok(ReadOutcome::Bad(400, "bad content-length")),
            },
            "transfer-encoding" => {
                return Ok(ReadOutcome::Bad(
                    501,
                    "chunked bodies are not supported; send Content-Length",
                ));
            }
            "connection" => {
                let v = value.to_ascii_lowercase();
                if v.contains("close") {
                    keep_alive = false;
                } else if v.contains("keep-alive") {
                    keep_alive = true;
                }
            }
            _ => {}
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(ReadOutcome::Request(Request {
        method: method.to_owned(),
        path: path.to_owned(),
        body,
        keep_alive,
    }))
}

fn respond(
    w: &mut impl Write,
    served_by: &str,
    status: u16,
    body: &[u8],
    keep_alive: bool,
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    write!(
        w,
        "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nContent-Type: text/plain\r\nX-Served-By: {}\r\nConnection: {}\r\n\r\n",
        body.len(),
        served_by,
        if keep_alive { "keep-alive" } else { "close" }
    )?;
    w.write_all(body)?;
    w.flush()
}

fn handle(req: &Request, store: &Store) -> (u16, Vec<u8>) {
    let path = req.path.split('?').next().unwrap_or_default();
    match (req.method.as_str(), path) {
        ("GET", "/version") => (200, format!("{}\n", store.version).into_bytes()),
        ("GET", "/health") => (
            200,
            format!(
                "{{\"status\":\"ok\",\"host\":\"{}\",\"version\":\"{}\",\"keys\":{},\"writes\":{}}}\n",
                store.host,
                store.version,
                store.len(),
                store.writes.load(Ordering::Relaxed)
            )
            .into_bytes(),
        ),
        (m, p) if p.starts_with("/kv/") => {
            let key = &p[4..];
            if !valid_key(key) {
                return (400, b"bad key: use 1-200 of A-Z a-z 0-9 . _ -\n".to_vec());
            }
            match m {
                "GET" => match store.get(key) {
                    Some(v) => (200, v),
                    None => (404, b"no such key\n".to_vec()),
                },
                "PUT" | "POST" => match store.put(key, &req.body) {
                    Ok(()) => (201, b"stored\n".to_vec()),
                    Err(e) => (500, format!("cannot store: {e}\n").into_bytes()),
                },
                _ => (405, b"use GET or PUT\n".to_vec()),
            }
        }
        _ => (404, b"routes: GET /version, GET /health, GET|PUT /kv/KEY\n".to_vec()),
    }
}

fn serve_connection(stream: TcpStream, store: &Store) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = BufWriter::new(stream);
    let mut opened = Some(std::time::Instant::now());
    loop {
        if !wait_for_request(&mut reader, opened.take())? {
            return Ok(());
        }
        match read_request(&mut reader)? {
            ReadOutcome::Closed => return Ok(()),
            ReadOutcome::Bad(status, why) => {
                respond(
                    &mut writer,
                    &store.host,
                    status,
                    format!("{why}\n").as_bytes(),
                    false,
                )?;
                return Ok(());
            }
            ReadOutcome::Request(req) => {
                let (status, body, served_by) = match GATE.enter() {
                    handoff::Pass::Local(_in_flight) => {
                        let (status, body) = handle(&req, store);
                        (status, body, store.host.clone())
                    }
                    handoff::Pass::Forward(to) => {
                        match handoff::forward(to, &req.method, &req.path, &req.body) {
                            Ok(r) => (r.status, r.body, r.served_by),
                            Err(e) => (
                                502,
                                format!("hand-off to {to} failed: {e}\n").into_bytes(),
                                store.host.clone(),
                            ),
                        }
                    }
                };
                let keep_alive =
                    req.keep_alive && !DRAINING.load(Ordering::SeqCst) && !GATE.forwarding();
                respond(&mut writer, &served_by, status, &body, keep_alive)?;
                if !keep_alive {
                    return Ok(());
                }
            }
        }
    }
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("writer") {
        let code = match writer::parse(std::env::args().skip(2)).and_then(|a| writer::run(&a)) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("patchover-demo writer: {e}");
                2
            }
        };
        std::process::exit(code);
    }
    if std::env::args().nth(1).as_deref() == Some("ctl") {
        std::process::exit(handoff::ctl_main(std::env::args().skip(2)));
    }
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("patchover-demo: {e}");
            std::process::exit(2);
        }
    };
    let version = std::fs::read_to_string(&args.version_file)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| {
            eprintln!(
                "patchover-demo: cannot read version file {}: {e}; answering \"unknown\"",
                args.version_file.display()
            );
            "unknown".to_owned()
        });
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    let store = match Store::open(&args.data_dir, version, host) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!(
                "patchover-demo: cannot open the log in {}: {e}",
                args.data_dir.display()
            );
            std::process::exit(1);
        }
    };
    let listener = match TcpListener::bind(&args.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("patchover-demo: cannot listen on {}: {e}", args.listen);
            std::process::exit(1);
        }
    };
    // A longer accept queue than std's 128: after a switch the held connection attempts are
    // released at once (hundreds under load); a SYN dropped by a full queue costs its client a
    // 1 s retransmission. listen(2) on a listening socket only changes the backlog.
    // SAFETY: the fd is the listener's own, open for as long as `listener` lives.
    unsafe {
        libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096);
    }
    eprintln!(
        "patchover-demo {} listening on {} with data in {}",
        store.version,
        args.listen,
        args.data_dir.display()
    );
    install_signal_handlers();
    if let Err(e) = handoff::serve_control(&args.control, &GATE) {
        eprintln!(
            "patchover-demo: cannot serve control commands on {}: {e} (hand-off unavailable)",
            args.control.display()
        );
    }
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
            let mut w = stream;
            let _ = respond(&mut w, &store.host, 503, b"too many connections\n", false);
            continue;
        }
        active.fetch_add(1, Ordering::Relaxed);
        let store = Arc::clone(&store);
        let active = Arc::clone(&active);
        let spawned = std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || {
                let _ = serve_connection(stream, &store);
                active.fetch_sub(1, Ordering::Relaxed);
            });
        if spawned.is_err() {
            eprintln!("patchover-demo: cannot start a thread for a connection");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let data = b"\x00hello\xff\n\t";
        assert_eq!(unhex(&hex(data)).unwrap(), data);
        assert!(unhex("abc").is_none());
        assert!(unhex("zz").is_none());
    }

    #[test]
    fn log_replay_survives_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), "1".into(), "h".into()).unwrap();
            s.put("a", b"one").unwrap();
            s.put("b", b"two").unwrap();
            s.put("a", b"three").unwrap();
        }
        // A write that crashed before its fsync returned: half a line.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("kv.log"))
            .unwrap();
        f.write_all(b"c\t6").unwrap();
        let s = Store::open(dir.path(), "1".into(), "h".into()).unwrap();
        assert_eq!(s.get("a").unwrap(), b"three");
        assert_eq!(s.get("b").unwrap(), b"two");
        assert!(s.get("c").is_none());
    }

    #[test]
    fn keys_are_checked() {
        assert!(valid_key("user-1.x_y"));
        assert!(!valid_key(""));
        assert!(!valid_key("a/b"));
        assert!(!valid_key(&"k".repeat(201)));
    }
}
