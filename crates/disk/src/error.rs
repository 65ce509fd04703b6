//! The one error type of the disk copier.
//!
//! Variants for bad input (`SourceMissing`, `DestinationNotEmpty`, …) are checked before anything
//! is written, so the source and destination are untouched when they are returned; every other
//! variant leaves the destination marked incomplete (see [`crate::is_incomplete`]).

use std::io;
use std::path::PathBuf;

/// Why a disk copy failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("source {0} does not exist: give an existing directory or image file")]
    SourceMissing(PathBuf),
    #[error(
        "source {0} is not a disk of a known kind: give a directory (a rootfs or data tree) or a regular image file"
    )]
    UnknownDiskKind(PathBuf),
    #[error("source {0} is itself an incomplete copy: finish or redo that copy first")]
    SourceIncomplete(PathBuf),
    #[error("source and destination are the same ({0}): give a different destination")]
    SamePath(PathBuf),
    #[error("destination {dst} is inside the source {src}: put the copy outside the source tree")]
    DestinationInsideSource { src: PathBuf, dst: PathBuf },
    #[error(
        "destination {0} is not empty: give an empty or missing directory (an incomplete patchover copy is redone)"
    )]
    DestinationNotEmpty(PathBuf),
    #[error("destination {0} has no parent directory: create it first")]
    DestinationParentMissing(PathBuf),
    #[error("source is a {src_kind} but destination {dst} is not: give a matching destination")]
    KindMismatch {
        src_kind: &'static str,
        dst: PathBuf,
    },
    #[error(
        "out of space while writing {path}: free space on the destination and run the copy again"
    )]
    OutOfSpace {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path} on the source")]
    ReadSource {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path} on the destination")]
    WriteDestination {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot start the write trap (fanotify) on {path}: patchover needs root and a kernel with fanotify FID support"
    )]
    Trap {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the history journal {path}")]
    Journal {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot freeze the writers: the copy was not cut, the source runs on")]
    Freeze(#[source] io::Error),
    #[error("cannot thaw the writers: thaw them by hand (e.g. write 0 to cgroup.freeze)")]
    Thaw(#[source] io::Error),
    #[error("the copy differs from the source at the cut: {0}")]
    Mismatch(String),
    #[error("the background copy thread died: see the log")]
    WorkerDied,
}

impl CopyError {
    /// True when the error is about what was asked (exit code 2), false for host failures.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            CopyError::SourceMissing(_)
                | CopyError::UnknownDiskKind(_)
                | CopyError::SourceIncomplete(_)
                | CopyError::SamePath(_)
                | CopyError::DestinationInsideSource { .. }
                | CopyError::DestinationNotEmpty(_)
                | CopyError::DestinationParentMissing(_)
                | CopyError::KindMismatch { .. }
        )
    }

    /// Wraps a write error on the destination, telling out-of-space apart.
    pub(crate) fn write(path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        if source.raw_os_error() == Some(libc::ENOSPC)
            || source.raw_os_error() == Some(libc::EDQUOT)
        {
            CopyError::OutOfSpace { path, source }
        } else {
            CopyError::WriteDestination { path, source }
        }
    }

    pub(crate) fn read(path: impl Into<PathBuf>, source: io::Error) -> Self {
        CopyError::ReadSource {
            path: path.into(),
            source,
        }
    }
}
