//! Real Debian systems for patchover (issue 19).
//!
//! - [`image`]: a Debian root filesystem for an LC (mmdebstrap from the host's archive).
//! - [`fromapt`]: a patch bundle from the updates the archive offers for an LC's packages.
//! - [`sources`], [`apt`], [`status`]: the host's apt sources, apt run with a state of its own,
//!   the LC's dpkg status read through its confined root.
//! - [`reader`]: what from-apt reads of an LC: through its root on the host, or through a
//!   running VM's agent.
//!
//! See `docs/debian.md`.

pub mod apt;
#[cfg(feature = "fixture")]
pub mod fixture;
pub mod fromapt;
pub mod fuzzing;
pub mod image;
pub mod reader;
pub mod run;
pub mod sources;
pub mod status;
