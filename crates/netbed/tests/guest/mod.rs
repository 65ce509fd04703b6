//! A stand-in for a VM's agent channel, so the switcher's agent path runs in these tests.
//!
//! What is real: the host side (`AgentChannel`, `AgentClient::connect_virtio`), the envelope
//! protocol (`patchover_agent::serve_envelopes`, the guest agent's own loop), the busybox
//! programs and the kernel they act on (the LC's namespace). What stands in: QEMU's chardev
//! (a Unix socket that serves one connection at a time, like QEMU's) and the guest kernel
//! (busybox runs in the LC's network namespace instead).

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use patchover_agent::{Request, Response};

/// One fake guest: its agent socket and the thread that serves it.
pub struct Guest {
    pub socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A connection that reports the host hanging up as an error, so `serve_envelopes` (made for
/// a virtio port, where a read of 0 means "nobody there yet") returns and the next host
/// connection is served, as QEMU's chardev does.
struct EofIsError(UnixStream);

impl Read for EofIsError {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.0.read(buf)? {
            0 => Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => Ok(n),
        }
    }
}

impl Guest {
    /// Serves an agent channel at `socket` whose programs run as busybox applets in `netns`.
    pub fn start(socket: &Path, netns: &Path) -> Guest {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).expect("bind the agent socket");
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, netns) = (stop.clone(), netns.to_path_buf());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let Ok(out) = conn.try_clone() else { continue };
                let ns = netns.clone();
                patchover_agent::serve_envelopes(
                    EofIsError(conn),
                    out,
                    |req| answer(&ns, req),
                    Duration::from_millis(20),
                );
            }
        });
        Guest {
            socket: socket.to_path_buf(),
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.socket);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn answer(netns: &Path, req: Request) -> Response {
    match req {
        Request::Ping => Response::Pong {
            agent_version: "test".into(),
            hostname: "guest".into(),
            uptime_s: 0.0,
            pids: Vec::new(),
        },
        Request::Exec { argv, timeout_ms } => exec(netns, &argv, Duration::from_millis(timeout_ms)),
        Request::Report => Response::Report { report: None },
    }
}

/// Runs `busybox ARGV…` in `netns`, killed at `timeout` (as the agent does).
fn exec(netns: &Path, argv: &[String], timeout: Duration) -> Response {
    let mut cmd = patchover_net::netns::command_in(Some(netns), "busybox").expect("netns");
    cmd.args(argv)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Response::Error {
                message: format!("cannot run busybox: {e}"),
            };
        }
    };
    let grab = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = grab(
        child
            .stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let err = grab(
        child
            .stderr
            .take()
            .map(|r| Box::new(r) as Box<dyn Read + Send>),
    );
    let start = Instant::now();
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s.code(),
            Ok(None) if start.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                timed_out = true;
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(1)),
            Err(_) => break None,
        }
    };
    Response::Exec {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        timed_out,
    }
}
