//! Fetching from patch servers over HTTP(S), defensively.
//!
//! A patch server is outside input: it may be slow on purpose (slow-loris), huge, redirect in
//! circles, or point us at another host. So every request has one overall deadline (connect,
//! headers and body together, so a server trickling one byte a second still times out), every
//! body a byte limit checked against `Content-Length` first and enforced while reading, and
//! redirects are followed here, by hand, so each hop's host is checked against the
//! allow-list (the feed's own host plus `allowed_hosts`) before it is contacted, and a
//! redirect from `https` to plain `http` is refused (a server or a man in the middle of a
//! later hop must not move us off TLS).

use std::time::Duration;

use serde::Serialize;

/// A URL that patchover will fetch: `http` or `https`, with a host, without credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl(url::Url);

/// A URL that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("{url:?} is not a URL")]
    Parse {
        url: String,
        #[source]
        source: url::ParseError,
    },
    #[error("{0:?}: only http:// and https:// URLs can be fetched")]
    Scheme(String),
    #[error("{0:?}: the URL has no host")]
    NoHost(String),
    #[error("{0:?}: credentials in URLs are not accepted")]
    Credentials(String),
}

impl HttpUrl {
    pub fn parse(s: &str) -> Result<HttpUrl, UrlError> {
        let u = url::Url::parse(s).map_err(|source| UrlError::Parse {
            url: s.chars().take(200).collect(),
            source,
        })?;
        HttpUrl::check(u)
    }

    fn check(u: url::Url) -> Result<HttpUrl, UrlError> {
        if !matches!(u.scheme(), "http" | "https") {
            return Err(UrlError::Scheme(u.to_string()));
        }
        if u.host_str().is_none_or(str::is_empty) {
            return Err(UrlError::NoHost(u.to_string()));
        }
        if !u.username().is_empty() || u.password().is_some() {
            return Err(UrlError::Credentials(u.to_string()));
        }
        Ok(HttpUrl(u))
    }

    /// Resolves `reference` (absolute, or relative to this URL) as a browser would.
    pub fn join(&self, reference: &str) -> Result<HttpUrl, UrlError> {
        let u = self.0.join(reference).map_err(|source| UrlError::Parse {
            url: reference.chars().take(200).collect(),
            source,
        })?;
        HttpUrl::check(u)
    }

    /// The host, lowercase (IPv6 addresses in brackets).
    pub fn host(&self) -> String {
        self.0.host_str().unwrap_or("").to_ascii_lowercase()
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub fn is_https(&self) -> bool {
        self.0.scheme() == "https"
    }

    /// This URL with `suffix` appended to its path (`index.json` → `index.json.minisig`).
    pub fn with_suffix(&self, suffix: &str) -> HttpUrl {
        let mut u = self.0.clone();
        let path = format!("{}{suffix}", u.path());
        u.set_path(&path);
        HttpUrl(u)
    }
}

impl std::fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.as_str())
    }
}

/// A fetch that failed; nothing it returned is used.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(
        "{url}: host {host} is not allowed (the feed's own host and [monitor] allowed_hosts are)"
    )]
    ForeignHost { url: String, host: String },
    #[error("{url}: more than {max} redirects (a redirect loop?)")]
    TooManyRedirects { url: String, max: u32 },
    #[error(
        "redirect from {from} to {to} refused: it leaves https for plain http (a downgrade); the server must redirect to an https URL"
    )]
    Downgrade { from: String, to: String },
    #[error("cannot read the CA file {path} (the feed's `ca_file`, or the host's CA store)")]
    CaFile {
        path: std::path::PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{url}: redirect without a usable Location")]
    BadRedirect {
        url: String,
        #[source]
        source: Option<UrlError>,
    },
    #[error("{url}: the server answered {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: more than {max} bytes")]
    TooLarge { url: String, max: u64 },
    #[error("{url}: no complete answer within {secs} s (server too slow, or stalling)")]
    Timeout { url: String, secs: u64 },
    #[error("{url}: request failed")]
    Http {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
}

impl FetchError {
    /// A short reason for logs and reports.
    pub fn reason(&self) -> &'static str {
        match self {
            FetchError::ForeignHost { .. } => "foreign-host",
            FetchError::TooManyRedirects { .. } => "redirect-loop",
            FetchError::BadRedirect { .. } => "bad-redirect",
            FetchError::Downgrade { .. } => "downgrade",
            FetchError::CaFile { .. } => "bad-ca",
            FetchError::Status { .. } => "http-status",
            FetchError::TooLarge { .. } => "too-large",
            FetchError::Timeout { .. } => "timeout",
            FetchError::Http { .. } => "http-error",
        }
    }
}

/// Validators from a previous fetch, for a conditional request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Validators {
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

/// What a fetch brought back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// `304 Not Modified`: the validators still hold.
    NotModified,
    Body {
        bytes: Vec<u8>,
        validators: Validators,
        /// The URL the body came from after redirects.
        final_url: String,
    },
}

/// The limits every fetch runs under.
#[derive(Debug, Clone)]
pub struct FetchPolicy {
    /// Connect + headers + body, for one fetch including its redirects.
    pub timeout: Duration,
    pub max_redirects: u32,
    /// Hosts that may be contacted besides the one of the URL first asked for.
    pub allowed_hosts: Vec<String>,
    /// A CA (PEM) HTTPS servers must chain to instead of the web PKI roots (a feed's
    /// `ca_file`).
    pub ca_file: Option<std::path::PathBuf>,
}

/// An HTTP client bound to a [`FetchPolicy`].
pub struct Fetcher {
    agent: ureq::Agent,
    policy: FetchPolicy,
}

/// Where the host keeps its CA store as one PEM bundle, in the order looked at after
/// `SSL_CERT_FILE` (Debian's `ca-certificates` first).
const SYSTEM_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// The host's CA store: `SSL_CERT_FILE` when set (as OpenSSL reads it), else the first of
/// [`SYSTEM_BUNDLES`] there is; `None` when the host has none.
fn system_bundle() -> Option<std::path::PathBuf> {
    if let Some(f) = std::env::var_os("SSL_CERT_FILE").filter(|f| !f.is_empty()) {
        return Some(f.into());
    }
    SYSTEM_BUNDLES
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.is_file())
}

/// The roots HTTPS servers are checked against: the certificates of the feed's `ca_file`, or
/// else the host's CA store (what the administrator keeps current with `ca-certificates`,
/// site CAs included), or the bundled web PKI roots on a host without one.
fn root_certs(ca_file: Option<&std::path::Path>) -> Result<ureq::tls::RootCerts, FetchError> {
    match ca_file
        .map(std::path::Path::to_path_buf)
        .or_else(system_bundle)
    {
        Some(path) => pem_roots(&path),
        None => {
            tracing::warn!(
                "no CA store on this host (SSL_CERT_FILE, {SYSTEM_BUNDLES:?}): feeds are checked against the bundled web PKI roots"
            );
            Ok(ureq::tls::RootCerts::WebPki)
        }
    }
}

/// Every certificate of the PEM file at `path` (none is an error).
fn pem_roots(path: &std::path::Path) -> Result<ureq::tls::RootCerts, FetchError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let ca_err = |source| FetchError::CaFile {
        path: path.to_owned(),
        source,
    };
    let mut certs = Vec::new();
    for cert in CertificateDer::pem_file_iter(path).map_err(ca_err)? {
        let der = cert.map_err(ca_err)?;
        certs.push(ureq::tls::Certificate::from_der(&der).to_owned());
    }
    if certs.is_empty() {
        return Err(ca_err(rustls_pki_types::pem::Error::NoItemsFound));
    }
    Ok(ureq::tls::RootCerts::new_with_certs(&certs))
}

/// Where a redirect answer points, resolved against the URL that answered. A redirect from
/// https to plain http is refused whatever the host.
fn redirect_target(current: &HttpUrl, location: Option<String>) -> Result<HttpUrl, FetchError> {
    let bad = |source| FetchError::BadRedirect {
        url: current.to_string(),
        source,
    };
    let loc = location.ok_or_else(|| bad(None))?;
    let next = current.join(&loc).map_err(|e| bad(Some(e)))?;
    if current.is_https() && !next.is_https() {
        return Err(FetchError::Downgrade {
            from: current.to_string(),
            to: next.to_string(),
        });
    }
    Ok(next)
}

impl Fetcher {
    /// A client for `policy`; fails only when its `ca_file` cannot be read.
    pub fn new(policy: FetchPolicy) -> Result<Fetcher, FetchError> {
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(root_certs(policy.ca_file.as_deref())?)
            .build();
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(policy.timeout))
            .max_redirects(0)
            .http_status_as_error(false)
            .tls_config(tls)
            .user_agent(concat!("patchover-monitor/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Ok(Fetcher { agent, policy })
    }

    pub fn policy(&self) -> &FetchPolicy {
        &self.policy
    }

    /// Whether `url`'s host may be contacted when the fetch began at `origin_host`.
    pub fn host_allowed(&self, origin_host: &str, url: &HttpUrl) -> bool {
        let h = url.host();
        h == origin_host || self.policy.allowed_hosts.contains(&h)
    }

    fn timeout(&self, url: &HttpUrl) -> FetchError {
        FetchError::Timeout {
            url: url.to_string(),
            secs: self.policy.timeout.as_secs(),
        }
    }

    fn map_err(&self, url: &HttpUrl, max_bytes: u64, source: ureq::Error) -> FetchError {
        match source {
            ureq::Error::Timeout(_) => self.timeout(url),
            ureq::Error::BodyExceedsLimit(_) => FetchError::TooLarge {
                url: url.to_string(),
                max: max_bytes,
            },
            ureq::Error::Io(e) if e.kind() == std::io::ErrorKind::TimedOut => self.timeout(url),
            source => FetchError::Http {
                url: url.to_string(),
                source: Box::new(source),
            },
        }
    }

    /// One request, no redirect followed.
    fn request(
        &self,
        url: &HttpUrl,
        validators: Option<&Validators>,
        remaining: Duration,
        max_bytes: u64,
    ) -> Result<ureq::http::Response<ureq::Body>, FetchError> {
        let mut req = self
            .agent
            .get(url.as_str())
            .config()
            .timeout_global(Some(remaining))
            .build();
        if let Some(v) = validators {
            if let Some(e) = &v.etag {
                req = req.header("If-None-Match", e);
            }
            if let Some(m) = &v.last_modified {
                req = req.header("If-Modified-Since", m);
            }
        }
        req.call().map_err(|e| self.map_err(url, max_bytes, e))
    }

    /// Reads a `200` answer's body, at most `max_bytes` (`Content-Length` checked first).
    fn body(
        &self,
        url: &HttpUrl,
        mut resp: ureq::http::Response<ureq::Body>,
        max_bytes: u64,
    ) -> Result<Fetched, FetchError> {
        if let Some(len) = resp.body().content_length()
            && len > max_bytes
        {
            return Err(FetchError::TooLarge {
                url: url.to_string(),
                max: max_bytes,
            });
        }
        let validators = Validators {
            etag: header(&resp, "etag"),
            last_modified: header(&resp, "last-modified"),
        };
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(max_bytes)
            .read_to_vec()
            .map_err(|e| self.map_err(url, max_bytes, e))?;
        Ok(Fetched::Body {
            bytes,
            validators,
            final_url: url.to_string(),
        })
    }

    /// GETs `url` (conditionally, with `validators`), following at most `max_redirects`
    /// redirects to allowed hosts and never from https to http, reading at most `max_bytes`.
    /// `origin_host` is the host the allow-list is relative to (the feed's own host).
    pub fn get(
        &self,
        url: &HttpUrl,
        origin_host: &str,
        validators: Option<&Validators>,
        max_bytes: u64,
    ) -> Result<Fetched, FetchError> {
        let started = std::time::Instant::now();
        let mut current = url.clone();
        let mut hops = 0u32;
        loop {
            if !self.host_allowed(origin_host, &current) {
                return Err(FetchError::ForeignHost {
                    url: current.to_string(),
                    host: current.host(),
                });
            }
            let remaining = self.policy.timeout.saturating_sub(started.elapsed());
            if remaining.is_zero() {
                return Err(self.timeout(&current));
            }
            let resp = self.request(&current, validators, remaining, max_bytes)?;
            match resp.status().as_u16() {
                200 => return self.body(&current, resp, max_bytes),
                304 if validators.is_some() => return Ok(Fetched::NotModified),
                301 | 302 | 303 | 307 | 308 => {
                    hops += 1;
                    if hops > self.policy.max_redirects {
                        return Err(FetchError::TooManyRedirects {
                            url: url.to_string(),
                            max: self.policy.max_redirects,
                        });
                    }
                    let next = redirect_target(&current, header(&resp, "location"))?;
                    tracing::debug!(from = %current, to = %next, "following redirect");
                    current = next;
                }
                status => {
                    return Err(FetchError::Status {
                        url: current.to_string(),
                        status,
                    });
                }
            }
        }
    }
}

fn header(resp: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_joined() {
        let u = HttpUrl::parse("http://Example.org:8080/feed/index.json").unwrap();
        assert_eq!(u.host(), "example.org");
        assert_eq!(
            u.join("b/x.tar.zst").unwrap().as_str(),
            "http://example.org:8080/feed/b/x.tar.zst"
        );
        assert_eq!(
            u.with_suffix(".minisig").as_str(),
            "http://example.org:8080/feed/index.json.minisig"
        );
        assert_eq!(u.join("https://other/x").unwrap().host(), "other");
        assert!(u.join("file:///etc/passwd").is_err());
        assert!(HttpUrl::parse("ftp://x/y").is_err());
        assert!(HttpUrl::parse("http://user:pw@x/y").is_err());
        assert!(HttpUrl::parse("not a url").is_err());
    }

    #[test]
    fn redirects_never_leave_https_for_http() {
        let https = HttpUrl::parse("https://example.org/feed/index.json").unwrap();
        let http = HttpUrl::parse("http://example.org/feed/index.json").unwrap();
        let to = |u: &HttpUrl, loc: &str| redirect_target(u, Some(loc.to_owned()));
        for loc in ["http://example.org/feed/index.json", "HTTP://example.org/x"] {
            let e = to(&https, loc).unwrap_err();
            assert_eq!(e.reason(), "downgrade", "{loc}: {e}");
        }
        // A relative Location keeps the scheme; https to https and upgrades are followed.
        assert!(to(&https, "/other/index.json").unwrap().is_https());
        assert!(to(&https, "https://mirror.example.org/i").is_ok());
        assert!(to(&http, "https://example.org/i").unwrap().is_https());
        assert!(to(&http, "/plain").is_ok());
        assert_eq!(
            to(&https, "ftp://x/y").unwrap_err().reason(),
            "bad-redirect"
        );
        assert_eq!(
            redirect_target(&https, None).unwrap_err().reason(),
            "bad-redirect"
        );
    }
}
