//! Numbered schema migrations. Append only: a released migration never changes.

use std::path::Path;

use rusqlite::Connection;

use crate::StoreError;

const MIGRATIONS: &[&str] = &[
    // 1: the resource table (fig. 5), the patch table (fig. 6), the run journal.
    r#"
    CREATE TABLE lcs (
        id          TEXT PRIMARY KEY,
        backend     TEXT NOT NULL,
        cpu         INTEGER NOT NULL,
        cpu_share   INTEGER NOT NULL,
        memory_mib  INTEGER NOT NULL,
        system_disk TEXT NOT NULL,
        app_disk    TEXT,
        app_mount   TEXT,
        nics        TEXT NOT NULL,
        spec        TEXT NOT NULL,
        role        TEXT NOT NULL DEFAULT 'unused' CHECK (role IN ('active','standby','unused')),
        updated_ms  INTEGER NOT NULL
    );
    CREATE TABLE patches (
        id            TEXT PRIMARY KEY,
        title         TEXT NOT NULL,
        category      TEXT NOT NULL CHECK (category IN ('security','enhancement','bugfix')),
        severity      TEXT NOT NULL,
        published     TEXT NOT NULL,
        sha256        TEXT NOT NULL,
        file          TEXT NOT NULL,
        registered_ms INTEGER NOT NULL,
        apply_next    INTEGER NOT NULL DEFAULT 0,
        applied_ms    INTEGER,
        applied_lc    TEXT,
        last_result   TEXT CHECK (last_result IN ('ok','failed','skipped')),
        last_output   TEXT,
        last_ms       INTEGER
    );
    CREATE TABLE runs (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        lc          TEXT NOT NULL,
        standby     TEXT,
        mode        TEXT NOT NULL,
        dry_run     INTEGER NOT NULL,
        state       TEXT NOT NULL,
        started_ms  INTEGER NOT NULL,
        ended_ms    INTEGER,
        outcome     TEXT,
        report      TEXT
    );
    -- At most one unfinished run per LC: the second is refused by the database itself.
    CREATE UNIQUE INDEX one_open_run_per_lc ON runs(lc) WHERE ended_ms IS NULL;
    CREATE TABLE run_steps (
        run_id   INTEGER NOT NULL REFERENCES runs(id),
        seq      INTEGER NOT NULL,
        step     TEXT NOT NULL,
        state    TEXT NOT NULL CHECK (state IN ('started','done','failed')),
        at_ms    INTEGER NOT NULL,
        detail   TEXT,
        PRIMARY KEY (run_id, seq)
    );
    "#,
    // 2: the patch monitor (issue 7): per-feed polling state, approval challenges, and how far
    // the approval mailbox has been read.
    r#"
    CREATE TABLE feed_state (
        feed            TEXT PRIMARY KEY,
        url             TEXT NOT NULL,
        etag            TEXT,
        last_modified   TEXT,
        last_checked_ms INTEGER,
        last_ok_ms      INTEGER,
        failures        INTEGER NOT NULL DEFAULT 0,
        next_attempt_ms INTEGER NOT NULL DEFAULT 0,
        last_error      TEXT
    );
    CREATE TABLE challenges (
        id              TEXT PRIMARY KEY,
        patches         TEXT NOT NULL,
        message_id      TEXT NOT NULL,
        created_ms      INTEGER NOT NULL,
        expires_ms      INTEGER NOT NULL,
        notified_ms     INTEGER,
        failed_attempts INTEGER NOT NULL DEFAULT 0,
        used_ms         INTEGER,
        decision        TEXT,
        decided_by      TEXT
    );
    CREATE TABLE mailbox_state (
        mailbox      TEXT PRIMARY KEY,
        uid_validity INTEGER NOT NULL,
        last_uid     INTEGER NOT NULL
    );
    "#,
    // 3: what the store itself remembers (the LC section the resource table was synced from).
    r#"
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    "#,
    // 4: the newest feed index accepted per feed (issue 22): its signed publication time, so an
    // older index is refused as a rollback even after a restart, and its signed expiry, so an
    // index the server keeps answering 304 for is refused once it expired (a frozen feed).
    r#"
    ALTER TABLE feed_state ADD COLUMN index_generated_s INTEGER;
    ALTER TABLE feed_state ADD COLUMN index_expires_s INTEGER;
    "#,
    // 5: an apt feed keeps one state row per LC (issue 24): the digest of the last set of
    // updates made into a bundle, and that bundle's id, so the same set is never downloaded
    // again and a grown set supersedes the pending bundle.
    r#"
    ALTER TABLE feed_state ADD COLUMN apt_set TEXT;
    ALTER TABLE feed_state ADD COLUMN apt_bundle TEXT;
    "#,
];

pub(crate) fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let known = MIGRATIONS.len() as i64;
    let found: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|source| StoreError::Migrate { version: 0, source })?;
    if found > known {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            found,
            known,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = i as i64 + 1;
        let err = |source| StoreError::Migrate { version, source };
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        tx.execute_batch(sql).map_err(err)?;
        tx.pragma_update(None, "user_version", version)
            .map_err(err)?;
        tx.commit().map_err(err)?;
    }
    Ok(())
}
