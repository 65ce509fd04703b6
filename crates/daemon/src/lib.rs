//! patchover's daemon: the REST API, the event stream and the metrics, as a library.
//!
//! The HTTP side (this crate) only parses: every request becomes one [`api::Command`] and is
//! handed to a [`api::Dispatch`] that the binary implements with the same functions the CLI
//! uses (Firecracker's `VmmAction` shape). That keeps the router testable with a fake
//! dispatcher and leaves one implementation of every verb. Errors become HTTP statuses in one
//! place ([`api::ErrorCode::status`]); metrics are registered in one place ([`metrics`]).

pub mod api;
pub mod auth;
pub mod client;
pub mod config;
pub mod metrics;
pub mod notify;
pub mod server;
pub mod slow;
pub mod tls;

pub use api::{ApiError, Command, Dispatch, ErrorCode, Reply};
pub use config::DaemonConfig;
pub use metrics::Metrics;
pub use notify::{Notifier, NotifyError};
pub use server::{Hub, RunGuard, router, routes, serve, tls_config};
pub use tls::{TlsError, TlsFiles};
