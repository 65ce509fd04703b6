//! Seed step 703: the active LC's system disk onto the standby's, while the service runs; the
//! writes made meanwhile are trapped and replayed until the copy has caught up (fig. 8–10).

use crate::context::{Orchestrator, Run};
use crate::{OrchestratorError, copy};

pub(super) fn run(
    o: &mut Orchestrator<'_>,
    run: &mut Run,
) -> Result<serde_json::Value, OrchestratorError> {
    let dst = run.standby()?.system_disk.path.clone();
    copy::clear_disk(&dst, "system")?;
    let r = copy::copy_system(o.backend, &run.active, &dst)?;
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
