//! Fetching from patch servers over HTTP(S), defensively.
//!
//! A patch server is outside input: it may be slow on purpose (slow-loris), huge, redirect in
//! circles, or point us at another host. So every request has one overall deadline (connect,
//! headers and body together, so a server trickling one byte a second still times out), every
//! body a byte limit checked against `Content-Length` first and enforced while reading, and
//! redirects are followed here, by hand, so each hop's host is checked against the
//! allow-list (the feed's own host plus `allowed_hosts`) before it is contacted.

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
}

/// An HTTP client bound to a [`FetchPolicy`].
pub struct Fetcher {
    agent: ureq::Agent,
    policy: FetchPolicy,
}

impl Fetcher {
    pub fn new(policy: FetchPolicy) -> Fetcher {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(policy.timeout))
            .max_redirects(0)
            .http_status_as_error(false)
            .user_agent(concat!("patchover-monitor/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Fetcher { agent, policy }
    }

    pub fn policy(&self) -> &FetchPolicy {
        &self.policy
    }

    /// Whether `url`'s host may be contacted when the fetch began at `origin_host`.
    pub fn host_allowed(&self, origin_host: &str, url: &HttpUrl) -> bool {
        let h = url.host();
        h == origin_host || self.policy.allowed_hosts.contains(&h)
    }

    /// GETs `url` (conditionally, with `validators`), following at most `max_redirects`
    /// redirects to allowed hosts, reading at most `max_bytes`. `origin_host` is the host the
    /// allow-list is relative to (the feed's own host).
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
            let timeout = || FetchError::Timeout {
                url: current.to_string(),
                secs: self.policy.timeout.as_secs(),
            };
            if remaining.is_zero() {
                return Err(timeout());
            }
            let mut req = self
                .agent
                .get(current.as_str())
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
            let map_err = |source: ureq::Error| match source {
                ureq::Error::Timeout(_) => timeout(),
                ureq::Error::BodyExceedsLimit(_) => FetchError::TooLarge {
                    url: current.to_string(),
                    max: max_bytes,
                },
                ureq::Error::Io(e) if e.kind() == std::io::ErrorKind::TimedOut => timeout(),
                source => FetchError::Http {
                    url: current.to_string(),
                    source: Box::new(source),
                },
            };
            let mut resp = req.call().map_err(map_err)?;
            let status = resp.status().as_u16();
            let header = |name: &str| {
                resp.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            match status {
                200 => {
                    if let Some(len) = resp.body().content_length()
                        && len > max_bytes
                    {
                        return Err(FetchError::TooLarge {
                            url: current.to_string(),
                            max: max_bytes,
                        });
                    }
                    let validators = Validators {
                        etag: header("etag"),
                        last_modified: header("last-modified"),
                    };
                    let bytes = resp
                        .body_mut()
                        .with_config()
                        .limit(max_bytes)
                        .read_to_vec()
                        .map_err(map_err)?;
                    return Ok(Fetched::Body {
                        bytes,
                        validators,
                        final_url: current.to_string(),
                    });
                }
                304 if validators.is_some() => return Ok(Fetched::NotModified),
                301 | 302 | 303 | 307 | 308 => {
                    hops += 1;
                    if hops > self.policy.max_redirects {
                        return Err(FetchError::TooManyRedirects {
                            url: url.to_string(),
                            max: self.policy.max_redirects,
                        });
                    }
                    let Some(loc) = header("location") else {
                        return Err(FetchError::BadRedirect {
                            url: current.to_string(),
                            source: None,
                        });
                    };
                    let next = current
                        .join(&loc)
                        .map_err(|source| FetchError::BadRedirect {
                            url: current.to_string(),
                            source: Some(source),
                        })?;
                    tracing::debug!(from = %current, to = %next, "following redirect");
                    current = next;
                }
                _ => {
                    return Err(FetchError::Status {
                        url: current.to_string(),
                        status,
                    });
                }
            }
        }
    }
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
}
