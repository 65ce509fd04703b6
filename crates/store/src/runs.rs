//! The run journal: a patch run is a state machine whose every step is written here before
//! and after it acts, so a restarted patchover can finish or roll back what it finds.

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::{Store, StoreError, now_ms, q};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRow {
    pub id: i64,
    pub lc: String,
    pub standby: Option<String>,
    pub mode: String,
    pub dry_run: bool,
    pub state: String,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    pub outcome: Option<String>,
    pub report: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRow {
    pub seq: i64,
    pub step: String,
    pub state: String,
    pub at_ms: i64,
    pub detail: Option<serde_json::Value>,
}

const COLS: &str = "id, lc, standby, mode, dry_run, state, started_ms, ended_ms, outcome, report";

fn run_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRow> {
    let report: Option<String> = r.get(9)?;
    Ok(RunRow {
        id: r.get(0)?,
        lc: r.get(1)?,
        standby: r.get(2)?,
        mode: r.get(3)?,
        dry_run: r.get::<_, i64>(4)? != 0,
        state: r.get(5)?,
        started_ms: r.get(6)?,
        ended_ms: r.get(7)?,
        outcome: r.get(8)?,
        report: report.and_then(|s| serde_json::from_str(&s).ok()),
    })
}

impl Store {
    /// Opens a run for `lc`. Refused while another run for the same LC is unfinished.
    pub fn begin_run(&mut self, lc: &str, mode: &str, dry_run: bool) -> Result<i64, StoreError> {
        let res = self.conn.execute(
            "INSERT INTO runs (lc, mode, dry_run, state, started_ms) VALUES (?1, ?2, ?3, 'started', ?4)",
            params![lc, mode, dry_run as i64, now_ms()],
        );
        match res {
            Ok(_) => Ok(self.conn.last_insert_rowid()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                let other = self.open_run(lc)?.map_or(0, |r| r.id);
                Err(StoreError::Conflict(format!(
                    "run {other} for LC {lc} is still going; wait for it or see `patchover runs show {other}`"
                )))
            }
            Err(e) => Err(q("begin run")(e)),
        }
    }

    /// Records a step's state and moves the run's state to it. Durable on return.
    pub fn record_step(
        &mut self,
        run: i64,
        step: &str,
        state: &str,
        detail: Option<&serde_json::Value>,
    ) -> Result<(), StoreError> {
        // IMMEDIATE for the same reason as in `sync_lcs`: another process may write meanwhile.
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(q("begin step"))?;
        let seq: i64 = tx
            .query_row(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM run_steps WHERE run_id = ?1",
                [run],
                |r| r.get(0),
            )
            .map_err(q("next step"))?;
        tx.execute(
            "INSERT INTO run_steps (run_id, seq, step, state, at_ms, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![run, seq, step, state, now_ms(), detail.map(|d| d.to_string())],
        )
        .map_err(q("record step"))?;
        tx.execute(
            "UPDATE runs SET state = ?2 WHERE id = ?1",
            params![run, format!("{step}:{state}")],
        )
        .map_err(q("record step"))?;
        tx.commit().map_err(q("commit step"))
    }

    pub fn set_run_standby(&mut self, run: i64, standby: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE runs SET standby = ?2 WHERE id = ?1",
                params![run, standby],
            )
            .map_err(q("set standby"))?;
        Ok(())
    }

    pub fn end_run(
        &mut self,
        run: i64,
        outcome: &str,
        report: &serde_json::Value,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE runs SET ended_ms = ?2, outcome = ?3, report = ?4 WHERE id = ?1",
                params![run, now_ms(), outcome, report.to_string()],
            )
            .map_err(q("end run"))?;
        Ok(())
    }

    pub fn run(&self, id: i64) -> Result<Option<RunRow>, StoreError> {
        self.conn
            .query_row(
                &format!("SELECT {COLS} FROM runs WHERE id = ?1"),
                [id],
                run_row,
            )
            .optional()
            .map_err(q("read run"))
    }

    pub fn open_run(&self, lc: &str) -> Result<Option<RunRow>, StoreError> {
        self.conn
            .query_row(
                &format!("SELECT {COLS} FROM runs WHERE lc = ?1 AND ended_ms IS NULL"),
                [lc],
                run_row,
            )
            .optional()
            .map_err(q("read open run"))
    }

    pub fn runs(&self) -> Result<Vec<RunRow>, StoreError> {
        let mut s = self
            .conn
            .prepare(&format!("SELECT {COLS} FROM runs ORDER BY id"))
            .map_err(q("list runs"))?;
        s.query_map([], run_row)
            .and_then(|r| r.collect())
            .map_err(q("list runs"))
    }

    pub fn steps(&self, run: i64) -> Result<Vec<StepRow>, StoreError> {
        let mut s = self
            .conn
            .prepare("SELECT seq, step, state, at_ms, detail FROM run_steps WHERE run_id = ?1 ORDER BY seq")
            .map_err(q("list steps"))?;
        s.query_map([run], |r| {
            let detail: Option<String> = r.get(4)?;
            Ok(StepRow {
                seq: r.get(0)?,
                step: r.get(1)?,
                state: r.get(2)?,
                at_ms: r.get(3)?,
                detail: detail.and_then(|d| serde_json::from_str(&d).ok()),
            })
        })
        .and_then(|r| r.collect())
        .map_err(q("list steps"))
    }
}
