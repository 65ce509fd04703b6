//! The `[monitor]` section of the patchover config.
//!
//! The core config keeps sections it does not know as raw TOML (`Config.extra`); this crate
//! owns `[monitor]` and validates it here, as strictly as the rest of the config: unknown keys
//! are errors, file paths must be absolute, numbers have sane ranges. See `docs/monitor.md`.
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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The section name in the config.
pub const SECTION: &str = "monitor";

/// A `[monitor]` section that is not valid.
#[derive(Debug, thiserror::Error)]
pub enum MonitorConfigError {
    #[error("config [monitor] is not valid")]
    Toml(#[source] toml::de::Error),
    #[error("config [monitor] {key}: {message}")]
    Invalid { key: String, message: String },
    #[error("config has no [monitor] section: add one (see docs/monitor.md)")]
    Missing,
    #[error("cannot read {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFeed {
    name: String,
    url: String,
    trusted_keys: Vec<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMail {
    host: String,
    port: Option<u16>,
    #[serde(default)]
    tls: TlsMode,
    username: Option<String>,
    password_file: Option<PathBuf>,
    timeout_secs: Option<u64>,
    mailbox: Option<String>,
    /// Extra CA certificate (PEM) to trust, e.g. a site CA or a test's self-signed cert.
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    feeds: Vec<RawFeed>,
    interval_secs: Option<u64>,
    #[serde(default)]
    security_only: bool,
    secret_file: Option<PathBuf>,
    challenge_ttl_secs: Option<u64>,
    #[serde(default)]
    admins: Vec<String>,
    from: Option<String>,
    #[serde(default)]
    lcs: Vec<String>,
    #[serde(default)]
    allowed_hosts: Vec<String>,
    http_timeout_secs: Option<u64>,
    max_redirects: Option<u32>,
    max_index_kib: Option<u64>,
    max_mail_kib: Option<u64>,
    backoff_max_secs: Option<u64>,
    smtp: Option<RawMail>,
    imap: Option<RawMail>,
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

impl MailServer {
    /// The password, read from its file (first line), if one is configured.
    pub fn password(&self) -> Result<Option<String>, MonitorConfigError> {
        let Some(p) = &self.password_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(p).map_err(|source| MonitorConfigError::ReadFile {
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

fn invalid(key: impl Into<String>, message: impl Into<String>) -> MonitorConfigError {
    MonitorConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

fn range(key: &str, v: Option<u64>, lo: u64, hi: u64) -> Result<Option<u64>, MonitorConfigError> {
    match v {
        Some(x) if x < lo || x > hi => Err(invalid(key, format!("{x} must be {lo} to {hi}"))),
        other => Ok(other),
    }
}

fn absolute(key: &str, p: &Path) -> Result<(), MonitorConfigError> {
    if p.is_absolute() {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("{} must be an absolute path", p.display()),
        ))
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

fn mail(key: &str, raw: RawMail, default_port: u16) -> Result<MailServer, MonitorConfigError> {
    if raw.host.is_empty() {
        return Err(invalid(format!("{key}.host"), "must not be empty"));
    }
    if let Some(p) = &raw.password_file {
        absolute(&format!("{key}.password_file"), p)?;
    }
    if let Some(p) = &raw.ca_file {
        absolute(&format!("{key}.ca_file"), p)?;
    }
    if raw.password_file.is_some() != raw.username.is_some() {
        return Err(invalid(
            key,
            "give both username and password_file, or neither",
        ));
    }
    let timeout = range(&format!("{key}.timeout_secs"), raw.timeout_secs, 1, 600)?.unwrap_or(30);
    Ok(MailServer {
        host: raw.host,
        port: raw.port.unwrap_or(default_port),
        tls: raw.tls,
        username: raw.username,
        password_file: raw.password_file,
        timeout: Duration::from_secs(timeout),
        mailbox: raw.mailbox.unwrap_or_else(|| "INBOX".to_owned()),
        ca_file: raw.ca_file,
    })
}

impl MonitorConfig {
    /// Reads the section from the config's `extra` map; a missing section is an error that
    /// says to add one.
    pub fn from_extra(extra: &BTreeMap<String, toml::Value>) -> Result<Self, MonitorConfigError> {
        match extra.get(SECTION) {
            None => Err(MonitorConfigError::Missing),
            Some(v) => MonitorConfig::from_value(v.clone()),
        }
    }

    pub fn from_value(v: toml::Value) -> Result<Self, MonitorConfigError> {
        let raw: Raw = v.try_into().map_err(MonitorConfigError::Toml)?;
        let d = MonitorConfig::default();
        let mut feeds = Vec::new();
        for (i, f) in raw.feeds.into_iter().enumerate() {
            let key = format!("feeds[{i}]");
            if f.name.is_empty()
                || f.name.len() > 64
                || !f
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("{:?}: use 1-64 of A-Z a-z 0-9 - _ .", f.name),
                ));
            }
            if feeds.iter().any(|o: &FeedConfig| o.name == f.name) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("{:?} is used twice", f.name),
                ));
            }
            crate::fetch::HttpUrl::parse(&f.url)
                .map_err(|e| invalid(format!("{key}.url"), e.to_string()))?;
            if f.trusted_keys.is_empty() {
                return Err(invalid(
                    format!("{key}.trusted_keys"),
                    "list at least one public key that signs this feed's index",
                ));
            }
            for p in &f.trusted_keys {
                absolute(&format!("{key}.trusted_keys"), p)?;
            }
            feeds.push(FeedConfig {
                name: f.name,
                url: f.url,
                trusted_keys: f.trusted_keys,
            });
        }
        if let Some(p) = &raw.secret_file {
            absolute("secret_file", p)?;
        }
        for a in &raw.admins {
            if !valid_address(a) {
                return Err(invalid(
                    "admins",
                    format!("{a:?} is not a mail address (write local@domain)"),
                ));
            }
        }
        let from = raw.from.unwrap_or(d.from);
        if !valid_address(&from) {
            return Err(invalid(
                "from",
                format!("{from:?} is not a mail address (write local@domain)"),
            ));
        }
        for h in &raw.allowed_hosts {
            if h.is_empty() || h.contains(['/', ':', '@', ' ']) {
                return Err(invalid(
                    "allowed_hosts",
                    format!("{h:?}: write host names or addresses only, no scheme or port"),
                ));
            }
        }
        let interval = range("interval_secs", raw.interval_secs, 1, 7 * 86_400)?;
        let ttl = range(
            "challenge_ttl_secs",
            raw.challenge_ttl_secs,
            60,
            30 * 86_400,
        )?;
        let http_timeout = range("http_timeout_secs", raw.http_timeout_secs, 1, 3600)?;
        let max_redirects = range("max_redirects", raw.max_redirects.map(u64::from), 0, 10)?;
        let max_index = range("max_index_kib", raw.max_index_kib, 1, 256 * 1024)?;
        let max_mail = range("max_mail_kib", raw.max_mail_kib, 1, 64 * 1024)?;
        let backoff_max = range("backoff_max_secs", raw.backoff_max_secs, 1, 7 * 86_400)?;
        let smtp = raw.smtp.map(|m| mail("smtp", m, 587)).transpose()?;
        let imap = raw.imap.map(|m| mail("imap", m, 993)).transpose()?;
        Ok(MonitorConfig {
            feeds,
            interval: interval.map_or(d.interval, Duration::from_secs),
            security_only: raw.security_only,
            secret_file: raw.secret_file,
            challenge_ttl: ttl.map_or(d.challenge_ttl, Duration::from_secs),
            admins: raw.admins.iter().map(|a| a.to_ascii_lowercase()).collect(),
            from,
            lcs: raw.lcs,
            allowed_hosts: raw
                .allowed_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            http_timeout: http_timeout.map_or(d.http_timeout, Duration::from_secs),
            max_redirects: max_redirects.map_or(d.max_redirects, |v| v as u32),
            max_index_bytes: max_index.map_or(d.max_index_bytes, |k| k << 10),
            max_mail_bytes: max_mail.map_or(d.max_mail_bytes, |k| k << 10),
            backoff_max: backoff_max.map_or(d.backoff_max, Duration::from_secs),
            smtp,
            imap,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<MonitorConfig, MonitorConfigError> {
        let v: toml::Table = toml::from_str(s).unwrap();
        let extra: BTreeMap<String, toml::Value> = v.into_iter().collect();
        MonitorConfig::from_extra(&extra)
    }

    #[test]
    fn section_parses_and_validates() {
        assert!(matches!(parse(""), Err(MonitorConfigError::Missing)));
        let c = parse(
            r#"[monitor]
interval_secs = 60
security_only = true
admins = ["Admin@Example.org"]
secret_file = "/etc/po/secret"
[[monitor.feeds]]
name = "main"
url = "http://127.0.0.1:8080/index.json"
trusted_keys = ["/k/feed.pub"]
[monitor.smtp]
host = "127.0.0.1"
port = 2525
tls = "none"
[monitor.imap]
host = "127.0.0.1"
tls = "starttls"
username = "po"
password_file = "/etc/po/imap.pw"
"#,
        )
        .unwrap();
        assert_eq!(c.interval, Duration::from_secs(60));
        assert!(c.security_only);
        assert_eq!(c.admins, ["admin@example.org"]);
        assert_eq!(c.feeds[0].name, "main");
        assert_eq!(c.smtp.as_ref().unwrap().tls, TlsMode::None);
        assert_eq!(c.imap.as_ref().unwrap().port, 993);
        assert_eq!(c.imap.as_ref().unwrap().mailbox, "INBOX");

        for bad in [
            "[monitor]\nunknown = 1\n",
            "[monitor]\ninterval_secs = 0\n",
            "[monitor]\nadmins = [\"nobody\"]\n",
            "[monitor]\nsecret_file = \"rel\"\n",
            "[monitor]\nallowed_hosts = [\"http://x\"]\n",
            "[[monitor.feeds]]\nname = \"a\"\nurl = \"ftp://x/i.json\"\ntrusted_keys = [\"/k\"]\n",
            "[[monitor.feeds]]\nname = \"a\"\nurl = \"http://x/i.json\"\ntrusted_keys = []\n",
            "[[monitor.feeds]]\nname = \"a b\"\nurl = \"http://x/i.json\"\ntrusted_keys = [\"/k\"]\n",
            "[monitor.smtp]\nhost = \"h\"\nusername = \"u\"\n",
            "[monitor.smtp]\nhost = \"h\"\ntls = \"ssl\"\n",
        ] {
            assert!(parse(bad).is_err(), "accepted: {bad}");
        }
    }
}
