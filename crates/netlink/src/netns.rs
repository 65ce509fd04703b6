//! Running code inside a network namespace.
//!
//! A socket belongs to the namespace of the thread that created it, so namespace-bound work
//! runs on a short-lived thread that has joined the namespace with `setns(2)`; the calling
//! thread never changes namespace.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};

/// Joining a network namespace failed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {path}: cannot open it; is the LC running?")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("network namespace {path}: cannot join it (needs root)")]
    Join {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("network namespace {path}: the worker thread panicked")]
    Panicked { path: PathBuf },
}

/// Runs `f` with the calling context's namespace if `netns` is `None`, else on a thread that
/// joined `netns` first. Sockets `f` creates stay in that namespace after it returns.
pub fn in_netns<T, F>(netns: Option<&Path>, f: F) -> Result<T, NetnsError>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let Some(path) = netns else {
        return Ok(f());
    };
    let file = File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    std::thread::scope(|s| {
        let h = s.spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Join {
                path: path.to_path_buf(),
                source,
            })?;
            Ok(f())
        });
        h.join().map_err(|_| NetnsError::Panicked {
            path: path.to_path_buf(),
        })?
    })
}

/// Joins `netns` in the current thread. For threads that live in one namespace for good (the
/// load generator's runtime thread, a test server).
pub fn enter_netns(path: &Path) -> Result<(), NetnsError> {
    let file = File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Join {
        path: path.to_path_buf(),
        source,
    })
}
