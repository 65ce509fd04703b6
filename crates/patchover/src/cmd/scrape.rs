//! `/metrics`'s store side (`Command::Scrape`): the runs that ended since the last scrape,
//! read from the run journal and ingested into the daemon's metrics, whoever started them
//! (the daemon, `patchover --direct patch`, a recovery); and the gauges of what is true now.

use patchover_app::Env;
use patchover_app::runs::{self, RunDetail};
use patchover_app::status;
use patchover_daemon::Metrics;
use patchover_daemon::metrics::{Gauges, RunFigures};

/// Ingests every ended run `metrics` has not seen, then reads the gauges.
pub fn scrape(env: &Env, metrics: &Metrics) -> Result<Gauges, patchover_app::AppError> {
    for id in runs::ended(&env.store)? {
        if !metrics.ingested(id) {
            metrics.ingest(&figures(&runs::show(&env.store, id)?));
        }
    }
    gauges(env)
}

/// What an ended run contributes: its steps' spans from the journal, the rest from its report.
pub fn figures(d: &RunDetail) -> RunFigures {
    let secs = |ms: i64| ms as f64 / 1000.0;
    RunFigures {
        id: d.run.id,
        kind: d.kind().to_owned(),
        outcome: d.run.outcome.clone().unwrap_or_else(|| "unknown".into()),
        steps: d
            .spans()
            .into_iter()
            .map(|s| (s.step, secs(s.end_ms - s.start_ms)))
            .collect(),
        seconds: secs(d.run.ended_ms.unwrap_or(d.run.started_ms) - d.run.started_ms),
        bytes_copied: d.report_u64(&["bytes_copied"]),
        bytes_replayed: d.report_u64(&["bytes_replayed"]),
        freeze_s: d.freeze_ms().map(|ms| ms / 1000.0),
        pause_s: d.pause_ms().map(|ms| ms / 1000.0),
        held_syns: d.report_u64(&["switch", "held_syns"]),
        leftover_connections: d.report_u64(&["switch", "leftover_connections"]),
    }
}

fn label<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => "unknown".into(),
    }
}

/// The gauges, read as `patchover status` reads the same things (`patchover_app::status`).
fn gauges(env: &Env) -> Result<Gauges, patchover_app::AppError> {
    let patches = status::patches(env)?;
    let monitor = status::monitor(env)?;
    Ok(Gauges {
        lcs: status::lc_lines(env, &env.store.lcs()?)
            .iter()
            .map(|l| (l.id.clone(), label(&l.state), label(&l.role)))
            .collect(),
        runs_in_progress: env
            .store
            .runs()?
            .iter()
            .filter(|r| r.ended_ms.is_none())
            .count() as i64,
        patches_pending: patches.pending.len() as i64,
        patches_approved: patches.approved.len() as i64,
        feed_last_success: monitor
            .iter()
            .flat_map(|m| &m.feeds)
            .filter_map(|f| Some((f.name.clone(), f.last_ok_ms? as f64 / 1000.0)))
            .collect(),
        challenges_open: monitor.map_or(0, |m| m.open_challenges as i64),
    })
}
