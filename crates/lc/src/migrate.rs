//! Copying a running LC's disks to a standby (seed steps 703/704), owned by each backend —
//! the shape of Cloud Hypervisor's `Pausable → Migratable`: an LC that can be held still can
//! have its disks copied while it runs, with a write history, and cut.
//!
//! - `ns` LCs: `patchover-disk` copies files and traps writes with fanotify; an application
//!   image served by the LC's block server is copied by the server's dirty bitmap instead (see
//!   [`crate::images::ImageServer::live_copy`]).
//! - `qemu` LCs: QEMU copies the disk itself with a `blockdev-mirror` job (the hypervisor's own
//!   write tracking).
//!
//! The orchestrator sees only these traits: it asks for a copy, lets it catch up, and cuts it
//! with the active LC held still.

use std::path::Path;
use std::sync::Arc;

use patchover_core::{DiskSpec, LcSpec, Quiesce};
/// Where a copy reports its bytes as it goes (the orchestrator's meter, or nothing).
pub use patchover_disk::{NoProgress, Progress};

use crate::LcError;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A disk copy failed.
#[derive(Debug, thiserror::Error)]
#[error("copying the {disk} disk")]
pub struct DiskCopyError {
    /// `system` or `application`.
    pub disk: &'static str,
    #[source]
    pub source: BoxError,
}

impl DiskCopyError {
    pub fn system(e: impl Into<BoxError>) -> DiskCopyError {
        DiskCopyError {
            disk: "system",
            source: e.into(),
        }
    }
    pub fn application(e: impl Into<BoxError>) -> DiskCopyError {
        DiskCopyError {
            disk: "application",
            source: e.into(),
        }
    }
}

/// What a finished copy did.
#[derive(Debug, Clone, PartialEq)]
pub struct Copied {
    pub bytes_copied: u64,
    pub bytes_replayed: u64,
    pub detail: serde_json::Value,
}

/// What the cut of a live copy did.
#[derive(Debug, Clone, PartialEq)]
pub struct CutDone {
    pub bytes_replayed: u64,
    /// How long the LC was held still.
    pub freeze_ms: Option<f64>,
    pub detail: serde_json::Value,
    /// What the copy's write history holds from its start to the cut; `None` when the copier
    /// keeps no count that is the disk's alone (QEMU's mirror, the file copier).
    pub writes: Option<Writes>,
}

/// What a write history says about a disk since a moment (a copy's start, a watch's start).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Writes {
    /// The changes recorded, in `unit`s; 0: the disk was not written.
    pub count: u64,
    /// What `count` counts: `"trapped writes"` (a file copy's or a watch's fanotify trap),
    /// `"bytes shipped from the dirty bitmap"` (a served image's copy).
    pub unit: &'static str,
    /// Some of the paths written, when the history names them.
    pub paths: Vec<String>,
}

impl std::fmt::Display for Writes {
    /// `3 trapped writes: kv.log, tmp`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.count, self.unit)?;
        if !self.paths.is_empty() {
            write!(f, ": {}", self.paths.join(", "))?;
        }
        Ok(())
    }
}

/// Counts the writes to an LC's disk from its start on, without copying it (see
/// [`Migratable::watch_writes`]).
pub trait WriteWatch: Send {
    /// Every write seen since the watch started.
    fn writes(&mut self) -> Result<Writes, DiskCopyError>;
}

/// How far a live copy is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CopyProgress {
    pub bytes_copied: u64,
    pub bytes_replayed: u64,
}

/// A copy of a running LC's disk that goes on until [`LiveCopy::cut`]. Dropped uncut (a
/// failed run), it ends and leaves the target marked incomplete.
pub trait LiveCopy: Send {
    /// Whether [`LiveCopy::catch_up`] has anything to do (a copy by rounds); copies that keep
    /// up by themselves do not.
    fn catches_up(&self) -> bool {
        false
    }
    /// Brings the copy close to the source while the LC runs, so that the cut leaves little
    /// to copy; returns what it did.
    fn catch_up(&mut self) -> Result<Option<serde_json::Value>, DiskCopyError> {
        Ok(None)
    }
    /// How far the copy is, if the copier counts it as it goes.
    fn progress(&self) -> Option<CopyProgress> {
        None
    }
    /// Makes the copy complete with the LC held still by `hold`, and lets it go.
    fn cut(self: Box<Self>, hold: &mut dyn Quiesce) -> Result<CutDone, DiskCopyError>;
}

/// Holds every process of an LC still, or lets them go (the cgroup freezer for `ns`, paused
/// vCPUs for `qemu`).
pub trait Pausable {
    fn set_frozen(&self, spec: &LcSpec, frozen: bool) -> Result<(), LcError>;
}

/// Copies a running LC's disks with a write history.
pub trait Migratable: Pausable {
    /// 703: copies the running LC's system disk to `dst` (empty) until caught up, as a
    /// point-in-time copy another LC can boot. Its bulk copy reports to `progress`.
    fn copy_system_disk(
        &self,
        active: &LcSpec,
        dst: &Path,
        progress: &dyn Progress,
    ) -> Result<Copied, DiskCopyError>;
    /// 704: starts copying the running LC's disk `src` to `dst` (empty), following its writes
    /// until the cut. A copier that counts its bulk copy reports it to `progress` (from its
    /// own thread, while later steps run).
    fn live_copy(
        &self,
        active: &LcSpec,
        src: &DiskSpec,
        dst: &DiskSpec,
        progress: Arc<dyn Progress>,
    ) -> Result<Box<dyn LiveCopy>, DiskCopyError>;
    /// Ends the copy jobs a dead patchover left running for `active` (a job outlives the
    /// process that started it, and would go on writing into a standby's disk). Returns what
    /// was ended. One attempt, no waiting: recovery calls it before it puts the service back.
    fn end_leftover_copies(&self, active: &LcSpec) -> Vec<String>;
    /// Starts counting the writes the running LC `active` makes to its disk `disk` (a service
    /// declared stateless must make none). A backend or disk kind that cannot watch says so.
    fn watch_writes(
        &self,
        active: &LcSpec,
        disk: &DiskSpec,
    ) -> Result<Box<dyn WriteWatch>, DiskCopyError> {
        let _ = disk;
        Err(DiskCopyError::application(format!(
            "LC {}'s backend cannot watch its application disk for writes",
            active.id
        )))
    }
}

/// Holds an LC still through its backend, as a [`Quiesce`] for a copy's cut.
pub struct Hold<'a> {
    pub backend: &'a dyn Pausable,
    pub spec: &'a LcSpec,
}

impl Quiesce for Hold<'_> {
    fn freeze(&mut self) -> std::io::Result<()> {
        self.backend
            .set_frozen(self.spec, true)
            .map_err(|e| std::io::Error::other(patchover_core::error_chain(&e)))
    }
    fn thaw(&mut self) -> std::io::Result<()> {
        self.backend
            .set_frozen(self.spec, false)
            .map_err(|e| std::io::Error::other(patchover_core::error_chain(&e)))
    }
}
