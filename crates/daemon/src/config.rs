//! The config's `[daemon]` section (kept raw by `patchover_core::Config` in `extra`).
//!
//! ```toml
//! [daemon]
//! socket = "/run/patchover/patchover.sock"   # default: <run_dir>/patchover.sock
//! listen = "127.0.0.1:7878"                   # optional TCP listener; needs tokens
//! tokens = ["sha256:<hex>"]                   # bearer tokens, hashed
//! monitor = true                              # run the monitor every [monitor] interval
//! shutdown_grace_secs = 60                    # how long SIGTERM waits for running runs
//! max_body_bytes = 65536
//! request_timeout_secs = 120                 # a command taking longer: 408
//! head_timeout_secs = 10                     # a client must send its request head by then
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::auth::{TokenError, TokenHash};

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
        Ok(DaemonConfig {
            socket: raw.socket.unwrap_or_else(|| run_dir.join("patchover.sock")),
            listen: raw.listen,
            tokens,
            monitor: raw.monitor,
            shutdown_grace: std::time::Duration::from_secs(raw.shutdown_grace_secs.unwrap_or(60)),
            max_body_bytes: raw.max_body_bytes.unwrap_or(64 * 1024),
            request_timeout: std::time::Duration::from_secs(
                raw.request_timeout_secs.unwrap_or(120),
            ),
            head_timeout: std::time::Duration::from_secs(raw.head_timeout_secs.unwrap_or(10)),
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
        assert_eq!(c.socket, Path::new("/run/p/patchover.sock"));
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
}
