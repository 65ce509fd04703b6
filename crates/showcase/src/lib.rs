//! The demo and the benchmarks built on it: `patchover demo` (two LCs, the demo service, a
//! signed bundle, a client reading and writing all along, the patch cycle, the report;
//! `--service nginx`: Debian's nginx and its real updates, [`nginx`] on [`debian_world`]),
//! `patchover bench cycle` (the cycle step by step and the orchestration overhead against
//! stop-patch-restart) and `patchover bench soak` (patch → rollback cycles under load, and
//! what each leaves on the host). They drive the real `patchover` binary that runs them for
//! the patch runs, and the application's operations ([`patchover_app`]) for the rest.

use std::error::Error as StdError;
use std::path::Path;

/// Returns a [`ShowcaseError::Failed`] built like `format!`.
macro_rules! bail {
    ($($t:tt)*) => {
        return Err($crate::ShowcaseError::Failed(format!($($t)*)))
    };
}

/// `bail!` unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($t:tt)*) => {
        if !$cond {
            bail!($($t)*);
        }
    };
}

pub mod cycle;
pub mod debian_world;
pub mod demo;
pub mod nginx;
pub mod pgdemo;
pub mod postgres;
pub mod soak;
pub mod wrk;

/// The demo or a benchmark could not run, or was cut short.
#[derive(Debug, thiserror::Error)]
pub enum ShowcaseError {
    /// Something the run checks failed; the message says what.
    #[error("{0}")]
    Failed(String),
    /// A step failed; the source says why.
    #[error("{what}")]
    Step {
        what: String,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    // What the steps below fail with, as they say it.
    #[error(transparent)]
    App(#[from] patchover_app::AppError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Lc(#[from] patchover_lc::LcError),
    #[error(transparent)]
    Image(#[from] patchover_image::ImageError),
    #[error(transparent)]
    Load(#[from] patchover_load::LoadError),
    #[error(transparent)]
    Netns(#[from] patchover_net::netns::NetnsError),
    #[error(transparent)]
    Key(#[from] patchover_bundle::KeyError),
    #[error(transparent)]
    CreateBundle(#[from] patchover_bundle::create::CreateError),
    #[error(transparent)]
    SignBundle(#[from] patchover_bundle::create::SignBundleError),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Address(#[from] std::net::AddrParseError),
}

/// Names the step a failure happened in: `.context("signing the bundle")`.
pub(crate) trait Context<T> {
    fn context(self, what: &str) -> Result<T, ShowcaseError>;
    fn with_context(self, what: impl FnOnce() -> String) -> Result<T, ShowcaseError>;
}

impl<T, E: StdError + Send + Sync + 'static> Context<T> for Result<T, E> {
    fn context(self, what: &str) -> Result<T, ShowcaseError> {
        self.with_context(|| what.to_owned())
    }

    fn with_context(self, what: impl FnOnce() -> String) -> Result<T, ShowcaseError> {
        self.map_err(|e| ShowcaseError::Step {
            what: what(),
            source: Box::new(e),
        })
    }
}

/// The demo's config loaded, its store and backends opened.
pub(crate) fn env(config_path: &Path) -> Result<patchover_app::Env, ShowcaseError> {
    let config = patchover_core::Config::load(config_path, &patchover_core::HostFacts::probe())
        .map_err(patchover_app::AppError::from)?;
    Ok(patchover_app::Env::open(config)?)
}
