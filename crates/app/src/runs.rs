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
