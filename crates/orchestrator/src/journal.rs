//! The run journal, typed: each step is written before it acts and after it ends, and read
//! back as [`Step`]s for recovery.
//!
//! The store keeps the names ([`Step::as_str`]), the same a run has always been journaled
//! with, so `patchover runs show` and a journal written by an older patchover read alike.

use std::time::Instant;

use patchover_store::{Store, StoreError};

use crate::context::{Orchestrator, Run};
use crate::step::{Step, StepState};
use crate::{OrchestratorError, StepTiming, chain};

/// One journal line, read back.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// `None`: a name no step of this patchover has (it is kept, not acted on).
    pub step: Option<Step>,
    pub state: Option<StepState>,
    /// The name as journaled.
    pub name: String,
    pub state_name: String,
}

/// Writes one line.
pub(crate) fn record(
    store: &mut Store,
    run: i64,
    step: Step,
    state: StepState,
    detail: Option<&serde_json::Value>,
) -> Result<(), StoreError> {
    store.record_step(run, step.as_str(), state.as_str(), detail)
}

/// A run's journal, typed.
pub fn read(store: &Store, run: i64) -> Result<Vec<Entry>, StoreError> {
    Ok(store
        .steps(run)?
        .into_iter()
        .map(|r| Entry {
            step: r.step.parse().ok(),
            state: r.state.parse().ok(),
            name: r.step,
            state_name: r.state,
        })
        .collect())
}

/// How far a run got, as recovery needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reached {
    /// The switch never started: the service never moved.
    BeforeSwitch,
    /// The switch started and did not finish: whoever holds the service address decides.
    SwitchStarted,
    /// The switch was done: the service is on the standby (and a watch, if any, passed).
    SwitchDone,
    /// The service was being watched on the standby (issue 23): whether it is healthy now
    /// decides.
    Watching,
    /// A failed watch's hand-back started and did not end: whoever holds the service decides.
    HandingBack,
    /// The hand-back went through: the service is on the old LC.
    HandedBack,
    /// The hand-back did not go through: both LCs were kept running.
    HandBackFailed,
}

/// Where the journal `entries` says a run got.
pub fn reached(entries: &[Entry]) -> Reached {
    entries
        .iter()
        .fold(Reached::BeforeSwitch, |r, e| match (e.step, e.state) {
            (Some(Step::Switch), Some(StepState::Done)) => Reached::SwitchDone,
            (Some(Step::Switch), Some(_)) if r == Reached::BeforeSwitch => Reached::SwitchStarted,
            (Some(Step::Watch), Some(StepState::Started)) => Reached::Watching,
            (Some(Step::Watch), Some(StepState::Done)) => Reached::SwitchDone,
            (Some(Step::HandBack), Some(StepState::Started)) => Reached::HandingBack,
            (Some(Step::HandBack), Some(StepState::Done)) => Reached::HandedBack,
            (Some(Step::HandBack), Some(StepState::Failed)) => Reached::HandBackFailed,
            _ => r,
        })
}

/// The front's state (`[service.front]`, docs/postgres.md), journaled beside the steps as a
/// `front_paused` line before its `PAUSE` is sent and a `front_released` line once it let its
/// clients go (each `done`, the journal's states being a step's), so that recovery of a dead
/// run knows whether the front still holds its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontState {
    Paused,
    Released,
}

impl FrontState {
    /// The name of its journal line.
    pub fn as_str(self) -> &'static str {
        match self {
            FrontState::Paused => "front_paused",
            FrontState::Released => "front_released",
        }
    }
}

/// Writes a front line; durable on return.
pub(crate) fn record_front(
    store: &mut Store,
    run: i64,
    state: FrontState,
    detail: &serde_json::Value,
) -> Result<(), StoreError> {
    store.record_step(run, state.as_str(), StepState::Done.as_str(), Some(detail))
}

/// The front's state as the journal `entries` last recorded it (`None`: no front line, a run
/// with no front or a journal written before the front's lines).
pub fn front(entries: &[Entry]) -> Option<FrontState> {
    entries.iter().rev().find_map(|e| {
        [FrontState::Paused, FrontState::Released]
            .into_iter()
            .find(|s| s.as_str() == e.name)
    })
}

/// The last line, as `step:state` (`start` for an empty journal).
pub fn last(entries: &[Entry]) -> String {
    entries
        .last()
        .map(|e| format!("{}:{}", e.name, e.state_name))
        .unwrap_or_else(|| "start".into())
}

impl Orchestrator<'_> {
    /// Records `step` as started, runs it, records it done (with its detail) or failed.
    pub(crate) fn journaled(&mut self, run: &mut Run, step: Step) -> Result<(), OrchestratorError> {
        let id = run.id();
        let name = step.as_str();
        record(self.store, id, step, StepState::Started, None)?;
        self.emit(id, name, "started", None);
        tracing::info!(run = id, step = name, "step started");
        let t = Instant::now();
        let res = step.run(self, run);
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        let (state, detail, ok) = match &res {
            Ok(detail) => {
                let mut detail = detail.clone();
                if let serde_json::Value::Object(m) = &mut detail {
                    m.insert("ms".into(), ms.into());
                }
                (StepState::Done, detail, true)
            }
            Err(e) => {
                tracing::warn!(run = id, step = name, error = %chain(e), "step failed");
                (
                    StepState::Failed,
                    serde_json::json!({"error": chain(e), "ms": ms}),
                    false,
                )
            }
        };
        record(self.store, id, step, state, Some(&detail))?;
        self.emit(id, name, state.as_str(), Some(detail));
        run.report.steps.push(StepTiming {
            step: name.to_owned(),
            ms,
            ok,
        });
        res.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A journal written the way every patchover so far wrote it: bare names.
    fn old_form(lines: &[(&str, &str)]) -> (tempfile::TempDir, Store, i64) {
        let d = tempfile::tempdir().unwrap();
        let mut store = Store::open(&d.path().join("state.db")).unwrap();
        let run = store.begin_run("lc1", "readdress", false).unwrap();
        for (step, state) in lines {
            store.record_step(run, step, state, None).unwrap();
        }
        (d, store, run)
    }

    #[test]
    fn an_old_journal_reads_back_as_steps_and_says_how_far_the_run_got() {
        let (_d, store, run) = old_form(&[
            ("standby_search", "started"),
            ("standby_search", "done"),
            ("copy_system_disk", "started"),
        ]);
        let e = read(&store, run).unwrap();
        assert_eq!(e[0].step, Some(Step::StandbySearch));
        assert_eq!(e[2].state, Some(StepState::Started));
        assert_eq!(reached(&e), Reached::BeforeSwitch);
        assert_eq!(last(&e), "copy_system_disk:started");

        let (_d, store, run) = old_form(&[("boot_standby", "done"), ("switch", "started")]);
        assert_eq!(reached(&read(&store, run).unwrap()), Reached::SwitchStarted);
        let (_d, store, run) = old_form(&[("switch", "started"), ("switch", "failed")]);
        assert_eq!(reached(&read(&store, run).unwrap()), Reached::SwitchStarted);
        let (_d, store, run) = old_form(&[("switch", "started"), ("switch", "done")]);
        assert_eq!(reached(&read(&store, run).unwrap()), Reached::SwitchDone);
    }

    #[test]
    fn a_watch_and_its_hand_back_say_how_far_the_run_got() {
        let at = |lines: &[(&str, &str)]| {
            let (_d, store, run) = old_form(lines);
            reached(&read(&store, run).unwrap())
        };
        let switched = [("switch", "started"), ("switch", "done")];
        let watching = [&switched[..], &[("watch", "started")]].concat();
        assert_eq!(at(&watching), Reached::Watching);
        let watched = [&watching[..], &[("watch", "done"), ("stop_old", "started")]].concat();
        assert_eq!(at(&watched), Reached::SwitchDone);
        let failed = [&watching[..], &[("watch_failed", "done")]].concat();
        assert_eq!(at(&failed), Reached::Watching, "no hand-back yet");
        let handing = [&failed[..], &[("hand_back", "started")]].concat();
        assert_eq!(at(&handing), Reached::HandingBack);
        let back = [&handing[..], &[("hand_back", "done"), ("watch", "failed")]].concat();
        assert_eq!(at(&back), Reached::HandedBack);
        let kept = [
            &handing[..],
            &[("hand_back", "failed"), ("watch", "failed")],
        ]
        .concat();
        assert_eq!(at(&kept), Reached::HandBackFailed);
    }

    #[test]
    fn the_fronts_last_line_is_its_state_and_does_not_move_the_run() {
        let (_d, store, run) = old_form(&[
            ("switch", "started"),
            ("front_paused", "done"),
            ("front_released", "done"),
            ("front_paused", "done"),
        ]);
        let e = read(&store, run).unwrap();
        assert_eq!(front(&e), Some(FrontState::Paused));
        assert_eq!(reached(&e), Reached::SwitchStarted);
        assert_eq!(e[1].step, None, "not a step");
        let (_d, store, run) = old_form(&[("front_paused", "done"), ("front_released", "done")]);
        assert_eq!(
            front(&read(&store, run).unwrap()),
            Some(FrontState::Released)
        );
        let (_d, store, run) = old_form(&[("switch", "started"), ("switch", "done")]);
        assert_eq!(front(&read(&store, run).unwrap()), None);
    }

    #[test]
    fn an_unknown_name_is_kept_and_not_acted_on() {
        let (_d, store, run) = old_form(&[("switch", "started"), ("teleport", "done")]);
        let e = read(&store, run).unwrap();
        assert_eq!(e[1].step, None);
        assert_eq!(reached(&e), Reached::SwitchStarted);
        assert_eq!(last(&e), "teleport:done");
        assert_eq!(last(&[]), "start");
    }
}
