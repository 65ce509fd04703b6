//! How the `ns` backend copies a running LC's disks (seed 703/704): files by
//! `patchover-disk` (fanotify traps the writes meanwhile); an application image its block
//! server serves, by the server's dirty bitmap ([`crate::images::ImageServer::live_copy`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use patchover_core::{DiskKind, DiskSpec, LcSpec, Quiesce};
use patchover_disk::{CopyOptions, FollowCopy, Progress};

use super::NsBackend;
use crate::host::Host;
use crate::images::APP_NODE;
use crate::migrate::{
    Copied, CopyProgress, CutDone, DiskCopyError, LiveCopy, Migratable, WriteWatch, Writes,
};

/// The system disk is copied once, then caught up for a few rounds only. It is not followed
/// to a cut like the application disk: the standby's system disk is patched and booted as of
/// this copy, whatever the running LC writes after it (logs). A file written all the time
/// (nginx's access log under load) is re-read whole by each round, so 20 rounds cost 20 reads
/// of a log that grows cycle after cycle: the ten-cycle nginx run's copy grew from 7 to 29 s.
/// Both copies count the source first (a walk of its metadata), so progress has a total.
const SYSTEM_DISK_COPY: CopyOptions = CopyOptions {
    max_rounds: 3,
    scan_totals: true,
    ..CopyOptions::DEFAULT
};

/// The application disk's file copy: the defaults, counted first like the system disk.
const APP_DISK_COPY: CopyOptions = CopyOptions {
    scan_totals: true,
    ..CopyOptions::DEFAULT
};

impl<H: Host> Migratable for NsBackend<H> {
    fn copy_system_disk(
        &self,
        active: &LcSpec,
        dst: &Path,
        progress: &dyn Progress,
    ) -> Result<Copied, DiskCopyError> {
        let r =
            patchover_disk::copy_once(&active.system_disk.path, dst, &SYSTEM_DISK_COPY, progress)
                .map_err(DiskCopyError::system)?;
        Ok(Copied {
            bytes_copied: r.stats.bytes_copied,
            bytes_replayed: r.stats.bytes_replayed,
            detail: serde_json::to_value(&r).unwrap_or_default(),
        })
    }

    fn live_copy(
        &self,
        active: &LcSpec,
        src: &DiskSpec,
        dst: &DiskSpec,
        progress: Arc<dyn Progress>,
    ) -> Result<Box<dyn LiveCopy>, DiskCopyError> {
        if src.kind == DiskKind::Image
            && let Some(server) = &self.images
            && let Some(st) = self.running(&active.id)
        {
            // The LC's filesystem on the served disk, seen from the host.
            let at = PathBuf::from(format!("/proc/{}/root", st.pid))
                .join(src.mount.strip_prefix("/").unwrap_or(&src.mount));
            if let Some(copy) = server.live_copy(&active.id, APP_NODE, &dst.path, &at) {
                return copy;
            }
        }
        let f = FollowCopy::start(&src.path, &dst.path, &APP_DISK_COPY, progress)
            .map_err(DiskCopyError::application)?;
        Ok(Box::new(FilesCopy(f)))
    }

    fn end_leftover_copies(&self, active: &LcSpec) -> Vec<String> {
        self.images
            .as_ref()
            .map(|s| s.end_copies(&active.id))
            .unwrap_or_default()
    }

    /// A directory disk: the copier's fanotify trap, counting only. An image is refused: its
    /// writes reach the host as blocks of the image, not as files.
    fn watch_writes(
        &self,
        active: &LcSpec,
        disk: &DiskSpec,
    ) -> Result<Box<dyn WriteWatch>, DiskCopyError> {
        if disk.kind != DiskKind::Dir {
            return Err(DiskCopyError::application(format!(
                "LC {}'s application disk {} is an image; only a directory disk is watched for writes",
                active.id,
                disk.path.display()
            )));
        }
        let w =
            patchover_disk::WriteWatch::start(&disk.path).map_err(DiskCopyError::application)?;
        Ok(Box::new(FilesWatch(w)))
    }
}

/// [`Migratable::watch_writes`] of a directory disk.
struct FilesWatch(patchover_disk::WriteWatch);

impl WriteWatch for FilesWatch {
    fn writes(&mut self) -> Result<Writes, DiskCopyError> {
        let s = self.0.seen().map_err(DiskCopyError::application)?;
        Ok(Writes {
            count: s.writes,
            unit: TRAPPED,
            paths: s.paths,
        })
    }
}

/// What a fanotify trap counts.
const TRAPPED: &str = "trapped writes";

/// A file copy that follows the source's writes until the cut.
struct FilesCopy(FollowCopy);

impl LiveCopy for FilesCopy {
    fn progress(&self) -> Option<CopyProgress> {
        self.0.stats().map(|s| CopyProgress {
            bytes_copied: s.bytes_copied,
            bytes_replayed: s.bytes_replayed,
        })
    }

    fn cut(self: Box<Self>, hold: &mut dyn Quiesce) -> Result<CutDone, DiskCopyError> {
        let r = self.0.cut(hold).map_err(DiskCopyError::application)?;
        Ok(CutDone {
            bytes_replayed: r.stats.bytes_replayed,
            freeze_ms: r
                .cut
                .as_ref()
                .map(|c| c.freeze_window.as_secs_f64() * 1000.0),
            // No witness: the history also holds writes to files with no name left anywhere
            // on the filesystem (the trap marks all of it; replay checks them against its own
            // files), so its count is not the disk's. A write watch filters them.
            writes: None,
            detail: serde_json::to_value(&r).unwrap_or_default(),
        })
    }
}
