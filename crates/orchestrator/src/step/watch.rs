//! Issue 23: the watch after the switch, and the hand-back of a failed one.
//!
//! For `[service] watch_secs` after the switch, the service is checked on the new active LC
//! every `watch_interval_ms`: the bundles' post-checks once, by its agent (as 709 did on the
//! standby); then at each interval that something still listens on the service's port (a
//! refused connection is a service process gone) and the `[service]` health check, made
//! inside the LC to its own address, given one interval to pass (`super::standby_health`).
//!
//! Meanwhile the old LC stays booted and its application disk follows the new active LC's
//! writes: the same live copy as 704 with source and destination swapped (the old service
//! keeps running on the files it had open, serves nobody, and is restarted on the cut, see
//! below). A healthy watch ends
//! that copy and `stop_old` stops the old LC as always. A failed one journals `watch_failed`
//! (the reason), then hands the service back: an ordinary switch to the still-running old LC
//! (`super::switch::hand_back`) whose window cuts the reverse copy with the failed LC held
//! still, attaches the cut under the old LC's service and restarts it there, exactly as the
//! switch's take-over did the other way. The failed LC is then stopped, the old one is the
//! active LC again, and the run fails naming why (`handed-back`). A hand-back that does not
//! go through (the old LC fails its check too) leaves both LCs running, the service where
//! the switcher left it (undone: on the new LC), and the run `hand-back-failed`.

use std::time::{Duration, Instant};

use patchover_core::LcSpec;
use patchover_lc::{LcBackend, LcState};
use patchover_net::{Endpoint, HealthCheck};
use patchover_store::Role;

use super::{Step, StepState, post_checks, standby_health, switch};
use crate::context::{Orchestrator, Run};
use crate::copy::LiveCopy;
use crate::{OrchestratorError, RunReport, chain, copy, journal};

/// The journal line of a failed watch (beside the steps, like the front's lines), with the
/// reason in its detail.
pub const WATCH_FAILED: &str = "watch_failed";

/// What a watch asks of the new active LC.
pub(crate) trait Probe {
    /// The bundles' post-checks, once.
    fn post_checks(&mut self) -> Result<(), String>;
    /// One interval's check of the service.
    fn check(&mut self) -> Result<(), String>;
}

/// How a watch ended.
#[derive(Debug, PartialEq)]
pub(crate) enum Verdict {
    Healthy {
        checks: u32,
    },
    Failed {
        reason: String,
        checks: u32,
        after: Duration,
    },
}

/// Watches for `secs`, a check every `every` (the first at once); the first failure ends it.
pub(crate) fn watch(probe: &mut dyn Probe, secs: Duration, every: Duration) -> Verdict {
    let start = Instant::now();
    let mut checks = 0;
    let failed = |reason: String, checks: u32| Verdict::Failed {
        reason,
        checks,
        after: start.elapsed(),
    };
    if let Err(reason) = probe.post_checks() {
        return failed(reason, checks);
    }
    loop {
        let t = Instant::now();
        if let Err(reason) = probe.check() {
            return failed(reason, checks);
        }
        checks += 1;
        let left = secs.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Verdict::Healthy { checks };
        }
        std::thread::sleep(every.saturating_sub(t.elapsed()).min(left));
    }
}

/// The watch's checks made on a real LC through its backend.
struct OnLc<'a> {
    backend: &'a dyn LcBackend,
    spec: &'a LcSpec,
    to: &'a Endpoint,
    hc: HealthCheck,
}

impl Probe for OnLc<'_> {
    fn post_checks(&mut self) -> Result<(), String> {
        post_checks::ask(self.backend, self.spec)
            .and_then(|r| post_checks::judge(&r))
            .map_err(|e| chain(&e))
    }
    fn check(&mut self) -> Result<(), String> {
        standby_health::check_service(self.backend, self.spec, self.to, &self.hc, true)
            .map_err(|e| chain(&e))
    }
}

/// The old LC's application disk follows the new active LC's (`None`: no application disk):
/// emptied (a directory stays, the old LC has it mounted), then the copy of 704 the other way
/// round.
pub(crate) fn reverse_follow(
    backend: &dyn LcBackend,
    (new, old): (&LcSpec, &LcSpec),
) -> Result<Option<LiveCopy>, OrchestratorError> {
    let (Some(src), Some(dst)) = (&new.app_disk, &old.app_disk) else {
        return Ok(None);
    };
    copy::empty_disk(&dst.path, "application")?;
    // A copy kept up in the background while the service is watched, not a step's work to
    // show: no progress.
    let quiet = std::sync::Arc::new(patchover_lc::NoProgress);
    LiveCopy::start(backend, new, src, dst, quiet).map(Some)
}

pub(super) fn run(
    o: &mut Orchestrator<'_>,
    run: &mut Run,
) -> Result<serde_json::Value, OrchestratorError> {
    let new = run.standby()?.clone();
    let to = run.to()?.clone();
    let svc = &o.settings.service;
    let hc = HealthCheck {
        patience: svc.watch_interval,
        ..crate::service::health(svc)?
    };
    // Without it the watch goes on: a hand-back then starts the copy itself (`hand_back`).
    let follow = reverse_follow(o.backend, (&new, &run.active))
        .inspect_err(|e| tracing::warn!(lc = %run.active.id, error = %chain(e), "the old LC's application disk cannot follow the new LC's; a hand-back copies it whole"))
        .ok()
        .flatten();
    let mut probe = OnLc {
        backend: o.backend,
        spec: &new,
        to: &to,
        hc,
    };
    let verdict = watch(&mut probe, svc.watch, svc.watch_interval);
    conclude(o, run, follow, verdict)
}

/// What the watch's verdict leads to: a healthy watch ends the reverse copy (the old LC
/// stops next, and a rollback copies its application disk again); a failed one is journaled
/// (`watch_failed`) and hands the service back.
fn conclude(
    o: &mut Orchestrator<'_>,
    run: &mut Run,
    follow: Option<LiveCopy>,
    verdict: Verdict,
) -> Result<serde_json::Value, OrchestratorError> {
    let (reason, checks, after) = match verdict {
        Verdict::Healthy { checks } => {
            let following = follow.is_some();
            drop(follow);
            return Ok(serde_json::json!({
                "checks": checks,
                "secs": o.settings.service.watch.as_secs_f64(),
                "reverse_follow": following,
            }));
        }
        Verdict::Failed {
            reason,
            checks,
            after,
        } => (reason, checks, after),
    };
    let why = serde_json::json!({"reason": reason, "checks": checks, "after_ms": after.as_secs_f64() * 1000.0});
    o.store
        .record_step(run.id(), WATCH_FAILED, StepState::Done.as_str(), Some(&why))?;
    let (new, old) = (run.standby()?.clone(), run.active.clone());
    tracing::warn!(run = run.id(), lc = %new.id, %reason, "the watch failed; handing the service back");
    let (id, mode) = (run.id(), run.req.mode);
    Err(hand_back_failed(
        o,
        id,
        &mut run.report,
        (&new, &old),
        mode,
        follow,
        reason,
    ))
}

/// A failed watch: the hand-back ([`hand_back`]), and the error the run ends with.
fn hand_back_failed(
    o: &mut Orchestrator<'_>,
    run_id: i64,
    report: &mut RunReport,
    (new, old): (&LcSpec, &LcSpec),
    mode: patchover_net::Mode,
    follow: Option<LiveCopy>,
    reason: String,
) -> OrchestratorError {
    let (lc, back_to) = (new.id.to_string(), old.id.to_string());
    match hand_back(o, run_id, report, (new, old), mode, follow) {
        Ok(_) => OrchestratorError::HandedBack {
            lc,
            back_to,
            reason,
        },
        Err(e) => OrchestratorError::HandBackFailed {
            lc,
            back_to,
            reason,
            source: Box::new(e),
        },
    }
}

/// The hand-back, journaled as [`Step::HandBack`] (by a failed watch and by recovery): the
/// reverse copy (`follow`, or a new one: recovery's, or a watch whose copy could not start),
/// the switch back to `old` (`super::switch::hand_back`), then `failed` stops and `old` is the
/// active LC again (`handed-back`). If the switch back does not go through, both LCs keep
/// running and the one holding the service is the active one (`hand-back-failed`).
pub(crate) fn hand_back(
    o: &mut Orchestrator<'_>,
    run_id: i64,
    report: &mut RunReport,
    (failed, old): (&LcSpec, &LcSpec),
    mode: patchover_net::Mode,
    follow: Option<LiveCopy>,
) -> Result<serde_json::Value, OrchestratorError> {
    let name = Step::HandBack.as_str();
    journal::record(o.store, run_id, Step::HandBack, StepState::Started, None)?;
    o.emit(run_id, name, StepState::Started.as_str(), None);
    let t = Instant::now();
    let follow = match follow {
        Some(f) => Ok(Some(f)),
        None => reverse_follow(o.backend, (failed, old)),
    };
    let done = follow
        .and_then(|f| switch::hand_back(o, run_id, report, (failed, old), mode, f))
        .and_then(|d| finish(o, (failed, old)).map(|()| d));
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    let (state, detail) = match &done {
        Ok(d) => (StepState::Done, d.clone()),
        Err(e) => (StepState::Failed, serde_json::json!({"error": chain(e)})),
    };
    journal::record(o.store, run_id, Step::HandBack, state, Some(&detail))?;
    o.emit(run_id, name, state.as_str(), Some(detail));
    report.steps.push(crate::StepTiming {
        step: name.to_owned(),
        ms,
        ok: done.is_ok(),
    });
    report.outcome = match done {
        Ok(_) => "handed-back",
        Err(_) => {
            // The switcher undid the hand-back: the service is on the new LC.
            let _ = o.store.set_role(failed.id.as_str(), Role::Active);
            let _ = o.store.set_role(old.id.as_str(), Role::Standby);
            "hand-back-failed"
        }
    }
    .into();
    done
}

/// The service is back on `old`: the failed LC stops (not a rollback target: unused).
pub(crate) fn finish(
    o: &mut Orchestrator<'_>,
    (failed, old): (&LcSpec, &LcSpec),
) -> Result<(), OrchestratorError> {
    if o.backend
        .status(failed)
        .is_ok_and(|st| st.state != LcState::Stopped)
    {
        o.backend.stop(failed)?;
    }
    o.store.set_role(old.id.as_str(), Role::Active)?;
    o.store.set_role(failed.id.as_str(), Role::Unused)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::Step;
    use super::super::fake::Bed;
    use super::*;

    /// Answers from a list, one per check (then passes); counts what it was asked.
    #[derive(Default)]
    struct Scripted {
        post: Option<String>,
        fail_at: Option<u32>,
        checks: u32,
    }

    impl Probe for Scripted {
        fn post_checks(&mut self) -> Result<(), String> {
            self.post.clone().map_or(Ok(()), Err)
        }
        fn check(&mut self) -> Result<(), String> {
            self.checks += 1;
            match self.fail_at {
                Some(n) if n == self.checks => Err(format!("check {n}: connection refused")),
                _ => Ok(()),
            }
        }
    }

    #[test]
    fn a_watch_checks_every_interval_and_ends_at_the_first_failure() {
        let ms = Duration::from_millis;
        let mut p = Scripted::default();
        let t = Instant::now();
        assert_eq!(
            watch(&mut p, ms(200), ms(50)),
            Verdict::Healthy { checks: p.checks }
        );
        assert!((4..=6).contains(&p.checks), "{} checks", p.checks);
        assert!(t.elapsed() >= ms(200));

        let mut p = Scripted {
            fail_at: Some(3),
            ..Scripted::default()
        };
        let Verdict::Failed { reason, checks, .. } = watch(&mut p, Duration::from_secs(60), ms(10))
        else {
            panic!("a failed check fails the watch")
        };
        assert_eq!(
            (reason.as_str(), checks),
            ("check 3: connection refused", 2)
        );

        let mut p = Scripted {
            post: Some("b1 check 0 (command): exit 3".into()),
            ..Scripted::default()
        };
        let v = watch(&mut p, Duration::from_secs(60), ms(10));
        assert!(
            matches!(&v, Verdict::Failed { reason, checks: 0, .. } if reason.contains("b1 check 0")),
            "{v:?}"
        );
        assert_eq!(p.checks, 0, "the post-checks come first");
    }

    /// A bed whose run switched to lc2 and watches it for a second.
    fn switched() -> Bed {
        switched_in(Bed::new())
    }

    fn switched_in(mut bed: Bed) -> Bed {
        bed.step(Step::StandbySearch).unwrap();
        bed.backend.running(&["lc1", "lc2"]);
        let mut to = bed.run.from.clone();
        to.name = "lc2".into();
        bed.run.to = Some(to);
        bed.run.report.outcome = "switched".into();
        bed.settings.service.watch = Duration::from_secs(1);
        bed.settings.service.watch_interval = Duration::from_millis(50);
        bed
    }

    #[test]
    fn the_watch_applies_only_with_watch_secs() {
        let mut bed = switched();
        assert!(Step::Watch.applies(&bed.run, &bed.settings.service));
        bed.settings.service.watch = Duration::ZERO;
        assert!(!Step::Watch.applies(&bed.run, &bed.settings.service));
    }

    /// A healthy watch: the old LC's disk followed the new LC's until the end, then the
    /// copy ends (the old LC is stopped by `stop_old` next, as without a watch).
    #[test]
    fn a_healthy_watch_ends_the_reverse_follow_and_leaves_both_running() {
        let mut bed = switched();
        let old_app = bed.disk("lc1", "app");
        let d = bed
            .with(|o, run| {
                let follow =
                    reverse_follow(o.backend, (run.standby.as_ref().unwrap(), &run.active))?;
                conclude(o, run, follow, Verdict::Healthy { checks: 20 })
            })
            .unwrap();
        assert_eq!(
            (d["checks"].as_u64(), d["reverse_follow"].as_bool()),
            (Some(20), Some(true))
        );
        let calls = bed.backend.calls();
        let follow = format!("live_copy lc2 {}", old_app.display());
        assert!(
            calls.contains(&follow),
            "source and destination swapped: {calls:?}"
        );
        assert!(calls.contains(&"drop copy lc2".to_owned()), "{calls:?}");
        assert!(!calls.iter().any(|c| c.starts_with("stop")), "{calls:?}");
        assert_eq!(bed.run.report.outcome, "switched");
    }

    /// The service fails its check on the new LC (here: it cannot be reached), and the old LC
    /// cannot be switched back to either (the fake has no network): the hand-back is
    /// journaled as failed, both LCs keep running, the report names both causes, and the
    /// service stays where it answered last (the new LC is the active one).
    #[test]
    fn a_watch_failing_during_a_failed_hand_back_keeps_both_lcs_and_says_why() {
        let mut bed = switched();
        bed.backend
            .exec_answers(br#"{"passed": true, "checks": []}"#, b"");
        let e = bed
            .with(|o, run| o.journaled(run, Step::Watch))
            .unwrap_err();
        let OrchestratorError::HandBackFailed {
            lc,
            back_to,
            reason,
            ..
        } = &e
        else {
            panic!("{e:?}")
        };
        assert_eq!((lc.as_str(), back_to.as_str()), ("lc2", "lc1"));
        assert!(reason.contains("not healthy"), "{reason}");
        let text = chain(&e);
        assert!(text.contains("both LCs are kept running"), "{text}");
        assert_eq!(
            bed.journal(),
            [
                "standby_search:started",
                "standby_search:done",
                "watch:started",
                "watch_failed:done",
                "hand_back:started",
                "hand_back:failed",
                "watch:failed"
            ]
        );
        let rows = bed.store.steps(bed.run.id()).unwrap();
        assert!(
            rows[3].detail.as_ref().unwrap()["reason"]
                .as_str()
                .unwrap()
                .contains("not healthy")
        );
        assert_eq!(bed.run.report.outcome, "hand-back-failed");
        let timed: Vec<_> = bed
            .run
            .report
            .steps
            .iter()
            .map(|t| (t.step.as_str(), t.ok))
            .collect();
        assert_eq!(timed[1..], [("hand_back", false), ("watch", false)]);
        let calls = bed.backend.calls();
        assert!(
            calls.iter().any(|c| c.ends_with("post-checks")),
            "{calls:?}"
        );
        assert!(
            !calls.iter().any(|c| c.starts_with("stop")),
            "both kept: {calls:?}"
        );
        assert!(calls.contains(&"drop copy lc2".to_owned()), "{calls:?}");
        assert_eq!(bed.role("lc2"), Role::Active);
        assert_eq!(bed.role("lc1"), Role::Standby);
        // The run's own failure path leaves them alone too.
        bed.with(|o, run| o.after_failure(run));
        assert!(!bed.backend.calls().iter().any(|c| c.starts_with("stop")));
    }

    /// A `seamless` hand-back asks nothing of the failed service but `stop` (it may be gone:
    /// no park, no forward) and takes over before the NAT flips back: the reverse copy is cut
    /// and attached under the old service first. Here the fake's old LC cannot be reached
    /// for its check after the restart, so the hand-back fails there, both LCs kept — but the
    /// cut came first, and no hand-off command ran on the failed LC.
    #[test]
    fn a_seamless_hand_back_takes_over_before_the_flip_and_never_parks_the_failed_service() {
        let mut bed = switched_in(Bed::with_mode(patchover_net::Mode::Seamless));
        bed.settings.service.park = vec!["park-it".into()];
        bed.settings.service.forward = vec!["forward-it".into()];
        bed.backend
            .exec_answers(br#"{"passed": true, "checks": []}"#, b"");
        let e = bed
            .with(|o, run| o.journaled(run, Step::Watch))
            .unwrap_err();
        assert!(
            matches!(e, OrchestratorError::HandBackFailed { .. }),
            "{e:?}"
        );
        let calls = bed.backend.calls();
        let at = |what: &str| calls.iter().position(|c| c.starts_with(what));
        let (cut, attach) = (at("cut lc2"), at("attach_disk lc1"));
        assert!(
            cut.is_some() && attach > cut,
            "cut, then attached: {calls:?}"
        );
        assert!(
            !calls
                .iter()
                .any(|c| c.contains("park-it") || c.contains("forward-it")),
            "no hand-off asked of the failed service: {calls:?}"
        );
        assert!(bed.journal().contains(&"hand_back:failed".to_owned()));

        // In readdress mode the take-over waits for the switcher's window (which the fake's
        // network never reaches).
        let mut bed = switched();
        bed.backend
            .exec_answers(br#"{"passed": true, "checks": []}"#, b"");
        bed.with(|o, run| o.journaled(run, Step::Watch))
            .unwrap_err();
        assert!(
            !bed.backend.calls().iter().any(|c| c.starts_with("cut lc2")),
            "{:?}",
            bed.backend.calls()
        );
    }

    /// An old LC whose disk cannot follow does not stop the watch; the hand-back tries the
    /// copy again (and here, failing again, keeps both LCs, saying why).
    #[test]
    fn a_reverse_copy_that_cannot_start_is_tried_again_by_the_hand_back() {
        let mut bed = switched();
        bed.backend
            .exec_answers(br#"{"passed": true, "checks": []}"#, b"");
        bed.backend.fail("live_copy");
        let e = bed
            .with(|o, run| o.journaled(run, Step::Watch))
            .unwrap_err();
        assert!(
            chain(&e).contains("live_copy fails (fake)"),
            "{}",
            chain(&e)
        );
        let copies = bed
            .backend
            .calls()
            .iter()
            .filter(|c| c.starts_with("live_copy lc2"))
            .count();
        assert_eq!(copies, 2, "at the watch's start and at the hand-back");
        assert!(bed.journal().contains(&"hand_back:failed".to_owned()));
    }

    /// Post-checks that fail on the new LC fail the watch before any interval's check.
    #[test]
    fn failed_post_checks_on_the_new_lc_fail_the_watch() {
        let mut bed = switched();
        bed.backend.exec_answers(
            br#"{"passed": false, "checks": [{"bundle": "b1", "index": 0, "kind": "command", "passed": false, "detail": "exit 3"}]}"#,
            b"",
        );
        let e = bed
            .with(|o, run| o.journaled(run, Step::Watch))
            .unwrap_err();
        assert!(
            chain(&e).contains("b1 check 0 (command): exit 3"),
            "{}",
            chain(&e)
        );
        let rows = bed.store.steps(bed.run.id()).unwrap();
        let failed = rows.iter().find(|r| r.step == WATCH_FAILED).unwrap();
        assert_eq!(failed.detail.as_ref().unwrap()["checks"], 0);
    }

    /// A hand-back that went through: the failed LC stops and is no rollback target; the old
    /// LC is the active one again.
    #[test]
    fn after_a_hand_back_the_failed_lc_stops_and_the_old_one_is_active() {
        let mut bed = switched();
        bed.with(|o, run| {
            let new = run.standby.clone().unwrap();
            finish(o, (&new, &run.active))
        })
        .unwrap();
        assert_eq!(bed.backend.calls(), ["stop lc2"]);
        assert_eq!(bed.role("lc1"), Role::Active);
        assert_eq!(bed.role("lc2"), Role::Unused);
    }
}
