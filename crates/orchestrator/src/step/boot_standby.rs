//! Seed step 707: the standby boots from its patched system disk and its boot script applies
//! the patches (1201–1206). It boots without its application disk: that disk is still a live
//! copy until the cut, and is attached in the switch window. In `path` mode the standby has
//! the active LC's MAC and address, so its NIC stays off the bridge until the switch moves the
//! path to it.

use std::time::Duration;

use patchover_core::LcSpec;
use patchover_net::Mode;

use crate::OrchestratorError;
use crate::context::{Orchestrator, Run};

pub(super) fn run(
    o: &mut Orchestrator<'_>,
    run: &mut Run,
) -> Result<serde_json::Value, OrchestratorError> {
    let standby = run.standby()?;
    let st = o.backend.boot(&boot_spec(standby, run.req.mode))?;
    o.backend.wait_agent(standby, Duration::from_secs(30))?;
    Ok(serde_json::json!({"pid": st.pid}))
}

/// The standby as it boots for the run (and reboots, 708).
pub(super) fn boot_spec(standby: &LcSpec, mode: Mode) -> LcSpec {
    let mut spec = LcSpec {
        app_disk: None,
        ..standby.clone()
    };
    if mode == Mode::Path
        && let Some(n) = spec.nics.first_mut()
    {
        n.detached = true;
    }
    spec
}

#[cfg(test)]
mod tests {
    use super::super::Step;
    use super::super::fake::Bed;
    use patchover_net::Mode;

    #[test]
    fn the_standby_boots_without_its_application_disk_and_waits_for_its_agent() {
        let mut bed = Bed::new();
        bed.step(Step::StandbySearch).unwrap();
        bed.step(Step::BootStandby).unwrap();
        let calls = bed.backend.calls();
        let boot = calls
            .iter()
            .position(|c| c == "boot lc2 app=none nic0=bridge");
        let wait = calls.iter().position(|c| c == "wait_agent lc2");
        assert!(boot.is_some() && boot < wait, "{calls:?}");
    }

    #[test]
    fn in_path_mode_the_standby_stays_off_the_bridge() {
        let mut bed = Bed::with_mode(Mode::Path);
        bed.step(Step::StandbySearch).unwrap();
        bed.step(Step::BootStandby).unwrap();
        assert!(
            bed.backend
                .calls()
                .contains(&"boot lc2 app=none nic0=detached".to_owned())
        );
    }

    #[test]
    fn a_failed_boot_fails_the_step() {
        let mut bed = Bed::new();
        bed.step(Step::StandbySearch).unwrap();
        bed.backend.fail("boot");
        assert!(bed.step(Step::BootStandby).is_err());
        assert!(!bed.backend.calls().contains(&"wait_agent lc2".to_owned()));
    }
}
