//! Seed step 701: find an unused LC whose resources cover the active one's (fig. 5). A
//! rollback names its target instead: the old LC an earlier run stopped and kept.

use patchover_core::LcSpec;
use patchover_lc::LcState;
use patchover_store::Role;

use crate::context::{Orchestrator, Run};
use crate::{OrchestratorError, standby};

pub(super) fn run(
    o: &mut Orchestrator<'_>,
    run: &mut Run,
) -> Result<serde_json::Value, OrchestratorError> {
    let (standby, detail) = match &run.req.rollback_to {
        Some(target) => {
            let t = rollback_target(o, &run.active, target)?;
            let detail = serde_json::json!({"standby": t.id, "rollback": true});
            (t, detail)
        }
        None => {
            let s = unused_lc(o, &run.active)?;
            let detail = serde_json::json!({"standby": s.id});
            (s, detail)
        }
    };
    o.store.set_run_standby(run.id(), standby.id.as_str())?;
    run.report.standby = Some(standby.id.to_string());
    let _ = o.store.set_role(standby.id.as_str(), Role::Standby);
    run.standby = Some(standby);
    Ok(detail)
}

/// The old LC a rollback hands the service back to: stopped, and able to take the service.
fn rollback_target(
    o: &Orchestrator<'_>,
    active: &LcSpec,
    target: &str,
) -> Result<LcSpec, OrchestratorError> {
    let bad = |m: String| OrchestratorError::BadInput(m);
    let t = o
        .config
        .lc(target)
        .ok_or_else(|| bad(format!("unknown LC {target:?}")))?
        .clone();
    if t.id == active.id {
        return Err(bad(format!("LC {target} already runs the service")));
    }
    if o.backend.status(&t)?.state != LcState::Stopped {
        return Err(bad(format!(
            "LC {target} is running; a rollback target is a stopped LC kept by an earlier run"
        )));
    }
    if let Some(why) = t.shortfall_against(active) {
        return Err(bad(format!("LC {target} cannot take the service: {why}")));
    }
    Ok(t)
}

/// The first stopped LC that covers `active`, with disks of the same kinds.
fn unused_lc(o: &Orchestrator<'_>, active: &LcSpec) -> Result<LcSpec, OrchestratorError> {
    let backend = o.backend;
    let kinds = |l: &LcSpec| l.disks().map(|d| d.kind).collect::<Vec<_>>();
    Ok(standby::find_standby(
        o.config,
        active,
        &|c| {
            backend
                .status(c)
                .map(|st| st.state != LcState::Stopped)
                .unwrap_or(true)
        },
        &|c| {
            (kinds(c) != kinds(active)).then(|| {
                "its disks are not of the same kinds (directory/image) as the active LC's"
                    .to_owned()
            })
        },
    )?
    .clone())
}

#[cfg(test)]
mod tests {
    use super::super::Step;
    use super::super::fake::Bed;

    #[test]
    fn picks_a_stopped_lc_and_journals_it_as_the_standby() {
        let mut bed = Bed::new();
        bed.backend.running(&["lc1"]);
        let detail = bed.step(Step::StandbySearch).unwrap();
        assert_eq!(detail["standby"], "lc2");
        assert_eq!(bed.run.standby.as_ref().unwrap().id.as_str(), "lc2");
        assert_eq!(
            bed.store
                .run(bed.run.id())
                .unwrap()
                .unwrap()
                .standby
                .as_deref(),
            Some("lc2")
        );
    }

    #[test]
    fn a_running_lc_is_no_standby() {
        let mut bed = Bed::new();
        bed.backend.running(&["lc1", "lc2"]);
        let e = bed.step(Step::StandbySearch).unwrap_err();
        assert!(e.to_string().contains("lc2: is running"), "{e}");
        assert!(bed.run.standby.is_none());
    }

    #[test]
    fn a_rollback_target_must_be_stopped_and_not_the_active_lc() {
        let mut bed = Bed::rollback("lc2");
        bed.backend.running(&["lc1", "lc2"]);
        let e = bed.step(Step::StandbySearch).unwrap_err();
        assert!(e.to_string().contains("lc2 is running"), "{e}");
        let mut bed = Bed::rollback("lc1");
        let e = bed.step(Step::StandbySearch).unwrap_err();
        assert!(e.to_string().contains("already runs the service"), "{e}");
        let mut bed = Bed::rollback("lc2");
        bed.backend.running(&["lc1"]);
        let detail = bed.step(Step::StandbySearch).unwrap();
        assert_eq!(detail["rollback"], true);
    }
}
