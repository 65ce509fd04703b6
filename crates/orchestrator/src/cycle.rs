//! One patch run, step by step (see the crate docs for the order).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::copy::{self, LiveCopy};
use patchover_agent::apply::PatchReport;
use patchover_agent::{Request, Response};
use patchover_bundle::{BundleStatus, PostCheckReport, TrustedKeys, VerifiedBundle, verify_bundle};
use patchover_core::{BackendKind, Config, LcSpec, Quiesce};
use patchover_lc::{LcBackend, LcState, Stdio};
use patchover_net::{Endpoint, Hooks, LcAccess, Mode, SwitchPlan};
use patchover_store::{PatchResult, Role, Store};

use crate::service::get;
use crate::{
    Event, OrchestratorError, PatchRequest, RunReport, Settings, StepTiming, chain, install,
    malware, standby,
};

/// The agent's directory on a standby, as a path inside the LC.
const AGENT_BIN_IN_LC: &str = "/var/lib/patchover-agent/patchover-agent";

/// A failed run: what it did, and why it stopped.
#[derive(Debug, thiserror::Error)]
#[error("patch run {} on {}: {outcome}", report.run_id, report.lc, outcome = report.outcome)]
pub struct RunFailed {
    pub report: Box<RunReport>,
    #[source]
    pub error: OrchestratorError,
}

pub struct Orchestrator<'a> {
    pub config: &'a Config,
    pub store: &'a mut Store,
    pub backend: &'a dyn LcBackend,
    pub settings: &'a Settings,
    pub events: &'a mut dyn FnMut(&Event),
}

/// Holds an LC still through the backend (the cgroup freezer for `ns`).
pub(crate) struct FreezeLc<'a> {
    pub backend: &'a dyn LcBackend,
    pub spec: &'a LcSpec,
}

impl Quiesce for FreezeLc<'_> {
    fn freeze(&mut self) -> std::io::Result<()> {
        self.backend
            .set_frozen(self.spec, true)
            .map_err(|e| std::io::Error::other(chain(&e)))
    }
    fn thaw(&mut self) -> std::io::Result<()> {
        self.backend
            .set_frozen(self.spec, false)
            .map_err(|e| std::io::Error::other(chain(&e)))
    }
}

/// The way into a running LC: `/proc/<init>/ns/net` of an `ns` LC, the agent channel of a
/// `qemu` LC (a VM has no namespace on the host).
pub fn lc_access(backend: &dyn LcBackend, spec: &LcSpec) -> Result<LcAccess, OrchestratorError> {
    let st = backend.status(spec)?;
    if st.state != LcState::Running {
        return Err(patchover_lc::LcError::NotRunning(spec.id.clone()).into());
    }
    match (spec.backend, st.pid, st.agent_socket) {
        (BackendKind::Qemu, _, Some(socket)) => Ok(LcAccess::Agent { socket }),
        (BackendKind::Qemu, _, None) => Err(OrchestratorError::BadInput(format!(
            "LC {} reports no agent channel; the switcher reaches a VM only through it (is the qemu backend current?)",
            spec.id
        ))),
        (BackendKind::Ns, Some(pid), _) => Ok(LcAccess::Netns(PathBuf::from(format!(
            "/proc/{pid}/ns/net"
        )))),
        (BackendKind::Ns, None, _) => {
            Err(patchover_lc::LcError::NotRunning(spec.id.clone()).into())
        }
    }
}

/// The LC's switch endpoint: its first NIC.
pub fn endpoint(backend: &dyn LcBackend, spec: &LcSpec) -> Result<Endpoint, OrchestratorError> {
    let nic = spec.nics.first().ok_or_else(|| {
        OrchestratorError::BadInput(format!(
            "LC {} has no NIC; give it one in the config",
            spec.id
        ))
    })?;
    let address = nic.address.ok_or_else(|| {
        OrchestratorError::BadInput(format!(
            "LC {}'s {} has no address; give it its own address in the config",
            spec.id, nic.name
        ))
    })?;
    Ok(Endpoint {
        name: spec.id.to_string(),
        access: lc_access(backend, spec)?,
        host_port: patchover_lc::host_port_name(&spec.id, 0),
        iface: nic.name.clone(),
        mac: nic.mac,
        address,
        identity: format!("\"host\":\"{}\"", spec.hostname),
    })
}

/// Clears a standby disk so the copier finds an empty destination. Refuses anything that is
/// not the standby's own configured disk path.
fn clear_disk(path: &Path, disk: &'static str) -> Result<(), OrchestratorError> {
    let prep = |source: std::io::Error| OrchestratorError::Prepare {
        disk,
        path: path.to_owned(),
        source,
    };
    // The disk's contents are an LC's: emptied through its root handle (nothing in it is
    // followed), then the empty directory itself goes.
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(prep(e)),
        Ok(m) if m.is_dir() => {
            patchover_lcroot::LcRoot::open(path)
                .and_then(|r| r.clear())
                .map_err(|e| prep(std::io::Error::other(e)))?;
            std::fs::remove_dir(path).map_err(prep)?;
        }
        Ok(_) => std::fs::remove_file(path).map_err(prep)?,
    }
    let marker = patchover_disk::marker_path(path, true);
    if marker.exists() {
        let _ = std::fs::remove_dir_all(marker);
    }
    Ok(())
}

impl<'a> Orchestrator<'a> {
    fn emit(&mut self, run_id: i64, step: &str, state: &str, detail: Option<serde_json::Value>) {
        (self.events)(&Event {
            run_id,
            step: step.to_owned(),
            state: state.to_owned(),
            detail,
        });
    }

    /// Records `name` as started, runs `f`, records it done (with `f`'s detail) or failed.
    fn step<T>(
        &mut self,
        report: &mut RunReport,
        name: &str,
        f: impl FnOnce(&mut Self, &mut RunReport) -> Result<(T, serde_json::Value), OrchestratorError>,
    ) -> Result<T, OrchestratorError> {
        let run = report.run_id;
        self.store.record_step(run, name, "started", None)?;
        self.emit(run, name, "started", None);
        tracing::info!(run, step = name, "step started");
        let t = Instant::now();
        let res = f(self, report);
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        match res {
            Ok((v, mut detail)) => {
                if let serde_json::Value::Object(m) = &mut detail {
                    m.insert("ms".into(), ms.into());
                }
                self.store.record_step(run, name, "done", Some(&detail))?;
                self.emit(run, name, "done", Some(detail));
                report.steps.push(StepTiming {
                    step: name.to_owned(),
                    ms,
                    ok: true,
                });
                Ok(v)
            }
            Err(e) => {
                let detail = serde_json::json!({"error": chain(&e), "ms": ms});
                self.store.record_step(run, name, "failed", Some(&detail))?;
                self.emit(run, name, "failed", Some(detail));
                tracing::warn!(run, step = name, error = %chain(&e), "step failed");
                report.steps.push(StepTiming {
                    step: name.to_owned(),
                    ms,
                    ok: false,
                });
                Err(e)
            }
        }
    }

    /// Resolves the bundles of a request and verifies each (before any LC is touched).
    fn bundles(&self, req: &PatchRequest) -> Result<Vec<VerifiedBundle>, OrchestratorError> {
        let rows = if req.bundles.is_empty() {
            let marked: Vec<_> = self
                .store
                .patches()?
                .into_iter()
                .filter(|p| p.apply_next)
                .collect();
            if marked.is_empty() {
                return Err(OrchestratorError::BadInput(
                    "no patch is marked for the next run; mark one with `patchover patches mark ID` or name it with --bundle".into(),
                ));
            }
            marked
        } else {
            let mut rows = Vec::new();
            for id in &req.bundles {
                rows.push(self.store.patch(id)?.ok_or_else(|| {
                    OrchestratorError::BadInput(format!(
                        "no patch {id:?} in the patch table; import it with `patchover patches import FILE`"
                    ))
                })?);
            }
            rows
        };
        let keys = TrustedKeys::from_files(&self.settings.trusted_keys).map_err(|e| {
            OrchestratorError::BadInput(format!(
                "the trusted bundle keys cannot be read: {}",
                chain(&e)
            ))
        })?;
        let mut out = Vec::new();
        for r in rows {
            let b = verify_bundle(Path::new(&r.file), &keys, &self.settings.bundle_limits)
                .map_err(|source| OrchestratorError::Bundle {
                    id: r.id.clone(),
                    source: Box::new(source),
                })?;
            if b.sha256().to_string() != r.sha256 {
                return Err(OrchestratorError::BadInput(format!(
                    "bundle {} changed since it was imported (sha256 {} != {}); import it again",
                    r.id,
                    b.sha256(),
                    r.sha256
                )));
            }
            out.push(b);
        }
        Ok(out)
    }

    /// Runs a whole patch cycle for `req.lc`.
    pub fn patch(&mut self, req: &PatchRequest) -> Result<RunReport, RunFailed> {
        let mut report = RunReport {
            lc: req.lc.clone(),
            mode: req.mode.to_string(),
            dry_run: req.dry_run,
            ..RunReport::default()
        };
        let fail = |report: &mut RunReport, error: OrchestratorError| {
            report.outcome = if report.outcome.is_empty() {
                "failed".to_owned()
            } else {
                report.outcome.clone()
            };
            report.error = Some(chain(&error));
            report.hint = Some(error.hint().to_owned());
            RunFailed {
                report: Box::new(report.clone()),
                error,
            }
        };

        // Checks that change nothing: a failure here opens no run.
        let pre = (|| -> Result<(LcSpec, Vec<VerifiedBundle>, Endpoint), OrchestratorError> {
            let active = self
                .config
                .lc(&req.lc)
                .ok_or_else(|| OrchestratorError::BadInput(format!("unknown LC {:?}", req.lc)))?
                .clone();
            if self.backend.status(&active)?.state != LcState::Running {
                return Err(OrchestratorError::BadInput(format!(
                    "LC {} is not running, so there is no service to patch; boot it with `patchover lc boot {}`",
                    active.id, active.id
                )));
            }
            let service = self.config.network.service_address.ok_or_else(|| {
                OrchestratorError::BadInput(
                    "network.service_address is not set in the config".into(),
                )
            })?;
            let from = endpoint(self.backend, &active)?;
            let holds = crate::recover::service_is_on(self.config, req.mode, &from, service.addr)?;
            if !holds {
                return Err(OrchestratorError::BadInput(match req.mode {
                    Mode::Path => format!(
                        "LC {}'s port is not on the bridge {}, so it does not serve the service; it is not the active LC",
                        active.id, self.config.network.bridge
                    ),
                    Mode::Seamless => format!(
                        "the service NAT of {} does not point at LC {}; it is not the active LC (point it there once with `patchover net setup {}`)",
                        service.addr, active.id, active.id
                    ),
                    _ => format!(
                        "LC {} does not hold the service address {}; it is not the active LC (give it the address with `patchover service assign {}`)",
                        active.id, service.addr, active.id
                    ),
                }));
            }
            let bundles = if req.rollback_to.is_some() {
                Vec::new()
            } else {
                self.bundles(req)?
            };
            Ok((active, bundles, from))
        })();
        let (active, bundles, from) = pre.map_err(|e| fail(&mut report, e))?;
        let run_id = self
            .store
            .begin_run(active.id.as_str(), &req.mode.to_string(), req.dry_run)
            .map_err(|e| match e {
                patchover_store::StoreError::Conflict(m) => {
                    fail(&mut report, OrchestratorError::Conflict(m))
                }
                e => fail(&mut report, e.into()),
            })?;
        report.run_id = run_id;
        // Armed for the whole run: if this process dies, the guard recovers the run at once
        // (puts the service back or finishes the switch), not when an operator next looks.
        let _guard = self.settings.guard.as_ref().and_then(|(exe, config)| {
            crate::recover::RunGuard::arm(exe, config, &self.config.run_dir)
                .inspect_err(|e| tracing::warn!(error = %e, "cannot arm the run guard; a crash will be recovered by the next patchover"))
                .ok()
        });
        let _ = self.store.set_role(active.id.as_str(), Role::Active);
        report.version_before = get(
            &from.access,
            from.address.addr,
            self.settings.service.port,
            &self.settings.service.version_path,
            Duration::from_secs(2),
        )
        .ok();

        let mut follow: Option<LiveCopy> = None;
        let mut standby: Option<LcSpec> = None;
        let res = self.cycle(
            &mut report,
            req,
            &active,
            &bundles,
            &from,
            &mut follow,
            &mut standby,
        );
        match res {
            Ok(()) => {
                let _ = self.store.end_run(
                    run_id,
                    &report.outcome,
                    &serde_json::to_value(&report).unwrap_or_default(),
                );
                Ok(report)
            }
            Err(e) => {
                let switched = report.outcome == "switched";
                if !switched {
                    // Before (or a rolled-back) switch: the service is where it was.
                    if let Some(s) = &standby {
                        let detail = self.release_standby(s, follow.take());
                        let _ = self.store.record_step(
                            run_id,
                            "release_standby",
                            "done",
                            Some(&detail),
                        );
                    }
                    if report.outcome.is_empty() {
                        report.outcome = "failed".into();
                    }
                }
                let failed = fail(&mut report, e);
                let _ = self.store.end_run(
                    run_id,
                    &failed.report.outcome,
                    &serde_json::to_value(&*failed.report).unwrap_or_default(),
                );
                Err(failed)
            }
        }
    }

    /// Stops a standby that will not take over and removes the patch script from its disk.
    /// Its disks keep whatever the copy left (an unfinished copy stays marked incomplete).
    pub(crate) fn release_standby(
        &mut self,
        s: &LcSpec,
        follow: Option<LiveCopy>,
    ) -> serde_json::Value {
        drop(follow);
        let mut stopped = false;
        if self
            .backend
            .status(s)
            .is_ok_and(|st| st.state != LcState::Stopped)
        {
            stopped = self.backend.stop(s).is_ok();
        }
        let _ = copy::with_root(&s.system_disk, &self.config.run_dir, |root| {
            install::uninstall(root);
            Ok(())
        });
        let _ = self.store.set_role(s.id.as_str(), Role::Unused);
        serde_json::json!({"standby": s.id, "stopped": stopped})
    }

    /// 702: the YARA rules over the files of `disk` (a directory, or an image mounted).
    fn malware_check(
        &mut self,
        report: &mut RunReport,
        disk: &patchover_core::DiskSpec,
    ) -> Result<(), OrchestratorError> {
        self.step(report, "malware_check", |o, _| {
            match &o.settings.yara_rules {
                None => Ok((
                    (),
                    serde_json::json!({"skipped": "no [yara] rules directory in the config"}),
                )),
                Some(dir) => {
                    let rules = malware::Rules::load(dir)?;
                    let rep =
                        copy::with_root(
                            disk,
                            &o.config.run_dir,
                            |root| Ok(rules.scan_tree(root)?),
                        )?;
                    Ok(((), serde_json::to_value(rep).unwrap_or_default()))
                }
            }
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn cycle(
        &mut self,
        report: &mut RunReport,
        req: &PatchRequest,
        active: &LcSpec,
        bundles: &[VerifiedBundle],
        from: &Endpoint,
        follow: &mut Option<LiveCopy>,
        standby_out: &mut Option<LcSpec>,
    ) -> Result<(), OrchestratorError> {
        let run_id = report.run_id;
        // 701 (a rollback names its target: the old LC kept by the run that patched)
        let standby = self.step(report, "standby_search", |o, _| {
            if let Some(target) = &req.rollback_to {
                let t = o.config.lc(target).ok_or_else(|| OrchestratorError::BadInput(format!("unknown LC {target:?}")))?.clone();
                if t.id == active.id {
                    return Err(OrchestratorError::BadInput(format!("LC {target} already runs the service")));
                }
                if o.backend.status(&t)?.state != LcState::Stopped {
                    return Err(OrchestratorError::BadInput(format!("LC {target} is running; a rollback target is a stopped LC kept by an earlier run")));
                }
                if let Some(why) = t.shortfall_against(active) {
                    return Err(OrchestratorError::BadInput(format!("LC {target} cannot take the service: {why}")));
                }
                let detail = serde_json::json!({"standby": t.id, "rollback": true});
                return Ok((t, detail));
            }
            let backend = o.backend;
            let s = standby::find_standby(
                o.config,
                active,
                &|c| backend.status(c).map(|st| st.state != LcState::Stopped).unwrap_or(true),
                &|c| {
                    let kinds = |l: &LcSpec| l.disks().map(|d| d.kind).collect::<Vec<_>>();
                    (kinds(c) != kinds(active)).then(|| "its disks are not of the same kinds (directory/image) as the active LC's".to_owned())
                },
            )?
            .clone();
            let detail = serde_json::json!({"standby": s.id});
            Ok((s, detail))
        })?;
        self.store.set_run_standby(run_id, standby.id.as_str())?;
        report.standby = Some(standby.id.to_string());
        *standby_out = Some(standby.clone());
        let _ = self.store.set_role(standby.id.as_str(), Role::Standby);

        let rollback = req.rollback_to.is_some();
        let run_dir = self.config.run_dir.clone();
        // 702 (a VM's system disk is checked on its point-in-time copy, after 703: the live
        // image is mounted by the guest and cannot be read consistently from the host)
        let vm = active.backend == patchover_core::BackendKind::Qemu;
        if !rollback {
            if !vm {
                self.malware_check(report, &active.system_disk)?;
            }
            // 703: the system disk, replayed until caught up.
            self.step(report, "copy_system_disk", |_, report| {
                clear_disk(&standby.system_disk.path, "system")?;
                let r = copy::copy_system(&run_dir, active, &standby.system_disk.path)?;
                report.bytes_copied += r.bytes_copied;
                report.bytes_replayed += r.bytes_replayed;
                Ok(((), r.detail))
            })?;
            if vm {
                self.malware_check(report, &standby.system_disk)?;
            }
        }

        // 704: the application disk, followed until the cut in the switch window.
        if let (Some(src), Some(dst)) = (&active.app_disk, &standby.app_disk) {
            let f = self.step(report, "copy_app_disk", |_, _| {
                clear_disk(&dst.path, "application")?;
                let f = LiveCopy::start(&run_dir, active, src, dst)?;
                Ok((
                    f,
                    serde_json::json!({"src": src.path, "dst": dst.path, "follow": true}),
                ))
            })?;
            *follow = Some(f);
        }

        // 705/706
        if !rollback {
            self.step(report, "install_patches", |o, _| {
                let i = copy::with_root(&standby.system_disk, &o.config.run_dir, |root| {
                    Ok(install::install(
                        root,
                        standby.id.as_str(),
                        &run_id.to_string(),
                        bundles,
                        &o.settings.trusted_keys,
                        &o.settings.agent_binary,
                    )?)
                })?;
                Ok(((), serde_json::to_value(i).unwrap_or_default()))
            })?;
        }

        // 707 + 1201–1207. The standby boots without its application disk: that disk is still
        // a live copy until the cut, and is attached in the switch window, after it.
        let mut standby_boot = LcSpec {
            app_disk: None,
            ..standby.clone()
        };
        // In `path` mode the standby has the active LC's MAC and address: it stays off the
        // bridge until the switch moves the path to it.
        if req.mode == Mode::Path
            && let Some(n) = standby_boot.nics.first_mut()
        {
            n.detached = true;
        }
        self.step(report, "boot_standby", |o, _| {
            let st = o.backend.boot(&standby_boot)?;
            o.backend.wait_agent(&standby, Duration::from_secs(30))?;
            Ok(((), serde_json::json!({"pid": st.pid})))
        })?;
        if !rollback {
            let patch_report = self.step(report, "patch_report", |o, report| {
                let staged: Vec<&str> = bundles.iter().map(|b| b.id()).collect();
                let r = wait_report(
                    o.backend,
                    &standby,
                    &run_id.to_string(),
                    &staged,
                    o.settings.report_timeout,
                )?;
                for b in &r.report.bundles {
                    let result = match b.status {
                        BundleStatus::Ok => PatchResult::Ok,
                        BundleStatus::Failed => PatchResult::Failed,
                        BundleStatus::Skipped => PatchResult::Skipped,
                    };
                    let mut text = b.output.clone();
                    if let Some(e) = &b.error {
                        text.push_str(&format!("\n[{}] {e}", b.status.as_str()));
                    }
                    o.store
                        .record_patch_result(&b.id, standby.id.as_str(), result, &text)?;
                }
                report.patches = r.report.bundles.clone();
                let detail = serde_json::to_value(&r).unwrap_or_default();
                Ok((r, detail))
            })?;
            if let Some(f) = patch_report.report.failed() {
                return Err(OrchestratorError::PatchFailed {
                    id: f.id.clone(),
                    step: f.step,
                    error: f.error.clone().unwrap_or_default(),
                    output: f.output.clone(),
                });
            }

            // 708
            self.step(report, "reboot_standby", |o, _| {
                let st = o.backend.reboot(&standby_boot)?;
                o.backend.wait_agent(&standby, Duration::from_secs(30))?;
                Ok(((), serde_json::json!({"pid": st.pid})))
            })?;

            // 709: post-checks and the service's health, on the standby's own address.
            self.step(report, "post_checks", |o, report| {
                let out = o.backend.exec(
                    &standby,
                    &[AGENT_BIN_IN_LC.to_owned(), "post-checks".to_owned()],
                    Stdio::Capture,
                )?;
                let rep: PostCheckReport = serde_json::from_slice(&out.stdout).map_err(|e| {
                    OrchestratorError::PostCheck(format!(
                        "no report from the standby ({e}): {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ))
                })?;
                report.post_checks = Some(rep.clone());
                if !rep.passed {
                    let failed: Vec<String> = rep
                        .checks
                        .iter()
                        .filter(|c| !c.passed)
                        .map(|c| {
                            format!("{} check {} ({}): {}", c.bundle, c.index, c.kind, c.detail)
                        })
                        .collect();
                    return Err(OrchestratorError::PostCheck(failed.join("; ")));
                }
                Ok(((), serde_json::to_value(&rep).unwrap_or_default()))
            })?;
        }
        let to = self.step(report, "standby_health", |o, report| {
            let to = endpoint(o.backend, &standby)?;
            let lc = to
                .access
                .open()
                .map_err(|e| OrchestratorError::Health(Box::new(e.into())))?;
            patchover_net::health::check_in(
                &*lc,
                to.address.addr,
                &crate::service::health(&o.settings.service, &to.identity),
            )
            .map_err(|e| OrchestratorError::Health(Box::new(e)))?;
            drop(lc);
            report.version_after = get(
                &to.access,
                to.address.addr,
                o.settings.service.port,
                &o.settings.service.version_path,
                Duration::from_secs(2),
            )
            .ok();
            let detail = serde_json::json!({"version": report.version_after});
            Ok((to, detail))
        })?;

        // A block-level copy catches up while the service runs, so that the cut in the window
        // leaves little to copy.
        if let Some(f) = follow.as_mut().filter(|f| f.catches_up()) {
            self.step(report, "catch_up_app_disk", |_, _| {
                Ok(((), f.catch_up()?.unwrap_or_default()))
            })?;
        }

        if req.dry_run {
            self.step(report, "cut_app_disk", |o, report| {
                let detail = match follow.take() {
                    Some(f) => {
                        let r = f.cut(o.backend, active)?;
                        report.bytes_replayed += r.bytes_replayed;
                        report.freeze_ms = r.freeze_ms;
                        r.detail
                    }
                    None => serde_json::json!({"skipped": "no application disk"}),
                };
                Ok(((), detail))
            })?;
            report.outcome = "dry-run".into();
            return Ok(());
        }

        // The switch (fig. 15/16), with the final catch-up and the restart inside the window.
        let service = self
            .config
            .network
            .service_address
            .expect("checked before the run");
        crate::recover::ensure_bridge_address(self.config).map_err(OrchestratorError::net)?;
        let plan = SwitchPlan {
            host_netns: None,
            bridge: self.config.network.bridge.clone(),
            service,
            from: from.clone(),
            to: to.clone(),
            mode: req.mode,
            health: crate::service::health(&self.settings.service, &to.identity),
            check_from: None,
            garp: patchover_net::GarpConfig {
                refresh_after: if self.settings.refresher.is_some() {
                    Vec::new()
                } else {
                    self.settings.garp.refresh_after.clone()
                },
                ..self.settings.garp.clone()
            },
            drain_deadline: self.settings.drain_deadline,
            queue: crate::recover::queue_number(run_id),
            lock_path: self.config.run_dir.join("switch.lock"),
            // A writing service must not serve from both LCs: hand off.
            handoff: req.mode == Mode::Seamless,
        };
        let backend = self.backend;
        let restart = self.settings.service.restart.clone();
        let svc = self.settings.service.clone();
        let lcs_all = &self.config.lcs[..];
        let switched = self.step(report, "switch", |_, report| {
            let mut cut_report = None;
            let mut in_window = |_: &SwitchPlan| -> Result<(), patchover_net::BoxError> {
                if let Some(f) = follow.take() {
                    cut_report = Some(f.cut(backend, active)?);
                }
                // The application disk, complete as of the cut, goes under the service.
                if let Some(d) = &standby.app_disk {
                    backend.attach_disk(&standby, &d.path, &d.mount)?;
                }
                let out = backend.exec(&standby, &restart, Stdio::Capture)?;
                if out.status != Some(0) {
                    return Err(format!(
                        "{restart:?} exited with {:?}: {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    )
                    .into());
                }
                get(
                    &to.access,
                    to.address.addr,
                    svc.port,
                    &svc.health_path,
                    Duration::from_secs(10),
                )?;
                Ok(())
            };
            let mut ctl = crate::service::LcServiceControl {
                backend,
                lcs: lcs_all,
                settings: &svc,
            };
            let mut hooks = Hooks {
                service: &mut ctl,
                in_window: &mut in_window,
            };
            let sw = patchover_net::switch(&plan, &mut hooks).inspect_err(|e| {
                if matches!(e, patchover_net::SwitchError::RolledBack { .. }) {
                    report.outcome = "rolled-back".into();
                }
            })?;
            report.pause_ms = Some(sw.report.pause_ms);
            report.switch = Some(sw.report.clone());
            let mut detail = serde_json::to_value(&sw.report).unwrap_or_default();
            if let Some(r) = cut_report {
                report.bytes_replayed += r.bytes_replayed;
                report.freeze_ms = r.freeze_ms;
                detail["cut_app_disk"] = r.detail;
            }
            Ok((sw, detail))
        })?;
        report.outcome = "switched".into();

        // The old LC is kept, stopped and intact, as the rollback target.
        self.step(report, "stop_old", |o, _| {
            o.backend.stop(active)?;
            o.store.set_role(standby.id.as_str(), Role::Active)?;
            o.store.set_role(active.id.as_str(), Role::Standby)?;
            Ok(((), serde_json::json!({"rollback_target": active.id})))
        })?;
        if let Some(t) = switched.refresh {
            let _ = t.join();
        }
        // The later announcements of the service address come from a detached process, so
        // that this run ends now.
        if let Some(exe) = &self.settings.refresher
            && !self.settings.garp.refresh_after.is_empty()
        {
            let refresh =
                patchover_net::refresh::Refresh::new(&to, service.addr, &self.settings.garp);
            if let Err(e) = refresh.command(exe).spawn() {
                tracing::warn!(error = %e, "cannot start the gratuitous ARP refresher; neighbours that missed the first burst learn the address by ARP");
            }
        }
        report.outcome = "ok".into();
        Ok(())
    }
}

/// Waits for the standby's patch report (1207) for this run.
fn wait_report(
    backend: &dyn LcBackend,
    standby: &LcSpec,
    run_id: &str,
    staged: &[&str],
    timeout: Duration,
) -> Result<PatchReport, OrchestratorError> {
    let start = Instant::now();
    loop {
        let client = match backend.agent(standby) {
            Err(
                e @ patchover_lc::LcError::Agent {
                    source: patchover_agent::AgentError::Replaced { .. },
                    ..
                },
            ) => return Err(e.into()),
            c => c,
        };
        if let Ok(mut c) = client
            && let Ok(Response::Report { report: Some(v) }) = c.call(&Request::Report)
        {
            // Once the LC says something, it is judged, not waited on: a report this run did
            // not stage is refused at once, and nothing of it is recorded.
            let r = serde_json::from_value::<PatchReport>(v)
                .map_err(|e| OrchestratorError::BadReport(format!("not a patch report: {e}")))?;
            check_report(&r, run_id, standby.id.as_str(), staged)
                .map_err(OrchestratorError::BadReport)?;
            return Ok(r);
        }
        if start.elapsed() >= timeout {
            return Err(OrchestratorError::ReportTimeout(timeout));
        }
        if backend.status(standby)?.state == LcState::Stopped {
            return Err(patchover_lc::LcError::NotRunning(standby.id.clone()).into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the standby reports (1207) is a claim of an untrusted LC: it must be for this run and
/// this LC, and name exactly the bundles staged for it, in order, with the agent's own rule
/// (after a failure the rest are skipped). Returns why not.
pub(crate) fn check_report(
    r: &PatchReport,
    run_id: &str,
    lc: &str,
    staged: &[&str],
) -> Result<(), String> {
    if r.run_id != run_id {
        return Err(format!(
            "the report is for run {:?}, this run is {run_id}",
            r.run_id
        ));
    }
    if r.lc != lc {
        return Err(format!(
            "the report is for LC {:?}, the standby is {lc}",
            r.lc
        ));
    }
    let got: Vec<&str> = r.report.bundles.iter().map(|b| b.id.as_str()).collect();
    if got != staged {
        return Err(format!(
            "the report names the bundles {got:?}, this run staged {staged:?}"
        ));
    }
    let mut failed = false;
    for b in &r.report.bundles {
        if failed && b.status != BundleStatus::Skipped {
            return Err(format!(
                "the report has bundle {} {} after a failed one (the agent skips the rest)",
                b.id,
                b.status.as_str()
            ));
        }
        failed |= b.status == BundleStatus::Failed;
    }
    if r.all_ok != r.report.all_ok() {
        return Err("the report's all_ok contradicts its bundles".into());
    }
    Ok(())
}

#[cfg(test)]
mod report_tests {
    use super::check_report;
    use patchover_agent::apply::PatchReport;

    fn report(run: &str, lc: &str, bundles: &[(&str, &str)]) -> PatchReport {
        let all_ok = bundles.iter().all(|(_, s)| *s == "ok");
        let b: Vec<_> = bundles
            .iter()
            .map(|(id, st)| {
                serde_json::json!({"id": id, "status": st, "exit_code": null, "output": "",
                    "duration_ms": 1, "step": null, "error": null, "finished_unix": 0})
            })
            .collect();
        serde_json::from_value(
            serde_json::json!({"run_id": run, "lc": lc, "all_ok": all_ok, "bundles": b}),
        )
        .unwrap()
    }

    #[test]
    fn only_the_staged_bundles_of_this_run_are_accepted() {
        let staged = ["a", "b"];
        let ok = report("7", "lc2", &[("a", "ok"), ("b", "ok")]);
        check_report(&ok, "7", "lc2", &staged).unwrap();
        let failed = report("7", "lc2", &[("a", "failed"), ("b", "skipped")]);
        check_report(&failed, "7", "lc2", &staged).unwrap();
        for (r, why) in [
            (report("8", "lc2", &[("a", "ok"), ("b", "ok")]), "run"),
            (report("", "lc2", &[("a", "ok"), ("b", "ok")]), "run"),
            (report("7", "lc1", &[("a", "ok"), ("b", "ok")]), "LC"),
            (report("7", "lc2", &[]), "staged"),
            (report("7", "lc2", &[("a", "ok")]), "staged"),
            (report("7", "lc2", &[("b", "ok"), ("a", "ok")]), "staged"),
            (
                report("7", "lc2", &[("a", "ok"), ("b", "ok"), ("evil", "ok")]),
                "staged",
            ),
            (
                report("7", "lc2", &[("a", "failed"), ("b", "ok")]),
                "after a failed",
            ),
        ] {
            let e = check_report(&r, "7", "lc2", &staged).unwrap_err();
            assert!(e.contains(why), "{why}: {e}");
        }
        let mut lie = report("7", "lc2", &[("a", "failed"), ("b", "skipped")]);
        lie.all_ok = true;
        assert!(check_report(&lie, "7", "lc2", &staged).is_err());
    }
}
