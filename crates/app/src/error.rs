//! The application's one error type and the kind that decides exit codes and HTTP statuses.
//!
//! Operations fail with an [`AppError`]; errors of the layers below (the config, the store,
//! the LC backends, the orchestrator) keep their own types and are classified here, once, by
//! what they say about the request: [`ErrorKind::of`] walks an error chain to the first cause
//! with a kind. The binary maps a kind to an exit code with [`ErrorKind::exit_code`] and to an
//! API status in one function; nothing matches on message text.

use std::error::Error;

use patchover_core::ConfigError;
use patchover_lc::LcError;
use patchover_orchestrator::OrchestratorError;
use patchover_store::StoreError;

/// What a failure says about the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request or the config cannot be done as asked; nothing was changed.
    BadInput,
    /// The request names something that does not exist (an LC, a patch, a run).
    NotFound,
    /// Something else holds what the request needs (a run of the same LC still going).
    Conflict,
    /// The host failed (I/O, a backend, a child process): not the caller's fault.
    Internal,
}

impl ErrorKind {
    /// The CLI's exit code: 2 for anything the caller can fix, 1 for the host's failures.
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::BadInput | ErrorKind::NotFound | ErrorKind::Conflict => 2,
            ErrorKind::Internal => 1,
        }
    }

    /// The kind of a whole error chain: the first cause that has one, else internal.
    pub fn of(e: &(dyn Error + 'static)) -> ErrorKind {
        let mut cause = Some(e);
        while let Some(c) = cause {
            if let Some(k) = ErrorKind::of_cause(c) {
                return k;
            }
            cause = c.source();
        }
        ErrorKind::Internal
    }

    /// The kind of one error in a chain, if its type says (anyhow's `chain()` walks the rest).
    pub fn of_cause(e: &(dyn Error + 'static)) -> Option<ErrorKind> {
        if let Some(a) = e.downcast_ref::<AppError>() {
            return a.kind();
        }
        if e.is::<ConfigError>() {
            return Some(ErrorKind::BadInput);
        }
        if let Some(l) = e.downcast_ref::<LcError>() {
            return lc_kind(l);
        }
        if let Some(s) = e.downcast_ref::<StoreError>() {
            return store_kind(s);
        }
        if let Some(o) = e.downcast_ref::<OrchestratorError>() {
            return orchestrator_kind(o);
        }
        if let Some(i) = e.downcast_ref::<patchover_image::ImageError>() {
            return i.is_bad_input().then_some(ErrorKind::BadInput);
        }
        None
    }
}

fn lc_kind(e: &LcError) -> Option<ErrorKind> {
    e.is_bad_input().then_some(ErrorKind::BadInput)
}

fn store_kind(e: &StoreError) -> Option<ErrorKind> {
    matches!(e, StoreError::Conflict(_)).then_some(ErrorKind::Conflict)
}

fn orchestrator_kind(e: &OrchestratorError) -> Option<ErrorKind> {
    match e {
        OrchestratorError::BadInput(_) | OrchestratorError::NoStandby(_) => {
            Some(ErrorKind::BadInput)
        }
        OrchestratorError::Conflict(_) => Some(ErrorKind::Conflict),
        OrchestratorError::Store(s) => store_kind(s),
        OrchestratorError::Lc(l) => lc_kind(l),
        _ => None,
    }
}

/// An operation of the application failed.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// What was asked cannot be done as asked; nothing was changed.
    #[error("{0}")]
    BadInput(String),
    /// What was asked names something that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Something else holds what was asked for.
    #[error("{0}")]
    Conflict(String),
    // The layers below say what failed themselves: their messages pass through unchanged.
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Lc(#[from] LcError),
    #[error(transparent)]
    Orchestrator(#[from] OrchestratorError),
    #[error(
        "the LC runs but its agent did not answer; see its console log {}",
        console_log.display()
    )]
    AgentSilent {
        console_log: std::path::PathBuf,
        #[source]
        source: LcError,
    },
    #[error("config [bundles]")]
    TrustedKeys(#[source] patchover_bundle::BundlesConfigError),
    /// The bundle was refused; `bad` when for what it is (bad input), not for the host.
    #[error("bundle {} is not imported", file.display())]
    Bundle {
        file: std::path::PathBuf,
        bad: bool,
        #[source]
        source: Box<patchover_bundle::VerifyError>,
    },
    #[error("status of LC {lc}")]
    Status {
        lc: String,
        #[source]
        source: LcError,
    },
    /// A switch failed or was refused; the service stays where it was.
    #[error(transparent)]
    Switch(Box<patchover_net::SwitchError>),
    /// The host's network or an LC's failed; the error says what.
    #[error(transparent)]
    Host(Box<dyn Error + Send + Sync>),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl AppError {
    /// A failure of the host's network or of an LC, kept as it is.
    pub fn host(e: impl Error + Send + Sync + 'static) -> AppError {
        AppError::Host(Box::new(e))
    }

    /// This error's kind, when it has one of its own (a wrapped error may have none: then the
    /// rest of its chain decides).
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            AppError::BadInput(_) => Some(ErrorKind::BadInput),
            AppError::NotFound(_) => Some(ErrorKind::NotFound),
            AppError::Conflict(_) => Some(ErrorKind::Conflict),
            AppError::Config(_) => Some(ErrorKind::BadInput),
            AppError::Store(s) => store_kind(s),
            AppError::Lc(l) => lc_kind(l),
            AppError::Orchestrator(o) => orchestrator_kind(o),
            AppError::Bundle { bad: true, .. } => Some(ErrorKind::BadInput),
            AppError::Status { source, .. } => lc_kind(source),
            AppError::Switch(e) => {
                crate::net::switch_is_bad_input(e).then_some(ErrorKind::BadInput)
            }
            AppError::Host(e) => Some(ErrorKind::of(&**e)),
            AppError::Bundle { bad: false, .. }
            | AppError::TrustedKeys(_)
            | AppError::AgentSilent { .. }
            | AppError::Io { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_decide_exit_codes() {
        assert_eq!(
            ErrorKind::of(&AppError::BadInput("x".into())).exit_code(),
            2
        );
        assert_eq!(
            ErrorKind::of(&AppError::NotFound("x".into())).exit_code(),
            2
        );
        assert_eq!(
            ErrorKind::of(&AppError::Conflict("x".into())).exit_code(),
            2
        );
        let io = AppError::Io {
            what: "reading x".into(),
            source: std::io::Error::other("disk on fire"),
        };
        assert_eq!(ErrorKind::of(&io), ErrorKind::Internal);
        assert_eq!(ErrorKind::Internal.exit_code(), 1);
    }

    /// A run refused because another run of the LC is still going is a conflict by its type,
    /// not by its message (the daemon matched "still going" before).
    #[test]
    fn a_run_still_going_is_a_conflict_wherever_it_is_wrapped() {
        let store = || StoreError::Conflict("run 3 for LC lc1 is still going".into());
        assert_eq!(ErrorKind::of(&store()), ErrorKind::Conflict);
        let o = OrchestratorError::Conflict("run 3 for LC lc1 is still going".into());
        assert_eq!(ErrorKind::of(&o), ErrorKind::Conflict);
        let o = OrchestratorError::Store(store());
        assert_eq!(ErrorKind::of(&o), ErrorKind::Conflict);
        assert_eq!(ErrorKind::of(&AppError::from(o)), ErrorKind::Conflict);
        let bad = OrchestratorError::BadInput("a run still going".into());
        assert_eq!(ErrorKind::of(&bad), ErrorKind::BadInput);
    }

    #[test]
    fn lc_errors_are_bad_input_only_when_the_request_was() {
        let running = LcError::NotRunning("lc1".parse().unwrap());
        assert_eq!(ErrorKind::of(&running), ErrorKind::BadInput);
        assert_eq!(
            ErrorKind::of(&OrchestratorError::Lc(running)),
            ErrorKind::BadInput
        );
    }
}
