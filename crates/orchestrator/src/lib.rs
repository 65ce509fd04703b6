//! The patch execution program (seed fig. 2 and 7, claims 1–3): one patch run, from the
//! standby search to the network switch, as a state machine journaled in the store.
//!
//! A run is a list of typed steps ([`step::Step`], one file each under `step/`; see
//! `docs/architecture.md` for the map): [`step::Step`]s are recorded in the journal before they
//! act and after they are done ([`journal`]), so a restarted patchover knows how far a run got:
//! [`recover`] finishes a run whose switch completed and rolls back any other. Until the switch, nothing touches the active LC except the disk
//! copier's brief freeze; any failure before it releases the standby and leaves the service
//! where it was; a failed switch is rolled back by the switcher itself.
//!
//! Steps: 701 standby search → 702 malware check → 703 system disk copy (replayed once) →
//! 704 application disk copy (followed until the cut) → 705/706 install the bundles, the
//! table copy and the patch execution script → 707 boot the standby, wait for its report
//! (1207) → 708 reboot it → 709 post-checks and the service's health on the standby → the
//! switch, with the application disk's final catch-up and the service restart on the standby
//! inside the switch window → (with `[service] watch_secs`) the watch on the new LC, handing the
//! service back to the still-running old LC if it fails → the old LC is stopped and kept intact
//! as the rollback target.

pub mod front;
pub mod install;
pub mod journal;
pub mod malware;
pub mod network;
pub mod progress;
pub mod recover;
pub mod service;
pub mod standby;
pub mod step;

mod access;
mod context;
mod copy;
mod cycle;
mod guard;
mod stateless;

use std::path::PathBuf;
use std::time::Duration;

use patchover_net::Mode;
use serde::{Deserialize, Serialize};

pub use access::{endpoint as cycle_endpoint, lc_access};
pub use context::Orchestrator;
pub use cycle::RunFailed;
pub use guard::{RunGuard, RunGuardHelper, RunLock};
pub use recover::recover;
pub use service::ServiceSettings;
pub use stateless::StatelessReport;
pub use step::{Step, StepState};

/// What to patch and how.
#[derive(Debug, Clone)]
pub struct PatchRequest {
    /// The active LC.
    pub lc: String,
    /// Bundle ids to apply; empty = every patch marked for the next run.
    pub bundles: Vec<String>,
    pub mode: Mode,
    /// Stop before the switch with the patched standby ready.
    pub dry_run: bool,
    /// Hand the service back to this LC (the old LC kept by an earlier run) instead of
    /// patching: only the application disk is copied, nothing is installed or patched.
    pub rollback_to: Option<String>,
}

/// Knobs of a run that come from the config and the environment.
#[derive(Debug, Clone)]
pub struct Settings {
    pub service: ServiceSettings,
    /// The static agent copied onto the standby.
    pub agent_binary: PathBuf,
    /// Trusted public keys for bundles.
    pub trusted_keys: Vec<PathBuf>,
    /// Public keys trusted only for their scope's bundles (`[[bundles.scoped_keys]]`).
    pub scoped_keys: Vec<patchover_bundle::ScopedKey>,
    pub bundle_limits: patchover_bundle::Limits,
    /// YARA rules directory for step 702 (none: the step is skipped and says so).
    pub yara_rules: Option<PathBuf>,
    /// How long the standby may take to apply the patches and report.
    pub report_timeout: Duration,
    /// How long the old LC may take to finish its requests at the switch.
    pub drain_deadline: Duration,
    /// The first burst of gratuitous ARP at the switch (its `refresh_after` is sent by a
    /// detached process, see `refresher`).
    pub garp: patchover_net::GarpConfig,
    /// The `patchover` binary, for detached helpers (`internal garp-refresh`), so that no
    /// later work keeps a finished run's process alive.
    pub refresher: Option<PathBuf>,
    /// The `patchover` binary and its config, for the run guard: a process that runs the
    /// recovery at once if this one dies in the middle of a run (`internal run-guard`).
    pub guard: Option<(PathBuf, PathBuf)>,
}

/// One step's timing in the report.
#[derive(Debug, Clone, Serialize)]
pub struct StepTiming {
    pub step: String,
    pub ms: f64,
    pub ok: bool,
}

/// What a run did, for the CLI (`--json`) and the run journal.
#[derive(Debug, Clone, Serialize, Default)]
pub struct RunReport {
    pub run_id: i64,
    pub lc: String,
    pub standby: Option<String>,
    pub mode: String,
    pub dry_run: bool,
    /// `ok`, `dry-run`, `failed` (before the switch: the service never moved),
    /// `rolled-back` (the switch failed and the service is back where it was), or `switched`
    /// with an `error` (the service moved to the standby, then the run failed: see the error);
    /// after a failed watch (issue 23) `handed-back` (the service is back on the old LC, the
    /// new one stopped) or `hand-back-failed` (both LCs run, the service on the new one).
    pub outcome: String,
    pub error: Option<String>,
    /// What to do about the error.
    pub hint: Option<String>,
    pub steps: Vec<StepTiming>,
    pub bytes_copied: u64,
    pub bytes_replayed: u64,
    pub freeze_ms: Option<f64>,
    pub pause_ms: Option<f64>,
    pub switch: Option<patchover_net::SwitchReport>,
    pub patches: Vec<patchover_bundle::BundleResult>,
    pub post_checks: Option<patchover_bundle::PostCheckReport>,
    /// The service's answer to the health path before and after.
    pub version_before: Option<String>,
    pub version_after: Option<String>,
    /// A stateless service's `seamless` switch: the application disk's writes before and
    /// after it, and the old LC's connections (`docs/services.md`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stateless: Option<StatelessReport>,
}

/// A step event, for progress output and the event stream (a copy's bytes are
/// [`progress::ProgressEvent`]s).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub run_id: i64,
    pub step: String,
    /// `started`, `done` or `failed`.
    pub state: String,
    pub detail: Option<serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    /// What was asked cannot be done; nothing was changed.
    #[error("{0}")]
    BadInput(String),
    /// Another run of the same LC is still going; nothing was changed.
    #[error("{0}")]
    Conflict(String),
    #[error("run journal")]
    Store(#[from] patchover_store::StoreError),
    #[error(transparent)]
    NoStandby(#[from] standby::NoStandby),
    #[error("malware check")]
    Malware(#[from] malware::MalwareError),
    #[error("bundle {id} is not usable")]
    Bundle {
        id: String,
        #[source]
        source: Box<patchover_bundle::VerifyError>,
    },
    #[error("copying the {disk} disk")]
    Copy {
        disk: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("preparing the standby's {disk} disk {path}")]
    Prepare {
        disk: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Install(#[from] install::InstallError),
    #[error(transparent)]
    Lc(#[from] patchover_lc::LcError),
    #[error(
        "the standby did not report its patch results within {0:?}; see its console log and /var/log/patchover-apply.log on its system disk"
    )]
    ReportTimeout(Duration),
    #[error("the standby's report is refused: {0}")]
    BadReport(String),
    #[error("patch {id} failed on the standby{}: {error}", step.map(|s| format!(" at step {s}")).unwrap_or_default())]
    PatchFailed {
        id: String,
        step: Option<usize>,
        error: String,
        output: String,
    },
    #[error("post-check failed on the standby: {0}")]
    PostCheck(String),
    #[error("the service is not healthy on the standby")]
    Health(#[source] Box<patchover_net::health::HealthError>),
    #[error("the service did not restart on the standby: {0}")]
    Service(String),
    /// A service declared stateless wrote its application disk.
    #[error(
        "[service] stateless: LC {lc} wrote its application disk {} ({writes}), so its service is not stateless",
        if *.after_switch { "while it finished its connections after the switch" } else { "after its copy started" }
    )]
    NotStateless {
        lc: String,
        writes: patchover_lc::Writes,
        after_switch: bool,
    },
    /// The front (`[service.front]`) is still paused after its letting go was retried: its
    /// clients wait until someone lets it go.
    #[error(
        "the front {front} is still paused after {after}, so its clients wait: its {what} failed {tries} times; let it go with: {command}"
    )]
    FrontPaused {
        front: String,
        /// What happened before: the switch went through, rolled back, or recovery.
        after: String,
        what: &'static str,
        tries: usize,
        /// The shell command that resumes it.
        command: String,
        #[source]
        source: Box<patchover_front::FrontError>,
    },
    #[error(transparent)]
    Switch(Box<patchover_net::SwitchError>),
    #[error("network setup")]
    Net(#[source] Box<patchover_net::rtnl::RtnlError>),
    #[error("network setup inside an LC")]
    InLc(#[source] Box<patchover_net::InLcError>),
    /// The watch after the switch failed and the service went back to the old LC.
    #[error(
        "the watch of {lc} after the switch failed ({reason}); the service was handed back to {back_to}"
    )]
    HandedBack {
        lc: String,
        back_to: String,
        reason: String,
    },
    /// The watch failed and the hand-back did not go through: both LCs are kept running.
    #[error(
        "the watch of {lc} after the switch failed ({reason}) and the hand-back to {back_to} did not go through; both LCs are kept running"
    )]
    HandBackFailed {
        lc: String,
        back_to: String,
        reason: String,
        #[source]
        source: Box<OrchestratorError>,
    },
    /// A step ran before the one whose result it needs (a defect, not an operator's error).
    #[error("{step} needs {needs} first")]
    OutOfOrder {
        step: &'static str,
        needs: &'static str,
    },
}

impl From<patchover_net::SwitchError> for OrchestratorError {
    fn from(e: patchover_net::SwitchError) -> Self {
        OrchestratorError::Switch(Box::new(e))
    }
}

impl OrchestratorError {
    pub(crate) fn net(e: patchover_net::rtnl::RtnlError) -> Self {
        OrchestratorError::Net(Box::new(e))
    }

    pub(crate) fn in_lc(e: patchover_net::InLcError) -> Self {
        OrchestratorError::InLc(Box::new(e))
    }

    /// What an operator should do next.
    pub fn hint(&self) -> &'static str {
        match self {
            OrchestratorError::BadInput(_)
            | OrchestratorError::Conflict(_)
            | OrchestratorError::NoStandby(_) => {
                "fix the request or the config; nothing was changed"
            }
            OrchestratorError::Malware(_) => {
                "clean the active LC's system disk (the service keeps running), then run the patch again"
            }
            OrchestratorError::PatchFailed { .. } | OrchestratorError::PostCheck(_) => {
                "the service stays on the active LC; fix the bundle (see `patchover patches show ID`) and run again"
            }
            OrchestratorError::BadReport(_) => {
                "the service stays on the active LC and nothing of the report was recorded; the standby's agent said something this run did not stage: inspect the active LC, which the standby was copied from"
            }
            OrchestratorError::Switch(_) => {
                "the switch was rolled back and the service stays on the active LC; see the error"
            }
            OrchestratorError::NotStateless {
                after_switch: false,
                ..
            } => {
                "the service stays on the active LC; a service that writes its application disk is not stateless: remove `stateless = true` from [service] (seamless then hands off with park/forward) or switch with --mode readdress"
            }
            OrchestratorError::NotStateless {
                after_switch: true, ..
            } => {
                "the service is on the standby with the application disk as of the cut; the old LC's later writes are on its own disk (stopped, kept intact): recover them from there, and remove `stateless = true` from [service]"
            }
            OrchestratorError::HandedBack { .. } => {
                "the service is back on the old LC with the application disk as of the hand-back's cut; the patched LC is stopped: see why it failed (the reason above, its console log), fix the bundle and patch again"
            }
            OrchestratorError::HandBackFailed { .. } => {
                "the service stays where it answered last (the switcher undid a hand-back that failed); both LCs run: see the cause, then stop the one that does not serve or `patchover rollback`"
            }
            OrchestratorError::FrontPaused { .. } => {
                "the front's clients wait until it is resumed: make its admin console answer and run the command in the error (until then the run's last front line in its journal is front_paused)"
            }
            _ => "the service stays on the active LC; fix the cause and run again",
        }
    }
}

/// The whole error chain on one line.
pub use patchover_core::error_chain as chain;
