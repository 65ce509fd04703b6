//! The run journal: `runs list|show` and `GET /v1/runs…`.

use patchover_store::{RunRow, StepRow, Store};
use serde::{Deserialize, Serialize};

use crate::AppError;

/// Every patch run with its outcome: `runs list` and `GET /v1/runs`.
pub fn list(store: &Store) -> Result<Vec<RunRow>, AppError> {
    Ok(store.runs()?)
}

/// One run with its steps.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunDetail {
    pub run: RunRow,
    pub steps: Vec<StepRow>,
}

/// One run with its steps: `runs show` and `GET /v1/runs/{id}`.
pub fn show(store: &Store, run: i64) -> Result<RunDetail, AppError> {
    let r = store
        .run(run)?
        .ok_or_else(|| AppError::NotFound(format!("no run {run}; see `patchover runs list`")))?;
    Ok(RunDetail {
        run: r,
        steps: store.steps(run)?,
    })
}

/// One journaled step on the journal's clock (unix ms): from its `started` line to its
/// `done` or `failed` line; a step the run never ended (a run cut off) ends at the run's end
/// or at the journal's last line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepSpan {
    pub step: String,
    pub start_ms: i64,
    pub end_ms: i64,
    /// `done` (not `failed` or cut off).
    pub ok: bool,
}

impl RunDetail {
    /// Each step's span, in journal order.
    pub fn spans(&self) -> Vec<StepSpan> {
        let last = self.steps.last().map_or(self.run.started_ms, |s| s.at_ms);
        let cut_off = self.run.ended_ms.unwrap_or(last).max(last);
        let mut out: Vec<StepSpan> = Vec::new();
        let mut open: Vec<usize> = Vec::new();
        for s in &self.steps {
            match s.state.as_str() {
                "started" => {
                    open.push(out.len());
                    out.push(StepSpan {
                        step: s.step.clone(),
                        start_ms: s.at_ms,
                        end_ms: cut_off,
                        ok: false,
                    });
                }
                state => {
                    let Some(pos) = open.iter().rposition(|&i| out[i].step == s.step) else {
                        continue; // a line with no start (front_paused, recover)
                    };
                    let i = open.remove(pos);
                    out[i].end_ms = s.at_ms;
                    out[i].ok = state == "done";
                }
            }
        }
        out
    }

    /// `patch` or `rollback` ([`kind`]).
    pub fn kind(&self) -> &'static str {
        kind(&self.steps)
    }

    fn report_f64(&self, key: &str) -> Option<f64> {
        self.run.report.as_ref()?.get(key)?.as_f64()
    }

    /// The switch step's `done` detail (the switch report).
    fn switch_detail(&self) -> Option<&serde_json::Value> {
        self.steps
            .iter()
            .find(|s| s.step == "switch" && s.state == "done")?
            .detail
            .as_ref()
    }

    /// The time new connections were held at the switch: the report's, or the switch step's.
    pub fn pause_ms(&self) -> Option<f64> {
        self.report_f64("pause_ms")
            .or_else(|| self.switch_detail()?.get("pause_ms")?.as_f64())
    }

    /// The freeze of the application disk's cut: the report's, or the switch step's.
    pub fn freeze_ms(&self) -> Option<f64> {
        self.report_f64("freeze_ms").or_else(|| {
            self.switch_detail()?
                .get("cut_app_disk")?
                .get("freeze_ms")?
                .as_f64()
        })
    }

    /// A whole number the report holds at `path` (0 when it has none).
    pub fn report_u64(&self, path: &[&str]) -> u64 {
        let mut v = self.run.report.as_ref();
        for k in path {
            v = v.and_then(|x| x.get(k));
        }
        v.and_then(serde_json::Value::as_u64).unwrap_or(0)
    }
}

/// `patch` or `rollback`, from a run's journal: a rollback's standby search says so in its
/// `done` detail (`"rollback": true`).
pub fn kind(steps: &[StepRow]) -> &'static str {
    // The `done` line's detail, not the first line's (a `started` line has none).
    let rollback = steps
        .iter()
        .filter(|s| s.step == "standby_search")
        .filter_map(|s| s.detail.as_ref())
        .any(|d| d["rollback"] == true);
    if rollback { "rollback" } else { "patch" }
}

/// The runs that ended, by id (open runs change still; ended ones never do).
pub fn ended(store: &Store) -> Result<Vec<i64>, AppError> {
    Ok(store
        .runs()?
        .into_iter()
        .filter(|r| r.ended_ms.is_some())
        .map(|r| r.id)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run's journal of `(step, state, at_ms)` lines; its standby search says `rollback`.
    fn detail(lines: &[(&str, &str, i64)], rollback: bool) -> RunDetail {
        let line = |(i, (step, state, at)): (usize, &(&str, &str, i64))| StepRow {
            seq: i as i64 + 1,
            step: (*step).into(),
            state: (*state).into(),
            at_ms: *at,
            detail: (*step == "standby_search" && *state == "done")
                .then(|| serde_json::json!({"standby": "lc2", "rollback": rollback})),
        };
        RunDetail {
            run: RunRow {
                id: 1,
                lc: "lc1".into(),
                standby: None,
                mode: "readdress".into(),
                dry_run: false,
                state: String::new(),
                started_ms: 1000,
                ended_ms: Some(9000),
                outcome: Some("failed".into()),
                report: None,
            },
            steps: lines.iter().enumerate().map(line).collect(),
        }
    }

    #[test]
    fn spans_pair_starts_with_ends_and_a_cut_off_step_ends_with_the_run() {
        let d = detail(
            &[
                ("standby_search", "started", 1000),
                ("standby_search", "done", 1100),
                ("front_paused", "done", 1150),
                ("copy_app_disk", "started", 1200),
                ("copy_app_disk", "failed", 2000),
                ("boot_standby", "started", 2100),
            ],
            false,
        );
        let s = d.spans();
        assert_eq!(s.len(), 3, "{s:?}");
        assert_eq!((s[0].start_ms, s[0].end_ms, s[0].ok), (1000, 1100, true));
        assert_eq!((s[1].step.as_str(), s[1].ok), ("copy_app_disk", false));
        assert_eq!((s[2].end_ms, s[2].ok), (9000, false));
    }

    #[test]
    fn the_kind_is_what_the_standby_search_said() {
        let lines = [
            ("standby_search", "started", 1),
            ("standby_search", "done", 2),
        ];
        assert_eq!(detail(&lines, false).kind(), "patch");
        assert_eq!(detail(&lines, true).kind(), "rollback");
        assert_eq!(detail(&[], true).kind(), "patch");
    }
}
