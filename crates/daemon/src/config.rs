//! The config's `[daemon]` section as the daemon uses it. The config loader
//! (`patchover_core::config`) types and checks it at load (unknown keys, token hashes,
//! `listen` without tokens, half a TLS pair, plaintext TCP off loopback are errors at their
//! line); this turns the checked values into the daemon's own types.
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
//! head_timeout_secs = 10                     # a request head must be whole by then
//! idle_timeout_secs = 60                     # after an answer, the next request within this
//! max_connections = 256                      # per listener; past it: 503 and closed
//! tls_cert = "/etc/patchover/tls/cert.pem"   # TLS on the TCP listener: both or neither
//! tls_key = "/etc/patchover/tls/key.pem"
//! allow_plaintext_tcp = false                 # needed for `listen` off loopback without TLS
//! ```
//!
//! The TLS files are only named here; [`crate::tls::TlsFiles::load`] reads and checks them
//! when the daemon starts (the CLI reads this section too, to find the socket, and may not be
//! allowed to read the key).

use std::net::SocketAddr;
use std::path::PathBuf;

pub use patchover_core::config::{DaemonSection, default_socket};

use crate::auth::TokenHash;
use crate::tls::TlsFiles;

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
    /// How long a request head may take, from its first byte (the first request's: from
    /// the connection's start).
    pub head_timeout: std::time::Duration,
    /// How long a connection may wait after an answer for its next request.
    pub idle_timeout: std::time::Duration,
    /// How many connections each listener holds at once; past it: 503 and closed.
    pub max_connections: usize,
    /// TLS on the TCP listener (`tls_cert` and `tls_key`).
    pub tls: Option<TlsFiles>,
    /// `listen` off loopback without TLS was allowed explicitly.
    pub allow_plaintext_tcp: bool,
}

impl DaemonConfig {
    /// The section the config loader checked.
    pub fn from_section(s: &DaemonSection) -> DaemonConfig {
        DaemonConfig {
            socket: s.socket.clone(),
            listen: s.listen,
            tokens: s
                .tokens
                .iter()
                .copied()
                .map(TokenHash::from_bytes)
                .collect(),
            monitor: s.monitor,
            shutdown_grace: s.shutdown_grace,
            max_body_bytes: s.max_body_bytes,
            request_timeout: s.request_timeout,
            head_timeout: s.head_timeout,
            idle_timeout: s.idle_timeout,
            max_connections: s.max_connections,
            tls: s.tls.as_ref().map(|t| TlsFiles {
                cert: t.cert.clone(),
                key: t.key.clone(),
            }),
            allow_plaintext_tcp: s.allow_plaintext_tcp,
        }
    }

    /// The `[daemon]` section of a loaded config.
    pub fn from_config(c: &patchover_core::Config) -> DaemonConfig {
        DaemonConfig::from_section(&c.daemon)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn defaults_and_tokens() {
        let c = DaemonConfig::from_section(&DaemonSection::defaults(Path::new("/run/p")));
        assert_eq!(c.socket, Path::new("/run/p/daemon/patchover.sock"));
        assert!(c.listen.is_none() && c.tls.is_none() && c.monitor);
        let h = TokenHash::of("t");
        let mut s = DaemonSection::defaults(Path::new("/r"));
        s.tokens = vec![patchover_core::config::parse_token_hash(&h.to_config()).unwrap()];
        s.tls = Some(patchover_core::config::TlsPaths {
            cert: "/c.pem".into(),
            key: "/k.pem".into(),
        });
        let c = DaemonConfig::from_section(&s);
        assert_eq!(c.tokens, [h]);
        assert_eq!(c.tls.unwrap().key, Path::new("/k.pem"));
    }
}
