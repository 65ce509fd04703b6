//! The service manager's readiness protocol (`sd_notify`), spoken directly: one datagram of
//! `KEY=VALUE` lines to the `AF_UNIX` socket named by `$NOTIFY_SOCKET` (a path, or an
//! abstract name written with a leading `@`).
//!
//! Why: the unit is `Type=notify`, so systemd orders dependents after the daemon only once it
//! says `READY=1`, and patchover says so only when its API socket is bound *and* the runs a
//! previous daemon left unfinished are recovered (see `docs/daemon.md`, "Under systemd").
//! The protocol is a few lines; a crate for it would add nothing we could not test here.
//!
//! Without `$NOTIFY_SOCKET` (not started by systemd) every call is a no-op. A failed send is
//! logged and otherwise ignored: the daemon serves either way, and systemd's start timeout
//! reports the missing READY.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Where readiness and status go; `None` when nobody listens.
#[derive(Debug, Clone)]
pub struct Notifier {
    addr: Option<(String, SocketAddr)>,
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET={0:?} is neither an absolute path nor an @abstract name")]
    BadAddress(String),
    #[error("cannot notify the service manager on {0}")]
    Send(String, #[source] io::Error),
}

impl Notifier {
    /// A notifier that sends nothing.
    pub fn none() -> Notifier {
        Notifier { addr: None }
    }

    /// From the value of `$NOTIFY_SOCKET`: `/path/to/socket` or `@abstract-name`.
    pub fn from_value(v: &str) -> Result<Notifier, NotifyError> {
        let addr = if let Some(name) = v.strip_prefix('@') {
            SocketAddr::from_abstract_name(name.as_bytes())
        } else if v.starts_with('/') {
            SocketAddr::from_pathname(v)
        } else {
            return Err(NotifyError::BadAddress(v.to_owned()));
        }
        .map_err(|_| NotifyError::BadAddress(v.to_owned()))?;
        Ok(Notifier {
            addr: Some((v.to_owned(), addr)),
        })
    }

    /// From the environment; [`Notifier::none`] when `$NOTIFY_SOCKET` is unset or empty.
    pub fn from_env() -> Result<Notifier, NotifyError> {
        match std::env::var(NOTIFY_SOCKET) {
            Ok(v) if !v.is_empty() => Notifier::from_value(&v),
            _ => Ok(Notifier::none()),
        }
    }

    pub fn is_active(&self) -> bool {
        self.addr.is_some()
    }

    /// Sends one message of `KEY=VALUE` lines.
    pub fn send(&self, msg: &str) -> Result<(), NotifyError> {
        let Some((name, addr)) = &self.addr else {
            return Ok(());
        };
        let err = |e| NotifyError::Send(name.clone(), e);
        let sock = UnixDatagram::unbound().map_err(err)?;
        sock.send_to_addr(msg.as_bytes(), addr).map_err(err)?;
        Ok(())
    }

    /// [`Notifier::send`], with a failure logged instead of returned.
    pub fn tell(&self, msg: &str) {
        if let Err(e) = self.send(msg) {
            let mut text = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                text.push_str(&format!(": {s}"));
                src = s.source();
            }
            tracing::warn!(error = %text, msg, "sd_notify failed");
        }
    }

    /// `STATUS=`: one line for `systemctl status`.
    pub fn status(&self, status: &str) {
        self.tell(&format!("STATUS={}", one_line(status)));
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.tell(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// `STOPPING=1` with a status line.
    pub fn stopping(&self, status: &str) {
        self.tell(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
    }
}

/// A value must not break the `KEY=VALUE` line format.
fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(l: &UnixDatagram) -> String {
        l.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = l.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn sends_to_a_path_socket() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("notify");
        let l = UnixDatagram::bind(&p).unwrap();
        let n = Notifier::from_value(p.to_str().unwrap()).unwrap();
        n.ready("serving\non x");
        assert_eq!(recv(&l), "READY=1\nSTATUS=serving on x");
        n.stopping("bye");
        assert_eq!(recv(&l), "STOPPING=1\nSTATUS=bye");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("po-notify-test-{}", std::process::id());
        let l = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
            .unwrap();
        let n = Notifier::from_value(&format!("@{name}")).unwrap();
        n.status("recovering");
        assert_eq!(recv(&l), "STATUS=recovering");
    }

    #[test]
    fn bad_values_and_absent_listeners_are_errors() {
        assert!(matches!(
            Notifier::from_value("relative/path"),
            Err(NotifyError::BadAddress(_))
        ));
        let d = tempfile::tempdir().unwrap();
        let n = Notifier::from_value(d.path().join("nobody").to_str().unwrap()).unwrap();
        assert!(matches!(n.send("READY=1"), Err(NotifyError::Send(..))));
        // Not started by a service manager: nothing to send, no error.
        assert!(Notifier::none().send("READY=1").is_ok());
        assert!(!Notifier::none().is_active());
    }
}
