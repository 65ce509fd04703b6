//! Polling one feed (seed fig. 19, 1801–1803): ask what is new since the last look, download
//! and verify the new bundles, register them in the patch table.
//!
//! What is trusted and when:
//! 1. the index is fetched conditionally (`If-None-Match` / `If-Modified-Since` from the
//!    store), so an unchanged feed costs one small request;
//! 2. its signature is checked with the feed's keys before it is parsed; then its signed times:
//!    an index generated before the newest one already accepted from the feed is refused
//!    (rollback), and so is one past its `expires` (freeze), even when the server answers
//!    `304` for it; the newest accepted time is kept in the store, so this holds across
//!    restarts;
//! 3. each new bundle is fetched from an allowed host only, read up to exactly the size the
//!    signed index gives, its SHA-256 compared with the index's, then its own signature
//!    checked and its archive validated by the bundle crate (`verify_bundle`), and its
//!    manifest must agree with the index (id, category, severity);
//! 4. only then is it moved under its final name and registered, once (the patch table
//!    refuses an id twice, and ids already there are never fetched again).
//!
//! A failed poll backs off exponentially with jitter (the state is in the store, so a
//! restarted monitor keeps backing off); validators are saved only when every new entry was
//! dealt with, so a bundle that failed to download is retried at the next poll.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use patchover_bundle::keys::{TrustedKeys, signature_path};
use patchover_bundle::{Limits, Sha256, verify_bundle};
use patchover_store::{FeedStateRow, NewPatch, Store};
use serde::Serialize;

use crate::config::FeedConfig;
use crate::fetch::{Fetched, Fetcher, HttpUrl, Validators};
use crate::index::{FeedIndex, IndexEntry, IndexTimes, StaleIndex, now_unix, verify_index};

/// Largest `.minisig` fetched.
const MAX_SIGNATURE_BYTES: u64 = 16 * 1024;

/// Why a feed or a bundle was not taken.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("feed {feed}: bad url")]
    Url {
        feed: String,
        #[source]
        source: crate::fetch::UrlError,
    },
    #[error("feed {feed}: cannot fetch")]
    Fetch {
        feed: String,
        #[source]
        source: crate::fetch::FetchError,
    },
    #[error("feed {feed}: index rejected")]
    Index {
        feed: String,
        #[source]
        source: crate::index::IndexError,
    },
    #[error("feed {feed}: index refused")]
    Stale {
        feed: String,
        #[source]
        source: StaleIndex,
    },
    #[error("bundle {id}: size {got} differs from the index's {want}")]
    Size { id: String, got: u64, want: u64 },
    #[error("bundle {id}: {size} bytes is over the bundle size limit of {max}")]
    TooLarge { id: String, size: u64, max: u64 },
    #[error("bundle {id}: SHA-256 {got} differs from the index's {want}")]
    Hash {
        id: String,
        got: Sha256,
        want: Sha256,
    },
    #[error("bundle {id}: the manifest says {field} {got}, the index {want}")]
    Mismatch {
        id: String,
        field: &'static str,
        got: String,
        want: String,
    },
    #[error("bundle {id}: does not verify")]
    Verify {
        id: String,
        #[source]
        source: Box<patchover_bundle::VerifyError>,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("patch table")]
    Store(#[source] patchover_store::StoreError),
}

impl PollError {
    /// A short reason for reports and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            PollError::Url { .. } => "bad-url",
            PollError::Fetch { source, .. } => source.reason(),
            PollError::Index { source, .. } => match source {
                crate::index::IndexError::Signature(_)
                | crate::index::IndexError::SignatureFile(_) => "bad-signature",
                _ => "bad-index",
            },
            PollError::Stale { source, .. } => match source {
                StaleIndex::Rollback { .. } => "rollback",
                StaleIndex::Expired { .. } => "expired",
            },
            PollError::Size { .. } => "size-mismatch",
            PollError::TooLarge { .. } => "too-large",
            PollError::Hash { .. } => "hash-mismatch",
            PollError::Mismatch { .. } => "manifest-mismatch",
            PollError::Verify { .. } => "bad-bundle",
            PollError::Write { .. } => "write-failed",
            PollError::Store(_) => "store",
        }
    }
}

/// The error and its causes on one line, for reports and the store.
pub use patchover_core::error_chain as chain;

/// A bundle registered by this poll.
#[derive(Debug, Clone, Serialize)]
pub struct Registered {
    pub id: String,
    pub title: String,
    pub category: patchover_core::Category,
    pub severity: String,
    pub published: String,
    pub file: PathBuf,
}

/// A bundle or feed not taken, with the reason.
#[derive(Debug, Clone, Serialize)]
pub struct Rejection {
    /// The bundle id, or the feed name for a whole-feed failure.
    pub what: String,
    pub reason: &'static str,
    pub detail: String,
}

/// What one poll of one feed did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FeedStatus {
    /// Still backing off after failures; not contacted.
    Backoff,
    NotModified,
    Fetched,
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct FeedOutcome {
    pub feed: String,
    pub status: FeedStatus,
    pub listed: usize,
    pub registered: Vec<Registered>,
    pub rejected: Vec<Rejection>,
    pub next_attempt_ms: i64,
}

impl FeedOutcome {
    /// A feed (or one LC of an apt feed) not polled yet: backing off until `next_attempt_ms`
    /// unless the poll goes on and says otherwise.
    pub(crate) fn backing_off(feed: String, next_attempt_ms: i64) -> FeedOutcome {
        FeedOutcome {
            feed,
            status: FeedStatus::Backoff,
            listed: 0,
            registered: Vec::new(),
            rejected: Vec::new(),
            next_attempt_ms,
        }
    }

    /// Not polled because of `what` (nothing contacted, no backoff): one rejection says why.
    pub(crate) fn refused(
        feed: String,
        what: String,
        reason: &'static str,
        detail: String,
    ) -> FeedOutcome {
        FeedOutcome {
            feed,
            status: FeedStatus::Failed,
            listed: 0,
            registered: Vec::new(),
            rejected: vec![Rejection {
                what,
                reason,
                detail,
            }],
            next_attempt_ms: 0,
        }
    }
}

/// Everything one poll needs besides the store.
pub struct PollContext<'a> {
    pub fetcher: &'a Fetcher,
    /// Keys that sign the feed's index.
    pub index_keys: &'a TrustedKeys,
    /// Keys that sign bundles.
    pub bundle_keys: &'a TrustedKeys,
    pub limits: &'a Limits,
    pub max_index_bytes: u64,
    /// Where verified bundles are kept (`<state_dir>/bundles`).
    pub bundles_dir: &'a Path,
    pub interval: Duration,
    pub backoff_max: Duration,
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The delay before the next attempt after `failures` failures in a row: `interval · 2^n`,
/// capped at `max`, times a random factor in [0.5, 1) so many hosts do not retry in step.
pub fn backoff_delay(interval: Duration, max: Duration, failures: u32, jitter: f64) -> Duration {
    let exp = 2f64.powi(failures.min(30) as i32);
    let base = (interval.as_secs_f64() * exp).min(max.as_secs_f64());
    Duration::from_secs_f64(base * (0.5 + 0.5 * jitter.clamp(0.0, 1.0)))
}

fn jitter() -> f64 {
    let mut b = [0u8; 8];
    if crate::approval::random_bytes(&mut b).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// A failed poll of `state`'s feed (`reason`, `detail`): one more failure in a row, the
/// next attempt after the backoff (`interval`, `max`), reported in `out`. The one backoff of
/// every feed kind.
pub(crate) fn failed(
    state: &mut FeedStateRow,
    out: &mut FeedOutcome,
    now: i64,
    (interval, max): (Duration, Duration),
    reason: &'static str,
    detail: String,
) {
    state.failures += 1;
    let delay = backoff_delay(interval, max, state.failures as u32, jitter());
    state.next_attempt_ms = now + delay.as_millis() as i64;
    tracing::warn!(feed = %state.feed, reason, error = %detail, retry_in_s = delay.as_secs(), "feed poll failed");
    out.status = FeedStatus::Failed;
    out.rejected.push(Rejection {
        what: out.feed.clone(),
        reason,
        detail: detail.clone(),
    });
    state.last_error = Some(detail);
    out.next_attempt_ms = state.next_attempt_ms;
}

/// Polls `feed` once.
pub fn poll_feed(store: &mut Store, feed: &FeedConfig, cx: &PollContext<'_>) -> FeedOutcome {
    let now = now_ms();
    let mut state = match store.feed_state(&feed.name) {
        Ok(Some(s)) => s,
        Ok(None) => FeedStateRow::default(),
        Err(e) => {
            tracing::error!(feed = %feed.name, error = %chain(&e), "cannot read feed state");
            FeedStateRow::default()
        }
    };
    if state.url != feed.url {
        // A new URL: its validators mean nothing. The newest index accepted stays: the feed
        // (its name, its keys) is the same, and a new URL must not open a way back.
        state = FeedStateRow {
            feed: feed.name.clone(),
            url: feed.url.clone(),
            index_generated_s: state.index_generated_s,
            index_expires_s: state.index_expires_s,
            ..FeedStateRow::default()
        };
    }
    let mut out = FeedOutcome::backing_off(feed.name.clone(), state.next_attempt_ms);
    if now < state.next_attempt_ms {
        tracing::info!(feed = %feed.name, until_ms = state.next_attempt_ms, "feed backing off after failures; not polled");
        return out;
    }
    state.last_checked_ms = Some(now);
    match poll_inner(store, feed, cx, &state, &mut out) {
        Ok(Accepted { validators, times }) => {
            state.failures = 0;
            state.next_attempt_ms = 0;
            state.last_ok_ms = Some(now);
            state.last_error = None;
            if let Some(v) = validators {
                state.etag = v.etag;
                state.last_modified = v.last_modified;
            }
            if let Some(t) = times {
                state.index_generated_s = Some(t.generated);
                state.index_expires_s = t.expires;
            }
        }
        Err(e) => {
            let backoff = (cx.interval, cx.backoff_max);
            failed(&mut state, &mut out, now, backoff, e.reason(), chain(&e));
        }
    }
    out.next_attempt_ms = state.next_attempt_ms;
    if let Err(e) = store.save_feed_state(&state) {
        tracing::error!(feed = %feed.name, error = %chain(&e), "cannot save feed state");
    }
    out
}

/// What a good poll leaves for the feed's state.
struct Accepted {
    /// The validators to keep (None: keep the old ones).
    validators: Option<Validators>,
    /// The times of the index accepted (None: not modified).
    times: Option<IndexTimes>,
}

/// A genuine, fresh index: its bytes parsed, its times, its validators and the URL it came
/// from after redirects.
struct FreshIndex {
    index: FeedIndex,
    times: IndexTimes,
    validators: Validators,
    final_url: HttpUrl,
}

/// Fetches, verifies and checks the times of the feed's index; `None` when not modified (and
/// the index already accepted has not expired since).
fn fetch_index(
    feed: &FeedConfig,
    cx: &PollContext<'_>,
    state: &FeedStateRow,
    url: &HttpUrl,
) -> Result<Option<FreshIndex>, PollError> {
    let origin = url.host();
    let fetch_err = |source| PollError::Fetch {
        feed: feed.name.clone(),
        source,
    };
    let stale = |source| PollError::Stale {
        feed: feed.name.clone(),
        source,
    };
    let old = Validators {
        etag: state.etag.clone(),
        last_modified: state.last_modified.clone(),
    };
    let conditional = (old.etag.is_some() || old.last_modified.is_some()).then_some(&old);
    let (bytes, validators, final_url) = match cx
        .fetcher
        .get(url, &origin, conditional, cx.max_index_bytes)
        .map_err(fetch_err)?
    {
        Fetched::NotModified => {
            // The index accepted before is still the feed's: it must not have expired.
            if let Some(generated) = state.index_generated_s {
                let kept = IndexTimes {
                    generated,
                    expires: state.index_expires_s,
                };
                kept.check_fresh(None, now_unix()).map_err(stale)?;
            }
            return Ok(None);
        }
        Fetched::Body {
            bytes,
            validators,
            final_url,
        } => (bytes, validators, final_url),
    };
    let final_url = HttpUrl::parse(&final_url).map_err(|source| PollError::Url {
        feed: feed.name.clone(),
        source,
    })?;
    let sig = match cx
        .fetcher
        .get(
            &url.with_suffix(".minisig"),
            &origin,
            None,
            MAX_SIGNATURE_BYTES,
        )
        .map_err(fetch_err)?
    {
        Fetched::Body { bytes, .. } => String::from_utf8_lossy(&bytes).into_owned(),
        Fetched::NotModified => String::new(),
    };
    let index_err = |source| PollError::Index {
        feed: feed.name.clone(),
        source,
    };
    let index = verify_index(&bytes, &sig, cx.index_keys).map_err(index_err)?;
    let times = index.times().map_err(index_err)?;
    times
        .check_fresh(state.index_generated_s, now_unix())
        .map_err(stale)?;
    Ok(Some(FreshIndex {
        index,
        times,
        validators,
        final_url,
    }))
}

fn poll_inner(
    store: &mut Store,
    feed: &FeedConfig,
    cx: &PollContext<'_>,
    state: &FeedStateRow,
    out: &mut FeedOutcome,
) -> Result<Accepted, PollError> {
    let url = HttpUrl::parse(&feed.url).map_err(|source| PollError::Url {
        feed: feed.name.clone(),
        source,
    })?;
    let Some(fresh) = fetch_index(feed, cx, state, &url)? else {
        tracing::debug!(feed = %feed.name, "feed not modified");
        out.status = FeedStatus::NotModified;
        return Ok(Accepted {
            validators: None,
            times: None,
        });
    };
    out.status = FeedStatus::Fetched;
    out.listed = fresh.index.bundles.len();
    let known: HashSet<String> = store
        .patch_ids()
        .map_err(PollError::Store)?
        .into_iter()
        .collect();
    let mut all_done = true;
    for entry in fresh.index.new_entries(&known) {
        match fetch_bundle(store, entry, &fresh.final_url, &url.host(), cx) {
            Ok(r) => {
                tracing::info!(feed = %feed.name, bundle = %r.id, category = %r.category, severity = %r.severity, "new patch registered");
                out.registered.push(r);
            }
            Err(e) => {
                all_done = false;
                let detail = chain(&e);
                tracing::warn!(feed = %feed.name, bundle = %entry.id, reason = e.reason(), error = %detail, "bundle rejected");
                out.rejected.push(Rejection {
                    what: entry.id.to_string(),
                    reason: e.reason(),
                    detail,
                });
            }
        }
    }
    Ok(Accepted {
        validators: all_done.then_some(fresh.validators),
        times: Some(fresh.times),
    })
}

/// Cleans up a partly written incoming bundle on every early return.
struct Incoming(Vec<PathBuf>);

impl Drop for Incoming {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), PollError> {
    use std::io::Write;
    let w = |source| PollError::Write {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::File::create(path).map_err(w)?;
    f.write_all(bytes).map_err(w)?;
    f.sync_all().map_err(w)
}

fn fetch_bundle(
    store: &mut Store,
    entry: &IndexEntry,
    index_url: &HttpUrl,
    origin: &str,
    cx: &PollContext<'_>,
) -> Result<Registered, PollError> {
    let id = entry.id.to_string();
    if entry.size > cx.limits.max_bundle_bytes {
        return Err(PollError::TooLarge {
            id,
            size: entry.size,
            max: cx.limits.max_bundle_bytes,
        });
    }
    let feed = || id.clone();
    let url = index_url
        .join(&entry.url)
        .map_err(|source| PollError::Url {
            feed: feed(),
            source,
        })?;
    let fetch_err = |source| PollError::Fetch {
        feed: feed(),
        source,
    };
    let Fetched::Body { bytes, .. } = cx
        .fetcher
        .get(&url, origin, None, entry.size)
        .map_err(fetch_err)?
    else {
        unreachable!("an unconditional GET is never 304");
    };
    if bytes.len() as u64 != entry.size {
        return Err(PollError::Size {
            id,
            got: bytes.len() as u64,
            want: entry.size,
        });
    }
    let got = Sha256::of(&bytes);
    if got != entry.sha256 {
        return Err(PollError::Hash {
            id,
            got,
            want: entry.sha256,
        });
    }
    let Fetched::Body { bytes: sig, .. } = cx
        .fetcher
        .get(
            &url.with_suffix(".minisig"),
            origin,
            None,
            MAX_SIGNATURE_BYTES,
        )
        .map_err(fetch_err)?
    else {
        unreachable!("an unconditional GET is never 304");
    };
    std::fs::create_dir_all(cx.bundles_dir).map_err(|source| PollError::Write {
        path: cx.bundles_dir.to_owned(),
        source,
    })?;
    let tmp = cx
        .bundles_dir
        .join(format!(".incoming-{id}-{}.tar.zst", std::process::id()));
    let tmp_sig = signature_path(&tmp);
    let guard = Incoming(vec![tmp.clone(), tmp_sig.clone()]);
    write(&tmp, &bytes)?;
    write(&tmp_sig, &sig)?;
    let v = verify_bundle(&tmp, cx.bundle_keys, cx.limits).map_err(|source| PollError::Verify {
        id: id.clone(),
        source: Box::new(source),
    })?;
    let m = v.manifest();
    let mismatch = |field, got: String, want: String| PollError::Mismatch {
        id: id.clone(),
        field,
        got,
        want,
    };
    if m.id != entry.id {
        return Err(mismatch("id", m.id.to_string(), entry.id.to_string()));
    }
    if m.category != entry.category {
        return Err(mismatch(
            "category",
            m.category.to_string(),
            entry.category.to_string(),
        ));
    }
    if m.severity != entry.severity {
        return Err(mismatch(
            "severity",
            m.severity.to_string(),
            entry.severity.to_string(),
        ));
    }
    let file = cx.bundles_dir.join(format!("{id}.tar.zst"));
    let rename = |from: &Path, to: &Path| {
        std::fs::rename(from, to).map_err(|source| PollError::Write {
            path: to.to_owned(),
            source,
        })
    };
    rename(&tmp_sig, &signature_path(&file))?;
    rename(&tmp, &file)?;
    drop(guard);
    register(store, &v, file)
}

/// Registers a verified bundle kept at `file` in the patch table (1803).
pub(crate) fn register(
    store: &mut Store,
    v: &patchover_bundle::VerifiedBundle,
    file: PathBuf,
) -> Result<Registered, PollError> {
    let m = v.manifest();
    let id = m.id.to_string();
    let severity = m.severity.to_string();
    let sha = v.sha256().to_string();
    let file_s = file.display().to_string();
    store
        .register_patch(&NewPatch {
            id: &id,
            title: &m.title,
            category: m.category,
            severity: &severity,
            published: &m.published.rfc3339,
            sha256: &sha,
            file: &file_s,
        })
        .map_err(PollError::Store)?;
    Ok(Registered {
        id,
        title: m.title.clone(),
        category: m.category,
        severity,
        published: m.published.rfc3339.clone(),
        file,
    })
}

/// Parses the index and diffs it with the patch table's ids: the work of one poll minus the
/// network (for the benchmark). Returns (entries, new entries).
pub fn diff_index(
    bytes: &[u8],
    signature: &str,
    keys: &TrustedKeys,
    store: &Store,
) -> Result<(usize, usize), PollError> {
    let index: FeedIndex =
        verify_index(bytes, signature, keys).map_err(|source| PollError::Index {
            feed: "bench".to_owned(),
            source,
        })?;
    let known: HashSet<String> = store
        .patch_ids()
        .map_err(PollError::Store)?
        .into_iter()
        .collect();
    Ok((index.bundles.len(), index.new_entries(&known).len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let i = Duration::from_secs(60);
        let max = Duration::from_secs(3600);
        assert_eq!(backoff_delay(i, max, 1, 1.0), Duration::from_secs(120));
        assert_eq!(backoff_delay(i, max, 1, 0.0), Duration::from_secs(60));
        assert_eq!(backoff_delay(i, max, 3, 1.0), Duration::from_secs(480));
        assert_eq!(backoff_delay(i, max, 20, 1.0), max);
        let j = jitter();
        assert!((0.0..1.0).contains(&j));
    }
}
