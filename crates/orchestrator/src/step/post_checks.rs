//! Seed step 709: the bundles' post-checks, run by the agent on the patched standby. If one
//! fails, the service simply stays on the active LC.

use patchover_bundle::PostCheckReport;
use patchover_core::LcSpec;
use patchover_lc::{LcBackend, Stdio};

use crate::OrchestratorError;
use crate::context::{Orchestrator, Run};

/// The agent's directory on a standby, as a path inside the LC.
const AGENT_BIN_IN_LC: &str = "/var/lib/patchover-agent/patchover-agent";

pub(super) fn run(
    o: &mut Orchestrator<'_>,
    run: &mut Run,
) -> Result<serde_json::Value, OrchestratorError> {
    let rep = ask(o.backend, run.standby()?)?;
    run.report.post_checks = Some(rep.clone());
    judge(&rep)?;
    Ok(serde_json::to_value(&rep).unwrap_or_default())
}

/// Runs the bundles' post-checks in `lc` by its agent (the standby; the new active LC in a
/// watch, `super::watch`).
pub(super) fn ask(
    backend: &dyn LcBackend,
    lc: &LcSpec,
) -> Result<PostCheckReport, OrchestratorError> {
    let out = backend.exec(
        lc,
        &[AGENT_BIN_IN_LC.to_owned(), "post-checks".to_owned()],
        Stdio::Capture,
    )?;
    serde_json::from_slice(&out.stdout).map_err(|e| {
        OrchestratorError::PostCheck(format!(
            "no report from the standby ({e}): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    })
}

/// A report that did not pass fails with the failed checks named.
pub(super) fn judge(rep: &PostCheckReport) -> Result<(), OrchestratorError> {
    if rep.passed {
        return Ok(());
    }
    let failed: Vec<String> = rep
        .checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| format!("{} check {} ({}): {}", c.bundle, c.index, c.kind, c.detail))
        .collect();
    Err(OrchestratorError::PostCheck(failed.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::super::Step;
    use super::super::fake::Bed;

    #[test]
    fn passed_checks_pass_and_a_failed_one_is_named() {
        let mut bed = Bed::new();
        bed.step(Step::StandbySearch).unwrap();
        bed.backend
            .exec_answers(br#"{"passed": true, "checks": []}"#, b"");
        bed.step(Step::PostChecks).unwrap();
        assert!(bed.run.report.post_checks.as_ref().unwrap().passed);
        assert!(
            bed.backend
                .calls()
                .iter()
                .any(|c| c == "exec lc2 /var/lib/patchover-agent/patchover-agent post-checks")
        );

        bed.backend.exec_answers(
            br#"{"passed": false, "checks": [{"bundle": "b1", "index": 0, "kind": "command", "passed": false, "detail": "exit 3"}]}"#,
            b"",
        );
        let e = bed.step(Step::PostChecks).unwrap_err();
        assert!(
            e.to_string().contains("b1 check 0 (command): exit 3"),
            "{e}"
        );
        bed.backend.exec_answers(b"", b"agent: no such command");
        let e = bed.step(Step::PostChecks).unwrap_err();
        assert!(e.to_string().contains("no report from the standby"), "{e}");
    }
}
