//! Signed patch bundles: what a patch is, how it is authenticated, and how it is applied.
//!
//! A bundle is one zstd-compressed tar file holding `manifest.toml` (id, category, severity,
//! targets, ordered apply steps, post-checks) and `payload/` (the scripts, diffs, packages and
//! files the steps use), signed with minisign. See `docs/bundles.md` for the format.
//!
//! The crate is split so the in-LC agent (a static binary) gets only what it needs:
//! - always: [`manifest`], [`archive`] (safe reading and extraction), [`keys`] verification,
//!   [`verify`] (the only way to a [`VerifiedBundle`]), [`apply`] (the engine that runs the
//!   steps and the post-checks), [`table`] (the table copy the agent reads and fills in), and
//!   [`config`] (the `[bundles]` config section);
//! - feature `sign` (default): key generation and signing, used by the host CLI.
//!
//! Nothing here applies a bundle that did not verify: the apply engine only takes
//! [`VerifiedBundle`]s, which only [`verify::verify_bundle`] makes.

pub mod apply;
pub mod aptindex;
pub mod aptshape;
pub mod archive;
pub mod config;
pub mod create;
mod extract;
#[doc(hidden)]
pub mod fuzzing;
pub mod hash;
pub mod keys;
pub mod links;
pub mod manifest;
pub mod table;
pub mod verify;

pub use apply::{
    ApplyOptions, ApplyReport, BundleResult, BundleStatus, CheckResult, PostCheckReport,
    apply_bundles, run_post_checks,
};
pub use archive::{ArchiveError, BundleArchive, Limits};
pub use config::{BundlesConfig, BundlesConfigError};
pub use hash::Sha256;
pub use keys::{
    IndexTrust, KeyError, KeyId, KeyScope, ScopedKey, SignatureError, TrustedKey, TrustedKeys,
};
pub use manifest::{BundleId, Check, Manifest, ManifestError, Severity, Step};
#[cfg(feature = "stage")]
pub use table::stage;
pub use table::{TableCopy, TableEntry, TableError, read_table, verify_marked, write_table};
pub use verify::{VerifiedBundle, VerifyError, verify_bundle};
