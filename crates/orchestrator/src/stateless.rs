//! A stateless service's `seamless` switch (issue 20, item 2; seed embodiment 2 as written).
//!
//! Why it differs from the hand-off: a service that writes its application disk must not serve
//! from two LCs at once (each has its own copy of the data), so `seamless` normally parks the
//! old service and forwards its requests. A service declared `[service] stateless = true` keeps
//! nothing on that disk, so both LCs may serve at once: the standby gets the disk as of the cut
//! and its service is restarted and checked *before* the switch, the NAT flips, the flows the
//! old LC accepted stay pinned to it (conntrack) and finish there, new flows go to the standby,
//! and the old LC is stopped once its connections ended (or at `stateless_drain_secs`, the
//! connections cut then counted). No drain, park or forward command is run.
//!
//! The declaration is checked, not trusted: a write trap on the active LC's application disk
//! (`Migratable::watch_writes`) is armed when its copy starts, and read twice — before the
//! switch (any write since the copy started refuses the switch; nothing changed for the
//! service) and after the old LC's last connection (a write then is reported as a failure of
//! the declaration; the writes are on the old LC's disk, kept intact).

use patchover_core::LcSpec;
use patchover_lc::{LcBackend, WriteWatch, Writes};
use patchover_net::{Mode, SwitchPlan};
use serde::Serialize;

use crate::context::{Orchestrator, Run};
use crate::{OrchestratorError, ServiceSettings};

/// Whether a run in `mode` switches as a stateless service: declared so, and `seamless`. In
/// `readdress` and `path` a stateless service is switched like any other (drained in a pause).
pub(crate) fn applies(svc: &ServiceSettings, mode: Mode) -> bool {
    svc.stateless && mode == Mode::Seamless
}

/// What a stateless switch found, in the run's report (`stateless`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatelessReport {
    /// The application disk's writes from its copy's start to just before the switch (`None`:
    /// the LC has no application disk).
    pub writes_before_switch: Option<Writes>,
    /// Writes the old LC made while it finished its connections after the switch.
    pub writes_after_switch: Option<Writes>,
    /// How long the old LC served the connections it had accepted, after the NAT flipped.
    pub old_lc_served_ms: f64,
    /// Connections the old LC still had at `stateless_drain_secs`, cut when it stopped.
    pub connections_cut: usize,
}

/// Before anything changes: an LC with an application disk can have its writes watched (the
/// declaration is checked against them), or the run is refused.
pub(crate) fn check(
    backend: &dyn LcBackend,
    svc: &ServiceSettings,
    mode: Mode,
    active: &LcSpec,
) -> Result<(), OrchestratorError> {
    let Some(disk) = active.app_disk.as_ref().filter(|_| applies(svc, mode)) else {
        return Ok(());
    };
    backend.watch_writes(active, disk).map(drop).map_err(|e| {
        OrchestratorError::BadInput(format!(
            "[service] stateless: {}; a stateless declaration is checked against the application disk's writes. Drop `stateless` (seamless then hands off with park/forward) or switch with --mode readdress; nothing was changed",
            crate::chain(&e)
        ))
    })
}

/// 704, for a stateless switch: the write trap on the active LC's application disk, armed
/// before its copy starts.
pub(crate) fn watch(o: &Orchestrator<'_>, run: &mut Run) -> Result<(), OrchestratorError> {
    if let Some(disk) = run
        .active
        .app_disk
        .as_ref()
        .filter(|_| applies(&o.settings.service, run.req.mode))
    {
        run.watch = Some(o.backend.watch_writes(&run.active, disk)?);
    }
    Ok(())
}

/// Before the switch, after the cut: the disk was not written since its copy started (the
/// copy's own history and the watch), or the switch is refused.
pub(crate) fn refuse_if_written(
    run: &mut Run,
    cut: Option<&Writes>,
) -> Result<(), OrchestratorError> {
    let Some(watch) = run.watch.as_mut() else {
        return Ok(());
    };
    let watched = watch.writes()?;
    // The watch saw every write since the copy started; the copy's own history is a second
    // witness (a bitmap copy counts blocks, not files).
    let seen = match cut {
        Some(c) if c.count > 0 && watched.count == 0 => c.clone(),
        _ => watched,
    };
    let written = seen.count > 0;
    run.report
        .stateless
        .get_or_insert_with(StatelessReport::default)
        .writes_before_switch = Some(seen.clone());
    if written {
        return Err(OrchestratorError::NotStateless {
            lc: run.active.id.to_string(),
            writes: seen,
            after_switch: false,
        });
    }
    Ok(())
}

/// The switcher's window in a stateless switch: called once the old LC's connections ended
/// (or the deadline passed); reads the watch. Never fails: the NAT has flipped by then, so
/// what it finds is reported, not rolled back.
pub(crate) fn after_flows(watch: Option<&mut Box<dyn WriteWatch>>) -> Option<Writes> {
    let w = watch?;
    Some(w.writes().unwrap_or_else(|e| Writes {
        count: 0,
        unit: "trapped writes (the watch failed: see the log)",
        paths: vec![crate::chain(&e)],
    }))
}

/// After the switch: the report's figures, and the declaration's failure if the old LC wrote
/// its disk while it finished its connections (the run fails once the old LC is stopped).
pub(crate) fn record(run: &mut Run, sw: &patchover_net::SwitchReport, after: Option<Writes>) {
    let r = run
        .report
        .stateless
        .get_or_insert_with(StatelessReport::default);
    r.old_lc_served_ms = sw.drain_ms;
    r.connections_cut = sw.leftover_connections;
    r.writes_after_switch = after.clone();
    if let Some(w) = after.filter(|w| w.count > 0) {
        run.fail_after_stop = Some(OrchestratorError::NotStateless {
            lc: run.active.id.to_string(),
            writes: w,
            after_switch: true,
        });
    }
}

/// The plan's part: no hand-off, and the old LC's connections get `stateless_drain_secs`.
pub(crate) fn shape(plan: &mut SwitchPlan, svc: &ServiceSettings) {
    if applies(svc, plan.mode) {
        plan.handoff = false;
        plan.drain_deadline = svc.stateless_drain;
    }
}

/// What a stateless switch runs of the service's contract: `restart` (and `resume` where a
/// switch undoes a drain); never `drain`, the hand-off's commands, the stateful services'
/// `stop` and `cut_check`, nor a front (the old LC keeps serving its flows).
pub(crate) fn control_settings(svc: &ServiceSettings) -> ServiceSettings {
    ServiceSettings {
        drain: Vec::new(),
        park: Vec::new(),
        forward: Vec::new(),
        unpark: Vec::new(),
        stop: Vec::new(),
        cut_check: Vec::new(),
        front: None,
        ..svc.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use patchover_net::Mode;
    use patchover_store::Role;

    use super::*;
    use crate::step::Step;
    use crate::step::fake::Bed;

    fn stateless_bed(mode: Mode) -> Bed {
        let mut bed = Bed::with_mode(mode);
        bed.settings.service.stateless = true;
        bed.settings.service.stateless_drain = Duration::from_secs(7);
        bed.backend.running(&["lc1"]);
        bed
    }

    #[test]
    fn only_a_stateless_service_in_seamless_switches_without_a_hand_off() {
        let mut svc = ServiceSettings {
            stateless: true,
            ..ServiceSettings::default()
        };
        assert!(applies(&svc, Mode::Seamless));
        assert!(!applies(&svc, Mode::Readdress) && !applies(&svc, Mode::Path));
        let bed = Bed::with_mode(Mode::Seamless);
        let mut plan = bed.plan();
        svc.stateless_drain = Duration::from_secs(7);
        shape(&mut plan, &svc);
        assert!(!plan.handoff);
        assert_eq!(plan.drain_deadline, Duration::from_secs(7));
        let mut hand_off = bed.plan();
        shape(&mut hand_off, &ServiceSettings::default());
        assert!(
            hand_off.handoff,
            "a service not declared stateless hands off"
        );
        assert_eq!(hand_off.drain_deadline, bed.settings.drain_deadline);
        // In readdress the plan is what it always was.
        let readdress = Bed::new();
        let mut plan = readdress.plan();
        shape(&mut plan, &svc);
        assert_eq!(plan, readdress.plan());
    }

    #[test]
    fn no_drain_and_no_hand_off_command_is_run_or_required() {
        let mut svc = ServiceSettings {
            stateless: true,
            drain: vec!["/bin/drain".into()],
            resume: vec!["/bin/resume".into()],
            park: vec!["/bin/park".into()],
            forward: vec!["/bin/forward".into()],
            unpark: vec!["/bin/unpark".into()],
            ..ServiceSettings::default()
        };
        let ctl = control_settings(&svc);
        assert!(ctl.drain.is_empty() && ctl.park.is_empty());
        assert!(ctl.forward.is_empty() && ctl.unpark.is_empty());
        let db = ServiceSettings {
            stop: vec!["/bin/stop".into()],
            cut_check: vec!["/bin/check".into()],
            ..svc.clone()
        };
        let ctl = control_settings(&db);
        assert!(ctl.stop.is_empty() && ctl.cut_check.is_empty() && ctl.front.is_none());
        assert_eq!(ctl.resume, ["/bin/resume"], "the standby is still resumed");
        let bed = Bed::new();
        crate::service::hooks_present(&bed.backend, &bed.run.active, &svc, Mode::Seamless).unwrap();
        let asked = bed.backend.calls().join("\n");
        assert!(asked.contains("/bin/resume"), "{asked}");
        for not in ["/bin/drain", "/bin/park", "/bin/forward", "/bin/unpark"] {
            assert!(
                !asked.contains(not),
                "{not} is not run, so not required: {asked}"
            );
        }
        // In readdress the drain is run (and asked for) as for any service.
        svc.park.clear();
        crate::service::hooks_present(&bed.backend, &bed.run.active, &svc, Mode::Readdress)
            .unwrap();
        assert!(bed.backend.calls().join("\n").contains("/bin/drain"));
    }

    #[test]
    fn a_disk_that_cannot_be_watched_is_refused_before_anything_changes() {
        let bed = stateless_bed(Mode::Seamless);
        let svc = &bed.settings.service;
        check(&bed.backend, svc, Mode::Seamless, &bed.run.active).unwrap();
        bed.backend.fail("watch");
        let e = check(&bed.backend, svc, Mode::Seamless, &bed.run.active).unwrap_err();
        assert!(matches!(e, OrchestratorError::BadInput(_)), "{e:?}");
        assert!(e.to_string().contains("[service] stateless:"), "{e}");
        assert!(e.to_string().contains("nothing was changed"), "{e}");
        // Not asked where it does not apply: readdress, or no application disk.
        check(&bed.backend, svc, Mode::Readdress, &bed.run.active).unwrap();
        let mut no_disk = bed.run.active.clone();
        no_disk.app_disk = None;
        check(&bed.backend, svc, Mode::Seamless, &no_disk).unwrap();
    }

    #[test]
    fn the_watch_is_armed_before_the_copy_starts() {
        let mut bed = stateless_bed(Mode::Seamless);
        bed.step(Step::StandbySearch).unwrap();
        bed.step(Step::CopyAppDisk).unwrap();
        assert!(bed.run.watch.is_some());
        let calls = bed.backend.calls();
        let at = |p: &str| calls.iter().position(|c| c.starts_with(p)).unwrap();
        assert!(at("watch lc1") < at("live_copy lc1"), "{calls:?}");
        // A service not declared stateless is not watched.
        let mut bed = Bed::with_mode(Mode::Seamless);
        bed.step(Step::StandbySearch).unwrap();
        bed.step(Step::CopyAppDisk).unwrap();
        assert!(bed.run.watch.is_none());
    }

    #[test]
    fn a_disk_written_after_its_copy_started_refuses_the_switch_with_the_reason() {
        let mut bed = stateless_bed(Mode::Seamless);
        bed.step(Step::StandbySearch).unwrap();
        bed.step(Step::CopyAppDisk).unwrap();
        refuse_if_written(&mut bed.run, None).unwrap();
        bed.backend.disk_writes(&[3]);
        let e = refuse_if_written(&mut bed.run, None).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("LC lc1 wrote its application disk after its copy started (3 trapped writes: kv.log), so its service is not stateless"),
            "{msg}"
        );
        assert!(
            e.hint().contains("remove `stateless = true`"),
            "{}",
            e.hint()
        );
        assert!(e.hint().contains("stays on the active LC"), "{}", e.hint());
        let r = bed.run.report.stateless.as_ref().unwrap();
        assert_eq!(r.writes_before_switch.as_ref().unwrap().count, 3);
        // The copy's own history is a witness too.
        bed.backend.disk_writes(&[0]);
        let cut = Writes {
            count: 4096,
            unit: "bytes shipped from the dirty bitmap",
            paths: Vec::new(),
        };
        let e = refuse_if_written(&mut bed.run, Some(&cut)).unwrap_err();
        assert!(e.to_string().contains("4096 bytes shipped"), "{e}");
    }

    #[test]
    fn writes_after_the_switch_fail_the_run_once_the_old_lc_is_stopped() {
        let mut bed = stateless_bed(Mode::Seamless);
        bed.step(Step::StandbySearch).unwrap();
        bed.step(Step::CopyAppDisk).unwrap();
        bed.backend.running(&["lc1", "lc2"]);
        bed.backend.disk_writes(&[0, 2]);
        refuse_if_written(&mut bed.run, None).unwrap();
        let after = after_flows(bed.run.watch.as_mut());
        let sw = patchover_net::SwitchReport {
            drain_ms: 250.0,
            leftover_connections: 1,
            ..bed.switch_report()
        };
        record(&mut bed.run, &sw, after);
        let r = bed.run.report.stateless.clone().unwrap();
        assert_eq!((r.old_lc_served_ms, r.connections_cut), (250.0, 1));
        assert_eq!(r.writes_after_switch.unwrap().count, 2);
        // The old LC stops and the roles swap; then the run fails, saying why.
        bed.step(Step::StopOld).unwrap();
        assert!(bed.backend.calls().contains(&"stop lc1".to_owned()));
        assert_eq!(bed.role("lc2"), Role::Active);
        let e = bed.run.halt.take().expect("the run fails");
        assert!(
            e.to_string().contains(
                "while it finished its connections after the switch (2 trapped writes: kv.log)"
            ),
            "{e}"
        );
        assert!(e.hint().contains("kept intact"), "{}", e.hint());
    }

    #[test]
    fn no_write_after_the_switch_is_a_clean_run() {
        let mut bed = stateless_bed(Mode::Seamless);
        bed.step(Step::StandbySearch).unwrap();
        bed.step(Step::CopyAppDisk).unwrap();
        bed.backend.running(&["lc1", "lc2"]);
        refuse_if_written(&mut bed.run, None).unwrap();
        let after = after_flows(bed.run.watch.as_mut());
        let sw = bed.switch_report();
        record(&mut bed.run, &sw, after);
        bed.step(Step::StopOld).unwrap();
        assert!(bed.run.halt.is_none());
        let r = bed.run.report.stateless.clone().unwrap();
        assert_eq!(r.writes_before_switch.unwrap().count, 0);
        assert_eq!(r.writes_after_switch.unwrap().count, 0);
    }
}
