//! The store: one SQLite database (WAL) holding the seed's resource table (fig. 5), patch
//! table (fig. 6) and the run journal that lets a restarted patchover finish or roll back a
//! patch run.
//!
//! The config is the source of truth for *which* LCs exist and what they are given; the store
//! mirrors it ([`Store::sync_lcs`]) and adds what changes at run time: each LC's role (active,
//! standby, unused), the patches, and the runs. Schema changes are numbered migrations applied
//! in one transaction each, tracked by `PRAGMA user_version`.

mod migrations;
mod monitor;
mod patches;
mod resources;
mod runs;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::Connection;

pub use monitor::{ChallengeRow, FeedStateRow, NewChallenge};
pub use patches::{NewPatch, PatchResult, PatchRow};
pub use resources::{LcRow, Role};
pub use runs::{RunRow, StepRow};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}; check that the state directory is writable", path = path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot create the state directory {path}", path = path.display())]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the store at {path} has schema version {found}, newer than this patchover knows ({known}); upgrade patchover", path = path.display())]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("store migration {version} failed")]
    Migrate {
        version: i64,
        #[source]
        source: rusqlite::Error,
    },
    #[error("store query failed: {what}")]
    Query {
        what: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
}

pub(crate) fn q(what: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Query { what, source }
}

/// A handle on the store. Cheap to open; each CLI invocation opens its own.
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (and creates, and migrates) the store at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::StateDir {
                path: dir.to_owned(),
                source,
            })?;
        }
        let open_err = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        let mut store = Store { conn };
        migrations::migrate(&mut store.conn, path)?;
        Ok(store)
    }

    /// The schema version in force.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        self.conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(q("read schema version"))
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
