//! The drain contract of the demo service (docs/network-switch.md, "What the service must do"):
//! while draining it answers with `Connection: close` and closes connections that are idle
//! *between* requests, but a connection that has not sent its first request yet is not idle —
//! its client is about to send one, and unlike a request on a reused connection, nothing
//! entitles that client to send it again.
//!
//! Regression tests for issue 15 (item 1): under the suite's load a crash test's client
//! connected just before a readdress switch's drain and was preempted for more than 10 ms
//! before writing its `PUT`; the draining service closed the fresh connection and the client
//! read an empty response.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A demo service on a free loopback port, killed on drop.
struct Demo {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Demo {
    fn start() -> Demo {
        let dir = tempfile::tempdir().unwrap();
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_patchover-demo"))
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data")
            .arg(dir.path().join("data"))
            .arg("--version-file")
            .arg(dir.path().join("version"))
            .arg("--control")
            .arg(dir.path().join("control.sock"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let demo = Demo {
            child,
            addr,
            _dir: dir,
        };
        // Its signal handlers are installed before it serves the first request; a signal
        // before that would end it.
        let start = Instant::now();
        while request(&demo.connect(), "GET /health", true).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the demo never served"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        demo
    }

    fn connect(&self) -> TcpStream {
        let s = loop {
            match TcpStream::connect(self.addr) {
                Ok(s) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("connect: {e}"),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.set_nodelay(true).unwrap();
        s
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as libc::pid_t, sig) },
            0
        );
        // Handled on whichever thread the kernel picks, at once; give it that moment.
        std::thread::sleep(Duration::from_millis(20));
    }

    fn drain(&self) {
        self.signal(libc::SIGUSR1);
    }

    fn resume(&self) {
        self.signal(libc::SIGUSR2);
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `line` (`"PUT /kv/k"`, a body `v` for PUT) on `s` and reads one response; returns its
/// head. An empty response (the server closed without answering) is an error.
fn request(mut s: &TcpStream, line: &str, keep_alive: bool) -> std::io::Result<String> {
    let body = if line.starts_with("PUT") { "v" } else { "" };
    s.write_all(
        format!(
            "{line} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\nConnection: {}\r\n\r\n{body}",
            body.len(),
            if keep_alive { "keep-alive" } else { "close" }
        )
        .as_bytes(),
    )?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "closed after {} bytes: {:?}",
                    got.len(),
                    String::from_utf8_lossy(&got)
                ),
            ));
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = &text[..end];
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return Ok(head.to_owned());
            }
        }
    }
}

fn closed_by_server(mut s: &TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0))
}

/// The bug of issue 15: connected, drained, the client's request comes late (it was not
/// scheduled): it must be answered, with `Connection: close`.
#[test]
fn r15_a_draining_service_answers_a_fresh_connection_whose_request_comes_late() {
    let demo = Demo::start();
    // Connected before the drain (the server's thread is already waiting for the request) and
    // after it (the drain flag is up when the thread starts), for PUT and GET, with and
    // without keep-alive.
    let before: Vec<TcpStream> = (0..4).map(|_| demo.connect()).collect();
    std::thread::sleep(Duration::from_millis(30));
    demo.drain();
    let after: Vec<TcpStream> = (0..4).map(|_| demo.connect()).collect();
    // Far longer than the service's drain poll: the clients were preempted.
    std::thread::sleep(Duration::from_millis(150));
    for (i, s) in before.iter().chain(&after).enumerate() {
        let line = if i % 2 == 0 {
            format!("PUT /kv/late{i}")
        } else {
            "GET /version".to_owned()
        };
        let head =
            request(s, &line, i % 4 < 2).unwrap_or_else(|e| panic!("connection {i} ({line}): {e}"));
        assert!(
            head.starts_with("HTTP/1.1 20"),
            "connection {i} ({line}): {head}"
        );
        assert!(
            head.to_ascii_lowercase().contains("connection: close"),
            "connection {i}: a draining service keeps connections alive: {head}"
        );
        assert!(
            closed_by_server(s, Duration::from_secs(2)),
            "connection {i} stays open"
        );
    }
}

/// What the drain is for: connections idle between requests are closed, soon.
#[test]
fn a_draining_service_closes_idle_kept_alive_connections_and_resume_keeps_them_again() {
    let demo = Demo::start();
    let conns: Vec<TcpStream> = (0..3).map(|_| demo.connect()).collect();
    for s in &conns {
        let head = request(s, "PUT /kv/k", true).unwrap();
        assert!(
            head.to_ascii_lowercase().contains("connection: keep-alive"),
            "{head}"
        );
    }
    let t = Instant::now();
    demo.drain();
    for s in &conns {
        assert!(
            closed_by_server(s, Duration::from_secs(2)),
            "an idle kept-alive connection stays open while draining"
        );
    }
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    demo.resume();
    let s = demo.connect();
    for _ in 0..2 {
        let head = request(&s, "GET /version", true).unwrap();
        assert!(
            head.to_ascii_lowercase().contains("connection: keep-alive"),
            "{head}"
        );
    }
}

/// A connection that stays silent does not hold a drain (and with it the switch's pause) for
/// long: it is closed about a second after it was opened.
#[test]
fn a_draining_service_closes_a_silent_new_connection_after_its_grace() {
    let demo = Demo::start();
    demo.drain();
    let t = Instant::now();
    let s = demo.connect();
    assert!(
        closed_by_server(&s, Duration::from_secs(5)),
        "a silent connection stays open while draining"
    );
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
}
