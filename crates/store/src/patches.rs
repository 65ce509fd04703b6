//! The patch table (seed fig. 6): what patches exist, which are marked to be applied at the
//! next run (the seed's column 606), and how the last run went.

use patchover_core::Category;
use rusqlite::{OptionalExtension, Row, params};
use serde::{Deserialize, Serialize};

use crate::{Store, StoreError, now_ms, q};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PatchResult {
    Ok,
    Failed,
    Skipped,
}

impl PatchResult {
    fn as_str(self) -> &'static str {
        match self {
            PatchResult::Ok => "ok",
            PatchResult::Failed => "failed",
            PatchResult::Skipped => "skipped",
        }
    }
    fn parse(s: &str) -> Option<PatchResult> {
        match s {
            "ok" => Some(PatchResult::Ok),
            "failed" => Some(PatchResult::Failed),
            "skipped" => Some(PatchResult::Skipped),
            _ => None,
        }
    }
}

/// One row of the patch table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PatchRow {
    pub id: String,
    pub title: String,
    pub category: Category,
    pub severity: String,
    /// RFC 3339.
    pub published: String,
    pub sha256: String,
    /// The verified bundle file in the state directory.
    pub file: String,
    pub registered_ms: i64,
    pub apply_next: bool,
    pub applied_ms: Option<i64>,
    pub applied_lc: Option<String>,
    pub last_result: Option<PatchResult>,
    pub last_output: Option<String>,
    pub last_ms: Option<i64>,
}

const COLS: &str = "id, title, category, severity, published, sha256, file, registered_ms, apply_next, applied_ms, applied_lc, last_result, last_output, last_ms";

fn row(r: &Row<'_>) -> rusqlite::Result<PatchRow> {
    let cat: String = r.get(2)?;
    let last: Option<String> = r.get(11)?;
    Ok(PatchRow {
        id: r.get(0)?,
        title: r.get(1)?,
        category: cat.parse().unwrap_or(Category::Bugfix),
        severity: r.get(3)?,
        published: r.get(4)?,
        sha256: r.get(5)?,
        file: r.get(6)?,
        registered_ms: r.get(7)?,
        apply_next: r.get::<_, i64>(8)? != 0,
        applied_ms: r.get(9)?,
        applied_lc: r.get(10)?,
        last_result: last.as_deref().and_then(PatchResult::parse),
        last_output: r.get(12)?,
        last_ms: r.get(13)?,
    })
}

/// What registering a patch needs; the bundle crate fills it from a *verified* bundle.
#[derive(Debug, Clone)]
pub struct NewPatch<'a> {
    pub id: &'a str,
    pub title: &'a str,
    pub category: Category,
    pub severity: &'a str,
    pub published: &'a str,
    pub sha256: &'a str,
    pub file: &'a str,
}

impl Store {
    /// Registers a patch. A patch id is registered once: the same id again is refused, so a
    /// bundle is never registered twice.
    pub fn register_patch(&mut self, p: &NewPatch<'_>) -> Result<(), StoreError> {
        if self.patch(p.id)?.is_some() {
            return Err(StoreError::Conflict(format!(
                "patch {:?} is already in the patch table; bundle ids are unique",
                p.id
            )));
        }
        self.conn
            .execute(
                "INSERT INTO patches (id, title, category, severity, published, sha256, file, registered_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    p.id,
                    p.title,
                    p.category.as_str(),
                    p.severity,
                    p.published,
                    p.sha256,
                    p.file,
                    now_ms()
                ],
            )
            .map_err(q("register patch"))?;
        Ok(())
    }

    pub fn patches(&self) -> Result<Vec<PatchRow>, StoreError> {
        let mut s = self
            .conn
            .prepare(&format!(
                "SELECT {COLS} FROM patches ORDER BY published, id"
            ))
            .map_err(q("list patches"))?;
        s.query_map([], row)
            .and_then(|rows| rows.collect())
            .map_err(q("list patches"))
    }

    pub fn patch(&self, id: &str) -> Result<Option<PatchRow>, StoreError> {
        self.conn
            .query_row(
                &format!("SELECT {COLS} FROM patches WHERE id = ?1"),
                [id],
                row,
            )
            .optional()
            .map_err(q("read patch"))
    }

    /// Sets or clears the apply-at-next-run flag.
    pub fn mark_patch(&mut self, id: &str, apply_next: bool) -> Result<(), StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE patches SET apply_next = ?2 WHERE id = ?1",
                params![id, apply_next as i64],
            )
            .map_err(q("mark patch"))?;
        if n == 0 {
            return Err(StoreError::NotFound(format!(
                "no patch {id:?} in the patch table; see `patchover patches list`"
            )));
        }
        Ok(())
    }

    /// Records the result of a run for one patch (seed fig. 12, 1205, as reported back).
    /// A patch that applied is no longer marked for the next run.
    pub fn record_patch_result(
        &mut self,
        id: &str,
        lc: &str,
        result: PatchResult,
        output: &str,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let ok = result == PatchResult::Ok;
        let n = self
            .conn
            .execute(
                "UPDATE patches SET last_result = ?2, last_output = ?3, last_ms = ?4,
                   applied_ms = CASE WHEN ?5 THEN ?4 ELSE applied_ms END,
                   applied_lc = CASE WHEN ?5 THEN ?6 ELSE applied_lc END,
                   apply_next = CASE WHEN ?5 THEN 0 ELSE apply_next END
                 WHERE id = ?1",
                params![id, result.as_str(), output, now, ok, lc],
            )
            .map_err(q("record patch result"))?;
        if n == 0 {
            return Err(StoreError::NotFound(format!(
                "no patch {id:?} in the patch table"
            )));
        }
        Ok(())
    }
}
