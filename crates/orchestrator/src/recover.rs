//! Crash safety: finishing or rolling back a run whose patchover died.
//!
//! A live run holds its LC's run lock (`crate::guard`); an unfinished run in the journal whose
//! lock can be taken belongs to a dead patchover. How far it got ([`Reached`], read from the
//! journal as [`crate::step::Step`]s) decides:
//! - the switch was done: finish (stop the old LC, set the roles);
//! - the switch started but did not finish: whoever holds the service address now decides —
//!   the standby with a healthy service keeps it (finish), otherwise the address goes back to
//!   the old LC (roll back), the switcher's nftables leftovers are removed;
//! - the switch never started: release the standby; the service never moved;
//! - a watch after the switch (issue 23) was going on: a service still passing its check on
//!   the standby keeps it (finish), otherwise it is handed back to the old LC;
//! - a hand-back was going on: done if the old LC holds the service again (the failed LC
//!   stops), otherwise done again from the start; one that had failed leaves both LCs running.
//!
//! A front (`[service.front]`) the journal has paused is let go once the service is where it
//! stays: released onto the standby (finish) or resumed on the old LC (roll back).

use patchover_core::{Ipv4Cidr, LcSpec};
use patchover_front::Front;
use patchover_lc::LcState;
use patchover_net::{Mode, ServiceAddress};
use patchover_store::{Role, RunRow};

use crate::access::endpoint;
use crate::context::Orchestrator;
use crate::front::{Driven, LetGo};
use crate::journal::{self, FrontState, Reached};
use crate::step::{Step, StepState};
use crate::{OrchestratorError, RunReport};

pub use crate::guard::{RunGuard, RunLock};
pub use crate::network::{assign_service, ensure_bridge_address, queue_number, service_is_on};

/// Runs the `[service] resume` command in `lc` (undoes a drain; harmless without one). A
/// failure is logged, not returned: the service answers either way, only without keep-alive.
pub(crate) fn resume_service(o: &Orchestrator<'_>, lc: &patchover_core::LcSpec) {
    let r = endpoint(o.backend, lc)
        .map_err(|e| patchover_core::error::chain(&e))
        .and_then(|ep| {
            // Not the front: `front_let_go` lets it go after this, journaled.
            let mut ctl = crate::service::LcServiceControl {
                backend: o.backend,
                lcs: &o.config.lcs,
                settings: &o.settings.service,
                front: None,
            };
            patchover_net::ServiceControl::resume(&mut ctl, &ep).map_err(|e| e.to_string())
        });
    match r {
        Ok(()) => tracing::info!(lc = %lc.id, "resumed the old service (undid the drain)"),
        Err(e) => {
            tracing::warn!(lc = %lc.id, error = %e, "cannot resume the old service; it answers without keeping connections alive until it restarts")
        }
    }
}

/// Recovery of a `seamless` switch whose clients' NAT already points at the standby: a
/// hand-off's old service forwards what it holds to the standby (a stateless one has nothing
/// to forward), and its connections get the drain deadline (`stateless_drain_secs` for a
/// stateless service) to end, before the old LC is stopped. Best effort: the old LC stops
/// either way.
fn forward_held(
    o: &Orchestrator<'_>,
    active: &patchover_core::LcSpec,
    standby: &patchover_core::LcSpec,
) {
    let (Ok(from), Ok(to)) = (endpoint(o.backend, active), endpoint(o.backend, standby)) else {
        return;
    };
    let svc = &o.settings.service;
    let mut ctl = crate::service::LcServiceControl {
        backend: o.backend,
        lcs: &o.config.lcs,
        settings: svc,
        front: None,
    };
    let target = std::net::SocketAddr::from((to.address.addr, svc.port));
    if !svc.stateless
        && let Err(e) = patchover_net::ServiceControl::forward(&mut ctl, &from, target)
    {
        tracing::warn!(lc = %active.id, error = %e, "cannot make the old service forward its held requests");
        return;
    }
    let deadline = if svc.stateless {
        svc.stateless_drain
    } else {
        o.settings.drain_deadline
    };
    let Ok(lc) = from.access.open() else { return };
    let start = std::time::Instant::now();
    while start.elapsed() < deadline {
        if lc.busy_tcp_connections(svc.port).is_ok_and(|n| n == 0) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// What recovery does with a run, by how far it got and who holds the service now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The service is on the standby (or stays there): stop the old LC, swap the roles.
    Finish,
    /// The service is (put back) on the old LC: release the standby.
    RollBack,
    /// A failed watch's hand-back (issue 23), done (again) by recovery: the service goes back
    /// to the old LC, still running, its application disk copied from the new one and cut in
    /// the switch window.
    HandBack,
    /// The hand-back went through: the failed new LC stops, the old LC is the active one.
    FinishHandBack,
    /// The hand-back did not go through: both LCs are kept running.
    KeepBoth,
}

/// What recovery asks of the LCs when the journal leaves the decision open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// A switch cut short: does the standby hold the service address?
    StandbyHolds,
    /// A watch cut short: does the service still pass its watch's check on the standby?
    StandbyHealthy,
    /// A hand-back cut short: does the old LC hold the service address again?
    OldHolds,
}

/// `ask` is asked only what the journal leaves open.
pub fn decide(reached: Reached, mut ask: impl FnMut(Ask) -> bool) -> Decision {
    match reached {
        Reached::SwitchDone => Decision::Finish,
        Reached::SwitchStarted if ask(Ask::StandbyHolds) => Decision::Finish,
        Reached::SwitchStarted | Reached::BeforeSwitch => Decision::RollBack,
        Reached::Watching if ask(Ask::StandbyHealthy) => Decision::Finish,
        Reached::HandingBack if ask(Ask::OldHolds) => Decision::FinishHandBack,
        Reached::Watching | Reached::HandingBack => Decision::HandBack,
        Reached::HandedBack => Decision::FinishHandBack,
        Reached::HandBackFailed => Decision::KeepBoth,
    }
}

/// The LCs of an unfinished run, as the config has them now.
struct Lcs {
    active: Option<LcSpec>,
    standby: Option<LcSpec>,
}

/// Finishes or rolls back every unfinished run whose patchover is gone. Returns what was done.
pub fn recover(o: &mut Orchestrator<'_>) -> Result<Vec<RunReport>, OrchestratorError> {
    let front = crate::front::of(&o.settings.service);
    recover_with(o, front.as_ref().map(|f| f as &dyn Front))
}

/// [`recover`] with the front `[service.front]` names (the recording fake in tests).
pub(crate) fn recover_with(
    o: &mut Orchestrator<'_>,
    front: Option<&dyn Front>,
) -> Result<Vec<RunReport>, OrchestratorError> {
    let mut done = Vec::new();
    for run in o.store.runs()?.into_iter().filter(|r| r.ended_ms.is_none()) {
        let Ok(_lock) = RunLock::acquire(&o.config.run_dir, &run.lc) else {
            continue; // a live patchover is on it
        };
        done.push(recover_run(o, &run, front)?);
    }
    Ok(done)
}

/// What recovery found of a dead run.
struct Found<'f> {
    front: Option<&'f dyn Front>,
    lcs: Lcs,
    reached: Reached,
    mode: Mode,
    service: Option<Ipv4Cidr>,
    /// The journal's last line, `step:state`.
    last: String,
    /// The front's state as journaled; a journal with no front line (an older patchover's)
    /// may have left it paused once its switch started.
    front_paused: bool,
}

/// Finishes or rolls back one unfinished run.
fn recover_run(
    o: &mut Orchestrator<'_>,
    run: &RunRow,
    front: Option<&dyn Front>,
) -> Result<RunReport, OrchestratorError> {
    let entries = journal::read(o.store, run.id)?;
    let reached = journal::reached(&entries);
    let found = Found {
        front,
        lcs: Lcs {
            active: o.config.lc(&run.lc).cloned(),
            standby: run.standby.as_deref().and_then(|s| o.config.lc(s)).cloned(),
        },
        reached,
        mode: run.mode.parse().unwrap_or(Mode::Readdress),
        service: o.config.network.service_address,
        last: journal::last(&entries),
        front_paused: journal::front(&entries).map_or(reached != Reached::BeforeSwitch, |f| {
            f == FrontState::Paused
        }),
    };
    tracing::info!(run = run.id, lc = %run.lc, last = %found.last, "recovering an unfinished run");
    let mut report = RunReport {
        run_id: run.id,
        lc: run.lc.clone(),
        standby: run.standby.clone(),
        mode: run.mode.clone(),
        dry_run: run.dry_run,
        ..RunReport::default()
    };
    let decision = decision(o, run.id, &found);
    let (front, front_error) = match decision {
        Decision::Finish => finish_run(o, run, &found, &mut report)?,
        Decision::RollBack => roll_back_run(o, run, &found, &mut report)?,
        Decision::HandBack | Decision::FinishHandBack | Decision::KeepBoth => {
            hand_back_run(o, run, &found, &mut report, decision)?
        }
    };
    if let (Some(e), Some(error)) = (front_error, &mut report.error) {
        error.push_str(&format!("; {e}"));
    }
    journal::record(
        o.store,
        run.id,
        Step::Recover,
        StepState::Done,
        Some(&serde_json::json!({"outcome": report.outcome, "last": found.last, "front": front})),
    )?;
    o.store.end_run(
        run.id,
        &report.outcome,
        &serde_json::to_value(&report).unwrap_or_default(),
    )?;
    tracing::info!(run = run.id, outcome = %report.outcome, "recovered an unfinished run");
    Ok(report)
}

/// What is to be done with a dead run, once what it may hold still is let go: the active LC
/// (and, in a watch or its hand-back, the new LC, the reverse copy's source) thawed, its
/// leftover copy jobs ended.
fn decision(o: &Orchestrator<'_>, run: i64, found: &Found<'_>) -> Decision {
    let lcs = &found.lcs;
    if let Some(a) = &lcs.active {
        let_go(o, run, a);
    }
    if matches!(found.reached, Reached::Watching | Reached::HandingBack)
        && let Some(s) = &lcs.standby
    {
        let_go(o, run, s);
    }
    decide(found.reached, |ask| match ask {
        Ask::StandbyHolds => holds(o, lcs.standby.as_ref(), found.service, found.mode),
        Ask::OldHolds => holds(o, lcs.active.as_ref(), found.service, found.mode),
        Ask::StandbyHealthy => standby_healthy(o, lcs),
    })
}

/// The service is (or stays) on the standby: it gets the address, the front is released onto
/// it, the old LC stops. Returns what became of the front ([`front_let_go`]).
fn finish_run(
    o: &mut Orchestrator<'_>,
    run: &RunRow,
    found: &Found<'_>,
    report: &mut RunReport,
) -> Result<(serde_json::Value, Option<String>), OrchestratorError> {
    let lcs = &found.lcs;
    finish_network(o, lcs, found.reached, found.mode, found.service)?;
    let front = front_let_go(o, run.id, found, LetGo::Release);
    finish(o, run, lcs)?;
    report.outcome = "ok".into();
    report.error = Some(format!(
        "patchover stopped at {}; the run was finished by recovery",
        found.last
    ));
    Ok(front)
}

/// The service is (put back) on the old LC, its front resumed there, the standby goes.
fn roll_back_run(
    o: &mut Orchestrator<'_>,
    run: &RunRow,
    found: &Found<'_>,
    report: &mut RunReport,
) -> Result<(serde_json::Value, Option<String>), OrchestratorError> {
    let lcs = &found.lcs;
    if found.reached == Reached::SwitchStarted
        && let (Some(a), Some(svc)) = (&lcs.active, found.service)
    {
        network_back(o, a, lcs.standby.as_ref(), found.mode, svc)?;
    }
    let front = front_let_go(o, run.id, found, LetGo::Resume);
    tracing::info!(
        run = run.id,
        "the service is on the active LC; releasing the standby"
    );
    if let Some(s) = &lcs.standby {
        crate::step::release_standby::release(o, s, None);
    }
    report.outcome = match found.reached {
        Reached::BeforeSwitch => "failed",
        _ => "rolled-back",
    }
    .into();
    report.error = Some(format!(
        "patchover stopped at {}; recovery rolled the run back and the service is on {}",
        found.last, run.lc
    ));
    Ok(front)
}

/// What a dead run may hold of the active LC: a crash during the disk copier's cut could
/// leave it frozen (its thaw guard normally thaws it first), and copy jobs outlive the
/// patchover that started them (they would go on writing into the standby's disk).
fn let_go(o: &Orchestrator<'_>, run: i64, active: &LcSpec) {
    if o.backend
        .status(active)
        .is_ok_and(|st| st.state == LcState::Frozen)
    {
        let _ = o.backend.set_frozen(active, false);
    }
    let ended = o.backend.end_leftover_copies(active);
    if !ended.is_empty() {
        tracing::info!(run, jobs = ?ended, "ended the mirror jobs of the interrupted run");
    }
}

/// Whether `lc` holds the service address now (asked of a switch or a hand-back cut short).
fn holds(o: &Orchestrator<'_>, lc: Option<&LcSpec>, service: Option<Ipv4Cidr>, mode: Mode) -> bool {
    let (Some(s), Some(svc)) = (lc, service) else {
        return false;
    };
    endpoint(o.backend, s)
        .ok()
        .and_then(|ep| {
            ServiceAddress::new(svc.addr, mode, &o.config.network.bridge)
                .is_on_host(None, &ep)
                .ok()
        })
        .unwrap_or(false)
}

/// Whether the service passes the watch's check on the standby now (asked of a watch cut
/// short): healthy, the run is finished as a healthy watch's would be.
fn standby_healthy(o: &Orchestrator<'_>, lcs: &Lcs) -> bool {
    let Some(s) = &lcs.standby else { return false };
    let svc = &o.settings.service;
    let checked = crate::service::health(svc).and_then(|hc| {
        let hc = patchover_net::HealthCheck {
            patience: svc.watch_interval.max(hc.patience),
            ..hc
        };
        let to = endpoint(o.backend, s)?;
        crate::step::standby_health::check_service(o.backend, s, &to, &hc, true)
    });
    checked
        .inspect_err(|e| tracing::warn!(lc = %s.id, error = %crate::chain(e), "the watched service does not pass its check; handing it back"))
        .is_ok()
}

/// A run that died in its watch or its hand-back (issue 23): the hand-back is done (again:
/// a hand-back cut short first puts the switcher's leftovers and the address back on the new
/// LC; the reverse copy died with patchover, so a new one copies the whole application disk,
/// cut in the window), finished (the failed LC stops), or, when it did not go through, both
/// LCs are kept.
fn hand_back_run(
    o: &mut Orchestrator<'_>,
    run: &RunRow,
    found: &Found<'_>,
    report: &mut RunReport,
    decision: Decision,
) -> Result<(serde_json::Value, Option<String>), OrchestratorError> {
    let (Some(old), Some(new)) = (&found.lcs.active, &found.lcs.standby) else {
        return Err(OrchestratorError::BadInput(format!(
            "run {} was handing the service back between LCs the config no longer has ({} and {:?})",
            run.id, run.lc, run.standby
        )));
    };
    let lcs = (new, old);
    let done = match decision {
        Decision::HandBack => redo_hand_back(o, run, found, report, lcs),
        Decision::FinishHandBack => {
            let swapped = Lcs {
                active: Some(new.clone()),
                standby: Some(old.clone()),
            };
            // Cut short after the address moved: announced from the old LC as a switch's
            // recovery would (a hand-back that went through announced it itself).
            let network = match found.reached {
                Reached::HandingBack => {
                    finish_network(o, &swapped, found.reached, found.mode, found.service)
                }
                _ => Ok(()),
            };
            network.and_then(|()| crate::step::watch::finish(o, lcs))
        }
        _ => Err(OrchestratorError::Service(
            "the hand-back did not go through before patchover died".into(),
        )),
    };
    let (how, outcome) = match &done {
        Ok(()) => (LetGo::Release, "handed-back"),
        Err(_) => (LetGo::Resume, "hand-back-failed"),
    };
    let front = front_let_go(o, run.id, found, how);
    report.outcome = outcome.into();
    report.error = Some(match done {
        Ok(()) => format!(
            "patchover stopped at {}; recovery handed the service back to {} and stopped {}",
            found.last, old.id, new.id
        ),
        Err(e) => format!(
            "patchover stopped at {}; the service was not handed back to {} ({}); both LCs are kept running",
            found.last,
            old.id,
            crate::chain(&e)
        ),
    });
    Ok(front)
}

/// The hand-back of a dead run, from the start.
fn redo_hand_back(
    o: &mut Orchestrator<'_>,
    run: &RunRow,
    found: &Found<'_>,
    report: &mut RunReport,
    (new, old): (&LcSpec, &LcSpec),
) -> Result<(), OrchestratorError> {
    if found.reached == Reached::HandingBack
        && let Some(svc) = found.service
    {
        network_back(o, new, Some(old), found.mode, svc)?;
    }
    // The reverse copy died with patchover: the hand-back starts a new one.
    crate::step::watch::hand_back(o, run.id, report, (new, old), found.mode, None).map(drop)
}

/// The front (`[service.front]`) of a run whose journal has it paused is let go as `how`
/// says, once the service is where it stays (released onto the standby, or resumed on the
/// old LC once its service runs again), tried as after a switch and journaled
/// (`front_released`, by `recover`). Returns what the recovery line says of it, and what to
/// do when it is still paused.
fn front_let_go(
    o: &mut Orchestrator<'_>,
    run: i64,
    found: &Found<'_>,
    how: LetGo,
) -> (serde_json::Value, Option<String>) {
    let Some(front) = found.front else {
        return (serde_json::Value::Null, None);
    };
    if !found.front_paused {
        return ("not paused".into(), None);
    }
    let driven = Driven::new(front, Some((&mut *o.store, run)), true);
    match driven.let_go(how, "recover", "patchover died with it paused") {
        Ok(tries) => (
            serde_json::json!({"action": how.as_str(), "tries": tries}),
            None,
        ),
        Err(e) => {
            let e = crate::chain(&e);
            (
                serde_json::json!({"action": how.as_str(), "error": e}),
                Some(e),
            )
        }
    }
}

/// The service is on the standby: a switch cut short did not get to its announcements (and
/// left the rule for held SYNs only): the standby announces the address now, so clients stop
/// sending to the old LC's MAC; a hand-off cut short gets the old service's held requests to
/// the standby, whose data is the truth now, before the old LC stops.
fn finish_network(
    o: &Orchestrator<'_>,
    lcs: &Lcs,
    reached: Reached,
    mode: Mode,
    service: Option<Ipv4Cidr>,
) -> Result<(), OrchestratorError> {
    if reached == Reached::SwitchDone {
        return Ok(());
    }
    if mode != Mode::Seamless
        && let (Some(s), Some(svc)) = (&lcs.standby, service)
        && let Ok(ep) = endpoint(o.backend, s)
    {
        assign_service(&ep.access, &ep.iface, ep.mac, svc).map_err(OrchestratorError::in_lc)?;
    }
    if mode == Mode::Seamless
        && let (Some(a), Some(s)) = (&lcs.active, &lcs.standby)
    {
        forward_held(o, a, s);
    }
    Ok(())
}

/// The service is on the standby: the run is finished (the old LC stops, the roles swap).
fn finish(o: &mut Orchestrator<'_>, run: &RunRow, lcs: &Lcs) -> Result<(), OrchestratorError> {
    tracing::info!(
        run = run.id,
        "the service is on the standby; stopping the old LC"
    );
    if let Some(a) = &lcs.active
        && o.backend
            .status(a)
            .is_ok_and(|st| st.state != LcState::Stopped)
    {
        o.backend.stop(a)?;
    }
    if let Some(s) = &lcs.standby {
        o.store.set_role(s.id.as_str(), Role::Active)?;
    }
    o.store.set_role(&run.lc, Role::Standby)?;
    Ok(())
}

/// Puts the service back on the old LC `a` after a switch cut short.
fn network_back(
    o: &Orchestrator<'_>,
    a: &LcSpec,
    standby: Option<&LcSpec>,
    mode: Mode,
    svc: Ipv4Cidr,
) -> Result<(), OrchestratorError> {
    match mode {
        Mode::Path => {
            let sport = standby.map(|s| patchover_lc::host_port_name(&s.id, 0));
            crate::network::path_back(
                o.config,
                &patchover_lc::host_port_name(&a.id, 0),
                sport.as_deref(),
            )
            .map_err(OrchestratorError::net)?;
        }
        Mode::Seamless => {
            // The clients' NAT never left the old LC (or goes back to it now); its service,
            // parked for the hand-off, serves its held requests itself.
            let ep = endpoint(o.backend, a)?;
            patchover_net::seamless_setup(None, svc.addr, ep.address.addr)
                .map_err(|e| OrchestratorError::Switch(Box::new(e.into())))?;
            let mut ctl = crate::service::LcServiceControl {
                backend: o.backend,
                lcs: &o.config.lcs,
                settings: &o.settings.service,
                front: None,
            };
            // A stateless service was never parked.
            if !o.settings.service.stateless
                && let Err(e) = patchover_net::ServiceControl::unpark(&mut ctl, &ep)
            {
                tracing::warn!(lc = %a.id, error = %e, "cannot unpark the old service (it resumes by itself when its park expires)");
            }
            return Ok(());
        }
        Mode::Readdress => {
            let _ = patchover_net::teardown(None, svc.addr);
            if let Some(s) = standby
                && let Ok(ep) = endpoint(o.backend, s)
                && let Ok(lc) = ep.access.open()
            {
                let _ = lc.del_address(&ep.iface, svc);
            }
            let ep = endpoint(o.backend, a)?;
            assign_service(&ep.access, &ep.iface, ep.mac, svc).map_err(OrchestratorError::in_lc)?;
        }
    }
    // The switch may have drained the old service (told it to stop keeping connections
    // alive) before patchover died; the switcher's own rollback resumes it, so must this one,
    // or it stays draining until it restarts.
    resume_service(o, a);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::step::fake::Bed;

    #[test]
    fn the_switch_decides_and_a_cut_short_one_asks_who_holds_the_service() {
        assert_eq!(
            decide(Reached::SwitchDone, |_| panic!("not asked")),
            Decision::Finish
        );
        assert_eq!(
            decide(Reached::BeforeSwitch, |_| panic!("not asked")),
            Decision::RollBack
        );
        let asked = |want: Ask, answer: bool| {
            move |a: Ask| {
                assert_eq!(a, want);
                answer
            }
        };
        assert_eq!(
            decide(Reached::SwitchStarted, asked(Ask::StandbyHolds, true)),
            Decision::Finish
        );
        assert_eq!(
            decide(Reached::SwitchStarted, asked(Ask::StandbyHolds, false)),
            Decision::RollBack
        );
    }

    /// A run journaled the way every patchover so far wrote it (bare step names), whose
    /// patchover died while copying: the service never moved, the standby goes.
    #[test]
    fn an_old_journal_cut_before_the_switch_is_rolled_back() {
        let mut bed = Bed::new();
        bed.backend.running(&["lc1", "lc2"]);
        let run = bed.run.id();
        bed.store.set_run_standby(run, "lc2").unwrap();
        bed.store.set_role("lc2", Role::Standby).unwrap();
        for (step, state) in [
            ("standby_search", "started"),
            ("standby_search", "done"),
            ("malware_check", "started"),
            ("malware_check", "done"),
            ("copy_system_disk", "started"),
        ] {
            bed.store.record_step(run, step, state, None).unwrap();
        }
        let done = bed.recover().unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].outcome, "failed");
        assert!(
            done[0]
                .error
                .as_deref()
                .unwrap()
                .contains("copy_system_disk:started")
        );
        let calls = bed.backend.calls();
        assert!(calls.contains(&"end_copies lc1".to_owned()), "{calls:?}");
        assert!(calls.contains(&"stop lc2".to_owned()), "{calls:?}");
        assert!(
            !calls.contains(&"stop lc1".to_owned()),
            "the service stays: {calls:?}"
        );
        assert_eq!(bed.role("lc2"), Role::Unused);
        let row = bed.store.run(run).unwrap().unwrap();
        assert_eq!(row.outcome.as_deref(), Some("failed"));
        let entries = journal::read(&bed.store, run).unwrap();
        let last = entries.last().unwrap();
        assert_eq!(
            (last.step, last.state),
            (Some(Step::Recover), Some(StepState::Done))
        );
        // Done once: an ended run is not recovered again.
        assert!(bed.recover().unwrap().is_empty());
    }

    /// An old journal whose switch was done: the run is finished, the old LC stops and is
    /// kept as the rollback target.
    #[test]
    fn an_old_journal_with_the_switch_done_is_finished() {
        let mut bed = Bed::new();
        bed.backend.running(&["lc1", "lc2"]);
        let run = bed.run.id();
        bed.store.set_run_standby(run, "lc2").unwrap();
        for (step, state) in [
            ("switch", "started"),
            ("switch", "done"),
            ("stop_old", "started"),
        ] {
            bed.store.record_step(run, step, state, None).unwrap();
        }
        let done = bed.recover().unwrap();
        assert_eq!(done[0].outcome, "ok");
        let calls = bed.backend.calls();
        assert!(calls.contains(&"stop lc1".to_owned()), "{calls:?}");
        assert!(!calls.contains(&"stop lc2".to_owned()), "{calls:?}");
        assert_eq!(bed.role("lc2"), Role::Active);
        assert_eq!(bed.role("lc1"), Role::Standby);
    }

    /// The journal of a run whose switch went through and whose patchover died with the
    /// front left paused (its release still being retried).
    fn died_with_the_front_paused(bed: &mut Bed, switch_done: bool) -> i64 {
        bed.backend.running(&["lc1", "lc2"]);
        let run = bed.run.id();
        bed.store.set_run_standby(run, "lc2").unwrap();
        let mut lines = vec![("switch", "started"), ("front_paused", "done")];
        if switch_done {
            lines.extend([("switch", "done"), ("stop_old", "started")]);
        }
        for (step, state) in lines {
            bed.store.record_step(run, step, state, None).unwrap();
        }
        run
    }

    /// Issue 21: recovery finished a run whose switch was done but never let the front go, so
    /// its clients waited forever. The front the journal has paused is released onto the
    /// standby, and the journal says recovery did it.
    #[test]
    fn r21_a_run_finished_by_recovery_releases_the_front_its_journal_has_paused() {
        use crate::front::fake::FakeFront;
        let mut bed = Bed::new();
        let run = died_with_the_front_paused(&mut bed, true);
        let front = FakeFront::default();
        *front.paused.borrow_mut() = true;
        front.failures.set(1);
        let done = bed.with(|o, _| recover_with(o, Some(&front))).unwrap();
        assert_eq!(done[0].outcome, "ok");
        assert_eq!(*front.calls.borrow(), ["release", "release"], "retried");
        assert!(!*front.paused.borrow());
        let rows = bed.store.steps(run).unwrap();
        let names: Vec<String> = rows
            .iter()
            .map(|r| format!("{}:{}", r.step, r.state))
            .collect();
        let n = names.len();
        assert_eq!(
            names[n - 2..],
            ["front_released:done", "recover:done"],
            "{names:?}"
        );
        let released = rows[n - 2].detail.clone().unwrap();
        assert_eq!(
            (&released["by"], &released["action"], &released["tries"]),
            (
                &serde_json::json!("recover"),
                &serde_json::json!("release"),
                &serde_json::json!(2)
            )
        );
        assert_eq!(
            rows[n - 1].detail.as_ref().unwrap()["front"]["action"],
            "release"
        );
        assert!(bed.backend.calls().contains(&"stop lc1".to_owned()));
    }

    /// A front the journal has released, or a run with no front, is not asked anything; a
    /// journal with no front line whose switch started (an older patchover's) is let go.
    #[test]
    fn only_a_front_the_journal_may_have_left_paused_is_let_go() {
        use crate::front::fake::FakeFront;
        let mut bed = Bed::new();
        let run = died_with_the_front_paused(&mut bed, true);
        bed.store
            .record_step(run, "front_released", "done", None)
            .unwrap();
        let front = FakeFront::default();
        let done = bed.with(|o, _| recover_with(o, Some(&front))).unwrap();
        assert_eq!(done[0].outcome, "ok");
        assert!(front.calls.borrow().is_empty());
        let last = bed.store.steps(run).unwrap().pop().unwrap();
        assert_eq!(last.detail.unwrap()["front"], "not paused");

        let mut bed = Bed::new();
        bed.backend.running(&["lc1", "lc2"]);
        let run = bed.run.id();
        bed.store.set_run_standby(run, "lc2").unwrap();
        for (step, state) in [("switch", "started"), ("switch", "done")] {
            bed.store.record_step(run, step, state, None).unwrap();
        }
        let front = FakeFront::default();
        bed.with(|o, _| recover_with(o, Some(&front))).unwrap();
        assert_eq!(*front.calls.borrow(), ["release"]);
    }

    #[test]
    fn a_watch_cut_short_asks_for_health_and_a_hand_back_cut_short_who_holds_the_service() {
        let never = |_: Ask| -> bool { panic!("not asked") };
        assert_eq!(decide(Reached::HandedBack, never), Decision::FinishHandBack);
        assert_eq!(decide(Reached::HandBackFailed, never), Decision::KeepBoth);
        let answer = |want: Ask, yes: bool| {
            move |a: Ask| {
                assert_eq!(a, want);
                yes
            }
        };
        for (reached, ask, yes, want) in [
            (
                Reached::Watching,
                Ask::StandbyHealthy,
                true,
                Decision::Finish,
            ),
            (
                Reached::Watching,
                Ask::StandbyHealthy,
                false,
                Decision::HandBack,
            ),
            (
                Reached::HandingBack,
                Ask::OldHolds,
                true,
                Decision::FinishHandBack,
            ),
            (
                Reached::HandingBack,
                Ask::OldHolds,
                false,
                Decision::HandBack,
            ),
        ] {
            assert_eq!(decide(reached, answer(ask, yes)), want, "{reached:?} {yes}");
        }
    }

    /// The journal of a run that died after its switch, in its watch (`lines` after it).
    fn died_watching(bed: &mut Bed, lines: &[(&str, &str)]) -> i64 {
        bed.backend.running(&["lc1", "lc2"]);
        let run = bed.run.id();
        bed.store.set_run_standby(run, "lc2").unwrap();
        let mut all = vec![
            ("switch", "started"),
            ("switch", "done"),
            ("watch", "started"),
        ];
        all.extend_from_slice(lines);
        for (step, state) in all {
            bed.store.record_step(run, step, state, None).unwrap();
        }
        run
    }

    /// Killed in a watch whose service does not pass its check now (the fake cannot be
    /// reached): recovery hands the service back with a new reverse copy; here the switch back
    /// cannot be made either (no network), so both LCs are kept and the report says so.
    #[test]
    fn a_run_killed_in_its_watch_with_the_service_failing_is_handed_back() {
        let mut bed = Bed::new();
        bed.settings.service.watch = std::time::Duration::from_secs(5);
        let run = died_watching(&mut bed, &[]);
        let done = bed.recover().unwrap();
        assert_eq!(done[0].outcome, "hand-back-failed");
        let error = done[0].error.as_deref().unwrap();
        assert!(
            error.contains(
                "patchover stopped at watch:started; the service was not handed back to lc1"
            ),
            "{error}"
        );
        let calls = bed.backend.calls();
        let app = bed.disk("lc1", "app");
        assert!(
            calls.contains(&format!("live_copy lc2 {}", app.display())),
            "{calls:?}"
        );
        assert!(!calls.iter().any(|c| c.starts_with("stop")), "{calls:?}");
        let names: Vec<String> = bed
            .store
            .steps(run)
            .unwrap()
            .iter()
            .map(|r| format!("{}:{}", r.step, r.state))
            .collect();
        assert_eq!(
            names[3..],
            ["hand_back:started", "hand_back:failed", "recover:done"],
            "{names:?}"
        );
        assert_eq!(bed.role("lc2"), Role::Active);
    }

    /// Killed once the hand-back went through: the failed LC stops, the old one is active.
    #[test]
    fn a_run_killed_after_its_hand_back_is_finished() {
        let mut bed = Bed::new();
        died_watching(
            &mut bed,
            &[
                ("watch_failed", "done"),
                ("hand_back", "started"),
                ("hand_back", "done"),
            ],
        );
        let done = bed.recover().unwrap();
        assert_eq!(done[0].outcome, "handed-back");
        assert_eq!(bed.backend.calls(), ["end_copies lc1", "stop lc2"]);
        assert_eq!(bed.role("lc1"), Role::Active);
        assert_eq!(bed.role("lc2"), Role::Unused);
    }

    /// Killed after a healthy watch: finished as any switched run (the old LC stops); killed
    /// after a failed hand-back: both LCs stay.
    #[test]
    fn a_run_killed_after_a_healthy_watch_or_a_failed_hand_back() {
        let mut bed = Bed::new();
        died_watching(&mut bed, &[("watch", "done"), ("stop_old", "started")]);
        assert_eq!(bed.recover().unwrap()[0].outcome, "ok");
        assert!(bed.backend.calls().contains(&"stop lc1".to_owned()));

        let mut bed = Bed::new();
        died_watching(
            &mut bed,
            &[("hand_back", "started"), ("hand_back", "failed")],
        );
        assert_eq!(bed.recover().unwrap()[0].outcome, "hand-back-failed");
        assert!(!bed.backend.calls().iter().any(|c| c.starts_with("stop")));
    }

    /// A live patchover holds the run's lock: recovery leaves its run alone.
    #[test]
    fn a_run_whose_patchover_lives_is_left_alone() {
        let mut bed = Bed::new();
        let _lock = RunLock::acquire(&bed.config.run_dir, "lc1").unwrap();
        assert!(bed.recover().unwrap().is_empty());
        assert!(
            bed.store
                .run(bed.run.id())
                .unwrap()
                .unwrap()
                .ended_ms
                .is_none()
        );
    }
}
