//! Seed step 704, a dry run's end: the application disk's copy is cut (the active LC held
//! still for its last writes) without a switch, so the patched standby is left complete.

use crate::OrchestratorError;
use crate::context::{Orchestrator, Run};

pub(super) fn run(
    o: &mut Orchestrator<'_>,
    run: &mut Run,
) -> Result<serde_json::Value, OrchestratorError> {
    let Some(f) = run.follow.take() else {
        return Ok(serde_json::json!({"skipped": "no application disk"}));
    };
    let r = f.cut(o.backend, &run.active)?;
    run.report.bytes_replayed += r.bytes_replayed;
    run.report.freeze_ms = r.freeze_ms;
    Ok(r.detail)
}

#[cfg(test)]
mod tests {
    use super::super::Step;
    use super::super::fake::Bed;

    #[test]
    fn the_copy_is_cut_with_the_active_lc_held_still() {
        let mut bed = Bed::new();
        bed.step(Step::StandbySearch).unwrap();
        let d = bed.step(Step::CutAppDisk).unwrap();
        assert_eq!(d["skipped"], "no application disk");
        bed.step(Step::CopyAppDisk).unwrap();
        bed.step(Step::CutAppDisk).unwrap();
        assert!(bed.run.follow.is_none());
        assert_eq!(bed.run.report.bytes_replayed, 7);
        let calls = bed.backend.calls();
        let i = calls.iter().position(|c| c == "freeze lc1").unwrap();
        assert_eq!(
            calls[i + 1..i + 3],
            ["cut lc1".to_owned(), "thaw lc1".to_owned()]
        );
    }
}
