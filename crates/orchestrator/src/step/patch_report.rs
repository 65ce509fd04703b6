//! Seed steps 1201–1207: the standby's boot script applies each patch marked for the run with
//! the OS's own tools, records each result in its table copy, and reports the table back
//! (1207). The report is a claim of an untrusted LC: it is judged, then recorded in the patch
//! table. A patch that failed stops the run; the service stays on the active LC.

use std::time::{Duration, Instant};

use patchover_agent::apply::PatchReport;
use patchover_agent::{Request, Response};
use patchover_bundle::BundleStatus;
use patchover_core::LcSpec;
use patchover_lc::{LcBackend, LcState};
use patchover_store::PatchResult;

use crate::OrchestratorError;
use crate::context::{Orchestrator, Run};

pub(super) fn run(
    o: &mut Orchestrator<'_>,
    run: &mut Run,
) -> Result<serde_json::Value, OrchestratorError> {
    let standby = run.standby()?;
    let r = wait_report(
        o.backend,
        standby,
        &run.id().to_string(),
        &run.staged(),
        o.settings.report_timeout,
    )?;
    for b in &r.report.bundles {
        let result = match b.status {
            BundleStatus::Ok => PatchResult::Ok,
            BundleStatus::Failed => PatchResult::Failed,
            BundleStatus::Skipped => PatchResult::Skipped,
        };
        let mut text = b.output.clone();
        if let Some(e) = &b.error {
            text.push_str(&format!("\n[{}] {e}", b.status.as_str()));
        }
        o.store
            .record_patch_result(&b.id, standby.id.as_str(), result, &text)?;
    }
    run.report.patches = r.report.bundles.clone();
    // The report was received and recorded (the step is done); a failed patch ends the run.
    run.halt = r.report.failed().map(|f| OrchestratorError::PatchFailed {
        id: f.id.clone(),
        step: f.step,
        error: f.error.clone().unwrap_or_default(),
        output: f.output.clone(),
    });
    Ok(serde_json::to_value(&r).unwrap_or_default())
}

/// Waits for the standby's patch report (1207) for this run.
fn wait_report(
    backend: &dyn LcBackend,
    standby: &LcSpec,
    run_id: &str,
    staged: &[&str],
    timeout: Duration,
) -> Result<PatchReport, OrchestratorError> {
    let start = Instant::now();
    loop {
        let client = match backend.agent(standby) {
            Err(
                e @ patchover_lc::LcError::Agent {
                    source: patchover_agent::AgentError::Replaced { .. },
                    ..
                },
            ) => return Err(e.into()),
            c => c,
        };
        if let Ok(mut c) = client
            && let Ok(Response::Report { report: Some(v) }) = c.call(&Request::Report)
        {
            // Once the LC says something, it is judged, not waited on: a report this run did
            // not stage is refused at once, and nothing of it is recorded.
            let r = serde_json::from_value::<PatchReport>(v)
                .map_err(|e| OrchestratorError::BadReport(format!("not a patch report: {e}")))?;
            check_report(&r, run_id, standby.id.as_str(), staged)
                .map_err(OrchestratorError::BadReport)?;
            return Ok(r);
        }
        if start.elapsed() >= timeout {
            return Err(OrchestratorError::ReportTimeout(timeout));
        }
        if backend.status(standby)?.state == LcState::Stopped {
            return Err(patchover_lc::LcError::NotRunning(standby.id.clone()).into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the standby reports (1207) is a claim of an untrusted LC: it must be for this run and
/// this LC, and name exactly the bundles staged for it, in order, with the agent's own rule
/// (after a failure the rest are skipped). Returns why not.
pub(crate) fn check_report(
    r: &PatchReport,
    run_id: &str,
    lc: &str,
    staged: &[&str],
) -> Result<(), String> {
    if r.run_id != run_id {
        return Err(format!(
            "the report is for run {:?}, this run is {run_id}",
            r.run_id
        ));
    }
    if r.lc != lc {
        return Err(format!(
            "the report is for LC {:?}, the standby is {lc}",
            r.lc
        ));
    }
    let got: Vec<&str> = r.report.bundles.iter().map(|b| b.id.as_str()).collect();
    if got != staged {
        return Err(format!(
            "the report names the bundles {got:?}, this run staged {staged:?}"
        ));
    }
    let mut failed = false;
    for b in &r.report.bundles {
        if failed && b.status != BundleStatus::Skipped {
            return Err(format!(
                "the report has bundle {} {} after a failed one (the agent skips the rest)",
                b.id,
                b.status.as_str()
            ));
        }
        failed |= b.status == BundleStatus::Failed;
    }
    if r.all_ok != r.report.all_ok() {
        return Err("the report's all_ok contradicts its bundles".into());
    }
    Ok(())
}

#[cfg(test)]
mod report_tests {
    use super::check_report;
    use patchover_agent::apply::PatchReport;

    fn report(run: &str, lc: &str, bundles: &[(&str, &str)]) -> PatchReport {
        let all_ok = bundles.iter().all(|(_, s)| *s == "ok");
        let b: Vec<_> = bundles
            .iter()
            .map(|(id, st)| {
                serde_json::json!({"id": id, "status": st, "exit_code": null, "output": "",
                    "duration_ms": 1, "step": null, "error": null, "finished_unix": 0})
            })
            .collect();
        serde_json::from_value(
            serde_json::json!({"run_id": run, "lc": lc, "all_ok": all_ok, "bundles": b}),
        )
        .unwrap()
    }

    #[test]
    fn only_the_staged_bundles_of_this_run_are_accepted() {
        let staged = ["a", "b"];
        let ok = report("7", "lc2", &[("a", "ok"), ("b", "ok")]);
        check_report(&ok, "7", "lc2", &staged).unwrap();
        let failed = report("7", "lc2", &[("a", "failed"), ("b", "skipped")]);
        check_report(&failed, "7", "lc2", &staged).unwrap();
        for (r, why) in [
            (report("8", "lc2", &[("a", "ok"), ("b", "ok")]), "run"),
            (report("", "lc2", &[("a", "ok"), ("b", "ok")]), "run"),
            (report("7", "lc1", &[("a", "ok"), ("b", "ok")]), "LC"),
            (report("7", "lc2", &[]), "staged"),
            (report("7", "lc2", &[("a", "ok")]), "staged"),
            (report("7", "lc2", &[("b", "ok"), ("a", "ok")]), "staged"),
            (
                report("7", "lc2", &[("a", "ok"), ("b", "ok"), ("evil", "ok")]),
                "staged",
            ),
            (
                report("7", "lc2", &[("a", "failed"), ("b", "ok")]),
                "after a failed",
            ),
        ] {
            let e = check_report(&r, "7", "lc2", &staged).unwrap_err();
            assert!(e.contains(why), "{why}: {e}");
        }
        let mut lie = report("7", "lc2", &[("a", "failed"), ("b", "skipped")]);
        lie.all_ok = true;
        assert!(check_report(&lie, "7", "lc2", &staged).is_err());
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::Step;
    use super::super::fake::Bed;

    fn report(run: i64, lc: &str) -> serde_json::Value {
        serde_json::json!({"run_id": run.to_string(), "lc": lc, "all_ok": true, "bundles": []})
    }

    #[test]
    fn the_report_of_this_run_is_accepted_and_recorded() {
        let mut bed = Bed::new();
        bed.step(Step::StandbySearch).unwrap();
        bed.backend.agent_reports(Some(report(bed.run.id(), "lc2")));
        let d = bed.step(Step::PatchReport).unwrap();
        assert_eq!(d["lc"], "lc2");
        assert!(bed.run.halt.is_none());
    }

    #[test]
    fn a_report_for_another_run_is_refused_at_once() {
        let mut bed = Bed::new();
        bed.settings.report_timeout = Duration::from_secs(30);
        bed.step(Step::StandbySearch).unwrap();
        bed.backend
            .agent_reports(Some(report(bed.run.id() + 1, "lc2")));
        let t = std::time::Instant::now();
        let e = bed.step(Step::PatchReport).unwrap_err();
        assert!(matches!(e, crate::OrchestratorError::BadReport(_)), "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn no_report_is_a_timeout_and_a_stopped_standby_ends_the_wait() {
        let mut bed = Bed::new();
        bed.settings.report_timeout = Duration::from_millis(300);
        bed.step(Step::StandbySearch).unwrap();
        bed.backend.running(&["lc1", "lc2"]);
        bed.backend.agent_reports(None);
        let e = bed.step(Step::PatchReport).unwrap_err();
        assert!(
            matches!(e, crate::OrchestratorError::ReportTimeout(_)),
            "{e:?}"
        );
        bed.settings.report_timeout = Duration::from_secs(30);
        bed.backend.running(&["lc1"]);
        let e = bed.step(Step::PatchReport).unwrap_err();
        assert!(e.to_string().contains("not running"), "{e}");
    }
}
