//! Seed step 708: the standby reboots so the patches take effect.

use std::time::Duration;

use crate::OrchestratorError;
use crate::context::{Orchestrator, Run};

pub(super) fn run(
    o: &mut Orchestrator<'_>,
    run: &mut Run,
) -> Result<serde_json::Value, OrchestratorError> {
    let standby = run.standby()?;
    let st = o
        .backend
        .reboot(&super::boot_standby::boot_spec(standby, run.req.mode))?;
    o.backend.wait_agent(standby, Duration::from_secs(30))?;
    Ok(serde_json::json!({"pid": st.pid}))
}

#[cfg(test)]
mod tests {
    use super::super::Step;
    use super::super::fake::Bed;

    #[test]
    fn the_standby_reboots_as_it_booted_and_its_agent_answers_again() {
        let mut bed = Bed::new();
        bed.step(Step::StandbySearch).unwrap();
        let d = bed.step(Step::RebootStandby).unwrap();
        assert!(d["pid"].is_number(), "{d}");
        let calls = bed.backend.calls();
        assert!(
            calls.contains(&"reboot lc2 app=none nic0=bridge".to_owned()),
            "{calls:?}"
        );
        assert_eq!(calls.last().map(String::as_str), Some("wait_agent lc2"));
        bed.backend.fail("wait_agent");
        assert!(bed.step(Step::RebootStandby).is_err());
    }
}
