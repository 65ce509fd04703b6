//! The PostgreSQL wire protocol (v3), the small part a simple-query client needs: startup,
//! trust/cleartext/md5 authentication, `Query`, and the rows and errors that come back. It is
//! what PgBouncer's admin console speaks (and PostgreSQL itself, for the demo's set check).
//!
//! Every message the server sends is length-checked before it is read (at most
//! [`MAX_MESSAGE`]), so a wrong peer cannot make the client allocate without bound.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use ct_codecs::Encoder;
use md5::{Digest, Md5};

/// The largest message accepted from the server.
pub const MAX_MESSAGE: usize = 16 << 20;

/// A wire-protocol conversation failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("cannot connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr}: {what}")]
    Io {
        addr: SocketAddr,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} does not speak the PostgreSQL protocol as expected: {message}")]
    Protocol { addr: SocketAddr, message: String },
    #[error("{addr} refused the login of {user:?}: {message}")]
    Auth {
        addr: SocketAddr,
        user: String,
        message: String,
    },
    #[error("{addr} answered {sql:?} with an error: {message} (SQLSTATE {code})")]
    Server {
        addr: SocketAddr,
        sql: String,
        code: String,
        message: String,
    },
}

impl WireError {
    /// The server's own message, for an error it sent.
    pub fn server_message(&self) -> Option<&str> {
        match self {
            WireError::Server { message, .. } => Some(message),
            _ => None,
        }
    }

    /// The wait for an answer ran out (the read timeout).
    pub fn timed_out(&self) -> bool {
        matches!(self, WireError::Io { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
    }
}

/// The answer to one simple query: the last result's columns, rows and command tag.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rows {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
    pub tag: String,
}

impl Rows {
    /// The value of `column` in each row.
    pub fn column(&self, column: &str) -> Option<Vec<Option<&str>>> {
        let i = self.columns.iter().position(|c| c == column)?;
        Some(
            self.rows
                .iter()
                .map(|r| r.get(i).and_then(|v| v.as_deref()))
                .collect(),
        )
    }
}

/// Who logs in where.
#[derive(Debug, Clone)]
pub struct Login<'a> {
    pub addr: SocketAddr,
    pub user: &'a str,
    pub database: &'a str,
    pub password: Option<&'a str>,
    /// For the connect and each read and write of the login.
    pub timeout: Duration,
}

/// One logged-in connection.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    addr: SocketAddr,
}

impl Conn {
    /// Connects and logs in.
    pub fn connect(login: &Login<'_>) -> Result<Conn, WireError> {
        let addr = login.addr;
        let stream = TcpStream::connect_timeout(&addr, login.timeout)
            .map_err(|source| WireError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        let mut c = Conn { stream, addr };
        c.set_timeout(login.timeout)?;
        c.send(None, &startup(login.user, login.database))?;
        c.authenticate(login)?;
        c.until_ready(None)?;
        Ok(c)
    }

    /// How long a read or write may wait from now on.
    pub fn set_timeout(&mut self, t: Duration) -> Result<(), WireError> {
        let io = |source| WireError::Io {
            addr: self.addr,
            what: "setting the socket's timeout",
            source,
        };
        self.stream.set_read_timeout(Some(t)).map_err(io)?;
        self.stream.set_write_timeout(Some(t)).map_err(io)
    }

    /// Runs one simple query and reads its answer to the end.
    pub fn query(&mut self, sql: &str) -> Result<Rows, WireError> {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        self.send(Some(b'Q'), &body)?;
        self.until_ready(Some(sql))
    }

    fn authenticate(&mut self, login: &Login<'_>) -> Result<(), WireError> {
        loop {
            let (tag, body) = self.recv()?;
            match tag {
                b'R' => {
                    let code = be32(&body, 0).ok_or_else(|| self.bad("a short auth request"))?;
                    match code {
                        0 => return Ok(()),
                        3 => {
                            let pw = self.password(login)?;
                            self.send(Some(b'p'), &cstr(pw))?;
                        }
                        5 => {
                            let salt = body.get(4..8).ok_or_else(|| self.bad("no md5 salt"))?;
                            let pw = self.password(login)?;
                            self.send(Some(b'p'), &cstr(&md5_password(login.user, pw, salt)))?;
                        }
                        other => return Err(self.auth(login, &format!(
                            "it asks for authentication method {other} (10 is SCRAM); patchover logs in with trust, cleartext or md5"
                        ))),
                    }
                }
                b'E' => return Err(self.auth(login, &error_fields(&body).1)),
                b'N' => {}
                t => return Err(self.bad(&format!("message {:?} during login", t as char))),
            }
        }
    }

    fn password<'p>(&self, login: &Login<'p>) -> Result<&'p str, WireError> {
        login.password.ok_or_else(|| {
            self.auth(
                login,
                "it asks for a password and none is configured (set password)",
            )
        })
    }

    /// Reads until ReadyForQuery; an error message is returned after it.
    fn until_ready(&mut self, sql: Option<&str>) -> Result<Rows, WireError> {
        let mut rows = Rows::default();
        let mut error = None;
        loop {
            let (tag, body) = self.recv()?;
            match tag {
                b'Z' => break,
                b'T' => {
                    rows.columns =
                        row_description(&body).ok_or_else(|| self.bad("a bad row description"))?;
                    rows.rows.clear();
                }
                b'D' => rows
                    .rows
                    .push(data_row(&body).ok_or_else(|| self.bad("a bad data row"))?),
                b'C' => {
                    rows.tag = String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(&body))
                        .into_owned()
                }
                b'E' => error = Some(error_fields(&body)),
                // Parameter status, backend key, notice, empty query: nothing to keep.
                b'S' | b'K' | b'N' | b'I' => {}
                t => return Err(self.bad(&format!("unexpected message {:?}", t as char))),
            }
        }
        match error {
            Some((code, message)) => Err(WireError::Server {
                addr: self.addr,
                sql: sql.unwrap_or("(login)").to_owned(),
                code,
                message,
            }),
            None => Ok(rows),
        }
    }

    fn send(&mut self, tag: Option<u8>, body: &[u8]) -> Result<(), WireError> {
        let mut msg = Vec::with_capacity(body.len() + 5);
        msg.extend(tag);
        msg.extend(
            u32::try_from(body.len() + 4)
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        msg.extend(body);
        self.stream.write_all(&msg).map_err(|source| WireError::Io {
            addr: self.addr,
            what: "sending",
            source,
        })
    }

    fn recv(&mut self) -> Result<(u8, Vec<u8>), WireError> {
        let io = |source| WireError::Io {
            addr: self.addr,
            what: "reading the answer",
            source,
        };
        let mut head = [0u8; 5];
        self.stream.read_exact(&mut head).map_err(io)?;
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if !(4..=MAX_MESSAGE).contains(&len) {
            return Err(self.bad(&format!("a message of {len} bytes")));
        }
        let mut body = vec![0u8; len - 4];
        self.stream.read_exact(&mut body).map_err(io)?;
        Ok((head[0], body))
    }

    fn bad(&self, message: &str) -> WireError {
        WireError::Protocol {
            addr: self.addr,
            message: message.to_owned(),
        }
    }

    fn auth(&self, login: &Login<'_>, message: &str) -> WireError {
        WireError::Auth {
            addr: self.addr,
            user: login.user.to_owned(),
            message: message.to_owned(),
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Terminate; the server closes its side either way.
        let _ = self.stream.write_all(&[b'X', 0, 0, 0, 4]);
    }
}

fn startup(user: &str, database: &str) -> Vec<u8> {
    let mut b = 196_608u32.to_be_bytes().to_vec(); // protocol 3.0
    for s in ["user", user, "database", database] {
        b.extend(cstr(s));
    }
    b.push(0);
    b
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// `md5` + hex(md5(hex(md5(password + user)) + salt)), PostgreSQL's md5 method.
fn md5_password(user: &str, password: &str, salt: &[u8]) -> String {
    let inner = hex(&Md5::digest(format!("{password}{user}").as_bytes()));
    let mut outer = Md5::new();
    outer.update(inner.as_bytes());
    outer.update(salt);
    format!("md5{}", hex(&outer.finalize()))
}

fn hex(b: &[u8]) -> String {
    ct_codecs::Hex::encode_to_string(b).expect("hex of a digest fits")
}

/// An ErrorResponse's SQLSTATE and message.
fn error_fields(body: &[u8]) -> (String, String) {
    let (mut code, mut message) = (String::new(), String::new());
    for field in body.split(|b| *b == 0) {
        let Some((&kind, text)) = field.split_first() else {
            continue;
        };
        let text = String::from_utf8_lossy(text).into_owned();
        match kind {
            b'C' => code = text,
            b'M' => message = text,
            _ => {}
        }
    }
    (code, message)
}

fn row_description(body: &[u8]) -> Option<Vec<String>> {
    let n = be16(body, 0)?;
    let mut at = 2;
    let mut cols = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let end = at + body.get(at..)?.iter().position(|b| *b == 0)?;
        cols.push(String::from_utf8_lossy(&body[at..end]).into_owned());
        at = end + 1 + 18; // table oid, column, type oid, size, modifier, format
    }
    Some(cols)
}

fn data_row(body: &[u8]) -> Option<Vec<Option<String>>> {
    let n = be16(body, 0)?;
    let mut at = 2;
    let mut row = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let len = be32(body, at)? as i32;
        at += 4;
        if len < 0 {
            row.push(None);
            continue;
        }
        let end = at.checked_add(len as usize)?;
        row.push(Some(
            String::from_utf8_lossy(body.get(at..end)?).into_owned(),
        ));
        at = end;
    }
    Some(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_md5_answer_is_postgresqls() {
        // Python's hashlib, for user "u", password "p", salt 01 02 03 04.
        assert_eq!(
            md5_password("u", "p", &[1, 2, 3, 4]),
            "md5facdc455923b0a58efea84a6d9ee0e76"
        );
    }

    #[test]
    fn rows_and_errors_are_parsed_and_a_short_row_is_refused() {
        let mut t = 2u16.to_be_bytes().to_vec();
        for name in ["name", "paused"] {
            t.extend(cstr(name));
            t.extend([0u8; 18]);
        }
        assert_eq!(row_description(&t).unwrap(), ["name", "paused"]);
        let mut d = 2u16.to_be_bytes().to_vec();
        d.extend(3i32.to_be_bytes());
        d.extend(b"app");
        d.extend((-1i32).to_be_bytes());
        assert_eq!(
            data_row(&d).unwrap(),
            [Some("app".to_owned()), None],
            "a NULL is None"
        );
        d.truncate(8);
        assert_eq!(data_row(&d), None, "a value cut short is refused");
        let e = b"SERROR\0C08P01\0Mpooler is not paused/suspended\0\0";
        assert_eq!(
            error_fields(e),
            ("08P01".into(), "pooler is not paused/suspended".into())
        );
        let rows = Rows {
            columns: vec!["name".into(), "paused".into()],
            rows: vec![vec![Some("app".into()), Some("1".into())]],
            tag: "SHOW".into(),
        };
        assert_eq!(rows.column("paused").unwrap(), [Some("1")]);
        assert_eq!(rows.column("nope"), None);
    }
}
