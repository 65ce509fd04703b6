//! The network switch (seed claims 4/5, fig. 13–17; embodiment 2, fig. 21–26), done by
//! `patchover_net::switch`. Inside its window, with new requests held (and the front paused,
//! `[service.front]`): the old service stopped cleanly, the application disk's final cut, the
//! disk attached under the standby's service and checked against what the old one left, the
//! service restarted there and answering. The switcher rolls itself back on any failure; the
//! run is then `rolled-back`. After a switch the front reconnects and resumes.

use std::time::Duration;

use patchover_core::LcSpec;
use patchover_lc::{LcBackend, Stdio};
use patchover_net::switch::phase::{ATTACH, FREEZE, LAST_CATCH_UP, RESTART, STOP, WINDOW};
use patchover_net::switch::{Laps, Phase};
use patchover_net::{BoxError, Endpoint, HealthCheck, Hooks, SwitchPlan, Switched};

use crate::context::{Orchestrator, Run};
use crate::copy::LiveCopy;
use crate::front::{Driven, LetGo};
use crate::service::{LcServiceControl, RunByBackend};
use crate::{OrchestratorError, RunReport, ServiceSettings, network, stateless};
use patchover_lc::CutDone;

pub(super) fn run(
    o: &mut Orchestrator<'_>,
    run: &mut Run,
) -> Result<serde_json::Value, OrchestratorError> {
    let plan = plan(o, run)?;
    let standby = run.standby()?.clone();
    let restarted = restart_check(&plan);
    let settings = o.settings;
    let svc = &settings.service;
    if stateless::applies(svc, plan.mode) {
        return stateless_switch(o, run, &plan, &standby, &restarted);
    }
    let mut follow = run.follow.take();
    let mut cut = None;
    let mut laps = Laps::now();
    let (backend, active, to) = (o.backend, &run.active, &plan.to);
    let mut in_window = |_: &SwitchPlan| -> Result<(), BoxError> {
        laps = Laps::now();
        cut = take_over_checked(
            backend,
            svc,
            (active, &standby),
            follow.take(),
            to,
            &restarted,
            &mut laps,
        )?;
        Ok(())
    };
    let done = switch_as(o, &mut run.report, &plan, svc, &mut in_window)?;
    let mut detail = done.detail;
    split_window(&mut run.report, &mut detail, laps.phases());
    record_cut(&mut run.report, &mut detail, cut);
    run.refresh = done.sw.refresh;
    run.fail_after_stop = done.front_paused;
    Ok(detail)
}

/// A stateless service in `seamless` (`crate::stateless`): the cut, the disk under the
/// standby's service and its restart come *before* the switch (the standby serves new flows as
/// soon as the NAT flips), then the switch with no drain and no hand-off; its window, once the
/// old LC's connections ended, reads the write trap.
fn stateless_switch(
    o: &mut Orchestrator<'_>,
    run: &mut Run,
    plan: &SwitchPlan,
    standby: &LcSpec,
    restarted: &HealthCheck,
) -> Result<serde_json::Value, OrchestratorError> {
    let svc = stateless::control_settings(&o.settings.service);
    // Refused before the active LC is held still for the cut, if it can be.
    stateless::refuse_if_written(run, None)?;
    let follow = run.follow.take();
    let cut = take_over_checked(
        o.backend,
        &svc,
        (&run.active, standby),
        follow,
        &plan.to,
        restarted,
        &mut Laps::now(),
    )
    .map_err(|e| OrchestratorError::Service(crate::chain(&*e)))?;
    stateless::refuse_if_written(run, cut.as_ref().and_then(|c| c.writes.as_ref()))?;
    let mut watch = run.watch.take();
    let mut after = None;
    let mut in_window = |_: &SwitchPlan| -> Result<(), BoxError> {
        after = stateless::after_flows(watch.as_mut());
        Ok(())
    };
    let done = switch_as(o, &mut run.report, plan, &svc, &mut in_window)?;
    let mut detail = done.detail;
    stateless::record(run, &done.sw.report, after);
    record_cut(&mut run.report, &mut detail, cut);
    detail["stateless"] = serde_json::to_value(&run.report.stateless).unwrap_or_default();
    run.refresh = done.sw.refresh;
    Ok(detail)
}

/// What [`switch_as`] did: the switch, the step's detail, and a front it could not let go
/// after a switch that went through (the run fails with it once the old LC is stopped).
struct SwitchedAs {
    sw: Switched,
    detail: serde_json::Value,
    front_paused: Option<OrchestratorError>,
}

/// Runs the switcher with the service commands of `svc` (and its front, journaled, paused in
/// the drain and let go after the switch, `crate::front::Driven`); the report gets its
/// figures, or `rolled-back` when the switcher put everything back.
fn switch_as(
    o: &mut Orchestrator<'_>,
    report: &mut RunReport,
    plan: &SwitchPlan,
    svc: &ServiceSettings,
    in_window: &mut dyn FnMut(&SwitchPlan) -> Result<(), BoxError>,
) -> Result<SwitchedAs, OrchestratorError> {
    let front = crate::front::of(svc);
    let driven = front
        .as_ref()
        .map(|f| Driven::new(f, Some((&mut *o.store, report.run_id)), false));
    let mut ctl = LcServiceControl {
        backend: o.backend,
        lcs: &o.config.lcs,
        settings: svc,
        front: driven.as_ref(),
    };
    let mut hooks = Hooks {
        service: &mut ctl,
        in_window,
    };
    let switched = patchover_net::switch(plan, &mut hooks);
    let front_let_go = driven
        .as_ref()
        .map(|f| after_switch(f, &switched, &plan.to.name));
    let sw = match switched {
        Ok(sw) => sw,
        Err(e) => {
            if matches!(e, patchover_net::SwitchError::RolledBack { .. }) {
                report.outcome = "rolled-back".into();
            }
            return Err(match front_let_go {
                Some(Err(still_paused)) => still_paused,
                _ => e.into(),
            });
        }
    };
    report.pause_ms = Some(sw.report.pause_ms);
    report.switch = Some(sw.report.clone());
    report.outcome = "switched".into();
    let mut detail = serde_json::to_value(&sw.report).unwrap_or_default();
    let front_paused = front_let_go.and_then(|r| front_detail(&mut detail, r));
    Ok(SwitchedAs {
        sw,
        detail,
        front_paused,
    })
}

/// The window's own phases (`take_over`'s laps) in place of the switcher's `window`, in the
/// report and the step's detail.
fn split_window(report: &mut RunReport, detail: &mut serde_json::Value, parts: &[Phase]) {
    if let Some(sw) = report.switch.as_mut() {
        sw.split_phase(WINDOW, parts);
        detail["phases"] = serde_json::to_value(&sw.phases).unwrap_or_default();
    }
}

/// The application disk's cut in the report and the step's detail.
fn record_cut(report: &mut RunReport, detail: &mut serde_json::Value, cut: Option<CutDone>) {
    if let Some(r) = cut {
        report.bytes_replayed += r.bytes_replayed;
        report.freeze_ms = r.freeze_ms;
        detail["cut_app_disk"] = r.detail;
    }
}

/// [`take_over`], then the restarted service answers on the standby's own address (part of
/// the restart's phase).
fn take_over_checked(
    backend: &dyn LcBackend,
    svc: &ServiceSettings,
    (active, standby): (&LcSpec, &LcSpec),
    follow: Option<LiveCopy>,
    to: &Endpoint,
    restarted: &HealthCheck,
    laps: &mut Laps,
) -> Result<Option<CutDone>, BoxError> {
    let cut = take_over(backend, svc, active, standby, follow, laps)?;
    let lc = to.access.open()?;
    // Checked against its own address before the switch; once more after the answer.
    let by_backend = RunByBackend {
        backend,
        spec: standby,
    };
    let inside = patchover_net::health::Inside::of(&*lc).running(&by_backend);
    patchover_net::health::check_in(inside, to.address.addr, restarted)?;
    patchover_net::health::own_address(&*lc, &to.iface, to.address.addr)?;
    laps.lap(RESTART);
    Ok(cut)
}

/// The front's release in the step's detail (`front_released`, and `front_tries` or
/// `front_error`); returns the error of a front left paused.
fn front_detail(
    detail: &mut serde_json::Value,
    let_go: Result<usize, OrchestratorError>,
) -> Option<OrchestratorError> {
    detail["front_released"] = let_go.is_ok().into();
    match let_go {
        Ok(tries) => {
            detail["front_tries"] = tries.into();
            None
        }
        Err(e) => {
            detail["front_error"] = crate::chain(&e).into();
            Some(e)
        }
    }
}

/// The front after the switch: released onto the standby, or (a failed switch; its rollback
/// resumed it once) resumed while the journal has it paused; each retried. `Ok`: the tries.
fn after_switch(
    front: &Driven<'_>,
    switched: &Result<Switched, patchover_net::SwitchError>,
    to: &str,
) -> Result<usize, OrchestratorError> {
    match switched {
        Ok(_) => front.let_go(
            LetGo::Release,
            "switch",
            &format!("the switch to {to} went through (the service is there)"),
        ),
        Err(_) if !front.is_paused() => Ok(0),
        Err(e) => front.let_go(
            LetGo::Resume,
            "switch",
            &format!("the switch rolled back ({})", crate::chain(e)),
        ),
    }
}

/// What the switcher is asked to do.
fn plan(o: &Orchestrator<'_>, run: &Run) -> Result<SwitchPlan, OrchestratorError> {
    service_address(o)?;
    plan_between(
        o,
        run.from.clone(),
        run.to()?.clone(),
        run.req.mode,
        run.id(),
    )
}

/// A switch of the service from `from` to `to` in `mode`, for the run `run_id`.
fn plan_between(
    o: &Orchestrator<'_>,
    from: Endpoint,
    to: Endpoint,
    mode: patchover_net::Mode,
    run_id: i64,
) -> Result<SwitchPlan, OrchestratorError> {
    let service = service_address(o)?;
    network::ensure_bridge_address(o.config).map_err(OrchestratorError::net)?;
    let mut plan = SwitchPlan {
        host_netns: None,
        bridge: o.config.network.bridge.clone(),
        service,
        from,
        health: crate::service::health(&o.settings.service)?,
        to,
        mode,
        check_from: None,
        garp: patchover_net::GarpConfig {
            // The later announcements come from a detached process (see `announce_later`).
            refresh_after: if o.settings.refresher.is_some() {
                Vec::new()
            } else {
                o.settings.garp.refresh_after.clone()
            },
            ..o.settings.garp.clone()
        },
        drain_deadline: o.settings.drain_deadline,
        queue: network::queue_number(run_id),
        lock_path: o.config.run_dir.join("switch.lock"),
        // A writing service must not serve from both LCs: hand off (unless it is stateless).
        handoff: mode == patchover_net::Mode::Seamless,
        // The standby was booted for this run: never drained, so never resumed.
        resume_to: false,
    };
    stateless::shape(&mut plan, &o.settings.service);
    Ok(plan)
}

fn service_address(o: &Orchestrator<'_>) -> Result<patchover_core::Ipv4Cidr, OrchestratorError> {
    o.config.network.service_address.ok_or_else(|| {
        OrchestratorError::BadInput("network.service_address is not set in the config".into())
    })
}

/// A failed watch's hand-back (issue 23, `super::watch`): the switch from the new LC `failed`
/// back to the old LC `old`, which still runs (drained by the run's switch, so resumed first),
/// with the same take-over in its window the other way round: the reverse
/// follow cut with `failed` held still, the cut attached under the old LC's service, which
/// restarts on it and answers before any client is sent back. The failed service is not
/// asked to drain: it may be gone (its kept-alive connections are then gone with it).
pub(crate) fn hand_back(
    o: &mut Orchestrator<'_>,
    run_id: i64,
    report: &mut RunReport,
    (failed, old): (&LcSpec, &LcSpec),
    mode: patchover_net::Mode,
    follow: Option<LiveCopy>,
) -> Result<serde_json::Value, OrchestratorError> {
    let from = crate::access::endpoint(o.backend, failed)?;
    let to = crate::access::endpoint(o.backend, old)?;
    let mut plan = plan_between(o, from, to, mode, run_id)?;
    // Undone here rather than by the switcher (`resume_to`), whose rollback would also
    // `resume` the failed LC, which this switch never drained.
    crate::recover::resume_service(o, old);
    let restarted = restart_check(&plan);
    let svc = ServiceSettings {
        drain: Vec::new(),
        resume: Vec::new(),
        ..o.settings.service.clone()
    };
    if mode == patchover_net::Mode::Seamless {
        shape_hand_back(&mut plan);
        return seamless_hand_back(o, report, &plan, &svc, (failed, old), follow, &restarted);
    }
    let (backend, to) = (o.backend, &plan.to);
    let mut follow = follow;
    let mut cut = None;
    let mut laps = Laps::now();
    let mut in_window = |_: &SwitchPlan| -> Result<(), BoxError> {
        laps = Laps::now();
        cut = take_over_checked(
            backend,
            &svc,
            (failed, old),
            follow.take(),
            to,
            &restarted,
            &mut laps,
        )?;
        Ok(())
    };
    let done = switch_as(o, report, &plan, &svc, &mut in_window)?;
    let mut detail = done.detail;
    split_window(report, &mut detail, laps.phases());
    record_cut(report, &mut detail, cut);
    // The first burst's refresher thread goes on by itself.
    drop(done.sw.refresh);
    Ok(detail)
}

/// How long a `seamless` hand-back lets the failed LC's pinned flows go on after the NAT
/// flipped back: they were on a failed service, so not long.
const HAND_BACK_DRAIN: Duration = Duration::from_secs(1);

/// A `seamless` hand-back has no hand-off: the failed service can neither park nor forward
/// (it may be gone), and what was in flight on it is lost with it.
fn shape_hand_back(plan: &mut SwitchPlan) {
    plan.handoff = false;
    plan.drain_deadline = plan.drain_deadline.min(HAND_BACK_DRAIN);
}

/// A `seamless` hand-back, ordered as a stateless switch is (`stateless_switch`): the take-over
/// first — the failed LC's `stop` and `cut_check`, the reverse follow cut with the failed LC
/// held still, the old service restarted on the cut and checked on its own address — then
/// the NAT flips back with no hand-off, so no client reaches the old service before it
/// serves the data as of the cut.
fn seamless_hand_back(
    o: &mut Orchestrator<'_>,
    report: &mut RunReport,
    plan: &SwitchPlan,
    svc: &ServiceSettings,
    (failed, old): (&LcSpec, &LcSpec),
    follow: Option<LiveCopy>,
    restarted: &HealthCheck,
) -> Result<serde_json::Value, OrchestratorError> {
    let cut = take_over_checked(
        o.backend,
        svc,
        (failed, old),
        follow,
        &plan.to,
        restarted,
        &mut Laps::now(),
    )
    .map_err(|e| OrchestratorError::Service(crate::chain(&*e)))?;
    let done = switch_as(o, report, plan, svc, &mut |_: &SwitchPlan| Ok(()))?;
    let mut detail = done.detail;
    record_cut(report, &mut detail, cut);
    drop(done.sw.refresh);
    Ok(detail)
}

/// The check of a service restarted in the window: it gets a while to answer again (its own
/// check, on its own address).
fn restart_check(plan: &SwitchPlan) -> HealthCheck {
    HealthCheck {
        patience: plan.health.patience.max(Duration::from_secs(10)),
        ..plan.health.clone()
    }
}

/// In the switch window: the old service stops cleanly (`stop`), the application disk's copy
/// is cut (complete as of now), goes under the standby's service (its own stopped first), is
/// checked to be what the old service left (`cut_check`), and the service restarts there so it
/// reads the data as of the cut. A hook not configured is not run. Each part is a lap of
/// `laps` (`patchover_net::switch::phase`: stop, last catch-up and freeze, attach, restart).
pub(super) fn take_over(
    backend: &dyn LcBackend,
    svc: &ServiceSettings,
    active: &LcSpec,
    standby: &LcSpec,
    follow: Option<LiveCopy>,
    laps: &mut Laps,
) -> Result<Option<CutDone>, patchover_net::BoxError> {
    hook(backend, active, "stop", &svc.stop)?;
    let left = hook(backend, active, "cut_check", &svc.cut_check)?;
    laps.lap(STOP);
    let cut = match follow {
        Some(f) => Some(f.cut(backend, active)?),
        None => None,
    };
    let frozen = cut.as_ref().and_then(|c| c.freeze_ms).unwrap_or(0.0);
    laps.lap_split(LAST_CATCH_UP, FREEZE, frozen);
    hook(backend, standby, "stop", &svc.stop)?;
    if let Some(d) = &standby.app_disk {
        backend.attach_disk(standby, &d.path, &d.mount)?;
    }
    let found = hook(backend, standby, "cut_check", &svc.cut_check)?;
    laps.lap(ATTACH);
    if found != left {
        return Err(format!(
            "[service] cut_check: the standby {} found {found:?} on the cut, but the old LC {} left {left:?}: the cut is not the data the old service left",
            standby.id, active.id
        )
        .into());
    }
    hook(backend, standby, "restart", &svc.restart)?;
    laps.lap(RESTART);
    Ok(cut)
}

/// Runs the hook `argv` in `lc` (not configured: not run, nothing printed); returns what it
/// printed, trimmed. A status other than 0 fails it with its standard error.
fn hook(
    backend: &dyn LcBackend,
    lc: &LcSpec,
    name: &str,
    argv: &[String],
) -> Result<String, patchover_net::BoxError> {
    if argv.is_empty() {
        return Ok(String::new());
    }
    let out = backend.exec(lc, argv, Stdio::Capture)?;
    if out.status != Some(0) {
        return Err(format!(
            "[service] {name} {argv:?} in {} exited with {:?}: {}",
            lc.id,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The later announcements of the service address (`[garp] refresh_after`) come from a
/// detached `patchover internal garp-refresh`, so that the run ends now. Not in `seamless`
/// mode: there the service address stays on the host (its NAT) and no LC holds it, so no LC
/// may claim it. Returns whether a refresher was started.
pub(crate) fn announce_later(o: &Orchestrator<'_>, run: &Run) -> bool {
    let (Some(exe), Some(service), Some(to)) = (
        &o.settings.refresher,
        o.config.network.service_address,
        &run.to,
    ) else {
        return false;
    };
    if o.settings.garp.refresh_after.is_empty() || run.req.mode == patchover_net::Mode::Seamless {
        return false;
    }
    let refresh = patchover_net::refresh::Refresh::new(to, service.addr, &o.settings.garp);
    match refresh.detached(exe).spawn() {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the gratuitous ARP refresher; neighbours that missed the first burst learn the address by ARP");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Step;
    use super::super::fake::Bed;
    use super::take_over;
    use patchover_net::switch::Laps;

    /// A bed whose run moved the service to lc2, with a refresher that records its arguments.
    fn switched_with_a_refresher(mode: patchover_net::Mode) -> (Bed, std::path::PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let mut bed = Bed::with_mode(mode);
        let marker = bed.dir.path().join("announced");
        let exe = bed.dir.path().join("refresher");
        std::fs::write(
            &exe,
            format!(
                "#!/bin/sh\necho \"$@\" > {}.tmp && mv {m}.tmp {m}\n",
                marker.display(),
                m = marker.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        bed.settings.refresher = Some(exe);
        bed.settings.garp.refresh_after = vec![std::time::Duration::from_millis(1000)];
        let mut to = bed.run.from.clone();
        to.name = "lc2".into();
        bed.run.to = Some(to);
        (bed, marker)
    }

    #[test]
    fn the_address_is_announced_later_where_an_lc_holds_it_and_never_in_seamless_mode() {
        let (mut bed, marker) = switched_with_a_refresher(patchover_net::Mode::Readdress);
        assert!(bed.with(|o, run| super::announce_later(o, run)));
        let start = std::time::Instant::now();
        while !marker.exists() && start.elapsed() < std::time::Duration::from_secs(10) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let args = std::fs::read_to_string(&marker).expect("the refresher ran");
        assert!(
            args.contains("garp-refresh") && args.contains("10.9.0.100"),
            "{args}"
        );

        let (mut bed, marker) = switched_with_a_refresher(patchover_net::Mode::Seamless);
        assert!(!bed.with(|o, run| super::announce_later(o, run)));
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(
            !marker.exists(),
            "seamless: the service address is the host's"
        );
    }

    #[test]
    fn in_the_window_the_cut_comes_first_then_the_disk_then_the_restart() {
        let mut bed = Bed::new();
        bed.backend.running(&["lc1"]);
        bed.step(Step::StandbySearch).unwrap();
        bed.step(Step::CopyAppDisk).unwrap();
        bed.step(Step::BootStandby).unwrap();
        let follow = bed.run.follow.take();
        let standby = bed.run.standby.clone().unwrap();
        let mut laps = Laps::now();
        let cut = take_over(
            &bed.backend,
            &bed.settings.service,
            &bed.run.active,
            &standby,
            follow,
            &mut laps,
        )
        .unwrap()
        .unwrap();
        assert_eq!(cut.bytes_replayed, 7);
        // The window's phases, in the order they ran, the cut's freeze inside the cut's time.
        let names: Vec<&str> = laps.phases().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            ["stop", "last_catch_up", "freeze", "attach", "restart"]
        );
        assert!(laps.phases().iter().all(|p| p.ms >= 0.0));
        let calls = bed.backend.calls();
        let at = |s: &str| {
            calls
                .iter()
                .position(|c| c.starts_with(s))
                .unwrap_or_else(|| panic!("{s}: {calls:?}"))
        };
        assert!(at("cut lc1") < at("attach_disk lc2"));
        assert!(at("attach_disk lc2") < at("exec lc2 /etc/init.d/S50demo restart"));
    }

    fn window_with(bed: &mut Bed) -> Result<(), String> {
        let follow = bed.run.follow.take();
        let standby = bed.run.standby.clone().unwrap();
        take_over(
            &bed.backend,
            &bed.settings.service,
            &bed.run.active,
            &standby,
            follow,
            &mut Laps::now(),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    fn stop_and_check(bed: &mut Bed) {
        bed.step(Step::StandbySearch).unwrap();
        bed.step(Step::CopyAppDisk).unwrap();
        bed.step(Step::BootStandby).unwrap();
        bed.settings.service.stop = vec!["pg-stop".into()];
        bed.settings.service.cut_check = vec!["pg-state".into()];
    }

    #[test]
    fn the_old_service_stops_before_the_cut_and_the_standby_finds_what_it_left() {
        let mut bed = Bed::new();
        bed.backend.running(&["lc1"]);
        stop_and_check(&mut bed);
        bed.backend
            .exec_in("lc1", 0, b"state: shut down\ncheckpoint 0/1A\n");
        bed.backend
            .exec_in("lc2", 0, b"state: shut down\ncheckpoint 0/1A");
        window_with(&mut bed).unwrap();
        let calls = bed.backend.calls();
        let at = |s: &str| {
            calls
                .iter()
                .position(|c| c == s || c.starts_with(&format!("{s} ")))
                .unwrap_or_else(|| panic!("{s}: {calls:?}"))
        };
        let order = [
            "exec lc1 pg-stop",
            "exec lc1 pg-state",
            "cut lc1",
            "exec lc2 pg-stop",
            "attach_disk lc2",
            "exec lc2 pg-state",
            "exec lc2 /etc/init.d/S50demo restart",
        ];
        for w in order.windows(2) {
            assert!(at(w[0]) < at(w[1]), "{} before {}: {calls:?}", w[0], w[1]);
        }
    }

    #[test]
    fn a_cut_that_is_not_what_the_old_service_left_is_refused_before_the_restart() {
        let mut bed = Bed::new();
        bed.backend.running(&["lc1"]);
        stop_and_check(&mut bed);
        bed.backend.exec_in("lc1", 0, b"state: shut down");
        bed.backend.exec_in("lc2", 0, b"state: in production");
        let e = window_with(&mut bed).unwrap_err();
        assert!(
            e.contains("the standby lc2 found \"state: in production\" on the cut, but the old LC lc1 left \"state: shut down\""),
            "{e}"
        );
        let calls = bed.backend.calls();
        assert!(!calls.iter().any(|c| c.contains("S50demo")), "{calls:?}");
    }

    #[test]
    fn an_old_service_that_did_not_stop_cleanly_fails_the_window_before_the_cut() {
        let mut bed = Bed::new();
        bed.backend.running(&["lc1"]);
        stop_and_check(&mut bed);
        bed.backend
            .exec_in("lc1", 1, b"Database cluster state: in production");
        let e = window_with(&mut bed).unwrap_err();
        assert!(
            e.contains("[service] stop [\"pg-stop\"] in lc1 exited with Some(1)"),
            "{e}"
        );
        // A stop that "succeeds" but leaves the cluster in production: its cut_check fails.
        bed.settings.service.stop.clear();
        let e = window_with(&mut bed).unwrap_err();
        assert!(
            e.contains("[service] cut_check [\"pg-state\"] in lc1 exited with Some(1)"),
            "{e}"
        );
        let calls = bed.backend.calls();
        assert!(!calls.iter().any(|c| c.starts_with("cut lc1")), "{calls:?}");
        assert!(
            !calls.iter().any(|c| c.starts_with("attach_disk")),
            "{calls:?}"
        );
    }

    #[test]
    fn a_restart_not_configured_is_not_run() {
        let mut bed = Bed::new();
        bed.step(Step::StandbySearch).unwrap();
        bed.backend.running(&["lc1", "lc2"]);
        bed.settings.service.restart.clear();
        let standby = bed.run.standby.clone().unwrap();
        take_over(
            &bed.backend,
            &bed.settings.service,
            &bed.run.active,
            &standby,
            None,
            &mut Laps::now(),
        )
        .unwrap();
        let calls = bed.backend.calls();
        assert!(
            !calls.iter().any(|c| c.starts_with("exec lc2")),
            "{calls:?}"
        );
        assert!(
            calls.iter().any(|c| c.starts_with("attach_disk lc2")),
            "{calls:?}"
        );
    }

    #[test]
    fn a_restart_that_fails_fails_the_window() {
        let mut bed = Bed::new();
        bed.step(Step::StandbySearch).unwrap();
        bed.backend.running(&["lc1", "lc2"]);
        bed.backend.exec_status(3, b"no service");
        let standby = bed.run.standby.clone().unwrap();
        let e = take_over(
            &bed.backend,
            &bed.settings.service,
            &bed.run.active,
            &standby,
            None,
            &mut Laps::now(),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("exited with Some(3): no service"),
            "{e}"
        );
    }

    /// Issue 21: after a switch that rolled back, a front its rollback could not resume (the
    /// journal still has it paused) is resumed with the same retries as a release; a front the
    /// rollback resumed, or never paused, is left alone.
    #[test]
    fn r21_a_front_left_paused_by_a_rolled_back_switch_is_resumed_with_retries() {
        use crate::front::Driven;
        use crate::front::fake::FakeFront;
        let mut bed = Bed::new();
        let run = bed.run.id();
        let failed: Result<patchover_net::Switched, _> =
            Err(patchover_net::SwitchError::DrainTimeout {
                from: "lc1".into(),
                left: 1,
                deadline: std::time::Duration::from_secs(1),
            });
        let front = FakeFront::default();
        let no_wait = [std::time::Duration::ZERO; 8];
        let driven = Driven::new(&front, Some((&mut bed.store, run)), false).with_retry(&no_wait);
        assert_eq!(super::after_switch(&driven, &failed, "lc2").unwrap(), 0);
        assert!(front.calls.borrow().is_empty(), "never paused");
        driven.pause().unwrap();
        front.failures.set(2);
        assert_eq!(super::after_switch(&driven, &failed, "lc2").unwrap(), 3);
        assert_eq!(
            *front.calls.borrow(),
            ["pause", "resume", "resume", "resume"]
        );
        front.failures.set(usize::MAX);
        driven.pause().unwrap();
        let e = super::after_switch(&driven, &failed, "lc2").unwrap_err();
        assert!(
            e.to_string().contains("is still paused after the switch rolled back (switch: the old LC lc1 still has 1 connections"),
            "{e}"
        );
        assert!(e.to_string().contains("resume-the-fake"), "{e}");
    }

    #[test]
    fn no_switch_without_a_healthy_standby_or_a_service_address() {
        let mut bed = Bed::new();
        bed.step(Step::StandbySearch).unwrap();
        let e = bed.step(Step::Switch).unwrap_err();
        assert!(e.to_string().contains("health check"), "{e}");
        bed.config.network.service_address = None;
        let e = bed.step(Step::Switch).unwrap_err();
        assert!(e.to_string().contains("service_address is not set"), "{e}");
    }
}
