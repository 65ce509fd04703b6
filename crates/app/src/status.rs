//! One screen of the whole host: `patchover status` and `GET /v1/status`.
//!
//! Every part is read as it is now, and a part that cannot be known is a state shown, not an
//! error: a stopped active LC, a service that does not answer, a daemon that is not running.
//! The service is asked with the configured `[service]` check, made inside the active LC to
//! its own address (`patchover_net::health::check_own`, as a run's `standby_health` step).

use std::path::PathBuf;
use std::time::Duration;

use patchover_core::{BackendKind, LcSpec};
use patchover_lc::{LcBackend, LcState};
use patchover_net::health::Inside;
use patchover_orchestrator::service::RunByBackend;
use patchover_store::{Role, RunRow};
use serde::{Deserialize, Serialize};

use crate::{AppError, Env};

/// How many of the last runs the status lists.
pub const LAST_RUNS: usize = 5;
/// How long the service check may keep failing in a status (a status answers quickly).
const CHECK_PATIENCE: Duration = Duration::from_secs(1);

/// Everything `patchover status` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    /// The LCs of the resource table with their role and state now.
    pub lcs: Vec<LcLine>,
    pub active_lc: Option<String>,
    pub service: ServiceState,
    /// The last [`LAST_RUNS`] runs, newest first.
    pub runs: Vec<RunLine>,
    /// Runs not ended (a crashed one stays open until `runs recover`).
    pub open_runs: Vec<i64>,
    pub patches: PatchLines,
    /// `None` without `[monitor]`.
    pub monitor: Option<MonitorState>,
    pub daemon: DaemonState,
}

/// One LC: its role and state (`None` with `error` when the backend could not say).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LcLine {
    pub id: String,
    pub backend: BackendKind,
    pub role: Role,
    pub state: Option<LcState>,
    pub pid: Option<i32>,
    pub error: Option<String>,
}

/// Where the service is and whether it answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceState {
    /// `[network] service_address`.
    pub address: Option<String>,
    pub port: u16,
    /// The LC that holds it: the active LC of the resource table.
    pub lc: Option<String>,
    /// That LC's own address, where the check is made.
    pub lc_address: Option<String>,
    /// `Some(true)` when the configured check passed, `Some(false)` when it failed (`detail`
    /// says why), `None` when it could not be made (`detail` says why).
    pub answers: Option<bool>,
    pub detail: Option<String>,
}

/// One run of the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunLine {
    pub id: i64,
    /// `patch`, `rollback`, or either with ` (dry run)`.
    pub kind: String,
    pub lc: String,
    pub mode: String,
    /// The last step journaled.
    pub state: String,
    /// `None` while it runs (or until a crashed run is recovered).
    pub outcome: Option<String>,
    pub started_ms: i64,
    pub duration_ms: Option<i64>,
}

/// The patch table's patches not applied yet: pending (not marked) and approved (marked to be
/// applied by the next run).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchLines {
    pub pending: Vec<PatchLine>,
    pub approved: Vec<PatchLine>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchLine {
    pub id: String,
    pub title: String,
    pub severity: String,
}

/// The monitor's feeds and its open approval challenges.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorState {
    pub feeds: Vec<FeedLine>,
    /// Challenges mailed and neither used nor expired.
    pub open_challenges: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedLine {
    pub name: String,
    pub last_poll_ms: Option<i64>,
    pub last_ok_ms: Option<i64>,
    /// Failed polls in a row.
    pub failures: i64,
    pub last_error: Option<String>,
}

/// Whether the daemon answers on its socket; filled by whoever asks (the daemon about itself,
/// the CLI by connecting).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonState {
    pub socket: PathBuf,
    pub answers: bool,
    /// The daemon's PID, when it answered itself.
    pub pid: Option<u32>,
    /// Runs the daemon drives now.
    pub running_runs: Option<usize>,
}

/// The status of the host `env` describes.
pub fn status(env: &Env, daemon: DaemonState) -> Result<Status, AppError> {
    let rows = env.store.lcs()?;
    let active = rows.iter().find(|r| r.role == Role::Active);
    let runs = env.store.runs()?;
    Ok(Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        lcs: lc_lines(env, &rows),
        active_lc: active.map(|r| r.spec.id.to_string()),
        service: service(env, active.map(|r| &r.spec)),
        open_runs: runs
            .iter()
            .filter(|r| r.ended_ms.is_none())
            .map(|r| r.id)
            .collect(),
        runs: last_runs(env, &runs)?,
        patches: patches(env)?,
        monitor: monitor(env)?,
        daemon,
    })
}

/// Each LC of `rows` with its role and its state now.
pub fn lc_lines(env: &Env, rows: &[patchover_store::LcRow]) -> Vec<LcLine> {
    rows.iter().map(|r| lc_line(env, &r.spec, r.role)).collect()
}

fn lc_line(env: &Env, spec: &LcSpec, role: Role) -> LcLine {
    let st = env.backend.status(spec);
    LcLine {
        id: spec.id.to_string(),
        backend: spec.backend,
        role,
        pid: st.as_ref().ok().and_then(|s| s.pid),
        state: st.as_ref().ok().map(|s| s.state),
        error: st.err().map(|e| patchover_core::error_chain(&e)),
    }
}

fn service(env: &Env, active: Option<&LcSpec>) -> ServiceState {
    let mut s = ServiceState {
        address: env.config.network.service_address.map(|a| a.to_string()),
        port: env.config.service.port,
        lc: active.map(|a| a.id.to_string()),
        lc_address: None,
        answers: None,
        detail: None,
    };
    let Some(spec) = active else {
        s.detail =
            Some("no LC is active; give one the service with `patchover service assign LC`".into());
        return s;
    };
    match check(env, spec, &mut s.lc_address) {
        Ok(Ok(())) => s.answers = Some(true),
        Ok(Err(failed)) => (s.answers, s.detail) = (Some(false), Some(failed)),
        Err(unknown) => s.detail = Some(unknown),
    }
    s
}

/// The configured check inside `spec` to its own address: `Ok(Err)` when it failed,
/// `Err` when it could not be made.
fn check(
    env: &Env,
    spec: &LcSpec,
    lc_address: &mut Option<String>,
) -> Result<Result<(), String>, String> {
    let chain = |e: &dyn std::error::Error| patchover_core::error_chain(e);
    *lc_address = spec
        .nics
        .first()
        .and_then(|n| n.address)
        .map(|a| a.addr.to_string());
    match env.backend.status(spec) {
        Ok(st) if st.state == LcState::Running => {}
        Ok(st) => return Err(format!("LC {} is {}", spec.id, st.state)),
        Err(e) => return Err(chain(&e)),
    }
    let ep = patchover_orchestrator::cycle_endpoint(&env.backend, spec).map_err(|e| chain(&e))?;
    let mut hc =
        patchover_orchestrator::service::health(&env.config.service).map_err(|e| chain(&e))?;
    hc.patience = hc.patience.min(CHECK_PATIENCE);
    let lc = ep.access.open().map_err(|e| chain(&e))?;
    let by_backend = RunByBackend {
        backend: &env.backend,
        spec,
    };
    Ok(patchover_net::health::check_own(
        Inside::of(&*lc).running(&by_backend),
        &ep.iface,
        ep.address.addr,
        &hc,
    )
    .map_err(|e| chain(&e)))
}

fn last_runs(env: &Env, runs: &[RunRow]) -> Result<Vec<RunLine>, AppError> {
    let mut out = Vec::new();
    for r in runs.iter().rev().take(LAST_RUNS) {
        let kind = crate::runs::kind(&env.store.steps(r.id)?);
        out.push(RunLine {
            id: r.id,
            kind: if r.dry_run {
                format!("{kind} (dry run)")
            } else {
                kind.to_owned()
            },
            lc: r.lc.clone(),
            mode: r.mode.clone(),
            state: r.state.clone(),
            outcome: r.outcome.clone(),
            started_ms: r.started_ms,
            duration_ms: r.ended_ms.map(|e| e - r.started_ms),
        });
    }
    Ok(out)
}

/// The patches not applied yet, pending and approved.
pub fn patches(env: &Env) -> Result<PatchLines, AppError> {
    let mut lines = PatchLines {
        pending: Vec::new(),
        approved: Vec::new(),
    };
    for p in env.store.patches()? {
        if p.applied_ms.is_some() {
            continue;
        }
        let line = PatchLine {
            id: p.id,
            title: p.title,
            severity: p.severity,
        };
        if p.apply_next {
            lines.approved.push(line);
        } else {
            lines.pending.push(line);
        }
    }
    Ok(lines)
}

/// The monitor's feeds and open challenges (`None` without `[monitor]`).
pub fn monitor(env: &Env) -> Result<Option<MonitorState>, AppError> {
    if env.config.monitor.is_none() {
        return Ok(None);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    Ok(Some(MonitorState {
        feeds: env
            .store
            .feed_states()?
            .into_iter()
            .map(|f| FeedLine {
                name: f.feed,
                last_poll_ms: f.last_checked_ms,
                last_ok_ms: f.last_ok_ms,
                failures: f.failures,
                last_error: f.last_error,
            })
            .collect(),
        open_challenges: env
            .store
            .challenges()?
            .iter()
            .filter(|c| c.used_ms.is_none() && c.expires_ms > now)
            .count(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(dir: &std::path::Path, extra: &str) -> Env {
        let text = format!(
            "state_dir = \"{0}/state\"\nrun_dir = \"{0}/run\"\n[network]\nbridge = \"pobst0\"\n{extra}",
            dir.display()
        );
        let host = patchover_core::HostFacts {
            cpus: 2,
            memory_mib: 1024,
        };
        let config = patchover_core::Config::parse(&dir.join("po.toml"), &text, &host).unwrap();
        Env::open(config).unwrap()
    }

    fn daemon() -> DaemonState {
        DaemonState {
            socket: PathBuf::from("/nonexistent.sock"),
            answers: false,
            pid: None,
            running_runs: None,
        }
    }

    #[test]
    fn the_last_five_runs_newest_first_with_their_kind_and_the_open_ones() {
        let d = tempfile::tempdir().unwrap();
        let mut env = env(d.path(), "");
        let s = &mut env.store;
        let rollback = serde_json::json!({"standby": "b", "rollback": true});
        for (lc, dry, back) in [("a", false, false), ("b", false, true), ("c", true, false)] {
            let id = s.begin_run(lc, "readdress", dry).unwrap();
            s.record_step(id, "standby_search", "started", None)
                .unwrap();
            let detail = back.then_some(&rollback);
            s.record_step(id, "standby_search", "done", detail).unwrap();
            s.end_run(id, "switched", &serde_json::json!({})).unwrap();
        }
        for lc in ["d", "e", "f"] {
            s.begin_run(lc, "path", false).unwrap();
        }
        let st = status(&env, daemon()).unwrap();
        let ids: Vec<i64> = st.runs.iter().map(|r| r.id).collect();
        assert_eq!(ids, [6, 5, 4, 3, 2]);
        let kinds: Vec<&str> = st.runs.iter().map(|r| r.kind.as_str()).collect();
        assert_eq!(
            kinds,
            ["patch", "patch", "patch", "patch (dry run)", "rollback"]
        );
        assert_eq!(st.runs[4].outcome.as_deref(), Some("switched"));
        assert!(st.runs[4].duration_ms.is_some_and(|d| d >= 0));
        assert_eq!(st.runs[0].duration_ms, None);
        assert_eq!(st.open_runs, [4, 5, 6]);
        // No LC is active: the service is not checked, and the status says why.
        assert_eq!(st.service.answers, None);
        assert!(st.service.detail.unwrap().contains("service assign"));
        assert_eq!(st.monitor, None);
    }
}
