//! TLS on the TCP listener: the certificate and key from `[daemon] tls_cert` / `tls_key`, and
//! a listener that hands axum connections whose handshake is done.
//!
//! Bearer tokens travel in every request, so on a network they need TLS. axum's `serve` takes
//! any [`Listener`]; rather than a second HTTP server loop (with its own graceful shutdown),
//! [`TlsListener`] does the handshakes and feeds finished connections to the same `serve` the
//! Unix socket and plain TCP use, so shutdown, the head deadline ([`crate::slow`]) and the body
//! limit work alike on all listeners. Each handshake runs in its own task with a deadline, so
//! a client that opens a connection and sends nothing holds up nobody else.
//!
//! TLS 1.3 and 1.2 only (rustls has nothing older), the `ring` provider, no client
//! certificates, ALPN `http/1.1`.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::serve::Listener;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// The PEM files of `[daemon] tls_cert` and `tls_key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Why the TLS files cannot be used. Every message names the config key and the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "config [daemon] {key} = {path:?}: no such file; point it at the PEM {what} (e.g. made with `openssl req -x509`, see docs/daemon.md)"
    )]
    Missing {
        key: &'static str,
        what: &'static str,
        path: PathBuf,
    },
    #[error(
        "config [daemon] {key} = {path:?}: cannot read it; make it a file the daemon's user (root) can read"
    )]
    Unreadable {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "config [daemon] tls_cert = {path:?}: no PEM certificate (`-----BEGIN CERTIFICATE-----`) in it; point tls_cert at the certificate (chain), not the key"
    )]
    NotCertificate {
        path: PathBuf,
        #[source]
        source: Option<rustls::pki_types::pem::Error>,
    },
    #[error(
        "config [daemon] tls_key = {path:?}: no unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1) in it; point tls_key at the certificate's private key"
    )]
    NotKey {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error(
        "config [daemon] tls_key = {key:?} does not match the certificate in tls_cert = {cert:?}; use the key the certificate was made for"
    )]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error(
        "config [daemon] tls_cert = {cert:?}, tls_key = {key:?}: rustls cannot use them; use an RSA (2048+), ECDSA P-256/P-384 or Ed25519 key"
    )]
    Unusable {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

fn read(key: &'static str, what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => TlsError::Missing {
            key,
            what,
            path: path.to_owned(),
        },
        _ => TlsError::Unreadable {
            key,
            path: path.to_owned(),
            source,
        },
    })
}

impl TlsFiles {
    /// Reads and checks both files: each exists and is readable, the certificate file holds
    /// certificates, the key file a private key, and the key is the certificate's.
    pub fn load(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let cert_pem = read("tls_cert", "certificate", &self.cert)?;
        let key_pem = read("tls_key", "private key", &self.key)?;
        let certs = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::NotCertificate {
                path: self.cert.clone(),
                source: Some(e),
            })?;
        if certs.is_empty() {
            return Err(TlsError::NotCertificate {
                path: self.cert.clone(),
                source: None,
            });
        }
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|source| TlsError::NotKey {
            path: self.key.clone(),
            source,
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|source| self.unusable(source))?
            .with_no_client_auth();
        // `with_single_cert` checks that the key's public half is the certificate's.
        let mut cfg = builder
            .with_single_cert(certs, key)
            .map_err(|source| match source {
                rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                    cert: self.cert.clone(),
                    key: self.key.clone(),
                    source,
                },
                source => self.unusable(source),
            })?;
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    fn unusable(&self, source: rustls::Error) -> TlsError {
        TlsError::Unusable {
            cert: self.cert.clone(),
            key: self.key.clone(),
            source,
        }
    }
}

/// A listener whose connections come out with their TLS handshake done. Connections whose
/// handshake fails or does not finish within the deadline are dropped (logged at debug). The
/// inner listener decides what is admitted at all (the daemon's: [`crate::slow::Capped`], so
/// a refused connection costs no handshake).
pub struct TlsListener<L: Listener> {
    rx: mpsc::Receiver<(TlsStream<L::Io>, L::Addr)>,
    local: L::Addr,
}

impl<L> TlsListener<L>
where
    L: Listener,
    L::Addr: Clone + std::fmt::Display,
{
    /// Starts accepting on `inner` (on the current tokio runtime); the accept task ends when
    /// the listener is dropped.
    pub fn new(
        inner: L,
        config: Arc<ServerConfig>,
        handshake_timeout: Duration,
    ) -> io::Result<TlsListener<L>> {
        let local = inner.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(accept_loop(
            inner,
            TlsAcceptor::from(config),
            handshake_timeout,
            tx,
        ));
        Ok(TlsListener { rx, local })
    }
}

async fn accept_loop<L>(
    mut inner: L,
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    tx: mpsc::Sender<(TlsStream<L::Io>, L::Addr)>,
) where
    L: Listener,
    L::Addr: std::fmt::Display,
{
    loop {
        // axum's accept logs and retries on errors (e.g. too many open files).
        let (stream, peer) = tokio::select! {
            _ = tx.closed() => return,
            c = inner.accept() => c,
        };
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    // Fails only when the listener is gone (shutdown): the connection drops.
                    let _ = tx.send((tls, peer)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "no TLS handshake before the deadline"),
            }
        });
    }
}

impl<L> Listener for TlsListener<L>
where
    L: Listener,
    L::Addr: Clone + Sync,
{
    type Io = TlsStream<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept task ended; it only does when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::process::Command;

    use tokio::net::TcpListener;

    use super::*;

    /// A self-signed ECDSA P-256 certificate for 127.0.0.1 and its key, made with `openssl`.
    fn pair(dir: &Path, name: &str) -> TlsFiles {
        let f = TlsFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        let o = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
            .args(["-subj", "/CN=patchover-test"])
            .args(["-addext", "subjectAltName=IP:127.0.0.1"])
            // Not a CA: webpki refuses a CA certificate as a server's.
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-keyout")
            .arg(&f.key)
            .arg("-out")
            .arg(&f.cert)
            .output()
            .expect("run openssl");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        f
    }

    fn client(cert: &Path) -> Arc<rustls::ClientConfig> {
        client_with(cert, rustls::DEFAULT_VERSIONS)
    }

    fn client_with(
        cert: &Path,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(cert).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(versions)
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    #[test]
    fn bad_files_are_refused_naming_the_key_and_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let a = pair(dir.path(), "a");
        let b = pair(dir.path(), "b");
        a.load().unwrap();
        let with = |cert: &Path, key: &Path| {
            TlsFiles {
                cert: cert.to_owned(),
                key: key.to_owned(),
            }
            .load()
            .map(|_| ())
            .unwrap_err()
        };
        let missing = dir.path().join("nope.pem");
        let e = with(&missing, &a.key);
        assert!(
            matches!(
                e,
                TlsError::Missing {
                    key: "tls_cert",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("no such file"), "{e}");
        let e = with(&a.cert, &missing);
        assert!(
            matches!(e, TlsError::Missing { key: "tls_key", .. }),
            "{e:?}"
        );
        // A directory cannot be read as a file (root reads any file, whatever its mode).
        let e = with(dir.path(), &a.key);
        assert!(
            matches!(
                e,
                TlsError::Unreadable {
                    key: "tls_cert",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("cannot read it"), "{e}");
        // The two files swapped.
        let e = with(&a.key, &a.cert);
        assert!(matches!(e, TlsError::NotCertificate { .. }), "{e:?}");
        assert!(e.to_string().contains("tls_cert"), "{e}");
        let e = with(&a.cert, &a.cert);
        assert!(matches!(e, TlsError::NotKey { .. }), "{e:?}");
        let e = with(&a.cert, &b.key);
        assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e:?}");
        assert!(e.to_string().contains("does not match"), "{e}");
    }

    #[test]
    fn the_listener_serves_tls_refuses_plaintext_and_a_silent_client_holds_up_nobody() {
        let dir = tempfile::tempdir().unwrap();
        let files = pair(dir.path(), "a");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let addr = rt.block_on(async {
            let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let l = TlsListener::new(tcp, files.load().unwrap(), Duration::from_secs(30)).unwrap();
            let addr = l.local_addr().unwrap();
            let app = axum::Router::new().route("/", axum::routing::get(async || "hello"));
            tokio::spawn(async move { axum::serve(l, app).await });
            addr
        });
        // A client that connects and never starts its handshake.
        let _silent = std::net::TcpStream::connect(addr).unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let conn = rustls::ClientConnection::new(client(&files.cert), name).unwrap();
        let mut s = rustls::StreamOwned::new(conn, std::net::TcpStream::connect(addr).unwrap());
        s.sock
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        assert!(got.ends_with("hello"), "{got}");
        assert_eq!(
            s.conn
                .negotiated_cipher_suite()
                .map(|c| c.version().version),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        // A TLS 1.2 client is served too.
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let conn = rustls::ClientConnection::new(
            client_with(&files.cert, &[&rustls::version::TLS12]),
            name,
        )
        .unwrap();
        let mut s = rustls::StreamOwned::new(conn, std::net::TcpStream::connect(addr).unwrap());
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
        assert_eq!(
            s.conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_2)
        );
        // Plain HTTP to the TLS port gets no HTTP answer.
        let mut p = std::net::TcpStream::connect(addr).unwrap();
        p.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        p.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut got = Vec::new();
        let _ = p.read_to_end(&mut got);
        assert!(
            !got.starts_with(b"HTTP/"),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
        // A client that does not trust the certificate does not get through.
        let other = pair(dir.path(), "b");
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let conn = rustls::ClientConnection::new(client(&other.cert), name).unwrap();
        let mut s = rustls::StreamOwned::new(conn, std::net::TcpStream::connect(addr).unwrap());
        let e = s
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .and_then(|_| s.flush());
        let mut got = Vec::new();
        let r = e.and_then(|_| s.read_to_end(&mut got));
        assert!(r.is_err(), "{:?}", String::from_utf8_lossy(&got));
        drop(rt);
    }
}
