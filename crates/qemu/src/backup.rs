//! A live disk copy by dirty bitmap and point-in-time backups, for disks served by the
//! [`crate::blockserver`] (a namespace LC's image disks).
//!
//! Why not [`crate::Mirror`]: QEMU 7.2's FUSE export takes the RESIZE permission on its node
//! whenever it is writable, and `blockdev-mirror` refuses to share RESIZE on its source
//! ("Permission conflict on node …: permissions 'resize' are both required by an unnamed block
//! device … and unshared by mirror job"); the mirror's source must also be a root node, so no
//! filter can sit between. `blockdev-backup` shares RESIZE, and gives the same thing — a
//! block-level write log — in another shape:
//!
//! 1. [`BitmapCopy::start`]: add a dirty bitmap on the source (`granularity` bytes per bit: a
//!    random 4 KiB write dirties 4 KiB, not 64) and make the full copy. A raw source image
//!    ([`BackupSpec::source_file`]) is copied on the host after the bitmap started (no
//!    copy-before-write on the LC's writes; what the copy may tear is in the bitmap); otherwise
//!    the target is created and `blockdev-add`ed and a `sync=full` backup bound to the bitmap
//!    (`bitmap-mode=on-success`) runs: the copy is the disk as it was when the job started, and
//!    once the job succeeds the bitmap holds exactly the writes made since that start;
//! 2. [`BitmapCopy::round`]: a `sync=bitmap` backup of what the bitmap holds, again as of the
//!    job's start, again leaving in the bitmap only the writes made since. Rounds bring the
//!    target closer while the LC runs ([`BitmapCopy::wait`] waits for one);
//! 3. the cut: freeze the LC, flush its filesystem (`syncfs`), [`BitmapCopy::cut_round`] — the
//!    job's start *is* the point in time (QEMU's copy-before-write filter saves every area
//!    before a later write changes it) — thaw at once, [`BitmapCopy::release`], then
//!    [`BitmapCopy::wait`] while the LC runs again and [`BitmapCopy::close`]. The freeze lasts
//!    a flush and one QMP command, not a copy.
//!
//! Every job id is `<job>-<round>`; the bitmap is `<job>-dirty`, the target nodes
//! `<target_node>` over `<target_node>-file`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use patchover_core::Quiesce;

use serde_json::{Value, json};

use crate::blockserver::{ServedDisk, syncfs};
use crate::mirror::ImageFormat;
use crate::qmp::{Qmp, QmpError};

/// What to copy where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSpec {
    /// Prefix of the job ids and the bitmap name, e.g. `patchover-app`.
    pub job: String,
    /// The source node (the served disk's format node, e.g. `app`).
    pub device_node: String,
    /// The target image; created (sparse) when missing.
    pub target_path: PathBuf,
    /// The target's format node; its file node is `<target_node>-file`.
    pub target_node: String,
    pub format: ImageFormat,
    /// Bytes per bit of the dirty bitmap (a power of 2, ≥ 512); `None`: QEMU's default.
    pub granularity: Option<u32>,
    /// The source node's raw image file, served buffered (`cache.direct=false`, as the block
    /// server does): the full copy is then made on the host (reflink or `copy_file_range`)
    /// after the bitmap is added, instead of by a `sync=full` backup. Every area written after
    /// the bitmap's start is in the bitmap, so a torn read of it is redone by the rounds; every
    /// other area was last written before, and the host's page cache already holds it. No
    /// copy-before-write on the LC's writes and no load on the server's main loop while the
    /// disk is copied. `None` (or a qcow2 target, whose metadata a byte copy could tear): the
    /// backup job.
    pub source_file: Option<PathBuf>,
}

/// What one job copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundReport {
    /// Bytes the job copied.
    pub bytes: u64,
    /// From the job's start to its end.
    pub took: Duration,
}

/// Why a copy step failed. The source is never written.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("copy {job}: {step}")]
    Qmp {
        job: String,
        step: &'static str,
        #[source]
        source: QmpError,
    },
    #[error("copy {job}: no block node named {node} (is the disk served?)")]
    NoSourceNode { job: String, node: String },
    #[error("copy {job}: cannot create the target image {path}: check its directory")]
    CreateTarget {
        job: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("copy {job}: the host-side full copy of {src} failed (the source is untouched)")]
    HostCopy {
        job: String,
        src: PathBuf,
        #[source]
        source: patchover_disk::CopyError,
    },
    #[error("copy {job}: the backup job failed: {error}; abort the copy (the source is untouched)")]
    JobFailed { job: String, error: String },
    #[error("copy {job}: a job is still running: wait for it first")]
    Busy { job: String },
    #[error("copy {job}: no job runs")]
    Idle { job: String },
    #[error("copy {job}: the job did not end within {after:?}")]
    Timeout { job: String, after: Duration },
    #[error("copy {job}: cannot {step} the LC; nothing was cut and the LC runs on")]
    Quiesce {
        job: String,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("copy {job}: syncfs of {path} failed (is the disk still mounted in the LC?)")]
    Syncfs {
        job: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A live copy of one served disk. End it with [`BitmapCopy::close`] (the target stays) or
/// [`BitmapCopy::abort`] (the target goes); dropped, it leaves its nodes and bitmap in QSD.
#[must_use = "the copy holds nodes and a bitmap in QSD until closed or aborted"]
#[derive(Debug)]
pub struct BitmapCopy {
    spec: BackupSpec,
    bitmap: String,
    round: u32,
    /// The running job and when it started.
    running: Option<(String, Instant)>,
    created_target: bool,
    added_nodes: Vec<String>,
    bitmap_added: bool,
    /// The host-side full copy's report, until a `wait` takes it.
    host_full: Option<RoundReport>,
}

impl BitmapCopy {
    /// Creates and attaches the target, adds the bitmap and starts the full copy (returns once
    /// it runs; [`BitmapCopy::wait`] for its end). On error nothing is left behind.
    pub fn start(qmp: &mut Qmp, spec: BackupSpec) -> Result<BitmapCopy, BackupError> {
        let job = spec.job.clone();
        let size = node_size(qmp, &spec.device_node)
            .map_err(|source| BackupError::Qmp {
                job: job.clone(),
                step: "reading the source size (query-named-block-nodes)",
                source,
            })?
            .ok_or_else(|| BackupError::NoSourceNode {
                job: job.clone(),
                node: spec.device_node.clone(),
            })?;
        let host_src = spec
            .source_file
            .clone()
            .filter(|_| spec.format == ImageFormat::Raw);
        let created_target = if host_src.is_some() {
            !spec.target_path.exists()
        } else {
            match crate::mirror::create_target(&spec.target_path, Some(size)) {
                Ok(created) => created,
                Err(source) => {
                    return Err(BackupError::CreateTarget {
                        job,
                        path: spec.target_path.clone(),
                        source,
                    });
                }
            }
        };
        let mut c = BitmapCopy {
            bitmap: format!("{job}-dirty"),
            spec,
            round: 0,
            running: None,
            created_target,
            added_nodes: Vec::new(),
            bitmap_added: false,
            host_full: None,
        };
        let started = match &host_src {
            Some(src) => c
                .add_bitmap(qmp)
                .and_then(|()| c.host_full_copy(src))
                .and_then(|()| c.attach_target(qmp)),
            None => c
                .attach_target(qmp)
                .and_then(|()| c.add_bitmap(qmp))
                .and_then(|()| c.start_job(qmp, "full", 0)),
        };
        match started {
            Ok(()) => {
                tracing::info!(job = %c.spec.job, source = %c.spec.device_node,
                    target = %c.spec.target_path.display(), size, host = host_src.is_some(),
                    "bitmap copy: started");
                Ok(c)
            }
            Err(e) => {
                let created = c.created_target;
                c.cleanup(qmp, created);
                Err(e)
            }
        }
    }

    /// The full copy on the host (see [`BackupSpec::source_file`]); its report is what the
    /// next [`BitmapCopy::wait`] returns.
    fn host_full_copy(&mut self, src: &Path) -> Result<(), BackupError> {
        let t = Instant::now();
        let bytes = patchover_disk::copy_file(src, &self.spec.target_path).map_err(|source| {
            BackupError::HostCopy {
                job: self.spec.job.clone(),
                src: src.to_owned(),
                source,
            }
        })?;
        self.host_full = Some(RoundReport {
            bytes,
            took: t.elapsed(),
        });
        Ok(())
    }

    fn attach_target(&mut self, qmp: &mut Qmp) -> Result<(), BackupError> {
        let file_node = format!("{}-file", self.spec.target_node);
        qmp.blockdev_add(json!({
            "driver": "file",
            "filename": self.spec.target_path,
            "node-name": file_node,
            // Past the host's page cache: gigabytes of dirty copy pages being written back
            // would hold up the flushes (fdatasync) of the served disk, which a cut waits for.
            "cache": { "direct": true },
        }))
        .map_err(self.step("adding the target file node"))?;
        self.added_nodes.push(file_node.clone());
        qmp.blockdev_add(json!({
            "driver": self.spec.format.driver(),
            "file": file_node,
            "node-name": self.spec.target_node,
        }))
        .map_err(self.step("adding the target format node"))?;
        self.added_nodes.insert(0, self.spec.target_node.clone());
        Ok(())
    }

    fn add_bitmap(&mut self, qmp: &mut Qmp) -> Result<(), BackupError> {
        let mut args = json!({ "node": self.spec.device_node, "name": self.bitmap });
        if let Some(g) = self.spec.granularity {
            args["granularity"] = json!(g);
        }
        qmp.execute("block-dirty-bitmap-add", args)
            .map_err(self.step("adding the dirty bitmap"))?;
        self.bitmap_added = true;
        Ok(())
    }

    /// Starts a copy of what the bitmap holds, as of now (the point in time). Refused while a
    /// job runs.
    pub fn round(&mut self, qmp: &mut Qmp) -> Result<(), BackupError> {
        self.start_job(qmp, "bitmap", 0)
    }

    /// [`BitmapCopy::round`] for a cut: the job starts at a crawl (1 byte/s), so that the
    /// command returns as soon as the point in time is set. QEMU 7.2 answers `blockdev-backup`
    /// only after the polling that ends its drained section, and an unlimited job copies its
    /// first megabytes inside that polling (~40 ms measured for a 20 MB/s writer's 300 ms of
    /// writes): time the LC would spend frozen. [`BitmapCopy::release`] lifts the limit once
    /// the LC is thawed; copy-before-write keeps the point in time meanwhile.
    pub fn cut_round(&mut self, qmp: &mut Qmp) -> Result<(), BackupError> {
        self.start_job(qmp, "bitmap", 1)
    }

    /// Lifts the running job's rate limit (after [`BitmapCopy::cut_round`]).
    pub fn release(&mut self, qmp: &mut Qmp) -> Result<(), BackupError> {
        let Some((id, _)) = self.running.clone() else {
            return Err(BackupError::Idle {
                job: self.spec.job.clone(),
            });
        };
        qmp.block_job_set_speed(&id, 0)
            .map_err(self.step("block-job-set-speed"))
    }

    fn start_job(&mut self, qmp: &mut Qmp, sync: &str, speed: u64) -> Result<(), BackupError> {
        if self.running.is_some() {
            return Err(BackupError::Busy {
                job: self.spec.job.clone(),
            });
        }
        self.host_full = None; // a job's own report supersedes it
        self.round += 1;
        let id = format!("{}-{}", self.spec.job, self.round);
        let started = Instant::now();
        qmp.execute(
            "blockdev-backup",
            json!({
                "job-id": id,
                "device": self.spec.device_node,
                "target": self.spec.target_node,
                "sync": sync,
                "bitmap": self.bitmap,
                "bitmap-mode": "on-success",
                "speed": speed,
            }),
        )
        .map_err(self.step("starting blockdev-backup"))?;
        self.running = Some((id, started));
        Ok(())
    }

    /// True while a job runs (without waiting), or while the report of a host-side full
    /// copy waits for [`BitmapCopy::wait`].
    pub fn is_running(&self) -> bool {
        self.running.is_some() || self.host_full.is_some()
    }

    /// Waits for the running job to end.
    pub fn wait(&mut self, qmp: &mut Qmp, timeout: Duration) -> Result<RoundReport, BackupError> {
        let Some((id, started)) = self.running.clone() else {
            // The host-side full copy ended inside `start`.
            if let Some(r) = self.host_full.take() {
                return Ok(r);
            }
            return Err(BackupError::Idle {
                job: self.spec.job.clone(),
            });
        };
        let end = qmp
            .wait_event(
                |e| {
                    e.job_id() == Some(id.as_str())
                        && matches!(
                            e.name.as_str(),
                            "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED"
                        )
                },
                timeout,
            )
            .map_err(|e| match e {
                QmpError::EventTimeout { .. } => BackupError::Timeout {
                    job: id.clone(),
                    after: timeout,
                },
                source => BackupError::Qmp {
                    job: id.clone(),
                    step: "waiting for the backup job",
                    source,
                },
            })?;
        self.running = None;
        wait_dismissed(qmp, &id, Instant::now() + timeout);
        qmp.discard_events(|e| e.job_id() == Some(id.as_str()));
        if end.name == "BLOCK_JOB_CANCELLED" {
            return Err(BackupError::JobFailed {
                job: id,
                error: "cancelled".into(),
            });
        }
        if let Some(error) = end.str("error") {
            return Err(BackupError::JobFailed {
                job: id,
                error: error.to_owned(),
            });
        }
        Ok(RoundReport {
            bytes: end.data.get("len").and_then(Value::as_u64).unwrap_or(0),
            took: started.elapsed(),
        })
    }

    /// Ends the copy with the target as the last finished job left it: the bitmap and the
    /// target nodes are removed (the image file is closed and stays). Refused while a job runs.
    pub fn close(mut self, qmp: &mut Qmp) -> Result<(), BackupError> {
        if self.running.is_some() {
            return Err(BackupError::Busy {
                job: self.spec.job.clone(),
            });
        }
        if self.bitmap_added {
            qmp.execute(
                "block-dirty-bitmap-remove",
                json!({ "node": self.spec.device_node, "name": self.bitmap }),
            )
            .map_err(self.step("removing the dirty bitmap"))?;
            self.bitmap_added = false;
        }
        for n in std::mem::take(&mut self.added_nodes) {
            qmp.blockdev_del(&n)
                .map_err(self.step("deleting a target node (closing the image)"))?;
        }
        Ok(())
    }

    /// Cancels a running job, removes the bitmap and the nodes, and removes the target image
    /// if this copy created it.
    pub fn abort(mut self, qmp: &mut Qmp) {
        self.cleanup(qmp, self.created_target);
    }

    fn cleanup(&mut self, qmp: &mut Qmp, remove_target: bool) {
        if let Some((id, _)) = self.running.take() {
            let _ = qmp.block_job_cancel(&id, true);
            wait_dismissed(qmp, &id, Instant::now() + Duration::from_secs(10));
            qmp.discard_events(|e| e.job_id() == Some(id.as_str()));
        }
        if self.bitmap_added {
            let _ = qmp.execute(
                "block-dirty-bitmap-remove",
                json!({ "node": self.spec.device_node, "name": self.bitmap }),
            );
            self.bitmap_added = false;
        }
        for n in std::mem::take(&mut self.added_nodes) {
            let _ = qmp.blockdev_del(&n);
        }
        if remove_target {
            let _ = fs::remove_file(&self.spec.target_path);
        }
    }

    fn step(&self, step: &'static str) -> impl FnOnce(QmpError) -> BackupError + use<> {
        let job = self.spec.job.clone();
        move |source| BackupError::Qmp { job, step, source }
    }
}

/// The live copy of one disk served by a [`crate::blockserver::BlockServer`], as the
/// orchestrator (an `ns` LC's application image) and `patchover bench copy --disk image` run it:
/// a full copy, catch-up rounds while the LC runs, then cuts, each with the LC frozen for a
/// `syncfs` and one QMP command (see the module docs and docs/blockserver.md).
#[derive(Debug)]
pub struct ServedCopy {
    qmp: Qmp,
    copy: Option<BitmapCopy>,
}

/// What one cut took and shipped.
#[derive(Debug, Clone, PartialEq)]
pub struct CutTimes {
    /// The `syncfs` calls just before the freeze.
    pub presync: Vec<Duration>,
    /// Freeze → thaw, without the caller's `while_frozen` work.
    pub freeze: Duration,
    /// The `syncfs` while frozen.
    pub syncfs: Duration,
    /// Starting the point-in-time job while frozen.
    pub job_start: Duration,
    /// The caller's work while frozen (not part of [`CutTimes::freeze`]).
    pub while_frozen: Duration,
    /// Bytes the cut's job copied after the thaw.
    pub shipped: u64,
    /// From the thaw until the copy was complete.
    pub complete_after_thaw: Duration,
}

impl ServedCopy {
    /// Starts the full copy of `disk` to `target` (created sparse when missing) through the
    /// server's jobs monitor; returns once the job runs. Nothing is left behind on error.
    pub fn start(
        jobs_socket: &Path,
        disk: &ServedDisk,
        job: &str,
        target: &Path,
    ) -> Result<ServedCopy, BackupError> {
        let mut qmp = Qmp::connect(jobs_socket, Duration::from_secs(10)).map_err(|source| {
            BackupError::Qmp {
                job: job.to_owned(),
                step: "connecting to the block server's jobs monitor",
                source,
            }
        })?;
        let spec = BackupSpec {
            job: job.to_owned(),
            device_node: disk.node.clone(),
            target_path: target.to_owned(),
            target_node: format!("{job}-copy"),
            format: match target.extension().and_then(|e| e.to_str()) {
                Some("qcow2") => ImageFormat::Qcow2,
                _ => ImageFormat::Raw,
            },
            granularity: Some(4096),
            // The block server opens every image buffered; a qcow2 source is copied by job.
            source_file: (crate::backend::image_format(&disk.image) == "raw")
                .then(|| disk.image.clone()),
        };
        let copy = BitmapCopy::start(&mut qmp, spec)?;
        Ok(ServedCopy {
            qmp,
            copy: Some(copy),
        })
    }

    /// The monitor and the copy, borrowed together (a copy is there until `close` or drop).
    fn parts(&mut self) -> (&mut Qmp, &mut BitmapCopy) {
        (
            &mut self.qmp,
            self.copy.as_mut().expect("a copy until closed"),
        )
    }

    /// Waits for the running job (the full copy, a round) to end; `None` when none runs.
    pub fn wait(&mut self, timeout: Duration) -> Result<Option<RoundReport>, BackupError> {
        let (qmp, c) = self.parts();
        if !c.is_running() {
            return Ok(None);
        }
        c.wait(qmp, timeout).map(Some)
    }

    /// Rounds while the LC runs, until one ships at most `enough` bytes (at most `max`
    /// rounds), so that the copy a cut leaves to do after the thaw is small. Returns the
    /// rounds' reports.
    pub fn catch_up(
        &mut self,
        enough: u64,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<RoundReport>, BackupError> {
        self.wait(timeout)?;
        let mut rounds = Vec::new();
        for _ in 0..max {
            let (qmp, c) = self.parts();
            c.round(qmp)?;
            let r = c.wait(qmp, timeout)?;
            rounds.push(r);
            if r.bytes <= enough {
                break;
            }
        }
        Ok(rounds)
    }

    /// A cut: `syncfs` of `mount` (the filesystem on the served disk) until quick, freeze the
    /// writers, `syncfs`, start the point-in-time job, run `while_frozen`, thaw, then let the
    /// job copy and wait for it. After it, the target holds every write made before the
    /// freeze. On error the writers are thawed.
    ///
    /// The host-disk flushes stay on throughout: switching them off for the frozen `syncfs`
    /// (`cache.no-flush` by `blockdev-reopen`) was measured to fail LC writes in flight with
    /// EIO on QEMU 7.2 (see docs/blockserver.md), and an LC's disk must never see an error of
    /// patchover's making.
    pub fn cut<T>(
        &mut self,
        mount: &Path,
        q: &mut dyn Quiesce,
        while_frozen: impl FnOnce() -> T,
        timeout: Duration,
    ) -> Result<(CutTimes, T), BackupError> {
        self.wait(timeout)?;
        let job = self.parts().1.spec.job.clone();
        let sync = |p: &Path| {
            syncfs(p).map_err(|source| BackupError::Syncfs {
                job: job.clone(),
                path: p.to_owned(),
                source,
            })
        };
        let pre = presync(mount).map_err(|source| BackupError::Syncfs {
            job: job.clone(),
            path: mount.to_owned(),
            source,
        })?;
        let t0 = Instant::now();
        if let Err(source) = q.freeze() {
            let _ = q.thaw();
            return Err(BackupError::Quiesce {
                job,
                step: "freeze",
                source,
            });
        }
        let (qmp, copy) = self.parts();
        let t = Instant::now();
        let synced = sync(mount);
        let s = t.elapsed();
        let t = Instant::now();
        let cut = synced.and_then(|()| copy.cut_round(qmp));
        let j = t.elapsed();
        let frozen = cut.map(|()| {
            let t = Instant::now();
            let out = while_frozen();
            (out, t.elapsed())
        });
        let thawed = q.thaw();
        let t1 = Instant::now();
        let (out, wf) = frozen?;
        thawed.map_err(|source| BackupError::Quiesce {
            job: job.clone(),
            step: "thaw",
            source,
        })?;
        copy.release(qmp)?;
        let r = copy.wait(qmp, timeout)?;
        Ok((
            CutTimes {
                presync: pre,
                freeze: (t1 - t0).saturating_sub(wf),
                syncfs: s,
                job_start: j,
                while_frozen: wf,
                shipped: r.bytes,
                complete_after_thaw: t1.elapsed(),
            },
            out,
        ))
    }

    /// Ends the copy: the target stays as the last cut left it (its nodes and the bitmap go).
    pub fn close(mut self) -> Result<(), BackupError> {
        let c = self.copy.take().expect("a copy until closed");
        c.close(&mut self.qmp)
    }
}

impl Drop for ServedCopy {
    /// Unfinished (a failed run): the job ends, the bitmap and nodes go, a target this copy
    /// created is removed.
    fn drop(&mut self) {
        if let Some(c) = self.copy.take() {
            c.abort(&mut self.qmp);
        }
    }
}

/// `syncfs` until one takes under 5 ms (at most 3): each pushes what the writers wrote during
/// the previous one, so the one under the freeze has little left. (Each also waits for the
/// host's disk; at 20 MB/s of scattered writes here they stay at 50–150 ms and do not converge,
/// measured with 6: more calls only load the LC's disk longer.)
fn presync(mount: &Path) -> io::Result<Vec<Duration>> {
    let mut took = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        syncfs(mount)?;
        took.push(t.elapsed());
        if t.elapsed() < Duration::from_millis(5) {
            break;
        }
    }
    Ok(took)
}

/// Waits (best effort) until QEMU no longer lists job `id`.
fn wait_dismissed(qmp: &mut Qmp, id: &str, deadline: Instant) {
    while Instant::now() < deadline {
        let listed = qmp
            .execute("query-jobs", Value::Null)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .is_some_and(|a| a.iter().any(|j| j["id"].as_str() == Some(id)));
        if !listed {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The virtual size of node `node`, `None` when there is no such node.
fn node_size(qmp: &mut Qmp, node: &str) -> Result<Option<u64>, QmpError> {
    let nodes = qmp.execute("query-named-block-nodes", json!({ "flat": true }))?;
    Ok(nodes.as_array().and_then(|a| {
        a.iter()
            .find(|n| n["node-name"].as_str() == Some(node))
            .and_then(|n| n["image"]["virtual-size"].as_u64())
    }))
}
