//! `path` (seed fig. 13/14, one NIC identity): both LCs have the same MAC and the service
//! address; the bridge port of the old LC is swapped for the standby's inside the pause.

use std::time::Duration;

use super::common::Ctx;
use super::paused::Move;
use super::{SwitchError, on};

/// The live path before a `path` switch: the old LC's port is on the bridge, the standby's
/// is not (two ports with one MAC on a bridge would share its traffic).
pub(super) fn check_live(ctx: &Ctx<'_>) -> Result<(), SwitchError> {
    let plan = ctx.plan;
    if !ctx
        .addr
        .port_on_bridge(ctx.net, &ctx.bridge, &plan.from.host_port)?
    {
        return Err(SwitchError::State(format!(
            "{} ({}) is not a port of {}; the service is not on {}",
            plan.from.host_port, plan.from.name, plan.bridge, plan.from.name
        )));
    }
    if ctx
        .addr
        .port_on_bridge(ctx.net, &ctx.bridge, &plan.to.host_port)?
    {
        return Err(SwitchError::State(format!(
            "{} ({}) is already a port of {}: two LCs would share one MAC",
            plan.to.host_port, plan.to.name, plan.bridge
        )));
    }
    Ok(())
}

/// The bridge port swap.
pub(super) struct Path;

impl Move for Path {
    fn move_service(&self, ctx: &Ctx<'_>, forward: bool) -> Result<u32, SwitchError> {
        let [(_, a_port, _), (b, b_port, b_lc)] = ctx.sides(forward);
        ctx.net.set_controller(a_port.index, None)?;
        ctx.net
            .set_controller(b_port.index, Some(ctx.bridge.index))?;
        ctx.net.set_up(b_port.index, true)?;
        // One announcement makes the bridge learn the MAC on the new port at once instead of
        // flooding until the LC sends something.
        b_lc.announce(&b.iface, b.mac, ctx.plan.service.addr, 1, Duration::ZERO)
            .map_err(on(b))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{bed, rolled_back_because};
    use super::super::{Mode, SwitchError};

    #[test]
    fn path_swaps_the_bridge_port_while_new_connections_are_held() {
        let bed = bed(Mode::Path);
        bed.net.held(4);
        let sw = bed.switch().unwrap();
        assert_eq!(
            bed.net.ops(),
            [
                "who-has 10.0.0.10 on br",
                "b: get 10.0.0.10:8080/version",
                "b: prepare addresses=false announce=true",
                "a: prepare addresses=false announce=false",
                "prepare check",
                "hold 10.0.0.10:8080 queue 7 prime pob",
                "drain a",
                "window",
                "port poa nomaster",
                "port pob master br",
                "port pob up",
                "b: announce 10.0.0.10 x1",
                "check 10.0.0.10 expect lc-b",
                "release",
            ]
        );
        assert_eq!((sw.report.held_syns, sw.report.garp_sent), (4, 1));
        assert!(sw.refresh.is_none());
        assert_eq!(bed.net.holder().as_deref(), Some("b"));
    }

    #[test]
    fn path_puts_the_port_back_when_the_standby_does_not_answer_through_it() {
        let bed = bed(Mode::Path);
        bed.net.fail("check");
        let e = bed.switch().unwrap_err();
        assert!(
            rolled_back_because(&e, |c| matches!(c, SwitchError::Check { .. })),
            "{e:?}"
        );
        assert_eq!(
            bed.ops_after_checks()[10..],
            [
                "check 10.0.0.10 expect lc-b",
                "port pob nomaster",
                "port poa master br",
                "port poa up",
                "a: announce 10.0.0.10 x1",
                "resume a",
                "release",
            ]
        );
        assert!(bed.net.port_on_bridge("poa") && !bed.net.port_on_bridge("pob"));
        assert_eq!(bed.net.holder().as_deref(), Some("a"));
    }

    #[test]
    fn path_changes_nothing_when_the_standby_port_is_already_bridged() {
        let bed = bed(Mode::Path);
        {
            use crate::network::Network;
            let to = bed.net.link("pob").unwrap().unwrap();
            // Put the standby's port on the bridge behind the switcher's back.
            bed.net.set_controller(to.index, Some(1)).unwrap();
        }
        bed.net.clear();
        bed.net.fail("port"); // would show up as a failed rollback if anything moved
        let e = bed.switch().unwrap_err();
        assert!(
            matches!(&e, SwitchError::State(m) if m.contains("already a port of br")),
            "{e:?}"
        );
        assert!(bed.net.ops().is_empty(), "{:?}", bed.net.ops());
    }

    #[test]
    fn path_failed_rollback_leaves_the_service_where_recovery_finds_it() {
        // The port cannot be moved back: the switch says so, and recovery's question "who
        // holds the service address" answers the standby, whose port stayed on the bridge.
        let bed = bed(Mode::Path);
        bed.net.fail("check").fail("port pob nomaster");
        let e = bed.switch().unwrap_err();
        assert!(
            matches!(&e, SwitchError::RollbackFailed { rollback, .. } if rollback.contains("moving back")),
            "{e:?}"
        );
        assert!(bed.net.ops().contains(&"resume a".to_string()));
        assert_eq!(bed.net.holder().as_deref(), Some("b"));
    }
}
