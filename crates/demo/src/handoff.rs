//! Hand-off: how the service leaves an LC without stopping (the patch cycle's `seamless` mode).
//!
//! Why: in `seamless` mode new connections go to the standby at once while the old LC still
//! has connections its clients keep using. Both LCs serving writes would split the data (each
//! has its own application disk). So the old service *parks* — it finishes the requests in
//! flight and holds every later one unread-into-the-store — the orchestrator copies the last
//! writes to the standby and starts the service there, and then the old service *forwards* the
//! held requests, and every request after them, to the standby, answering each with
//! `Connection: close` so its client moves to a new connection (which goes to the standby).
//! One writer at every moment; no request fails; no acknowledged write is lost.
//!
//! Control: a Unix socket (`--control`, default [`DEFAULT_CONTROL`]), one line in, one line
//! out: `park` (answers once no request is in flight), `forward ADDR:PORT`, `resume` (serve
//! locally again: a park that was not followed by a forward is undone), `state`. The answer
//! starts with `ok` or `error`. `patchover-demo ctl COMMAND…` sends one and exits 0 on `ok`.
//!
//! A park that is neither forwarded nor resumed within [`PARK_LIMIT`] ends by itself (the
//! service serves locally again) and says so on stderr: a parked service must never stay
//! parked because its orchestrator died. patchover's recovery acts well within that time.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Where the service listens for control commands unless told otherwise.
pub const DEFAULT_CONTROL: &str = "/var/run/patchover-demo.sock";
/// The longest a park lasts without a `forward` or `resume`.
pub const PARK_LIMIT: Duration = Duration::from_secs(30);
/// How long `park` waits for the requests in flight.
const PARK_WAIT: Duration = Duration::from_secs(10);
/// How long a forwarded request may take, connect included, before it is answered 502.
const FORWARD_PATIENCE: Duration = Duration::from_secs(5);
const MAX_FORWARDED_BODY: usize = 2 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Serving,
    Parked { since: Instant },
    Forwarding(SocketAddr),
}

/// Where a request goes.
pub enum Pass<'a> {
    /// Serve it here; the guard counts it as in flight until dropped.
    Local(InFlight<'a>),
    /// Send it to the standby.
    Forward(SocketAddr),
}

/// The gate every request passes before it touches the store.
pub struct Gate {
    state: Mutex<(Mode, usize)>,
    changed: Condvar,
}

/// One request in flight on this LC.
pub struct InFlight<'a>(&'a Gate);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        st.1 -= 1;
        self.0.changed.notify_all();
    }
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            state: Mutex::new((Mode::Serving, 0)),
            changed: Condvar::new(),
        }
    }
}

impl Gate {
    /// Waits while the service is parked; then says where the request goes.
    pub fn enter(&self) -> Pass<'_> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match st.0 {
                Mode::Serving => {
                    st.1 += 1;
                    return Pass::Local(InFlight(self));
                }
                Mode::Forwarding(to) => return Pass::Forward(to),
                Mode::Parked { since } => {
                    let left = PARK_LIMIT.saturating_sub(since.elapsed());
                    if left.is_zero() {
                        eprintln!(
                            "patchover-demo: parked for {PARK_LIMIT:?} with no forward or resume; serving here again"
                        );
                        st.0 = Mode::Serving;
                        self.changed.notify_all();
                        continue;
                    }
                    st = self
                        .changed
                        .wait_timeout(st, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }

    /// Whether requests go elsewhere now (connections should close).
    pub fn forwarding(&self) -> bool {
        matches!(
            self.state.lock().unwrap_or_else(|p| p.into_inner()).0,
            Mode::Forwarding(_)
        )
    }

    /// Parks, and waits until no request is in flight; `Err` says how many still are.
    pub fn park(&self, wait: Duration) -> Result<(), String> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match st.0 {
            Mode::Forwarding(to) => return Err(format!("already forwarding to {to}")),
            Mode::Parked { .. } => {}
            Mode::Serving => {
                st.0 = Mode::Parked {
                    since: Instant::now(),
                }
            }
        }
        let start = Instant::now();
        while st.1 > 0 {
            let left = wait.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(format!(
                    "{} requests still in flight after {wait:?}; still parked (send resume to undo)",
                    st.1
                ));
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Sends every held and later request to `to`. Only from a park: the requests in flight
    /// must have finished here first.
    pub fn forward(&self, to: SocketAddr) -> Result<(), String> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match st.0 {
            Mode::Serving => return Err("not parked; send park first".into()),
            Mode::Forwarding(old) if old != to => {
                return Err(format!("already forwarding to {old}"));
            }
            _ => {}
        }
        if st.1 > 0 {
            return Err(format!("{} requests still in flight here", st.1));
        }
        st.0 = Mode::Forwarding(to);
        self.changed.notify_all();
        Ok(())
    }

    /// Serves locally again. Refused once forwarding: the standby has taken writes since.
    pub fn resume(&self) -> Result<(), String> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Mode::Forwarding(to) = st.0 {
            return Err(format!(
                "forwarding to {to}: the data moved there; serving here again would lose its writes"
            ));
        }
        st.0 = Mode::Serving;
        self.changed.notify_all();
        Ok(())
    }

    fn describe(&self) -> String {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match st.0 {
            Mode::Serving => format!("serving in_flight={}", st.1),
            Mode::Parked { since } => format!(
                "parked for_ms={} in_flight={}",
                since.elapsed().as_millis(),
                st.1
            ),
            Mode::Forwarding(to) => format!("forwarding to={to}"),
        }
    }

    /// One control command; the answer line.
    pub fn command(&self, line: &str) -> String {
        let words: Vec<&str> = line.split_whitespace().collect();
        let res = match words.as_slice() {
            ["park"] => self.park(PARK_WAIT).map(|()| "parked".to_owned()),
            ["forward", to] => match to.parse::<SocketAddr>() {
                Ok(to) => self.forward(to).map(|()| format!("forwarding to {to}")),
                Err(_) => Err(format!("{to:?} is not ADDR:PORT")),
            },
            ["resume"] => self.resume().map(|()| "serving".to_owned()),
            ["state"] => Ok(self.describe()),
            _ => Err(format!(
                "unknown command {line:?}: use park, forward ADDR:PORT, resume or state"
            )),
        };
        match res {
            Ok(m) => format!("ok {m}"),
            Err(e) => format!("error {e}"),
        }
    }
}

/// Serves control commands on `path` (a stale socket file is replaced) on its own thread.
pub fn serve_control(path: &Path, gate: &'static Gate) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                // One command at a time: a park may wait for requests in flight.
                let _ = control_connection(conn, gate);
            }
        })?;
    Ok(())
}

fn control_connection(conn: UnixStream, gate: &Gate) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(&conn).take(4096).read_line(&mut line)?;
    let answer = gate.command(line.trim());
    (&conn).write_all(format!("{answer}\n").as_bytes())
}

/// `patchover-demo ctl [--control PATH] COMMAND…`: sends one command, prints the answer.
pub fn ctl_main(args: impl Iterator<Item = String>) -> i32 {
    let mut path = DEFAULT_CONTROL.to_owned();
    let mut words = Vec::new();
    let mut it = args;
    while let Some(a) = it.next() {
        match a.as_str() {
            "--control" => match it.next() {
                Some(p) => path = p,
                None => {
                    eprintln!("patchover-demo ctl: --control needs a path");
                    return 2;
                }
            },
            "--help" | "-h" => {
                eprintln!(
                    "usage: patchover-demo ctl [--control PATH] park|forward ADDR:PORT|resume|state"
                );
                return 0;
            }
            _ => words.push(a),
        }
    }
    if words.is_empty() {
        eprintln!("patchover-demo ctl: name a command: park, forward ADDR:PORT, resume or state");
        return 2;
    }
    let run = || -> io::Result<String> {
        let mut s = UnixStream::connect(&path)?;
        s.set_read_timeout(Some(PARK_WAIT + Duration::from_secs(5)))?;
        s.write_all(format!("{}\n", words.join(" ")).as_bytes())?;
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer)?;
        Ok(answer.trim().to_owned())
    };
    match run() {
        Ok(a) if a.starts_with("ok") => {
            println!("{a}");
            0
        }
        Ok(a) => {
            eprintln!("patchover-demo ctl: {a}");
            1
        }
        Err(e) => {
            eprintln!(
                "patchover-demo ctl: cannot reach the service at {path}: {e} (is it running?)"
            );
            1
        }
    }
}

/// A response from the standby, to be relayed.
pub struct Relayed {
    pub status: u16,
    pub served_by: String,
    pub body: Vec<u8>,
}

/// Sends one request to `to` on a new connection and reads the whole answer. Connection
/// refusals are retried until [`FORWARD_PATIENCE`]; once the request was sent, it is not sent
/// again (a write must not be applied twice).
pub fn forward(to: SocketAddr, method: &str, path: &str, body: &[u8]) -> io::Result<Relayed> {
    let start = Instant::now();
    let mut stream = loop {
        match TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
            Ok(s) => break s,
            Err(_) if start.elapsed() < FORWARD_PATIENCE => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    };
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(FORWARD_PATIENCE))?;
    stream.set_write_timeout(Some(FORWARD_PATIENCE))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {to}\r\nContent-Length: {}\r\nConnection: close\r\nX-Forwarded-By: patchover-demo\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    stream.write_all(&req)?;
    let mut r = BufReader::new(stream);
    let mut status_line = String::new();
    r.read_line(&mut status_line)?;
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
    let mut len: Option<usize> = None;
    let mut served_by = String::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Err(io::Error::other(
                "the standby closed before its headers ended",
            ));
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => len = value.trim().parse().ok(),
                "x-served-by" => served_by = value.trim().to_owned(),
                _ => {}
            }
        }
    }
    let mut body = Vec::new();
    match len {
        Some(n) if n <= MAX_FORWARDED_BODY => {
            body.resize(n, 0);
            r.read_exact(&mut body)?;
        }
        Some(n) => return Err(io::Error::other(format!("answer too large ({n} bytes)"))),
        None => {
            r.take(MAX_FORWARDED_BODY as u64).read_to_end(&mut body)?;
        }
    }
    Ok(Relayed {
        status,
        served_by,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn park_waits_for_requests_in_flight_and_holds_new_ones() {
        let gate: &'static Gate = Box::leak(Box::default());
        let Pass::Local(req) = gate.enter() else {
            panic!("serving gate must pass locally")
        };
        // The park cannot finish while a request is in flight.
        assert!(
            gate.park(Duration::from_millis(50))
                .unwrap_err()
                .contains("1 requests")
        );
        drop(req);
        gate.park(Duration::from_millis(50)).unwrap();
        // A new request waits at the gate until the forward.
        let passed = Arc::new(AtomicBool::new(false));
        let p = Arc::clone(&passed);
        let t = std::thread::spawn(move || {
            let to = match gate.enter() {
                Pass::Forward(to) => Some(to),
                Pass::Local(_) => None,
            };
            p.store(true, Ordering::SeqCst);
            to
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(!passed.load(Ordering::SeqCst), "a parked request passed");
        let to: SocketAddr = "10.0.0.2:80".parse().unwrap();
        assert_eq!(
            gate.command(&format!("forward {to}")),
            format!("ok forwarding to {to}")
        );
        assert_eq!(t.join().unwrap(), Some(to));
        assert!(gate.forwarding());
        // Once forwarding, serving here again is refused.
        assert!(gate.command("resume").starts_with("error forwarding"));
        assert!(gate.command("park").starts_with("error already forwarding"));
    }

    #[test]
    fn resume_undoes_a_park() {
        let gate: &'static Gate = Box::leak(Box::default());
        assert_eq!(gate.command("park"), "ok parked");
        assert!(gate.command("state").starts_with("ok parked"));
        let t = std::thread::spawn(move || matches!(gate.enter(), Pass::Local(_)));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(gate.command("resume"), "ok serving");
        assert!(t.join().unwrap(), "the held request is served here");
    }

    #[test]
    fn bad_commands_are_named() {
        let gate = Gate::default();
        assert!(
            gate.command("forward 10.0.0.2:80")
                .starts_with("error not parked")
        );
        assert!(gate.command("forward nowhere").contains("not ADDR:PORT"));
        assert!(gate.command("dance").starts_with("error unknown command"));
    }
}
