//! The model of patchover, shared by every other crate: logical computers (LCs) and their
//! resources (the seed's resource table, fig. 5), patches (the patch table, fig. 6), and the
//! TOML configuration that declares the host's LCs.
//!
//! This crate does no I/O beyond reading the config file and `/proc/meminfo`; everything that
//! touches the host lives in the backend crates, so the model stays testable anywhere.

pub mod config;
pub mod error;
pub mod helper;
pub mod model;
pub mod quiesce;
pub mod shell;

pub use config::{
    Config, ConfigError, DEFAULT_CGROUP_PARENT, DEFAULT_RUN_DIR, DEFAULT_STATE_DIR, FrontKind,
    FrontSettings, HealthProbe, HostFacts, ServiceSettings, TlsTrust,
};
pub use error::chain as error_chain;
pub use model::*;
pub use quiesce::Quiesce;
