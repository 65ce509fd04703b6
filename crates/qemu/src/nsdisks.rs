//! The `ns` backend's image server ([`patchover_lc::images::ImageServer`]): one
//! [`BlockServer`] per LC, in `<run_dir>/blockserver/<lc>/`, serving the LC's application image
//! (node [`patchover_lc::images::APP_NODE`]) and images attached later (`disk1`…) as FUSE exports that the LC
//! loop-mounts, and the live copy of a served disk by the server's dirty bitmap
//! ([`ImageServer::live_copy`], built on [`crate::backup::ServedCopy`]): the `ns` backend asks
//! for it through the seam, the orchestrator never sees the server.
//!
//! Every call adopts the running server from its state directory (QSD outlives patchover), under
//! an exclusive lock on `<state_dir>.lock`, so a CLI and the daemon never race on one LC's server.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use patchover_core::{LcId, Quiesce, error_chain};
use patchover_lc::images::{APP_NODE, ImageServer};
use patchover_lc::{CutDone, DiskCopyError, LiveCopy};

use crate::backup::{RoundReport, ServedCopy};
use crate::blockserver::{BlockServer, BlockServerError, BlockServerSpec, ServedDisk, loop_user};

/// Where LC `lc`'s block server keeps its state (pid, monitors, manifest, exports).
pub fn state_dir(run_dir: &Path, lc: &LcId) -> PathBuf {
    run_dir.join("blockserver").join(lc.as_str())
}

/// The job (and so `<job>-dirty` bitmap and `<job>-copy` node) of a served application image's
/// copy (see [`crate::backup`]).
pub const APP_JOB: &str = "patchover-app";

/// How long one block job may take.
const JOB_TIMEOUT: Duration = Duration::from_secs(600);

/// The monitor for copy jobs of LC `lc`'s block server.
pub fn jobs_socket(run_dir: &Path, lc: &LcId) -> PathBuf {
    state_dir(run_dir, lc).join("qsd-jobs.sock")
}

/// The served disk `node` of `lc`, if its server runs and serves it.
pub(crate) fn served_disk(run_dir: &Path, lc: &LcId, node: &str) -> Option<ServedDisk> {
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
        // Released when `lock` closes.
        lock.lock()?;
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

    fn live_copy(
        &self,
        lc: &LcId,
        node: &str,
        dst: &Path,
        at: &Path,
    ) -> Option<Result<Box<dyn LiveCopy>, DiskCopyError>> {
        let disk = served_disk(&self.run_dir, lc, node)?;
        Some(
            BlocksJob::start(&jobs_socket(&self.run_dir, lc), &disk, dst, at)
                .map(|j| Box::new(j) as Box<dyn LiveCopy>)
                .map_err(DiskCopyError::application),
        )
    }

    fn end_copies(&self, lc: &LcId) -> Vec<String> {
        crate::livecopy::end_jobs(&jobs_socket(&self.run_dir, lc), Some(APP_NODE))
    }
}

/// A [`ServedCopy`] of an `ns` LC's application image, and where the LC mounts it.
struct BlocksJob {
    copy: ServedCopy,
    /// The LC's filesystem on the disk, as the host sees it.
    at: PathBuf,
    /// The target, marked incomplete until the cut.
    dst: PathBuf,
    started: Instant,
    rounds: Vec<RoundReport>,
}

impl BlocksJob {
    /// The full copy, then the LC runs on while the bitmap records its writes.
    fn start(
        socket: &Path,
        disk: &ServedDisk,
        dst: &Path,
        at: &Path,
    ) -> Result<BlocksJob, Box<dyn std::error::Error + Send + Sync>> {
        let started = Instant::now();
        patchover_disk::mark_incomplete(dst, &disk.image)?;
        let mut copy = ServedCopy::start(socket, disk, APP_JOB, dst)?;
        copy.wait(JOB_TIMEOUT)?;
        Ok(BlocksJob {
            copy,
            at: at.to_owned(),
            dst: dst.to_owned(),
            started,
            rounds: Vec::new(),
        })
    }
}

impl LiveCopy for BlocksJob {
    fn catches_up(&self) -> bool {
        true
    }

    /// What the bitmap rounds shipped after the full copy.
    fn progress(&self) -> Option<patchover_lc::CopyProgress> {
        Some(patchover_lc::CopyProgress {
            bytes_copied: 0,
            bytes_replayed: self.rounds.iter().map(|r| r.bytes).sum(),
        })
    }

    /// Bitmap rounds until one ships ≤ 8 MiB (at most 4).
    fn catch_up(&mut self) -> Result<Option<serde_json::Value>, DiskCopyError> {
        let rounds = self
            .copy
            .catch_up(8 << 20, 4, JOB_TIMEOUT)
            .map_err(DiskCopyError::application)?;
        self.rounds.extend(rounds.iter().copied());
        Ok(Some(serde_json::json!({
            "rounds": rounds.len(),
            "bytes": rounds.iter().map(|r| r.bytes).collect::<Vec<_>>(),
        })))
    }

    fn cut(self: Box<Self>, hold: &mut dyn Quiesce) -> Result<CutDone, DiskCopyError> {
        let BlocksJob {
            mut copy,
            at,
            dst,
            started,
            rounds,
        } = *self;
        let (cut, ()) = copy
            .cut(&at, hold, || (), JOB_TIMEOUT)
            .map_err(DiskCopyError::application)?;
        copy.close().map_err(DiskCopyError::application)?;
        patchover_disk::mark_complete(&dst).map_err(DiskCopyError::application)?;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let before: u64 = rounds.iter().map(|r| r.bytes).sum();
        Ok(CutDone {
            bytes_replayed: cut.shipped,
            freeze_ms: Some(ms(cut.freeze)),
            writes: Some(patchover_lc::Writes {
                count: before + cut.shipped,
                unit: "bytes shipped from the dirty bitmap",
                paths: Vec::new(),
            }),
            detail: serde_json::json!({
                "bitmap": true,
                "rounds_before_cut": rounds.len(),
                "bytes_before_cut": before,
                "presync_ms": cut.presync.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
                "syncfs_ms": ms(cut.syncfs),
                "job_start_ms": ms(cut.job_start),
                "freeze_ms": ms(cut.freeze),
                "shipped_after_thaw": cut.shipped,
                "complete_after_thaw_ms": ms(cut.complete_after_thaw),
                "total_s": started.elapsed().as_secs_f64(),
            }),
        })
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
