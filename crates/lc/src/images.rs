//! The seam through which the `ns` backend serves its LCs' application *image* disks from a
//! block layer that keeps a write history (QEMU's `qemu-storage-daemon`, in `patchover-qemu`),
//! instead of loop-mounting the image file itself.
//!
//! Why a seam: the block server lives in `patchover-qemu`, which depends on this crate; the
//! binary gives the `ns` backend an implementation ([`crate::ns::NsBackend::with_images`]).
//! Served, an image is loop-mounted through the file the server returns (a FUSE export) and
//! the backend copies it by the server's dirty bitmap ([`ImageServer::live_copy`]); unserved (no server given), it is
//! loop-mounted directly and copied by the file copier.

use std::io;
use std::path::{Path, PathBuf};

use patchover_core::LcId;

use crate::migrate::{DiskCopyError, LiveCopy};

/// The block node name of an LC's application disk in its server.
pub const APP_NODE: &str = "app";

/// Serves the image disks of `ns` LCs, one server per LC.
pub trait ImageServer: Send + Sync {
    /// Serves `image` as block node `node` of `lc` (starting the LC's server if none runs) and
    /// returns the file to loop-mount in its place. On error nothing new is left running.
    fn serve(&self, lc: &LcId, node: &str, image: &Path) -> io::Result<PathBuf>;

    /// Stops serving `lc`'s disks; nothing served is not an error. Refused while an export is
    /// still loop-mounted (the caller waits for the LC's mounts to go first).
    fn stop(&self, lc: &LcId) -> io::Result<()>;

    /// Stops serving one disk of `lc` (its export must not be mounted).
    fn unserve(&self, lc: &LcId, node: &str) -> io::Result<()>;

    /// The nodes `lc`'s server serves now (none when it runs no server).
    fn served(&self, lc: &LcId) -> Vec<String>;

    /// Starts a live copy of `lc`'s served disk `node` into `dst` by the server's own write
    /// history: a full copy now, the writes since at the cut. `at` is the LC's filesystem on
    /// that disk as the host sees it (synced before the cut). `None`: the disk is not served
    /// (the backend copies its files instead).
    fn live_copy(
        &self,
        lc: &LcId,
        node: &str,
        dst: &Path,
        at: &Path,
    ) -> Option<Result<Box<dyn LiveCopy>, DiskCopyError>> {
        let _ = (lc, node, dst, at);
        None
    }

    /// Ends the copy jobs a dead patchover left on `lc`'s server; returns what was ended.
    fn end_copies(&self, lc: &LcId) -> Vec<String> {
        let _ = lc;
        Vec::new()
    }
}
