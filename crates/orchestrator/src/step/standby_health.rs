//! Seed step 709 (and 8, "check it"): the service answers on the standby's own address, as
//! the standby, before any client is sent there.

use std::time::Duration;

use crate::context::{Orchestrator, Run};
use crate::service::{RunByBackend, get};
use crate::{OrchestratorError, access};
use patchover_core::LcSpec;
use patchover_lc::LcBackend;
use patchover_net::health::{HealthError, Inside};
use patchover_net::{Endpoint, HealthCheck};

pub(super) fn run(
    o: &mut Orchestrator<'_>,
    run: &mut Run,
) -> Result<serde_json::Value, OrchestratorError> {
    let standby = run.standby()?;
    let to = access::endpoint(o.backend, standby)?;
    let hc = crate::service::health(&o.settings.service)?;
    check_service(o.backend, standby, &to, &hc, false)?;
    run.report.version_after = o.settings.service.version_path.as_ref().and_then(|p| {
        get(
            &to.access,
            to.address.addr,
            o.settings.service.port,
            p,
            Duration::from_secs(2),
        )
        .ok()
    });
    run.to = Some(to);
    Ok(serde_json::json!({"version": run.report.version_after}))
}

/// The `[service]` check `hc` made inside `spec`, to its own address (`to`): the standby's
/// before the switch, and the new active LC's at each interval of a watch (`super::watch`),
/// which first asks whether anything still listens on the service's port (`listening`: a
/// connection refused there is a service process gone, not a slow answer).
pub(crate) fn check_service(
    backend: &dyn LcBackend,
    spec: &LcSpec,
    to: &Endpoint,
    hc: &HealthCheck,
    listening: bool,
) -> Result<(), OrchestratorError> {
    let health = |e: HealthError| OrchestratorError::Health(Box::new(e));
    let lc = to.access.open().map_err(|e| health(e.into()))?;
    if listening {
        let at = std::net::SocketAddr::from((to.address.addr, hc.port));
        lc.connect(at, hc.timeout).map_err(|e| health(e.into()))?;
    }
    let by_backend = RunByBackend { backend, spec };
    patchover_net::health::check_own(
        Inside::of(&*lc).running(&by_backend),
        &to.iface,
        to.address.addr,
        hc,
    )
    .map_err(health)
}

#[cfg(test)]
mod tests {
    use super::super::Step;
    use super::super::fake::Bed;

    #[test]
    fn a_standby_that_cannot_be_reached_is_not_healthy() {
        let mut bed = Bed::new();
        bed.step(Step::StandbySearch).unwrap();
        bed.backend.running(&["lc1", "lc2"]);
        let e = bed.step(Step::StandbyHealth).unwrap_err();
        assert!(matches!(e, crate::OrchestratorError::Health(_)), "{e:?}");
        assert!(bed.run.to.is_none(), "no endpoint to switch to");
    }

    #[test]
    fn a_stopped_standby_has_no_endpoint() {
        let mut bed = Bed::new();
        bed.step(Step::StandbySearch).unwrap();
        let e = bed.step(Step::StandbyHealth).unwrap_err();
        assert!(e.to_string().contains("not running"), "{e}");
    }
}
