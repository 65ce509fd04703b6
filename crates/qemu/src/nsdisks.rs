//! The `ns` backend's image server ([`patchover_lc::images::ImageServer`]): one
//! [`BlockServer`] per LC, in `<run_dir>/blockserver/<lc>/`, serving the LC's application image
//! (node [`patchover_lc::images::APP_NODE`]) and images attached later (`disk1`…) as FUSE exports that the LC
//! loop-mounts. The orchestrator finds the server again by [`state_dir`] to copy the disk with
//! a dirty bitmap ([`crate::backup::ServedCopy`]).
//!
//! Every call adopts the running server from its state directory (QSD outlives patchover), under
//! an exclusive lock on `<state_dir>.lock`, so a CLI and the daemon never race on one LC's server.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use patchover_core::{LcId, error_chain};
use patchover_lc::images::ImageServer;

use crate::blockserver::{BlockServer, BlockServerError, BlockServerSpec, ServedDisk, loop_user};

/// Where LC `lc`'s block server keeps its state (pid, monitors, manifest, exports).
pub fn state_dir(run_dir: &Path, lc: &LcId) -> PathBuf {
    run_dir.join("blockserver").join(lc.as_str())
}

/// The monitor for copy jobs of LC `lc`'s block server.
pub fn jobs_socket(run_dir: &Path, lc: &LcId) -> PathBuf {
    state_dir(run_dir, lc).join("qsd-jobs.sock")
}

/// The served disk `node` of `lc`, if its server runs and serves it.
pub fn served_disk(run_dir: &Path, lc: &LcId, node: &str) -> Option<ServedDisk> {
    let s = BlockServer::adopt(&state_dir(run_dir, lc)).ok()?;
    s.disks().iter().find(|d| d.node == node).cloned()
}

/// The `ns` backend's image server.
#[derive(Debug, Clone)]
pub struct NsImageServer {
    run_dir: PathBuf,
    program: PathBuf,
}

impl NsImageServer {
    pub fn new(run_dir: impl Into<PathBuf>) -> NsImageServer {
        NsImageServer {
            run_dir: run_dir.into(),
            program: PathBuf::from(crate::blockserver::DEFAULT_PROGRAM),
        }
    }

    /// Uses `program` instead of `qemu-storage-daemon` from `PATH`.
    pub fn with_program(mut self, program: impl Into<PathBuf>) -> NsImageServer {
        self.program = program.into();
        self
    }

    fn locked<T>(&self, lc: &LcId, f: impl FnOnce(&Path) -> io::Result<T>) -> io::Result<T> {
        let dir = state_dir(&self.run_dir, lc);
        let parent = dir.parent().expect("state dir has a parent");
        fs::create_dir_all(parent)?;
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(parent.join(format!("{lc}.lock")))?;
        // SAFETY: flock on an fd we own; released when `lock` closes.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error());
        }
        f(&dir)
    }
}

fn io_err(e: BlockServerError) -> io::Error {
    io::Error::other(error_chain(&e))
}

impl ImageServer for NsImageServer {
    fn serve(&self, lc: &LcId, node: &str, image: &Path) -> io::Result<PathBuf> {
        self.locked(lc, |dir| {
            fs::create_dir_all(dir)?;
            let export = dir.join(format!("{node}.export"));
            let disk = ServedDisk::new(node, image, &export);
            match BlockServer::adopt(dir) {
                Ok(mut s) => s.add(&disk).map_err(io_err)?,
                Err(BlockServerError::NotRunning { .. }) => {
                    leftovers(dir);
                    let mut spec = BlockServerSpec::new(dir, dir.join("qsd-jobs.sock"), vec![disk]);
                    spec.program = self.program.clone();
                    BlockServer::start(&spec).map_err(io_err)?;
                }
                Err(e) => return Err(io_err(e)),
            }
            Ok(export)
        })
    }

    fn stop(&self, lc: &LcId) -> io::Result<()> {
        self.locked(lc, |dir| {
            if !dir.exists() {
                return Ok(());
            }
            match BlockServer::adopt(dir) {
                Ok(mut s) => s.stop(Duration::from_secs(10)).map_err(io_err)?,
                Err(BlockServerError::NotRunning { .. }) => {}
                Err(e) => return Err(io_err(e)),
            }
            leftovers(dir);
            fs::remove_dir_all(dir).or_else(|e| match e.kind() {
                io::ErrorKind::NotFound => Ok(()),
                _ => Err(e),
            })
        })
    }

    fn unserve(&self, lc: &LcId, node: &str) -> io::Result<()> {
        self.locked(lc, |dir| {
            let mut s = BlockServer::adopt(dir).map_err(io_err)?;
            s.remove(node).map_err(io_err)?;
            if s.disks().is_empty() {
                s.stop(Duration::from_secs(10)).map_err(io_err)?;
            }
            Ok(())
        })
    }

    fn served(&self, lc: &LcId) -> Vec<String> {
        BlockServer::adopt(&state_dir(&self.run_dir, lc))
            .map(|s| s.disks().iter().map(|d| d.node.clone()).collect())
            .unwrap_or_default()
    }
}

/// What a server that died (killed, host trouble) left: its FUSE mounts, dead
/// (`ENOTCONN`), and its export files. A mount still backing a loop device stays.
fn leftovers(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "export") && loop_user(&p).is_none() {
            let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
            let _ = fs::remove_file(&p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchover_lc::images::APP_NODE;

    #[test]
    fn state_lives_under_the_run_dir_per_lc() {
        let lc = "web1".parse::<LcId>().unwrap();
        assert_eq!(
            state_dir(Path::new("/run/patchover"), &lc),
            PathBuf::from("/run/patchover/blockserver/web1")
        );
        assert_eq!(
            jobs_socket(Path::new("/run/p"), &lc),
            PathBuf::from("/run/p/blockserver/web1/qsd-jobs.sock")
        );
    }

    #[test]
    fn nothing_served_stops_cleanly_and_lists_nothing() {
        let d = tempfile::tempdir().unwrap();
        let s = NsImageServer::new(d.path());
        let lc = "a".parse::<LcId>().unwrap();
        s.stop(&lc).unwrap();
        assert!(s.served(&lc).is_empty());
        assert!(s.unserve(&lc, APP_NODE).is_err());
    }

    #[test]
    fn a_missing_program_is_an_error_and_leaves_no_server() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("app.img");
        fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let s = NsImageServer::new(d.path()).with_program("/nonexistent/qsd");
        let lc = "a".parse::<LcId>().unwrap();
        let e = s.serve(&lc, APP_NODE, &img).unwrap_err();
        assert!(e.to_string().contains("apt-get install"), "{e}");
        assert!(s.served(&lc).is_empty());
        s.stop(&lc).unwrap();
        assert!(!state_dir(d.path(), &lc).exists());
    }
}
