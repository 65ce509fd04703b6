//! The feed index: what a patch server publishes (seed fig. 19, 1801–1802).
//!
//! A feed is a directory on any static web server holding `index.json`, its minisign
//! signature `index.json.minisig`, and the bundles with their own `.minisig` files. The index
//! lists each bundle's id, title, category, severity, publication time, URL (relative to the
//! index, or absolute), size and SHA-256. The index is signed as a whole, so the monitor can
//! trust sizes and digests before it downloads anything, and the bundles are signed on their
//! own, so a bundle keeps its authenticity once it leaves the feed.
//!
//! The reader is strict (unknown fields are errors, ids and digests validated, entry count
//! bounded) because the index is outside input; it is fuzzed (`fuzz/fuzz_targets/feed_index.rs`).
//!
//! A valid signature only says the publisher wrote the index once: a server (or anyone in
//! between) could keep serving an old one, hiding newer patches. Two signed times stop that
//! (issue 22): `generated`, which must never go back for a feed ([`IndexTimes::check_fresh`]
//! against the newest one accepted, kept in the store), and, from format 2, `expires`, after
//! which the index is refused (a feed frozen at an old index stops being believed). An index
//! without `expires` (format 1, or `feed publish` without `--expires`) never expires; it is
//! still protected against rollback.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use patchover_bundle::keys::{SignatureFile, SigningKey, TrustedKeys, signature_path};
use patchover_bundle::manifest::Published;
use patchover_bundle::{BundleId, Limits, Severity, Sha256, verify_bundle};
use patchover_core::Category;
use serde::{Deserialize, Serialize};

/// The newest index format this build reads and writes: format 1 plus a signed `expires`.
pub const INDEX_FORMAT: u32 = 2;
/// Format 1: no `expires`. Still read, and still written by `feed publish` without
/// `--expires`, so monitors that only know format 1 keep reading such feeds.
pub const INDEX_FORMAT_NO_EXPIRY: u32 = 1;
/// The file name `feed publish` writes.
pub const INDEX_NAME: &str = "index.json";
/// The most entries an index may list.
pub const MAX_ENTRIES: usize = 100_000;

/// An index that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error(
        "the feed index is not valid JSON of format {INDEX_FORMAT_NO_EXPIRY} or {INDEX_FORMAT}"
    )]
    Json(#[source] serde_json::Error),
    #[error(
        "the feed index has format {0}; this patchover reads formats {INDEX_FORMAT_NO_EXPIRY} and {INDEX_FORMAT}"
    )]
    Format(u32),
    #[error("the feed index's {field}: {message}")]
    Time {
        field: &'static str,
        message: String,
    },
    #[error("the feed index has format {0}: format 1 has no `expires`, format 2 must have one")]
    Expiry(u32),
    #[error("the feed index lists {0} bundles, more than {MAX_ENTRIES}")]
    TooMany(usize),
    #[error("the feed index entry {index}: {message}")]
    Entry { index: usize, message: String },
    #[error("the feed index lists bundle {0} twice")]
    Duplicate(String),
    #[error("the feed index signature is unreadable")]
    SignatureFile(#[source] patchover_bundle::KeyError),
    #[error("the feed index signature is not from a trusted key")]
    Signature(#[source] patchover_bundle::SignatureError),
}

/// One bundle as the index lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexEntry {
    pub id: BundleId,
    pub title: String,
    pub category: Category,
    pub severity: Severity,
    /// RFC 3339 with an offset.
    pub published: String,
    /// Relative to the index's URL, or absolute.
    pub url: String,
    pub size: u64,
    pub sha256: Sha256,
}

/// A parsed, validated index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedIndex {
    pub format: u32,
    /// When the index was written (RFC 3339); never goes back for a feed.
    pub generated: String,
    /// Format 2: after this time (RFC 3339) the index is refused. Format 1 has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    pub bundles: Vec<IndexEntry>,
}

/// The signed times of an index, in unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexTimes {
    pub generated: i64,
    pub expires: Option<i64>,
}

/// A genuine index that is not taken because of its times; nothing from it is used.
#[derive(Debug, thiserror::Error)]
pub enum StaleIndex {
    #[error(
        "the index offered was generated at {offered}, before {seen}, when the newest index already accepted from this feed was generated: an old index served again (rollback)? If the publisher really went back, it must publish again (`patchover feed publish` makes a newer index); if the feed now has another publisher, give the feed a new name in [[monitor.feeds]]"
    )]
    Rollback { offered: String, seen: String },
    #[error(
        "the index (generated at {generated}) expired at {expires}; it is now {now}: the feed is stale or held back (freeze). The publisher must publish again, with an expiry (`feed publish --expires`) longer than the time between its publications"
    )]
    Expired {
        generated: String,
        expires: String,
        now: String,
    },
}

impl IndexTimes {
    /// Refuses an index generated before `seen_generated` (the newest accepted from the same
    /// feed: rollback) or expired at `now` (freeze). An index as old as the newest seen is
    /// taken: it is that index again, or one published within the same second.
    pub fn check_fresh(&self, seen_generated: Option<i64>, now: i64) -> Result<(), StaleIndex> {
        if let Some(seen) = seen_generated
            && self.generated < seen
        {
            return Err(StaleIndex::Rollback {
                offered: rfc3339(self.generated),
                seen: rfc3339(seen),
            });
        }
        if let Some(expires) = self.expires
            && now >= expires
        {
            return Err(StaleIndex::Expired {
                generated: rfc3339(self.generated),
                expires: rfc3339(expires),
                now: rfc3339(now),
            });
        }
        Ok(())
    }
}

impl FeedIndex {
    /// Parses and validates an index (without its signature: see [`verify_index`]).
    pub fn parse(bytes: &[u8]) -> Result<FeedIndex, IndexError> {
        let idx: FeedIndex = serde_json::from_slice(bytes).map_err(IndexError::Json)?;
        if !matches!(idx.format, INDEX_FORMAT_NO_EXPIRY | INDEX_FORMAT) {
            return Err(IndexError::Format(idx.format));
        }
        idx.times()?;
        if idx.bundles.len() > MAX_ENTRIES {
            return Err(IndexError::TooMany(idx.bundles.len()));
        }
        let mut seen = HashSet::with_capacity(idx.bundles.len());
        for (index, e) in idx.bundles.iter().enumerate() {
            let bad = |message: String| IndexError::Entry { index, message };
            if !seen.insert(e.id.as_str()) {
                return Err(IndexError::Duplicate(e.id.to_string()));
            }
            if e.title.len() > 512 || e.title.chars().any(char::is_control) {
                return Err(bad(format!(
                    "{}: the title must be at most 512 bytes without control characters",
                    e.id
                )));
            }
            Published::from_str(&e.published).map_err(|m| bad(format!("{}: {m}", e.id)))?;
            if e.url.is_empty() || e.url.len() > 2048 || e.url.chars().any(char::is_control) {
                return Err(bad(format!(
                    "{}: the url is empty, too long or not text",
                    e.id
                )));
            }
            if e.size == 0 {
                return Err(bad(format!("{}: size 0", e.id)));
            }
        }
        Ok(idx)
    }

    /// The signed times, checked: RFC 3339, `expires` exactly in format 2 and after
    /// `generated`.
    pub fn times(&self) -> Result<IndexTimes, IndexError> {
        let time = |field, s: &str| {
            Published::from_str(s)
                .map(|p| p.unix)
                .map_err(|message| IndexError::Time { field, message })
        };
        let generated = time("generated", &self.generated)?;
        let expires = match (self.format, &self.expires) {
            (INDEX_FORMAT_NO_EXPIRY, None) => None,
            (INDEX_FORMAT, Some(e)) => Some(time("expires", e)?),
            (format, _) => return Err(IndexError::Expiry(format)),
        };
        if let Some(e) = expires
            && e <= generated
        {
            return Err(IndexError::Time {
                field: "expires",
                message: format!("{} is not after generated {}", rfc3339(e), self.generated),
            });
        }
        Ok(IndexTimes { generated, expires })
    }

    /// Entries whose id is not in `known` (the patch table): what is new (fig. 19, 1802).
    pub fn new_entries<'a>(&'a self, known: &HashSet<String>) -> Vec<&'a IndexEntry> {
        self.bundles
            .iter()
            .filter(|e| !known.contains(e.id.as_str()))
            .collect()
    }
}

/// Checks the index bytes against their signature text with the feed's trusted keys, then
/// parses them. The signature is checked first, so an unsigned index is never parsed.
pub fn verify_index(
    bytes: &[u8],
    signature: &str,
    keys: &TrustedKeys,
) -> Result<FeedIndex, IndexError> {
    let sig =
        SignatureFile::parse(signature, "index.json.minisig").map_err(IndexError::SignatureFile)?;
    keys.verify(bytes, &sig).map_err(IndexError::Signature)?;
    FeedIndex::parse(bytes)
}

/// `feed publish` could not write the index.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot read the bundle directory {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} does not verify: sign it with `patchover bundle sign` first")]
    Bundle {
        path: PathBuf,
        #[source]
        source: Box<patchover_bundle::VerifyError>,
    },
    #[error("bundle id {id} is in both {first} and {second}")]
    Duplicate {
        id: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error(
        "the expiry {expires} is not after the publication time {generated}: give a later time or a duration such as 7d"
    )]
    ExpiresTooEarly { expires: String, generated: String },
    #[error("cannot sign the index")]
    Sign(#[source] patchover_bundle::KeyError),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// When a published index expires (`feed publish --expires`): a time, or a duration after
/// its publication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Unix seconds.
    At(i64),
    After(std::time::Duration),
}

/// An `--expires` value that is neither a duration nor a time.
#[derive(Debug, thiserror::Error)]
#[error(
    "--expires {0:?}: write a duration (90m, 12h, 7d, 2w) or an RFC 3339 time (2027-01-31T00:00:00Z)"
)]
pub struct ExpiryError(String);

impl Expiry {
    /// The expiry of an index published at `generated` (unix seconds).
    pub fn at(&self, generated: i64) -> i64 {
        match self {
            Expiry::At(t) => *t,
            Expiry::After(d) => generated.saturating_add(d.as_secs() as i64),
        }
    }
}

impl FromStr for Expiry {
    type Err = ExpiryError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(p) = Published::from_str(s) {
            return Ok(Expiry::At(p.unix));
        }
        let bad = || ExpiryError(s.chars().take(80).collect());
        let split = s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let n: u64 = s[..split].parse().map_err(|_| bad())?;
        let unit = match &s[split..] {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            "w" => 7 * 86_400,
            _ => return Err(bad()),
        };
        match n.checked_mul(unit) {
            Some(secs) if secs > 0 && secs <= 100 * 366 * 86_400 => {
                Ok(Expiry::After(std::time::Duration::from_secs(secs)))
            }
            _ => Err(bad()),
        }
    }
}

/// What `feed publish` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct PublishedFeed {
    pub index: PathBuf,
    pub signature: PathBuf,
    pub bundles: usize,
    pub key_id: String,
    pub generated: String,
    /// When the index expires (RFC 3339); `None`: never (format 1).
    pub expires: Option<String>,
}

/// The RFC 3339 UTC time of `unix` seconds (clamped to the years -9999 to 9999).
pub fn rfc3339(unix: i64) -> String {
    let clamped = unix.clamp(
        jiff::Timestamp::MIN.as_second(),
        jiff::Timestamp::MAX.as_second(),
    );
    jiff::Timestamp::from_second(clamped)
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let r = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Every signed bundle in `dir` as an index entry (verified with `bundle_keys`), oldest first.
fn signed_bundles(
    dir: &Path,
    bundle_keys: &TrustedKeys,
    limits: &Limits,
) -> Result<Vec<IndexEntry>, PublishError> {
    let rd = std::fs::read_dir(dir).map_err(|source| PublishError::ReadDir {
        path: dir.to_owned(),
        source,
    })?;
    let mut files = BTreeSet::new();
    for e in rd {
        let e = e.map_err(|source| PublishError::ReadDir {
            path: dir.to_owned(),
            source,
        })?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tar.zst") && !name.starts_with('.') && e.path().is_file() {
            files.insert(e.path());
        }
    }
    let mut bundles: Vec<IndexEntry> = Vec::new();
    let mut from: Vec<PathBuf> = Vec::new();
    for path in files {
        let v =
            verify_bundle(&path, bundle_keys, limits).map_err(|source| PublishError::Bundle {
                path: path.clone(),
                source: Box::new(source),
            })?;
        if let Some(i) = bundles.iter().position(|b| b.id.as_str() == v.id()) {
            return Err(PublishError::Duplicate {
                id: v.id().to_owned(),
                first: from[i].clone(),
                second: path,
            });
        }
        let m = v.manifest();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        bundles.push(IndexEntry {
            id: m.id.clone(),
            title: m.title.clone(),
            category: m.category,
            severity: m.severity,
            published: m.published.rfc3339.clone(),
            url: name,
            size: v.size(),
            sha256: v.sha256(),
        });
        from.push(path);
    }
    bundles.sort_by(|a, b| a.published.cmp(&b.published).then(a.id.cmp(&b.id)));
    Ok(bundles)
}

/// Writes `<dir>/index.json` and `<dir>/index.json.minisig` listing every signed bundle
/// (`*.tar.zst` with a `.minisig`) in `dir`. Each bundle is verified with `bundle_keys`
/// first, so a feed never lists a bundle its subscribers would reject. The signature file is
/// written before the index, so a client never sees a new index with an old signature for
/// long (and rejects it if it does: it retries at the next poll). With `expires` the index is
/// format 2 and carries its signed expiry; without, format 1 (never expires).
pub fn publish(
    dir: &Path,
    key: &SigningKey,
    bundle_keys: &TrustedKeys,
    limits: &Limits,
    expires: Option<Expiry>,
) -> Result<PublishedFeed, PublishError> {
    let now = now_unix();
    let expires = expires.map(|e| e.at(now));
    if let Some(e) = expires
        && e <= now
    {
        return Err(PublishError::ExpiresTooEarly {
            expires: rfc3339(e),
            generated: rfc3339(now),
        });
    }
    let bundles = signed_bundles(dir, bundle_keys, limits)?;
    let index = FeedIndex {
        format: if expires.is_some() {
            INDEX_FORMAT
        } else {
            INDEX_FORMAT_NO_EXPIRY
        },
        generated: rfc3339(now),
        expires: expires.map(rfc3339),
        bundles,
    };
    let mut bytes = serde_json::to_vec_pretty(&index).unwrap_or_default();
    bytes.push(b'\n');
    let comment = format!(
        "timestamp:{now}\tfile:{INDEX_NAME}\tsha256:{}",
        Sha256::of(&bytes)
    );
    let sig = key.sign(&bytes, &comment).map_err(PublishError::Sign)?;
    let index_path = dir.join(INDEX_NAME);
    let sig_path = signature_path(&index_path);
    for (p, b) in [(&sig_path, sig.as_bytes()), (&index_path, &bytes[..])] {
        write_atomic(p, b).map_err(|source| PublishError::Write {
            path: p.clone(),
            source,
        })?;
    }
    tracing::info!(dir = %dir.display(), bundles = index.bundles.len(), "feed index published");
    Ok(PublishedFeed {
        index: index_path,
        signature: sig_path,
        bundles: index.bundles.len(),
        key_id: key.id().to_string(),
        generated: index.generated,
        expires: index.expires,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn entry(i: usize) -> String {
        format!(
            r#"{{"id":"p{i}","title":"patch {i}","category":"security","severity":"high","published":"2026-11-20T10:00:00Z","url":"p{i}.tar.zst","size":100,"sha256":"{}"}}"#,
            "ab".repeat(32)
        )
    }

    #[test]
    fn parses_and_diffs() {
        let text = format!(
            r#"{{"format":1,"generated":"2026-11-20T10:00:00Z","bundles":[{},{}]}}"#,
            entry(1),
            entry(2)
        );
        let idx = FeedIndex::parse(text.as_bytes()).unwrap();
        assert_eq!(idx.bundles.len(), 2);
        let known: HashSet<String> = ["p1".to_owned()].into();
        let new = idx.new_entries(&known);
        assert_eq!(new.len(), 1);
        assert_eq!(new[0].id.as_str(), "p2");
    }

    #[test]
    fn rejects_bad_indexes() {
        let wrap = |b: &str| format!(r#"{{"format":1,"generated":"x","bundles":[{b}]}}"#);
        let e = entry(1);
        for bad in [
            wrap(&format!("{e},{e}")),
            wrap(&e.replace("\"p1\"", "\"../p1\"")),
            wrap(&e.replace("security", "urgent")),
            wrap(&e.replace("2026-11-20T10:00:00Z", "yesterday")),
            wrap(&e.replace("\"size\":100", "\"size\":0")),
            wrap(&e.replace("abab", "zz")),
            wrap(&e.replace("\"size\"", "\"extra\":1,\"size\"")),
            wrap(&e).replace("\"format\":1", "\"format\":2"),
            "[]".to_owned(),
            String::new(),
        ] {
            assert!(FeedIndex::parse(bad.as_bytes()).is_err(), "accepted {bad}");
        }
    }

    #[test]
    fn format_2_carries_a_signed_expiry_and_format_1_none() {
        let doc = |format: u32, expires: &str| {
            format!(
                r#"{{"format":{format},"generated":"2026-11-20T10:00:00Z"{expires},"bundles":[{}]}}"#,
                entry(1)
            )
        };
        let v1 = FeedIndex::parse(doc(1, "").as_bytes()).unwrap();
        assert_eq!(
            v1.times().unwrap(),
            IndexTimes {
                generated: 1_795_168_800,
                expires: None
            }
        );
        let v2 =
            FeedIndex::parse(doc(2, r#","expires":"2026-11-27T10:00:00Z""#).as_bytes()).unwrap();
        assert_eq!(
            v2.times().unwrap().expires,
            Some(1_795_168_800 + 7 * 86_400)
        );
        // Round trip: format 1 is written without an `expires` key (older readers refuse it).
        assert!(!serde_json::to_string(&v1).unwrap().contains("expires"));
        for bad in [
            doc(1, r#","expires":"2026-11-27T10:00:00Z""#),
            doc(2, ""),
            doc(2, r#","expires":"next week""#),
            doc(2, r#","expires":"2026-11-20T10:00:00Z""#),
            doc(3, r#","expires":"2026-11-27T10:00:00Z""#),
            doc(1, "").replace("2026-11-20T10:00:00Z\",\"bundles", "today\",\"bundles"),
        ] {
            assert!(FeedIndex::parse(bad.as_bytes()).is_err(), "accepted {bad}");
        }
    }

    #[test]
    fn an_older_or_expired_index_is_stale() {
        let t = IndexTimes {
            generated: 1000,
            expires: Some(2000),
        };
        assert!(t.check_fresh(None, 1500).is_ok());
        assert!(
            t.check_fresh(Some(1000), 1500).is_ok(),
            "the same index again"
        );
        assert!(t.check_fresh(Some(999), 1999).is_ok());
        let e = t.check_fresh(Some(1001), 1500).unwrap_err();
        assert!(matches!(e, StaleIndex::Rollback { .. }), "{e}");
        assert!(e.to_string().contains("1970-01-01T00:16:40Z"), "{e}");
        let e = t.check_fresh(Some(1000), 2000).unwrap_err();
        assert!(matches!(e, StaleIndex::Expired { .. }), "{e}");
        let never = IndexTimes {
            generated: 1000,
            expires: None,
        };
        assert!(never.check_fresh(Some(1000), i64::MAX).is_ok());
    }

    #[test]
    fn expiry_is_a_duration_or_a_time() {
        assert_eq!("7d".parse::<Expiry>().unwrap().at(100), 100 + 7 * 86_400);
        assert_eq!("90m".parse::<Expiry>().unwrap().at(0), 5400);
        assert_eq!("2w".parse::<Expiry>().unwrap().at(0), 14 * 86_400);
        assert_eq!(
            "2026-11-20T10:00:00Z".parse::<Expiry>().unwrap(),
            Expiry::At(1_795_168_800)
        );
        for bad in [
            "",
            "7",
            "0d",
            "d",
            "7 days",
            "-1h",
            "99999999999999w",
            "tomorrow",
        ] {
            assert!(bad.parse::<Expiry>().is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn rfc3339_of_known_times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_794_996_000), "2026-11-18T10:00:00Z");
        let p: Published = rfc3339(1_794_996_000).parse().unwrap();
        assert_eq!(p.unix, 1_794_996_000);
    }
}
