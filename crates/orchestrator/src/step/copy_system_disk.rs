//! Seed step 703: the active LC's system disk onto the standby's, while the service runs; the
//! writes made meanwhile are trapped and replayed until the copy has caught up (fig. 8–10).

use super::Step;
use crate::context::{Orchestrator, Run};
use crate::progress::Meter;
use crate::{OrchestratorError, copy};

pub(super) fn run(
    o: &mut Orchestrator<'_>,
    run: &mut Run,
) -> Result<serde_json::Value, OrchestratorError> {
    let dst = run.standby()?.system_disk.path.clone();
    copy::clear_disk(&dst, "system")?;
    let meter = Meter::new(run.id(), Step::CopySystemDisk, o.progress.clone());
    let r = copy::copy_system(o.backend, &run.active, &dst, &meter)?;
    run.report.bytes_copied += r.bytes_copied;
    run.report.bytes_replayed += r.bytes_replayed;
    Ok(r.detail)
}

#[cfg(test)]
mod tests {
    use super::super::Step;
    use super::super::fake::Bed;

    #[test]
    fn the_standby_disk_is_emptied_then_copied_by_the_backend() {
        let mut bed = Bed::new();
        bed.step(Step::StandbySearch).unwrap();
        let dst = bed.disk("lc2", "sys");
        std::fs::write(dst.join("stale"), "from an older run").unwrap();
        let d = bed.step(Step::CopySystemDisk).unwrap();
        assert!(!dst.join("stale").exists(), "the old contents went first");
        assert_eq!(d["fake"], "system");
        assert_eq!(bed.run.report.bytes_copied, 4096);
        // The backend's copier reported through the step's meter: a start, then the end.
        let seen = bed.progress.lock().unwrap().clone();
        let steps_bytes: Vec<_> = seen.iter().map(|e| (e.step.as_str(), e.bytes)).collect();
        assert_eq!(
            steps_bytes,
            [("copy_system_disk", 0), ("copy_system_disk", 4096)]
        );
        assert!(seen[1].is_done() && seen[1].run_id == bed.run.id());
        assert!(
            bed.backend
                .calls()
                .iter()
                .any(|c| c.starts_with("copy_system lc1 "))
        );
    }

    #[test]
    fn a_failed_copy_fails_the_step() {
        let mut bed = Bed::new();
        bed.step(Step::StandbySearch).unwrap();
        bed.backend.fail("copy_system");
        let e = bed.step(Step::CopySystemDisk).unwrap_err();
        assert!(crate::chain(&e).contains("copying the system disk"), "{e}");
    }
}
