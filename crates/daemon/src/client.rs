//! A small blocking client of the daemon's Unix socket, for the CLI: `patchover patch` and
//! `patchover rollback` hand their run to a running daemon, `patchover runs watch` follows
//! the event stream. HTTP/1.1 with `Connection: close`, chunked bodies decoded, no other
//! dependency, because the CLI must stay a synchronous program.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::api::{ApiError, ErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the daemon on {path}; is `patchover serve` running? (use --direct to work without it)"
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the daemon")]
    Io(#[source] std::io::Error),
    #[error("the daemon's answer is not HTTP/JSON: {0}")]
    Protocol(String),
    #[error("the daemon refused: {}", .0.message)]
    Api(ApiError),
}

pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Client {
        Client {
            socket: socket.to_owned(),
        }
    }

    /// Whether a daemon answers on `socket` (a stale socket file does not count).
    pub fn available(socket: &Path) -> bool {
        UnixStream::connect(socket).is_ok()
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<BufReader<UnixStream>, ClientError> {
        let mut s = UnixStream::connect(&self.socket).map_err(|source| ClientError::Connect {
            path: self.socket.clone(),
            source,
        })?;
        let body = body.map(|b| b.to_string());
        let mut head =
            format!("{method} {path} HTTP/1.1\r\nHost: patchover\r\nConnection: close\r\n");
        if let Some(b) = &body {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        head.push_str("\r\n");
        if let Some(b) = &body {
            head.push_str(b);
        }
        s.write_all(head.as_bytes()).map_err(ClientError::Io)?;
        Ok(BufReader::new(s))
    }

    /// The status line and headers; leaves the reader at the body.
    fn head(r: &mut BufReader<UnixStream>) -> Result<(u16, bool), ClientError> {
        let mut line = String::new();
        r.read_line(&mut line).map_err(ClientError::Io)?;
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ClientError::Protocol(line.trim().chars().take(80).collect()))?;
        let mut chunked = false;
        loop {
            line.clear();
            if r.read_line(&mut line).map_err(ClientError::Io)? == 0 {
                return Err(ClientError::Protocol("the answer ended in its head".into()));
            }
            if line == "\r\n" {
                return Ok((status, chunked));
            }
            let l = line.to_ascii_lowercase();
            if l.starts_with("transfer-encoding:") && l.contains("chunked") {
                chunked = true;
            }
        }
    }

    /// One request; the JSON answer, or the API's error.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, ClientError> {
        let mut r = self.send(method, path, body)?;
        let (status, chunked) = Self::head(&mut r)?;
        let mut raw = Vec::new();
        if chunked {
            let mut c = Chunked::new(r);
            c.read_to_end(&mut raw).map_err(ClientError::Io)?;
        } else {
            r.read_to_end(&mut raw).map_err(ClientError::Io)?;
        }
        let v: serde_json::Value = serde_json::from_slice(&raw)
            .map_err(|e| ClientError::Protocol(format!("{status}: {e}")))?;
        if status >= 400 {
            let code = serde_json::from_value::<ErrorCode>(v["code"].clone())
                .unwrap_or(ErrorCode::Internal);
            let message = v["message"].as_str().unwrap_or("").to_owned();
            return Err(ClientError::Api(ApiError::new(code, message)));
        }
        Ok(v)
    }

    /// Follows `/v1/events`: `on_open` once subscribed (return false to stop: what it
    /// waited for already happened), then `f(kind, data)` for each event until it returns
    /// false or the daemon ends the stream.
    pub fn events(
        &self,
        on_open: impl FnOnce() -> Result<bool, ClientError>,
        mut f: impl FnMut(&str, &serde_json::Value) -> bool,
    ) -> Result<(), ClientError> {
        let mut r = self.send("GET", "/v1/events", None)?;
        let (status, chunked) = Self::head(&mut r)?;
        if status != 200 {
            return Err(ClientError::Protocol(format!(
                "event stream: status {status}"
            )));
        }
        if !on_open()? {
            return Ok(());
        }
        let reader: Box<dyn BufRead> = if chunked {
            Box::new(BufReader::new(Chunked::new(r)))
        } else {
            Box::new(r)
        };
        let mut kind = String::new();
        for line in reader.lines() {
            let line = line.map_err(ClientError::Io)?;
            if let Some(k) = line.strip_prefix("event:") {
                kind = k.trim().to_owned();
            } else if let Some(d) = line.strip_prefix("data:") {
                let v = serde_json::from_str(d.trim()).unwrap_or(serde_json::Value::Null);
                if !f(&kind, &v) {
                    return Ok(());
                }
            } else if line.is_empty() {
                kind.clear();
            }
        }
        Ok(())
    }
}

/// Decodes `Transfer-Encoding: chunked`.
struct Chunked<R> {
    inner: R,
    left: usize,
    done: bool,
}

impl<R: BufRead> Chunked<R> {
    fn new(inner: R) -> Chunked<R> {
        Chunked {
            inner,
            left: 0,
            done: false,
        }
    }
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            if self.inner.read_line(&mut line)? == 0 {
                self.done = true;
                return Ok(0);
            }
            if line.trim().is_empty() {
                // The CRLF after the previous chunk.
                line.clear();
                if self.inner.read_line(&mut line)? == 0 {
                    self.done = true;
                    return Ok(0);
                }
            }
            let size = line.trim().split(';').next().unwrap_or("");
            self.left = usize::from_str_radix(size, 16).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, "bad chunk size")
            })?;
            if self.left == 0 {
                self.done = true;
                return Ok(0);
            }
        }
        let n = buf.len().min(self.left);
        let n = self.inner.read(&mut buf[..n])?;
        if n == 0 {
            self.done = true;
        }
        self.left -= n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_decode() {
        let raw = b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n";
        let mut out = String::new();
        Chunked::new(&raw[..]).read_to_string(&mut out).unwrap();
        assert_eq!(out, "hello, world");
        let bad = b"zz\r\nhello\r\n";
        assert!(
            Chunked::new(&bad[..])
                .read_to_string(&mut String::new())
                .is_err()
        );
    }
}
