//! Reading the approval mailbox over IMAP (seed fig. 20, 1806).
//!
//! The `imap` crate speaks the protocol; the connection is made here so that it has a
//! connect timeout and read/write timeouts (a stalling server cannot hang the monitor), and
//! so that TLS (implicit, or STARTTLS, required once asked for) uses rustls with the web PKI
//! roots plus an optional site CA file (`ca_file`), like the SMTP side.
//!
//! Mails are found by UID: the store remembers the mailbox's `UIDVALIDITY` and the last UID
//! read, so each mail is looked at once, whatever its flags, and a restarted monitor goes on
//! where it stopped. The size is fetched first and a mail over the limit is never downloaded.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;

use crate::config::{MailServer, PasswordFileError, TlsMode};

/// The mailbox could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MailboxError {
    #[error("cannot connect to IMAP server {host}:{port}")]
    Connect {
        host: String,
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("IMAP server {host}: TLS setup")]
    Tls {
        host: String,
        #[source]
        source: rustls::Error,
    },
    #[error("IMAP server {host}: STARTTLS refused ({line:?}); set tls = \"tls\" or \"none\"")]
    StartTls { host: String, line: String },
    #[error("cannot read the CA file {path}")]
    CaFile {
        path: std::path::PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("IMAP password")]
    Password(#[source] PasswordFileError),
    #[error("IMAP server {host}: {what}")]
    Imap {
        host: String,
        what: &'static str,
        #[source]
        source: Box<imap::Error>,
    },
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

type Conn = Box<dyn Stream>;

/// A mail found in the mailbox.
#[derive(Debug, Clone)]
pub struct RawMail {
    pub uid: u32,
    pub size: u32,
    /// `None` when the mail is over the size limit (not downloaded).
    pub body: Option<Vec<u8>>,
}

/// An open, logged-in IMAP session on the configured mailbox.
pub struct Inbox {
    session: imap::Session<Conn>,
    host: String,
    mailbox: String,
    uid_validity: u32,
}

/// The rustls client config: web PKI roots plus `ca_file`'s certificates.
pub(crate) fn tls_config(server: &MailServer) -> Result<Arc<rustls::ClientConfig>, MailboxError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &server.ca_file {
        let ca_err = |source| MailboxError::CaFile {
            path: path.clone(),
            source,
        };
        for cert in CertificateDer::pem_file_iter(path).map_err(ca_err)? {
            roots
                .add(cert.map_err(ca_err)?)
                .map_err(|source| MailboxError::Tls {
                    host: server.host.clone(),
                    source,
                })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| MailboxError::Tls {
            host: server.host.clone(),
            source,
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

fn wrap_tls(server: &MailServer, tcp: TcpStream) -> Result<Conn, MailboxError> {
    let tls_err = |source| MailboxError::Tls {
        host: server.host.clone(),
        source,
    };
    let name = rustls_pki_types::ServerName::try_from(server.host.clone()).map_err(|_| {
        tls_err(rustls::Error::General(format!(
            "{:?} is not a valid TLS server name",
            server.host
        )))
    })?;
    let conn = rustls::ClientConnection::new(tls_config(server)?, name).map_err(tls_err)?;
    Ok(Box::new(rustls::StreamOwned::new(conn, tcp)))
}

/// Reads one CRLF-terminated line byte by byte (so nothing past it is consumed).
fn read_line(s: &mut TcpStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 4096 {
        if s.read(&mut b)? == 0 {
            break;
        }
        line.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_owned())
}

impl Inbox {
    /// Connects, logs in and selects the configured mailbox.
    pub fn open(server: &MailServer) -> Result<Inbox, MailboxError> {
        let conn_err = |source| MailboxError::Connect {
            host: server.host.clone(),
            port: server.port,
            source,
        };
        let imap_err = |what| {
            let host = server.host.clone();
            move |source| MailboxError::Imap {
                host,
                what,
                source: Box::new(source),
            }
        };
        let addr = (server.host.as_str(), server.port)
            .to_socket_addrs()
            .map_err(conn_err)?
            .next()
            .ok_or_else(|| conn_err(std::io::ErrorKind::NotFound.into()))?;
        let mut tcp = TcpStream::connect_timeout(&addr, server.timeout).map_err(conn_err)?;
        tcp.set_read_timeout(Some(server.timeout))
            .and_then(|()| tcp.set_write_timeout(Some(server.timeout)))
            .map_err(conn_err)?;
        let client = match server.tls {
            TlsMode::None => {
                let mut c = imap::Client::new(Box::new(tcp) as Conn);
                c.read_greeting().map_err(imap_err("greeting"))?;
                c
            }
            TlsMode::Tls => {
                let mut c = imap::Client::new(wrap_tls(server, tcp)?);
                c.read_greeting().map_err(imap_err("greeting"))?;
                c
            }
            TlsMode::Starttls => {
                let greeting = read_line(&mut tcp).map_err(conn_err)?;
                if !greeting.starts_with("* OK") {
                    return Err(MailboxError::StartTls {
                        host: server.host.clone(),
                        line: greeting,
                    });
                }
                tcp.write_all(b"s0 STARTTLS\r\n").map_err(conn_err)?;
                let answer = loop {
                    let l = read_line(&mut tcp).map_err(conn_err)?;
                    if l.is_empty() || l.starts_with("s0 ") {
                        break l;
                    }
                };
                if !answer.starts_with("s0 OK") {
                    return Err(MailboxError::StartTls {
                        host: server.host.clone(),
                        line: answer,
                    });
                }
                let mut c = imap::Client::new(wrap_tls(server, tcp)?);
                c.greeting_read = true;
                c
            }
        };
        let user = server.username.clone().unwrap_or_default();
        let pw = server
            .password()
            .map_err(MailboxError::Password)?
            .unwrap_or_default();
        if server.tls == TlsMode::None {
            tracing::debug!(host = %server.host, "IMAP login over a plain connection");
        }
        let mut session = client
            .login(&user, &pw)
            .map_err(|(e, _)| imap_err("login")(e))?;
        let mb = session
            .select(&server.mailbox)
            .map_err(imap_err("select"))?;
        Ok(Inbox {
            session,
            host: server.host.clone(),
            mailbox: server.mailbox.clone(),
            uid_validity: mb.uid_validity.unwrap_or(0),
        })
    }

    pub fn uid_validity(&self) -> u32 {
        self.uid_validity
    }

    pub fn mailbox(&self) -> &str {
        &self.mailbox
    }

    fn err(&self, what: &'static str) -> impl FnOnce(imap::Error) -> MailboxError {
        let host = self.host.clone();
        move |source| MailboxError::Imap {
            host,
            what,
            source: Box::new(source),
        }
    }

    /// Mails with a UID above `after`, oldest first; bodies over `max_bytes` are not fetched.
    pub fn mails_after(
        &mut self,
        after: u32,
        max_bytes: u64,
    ) -> Result<Vec<RawMail>, MailboxError> {
        let mut uids: Vec<u32> = self
            .session
            .uid_search(format!("UID {}:*", after.saturating_add(1)))
            .map_err(self.err("search"))?
            .into_iter()
            .filter(|u| *u > after)
            .collect();
        uids.sort_unstable();
        let mut out = Vec::with_capacity(uids.len());
        for uid in uids {
            let sizes = self
                .session
                .uid_fetch(uid.to_string(), "RFC822.SIZE")
                .map_err(self.err("fetch size"))?;
            let size = sizes.iter().find_map(|f| f.size).unwrap_or(u32::MAX);
            let body = if u64::from(size) > max_bytes {
                None
            } else {
                let f = self
                    .session
                    .uid_fetch(uid.to_string(), "BODY.PEEK[]")
                    .map_err(self.err("fetch body"))?;
                let b = f.iter().find_map(|m| m.body().map(<[u8]>::to_vec));
                // A server that sends more than it announced is treated as over the limit.
                b.filter(|b| b.len() as u64 <= max_bytes)
            };
            out.push(RawMail { uid, size, body });
        }
        Ok(out)
    }

    /// Flags the mail as read, so a human looking at the mailbox sees it was handled.
    pub fn mark_seen(&mut self, uid: u32) -> Result<(), MailboxError> {
        self.session
            .uid_store(uid.to_string(), "+FLAGS (\\Seen)")
            .map_err(self.err("store flags"))?;
        Ok(())
    }

    /// Appends a mail to the mailbox (as a mail client or a delivery agent would).
    pub fn append(&mut self, mail: &[u8]) -> Result<(), MailboxError> {
        let mb = self.mailbox.clone();
        self.session
            .append(&mb, mail)
            .finish()
            .map_err(self.err("append"))?;
        Ok(())
    }

    pub fn logout(mut self) {
        let _ = self.session.logout();
    }
}
