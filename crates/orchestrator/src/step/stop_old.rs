//! After the switch (seed step 8): the old LC is stopped and kept intact, as the target of a
//! later rollback; the roles change in the resource table. A stateless service whose old LC
//! wrote its disk after the switch fails the run here, once the old LC is stopped (its writes
//! kept on its disk).

use patchover_store::Role;

use crate::OrchestratorError;
use crate::context::{Orchestrator, Run};

pub(super) fn run(
    o: &mut Orchestrator<'_>,
    run: &mut Run,
) -> Result<serde_json::Value, OrchestratorError> {
    let standby = run.standby()?;
    o.backend.stop(&run.active)?;
    o.store.set_role(standby.id.as_str(), Role::Active)?;
    o.store.set_role(run.active.id.as_str(), Role::Standby)?;
    run.halt = run.fail_after_stop.take();
    Ok(serde_json::json!({"rollback_target": run.active.id}))
}

#[cfg(test)]
mod tests {
    use super::super::Step;
    use super::super::fake::Bed;
    use patchover_store::Role;

    #[test]
    fn the_old_lc_stops_and_the_roles_swap() {
        let mut bed = Bed::new();
        bed.backend.running(&["lc1", "lc2"]);
        bed.run.standby = bed.config.lc("lc2").cloned();
        let d = bed.step(Step::StopOld).unwrap();
        assert_eq!(d["rollback_target"], "lc1");
        assert!(bed.backend.calls().contains(&"stop lc1".to_owned()));
        assert_eq!(bed.role("lc2"), Role::Active);
        assert_eq!(bed.role("lc1"), Role::Standby);
    }
}
