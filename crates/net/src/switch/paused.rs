//! `path` and `readdress` (seed fig. 13–17): hold new connections, drain the old LC, run the
//! window, move, check, release. What differs between the two is a [`Move`].

use std::time::Duration;

use crate::hold::Prime;
use crate::network::HoldSpec;

use super::common::{Ctx, PAUSED_DRAIN_POLL};
use super::phase::{CHECK, DRAIN, HOLD, Laps, MOVE, PREPARE, RELEASE, WINDOW};
use super::{Hooks, SwitchError, SwitchReport, Switched, ms, rolled_back};

/// What a paused mode does around the shared sequence.
pub(super) trait Move {
    /// Before the hold: rules that act on the released SYNs. Returns their firewall mark.
    fn before_hold(&self, ctx: &Ctx<'_>) -> Result<Option<u32>, SwitchError> {
        let _ = ctx;
        Ok(None)
    }
    /// Inside the pause: moves the service path from one side to the other (`forward`: from
    /// `plan.from` to `plan.to`); returns the gratuitous ARP frames sent.
    fn move_service(&self, ctx: &Ctx<'_>, forward: bool) -> Result<u32, SwitchError>;
    /// After the release; may leave the rest of the announcements to a thread.
    fn after_release(
        &self,
        ctx: &Ctx<'_>,
    ) -> Result<Option<std::thread::JoinHandle<()>>, SwitchError> {
        let _ = ctx;
        Ok(None)
    }
    /// Rollback before anything moved: undoes `before_hold`; returns what could not be undone.
    fn undo_before_move(&self, ctx: &Ctx<'_>) -> Vec<String> {
        let _ = ctx;
        Vec::new()
    }
}

/// What the pause measured.
struct Window {
    drain: Duration,
    looks: u32,
    first_look: Duration,
    window: Duration,
    garp_sent: u32,
    first: Duration,
}

/// Hold, drain, move, check, release; on any failure everything goes back.
pub(super) fn run(
    ctx: &Ctx<'_>,
    mode: &dyn Move,
    hooks: &mut Hooks<'_>,
) -> Result<Switched, SwitchError> {
    let plan = ctx.plan;
    let mut laps = Laps::starting(ctx.t0);
    ctx.ready()?;
    let mark = mode.before_hold(ctx)?;
    laps.lap(PREPARE);
    // The standby learns the held clients' MACs before it answers them (see `hold`).
    let hold = ctx.net.hold(&HoldSpec {
        service: plan.service.addr,
        port: plan.health.port,
        queue: plan.queue,
        mark,
        prime: Some(Prime {
            port: plan.to.host_port.clone(),
            mac: plan.to.mac,
            service: plan.service,
        }),
    })?;
    laps.lap(HOLD);
    let t_hold = laps.mark();
    tracing::debug!(hold_ms = ms(ctx.t0.elapsed()), "holding new connections");
    let mut moved = false;
    match in_pause(ctx, mode, hooks, &mut laps, &mut moved) {
        Ok(w) => {
            let stats = hold.release()?;
            laps.lap_at(RELEASE, stats.let_go_at);
            let pause = stats.let_go_at.saturating_duration_since(t_hold);
            let refresh = mode.after_release(ctx)?;
            Ok(Switched {
                report: SwitchReport {
                    pause_ms: ms(pause),
                    phases: laps.into_phases(),
                    drain_ms: ms(w.drain),
                    drain_looks: w.looks,
                    drain_first_look_ms: ms(w.first_look),
                    first_request_ms: ms(w.first),
                    window_ms: ms(w.window),
                    held_syns: stats.held,
                    primed_neighbours: stats.primed,
                    garp_sent: w.garp_sent,
                    ..ctx.report()
                },
                refresh,
            })
        }
        Err(cause) => {
            let mut rb = if moved {
                match mode.move_service(ctx, false) {
                    Ok(_) => Vec::new(),
                    Err(e) => vec![format!("moving back: {e}")],
                }
            } else {
                mode.undo_before_move(ctx)
            };
            if let Err(e) = hooks.service.resume(&plan.from) {
                rb.push(format!("resuming {}: {e}", plan.from.name));
            }
            if let Err(e) = hold.release() {
                rb.push(format!("releasing held connections: {e}"));
            }
            Err(rolled_back(plan, cause, rb))
        }
    }
}

/// Everything while new connections are held: drain, window, move, check, each a lap.
fn in_pause(
    ctx: &Ctx<'_>,
    mode: &dyn Move,
    hooks: &mut Hooks<'_>,
    laps: &mut Laps,
    moved: &mut bool,
) -> Result<Window, SwitchError> {
    let t_hold = laps.mark();
    let plan = ctx.plan;
    hooks
        .service
        .drain(&plan.from)
        .map_err(|source| SwitchError::Hook {
            hook: "drain",
            source,
        })?;
    let waited = ctx.wait_drained(PAUSED_DRAIN_POLL);
    let (drain, left) = (waited.took, waited.left);
    laps.lap(DRAIN);
    tracing::debug!(at_ms = ms(t_hold.elapsed()), "drained");
    if left > 0 {
        return Err(SwitchError::DrainTimeout {
            from: plan.from.name.clone(),
            left,
            deadline: plan.drain_deadline,
        });
    }
    let tw = laps.mark();
    (hooks.in_window)(plan).map_err(|source| SwitchError::Hook {
        hook: "in_window",
        source,
    })?;
    laps.lap(WINDOW);
    let window = laps.mark().saturating_duration_since(tw);
    *moved = true;
    let garp_sent = mode.move_service(ctx, true)?;
    laps.lap(MOVE);
    tracing::debug!(at_ms = ms(t_hold.elapsed()), "moved");
    ctx.check_to()?;
    laps.lap(CHECK);
    tracing::debug!(at_ms = ms(t_hold.elapsed()), "checked");
    Ok(Window {
        drain,
        looks: waited.looks,
        first_look: waited.first_look,
        window,
        garp_sent,
        first: ctx.t0.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::Mode;
    use super::super::phase::{CHECK, DRAIN, HOLD, MOVE, PREPARE, RELEASE, WINDOW};
    use super::super::testing::bed;

    #[test]
    fn the_pause_is_its_phases_from_the_drain_to_the_release() {
        for mode in [Mode::Path, Mode::Readdress] {
            let r = bed(mode).switch().unwrap().report;
            let names: Vec<&str> = r.phases.iter().map(|p| p.name.as_str()).collect();
            assert_eq!(
                names,
                [PREPARE, HOLD, DRAIN, WINDOW, MOVE, CHECK, RELEASE],
                "{mode}"
            );
            assert!(r.phases.iter().all(|p| p.ms >= 0.0), "{mode}: {r:?}");
            let paused: f64 = r.phases[2..].iter().map(|p| p.ms).sum();
            assert!((paused - r.pause_ms).abs() < 1e-6, "{mode}: {r:?}");
            assert_eq!(r.phase_ms(WINDOW), Some(r.window_ms), "{mode}");
            assert!(r.drain_looks >= 1, "{mode}: {r:?}");
            assert!(r.drain_first_look_ms <= r.drain_ms, "{mode}: {r:?}");
        }
    }
}
