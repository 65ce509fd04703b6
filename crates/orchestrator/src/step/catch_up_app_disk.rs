//! Seed step 704, continued: a block-level copy of the application disk catches up while the
//! service runs, so that the cut in the switch window leaves little to copy. Copies that keep
//! up by themselves (the file copier, QEMU's mirror) skip it (see [`super::Step::applies`]).

use crate::OrchestratorError;
use crate::context::{Orchestrator, Run};

pub(super) fn run(
    _o: &mut Orchestrator<'_>,
    run: &mut Run,
) -> Result<serde_json::Value, OrchestratorError> {
    let follow = run.follow.as_mut().ok_or(OrchestratorError::OutOfOrder {
        step: "catch_up_app_disk",
        needs: "the application disk's copy (704)",
    })?;
    Ok(follow.catch_up()?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::super::Step;
    use super::super::fake::Bed;

    #[test]
    fn only_a_copy_that_catches_up_is_asked_to() {
        let mut bed = Bed::new();
        bed.step(Step::StandbySearch).unwrap();
        assert!(
            !Step::CatchUpAppDisk.applies(&bed.run, &bed.settings.service),
            "no copy yet"
        );
        bed.step(Step::CopyAppDisk).unwrap();
        assert!(!Step::CatchUpAppDisk.applies(&bed.run, &bed.settings.service));
        bed.backend.copies_catch_up();
        bed.step(Step::CopyAppDisk).unwrap();
        assert!(Step::CatchUpAppDisk.applies(&bed.run, &bed.settings.service));
        let d = bed.step(Step::CatchUpAppDisk).unwrap();
        assert_eq!(d["rounds"], 1);
        bed.backend.fail("catch_up");
        assert!(bed.step(Step::CatchUpAppDisk).is_err());
    }
}
