//! What a patch run works with: the orchestrator (config, journal, backend, settings) and the
//! run's own state, which the steps fill in as they go.

use patchover_bundle::VerifiedBundle;
use patchover_core::{Config, LcSpec};
use patchover_lc::LcBackend;
use patchover_net::Endpoint;
use patchover_store::Store;

use crate::copy::LiveCopy;
use crate::{Event, OrchestratorError, PatchRequest, RunReport, Settings};

pub struct Orchestrator<'a> {
    pub config: &'a Config,
    pub store: &'a mut Store,
    pub backend: &'a dyn LcBackend,
    pub settings: &'a Settings,
    pub events: &'a mut dyn FnMut(&Event),
    /// Where the disk copies' progress goes (from the copiers' threads).
    pub progress: crate::progress::ProgressSink,
}

impl Orchestrator<'_> {
    pub(crate) fn emit(
        &mut self,
        run_id: i64,
        step: &str,
        state: &str,
        detail: Option<serde_json::Value>,
    ) {
        (self.events)(&Event {
            run_id,
            step: step.to_owned(),
            state: state.to_owned(),
            detail,
        });
    }
}

/// One run: what was asked, what the checks before it found, and what its steps have done.
pub(crate) struct Run {
    pub req: PatchRequest,
    pub active: LcSpec,
    /// The active LC's switch endpoint.
    pub from: Endpoint,
    /// Verified before any LC was touched (none for a rollback).
    pub bundles: Vec<VerifiedBundle>,
    pub report: RunReport,
    /// From 701 on.
    pub standby: Option<LcSpec>,
    /// The application disk's live copy, from 704 until the cut.
    pub follow: Option<LiveCopy>,
    /// The standby's switch endpoint, once its service is healthy.
    pub to: Option<Endpoint>,
    /// The first ARP refresh of a done switch, still going.
    pub refresh: Option<std::thread::JoinHandle<()>>,
    /// Set by a step that ended well but stops the run (a patch failed on the standby).
    pub halt: Option<OrchestratorError>,
    /// A stateless service's write trap on the active LC's application disk, from 704 on
    /// (`crate::stateless`).
    pub watch: Option<Box<dyn patchover_lc::WriteWatch>>,
    /// Found by the switch, it fails the run once the old LC is stopped (a stateless service
    /// that wrote its disk after the switch).
    pub fail_after_stop: Option<OrchestratorError>,
}

impl Run {
    pub(crate) fn new(
        req: PatchRequest,
        active: LcSpec,
        from: Endpoint,
        bundles: Vec<VerifiedBundle>,
        report: RunReport,
    ) -> Run {
        Run {
            req,
            active,
            from,
            bundles,
            report,
            standby: None,
            follow: None,
            to: None,
            refresh: None,
            halt: None,
            watch: None,
            fail_after_stop: None,
        }
    }

    pub(crate) fn id(&self) -> i64 {
        self.report.run_id
    }

    /// The standby (701 ran).
    pub(crate) fn standby(&self) -> Result<&LcSpec, OrchestratorError> {
        self.standby.as_ref().ok_or(OrchestratorError::OutOfOrder {
            step: "a step on the standby",
            needs: "the standby search (701)",
        })
    }

    /// The standby's endpoint (its health was checked).
    pub(crate) fn to(&self) -> Result<&Endpoint, OrchestratorError> {
        self.to.as_ref().ok_or(OrchestratorError::OutOfOrder {
            step: "the switch",
            needs: "the standby's health check",
        })
    }

    /// The ids of the bundles staged for the standby, in order.
    pub(crate) fn staged(&self) -> Vec<&str> {
        self.bundles.iter().map(|b| b.id()).collect()
    }
}
