//! The config's sections besides the LCs and the network: `[bundles]`, `[yara]`, `[daemon]`
//! (and `[service]`, in [`super::service`]; `[monitor]`, in [`super::monitor`]).
//!
//! Each is a typed raw struct that refuses unknown keys (so a typo such as `prot = 80` is an
//! error at its line, not a silently ignored key) and a validated value the rest of patchover
//! uses. The crates that act on a section (the daemon, the bundle verifier, the orchestrator)
//! take these values; none of them parses TOML.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Validator};

/// The validated `[bundles]` section.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BundlesSection {
    /// Public key files (minisign format) whose signatures are trusted for any bundle.
    pub trusted_keys: Vec<PathBuf>,
    /// `[[bundles.scoped_keys]]`: public key files trusted only for one kind of bundle.
    pub scoped_keys: Vec<ScopedKey>,
    /// `max_bundle_mib` in bytes, when set.
    pub max_bundle_bytes: Option<u64>,
    /// `max_unpacked_mib` in bytes, when set.
    pub max_unpacked_bytes: Option<u64>,
}

/// What a scoped key may sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyScope {
    /// Only bundles of the shape `bundle from-apt` makes: Debian packages from the archive,
    /// the space check and `dpkg -i` of packages configured together; `package_version`
    /// checks. No other script, diff, file or check (`patchover_bundle::aptshape`).
    Apt,
}

impl std::fmt::Display for KeyScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyScope::Apt => f.write_str("apt"),
        }
    }
}

/// A `[[bundles.scoped_keys]]` entry: a public key trusted only for its scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopedKey {
    pub path: PathBuf,
    pub scope: KeyScope,
    /// For `scope = "apt"`: the OpenPGP keyrings (binary, as apt's `signed-by`) of the
    /// archives whose packages such a bundle may carry. Each `.deb` of the bundle must be
    /// listed in a package index whose hash is in a release file signed by one of them
    /// (`patchover_bundle::aptindex`), so the scoped key cannot sign a package of its own.
    pub archive_keyrings: Vec<PathBuf>,
}

/// The validated `[yara]` section: the malware check before the copy (seed step 702).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YaraSection {
    /// A directory of YARA rule files.
    pub rules: PathBuf,
}

/// The TLS files of the daemon's TCP listener (`tls_cert`, `tls_key`): named here, read and
/// checked when the daemon starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The validated `[daemon]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonSection {
    pub socket: PathBuf,
    pub listen: Option<SocketAddr>,
    /// SHA-256 hashes of the bearer tokens.
    pub tokens: Vec<[u8; 32]>,
    /// Run the monitor on its interval when `[monitor]` is configured.
    pub monitor: bool,
    pub shutdown_grace: Duration,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    /// How long a connection may take to send a request head, from its first byte (the
    /// first request's: from the connection's start).
    pub head_timeout: Duration,
    /// How long a keep-alive connection may wait, after an answer, before its next request
    /// starts; then it is closed. Answers in progress (event streams) are never cut by it.
    pub idle_timeout: Duration,
    /// How many connections each listener (the socket, TCP) holds open at once; past it a
    /// new one is answered 503 and closed.
    pub max_connections: usize,
    pub tls: Option<TlsPaths>,
    /// `listen` off loopback without TLS was allowed explicitly.
    pub allow_plaintext_tcp: bool,
}

impl DaemonSection {
    /// The section when the config has no `[daemon]`.
    pub fn defaults(run_dir: &Path) -> DaemonSection {
        DaemonSection {
            socket: default_socket(run_dir),
            listen: None,
            tokens: Vec::new(),
            monitor: true,
            shutdown_grace: Duration::from_secs(60),
            max_body_bytes: 64 * 1024,
            request_timeout: Duration::from_secs(120),
            head_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 256,
            tls: None,
            allow_plaintext_tcp: false,
        }
    }
}

/// The socket when `[daemon] socket` is not set: `<run_dir>/daemon/patchover.sock`. The
/// `daemon/` directory is the unit's `RuntimeDirectory=patchover/daemon`, which systemd
/// removes on stop; everything else in `run_dir` outlives the daemon.
pub fn default_socket(run_dir: &Path) -> PathBuf {
    run_dir.join("daemon").join("patchover.sock")
}

/// `sha256:<64 hex digits>` → the hash's bytes.
pub fn parse_token_hash(s: &str) -> Option<[u8; 32]> {
    use ct_codecs::Decoder;
    let hex = s.strip_prefix("sha256:")?;
    ct_codecs::Hex::decode_to_vec(hex, None)
        .ok()?
        .try_into()
        .ok()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBundles {
    #[serde(default)]
    trusted_keys: Vec<Spanned<PathBuf>>,
    #[serde(default)]
    scoped_keys: Vec<RawScopedKey>,
    max_bundle_mib: Option<Spanned<u64>>,
    max_unpacked_mib: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScopedKey {
    path: Spanned<PathBuf>,
    scope: Spanned<KeyScope>,
    #[serde(default)]
    archive_keyrings: Vec<Spanned<PathBuf>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawYara {
    rules: Spanned<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDaemon {
    socket: Option<Spanned<PathBuf>>,
    listen: Option<Spanned<SocketAddr>>,
    #[serde(default)]
    tokens: Vec<Spanned<String>>,
    monitor: Option<bool>,
    shutdown_grace_secs: Option<u64>,
    max_body_bytes: Option<usize>,
    request_timeout_secs: Option<u64>,
    head_timeout_secs: Option<u64>,
    idle_timeout_secs: Option<Spanned<u64>>,
    max_connections: Option<Spanned<u64>>,
    tls_cert: Option<Spanned<PathBuf>>,
    tls_key: Option<Spanned<PathBuf>>,
    #[serde(default)]
    allow_plaintext_tcp: bool,
}

impl Validator<'_> {
    pub(super) fn absolute(&self, p: &Spanned<PathBuf>, key: &str) -> Result<(), ConfigError> {
        if p.get_ref().is_absolute() {
            Ok(())
        } else {
            Err(self.err(
                p,
                key,
                format!("{} must be an absolute path", p.get_ref().display()),
            ))
        }
    }

    pub(super) fn bundles(&self, raw: Option<RawBundles>) -> Result<BundlesSection, ConfigError> {
        let Some(raw) = raw else {
            return Ok(BundlesSection::default());
        };
        for p in &raw.trusted_keys {
            self.absolute(p, "bundles.trusted_keys")?;
        }
        for (i, k) in raw.scoped_keys.iter().enumerate() {
            let key = format!("bundles.scoped_keys[{i}].path");
            self.absolute(&k.path, &key)?;
            if raw
                .trusted_keys
                .iter()
                .any(|p| p.get_ref() == k.path.get_ref())
            {
                return Err(self.err(
                    &k.path,
                    &key,
                    format!(
                        "{} is also in bundles.trusted_keys, where it is trusted for every bundle: list it in one place",
                        k.path.get_ref().display()
                    ),
                ));
            }
            let rings = format!("bundles.scoped_keys[{i}].archive_keyrings");
            for p in &k.archive_keyrings {
                self.absolute(p, &rings)?;
            }
            if *k.scope.get_ref() == KeyScope::Apt && k.archive_keyrings.is_empty() {
                return Err(self.err(
                    &k.scope,
                    &rings,
                    "a key with scope = \"apt\" needs archive_keyrings: the OpenPGP keyrings of the archives whose packages its bundles may carry (as in apt's signed-by, e.g. [\"/usr/share/keyrings/debian-archive-keyring.gpg\"]); every .deb of such a bundle must be in an index signed by one of them".to_owned(),
                ));
            }
        }
        let mib = |key: &str, v: Option<Spanned<u64>>| -> Result<Option<u64>, ConfigError> {
            match v {
                None => Ok(None),
                Some(s) if *s.get_ref() == 0 || *s.get_ref() > 64 * 1024 => {
                    Err(self.err(&s, key, format!("{} must be 1 to 65536", s.get_ref())))
                }
                Some(s) => Ok(Some(s.into_inner() << 20)),
            }
        };
        Ok(BundlesSection {
            max_bundle_bytes: mib("bundles.max_bundle_mib", raw.max_bundle_mib)?,
            max_unpacked_bytes: mib("bundles.max_unpacked_mib", raw.max_unpacked_mib)?,
            trusted_keys: raw
                .trusted_keys
                .into_iter()
                .map(|p| p.into_inner())
                .collect(),
            scoped_keys: raw
                .scoped_keys
                .into_iter()
                .map(|k| ScopedKey {
                    path: k.path.into_inner(),
                    scope: k.scope.into_inner(),
                    archive_keyrings: k
                        .archive_keyrings
                        .into_iter()
                        .map(|p| p.into_inner())
                        .collect(),
                })
                .collect(),
        })
    }

    pub(super) fn yara(&self, raw: Option<RawYara>) -> Result<Option<YaraSection>, ConfigError> {
        let Some(raw) = raw else { return Ok(None) };
        self.absolute(&raw.rules, "yara.rules")?;
        Ok(Some(YaraSection {
            rules: raw.rules.into_inner(),
        }))
    }

    pub(super) fn daemon(
        &self,
        raw: Option<RawDaemon>,
        run_dir: &Path,
    ) -> Result<DaemonSection, ConfigError> {
        let raw = raw.unwrap_or_default();
        let mut tokens = Vec::new();
        for t in &raw.tokens {
            tokens.push(parse_token_hash(t.get_ref()).ok_or_else(|| {
                self.err(
                    t,
                    "daemon.tokens",
                    format!(
                        "{:?} is not a token hash; write \"sha256:<64 hex digits>\" (`patchover serve --hash-token` prints one)",
                        t.get_ref().chars().take(80).collect::<String>()
                    ),
                )
            })?);
        }
        if let Some(l) = &raw.listen
            && tokens.is_empty()
        {
            return Err(self.err(
                l,
                "daemon.listen",
                "`listen` needs at least one bearer token in `tokens`; add `tokens = [\"sha256:<hex>\"]`",
            ));
        }
        let tls = match (raw.tls_cert, raw.tls_key) {
            (Some(cert), Some(key)) => Some(TlsPaths {
                cert: cert.into_inner(),
                key: key.into_inner(),
            }),
            (None, None) => None,
            (Some(c), None) => {
                return Err(self.err(
                    &c,
                    "daemon.tls_cert",
                    "`tls_cert` is set without `tls_key`; set both (the PEM certificate and its private key) or neither",
                ));
            }
            (None, Some(k)) => {
                return Err(self.err(
                    &k,
                    "daemon.tls_key",
                    "`tls_key` is set without `tls_cert`; set both (the PEM certificate and its private key) or neither",
                ));
            }
        };
        if let Some(addr) = &raw.listen
            && !addr.get_ref().ip().is_loopback()
            && tls.is_none()
            && !raw.allow_plaintext_tcp
        {
            return Err(self.err(
                addr,
                "daemon.listen",
                format!(
                    "`listen = \"{}\"` is not a loopback address and has no TLS, so bearer tokens would cross the network in clear; set `tls_cert` and `tls_key` (see docs/daemon.md), listen on 127.0.0.1, or set `allow_plaintext_tcp = true` if a TLS proxy or a trusted network carries it",
                    addr.get_ref()
                ),
            ));
        }
        let d = DaemonSection::defaults(run_dir);
        let secs = |v: Option<u64>, d: Duration| v.map_or(d, Duration::from_secs);
        let idle = self.range("daemon.idle_timeout_secs", raw.idle_timeout_secs, 1, 86_400)?;
        let max_connections = self
            .range("daemon.max_connections", raw.max_connections, 1, 65_536)?
            .map_or(d.max_connections, |n| n as usize);
        Ok(DaemonSection {
            socket: raw.socket.map_or(d.socket, Spanned::into_inner),
            listen: raw.listen.map(Spanned::into_inner),
            tokens,
            monitor: raw.monitor.unwrap_or(d.monitor),
            shutdown_grace: secs(raw.shutdown_grace_secs, d.shutdown_grace),
            max_body_bytes: raw.max_body_bytes.unwrap_or(d.max_body_bytes),
            request_timeout: secs(raw.request_timeout_secs, d.request_timeout),
            head_timeout: secs(raw.head_timeout_secs, d.head_timeout),
            idle_timeout: secs(idle, d.idle_timeout),
            max_connections,
            tls,
            allow_plaintext_tcp: raw.allow_plaintext_tcp,
        })
    }
}
