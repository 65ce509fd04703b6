//! patchover's disk copy benchmarks, measured against the goals of the live copy (issue 3): an
//! `ns` LC's image disk served by qemu-storage-daemon and copied by QEMU's dirty bitmap
//! ([`copy_image`]), and a VM's disks copied by QEMU's mirror jobs ([`copy_qemu`]). The
//! directory copier's benchmark is `patchover_disk::bench`. `patchover bench copy` runs them.

use std::error::Error as StdError;

/// Returns a [`BenchError::Failed`] built like `format!`.
macro_rules! bail {
    ($($t:tt)*) => {
        return Err($crate::BenchError::Failed(format!($($t)*)))
    };
}

pub mod copy_image;
pub mod copy_qemu;

/// A benchmark cannot run or was cut short.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The arguments cannot be measured as given; nothing was started.
    #[error("{0}")]
    Refused(String),
    /// Something the benchmark checks failed; the message says what.
    #[error("{0}")]
    Failed(String),
    /// Reading or writing the benchmark's own files failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The directory copier's benchmark writer (shared with `patchover_disk::bench`).
    #[error(transparent)]
    Writer(#[from] patchover_disk::bench::BenchError),
    /// QEMU's dirty-bitmap copy of an image disk.
    #[error(transparent)]
    Backup(#[from] patchover_qemu::BackupError),
    /// A step failed; the source says why.
    #[error("{what}")]
    Step {
        what: String,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
}

impl BenchError {
    /// Whether the caller can fix it (exit code 2), rather than the host.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, BenchError::Refused(_))
    }
}

/// Names the step a failure happened in: `.context("mounting the copy")`.
pub(crate) trait Context<T> {
    fn context(self, what: &str) -> Result<T, BenchError>;
    fn with_context(self, what: impl FnOnce() -> String) -> Result<T, BenchError>;
}

impl<T, E: StdError + Send + Sync + 'static> Context<T> for Result<T, E> {
    fn context(self, what: &str) -> Result<T, BenchError> {
        self.with_context(|| what.to_owned())
    }

    fn with_context(self, what: impl FnOnce() -> String) -> Result<T, BenchError> {
        self.map_err(|e| BenchError::Step {
            what: what(),
            source: Box::new(e),
        })
    }
}
