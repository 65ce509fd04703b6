//! The config's `[monitor]` section: the patch monitor (seed fig. 18-20), its feeds, its mail
//! servers. Checked at load like every section: unknown keys are errors, file paths are
//! absolute, numbers have sane ranges, addresses look like addresses. See `docs/monitor.md`.
//!
//! ```toml
//! [monitor]
//! interval_secs = 300
//! security_only = false
//! secret_file = "/etc/patchover/approval.secret"
//! admins = ["admin@example.org"]
//! from = "patchover@host.example.org"
//! lcs = ["lc1"]                 # LCs patched on approval when a bundle names none
//!
//! [[monitor.feeds]]
//! name = "vendor"
//! url = "https://patches.example.org/feed/index.json"
//! trusted_keys = ["/etc/patchover/keys/vendor-feed.pub"]
//! ca_file = "/etc/patchover/site-ca.pem"   # optional: instead of the web PKI roots
//!
//! [[monitor.feeds]]            # the Debian archive of each active Debian LC
//! name = "debian"
//! kind = "apt"
//! signing_key = "/etc/patchover/keys/apt.key"  # its .pub in [[bundles.scoped_keys]], scope "apt"
//!
//! [monitor.smtp]
//! host = "smtp.example.org"
//! port = 587
//! tls = "starttls"              # none | starttls | tls
//! username = "patchover"
//! password_file = "/etc/patchover/smtp.password"
//!
//! [monitor.imap]
//! host = "imap.example.org"
//! port = 993
//! tls = "tls"
//! username = "patchover"
//! password_file = "/etc/patchover/imap.password"
//! mailbox = "INBOX"
//! ```

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Validator};

/// How a mail connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain text (only sensible on loopback).
    None,
    /// Plain connection upgraded with STARTTLS (required: a server without it is refused).
    #[default]
    Starttls,
    /// TLS from the first byte (SMTPS 465, IMAPS 993).
    Tls,
}

/// One patch source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedConfig {
    /// A short name, the key of its state in the store.
    pub name: String,
    /// The signed index's URL (`http://` or `https://`); its signature is at `<url>.minisig`.
    pub url: String,
    /// Public keys (minisign) whose signature on the index is trusted.
    pub trusted_keys: Vec<PathBuf>,
    /// A CA (PEM) that the feed's HTTPS servers must chain to, instead of the web PKI roots
    /// (a private feed behind a site CA).
    pub ca_file: Option<PathBuf>,
}

/// A `kind = "apt"` feed: each round, the pending Debian updates of each active Debian LC
/// become a bundle signed with `signing_key`, a key trusted only for such bundles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AptFeedConfig {
    pub name: String,
    /// The minisign secret key that signs the bundles; its public key must be listed in
    /// `[[bundles.scoped_keys]]` with `scope = "apt"` (checked when the monitor starts).
    pub signing_key: PathBuf,
    /// The secret key's password (first line), if it has one.
    pub password_file: Option<PathBuf>,
    /// The archive as apt lines (`deb [signed-by=K] URI SUITE main`); empty: the host's
    /// sources for each LC's suite, `-updates` and `-security`.
    pub sources: Vec<String>,
    /// Only these LCs (when they are active); empty: every active LC.
    pub lcs: Vec<String>,
}

/// An SMTP or IMAP server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailServer {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    pub timeout: Duration,
    /// IMAP only: the mailbox replies arrive in.
    pub mailbox: String,
    pub ca_file: Option<PathBuf>,
}

/// A mail server's `password_file` that cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {path}", path = path.display())]
pub struct PasswordFileError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl MailServer {
    /// The password, read from its file (first line), if one is configured.
    pub fn password(&self) -> Result<Option<String>, PasswordFileError> {
        let Some(p) = &self.password_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(p).map_err(|source| PasswordFileError {
            path: p.clone(),
            source,
        })?;
        Ok(Some(text.lines().next().unwrap_or("").to_owned()))
    }
}

/// The validated `[monitor]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorConfig {
    pub feeds: Vec<FeedConfig>,
    /// The `kind = "apt"` feeds.
    pub apt_feeds: Vec<AptFeedConfig>,
    pub interval: Duration,
    /// Mail only about security patches (all new patches are still registered).
    pub security_only: bool,
    pub secret_file: Option<PathBuf>,
    pub challenge_ttl: Duration,
    pub admins: Vec<String>,
    pub from: String,
    /// LCs patched on approval when a bundle's manifest names no target LC.
    pub lcs: Vec<String>,
    /// Hosts, besides each feed's own, that bundle URLs and redirects may point to.
    pub allowed_hosts: Vec<String>,
    pub http_timeout: Duration,
    pub max_redirects: u32,
    pub max_index_bytes: u64,
    pub max_mail_bytes: u64,
    pub backoff_max: Duration,
    pub smtp: Option<MailServer>,
    pub imap: Option<MailServer>,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            feeds: Vec::new(),
            apt_feeds: Vec::new(),
            interval: Duration::from_secs(300),
            security_only: false,
            secret_file: None,
            challenge_ttl: Duration::from_secs(24 * 3600),
            admins: Vec::new(),
            from: "patchover@localhost".to_owned(),
            lcs: Vec::new(),
            allowed_hosts: Vec::new(),
            http_timeout: Duration::from_secs(30),
            max_redirects: 3,
            max_index_bytes: 4 << 20,
            max_mail_bytes: 256 << 10,
            backoff_max: Duration::from_secs(6 * 3600),
            smtp: None,
            imap: None,
        }
    }
}

/// A mail address as the config and `From:` headers give it: `local@domain`, no spaces or
/// angle brackets. Compared case-insensitively.
pub fn valid_address(a: &str) -> bool {
    let Some((local, domain)) = a.rsplit_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.is_empty()
        && a.len() <= 254
        && a.chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '<' | '>' | ',' | ';' | '"'))
}

/// Why a feed URL cannot be fetched: the same rules as the monitor's fetcher applies
/// (`http`/`https`, a host, no credentials in the URL).
fn feed_url_problem(s: &str) -> Option<String> {
    let u = match url::Url::parse(s) {
        Ok(u) => u,
        Err(e) => return Some(format!("{s:?} is not a URL: {e}")),
    };
    if !matches!(u.scheme(), "http" | "https") {
        return Some(format!("{u}: only http:// and https:// URLs are fetched"));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Some(format!("{u}: the URL names no host"));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Some(format!(
            "{u}: credentials in a URL are refused; remove user:password@"
        ));
    }
    None
}

/// What a `[[monitor.feeds]]` entry watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
enum FeedKind {
    /// A signed index of bundles over HTTP(S).
    #[default]
    Index,
    /// The Debian archive of the active Debian LCs.
    Apt,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFeed {
    name: Spanned<String>,
    #[serde(default)]
    kind: FeedKind,
    url: Option<Spanned<String>>,
    trusted_keys: Option<Spanned<Vec<Spanned<PathBuf>>>>,
    ca_file: Option<Spanned<PathBuf>>,
    signing_key: Option<Spanned<PathBuf>>,
    password_file: Option<Spanned<PathBuf>>,
    sources: Option<Spanned<Vec<String>>>,
    lcs: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMail {
    host: Spanned<String>,
    port: Option<u16>,
    #[serde(default)]
    tls: TlsMode,
    username: Option<Spanned<String>>,
    password_file: Option<Spanned<PathBuf>>,
    timeout_secs: Option<Spanned<u64>>,
    mailbox: Option<String>,
    /// Extra CA certificate (PEM) to trust, e.g. a site CA or a test's self-signed cert.
    ca_file: Option<Spanned<PathBuf>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMonitor {
    #[serde(default)]
    feeds: Vec<RawFeed>,
    interval_secs: Option<Spanned<u64>>,
    #[serde(default)]
    security_only: bool,
    secret_file: Option<Spanned<PathBuf>>,
    challenge_ttl_secs: Option<Spanned<u64>>,
    #[serde(default)]
    admins: Vec<Spanned<String>>,
    from: Option<Spanned<String>>,
    #[serde(default)]
    lcs: Vec<String>,
    #[serde(default)]
    allowed_hosts: Vec<Spanned<String>>,
    http_timeout_secs: Option<Spanned<u64>>,
    max_redirects: Option<Spanned<u64>>,
    max_index_kib: Option<Spanned<u64>>,
    max_mail_kib: Option<Spanned<u64>>,
    backoff_max_secs: Option<Spanned<u64>>,
    smtp: Option<RawMail>,
    imap: Option<RawMail>,
}

impl Validator<'_> {
    /// A number that must lie in `lo..=hi` (an error at its line otherwise).
    pub(super) fn range(
        &self,
        key: &str,
        v: Option<Spanned<u64>>,
        lo: u64,
        hi: u64,
    ) -> Result<Option<u64>, ConfigError> {
        match v {
            Some(x) if *x.get_ref() < lo || *x.get_ref() > hi => {
                Err(self.err(&x, key, format!("{} must be {lo} to {hi}", x.get_ref())))
            }
            other => Ok(other.map(Spanned::into_inner)),
        }
    }

    fn mail(&self, key: &str, raw: RawMail, default_port: u16) -> Result<MailServer, ConfigError> {
        if raw.host.get_ref().is_empty() {
            return Err(self.err(&raw.host, &format!("{key}.host"), "must not be empty"));
        }
        if let Some(p) = &raw.password_file {
            self.absolute(p, &format!("{key}.password_file"))?;
        }
        if let Some(p) = &raw.ca_file {
            self.absolute(p, &format!("{key}.ca_file"))?;
        }
        match (&raw.username, &raw.password_file) {
            (Some(u), None) => {
                return Err(self.err(
                    u,
                    &format!("{key}.username"),
                    "give both username and password_file, or neither",
                ));
            }
            (None, Some(p)) => {
                return Err(self.err(
                    p,
                    &format!("{key}.password_file"),
                    "give both username and password_file, or neither",
                ));
            }
            _ => {}
        }
        let timeout = self
            .range(&format!("{key}.timeout_secs"), raw.timeout_secs, 1, 600)?
            .unwrap_or(30);
        Ok(MailServer {
            host: raw.host.into_inner(),
            port: raw.port.unwrap_or(default_port),
            tls: raw.tls,
            username: raw.username.map(Spanned::into_inner),
            password_file: raw.password_file.map(Spanned::into_inner),
            timeout: Duration::from_secs(timeout),
            mailbox: raw.mailbox.unwrap_or_else(|| "INBOX".to_owned()),
            ca_file: raw.ca_file.map(Spanned::into_inner),
        })
    }

    /// A feed's name: 1-64 of `A-Z a-z 0-9 - _ .`, unique among `before`.
    fn feed_name(
        &self,
        key: &str,
        name: &Spanned<String>,
        before: &[String],
    ) -> Result<(), ConfigError> {
        let n = name.get_ref();
        if n.is_empty()
            || n.len() > 64
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(self.err(
                name,
                &format!("{key}.name"),
                format!("{n:?}: use 1-64 of A-Z a-z 0-9 - _ ."),
            ));
        }
        if before.iter().any(|o| o == n) {
            return Err(self.err(name, &format!("{key}.name"), format!("{n:?} is used twice")));
        }
        Ok(())
    }

    /// A `kind = "apt"` entry of `[[monitor.feeds]]`.
    fn apt_feed(
        &self,
        key: &str,
        f: RawFeed,
        known: &[String],
    ) -> Result<AptFeedConfig, ConfigError> {
        for lc in f.lcs.iter().flat_map(|l| l.get_ref()) {
            if !known.contains(lc.get_ref()) {
                return Err(self.err(
                    lc,
                    &format!("{key}.lcs"),
                    format!(
                        "{:?} is not an LC of this config (it defines: {}); the feed would never watch it",
                        lc.get_ref(),
                        if known.is_empty() { "none".to_owned() } else { known.join(", ") }
                    ),
                ));
            }
        }
        let index_only = [
            ("url", f.url.as_ref().map(|u| u.span())),
            ("trusted_keys", f.trusted_keys.as_ref().map(|k| k.span())),
            ("ca_file", f.ca_file.as_ref().map(|c| c.span())),
        ];
        if let Some((k, Some(span))) = index_only.into_iter().find(|(_, s)| s.is_some()) {
            return Err(self.err(
                &Spanned::new(span, ()),
                &format!("{key}.{k}"),
                "an apt feed has no index: it asks the archive of each LC's apt sources (or `sources`); remove the key",
            ));
        }
        let Some(signing_key) = f.signing_key else {
            return Err(self.err(
                &f.name,
                &format!("{key}.signing_key"),
                "an apt feed needs signing_key: the minisign secret key that signs its bundles (make one with `patchover bundle keygen`, list its .pub in [[bundles.scoped_keys]] with scope = \"apt\")",
            ));
        };
        self.absolute(&signing_key, &format!("{key}.signing_key"))?;
        if let Some(p) = &f.password_file {
            self.absolute(p, &format!("{key}.password_file"))?;
        }
        Ok(AptFeedConfig {
            name: f.name.into_inner(),
            signing_key: signing_key.into_inner(),
            password_file: f.password_file.map(Spanned::into_inner),
            sources: f.sources.map(Spanned::into_inner).unwrap_or_default(),
            lcs: f
                .lcs
                .map(Spanned::into_inner)
                .unwrap_or_default()
                .into_iter()
                .map(Spanned::into_inner)
                .collect(),
        })
    }

    /// One `kind = "index"` entry of `[[monitor.feeds]]`.
    fn feed(&self, key: &str, f: RawFeed) -> Result<FeedConfig, ConfigError> {
        let apt_only = [
            ("signing_key", f.signing_key.as_ref().map(|u| u.span())),
            ("password_file", f.password_file.as_ref().map(|k| k.span())),
            ("sources", f.sources.as_ref().map(|c| c.span())),
            ("lcs", f.lcs.as_ref().map(|c| c.span())),
        ];
        if let Some((k, Some(span))) = apt_only.into_iter().find(|(_, s)| s.is_some()) {
            return Err(self.err(
                &Spanned::new(span, ()),
                &format!("{key}.{k}"),
                "only an apt feed (kind = \"apt\") has this key",
            ));
        }
        let Some(url) = f.url else {
            return Err(self.err(
                &f.name,
                &format!("{key}.url"),
                "a feed needs url: its signed index (or kind = \"apt\")",
            ));
        };
        let Some(trusted_keys) = f.trusted_keys else {
            return Err(self.err(
                &f.name,
                &format!("{key}.trusted_keys"),
                "list at least one public key that signs this feed's index",
            ));
        };
        if let Some(m) = feed_url_problem(url.get_ref()) {
            return Err(self.err(&url, &format!("{key}.url"), m));
        }
        if trusted_keys.get_ref().is_empty() {
            return Err(self.err(
                &trusted_keys,
                &format!("{key}.trusted_keys"),
                "list at least one public key that signs this feed's index",
            ));
        }
        for p in trusted_keys.get_ref() {
            self.absolute(p, &format!("{key}.trusted_keys"))?;
        }
        if let Some(p) = &f.ca_file {
            self.absolute(p, &format!("{key}.ca_file"))?;
        }
        Ok(FeedConfig {
            name: f.name.into_inner(),
            url: url.into_inner(),
            trusted_keys: trusted_keys
                .into_inner()
                .into_iter()
                .map(Spanned::into_inner)
                .collect(),
            ca_file: f.ca_file.map(Spanned::into_inner),
        })
    }

    /// `[monitor]`; `known` the ids of the config's LCs.
    pub(super) fn monitor(
        &self,
        raw: Option<RawMonitor>,
        known: &[String],
    ) -> Result<Option<MonitorConfig>, ConfigError> {
        let Some(raw) = raw else { return Ok(None) };
        let d = MonitorConfig::default();
        let (mut feeds, mut apt_feeds, mut names) = (Vec::new(), Vec::new(), Vec::new());
        for (i, f) in raw.feeds.into_iter().enumerate() {
            let key = format!("monitor.feeds[{i}]");
            self.feed_name(&key, &f.name, &names)?;
            names.push(f.name.get_ref().clone());
            match f.kind {
                FeedKind::Index => feeds.push(self.feed(&key, f)?),
                FeedKind::Apt => apt_feeds.push(self.apt_feed(&key, f, known)?),
            }
        }
        if let Some(p) = &raw.secret_file {
            self.absolute(p, "monitor.secret_file")?;
        }
        for a in &raw.admins {
            if !valid_address(a.get_ref()) {
                return Err(self.err(
                    a,
                    "monitor.admins",
                    format!(
                        "{:?} is not a mail address (write local@domain)",
                        a.get_ref()
                    ),
                ));
            }
        }
        let from = match raw.from {
            Some(f) if !valid_address(f.get_ref()) => {
                return Err(self.err(
                    &f,
                    "monitor.from",
                    format!(
                        "{:?} is not a mail address (write local@domain)",
                        f.get_ref()
                    ),
                ));
            }
            Some(f) => f.into_inner(),
            None => d.from,
        };
        for h in &raw.allowed_hosts {
            let s = h.get_ref();
            if s.is_empty() || s.contains(['/', ':', '@', ' ']) {
                return Err(self.err(
                    h,
                    "monitor.allowed_hosts",
                    format!("{s:?}: write host names or addresses only, no scheme or port"),
                ));
            }
        }
        let interval = self.range("monitor.interval_secs", raw.interval_secs, 1, 7 * 86_400)?;
        let ttl = self.range(
            "monitor.challenge_ttl_secs",
            raw.challenge_ttl_secs,
            60,
            30 * 86_400,
        )?;
        let http_timeout =
            self.range("monitor.http_timeout_secs", raw.http_timeout_secs, 1, 3600)?;
        let max_redirects = self.range("monitor.max_redirects", raw.max_redirects, 0, 10)?;
        let max_index = self.range("monitor.max_index_kib", raw.max_index_kib, 1, 256 * 1024)?;
        let max_mail = self.range("monitor.max_mail_kib", raw.max_mail_kib, 1, 64 * 1024)?;
        let backoff_max = self.range(
            "monitor.backoff_max_secs",
            raw.backoff_max_secs,
            1,
            7 * 86_400,
        )?;
        let smtp = raw
            .smtp
            .map(|m| self.mail("monitor.smtp", m, 587))
            .transpose()?;
        let imap = raw
            .imap
            .map(|m| self.mail("monitor.imap", m, 993))
            .transpose()?;
        Ok(Some(MonitorConfig {
            feeds,
            apt_feeds,
            interval: interval.map_or(d.interval, Duration::from_secs),
            security_only: raw.security_only,
            secret_file: raw.secret_file.map(Spanned::into_inner),
            challenge_ttl: ttl.map_or(d.challenge_ttl, Duration::from_secs),
            admins: raw
                .admins
                .iter()
                .map(|a| a.get_ref().to_ascii_lowercase())
                .collect(),
            from,
            lcs: raw.lcs,
            allowed_hosts: raw
                .allowed_hosts
                .iter()
                .map(|h| h.get_ref().to_ascii_lowercase())
                .collect(),
            http_timeout: http_timeout.map_or(d.http_timeout, Duration::from_secs),
            max_redirects: max_redirects.map_or(d.max_redirects, |v| v as u32),
            max_index_bytes: max_index.map_or(d.max_index_bytes, |k| k << 10),
            max_mail_bytes: max_mail.map_or(d.max_mail_bytes, |k| k << 10),
            backoff_max: backoff_max.map_or(d.backoff_max, Duration::from_secs),
            smtp,
            imap,
        }))
    }
}
