//! `seamless` (seed embodiment 2, fig. 21–26): no pause. One atomic NAT batch on the host sends
//! new flows to the standby; flows the old LC accepted stay there (conntrack decided their NAT
//! at their first packet) and its replies leave with the service address (the kernel's reverse
//! NAT: the seed's packet-change program). Then the old LC drains.

use crate::network::NftChange;

use super::common::{BACKGROUND_DRAIN_POLL, Ctx};
use super::phase::{CHECK, DRAIN, Laps, MOVE, PREPARE, WINDOW};
use super::{Hooks, SwitchError, SwitchReport, Switched, ms, rolled_back};

/// The live path before a `seamless` switch: the NAT points at the old LC.
pub(super) fn check_live(ctx: &Ctx<'_>) -> Result<(), SwitchError> {
    let plan = ctx.plan;
    let target = ctx.addr.nat_target(ctx.net)?;
    if target != Some(plan.from.address.addr) {
        return Err(SwitchError::State(format!(
            "the service NAT of {} points at {} instead of {} ({}); run seamless setup first",
            plan.service.addr,
            target.map_or("nothing".to_string(), |t| t.to_string()),
            plan.from.address.addr,
            plan.from.name
        )));
    }
    Ok(())
}

/// Points the service NAT at the standby (`forward`) or back at the old LC.
fn move_nat(ctx: &Ctx<'_>, forward: bool) -> Result<(), SwitchError> {
    let [_, (b, _, _)] = ctx.sides(forward);
    let change = NftChange::ServiceNat {
        service: ctx.plan.service.addr,
        target: b.address.addr,
    };
    Ok(ctx.net.nft("service NAT switch", &change)?)
}

/// Switch the NAT at once, check, then let the old LC drain.
pub(super) fn run(ctx: &Ctx<'_>, hooks: &mut Hooks<'_>) -> Result<Switched, SwitchError> {
    let plan = ctx.plan;
    // Runs at low priority (entered in `switch`).
    let mut laps = Laps::starting(ctx.t0);
    ctx.ready()?;
    laps.lap(PREPARE);
    move_nat(ctx, true)?;
    laps.lap(MOVE);
    if let Err(cause) = ctx.check_to() {
        let mut rb = Vec::new();
        if let Err(e) = move_nat(ctx, false) {
            rb.push(format!("NAT back: {e}"));
        }
        return Err(rolled_back(plan, cause, rb));
    }
    laps.lap(CHECK);
    let first = ctx.t0.elapsed();
    hooks
        .service
        .drain(&plan.from)
        .map_err(|source| SwitchError::Hook {
            hook: "drain",
            source,
        })?;
    let waited = ctx.wait_drained(BACKGROUND_DRAIN_POLL);
    let (drain, left) = (waited.took, waited.left);
    if left > 0 {
        tracing::warn!(left, from = %plan.from.name, "old LC still has connections at the drain deadline");
    }
    ctx.net.forget_udp_flows(plan.from.address.addr);
    laps.lap(DRAIN);
    let tw = laps.mark();
    (hooks.in_window)(plan).map_err(|source| SwitchError::Hook {
        hook: "in_window",
        source,
    })?;
    laps.lap(WINDOW);
    Ok(Switched {
        report: SwitchReport {
            drain_ms: ms(drain),
            leftover_connections: left,
            drain_looks: waited.looks,
            drain_first_look_ms: ms(waited.first_look),
            first_request_ms: ms(first),
            window_ms: ms(laps.mark().saturating_duration_since(tw)),
            phases: laps.into_phases(),
            ..ctx.report()
        },
        refresh: None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::testing::{bed, rolled_back_because};
    use super::super::{Mode, SwitchError};

    fn ip(s: &str) -> Option<std::net::Ipv4Addr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn seamless_points_the_nat_at_once_then_lets_the_old_lc_drain() {
        let bed = bed(Mode::Seamless);
        let sw = bed.switch().unwrap();
        assert_eq!(
            bed.net.ops(),
            [
                "b: get 10.0.0.3:8080/version",
                "b: prepare addresses=false announce=false",
                "a: prepare addresses=false announce=false",
                "prepare check",
                "prepare nft",
                "nft service NAT switch: nat 10.0.0.10 -> 10.0.0.3",
                "check 10.0.0.10 expect lc-b",
                "drain a",
                "forget udp flows of 10.0.0.2",
                "window",
            ]
        );
        assert_eq!(sw.report.pause_ms, 0.0);
        let names: Vec<&str> = sw.report.phases.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["prepare", "move", "check", "drain", "window"]);
        assert_eq!(sw.report.leftover_connections, 0);
        assert_eq!(bed.net.holder().as_deref(), Some("b"));
    }

    #[test]
    fn seamless_points_the_nat_back_when_the_standby_does_not_answer_through_it() {
        let bed = bed(Mode::Seamless);
        bed.net.fail("check");
        let e = bed.switch().unwrap_err();
        assert!(
            rolled_back_because(&e, |c| matches!(c, SwitchError::Check { .. })),
            "{e:?}"
        );
        assert_eq!(
            bed.ops_after_checks()[4..],
            [
                "nft service NAT switch: nat 10.0.0.10 -> 10.0.0.3",
                "check 10.0.0.10 expect lc-b",
                "nft service NAT switch: nat 10.0.0.10 -> 10.0.0.2",
            ]
        );
        assert_eq!(bed.net.nat(), (ip("10.0.0.2"), ip("10.0.0.2")));
        assert_eq!(bed.net.holder().as_deref(), Some("a"));
    }

    #[test]
    fn seamless_reports_leftover_connections_and_keeps_the_switch() {
        let bed = bed(Mode::Seamless);
        bed.net.busy("a", 3);
        let sw = bed.switch().unwrap();
        assert_eq!(sw.report.leftover_connections, 3);
        assert!(
            bed.net
                .ops()
                .contains(&"forget udp flows of 10.0.0.2".to_string())
        );
        assert_eq!(bed.net.holder().as_deref(), Some("b"));
    }

    #[test]
    fn seamless_changes_nothing_when_the_nat_points_elsewhere() {
        let bed = bed(Mode::Seamless);
        let mut plan = bed.plan.reversed();
        plan.lock_path = bed.plan.lock_path.clone();
        let mut ctl = bed.net.control();
        let mut window = |_: &super::super::SwitchPlan| Ok(());
        let mut hooks = super::super::Hooks {
            service: &mut ctl,
            in_window: &mut window,
        };
        let e = super::super::switch_with(&bed.net, &plan, &mut hooks).unwrap_err();
        assert!(
            matches!(&e, SwitchError::State(m) if m.contains("points at 10.0.0.2 instead of 10.0.0.3")),
            "{e}"
        );
        assert!(bed.net.ops().is_empty(), "{:?}", bed.net.ops());
    }

    #[test]
    fn seamless_failed_nat_back_leaves_the_service_where_recovery_finds_it() {
        let bed = bed(Mode::Seamless);
        bed.net
            .fail("check")
            .fail("nft service NAT switch: nat 10.0.0.10 -> 10.0.0.2");
        let e = bed.switch().unwrap_err();
        assert!(
            matches!(&e, SwitchError::RollbackFailed { rollback, .. } if rollback.contains("NAT back")),
            "{e:?}"
        );
        assert_eq!(bed.net.nat(), (ip("10.0.0.3"), ip("10.0.0.3")));
        assert_eq!(bed.net.holder().as_deref(), Some("b"));
    }
}
