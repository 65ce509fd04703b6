//! The smallest HTTP/1.1 client that can tell every way a request can fail.
//!
//! General-purpose clients hide what the load generator must see: they retry silently, pool
//! connections their own way, and fold resets, refusals and timeouts into one error. This one
//! writes one GET, reads one response (`Content-Length`, or to EOF), and reports what happened
//! as an [`Outcome`]-ready error.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One parsed response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// The server will close the connection (`Connection: close` or HTTP/1.0).
    pub close: bool,
}

/// A request that did not produce a response.
#[derive(Debug)]
pub struct FetchError {
    pub error: io::Error,
    /// Whether any byte of a response arrived (a request that got nothing back on a reused
    /// connection may be retried: RFC 9112 §9.3.1).
    pub got_bytes: bool,
}

impl FetchError {
    fn new(error: io::Error, got_bytes: bool) -> FetchError {
        FetchError { error, got_bytes }
    }
}

/// Builds the request text.
pub fn request(host: &str, path: &str, keepalive: bool) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: patchover-load\r\n{}\r\n",
        if keepalive {
            ""
        } else {
            "Connection: close\r\n"
        }
    )
    .into_bytes()
}

/// The head of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub content_length: Option<usize>,
    pub close: bool,
    /// Bytes of the head including the blank line.
    pub len: usize,
}

/// Parses the head of a response; `None` while it is incomplete.
pub fn parse_head(buf: &[u8]) -> Option<Result<Head, String>> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = match std::str::from_utf8(&buf[..end]) {
        Ok(h) => h,
        Err(_) => return Some(Err("response head is not UTF-8".into())),
    };
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap_or("");
    let Some(status) = parts.next().and_then(|s| s.parse::<u16>().ok()) else {
        return Some(Err(format!("bad status line {status_line:?}")));
    };
    let mut len = None;
    let mut close = version == "HTTP/1.0";
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            match v.parse() {
                Ok(n) => len = Some(n),
                Err(_) => return Some(Err(format!("bad Content-Length {v:?}"))),
            }
        } else if k.eq_ignore_ascii_case("connection") {
            close = v.eq_ignore_ascii_case("close");
        } else if k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked") {
            return Some(Err("chunked responses are not supported".into()));
        }
    }
    Some(Ok(Head {
        status,
        content_length: len,
        close,
        len: end,
    }))
}

/// Sends `req` on `s` and reads one response.
pub async fn fetch(s: &mut TcpStream, req: &[u8]) -> Result<Response, FetchError> {
    s.write_all(req)
        .await
        .map_err(|e| FetchError::new(e, false))?;
    let mut buf = Vec::with_capacity(512);
    let mut tmp = [0u8; 4096];
    loop {
        if let Some(parsed) = parse_head(&buf) {
            let Head {
                status,
                content_length: len,
                close,
                len: head,
            } = parsed.map_err(|m| {
                FetchError::new(io::Error::new(io::ErrorKind::InvalidData, m), true)
            })?;
            let mut body = buf[head..].to_vec();
            match len {
                Some(n) => {
                    while body.len() < n {
                        let r = s
                            .read(&mut tmp)
                            .await
                            .map_err(|e| FetchError::new(e, true))?;
                        if r == 0 {
                            return Err(FetchError::new(io::ErrorKind::UnexpectedEof.into(), true));
                        }
                        body.extend_from_slice(&tmp[..r]);
                    }
                    body.truncate(n);
                }
                None => loop {
                    let r = s
                        .read(&mut tmp)
                        .await
                        .map_err(|e| FetchError::new(e, true))?;
                    if r == 0 {
                        break;
                    }
                    body.extend_from_slice(&tmp[..r]);
                },
            }
            return Ok(Response {
                status,
                body,
                close: close || len.is_none(),
            });
        }
        let r = s
            .read(&mut tmp)
            .await
            .map_err(|e| FetchError::new(e, !buf.is_empty()))?;
        if r == 0 {
            return Err(FetchError::new(
                io::ErrorKind::UnexpectedEof.into(),
                !buf.is_empty(),
            ));
        }
        buf.extend_from_slice(&tmp[..r]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_length_and_close() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello";
        let h = parse_head(r).unwrap().unwrap();
        assert_eq!((h.status, h.content_length, h.close), (200, Some(5), true));
        assert_eq!(&r[h.len..], b"hello");
    }

    #[test]
    fn incomplete_head_is_none_and_garbage_is_an_error() {
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le").is_none());
        assert!(parse_head(b"SSH-2.0-x\r\n\r\n").unwrap().is_err());
        assert!(
            parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                .unwrap()
                .is_err()
        );
    }

    #[test]
    fn http10_closes() {
        let h = parse_head(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.close);
    }
}
