//! The config's `[daemon]` section (kept raw by `patchover_core::Config` in `extra`).
//!
//! ```toml
//! [daemon]
//! socket = "/run/patchover/daemon/patchover.sock"  # default: <run_dir>/daemon/patchover.sock
//! listen = "127.0.0.1:7878"                   # optional TCP listener; needs tokens
//! tokens = ["sha256:<hex>"]                   # bearer tokens, hashed
//! monitor = true                              # run the monitor every [monitor] interval
//! shutdown_grace_secs = 60                    # how long SIGTERM waits for running runs
//! max_body_bytes = 65536
//! request_timeout_secs = 120                 # a command taking longer: 408
//! head_timeout_secs = 10                     # a client must send its request head by then
//! tls_cert = "/etc/patchover/tls/cert.pem"   # TLS on the TCP listener: both or neither
//! tls_key = "/etc/patchover/tls/key.pem"
//! allow_plaintext_tcp = false                 # needed for `listen` off loopback without TLS
//! ```
//!
//! The TLS files are only named here; [`crate::tls::TlsFiles::load`] reads and checks them
//! when the daemon starts (the CLI reads this section too, to find the socket, and may not be
//! allowed to read the key).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::auth::{TokenError, TokenHash};
use crate::tls::TlsFiles;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    socket: Option<PathBuf>,
    listen: Option<SocketAddr>,
    #[serde(default)]
    tokens: Vec<String>,
    #[serde(default = "yes")]
    monitor: bool,
    shutdown_grace_secs: Option<u64>,
    max_body_bytes: Option<usize>,
    request_timeout_secs: Option<u64>,
    head_timeout_secs: Option<u64>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    #[serde(default)]
    allow_plaintext_tcp: bool,
}

fn yes() -> bool {
    true
}

/// The daemon's settings.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub socket: PathBuf,
    pub listen: Option<SocketAddr>,
    pub tokens: Vec<TokenHash>,
    /// Run the monitor on its interval when `[monitor]` is configured.
    pub monitor: bool,
    pub shutdown_grace: std::time::Duration,
    pub max_body_bytes: usize,
    pub request_timeout: std::time::Duration,
    /// How long a connection may take to send its first request head.
    pub head_timeout: std::time::Duration,
    /// TLS on the TCP listener (`tls_cert` and `tls_key`).
    pub tls: Option<TlsFiles>,
    /// `listen` off loopback without TLS was allowed explicitly.
    pub allow_plaintext_tcp: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonConfigError {
    #[error("config [daemon]")]
    Parse(#[source] toml::de::Error),
    #[error("config [daemon]")]
    Token(#[source] TokenError),
    #[error(
        "config [daemon]: `listen` needs at least one bearer token in `tokens`; add `tokens = [\"sha256:<hex>\"]`"
    )]
    ListenWithoutTokens,
    #[error(
        "config [daemon]: `{given}` is set without `{missing}`; set both (the PEM certificate and its private key) or neither"
    )]
    TlsHalf {
        given: &'static str,
        missing: &'static str,
    },
    #[error(
        "config [daemon]: `listen = \"{0}\"` is not a loopback address and has no TLS, so bearer tokens would cross the network in clear; set `tls_cert` and `tls_key` (see docs/daemon.md), listen on 127.0.0.1, or set `allow_plaintext_tcp = true` if a TLS proxy or a trusted network carries it"
    )]
    PlaintextTcp(SocketAddr),
}

/// The socket when `[daemon] socket` is not set: `<run_dir>/daemon/patchover.sock`. The
/// `daemon/` directory is the unit's `RuntimeDirectory=patchover/daemon`, which systemd
/// removes on stop; everything else in `run_dir` outlives the daemon.
pub fn default_socket(run_dir: &Path) -> PathBuf {
    run_dir.join("daemon").join("patchover.sock")
}

impl DaemonConfig {
    pub fn from_extra(
        extra: &BTreeMap<String, toml::Value>,
        run_dir: &Path,
    ) -> Result<DaemonConfig, DaemonConfigError> {
        let raw: Raw = match extra.get("daemon") {
            None => toml::from_str("").map_err(DaemonConfigError::Parse)?,
            Some(v) => v.clone().try_into().map_err(DaemonConfigError::Parse)?,
        };
        let tokens = raw
            .tokens
            .iter()
            .map(|t| TokenHash::parse(t))
            .collect::<Result<Vec<_>, _>>()
            .map_err(DaemonConfigError::Token)?;
        if raw.listen.is_some() && tokens.is_empty() {
            return Err(DaemonConfigError::ListenWithoutTokens);
        }
        let tls = match (raw.tls_cert, raw.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(DaemonConfigError::TlsHalf {
                    given: "tls_cert",
                    missing: "tls_key",
                });
            }
            (None, Some(_)) => {
                return Err(DaemonConfigError::TlsHalf {
                    given: "tls_key",
                    missing: "tls_cert",
                });
            }
        };
        if let Some(addr) = raw.listen
            && !addr.ip().is_loopback()
            && tls.is_none()
            && !raw.allow_plaintext_tcp
        {
            return Err(DaemonConfigError::PlaintextTcp(addr));
        }
        Ok(DaemonConfig {
            socket: raw.socket.unwrap_or_else(|| default_socket(run_dir)),
            listen: raw.listen,
            tokens,
            monitor: raw.monitor,
            shutdown_grace: std::time::Duration::from_secs(raw.shutdown_grace_secs.unwrap_or(60)),
            max_body_bytes: raw.max_body_bytes.unwrap_or(64 * 1024),
            request_timeout: std::time::Duration::from_secs(
                raw.request_timeout_secs.unwrap_or(120),
            ),
            head_timeout: std::time::Duration::from_secs(raw.head_timeout_secs.unwrap_or(10)),
            tls,
            allow_plaintext_tcp: raw.allow_plaintext_tcp,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extra(s: &str) -> BTreeMap<String, toml::Value> {
        toml::from_str(s).unwrap()
    }

    #[test]
    fn defaults_and_tokens() {
        let c = DaemonConfig::from_extra(&BTreeMap::new(), Path::new("/run/p")).unwrap();
        assert_eq!(c.socket, Path::new("/run/p/daemon/patchover.sock"));
        assert!(c.listen.is_none());
        let h = TokenHash::of("t").to_config();
        let c = DaemonConfig::from_extra(
            &extra(&format!(
                "[daemon]\nlisten = \"127.0.0.1:1\"\ntokens = [\"{h}\"]"
            )),
            Path::new("/r"),
        )
        .unwrap();
        assert_eq!(c.tokens.len(), 1);
    }

    #[test]
    fn bad_sections_are_refused() {
        let r = Path::new("/r");
        assert!(matches!(
            DaemonConfig::from_extra(&extra("[daemon]\nlisten = \"127.0.0.1:1\""), r),
            Err(DaemonConfigError::ListenWithoutTokens)
        ));
        assert!(DaemonConfig::from_extra(&extra("[daemon]\nlisen = 1"), r).is_err());
        assert!(DaemonConfig::from_extra(&extra("[daemon]\ntokens = [\"x\"]"), r).is_err());
    }

    #[test]
    fn tls_needs_both_files_and_plaintext_tcp_off_loopback_needs_consent() {
        let r = Path::new("/r");
        let h = TokenHash::of("t").to_config();
        let with = |rest: &str| {
            DaemonConfig::from_extra(&extra(&format!("[daemon]\ntokens = [\"{h}\"]\n{rest}")), r)
        };
        match with("tls_cert = \"/c.pem\"") {
            Err(e @ DaemonConfigError::TlsHalf { .. }) => {
                assert!(e.to_string().contains("without `tls_key`"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            with("tls_key = \"/k.pem\""),
            Err(DaemonConfigError::TlsHalf {
                missing: "tls_cert",
                ..
            })
        ));
        for addr in ["0.0.0.0:7878", "192.0.2.1:7878", "[::]:7878"] {
            match with(&format!("listen = \"{addr}\"")) {
                Err(e @ DaemonConfigError::PlaintextTcp(_)) => {
                    let m = e.to_string();
                    assert!(
                        m.contains("in clear") && m.contains("allow_plaintext_tcp"),
                        "{m}"
                    );
                }
                other => panic!("{addr}: {other:?}"),
            }
        }
        let c = with("listen = \"0.0.0.0:7878\"\nallow_plaintext_tcp = true").unwrap();
        assert!(c.allow_plaintext_tcp && c.tls.is_none());
        let c =
            with("listen = \"0.0.0.0:7878\"\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"").unwrap();
        assert_eq!(c.tls.unwrap().key, Path::new("/k.pem"));
        for addr in ["127.0.0.1:7878", "[::1]:7878"] {
            assert!(with(&format!("listen = \"{addr}\"")).unwrap().tls.is_none());
        }
    }
}
