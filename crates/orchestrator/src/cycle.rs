//! One patch run: the checks that change nothing, then the run's list of steps
//! ([`crate::step`]), journaled one by one, and what a failed run leaves behind.

use std::path::Path;
use std::time::Duration;

use patchover_bundle::{TrustedKeys, VerifiedBundle, verify_bundle};
use patchover_core::LcSpec;
use patchover_lc::LcState;
use patchover_net::{Endpoint, Mode};
use patchover_store::Role;

use crate::context::{Orchestrator, Run};
use crate::service::get;
use crate::step::{self, Step, StepState};
use crate::{OrchestratorError, PatchRequest, RunReport, chain, journal, network};

/// A failed run: what it did, and why it stopped.
#[derive(Debug, thiserror::Error)]
#[error("patch run {} on {}: {outcome}", report.run_id, report.lc, outcome = report.outcome)]
pub struct RunFailed {
    pub report: Box<RunReport>,
    #[source]
    pub error: OrchestratorError,
}

/// Ends `report` as failed with `error` (an outcome already set, `rolled-back`, is kept).
fn failed(mut report: RunReport, error: OrchestratorError) -> RunFailed {
    if report.outcome.is_empty() {
        report.outcome = "failed".to_owned();
    }
    report.error = Some(chain(&error));
    report.hint = Some(error.hint().to_owned());
    RunFailed {
        report: Box::new(report),
        error,
    }
}

impl<'a> Orchestrator<'a> {
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
        let keys =
            TrustedKeys::from_config(&self.settings.trusted_keys, &self.settings.scoped_keys)
                .map_err(|e| {
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

    /// The checks that change nothing (a failure here opens no run): the active LC runs and
    /// holds the service, the bundles verify.
    fn check(
        &self,
        req: &PatchRequest,
    ) -> Result<(LcSpec, Vec<VerifiedBundle>, Endpoint), OrchestratorError> {
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
            OrchestratorError::BadInput("network.service_address is not set in the config".into())
        })?;
        crate::service::health(&self.settings.service)?;
        crate::service::hooks_present(self.backend, &active, &self.settings.service, req.mode)?;
        if let Some(front) = crate::front::of(&self.settings.service) {
            let at = std::net::SocketAddr::from((service.addr, self.settings.service.port));
            crate::front::check(&front, at, req.mode)?;
        }
        crate::stateless::check(self.backend, &self.settings.service, req.mode, &active)?;
        let from = crate::access::endpoint(self.backend, &active)?;
        if !network::service_is_on(self.config, req.mode, &from, service.addr)? {
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
    }

    /// Runs a whole patch cycle for `req.lc` (or hands the service back, `req.rollback_to`).
    pub fn patch(&mut self, req: &PatchRequest) -> Result<RunReport, RunFailed> {
        let mut report = RunReport {
            lc: req.lc.clone(),
            mode: req.mode.to_string(),
            dry_run: req.dry_run,
            ..RunReport::default()
        };
        let (active, bundles, from) = match self.check(req) {
            Ok(c) => c,
            Err(e) => return Err(failed(report, e)),
        };
        report.run_id =
            match self
                .store
                .begin_run(active.id.as_str(), &req.mode.to_string(), req.dry_run)
            {
                Ok(id) => id,
                Err(patchover_store::StoreError::Conflict(m)) => {
                    return Err(failed(report, OrchestratorError::Conflict(m)));
                }
                Err(e) => return Err(failed(report, e.into())),
            };
        // Armed for the whole run: if this process dies, the guard recovers the run at once
        // (puts the service back or finishes the switch), not when an operator next looks.
        let _guard = self.settings.guard.as_ref().and_then(|(exe, config)| {
            crate::guard::RunGuard::arm(exe, config, &self.config.run_dir)
                .inspect_err(|e| tracing::warn!(error = %e, "cannot arm the run guard; a crash will be recovered by the next patchover"))
                .ok()
        });
        let _ = self.store.set_role(active.id.as_str(), Role::Active);
        report.version_before = self.settings.service.version_path.as_ref().and_then(|p| {
            get(
                &from.access,
                from.address.addr,
                self.settings.service.port,
                p,
                Duration::from_secs(2),
            )
            .ok()
        });
        let steps = self.steps(req, &active);
        let mut run = Run::new(req.clone(), active, from, bundles, report);
        let res = self.run_steps(&mut run, &steps);
        let id = run.id();
        match res {
            Ok(()) => {
                let _ = self.store.end_run(
                    id,
                    &run.report.outcome,
                    &serde_json::to_value(&run.report).unwrap_or_default(),
                );
                Ok(run.report)
            }
            Err(e) => {
                self.after_failure(&mut run);
                let f = failed(run.report, e);
                let _ = self.store.end_run(
                    id,
                    &f.report.outcome,
                    &serde_json::to_value(&*f.report).unwrap_or_default(),
                );
                Err(f)
            }
        }
    }

    /// The list of steps of this run: a patch or a rollback, cut short by a dry run.
    fn steps(&self, req: &PatchRequest, active: &LcSpec) -> Vec<Step> {
        let steps = match req.rollback_to {
            Some(_) => step::rollback_steps(),
            None => step::patch_steps(!self.backend.system_disk_readable_live(active)),
        };
        if req.dry_run {
            step::dry_run(steps)
        } else {
            steps
        }
    }

    /// Runs `steps` in order, each journaled; skips those with nothing to do.
    fn run_steps(&mut self, run: &mut Run, steps: &[Step]) -> Result<(), OrchestratorError> {
        for &s in steps {
            if s.applies(run, &self.settings.service) {
                self.journaled(run, s)?;
            }
            if let Some(e) = run.halt.take() {
                // Failed after the switch (a front left paused): the service is on the
                // standby all the same, whose address is announced as after any switch.
                if run.report.outcome == "switched" {
                    self.announce(run);
                }
                return Err(e);
            }
        }
        if run.req.dry_run {
            run.report.outcome = "dry-run".into();
            return Ok(());
        }
        self.announce(run);
        run.report.outcome = "ok".into();
        Ok(())
    }

    /// After a switch: its first ARP refresh ends, the later ones are left to a refresher.
    fn announce(&mut self, run: &mut Run) {
        if let Some(t) = run.refresh.take() {
            let _ = t.join();
        }
        step::announce_later(self, run);
    }

    /// A run that failed before its switch, or whose switch rolled back, leaves the service
    /// where it was: the standby goes.
    pub(crate) fn after_failure(&mut self, run: &mut Run) {
        // After the switch the standby is no standby any more (a failed watch handed the
        // service back and stopped it, or kept both LCs).
        if matches!(
            run.report.outcome.as_str(),
            "switched" | "handed-back" | "hand-back-failed"
        ) {
            return;
        }
        if let Some(s) = run.standby.clone() {
            let detail = step::release_standby::release(self, &s, run.follow.take());
            let _ = journal::record(
                self.store,
                run.id(),
                Step::ReleaseStandby,
                StepState::Done,
                Some(&detail),
            );
        }
        if run.report.outcome.is_empty() {
            run.report.outcome = "failed".into();
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::step::fake::Bed;
    use crate::step::{self, Step};
    use patchover_store::Role;

    /// 705 fails (the copied system has no boot scripts): the run stops there, nothing after it
    /// runs, the live copy ends and the standby goes; the active LC is never touched.
    #[test]
    fn a_failed_step_stops_the_run_and_lets_the_standby_go() {
        let mut bed = Bed::new();
        bed.backend.running(&["lc1"]);
        let steps = step::patch_steps(false);
        let e = bed
            .with(|o, run| {
                let r = o.run_steps(run, &steps);
                if r.is_err() {
                    o.after_failure(run);
                }
                r
            })
            .unwrap_err();
        assert!(matches!(e, crate::OrchestratorError::Install(_)), "{e:?}");
        assert_eq!(
            bed.journal(),
            [
                "standby_search:started",
                "standby_search:done",
                "malware_check:started",
                "malware_check:done",
                "copy_system_disk:started",
                "copy_system_disk:done",
                "copy_app_disk:started",
                "copy_app_disk:done",
                "install_patches:started",
                "install_patches:failed",
                "release_standby:done"
            ]
        );
        assert_eq!(bed.run.report.outcome, "failed");
        let calls = bed.backend.calls();
        assert!(calls.contains(&"drop copy lc1".to_owned()), "{calls:?}");
        assert!(
            !calls
                .iter()
                .any(|c| c.starts_with("boot") || c.ends_with("lc1") && c.starts_with("stop")),
            "{calls:?}"
        );
        assert_eq!(bed.role("lc2"), Role::Unused);
        let timings: Vec<_> = bed
            .run
            .report
            .steps
            .iter()
            .map(|t| (t.step.as_str(), t.ok))
            .collect();
        assert_eq!(
            timings.last(),
            Some(&(Step::InstallPatches.as_str(), false))
        );
    }

    /// A switched run is not undone by a later failure: the standby holds the service.
    #[test]
    fn after_the_switch_a_failure_keeps_the_standby() {
        let mut bed = Bed::new();
        bed.run.standby = bed.config.lc("lc2").cloned();
        bed.run.report.outcome = "switched".into();
        bed.with(|o, run| o.after_failure(run));
        assert!(bed.journal().is_empty());
        assert!(bed.backend.calls().is_empty());
    }
}
