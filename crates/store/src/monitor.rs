//! The patch monitor's state (issue 7, seed fig. 18–20): what each feed said last time (so
//! polls are conditional and survive restarts), the approval challenges (so a code is
//! single-use and expires even across restarts), and how far the approval mailbox was read.
//!
//! Using a challenge is one conditional `UPDATE`: two replies racing for the same challenge
//! cannot both win, whatever process reads them.

use rusqlite::{OptionalExtension, Row, params};
use serde::{Deserialize, Serialize};

use crate::{Store, StoreError, q};

/// What the monitor remembers about one feed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedStateRow {
    pub feed: String,
    pub url: String,
    /// The `ETag` of the last index fetched whole, sent back as `If-None-Match`.
    pub etag: Option<String>,
    /// The `Last-Modified` of the last index fetched whole, sent back as `If-Modified-Since`.
    pub last_modified: Option<String>,
    pub last_checked_ms: Option<i64>,
    pub last_ok_ms: Option<i64>,
    /// Failed polls in a row (reset by a good one); drives the backoff.
    pub failures: i64,
    /// Not polled again before this time (backoff after failures).
    pub next_attempt_ms: i64,
    pub last_error: Option<String>,
    /// The signed `generated` time (unix seconds) of the newest index accepted from this
    /// feed; an index generated before it is refused (rollback). Kept when the URL changes.
    pub index_generated_s: Option<i64>,
    /// The signed `expires` time (unix seconds) of that index, if it had one; once past, the
    /// index is refused even when the server answers `304 Not Modified` (freeze).
    pub index_expires_s: Option<i64>,
    /// An apt feed's row (one per LC): the digest of the last set of updates (the LC's apt
    /// state and `package=version` list) made into a bundle.
    pub apt_set: Option<String>,
    /// The bundle made of that set.
    pub apt_bundle: Option<String>,
}

fn feed_row(r: &Row<'_>) -> rusqlite::Result<FeedStateRow> {
    Ok(FeedStateRow {
        feed: r.get(0)?,
        url: r.get(1)?,
        etag: r.get(2)?,
        last_modified: r.get(3)?,
        last_checked_ms: r.get(4)?,
        last_ok_ms: r.get(5)?,
        failures: r.get(6)?,
        next_attempt_ms: r.get(7)?,
        last_error: r.get(8)?,
        index_generated_s: r.get(9)?,
        index_expires_s: r.get(10)?,
        apt_set: r.get(11)?,
        apt_bundle: r.get(12)?,
    })
}

const FEED_COLS: &str = "feed, url, etag, last_modified, last_checked_ms, last_ok_ms, failures, next_attempt_ms, last_error, index_generated_s, index_expires_s, apt_set, apt_bundle";

/// A new approval challenge, as the notice mail announces it.
#[derive(Debug, Clone)]
pub struct NewChallenge<'a> {
    pub id: &'a str,
    /// The patch ids the notice offered.
    pub patches: &'a [String],
    /// The notice mail's `Message-ID` (without angle brackets).
    pub message_id: &'a str,
    pub created_ms: i64,
    pub expires_ms: i64,
}

/// One approval challenge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChallengeRow {
    pub id: String,
    pub patches: Vec<String>,
    pub message_id: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub notified_ms: Option<i64>,
    /// Wrong codes received for it: reported, never a lockout (a sender can be forged).
    pub failed_attempts: i64,
    /// Set once a genuine decision used the challenge; it is never accepted again.
    pub used_ms: Option<i64>,
    /// The canonical decision that used it.
    pub decision: Option<String>,
    /// Who gave it (a mail address, or `host` for `patchover approve`).
    pub decided_by: Option<String>,
}

fn challenge_row(r: &Row<'_>) -> rusqlite::Result<ChallengeRow> {
    let patches: String = r.get(1)?;
    Ok(ChallengeRow {
        id: r.get(0)?,
        patches: serde_json::from_str(&patches).unwrap_or_default(),
        message_id: r.get(2)?,
        created_ms: r.get(3)?,
        expires_ms: r.get(4)?,
        notified_ms: r.get(5)?,
        failed_attempts: r.get(6)?,
        used_ms: r.get(7)?,
        decision: r.get(8)?,
        decided_by: r.get(9)?,
    })
}

const CHALLENGE_COLS: &str = "id, patches, message_id, created_ms, expires_ms, notified_ms, failed_attempts, used_ms, decision, decided_by";

impl Store {
    /// The ids of every patch in the patch table (cheaper than [`Store::patches`]).
    pub fn patch_ids(&self) -> Result<Vec<String>, StoreError> {
        let mut s = self
            .conn
            .prepare("SELECT id FROM patches")
            .map_err(q("list patch ids"))?;
        s.query_map([], |r| r.get(0))
            .and_then(|rows| rows.collect())
            .map_err(q("list patch ids"))
    }

    pub fn feed_state(&self, feed: &str) -> Result<Option<FeedStateRow>, StoreError> {
        self.conn
            .query_row(
                &format!("SELECT {FEED_COLS} FROM feed_state WHERE feed = ?1"),
                [feed],
                feed_row,
            )
            .optional()
            .map_err(q("read feed state"))
    }

    pub fn feed_states(&self) -> Result<Vec<FeedStateRow>, StoreError> {
        let mut s = self
            .conn
            .prepare(&format!("SELECT {FEED_COLS} FROM feed_state ORDER BY feed"))
            .map_err(q("list feed states"))?;
        s.query_map([], feed_row)
            .and_then(|rows| rows.collect())
            .map_err(q("list feed states"))
    }

    /// Writes (inserts or replaces) the state of one feed.
    pub fn save_feed_state(&mut self, f: &FeedStateRow) -> Result<(), StoreError> {
        self.conn
            .execute(
                &format!(
                    "INSERT OR REPLACE INTO feed_state ({FEED_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
                ),
                params![
                    f.feed,
                    f.url,
                    f.etag,
                    f.last_modified,
                    f.last_checked_ms,
                    f.last_ok_ms,
                    f.failures,
                    f.next_attempt_ms,
                    f.last_error,
                    f.index_generated_s,
                    f.index_expires_s,
                    f.apt_set,
                    f.apt_bundle
                ],
            )
            .map_err(q("save feed state"))?;
        Ok(())
    }

    /// Records a new challenge; an id already used is refused.
    pub fn insert_challenge(&mut self, c: &NewChallenge<'_>) -> Result<(), StoreError> {
        let patches = serde_json::to_string(c.patches).unwrap_or_else(|_| "[]".to_owned());
        let n = self
            .conn
            .execute(
                "INSERT OR IGNORE INTO challenges (id, patches, message_id, created_ms, expires_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![c.id, patches, c.message_id, c.created_ms, c.expires_ms],
            )
            .map_err(q("insert challenge"))?;
        if n == 0 {
            return Err(StoreError::Conflict(format!(
                "challenge {:?} exists already",
                c.id
            )));
        }
        Ok(())
    }

    pub fn challenge(&self, id: &str) -> Result<Option<ChallengeRow>, StoreError> {
        self.conn
            .query_row(
                &format!("SELECT {CHALLENGE_COLS} FROM challenges WHERE id = ?1"),
                [id],
                challenge_row,
            )
            .optional()
            .map_err(q("read challenge"))
    }

    /// The challenge whose notice mail had this `Message-ID` (without angle brackets).
    pub fn challenge_by_message_id(
        &self,
        message_id: &str,
    ) -> Result<Option<ChallengeRow>, StoreError> {
        self.conn
            .query_row(
                &format!("SELECT {CHALLENGE_COLS} FROM challenges WHERE message_id = ?1"),
                [message_id],
                challenge_row,
            )
            .optional()
            .map_err(q("read challenge"))
    }

    pub fn challenges(&self) -> Result<Vec<ChallengeRow>, StoreError> {
        let mut s = self
            .conn
            .prepare(&format!(
                "SELECT {CHALLENGE_COLS} FROM challenges ORDER BY created_ms, id"
            ))
            .map_err(q("list challenges"))?;
        s.query_map([], challenge_row)
            .and_then(|rows| rows.collect())
            .map_err(q("list challenges"))
    }

    pub fn mark_challenge_notified(&mut self, id: &str, at_ms: i64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE challenges SET notified_ms = ?2 WHERE id = ?1",
                params![id, at_ms],
            )
            .map_err(q("mark challenge notified"))?;
        Ok(())
    }

    /// Counts one failed authentication against the challenge; returns the new count.
    pub fn record_challenge_failure(&mut self, id: &str) -> Result<i64, StoreError> {
        self.conn
            .query_row(
                "UPDATE challenges SET failed_attempts = failed_attempts + 1 WHERE id = ?1
                 RETURNING failed_attempts",
                [id],
                |r| r.get(0),
            )
            .optional()
            .map_err(q("record challenge failure"))
            .map(|n| n.unwrap_or(0))
    }

    /// Uses the challenge for `decision`: succeeds only once, only before it expires
    /// (`now_ms < expires_ms`). Returns false when it was already used, expired or unknown.
    pub fn use_challenge(
        &mut self,
        id: &str,
        decision: &str,
        decided_by: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE challenges SET used_ms = ?2, decision = ?3, decided_by = ?4
                 WHERE id = ?1 AND used_ms IS NULL AND expires_ms > ?2",
                params![id, now_ms, decision, decided_by],
            )
            .map_err(q("use challenge"))?;
        Ok(n == 1)
    }

    /// How far the mailbox was read: `(uid_validity, last_uid)`.
    pub fn mailbox_state(&self, mailbox: &str) -> Result<Option<(u32, u32)>, StoreError> {
        self.conn
            .query_row(
                "SELECT uid_validity, last_uid FROM mailbox_state WHERE mailbox = ?1",
                [mailbox],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(q("read mailbox state"))
    }

    pub fn save_mailbox_state(
        &mut self,
        mailbox: &str,
        uid_validity: u32,
        last_uid: u32,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO mailbox_state (mailbox, uid_validity, last_uid) VALUES (?1, ?2, ?3)",
                params![mailbox, uid_validity, last_uid],
            )
            .map_err(q("save mailbox state"))?;
        Ok(())
    }
}
