//! Steps 703/704 as the orchestrator sees them: the backend copies (it knows how, see
//! `patchover_lc::migrate`); here the standby's disks are emptied first, a copy's errors
//! become the run's, and a standby's system disk is opened for the steps that write it.

use patchover_lcroot::LcRoot;
use std::path::{Path, PathBuf};

use patchover_core::{DiskSpec, LcSpec};
use patchover_lc::{Copied, CutDone, Hold, LcBackend};

use crate::OrchestratorError;

impl From<patchover_lc::DiskCopyError> for OrchestratorError {
    fn from(e: patchover_lc::DiskCopyError) -> Self {
        OrchestratorError::Copy {
            disk: e.disk,
            source: e.source,
        }
    }
}

/// 703: copies the active LC's system disk to `dst` (empty), until caught up.
pub(crate) fn copy_system(
    backend: &dyn LcBackend,
    active: &LcSpec,
    dst: &Path,
    progress: &dyn patchover_lc::Progress,
) -> Result<Copied, OrchestratorError> {
    Ok(backend.copy_system_disk(active, dst, progress)?)
}

/// 704: a copy of the application disk that goes on until [`LiveCopy::cut`].
pub(crate) struct LiveCopy(Box<dyn patchover_lc::LiveCopy>);

impl LiveCopy {
    pub(crate) fn start(
        backend: &dyn LcBackend,
        active: &LcSpec,
        src: &DiskSpec,
        dst: &DiskSpec,
        progress: std::sync::Arc<dyn patchover_lc::Progress>,
    ) -> Result<LiveCopy, OrchestratorError> {
        Ok(LiveCopy(backend.live_copy(active, src, dst, progress)?))
    }

    /// Whether [`LiveCopy::catch_up`] has anything to do.
    pub(crate) fn catches_up(&self) -> bool {
        self.0.catches_up()
    }

    /// How far the copy is, if the backend's copier counts it.
    pub(crate) fn progress(&self) -> Option<patchover_lc::CopyProgress> {
        self.0.progress()
    }

    /// Brings the copy close to the source while the LC runs.
    pub(crate) fn catch_up(&mut self) -> Result<Option<serde_json::Value>, OrchestratorError> {
        Ok(self.0.catch_up()?)
    }

    /// Holds the active LC still, makes the copy complete, lets the LC go.
    pub(crate) fn cut(
        self,
        backend: &dyn LcBackend,
        active: &LcSpec,
    ) -> Result<CutDone, OrchestratorError> {
        let mut hold = Hold {
            backend,
            spec: active,
        };
        Ok(self.0.cut(&mut hold)?)
    }
}

/// Clears a standby disk so the copier finds an empty destination. Refuses anything that is
/// not the standby's own configured disk path.
pub(crate) fn clear_disk(path: &Path, disk: &'static str) -> Result<(), OrchestratorError> {
    clear(path, disk, false)
}

/// [`clear_disk`], but a directory itself stays: the old LC of a watch (`step::watch`) has it
/// mounted, and a mount whose directory was removed can no longer be mounted over.
pub(crate) fn empty_disk(path: &Path, disk: &'static str) -> Result<(), OrchestratorError> {
    clear(path, disk, true)
}

fn clear(path: &Path, disk: &'static str, keep_dir: bool) -> Result<(), OrchestratorError> {
    let prep = |source: std::io::Error| OrchestratorError::Prepare {
        disk,
        path: path.to_owned(),
        source,
    };
    // The disk's contents are an LC's: emptied through its root handle (nothing in it is
    // followed), then the empty directory itself goes.
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(prep(e)),
        Ok(m) if m.is_dir() => {
            LcRoot::open(path)
                .and_then(|r| r.clear())
                .map_err(|e| prep(std::io::Error::other(e)))?;
            if !keep_dir {
                std::fs::remove_dir(path).map_err(prep)?;
            }
        }
        Ok(_) => std::fs::remove_file(path).map_err(prep)?,
    }
    let marker = patchover_disk::marker_path(path, true);
    if marker.exists() {
        let _ = std::fs::remove_dir_all(marker);
    }
    Ok(())
}

/// Runs `f` with the standby's system disk opened as an [`LcRoot`]: the directory itself, or
/// the image mounted on the host (the standby is stopped, so nothing else has it open). The
/// image was written by an LC, so it is mounted `nosuid,nodev,noexec` (docs/lc-ns.md, "An LC
/// is untrusted"), and every access inside goes through the root handle.
pub(crate) fn with_root<T>(
    disk: &DiskSpec,
    run_dir: &Path,
    f: impl FnOnce(&LcRoot) -> Result<T, OrchestratorError>,
) -> Result<T, OrchestratorError> {
    let prep = |source: std::io::Error| OrchestratorError::Prepare {
        disk: "system",
        path: disk.path.clone(),
        source,
    };
    let open = |at: &Path| LcRoot::open(at).map_err(|e| prep(std::io::Error::other(e)));
    if disk.kind == patchover_core::DiskKind::Dir {
        return f(&open(&disk.path)?);
    }
    let at: PathBuf = run_dir.join(format!("mnt-{}", std::process::id()));
    std::fs::create_dir_all(&at).map_err(prep)?;
    let qcow2 = disk.path.extension().is_some_and(|e| e == "qcow2");
    let out = if !qcow2 {
        std::process::Command::new("mount")
            .args(["-o", HOST_MOUNT_OPTIONS])
            .arg(&disk.path)
            .arg(&at)
            .output()
    } else {
        Err(std::io::Error::other(
            "only raw images can be mounted on the host for installing patches; use a raw system disk",
        ))
    };
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            let _ = std::fs::remove_dir(&at);
            return Err(prep(std::io::Error::other(format!(
                "mount: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ))));
        }
        Err(e) => {
            let _ = std::fs::remove_dir(&at);
            return Err(prep(e));
        }
    }
    let r = open(&at).and_then(|root| f(&root));
    let umount = std::process::Command::new("umount").arg(&at).output();
    let _ = std::fs::remove_dir(&at);
    match umount {
        Ok(o) if o.status.success() => r,
        Ok(o) => r.and(Err(prep(std::io::Error::other(format!(
            "umount: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ))))),
        Err(e) => r.and(Err(prep(e))),
    }
}

/// How the host mounts an image an LC wrote: no set-user-ID programs, device nodes or
/// executables of the LC's take effect on the host.
pub const HOST_MOUNT_OPTIONS: &str = "loop,nosuid,nodev,noexec";
