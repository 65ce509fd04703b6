//! `seamless` with a hand-off, for services that write (each LC has its own data disk): the
//! old service parks (finishes what is in flight, holds the rest), `in_window` moves the last
//! writes to the standby and starts its service, the host's own connections are pointed at
//! the standby and checked through the service address, then the clients' NAT follows and the
//! old service forwards what it holds, and every later request on its connections, to the
//! standby. No SYN is held; requests that reach the old LC while it is parked wait for the
//! forward.

use std::time::Duration;

use crate::health::{self, Inside};
use crate::network::NftChange;

use super::common::{BACKGROUND_DRAIN_POLL, Ctx};
use super::phase::{CHECK, DRAIN, HOLD, Laps, MOVE, PREPARE, RELEASE, WINDOW};
use super::{BoxError, Hooks, RunOn, SwitchError, SwitchReport, Switched, ms, rolled_back};

fn hook(hook: &'static str) -> impl FnOnce(BoxError) -> SwitchError {
    move |source| SwitchError::Hook { hook, source }
}

/// Rollback while the clients' NAT still points at the old LC: the old service serves its held
/// requests itself.
fn unpark(
    ctx: &Ctx<'_>,
    hooks: &mut Hooks<'_>,
    cause: SwitchError,
    mut rb: Vec<String>,
) -> SwitchError {
    let plan = ctx.plan;
    if let Err(u) = hooks.service.unpark(&plan.from) {
        rb.push(format!("unpark {}: {u}", plan.from.name));
    }
    rolled_back(plan, cause, rb)
}

/// The NAT back at the old LC (the host's own connections were moved first).
fn nat_back(ctx: &Ctx<'_>) -> Vec<String> {
    let change = NftChange::ServiceNat {
        service: ctx.plan.service.addr,
        target: ctx.plan.from.address.addr,
    };
    ctx.net
        .nft("service NAT back", &change)
        .err()
        .map(|e| format!("NAT back: {e}"))
        .into_iter()
        .collect()
}

pub(super) fn run(ctx: &Ctx<'_>, hooks: &mut Hooks<'_>) -> Result<Switched, SwitchError> {
    let plan = ctx.plan;
    let s = plan.service.addr;
    let (old, new) = (plan.from.address.addr, plan.to.address.addr);
    let mut laps = Laps::starting(ctx.t0);
    ctx.ready()?;
    laps.lap(PREPARE);
    let t_park = laps.mark();
    if let Err(e) = hooks.service.park(&plan.from) {
        let rb = match hooks.service.unpark(&plan.from) {
            Ok(()) => Vec::new(),
            Err(u) => vec![format!("unpark {}: {u}", plan.from.name)],
        };
        return Err(rolled_back(plan, hook("park")(e), rb));
    }
    // Until the clients' NAT moves, a failure puts everything back: the standby has served
    // nobody but the switcher's check, so the old LC's data is still the whole truth.
    laps.lap(HOLD);
    let tw = laps.mark();
    if let Err(e) = (hooks.in_window)(plan) {
        return Err(unpark(ctx, hooks, hook("in_window")(e), Vec::new()));
    }
    laps.lap(WINDOW);
    let window = laps.mark().saturating_duration_since(tw);
    // The standby answered its own address (checked before the pause, and here once after).
    let hc = plan.health.expecting(&plan.to.identity);
    let run = RunOn {
        svc: &*hooks.service,
        ep: &plan.to,
    };
    if let Err(e) = health::check_in(Inside::of(&*ctx.to_lc).running(&run), new, &hc)
        .and_then(|()| health::own_address(&*ctx.to_lc, &plan.to.iface, new))
    {
        let cause = SwitchError::StandbyNotReady {
            to: plan.to.name.clone(),
            source: e,
        };
        return Err(unpark(ctx, hooks, cause, Vec::new()));
    }
    let host_first = NftChange::ServiceNatSplit {
        service: s,
        old,
        new,
    };
    if let Err(e) = ctx.net.nft("service NAT: the host first", &host_first) {
        return Err(unpark(ctx, hooks, e.into(), Vec::new()));
    }
    if let Err(cause) = ctx.check_to() {
        let rb = nat_back(ctx);
        return Err(unpark(ctx, hooks, cause, rb));
    }
    laps.lap(CHECK);
    let all = NftChange::ServiceNat {
        service: s,
        target: new,
    };
    if let Err(e) = ctx.net.nft("service NAT switch", &all) {
        let rb = nat_back(ctx);
        return Err(unpark(ctx, hooks, e.into(), rb));
    }
    laps.lap(MOVE);
    let first = ctx.t0.elapsed();
    // From here the standby serves clients: the old service must never serve again. A failed
    // forward leaves it parked (its held requests fail when the old LC stops) — reported,
    // never undone.
    let to = std::net::SocketAddr::from((new, plan.health.port));
    let mut forward = hooks.service.forward(&plan.from, to);
    for _ in 0..2 {
        if forward.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        forward = hooks.service.forward(&plan.from, to);
    }
    laps.lap(RELEASE);
    let pause = laps.mark().saturating_duration_since(t_park);
    if let Err(e) = &forward {
        tracing::error!(from = %plan.from.name, error = %e, "the old service did not take the forward; its held requests will fail");
    }
    let waited = ctx.wait_drained(BACKGROUND_DRAIN_POLL);
    let (drain, left) = (waited.took, waited.left);
    if left > 0 {
        tracing::warn!(left, from = %plan.from.name, "old LC still has connections at the drain deadline");
    }
    ctx.net.forget_udp_flows(old);
    laps.lap(DRAIN);
    if let Err(e) = forward {
        return Err(hook("forward")(e));
    }
    Ok(Switched {
        report: SwitchReport {
            pause_ms: ms(pause),
            drain_ms: ms(drain),
            leftover_connections: left,
            drain_looks: waited.looks,
            drain_first_look_ms: ms(waited.first_look),
            first_request_ms: ms(first),
            window_ms: ms(window),
            phases: laps.into_phases(),
            ..ctx.report()
        },
        refresh: None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::testing::{Bed, bed, rolled_back_because};
    use super::super::{Mode, SwitchError};

    fn handoff() -> Bed {
        let mut bed = bed(Mode::Seamless);
        bed.plan.handoff = true;
        bed
    }

    fn ip(s: &str) -> Option<std::net::Ipv4Addr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn handoff_parks_moves_the_host_first_then_the_clients_and_forwards() {
        let bed = handoff();
        let sw = bed.switch().unwrap();
        assert_eq!(
            bed.ops_after_checks(),
            [
                "b: prepare addresses=false announce=false",
                "a: prepare addresses=false announce=false",
                "prepare check",
                "prepare nft",
                "park a",
                "window",
                "b: get 10.0.0.3:8080/version",
                "nft service NAT: the host first: nat 10.0.0.10 -> 10.0.0.2, host -> 10.0.0.3",
                "check 10.0.0.10 expect lc-b",
                "nft service NAT switch: nat 10.0.0.10 -> 10.0.0.3",
                "forward a -> 10.0.0.3:8080",
                "forget udp flows of 10.0.0.2",
            ]
        );
        assert!(sw.report.pause_ms > 0.0);
        let r = &sw.report;
        let names: Vec<&str> = r.phases.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "prepare", "hold", "window", "check", "move", "release", "drain"
            ]
        );
        // The pause: from the park to the forward.
        let paused: f64 = r.phases[1..6].iter().map(|p| p.ms).sum();
        assert!((paused - r.pause_ms).abs() < 1e-6, "{r:?}");
        assert_eq!(bed.net.nat(), (ip("10.0.0.3"), ip("10.0.0.3")));
        assert_eq!(bed.net.holder().as_deref(), Some("b"));
    }

    #[test]
    fn handoff_failed_check_points_the_host_back_and_unparks() {
        let bed = handoff();
        bed.net.fail("check");
        let e = bed.switch().unwrap_err();
        assert!(
            rolled_back_because(&e, |c| matches!(c, SwitchError::Check { .. })),
            "{e:?}"
        );
        let ops = bed.ops_after_checks();
        let at = ops.iter().position(|o| o.starts_with("check")).unwrap();
        assert_eq!(
            ops[at + 1..],
            [
                "nft service NAT back: nat 10.0.0.10 -> 10.0.0.2",
                "unpark a"
            ]
        );
        assert_eq!(bed.net.nat(), (ip("10.0.0.2"), ip("10.0.0.2")));
        assert_eq!(bed.net.holder().as_deref(), Some("a"));
    }

    #[test]
    fn handoff_park_failure_unparks_and_moves_nothing() {
        let bed = handoff();
        bed.net.fail("park");
        let e = bed.switch().unwrap_err();
        assert!(
            rolled_back_because(&e, |c| matches!(c, SwitchError::Hook { hook: "park", .. })),
            "{e:?}"
        );
        assert_eq!(bed.ops_after_checks()[4..], ["park a", "unpark a"]);
        assert_eq!(bed.net.holder().as_deref(), Some("a"));
    }

    #[test]
    fn handoff_failed_forward_is_reported_but_never_undone() {
        // Once the clients' NAT moved, the standby is the truth: a forward that keeps failing
        // is an error, and the service stays on the standby.
        let bed = handoff();
        bed.net.fail("forward");
        let e = bed.switch().unwrap_err();
        assert!(
            matches!(
                e,
                SwitchError::Hook {
                    hook: "forward",
                    ..
                }
            ),
            "{e:?}"
        );
        let forwards = bed
            .net
            .ops()
            .iter()
            .filter(|o| o.starts_with("forward"))
            .count();
        assert_eq!(forwards, 3);
        assert!(!bed.net.ops().iter().any(|o| o.starts_with("unpark")));
        assert_eq!(bed.net.holder().as_deref(), Some("b"));
    }

    #[test]
    fn handoff_cut_after_the_host_moved_is_still_the_old_lcs_for_recovery() {
        // Only the host's own connections went to the standby when the NAT could not be put
        // back: the clients' NAT decides, so recovery rolls back to the old LC.
        let bed = handoff();
        bed.net.fail("check").fail("nft service NAT back");
        let e = bed.switch().unwrap_err();
        assert!(
            matches!(&e, SwitchError::RollbackFailed { rollback, .. } if rollback.contains("NAT back")),
            "{e:?}"
        );
        assert_eq!(bed.net.ops().last().map(String::as_str), Some("unpark a"));
        assert_eq!(bed.net.nat(), (ip("10.0.0.2"), ip("10.0.0.3")));
        assert_eq!(bed.net.holder().as_deref(), Some("a"));
    }
}
