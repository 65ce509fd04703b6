//! `readdress` (seed fig. 15–17, two NICs): the service address moves from the old LC's NIC to
//! the standby's inside the pause and is announced with gratuitous ARP; the rest of the burst
//! and later refreshes follow from a thread. A bridge rule rewrites frames still addressed to
//! the old MAC (the held SYNs at the release, and neighbours that missed every announcement).

use std::time::{Duration, Instant};

use crate::garp::GarpConfig;
use crate::lc::InLc;
use crate::network::NftChange;

use super::common::Ctx;
use super::paused::Move;
use super::{Endpoint, SwitchError, lock, on};

/// Firewall mark of SYNs released after a hold.
const HELD_MARK: u32 = 0x504f_4844;

/// The live path before a `readdress` switch: both ports on the bridge, the old LC holds the
/// service address, the standby does not.
pub(super) fn check_live(ctx: &Ctx<'_>) -> Result<(), SwitchError> {
    let plan = ctx.plan;
    let s = plan.service.addr;
    for ep in [&plan.from, &plan.to] {
        if !ctx
            .addr
            .port_on_bridge(ctx.net, &ctx.bridge, &ep.host_port)?
        {
            return Err(SwitchError::State(format!(
                "{} ({}) is not a port of {}",
                ep.host_port, ep.name, plan.bridge
            )));
        }
    }
    if !ctx.addr.held_by(&*ctx.from_lc, &plan.from)? {
        return Err(SwitchError::State(format!(
            "{} does not hold the service address {s}",
            plan.from.name
        )));
    }
    if ctx.addr.held_by(&*ctx.to_lc, &plan.to)? {
        return Err(SwitchError::State(format!(
            "{} already holds the service address {s}",
            plan.to.name
        )));
    }
    Ok(())
}

/// The address move.
pub(super) struct Readdress;

fn mac_fix(ctx: &Ctx<'_>, forward: bool, mark: Option<u32>) -> NftChange {
    let [(a, _, _), (b, _, _)] = ctx.sides(forward);
    NftChange::MacFix {
        service: ctx.plan.service.addr,
        old: a.mac,
        new: b.mac,
        mark,
    }
}

impl Move for Readdress {
    fn before_hold(&self, ctx: &Ctx<'_>) -> Result<Option<u32>, SwitchError> {
        // Held SYNs still carry the old MAC; this rule (marked packets only, so inert until the
        // release) sends them to the standby without an nft run in the pause.
        let change = mac_fix(ctx, true, Some(HELD_MARK));
        ctx.net.nft("MAC fix for held connections", &change)?;
        // That used the `nft` started ahead of time; the pause gets its own.
        ctx.net.prepare_nft()?;
        Ok(Some(HELD_MARK))
    }

    fn move_service(&self, ctx: &Ctx<'_>, forward: bool) -> Result<u32, SwitchError> {
        let s = ctx.plan.service;
        let [(a, _, a_lc), (b, _, b_lc)] = ctx.sides(forward);
        a_lc.del_address(&a.iface, s).map_err(on(a))?;
        b_lc.add_address(&b.iface, s).map_err(on(b))?;
        if !forward {
            // Rolling back: frames already sent to the standby's MAC go back too.
            ctx.net.nft("MAC fix", &mac_fix(ctx, false, None))?;
        }
        ctx.net.replace_neighbour(ctx.bridge.index, s.addr, b.mac)?;
        b_lc.announce(&b.iface, b.mac, s.addr, 1, Duration::ZERO)
            .map_err(on(b))
    }

    fn after_release(
        &self,
        ctx: &Ctx<'_>,
    ) -> Result<Option<std::thread::JoinHandle<()>>, SwitchError> {
        // Now for every frame: neighbours that missed the announcement still reach the service.
        ctx.net.nft("MAC fix", &mac_fix(ctx, true, None))?;
        Ok(spawn_refresh(ctx))
    }

    fn undo_before_move(&self, ctx: &Ctx<'_>) -> Vec<String> {
        // The marked MAC fix would send the held SYNs to the standby: point it back.
        match ctx.net.nft("MAC fix rollback", &mac_fix(ctx, false, None)) {
            Ok(()) => Vec::new(),
            Err(e) => vec![format!("MAC fix: {e}")],
        }
    }
}

/// The rest of the first burst and the later refreshes, from a thread (`None` when there is
/// nothing left to send or the standby cannot be reached).
fn spawn_refresh(ctx: &Ctx<'_>) -> Option<std::thread::JoinHandle<()>> {
    let plan = ctx.plan;
    let garp = plan.garp.clone();
    if garp.count <= 1 && garp.refresh_after.is_empty() {
        return None;
    }
    let start = Instant::now();
    let lc = match ctx.net.open_lc(&plan.to) {
        Ok(lc) => lc,
        Err(e) => {
            tracing::warn!(lc = %plan.to.name, error = %e, "gratuitous ARP refresh: cannot reach the LC");
            return None;
        }
    };
    let refresh = Refresh {
        ep: plan.to.clone(),
        service: plan.service.addr,
        garp,
        lock_path: plan.lock_path.clone(),
    };
    std::thread::Builder::new()
        .name("po-garp-refresh".into())
        .spawn(move || refresh.run(&*lc, start))
        .ok()
}

/// Later announcements of the service address from the LC that took it.
struct Refresh {
    ep: Endpoint,
    service: std::net::Ipv4Addr,
    garp: GarpConfig,
    lock_path: std::path::PathBuf,
}

impl Refresh {
    fn run(&self, lc: &dyn InLc, start: Instant) {
        let (ep, s, garp) = (&self.ep, self.service, &self.garp);
        let rest = garp.count.saturating_sub(1);
        if rest > 0 {
            std::thread::sleep(garp.interval);
            if let Err(e) = lc.announce(&ep.iface, ep.mac, s, rest, garp.interval) {
                tracing::warn!(error = %e, "gratuitous ARP burst failed");
            }
        }
        for at in &garp.refresh_after {
            if let Some(wait) = at.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
            // A later switch may have moved the address on: announcing a stale owner would
            // send clients to an LC that no longer has it. Refresh only while no switch runs
            // and this LC still holds the address.
            let Ok(_lock) = lock(&self.lock_path) else {
                tracing::info!("gratuitous ARP refresh skipped: a switch is running");
                return;
            };
            let holds = lc
                .addresses(&ep.iface)
                .map(|v| v.iter().any(|a| a.addr == s));
            if !matches!(holds, Ok(true)) {
                tracing::info!(lc = %ep.name, "gratuitous ARP refresh stopped: the address moved on");
                return;
            }
            if let Err(e) = lc.announce(&ep.iface, ep.mac, s, garp.count, garp.interval) {
                tracing::warn!(error = %e, "gratuitous ARP refresh failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testing::{bed, rolled_back_because};
    use super::super::{Mode, SwitchError};
    use crate::network::NftChange;
    use patchover_core::MacAddr;

    const MAC_A: MacAddr = MacAddr([2, 0, 0, 0, 0, 1]);
    const MAC_B: MacAddr = MacAddr([2, 0, 0, 0, 0, 2]);

    #[test]
    fn readdress_moves_the_address_inside_the_hold_and_fixes_stale_macs_after() {
        let mut bed = bed(Mode::Readdress);
        bed.plan.garp.count = 3;
        let sw = bed.switch().unwrap();
        // The rest of the burst comes from the refresh thread.
        sw.refresh.expect("refresh thread").join().unwrap();
        assert_eq!(
            bed.net.ops(),
            [
                "who-has 10.0.0.10 on br",
                "b: get 10.0.0.3:8080/version",
                "b: prepare addresses=true announce=true",
                "a: prepare addresses=true announce=false",
                "prepare check",
                "prepare nft",
                "nft MAC fix for held connections: mac fix 02:00:00:00:00:01 -> 02:00:00:00:00:02 mark 0x504f4844",
                "prepare nft",
                "hold 10.0.0.10:8080 queue 7 mark 0x504f4844 prime pob",
                "drain a",
                "window",
                "a: del 10.0.0.10/24",
                "b: add 10.0.0.10/24",
                "neighbour 10.0.0.10 on br -> 02:00:00:00:00:02",
                "b: announce 10.0.0.10 x1",
                "check 10.0.0.10 expect lc-b",
                "release",
                "nft MAC fix: mac fix 02:00:00:00:00:01 -> 02:00:00:00:00:02",
                "b: announce 10.0.0.10 x2",
            ]
        );
        assert_eq!(sw.report.garp_sent, 1);
        assert_eq!(bed.net.holder().as_deref(), Some("b"));
    }

    #[test]
    fn readdress_drain_past_the_deadline_points_the_mac_fix_back_and_moves_nothing() {
        let bed = bed(Mode::Readdress);
        bed.net.busy("a", 2);
        let e = bed.switch().unwrap_err();
        assert!(
            rolled_back_because(&e, |c| matches!(
                c,
                SwitchError::DrainTimeout { left: 2, .. }
            )),
            "{e:?}"
        );
        assert_eq!(
            bed.ops_after_checks()[6..],
            [
                "hold 10.0.0.10:8080 queue 7 mark 0x504f4844 prime pob",
                "drain a",
                "nft MAC fix rollback: mac fix 02:00:00:00:00:02 -> 02:00:00:00:00:01",
                "resume a",
                "release",
            ]
        );
        assert_eq!(
            bed.net.mac_fix(),
            Some(NftChange::MacFix {
                service: "10.0.0.10".parse().unwrap(),
                old: MAC_B,
                new: MAC_A,
                mark: None
            })
        );
        assert_eq!(bed.net.holder().as_deref(), Some("a"));
    }

    #[test]
    fn readdress_moves_the_address_back_when_the_check_fails() {
        let bed = bed(Mode::Readdress);
        bed.net.fail("check");
        let e = bed.switch().unwrap_err();
        assert!(
            rolled_back_because(&e, |c| matches!(
                c,
                SwitchError::Check { seen, .. }
                    if seen == "from the checker: fake path to 10.0.0.10; in b: fake state of b on port 8080"
            )),
            "{e:?}"
        );
        let ops = bed.ops_after_checks();
        let at = ops.iter().position(|o| o.starts_with("check")).unwrap();
        assert_eq!(
            ops[at + 1..],
            [
                "b: del 10.0.0.10/24",
                "a: add 10.0.0.10/24",
                "nft MAC fix: mac fix 02:00:00:00:00:02 -> 02:00:00:00:00:01",
                "neighbour 10.0.0.10 on br -> 02:00:00:00:00:01",
                "a: announce 10.0.0.10 x1",
                "resume a",
                "release",
            ]
        );
        assert_eq!(bed.net.addresses("b"), ["10.0.0.3/24".parse().unwrap()]);
        assert_eq!(bed.net.holder().as_deref(), Some("a"));
    }

    #[test]
    fn readdress_window_failure_rolls_back_before_anything_moved() {
        let bed = bed(Mode::Readdress);
        bed.net.fail("window");
        let e = bed.switch().unwrap_err();
        assert!(
            rolled_back_because(&e, |c| matches!(
                c,
                SwitchError::Hook {
                    hook: "in_window",
                    ..
                }
            )),
            "{e:?}"
        );
        assert!(!bed.net.ops().iter().any(|o| o.contains(": del ")));
        assert_eq!(bed.net.holder().as_deref(), Some("a"));
    }

    #[test]
    fn readdress_stranger_on_the_address_changes_nothing() {
        let bed = bed(Mode::Readdress);
        bed.net.stranger(MacAddr([2, 9, 9, 9, 9, 9]));
        let e = bed.switch().unwrap_err();
        assert!(matches!(e, SwitchError::AddressTaken { .. }), "{e:?}");
        assert_eq!(bed.net.ops(), ["who-has 10.0.0.10 on br"]);
    }

    #[test]
    fn readdress_refresh_stops_once_the_address_moved_on() {
        let mut bed = bed(Mode::Readdress);
        bed.plan.garp.refresh_after = vec![Duration::from_millis(300)];
        let sw = bed.switch().unwrap();
        // A later switch takes the address away before the refresh is due.
        bed.net.fail("b: addresses");
        sw.refresh.expect("refresh thread").join().unwrap();
        let last = bed.net.ops().last().cloned().unwrap();
        assert!(last.starts_with("nft MAC fix:"), "{last}");
    }

    #[test]
    fn readdress_failed_move_back_leaves_the_address_where_recovery_finds_it() {
        // The standby cannot give the address back: the old LC already lost it, so recovery
        // finds the service on the standby and finishes there instead of rolling back.
        let bed = bed(Mode::Readdress);
        bed.net.fail("check").fail("b: del");
        let e = bed.switch().unwrap_err();
        assert!(
            matches!(&e, SwitchError::RollbackFailed { rollback, .. } if rollback.contains("moving back")),
            "{e:?}"
        );
        let ops = bed.net.ops();
        assert_eq!(
            ops[ops.len() - 3..],
            ["b: del 10.0.0.10/24", "resume a", "release"]
        );
        assert!(
            bed.net
                .addresses("a")
                .iter()
                .all(|a| a.addr != bed.plan.service.addr)
        );
        assert_eq!(bed.net.holder().as_deref(), Some("b"));
    }
}
