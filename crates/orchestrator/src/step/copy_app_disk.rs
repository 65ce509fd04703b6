//! Seed step 704: the application disk, copied while the service writes and followed (its
//! writes trapped) until the cut in the switch window, so every write the service confirmed
//! before the switch is on the standby.

use super::Step;
use crate::context::{Orchestrator, Run};
use crate::progress::Meter;
use crate::{OrchestratorError, copy};

pub(super) fn run(
    o: &mut Orchestrator<'_>,
    run: &mut Run,
) -> Result<serde_json::Value, OrchestratorError> {
    let (Some(src), Some(dst)) = (run.active.app_disk.clone(), run.standby()?.app_disk.clone())
    else {
        return Err(OrchestratorError::OutOfOrder {
            step: "copy_app_disk",
            needs: "an application disk on both LCs",
        });
    };
    copy::clear_disk(&dst.path, "application")?;
    // Armed before the copy starts: a stateless service's every write from now on is seen.
    crate::stateless::watch(o, run)?;
    let meter = Meter::new(run.id(), Step::CopyAppDisk, o.progress.clone());
    run.follow = Some(copy::LiveCopy::start(
        o.backend,
        &run.active,
        &src,
        &dst,
        std::sync::Arc::new(meter),
    )?);
    Ok(serde_json::json!({"src": src.path, "dst": dst.path, "follow": true}))
}

#[cfg(test)]
mod tests {
    use super::super::Step;
    use super::super::fake::Bed;

    #[test]
    fn the_copy_is_started_and_kept_following() {
        let mut bed = Bed::new();
        bed.step(Step::StandbySearch).unwrap();
        assert!(Step::CopyAppDisk.applies(&bed.run, &bed.settings.service));
        let d = bed.step(Step::CopyAppDisk).unwrap();
        assert_eq!(d["follow"], true);
        assert!(bed.run.follow.is_some());
        // The copy reports under the step that started it (it goes on during later steps).
        let seen = bed.progress.lock().unwrap().clone();
        assert!(seen.iter().all(|e| e.step == "copy_app_disk"), "{seen:?}");
        assert_eq!(seen.last().map(|e| (e.bytes, e.total)), Some((8192, 8192)));
        assert!(
            bed.backend
                .calls()
                .iter()
                .any(|c| c.starts_with("live_copy lc1 "))
        );
    }

    #[test]
    fn an_lc_without_an_application_disk_has_nothing_to_follow() {
        let mut bed = Bed::new();
        bed.step(Step::StandbySearch).unwrap();
        bed.run.active.app_disk = None;
        assert!(!Step::CopyAppDisk.applies(&bed.run, &bed.settings.service));
        assert!(bed.step(Step::CopyAppDisk).is_err());
    }
}
