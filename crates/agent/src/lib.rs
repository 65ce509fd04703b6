//! The agent channel: the protocol between patchover on the host and `patchover-agent` inside
//! an LC (the seed's "report completion with the table back to the patch manager", 1207).
//!
//! One JSON object per line, one request and one response per line, over a Unix socket that
//! the `ns` backend binds into the LC at [`GUEST_SOCKET_DIR`] (a virtio-serial port on QEMU).
//! The host always asks and the agent answers: a restarted patchover can ask again for a
//! report it missed, so nothing is lost when the host side crashes.
//!
//! A virtio-serial port has no connections: a response the agent wrote for a client that
//! went away is read by the next one. So on the port every line is an envelope with an id
//! ([`RequestEnvelope`], [`ResponseEnvelope`]) and the client drops responses to ids it did
//! not send ([`AgentClient::connect_virtio`]).
//!
//! This crate stays small (std, serde, and the bundle crate without signing) because the agent
//! is linked statically into every rootfs.

pub mod apply;
pub mod fuzzing;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Where the agent's socket directory is mounted inside an LC.
pub const GUEST_SOCKET_DIR: &str = "/run/patchover-agent";
/// The socket's file name in that directory (and in the host's per-LC directory).
pub const SOCKET_NAME: &str = "agent.sock";
/// The most a response line may hold.
pub const MAX_LINE: usize = 8 * 1024 * 1024;
/// The name of the agent's virtio-serial port in a QEMU LC.
pub const VIRTIO_PORT_NAME: &str = "org.patchover.agent";
/// Where the guest kernel lists its virtio-serial ports (`<port>/name`, device `/dev/<port>`).
pub const VIRTIO_PORTS_DIR: &str = "/sys/class/virtio-ports";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Is the agent up? Answers with [`Response::Pong`].
    Ping,
    /// Run a program inside the LC and return its output.
    Exec { argv: Vec<String>, timeout_ms: u64 },
    /// The latest patch execution report (seed fig. 12, 1207), if the boot script made one.
    Report,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Response {
    Pong {
        agent_version: String,
        hostname: String,
        /// Seconds since the LC's init started.
        uptime_s: f64,
        /// PIDs as the LC sees them.
        pids: Vec<u32>,
    },
    Exec {
        /// Exit status, or `None` if the program was killed by a signal or the timeout.
        status: Option<i32>,
        stdout: String,
        stderr: String,
        timed_out: bool,
    },
    Report {
        /// The report as the patch execution script wrote it, or `None` if none exists yet.
        report: Option<serde_json::Value>,
    },
    Error {
        message: String,
    },
}

/// A request on the virtio port: `{"id":N,"request":{…}}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RequestEnvelope {
    pub id: u64,
    pub request: Request,
}

/// The answer to the request with the same id: `{"id":N,"response":{…}}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResponseEnvelope {
    pub id: u64,
    pub response: Response,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot reach the agent at {path}; is the LC booted?")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("agent channel broke")]
    Io(#[source] io::Error),
    #[error("agent protocol: {0}")]
    Protocol(String),
    #[error("the agent says: {0}")]
    Remote(String),
    #[error(
        "the agent's socket {path} is {what}, not a socket: something inside the LC replaced it; patchover does not follow it (treat the LC as compromised)"
    )]
    Replaced { path: String, what: &'static str },
}

// `O_PATH` and `O_NOFOLLOW` on Linux x86_64/aarch64 (this crate stays without libc).
const O_PATH: i32 = 0o10000000;
const O_NOFOLLOW: i32 = 0o400000;

/// The host's side of the channel.
pub struct AgentClient {
    reader: BufReader<Deadlined>,
    writer: UnixStream,
    /// On a virtio port: the id of the next request.
    next_id: Option<u64>,
    /// How long a whole call may take, its response included.
    timeout: Duration,
}

/// The read half of the channel, with an overall deadline: each read waits at most what is
/// left of it, so an agent that sends a response a byte at a time cannot hold the host longer
/// than the call's timeout (a per-read timeout alone would let a slow drip last forever).
struct Deadlined {
    stream: UnixStream,
    deadline: Option<Instant>,
}

impl Read for Deadlined {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(d) = self.deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the agent's response did not arrive in time",
                ));
            }
            self.stream.set_read_timeout(Some(left))?;
        }
        // A socket read timeout shows as EAGAIN (`WouldBlock`): it is the deadline.
        self.stream.read(buf).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock => io::Error::new(
                io::ErrorKind::TimedOut,
                "the agent's response did not arrive in time",
            ),
            _ => e,
        })
    }
}

impl AgentClient {
    /// Connects to the agent's Unix socket (the ns backend).
    pub fn connect(socket: &Path, timeout: Duration) -> Result<AgentClient, AgentError> {
        AgentClient::from_stream(Self::dial(socket)?, timeout, None)
    }

    /// Connects to QEMU's end of the agent's virtio-serial port (a Unix socket chardev). The
    /// same [`AgentClient::call`] then wraps requests in envelopes with increasing ids and
    /// skips responses to other ids, which a previous client may have left behind. The first
    /// id is the time in microseconds, so a new client never expects an old client's ids.
    pub fn connect_virtio(socket: &Path, timeout: Duration) -> Result<AgentClient, AgentError> {
        let first_id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        AgentClient::from_stream(Self::dial(socket)?, timeout, Some(first_id))
    }

    /// Connects to the socket at `socket` without following a link there: in an `ns` LC the
    /// socket's directory is writable from inside, and root in the LC may put a link to a host
    /// socket in its place. The last component is opened `O_PATH|O_NOFOLLOW`, must be a socket,
    /// and is connected to through its descriptor (`/proc/self/fd/N`), so what is connected to
    /// is the inode that was checked.
    fn dial(socket: &Path) -> Result<UnixStream, AgentError> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        let fail = |source| AgentError::Connect {
            path: socket.display().to_string(),
            source,
        };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(O_PATH | O_NOFOLLOW)
            .open(socket)
            .map_err(fail)?;
        let ft = f.metadata().map_err(fail)?.file_type();
        if !ft.is_socket() {
            return Err(AgentError::Replaced {
                path: socket.display().to_string(),
                what: if ft.is_symlink() {
                    "a link"
                } else {
                    "another kind of file"
                },
            });
        }
        UnixStream::connect(format!("/proc/self/fd/{}", f.as_raw_fd())).map_err(fail)
    }

    fn from_stream(
        stream: UnixStream,
        timeout: Duration,
        next_id: Option<u64>,
    ) -> Result<AgentClient, AgentError> {
        stream
            .set_read_timeout(Some(timeout))
            .map_err(AgentError::Io)?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(AgentError::Io)?;
        let writer = stream.try_clone().map_err(AgentError::Io)?;
        Ok(AgentClient {
            reader: BufReader::new(Deadlined {
                stream,
                deadline: None,
            }),
            writer,
            next_id,
            timeout,
        })
    }

    /// How long a call may take, its whole response included.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), AgentError> {
        self.writer
            .set_write_timeout(Some(timeout))
            .map_err(AgentError::Io)?;
        self.timeout = timeout;
        Ok(())
    }

    pub fn call(&mut self, req: &Request) -> Result<Response, AgentError> {
        self.reader.get_mut().deadline = Instant::now().checked_add(self.timeout);
        let resp = match self.next_id {
            None => {
                self.send(req)?;
                let line = self.receive()?;
                serde_json::from_slice(&line).map_err(|e| AgentError::Protocol(e.to_string()))?
            }
            Some(id) => {
                self.next_id = Some(id + 1);
                self.send(&RequestEnvelope {
                    id,
                    request: req.clone(),
                })?;
                let timeout = self.timeout;
                loop {
                    let line = match self.receive() {
                        Err(AgentError::Io(e)) if e.kind() == io::ErrorKind::TimedOut => {
                            return Err(AgentError::Protocol(format!(
                                "no response to request {id} within {timeout:?}, only others"
                            )));
                        }
                        r => r?,
                    };
                    // Anything else is a leftover of an earlier client (or its cut-off line).
                    if let Ok(env) = serde_json::from_slice::<ResponseEnvelope>(&line)
                        && env.id == id
                    {
                        break env.response;
                    }
                }
            }
        };
        if let Response::Error { message } = resp {
            return Err(AgentError::Remote(message));
        }
        Ok(resp)
    }

    fn send(&mut self, msg: &impl Serialize) -> Result<(), AgentError> {
        let mut line = serde_json::to_vec(msg).map_err(|e| AgentError::Protocol(e.to_string()))?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(AgentError::Io)
    }

    fn receive(&mut self) -> Result<Vec<u8>, AgentError> {
        read_line(&mut self.reader)?
            .ok_or_else(|| AgentError::Protocol("the agent closed the channel".into()))
    }
}

/// The device of the agent's virtio-serial port: `/dev/<port>` for the entry of `ports_dir`
/// (normally [`VIRTIO_PORTS_DIR`]) whose `name` is [`VIRTIO_PORT_NAME`].
pub fn find_virtio_port(ports_dir: &Path) -> Option<PathBuf> {
    let mut ports: Vec<_> = std::fs::read_dir(ports_dir)
        .ok()?
        .filter_map(|e| e.ok())
        .collect();
    ports.sort_by_key(|e| e.file_name());
    ports.into_iter().find_map(|e| {
        let name = std::fs::read_to_string(e.path().join("name")).ok()?;
        (name.trim() == VIRTIO_PORT_NAME).then(|| Path::new("/dev").join(e.file_name()))
    })
}

/// The agent's loop on a virtio port: reads envelopes from `input`, answers each with
/// `answer` and writes the response envelope to `output`. A read of 0 bytes means no host is
/// connected: what was read of a line is dropped (its sender is gone), and the loop sleeps
/// `idle` and reads again. Returns only when reading or writing fails.
pub fn serve_envelopes(
    mut input: impl Read,
    mut output: impl Write,
    mut answer: impl FnMut(Request) -> Response,
    idle: Duration,
) -> io::Error {
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut overlong = false;
    loop {
        let n = match input.read(&mut chunk) {
            Ok(0) => {
                pending.clear();
                overlong = false;
                std::thread::sleep(idle);
                continue;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return e,
        };
        pending.extend_from_slice(&chunk[..n]);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if std::mem::take(&mut overlong) {
                continue;
            }
            let reply = answer_envelope(&line[..line.len() - 1], &mut answer);
            let mut out = serde_json::to_vec(&reply).unwrap_or_else(|_| b"{}".to_vec());
            out.push(b'\n');
            if let Err(e) = output.write_all(&out).and_then(|()| output.flush()) {
                return e;
            }
        }
        if pending.len() > MAX_LINE {
            pending.clear();
            overlong = true;
        }
    }
}

fn answer_envelope(line: &[u8], answer: &mut impl FnMut(Request) -> Response) -> ResponseEnvelope {
    match serde_json::from_slice::<RequestEnvelope>(line) {
        Ok(env) => ResponseEnvelope {
            id: env.id,
            response: answer(env.request),
        },
        Err(e) => ResponseEnvelope {
            // Answer to the id if the line has one, so that its client fails fast.
            id: serde_json::from_slice::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("id")?.as_u64())
                .unwrap_or(0),
            response: Response::Error {
                message: format!("bad request envelope: {e}"),
            },
        },
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes; `None` at end of stream.
pub fn read_line(r: &mut impl BufRead) -> Result<Option<Vec<u8>>, AgentError> {
    let mut buf = Vec::new();
    let n = r
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut buf)
        .map_err(AgentError::Io)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(AgentError::Protocol(format!(
            "line longer than {MAX_LINE} bytes or cut short"
        )));
    }
    buf.pop();
    Ok(Some(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_reject_unknown_fields() {
        let r = Request::Exec {
            argv: vec!["ls".into()],
            timeout_ms: 5,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(s, r#"{"op":"exec","argv":["ls"],"timeout_ms":5}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        assert!(
            serde_json::from_str::<Request>(r#"{"op":"exec","argv":[],"timeout_ms":1,"x":1}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"format_disk"}"#).is_err());
    }

    #[test]
    fn read_line_limits() {
        let mut ok = io::Cursor::new(b"abc\nrest".to_vec());
        assert_eq!(read_line(&mut ok).unwrap().unwrap(), b"abc");
        assert!(
            read_line(&mut ok).is_err(),
            "a line without newline is cut short"
        );
        let mut empty = io::Cursor::new(Vec::new());
        assert!(read_line(&mut empty).unwrap().is_none());
    }

    fn pong(host: &str) -> Response {
        Response::Pong {
            agent_version: "t".into(),
            hostname: host.into(),
            uptime_s: 1.0,
            pids: vec![1],
        }
    }

    /// A fake agent on the other end of a socketpair: before each right answer it sends what a
    /// previous client could have left behind (an answer to another id, a cut-off line).
    #[test]
    fn virtio_client_skips_responses_to_other_ids() {
        let (host, guest) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || {
            let mut w = guest.try_clone().unwrap();
            let mut r = BufReader::new(guest);
            let mut ids = Vec::new();
            while let Some(line) = read_line(&mut r).unwrap() {
                let env: RequestEnvelope = serde_json::from_slice(&line).unwrap();
                assert_eq!(env.request, Request::Ping);
                ids.push(env.id);
                let stale = ResponseEnvelope {
                    id: env.id.wrapping_sub(7),
                    response: pong("stale"),
                };
                let right = ResponseEnvelope {
                    id: env.id,
                    response: pong("right"),
                };
                let mut out = serde_json::to_vec(&stale).unwrap();
                out.extend_from_slice(b"\n{\"id\":12,\"respo\n");
                out.extend_from_slice(&serde_json::to_vec(&right).unwrap());
                out.push(b'\n');
                w.write_all(&out).unwrap();
            }
            ids
        });
        let mut c = AgentClient::from_stream(host, Duration::from_secs(5), Some(100)).unwrap();
        for _ in 0..2 {
            match c.call(&Request::Ping).unwrap() {
                Response::Pong { hostname, .. } => assert_eq!(hostname, "right"),
                other => panic!("{other:?}"),
            }
        }
        drop(c);
        assert_eq!(peer.join().unwrap(), [100, 101], "ids increase per request");
    }

    #[test]
    fn virtio_client_gives_up_when_only_other_ids_arrive() {
        let (host, guest) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || {
            let mut w = &guest;
            // Answers that are never the awaited one, faster than the timeout.
            for _ in 0..40 {
                let env = ResponseEnvelope {
                    id: 1,
                    response: pong("old"),
                };
                let mut out = serde_json::to_vec(&env).unwrap();
                out.push(b'\n');
                if w.write_all(&out).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let mut c = AgentClient::from_stream(host, Duration::from_millis(200), Some(50)).unwrap();
        let err = c.call(&Request::Ping).unwrap_err();
        assert!(
            err.to_string().contains("no response to request 50"),
            "{err}"
        );
        drop(c);
        peer.join().unwrap();
    }

    #[test]
    fn a_response_dripped_slowly_is_cut_at_the_calls_deadline() {
        let (host, guest) = UnixStream::pair().unwrap();
        let peer = std::thread::spawn(move || {
            let mut w = &guest;
            // One byte every 20 ms: each read is well within the timeout, the whole is not.
            for _ in 0..200 {
                if w.write_all(b" ").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let mut c = AgentClient::from_stream(host, Duration::from_millis(300), None).unwrap();
        let t = Instant::now();
        let err = c.call(&Request::Ping).unwrap_err();
        let took = t.elapsed();
        assert!(took < Duration::from_millis(1500), "held {took:?}: {err}");
        assert!(
            matches!(&err, AgentError::Io(e) if e.kind() == io::ErrorKind::TimedOut),
            "{err}"
        );
        drop(c);
        peer.join().unwrap();
    }

    #[test]
    fn the_socket_is_not_followed_when_the_lc_replaced_it_with_a_link() {
        let dir = tempfile::tempdir().unwrap();
        // A "host" socket elsewhere, and the agent's socket path made a link to it.
        let host_sock = dir.path().join("host.sock");
        let listener = std::os::unix::net::UnixListener::bind(&host_sock).unwrap();
        let agent = dir.path().join("agent.sock");
        std::os::unix::fs::symlink(&host_sock, &agent).unwrap();
        let err = AgentClient::connect(&agent, Duration::from_secs(1))
            .err()
            .unwrap();
        assert!(
            matches!(err, AgentError::Replaced { what: "a link", .. }),
            "{err}"
        );
        listener.set_nonblocking(true).unwrap();
        assert!(
            listener.accept().is_err(),
            "nothing connected to the host socket"
        );
        // A plain file is refused too; the real socket is connected to through its descriptor.
        std::fs::remove_file(&agent).unwrap();
        std::fs::write(&agent, "x").unwrap();
        assert!(AgentClient::connect(&agent, Duration::from_secs(1)).is_err());
        assert!(AgentClient::connect(&host_sock, Duration::from_secs(1)).is_ok());
        assert!(listener.accept().is_ok());
    }

    /// Reads a script of chunks; `None` is a read of 0 bytes (no host connected); the end of
    /// the script is an error, which ends the loop.
    struct Script(Vec<Option<&'static [u8]>>);

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() {
                return Err(io::Error::other("end of script"));
            }
            match self.0.remove(0) {
                None => Ok(0),
                Some(b) => {
                    buf[..b.len()].copy_from_slice(b);
                    Ok(b.len())
                }
            }
        }
    }

    #[test]
    fn serve_envelopes_answers_by_id_and_survives_disconnects() {
        let input = Script(vec![
            None,
            Some(br#"{"id":7,"requ"#),
            // The host went away mid-line: that part is dropped.
            None,
            Some(b"{\"id\":8,\"request\":{\"op\":\"ping\"}}\n{\"id\":9,\"request\":"),
            Some(b"{\"op\":\"report\"}}\n{\"id\":10,\"request\":{\"op\":\"nope\"}}\ngarbage\n"),
        ]);
        let mut out = Vec::new();
        let mut seen = Vec::new();
        let err = serve_envelopes(
            input,
            &mut out,
            |req| {
                seen.push(req.clone());
                match req {
                    Request::Ping => pong("lc"),
                    _ => Response::Report { report: None },
                }
            },
            Duration::from_millis(1),
        );
        assert_eq!(err.to_string(), "end of script");
        assert_eq!(seen, [Request::Ping, Request::Report]);
        let replies: Vec<ResponseEnvelope> = out
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        let ids: Vec<u64> = replies.iter().map(|r| r.id).collect();
        assert_eq!(ids, [8, 9, 10, 0]);
        assert_eq!(replies[0].response, pong("lc"));
        assert_eq!(replies[1].response, Response::Report { report: None });
        assert!(matches!(replies[2].response, Response::Error { .. }));
        assert!(matches!(replies[3].response, Response::Error { .. }));
    }

    #[test]
    fn find_virtio_port_matches_the_name() {
        let dir = std::env::temp_dir().join(format!("po-agent-ports-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (port, name) in [
            ("vport1p1", "org.qemu.guest_agent.0"),
            ("vport2p1", VIRTIO_PORT_NAME),
        ] {
            std::fs::create_dir_all(dir.join(port)).unwrap();
            std::fs::write(dir.join(port).join("name"), format!("{name}\n")).unwrap();
        }
        std::fs::create_dir_all(dir.join("vport3p1")).unwrap(); // a port without a name
        assert_eq!(find_virtio_port(&dir), Some(PathBuf::from("/dev/vport2p1")));
        std::fs::remove_dir_all(dir.join("vport2p1")).unwrap();
        assert_eq!(find_virtio_port(&dir), None);
        assert_eq!(find_virtio_port(&dir.join("missing")), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
