//! The agent channel: the protocol between patchover on the host and `patchover-agent` inside
//! an LC (the seed's "report completion with the table back to the patch manager", 1207).
//!
//! One JSON object per line, one request and one response per line, over a Unix socket that
//! the `ns` backend binds into the LC at [`GUEST_SOCKET_DIR`] (a virtio-serial port on QEMU).
//! The host always asks and the agent answers: a restarted patchover can ask again for a
//! report it missed, so nothing is lost when the host side crashes.
//!
//! This crate stays small (std, serde, and the bundle crate without signing) because the agent
//! is linked statically into every rootfs.

pub mod apply;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the agent's socket directory is mounted inside an LC.
pub const GUEST_SOCKET_DIR: &str = "/run/patchover-agent";
/// The socket's file name in that directory (and in the host's per-LC directory).
pub const SOCKET_NAME: &str = "agent.sock";
/// The most a response line may hold.
pub const MAX_LINE: usize = 8 * 1024 * 1024;

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
}

/// The host's side of the channel.
pub struct AgentClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl AgentClient {
    pub fn connect(socket: &Path, timeout: Duration) -> Result<AgentClient, AgentError> {
        let stream = UnixStream::connect(socket).map_err(|source| AgentError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(AgentError::Io)?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(AgentError::Io)?;
        let writer = stream.try_clone().map_err(AgentError::Io)?;
        Ok(AgentClient {
            reader: BufReader::new(stream),
            writer,
        })
    }

    pub fn set_timeout(&self, timeout: Duration) -> Result<(), AgentError> {
        self.writer
            .set_read_timeout(Some(timeout))
            .map_err(AgentError::Io)
    }

    pub fn call(&mut self, req: &Request) -> Result<Response, AgentError> {
        let mut line = serde_json::to_vec(req).map_err(|e| AgentError::Protocol(e.to_string()))?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(AgentError::Io)?;
        let resp = read_line(&mut self.reader)?
            .ok_or_else(|| AgentError::Protocol("the agent closed the channel".into()))?;
        let resp: Response =
            serde_json::from_slice(&resp).map_err(|e| AgentError::Protocol(e.to_string()))?;
        if let Response::Error { message } = resp {
            return Err(AgentError::Remote(message));
        }
        Ok(resp)
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
}
