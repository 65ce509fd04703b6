//! Where a switch's time goes: its consecutive phases, each named and timed, so that a longer
//! pause points at the phase that grew (issue 26). The switcher times its own (preparation,
//! hold, drain, window, move, check, release); the orchestrator splits the window into its
//! own (the old service's stop, the disk's last catch-up and freeze, the attach, the restart on
//! the standby) with [`SwitchReport::split_phase`]. The names are the same for every kind of
//! LC, so a VM's figures set side by side with a namespace's show what emulation costs.
//!
//! Phases are laps of one clock ([`Laps`]): they never overlap and, from the decision on, add
//! up to the time they cover. In `path` and `readdress` the pause is exactly the phases from
//! [`DRAIN`] to [`RELEASE`].

use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{SwitchReport, ms};

/// Opening what the switch needs ahead of the pause (workers, sockets, an `nft` waiting).
pub const PREPARE: &str = "prepare";
/// Installing the hold of new connections (`path`, `readdress`); a hand-off's park.
pub const HOLD: &str = "hold";
/// The old LC finishing its connections (`path`, `readdress`: inside the pause).
pub const DRAIN: &str = "drain";
/// The `in_window` hook as one piece (the orchestrator splits it, see below).
pub const WINDOW: &str = "window";
/// Window: the old service's own stop and its `cut_check`.
pub const STOP: &str = "stop";
/// Window: the application disk's cut while the old LC runs (catch-up rounds, the job's end).
pub const LAST_CATCH_UP: &str = "last_catch_up";
/// Window: the old LC held still for the cut (its final round inside).
pub const FREEZE: &str = "freeze";
/// Window: the cut disk under the standby's service (its stop, the attach, its `cut_check`).
pub const ATTACH: &str = "attach";
/// Window: the service restarted on the standby until it answers on its own address.
pub const RESTART: &str = "restart";
/// Moving the service path (bridge port, address, NAT).
pub const MOVE: &str = "move";
/// The check through the service address.
pub const CHECK: &str = "check";
/// Letting the held connections go (priming the standby's neighbours first); a hand-off's
/// forward.
pub const RELEASE: &str = "release";

/// One phase of a switch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Phase {
    pub name: String,
    pub ms: f64,
}

/// A clock that cuts time into consecutive [`Phase`]s.
#[derive(Debug, Clone)]
pub struct Laps {
    last: Instant,
    phases: Vec<Phase>,
}

impl Laps {
    /// A clock whose first phase starts at `at`.
    pub fn starting(at: Instant) -> Laps {
        Laps {
            last: at,
            phases: Vec::new(),
        }
    }

    /// A clock whose first phase starts now.
    pub fn now() -> Laps {
        Laps::starting(Instant::now())
    }

    /// Ends the current phase now as `name`.
    pub fn lap(&mut self, name: &str) {
        self.lap_at(name, Instant::now());
    }

    /// Ends the current phase at `at` as `name`. A phase named like the one before it is added
    /// to it.
    pub fn lap_at(&mut self, name: &str, at: Instant) {
        let took = ms(at.saturating_duration_since(self.last));
        self.last = self.last.max(at);
        self.push(name, took);
    }

    /// Ends the current phase now, split: `part` of it (at most all of it) as `part_name`, the
    /// rest as `rest_name`.
    pub fn lap_split(&mut self, rest_name: &str, part_name: &str, part_ms: f64) {
        let now = Instant::now();
        let took = ms(now.saturating_duration_since(self.last));
        self.last = self.last.max(now);
        let part = part_ms.clamp(0.0, took);
        self.push(rest_name, took - part);
        self.push(part_name, part);
    }

    fn push(&mut self, name: &str, took: f64) {
        match self.phases.last_mut() {
            Some(p) if p.name == name => p.ms += took,
            _ => self.phases.push(Phase {
                name: name.to_owned(),
                ms: took,
            }),
        }
    }

    /// When the current phase started.
    pub fn mark(&self) -> Instant {
        self.last
    }

    /// The phases so far.
    pub fn phases(&self) -> &[Phase] {
        &self.phases
    }

    /// The phases, the clock dropped.
    pub fn into_phases(self) -> Vec<Phase> {
        self.phases
    }
}

impl SwitchReport {
    /// How long the phase `name` took, if it ran.
    pub fn phase_ms(&self, name: &str) -> Option<f64> {
        self.phases.iter().find(|p| p.name == name).map(|p| p.ms)
    }

    /// The phases in one line for people: `drain 1.2, move 0.6, check 1.1 ms`.
    pub fn phases_line(&self) -> String {
        let parts: Vec<String> = self
            .phases
            .iter()
            .map(|p| format!("{} {:.1}", p.name, p.ms))
            .collect();
        format!("{} ms", parts.join(", "))
    }

    /// Replaces the phase `name` by `parts`, which were timed inside it; what they leave of it
    /// stays under `name` (the hook's own overhead), so the phases still add up.
    pub fn split_phase(&mut self, name: &str, parts: &[Phase]) {
        let Some(at) = self.phases.iter().position(|p| p.name == name) else {
            return;
        };
        let inside: f64 = parts.iter().map(|p| p.ms).sum();
        let whole = self.phases[at].ms;
        self.phases[at].ms = (whole - inside).max(0.0);
        for (i, p) in parts.iter().enumerate() {
            self.phases.insert(at + i, p.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn laps_are_consecutive_and_a_repeated_name_adds_up() {
        let t0 = Instant::now();
        let mut l = Laps::starting(t0);
        l.lap_at(DRAIN, t0 + Duration::from_millis(3));
        l.lap_at(MOVE, t0 + Duration::from_millis(5));
        l.lap_at(MOVE, t0 + Duration::from_millis(6));
        // A moment before the last mark is an empty phase, never a negative one.
        l.lap_at(CHECK, t0 + Duration::from_millis(4));
        let p = l.phases();
        let names: Vec<&str> = p.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, [DRAIN, MOVE, CHECK]);
        assert!((p[0].ms - 3.0).abs() < 1e-9 && (p[1].ms - 3.0).abs() < 1e-9);
        assert_eq!(p[2].ms, 0.0);
        assert_eq!(l.mark(), t0 + Duration::from_millis(6));
    }

    #[test]
    fn a_split_lap_never_gives_its_part_more_than_it_took() {
        let mut l = Laps::starting(Instant::now() - Duration::from_millis(10));
        l.lap_split(LAST_CATCH_UP, FREEZE, 1e9);
        let p = l.phases();
        assert_eq!((p[0].name.as_str(), p[0].ms), (LAST_CATCH_UP, 0.0));
        assert!(p[1].ms >= 10.0, "{p:?}");
    }

    #[test]
    fn a_split_phase_keeps_the_sum_and_the_order() {
        let ph = |n: &str, ms: f64| Phase { name: n.into(), ms };
        let mut r = SwitchReport::new(super::super::Mode::Readdress, "a", "b");
        r.phases = vec![ph(DRAIN, 2.0), ph(WINDOW, 10.0), ph(MOVE, 1.0)];
        r.split_phase(WINDOW, &[ph(FREEZE, 4.0), ph(RESTART, 5.0)]);
        let names: Vec<&str> = r.phases.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, [DRAIN, FREEZE, RESTART, WINDOW, MOVE]);
        assert_eq!(r.phases.iter().map(|p| p.ms).sum::<f64>(), 13.0);
        assert_eq!(r.phase_ms(WINDOW), Some(1.0));
        assert_eq!(r.phase_ms("nothing"), None);
        assert_eq!(
            r.phases_line(),
            "drain 2.0, freeze 4.0, restart 5.0, window 1.0, move 1.0 ms"
        );
    }
}
