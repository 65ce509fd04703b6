//! patchover's application layer: what the `patchover` CLI and the daemon's REST API both do.
//!
//! Each operation takes an [`Env`] (the loaded config, the store, the LC backends) and returns
//! a typed result that the CLI renders as a table or `--json`, and the daemon serializes as
//! its answer; so the two paths cannot drift apart. Every failure is an [`AppError`] (or has
//! one in its chain) whose [`ErrorKind`] decides the CLI's exit code
//! ([`ErrorKind::exit_code`]) and the API's status (the binary's one mapping to
//! `patchover_daemon::ErrorCode`).

pub mod config_check;
pub mod doctor;
pub mod env;
pub mod error;
pub mod lcs;
pub mod monitor;
pub mod net;
pub mod patches;
pub mod runs;
pub mod service;
pub mod status;

pub use env::Env;
pub use error::{AppError, ErrorKind};
