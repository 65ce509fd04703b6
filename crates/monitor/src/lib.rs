//! The patch monitor (seed fig. 18–20, claim 6): watch patch servers, tell the administrator,
//! act on the administrator's authenticated answer.
//!
//! - [`index`]: the signed feed index a patch server publishes, and `feed publish`;
//! - [`fetch`]: HTTP(S) with one deadline per fetch, byte limits, hand-followed redirects
//!   and a host allow-list;
//! - [`poll`]: one conditional poll of one feed with backoff, bundle download and
//!   verification, registration in the patch table (1801–1803);
//! - [`notice`]: the notice mail over SMTP (1804–1805);
//! - [`approval`]: challenges and HMAC-SHA256 approval codes (1807);
//! - [`mailbox`] and [`reply`]: reading the administrator's reply over IMAP (1806);
//! - [`monitor`]: one round of all that, and [`monitor::Monitor::decide`], where a genuine
//!   decision sets the apply-next flags (1808) and starts the patch cycle (1809) through
//!   [`monitor::PatchStarter`];
//! - [`config`]: the `[monitor]` config section.
//!
//! State (feed validators and backoff, challenges, the mailbox position) lives in the store,
//! so it survives restarts. See `docs/monitor.md`.

pub mod approval;
pub mod apt;
pub mod bench;
pub mod config;
pub mod fetch;
#[doc(hidden)]
pub mod fuzzing;
pub mod index;
pub mod mailbox;
pub mod monitor;
pub mod notice;
pub mod poll;
pub mod reply;

pub use approval::{ApprovalError, Decision, Scope, Secret, Verdict};
pub use config::{
    AptFeedConfig, FeedConfig, MailServer, MonitorConfig, PasswordFileError, TlsMode,
};
pub use index::{FeedIndex, IndexEntry, IndexError, PublishError, PublishedFeed, publish};
pub use monitor::{
    DecisionError, DecisionOutcome, Monitor, PatchStarter, RunHandle, RunReport, StartError,
};
