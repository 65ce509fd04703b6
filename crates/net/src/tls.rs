//! The `https` service check's TLS client: rustls with the `ring` provider, trusting only what
//! the config says — the CA certificates of a file on the host (`ca_file`), or, with
//! `insecure`, any certificate — and never anything the LC offers.
//!
//! Which LC answered is proven by where the check is made (inside the LC, to its own
//! address), not by TLS: an `insecure` check is encrypted and still proves the LC; a `ca_file`
//! check also proves the service holds a key the operator's CA signed.

use std::io::{self, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use patchover_core::TlsTrust;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

use crate::lc::HttpAnswer;

/// The client config: the CA file's certificates as the only roots, or no verification.
fn config(trust: &TlsTrust) -> io::Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?;
    let cfg = match (&trust.ca_file, trust.insecure) {
        (_, true) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider))),
        (Some(path), false) => builder.with_root_certificates(roots(path)?),
        (None, false) => {
            return Err(io::Error::other(
                "an https check needs ca_file or insecure = true",
            ));
        }
    };
    Ok(Arc::new(cfg.with_no_client_auth()))
}

/// One `GET path` over TLS to `sa` from the calling thread's namespace (bound to device
/// `via`, if given).
pub(crate) fn get(
    trust: &TlsTrust,
    sa: SocketAddr,
    path: &str,
    timeout: Duration,
    via: Option<&str>,
) -> io::Result<HttpAnswer> {
    let name = match &trust.sni {
        Some(n) => ServerName::try_from(n.clone())
            .map_err(|_| io::Error::other(format!("{n:?} is not a TLS server name (sni)")))?,
        None => ServerName::IpAddress(sa.ip().into()),
    };
    let conn = rustls::ClientConnection::new(config(trust)?, name).map_err(io::Error::other)?;
    let tcp = crate::health::connect_for_get(sa, timeout, via)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let host = trust.sni.clone().unwrap_or_else(|| sa.to_string());
    crate::health::exchange(&mut tls, &host, path)
}

/// The certificates of the PEM file `path`, as the only roots.
fn roots(path: &Path) -> io::Result<rustls::RootCertStore> {
    let bad = |why: String| io::Error::other(format!("ca_file {}: {why}", path.display()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad(
            "no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into(),
        ));
    }
    Ok(roots)
}

/// `insecure`: every certificate is taken; the handshake's signatures are still checked
/// against it (so the peer holds the key of the certificate it sent).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Reads until the peer ends the stream. A TLS peer that closes its TCP connection without
/// `close_notify` (common for HTTP/1.0-style servers) ends the answer too once something came.
pub(crate) fn read_answer(s: &mut impl Read) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    match s.read_to_end(&mut buf) {
        Ok(_) => Ok(buf),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !buf.is_empty() => Ok(buf),
        Err(e) => Err(e),
    }
}
