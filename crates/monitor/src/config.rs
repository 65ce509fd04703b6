//! The `[monitor]` section of the patchover config.
//!
//! The config loader (`patchover_core::config`) types and checks the section at load, like
//! every other section (unknown keys, paths, ranges and addresses are errors at their line);
//! the monitor uses the checked values. See `docs/monitor.md`.

pub use patchover_core::config::{
    AptFeedConfig, FeedConfig, MailServer, MonitorConfig, PasswordFileError, TlsMode, valid_address,
};
