//! The disk copy with a write history, done by the hypervisor (seed fig. 8–10 for a VM LC).
//!
//! For a namespace LC, `patchover-disk` traps the writes with fanotify and replays them. A VM's
//! disks are written by QEMU, which already keeps that history itself: a `blockdev-mirror` job
//! copies the whole source node to a target image and tracks every guest write in a dirty bitmap,
//! copying dirty areas again until source and target agree (the job is then *ready*, event
//! `BLOCK_JOB_READY`). The job keeps them in agreement while the guest runs.
//!
//! A [`Mirror`] goes through:
//!
//! 1. [`Mirror::start`]: create the target image if missing (a sparse raw file, or a qcow2 made
//!    by QEMU's own `blockdev-create`, so no `qemu-img` is needed), `blockdev-add` it (file node
//!    `<target_node>-file` + format node `<target_node>`), start `blockdev-mirror` `sync=full`;
//! 2. [`Mirror::wait_ready`]: wait for ready. In [`CopyMode::Background`] a guest that writes
//!    faster than the copy keeps the job from ever converging: after the deadline this returns
//!    [`MirrorError::NotConverging`], and the caller may abort and start again with
//!    [`CopyMode::WriteBlocking`] (QEMU 7.2 cannot switch a running job);
//! 3. [`Mirror::cut`]: a non-forced `block-job-cancel` of the ready job. QEMU drains the
//!    source, copies what is still dirty and ends the job *without* pivoting the guest: the target
//!    is a point-in-time copy of the source. The target nodes are then deleted so the image file
//!    is closed and can be booted by another QEMU. The caller freezes the guest (or the VM) before
//!    the cut so that "every write acknowledged before the freeze is in the copy" holds;
//!    or [`Mirror::abort`]: forced cancel, delete the nodes, remove the half-made image.
//!
//! This module never stops or resumes the source VM and never touches its nodes other than
//! reading them through the job. The [`Qmp`] session is passed to every call rather than held, so
//! the caller keeps using it (to freeze the VM, for instance) while the mirror runs.

use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub use crate::qmp::CopyMode;
use crate::qmp::{Event, Qmp, QmpError};

/// How often [`Mirror::wait_ready`] and [`Mirror::cut`] look at `query-block-jobs` besides
/// waiting for events (an event may have been drained by someone else).
const POLL: Duration = Duration::from_millis(200);

/// The target image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    /// The QEMU block driver name.
    pub fn driver(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// What to mirror where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorSpec {
    /// The block job id (unique among the VM's jobs), e.g. `mirror-sys`.
    pub job_id: String,
    /// The source node, e.g. `sys` (the format node of the system disk).
    pub device_node: String,
    /// The target image; created (sparse) when missing.
    pub target_path: PathBuf,
    /// The target's format node name; its file node is `<target_node>-file`.
    pub target_node: String,
    pub format: ImageFormat,
    pub copy_mode: CopyMode,
    /// Copy rate limit in bytes/s, to spare the host's disk; 0 for none. A limit below the
    /// guest's write rate keeps a background mirror from converging.
    pub speed: u64,
}

/// How far a mirror job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes copied.
    pub offset: u64,
    /// Bytes to copy (grows when the guest writes areas already copied).
    pub len: u64,
}

/// What a cut cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutReport {
    /// Bytes the job copied in all (its final `len`: the disk plus every rewrite).
    pub bytes: u64,
    /// From `block-job-cancel` until the job ended and the target image was closed: how long the
    /// caller's freeze has to last.
    pub cut: Duration,
    /// From the job's start until the target was closed.
    pub total: Duration,
}

/// Why a mirror step failed. The source VM keeps running in every case.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("mirror {job}: {step}")]
    Qmp {
        job: String,
        step: &'static str,
        #[source]
        source: QmpError,
    },
    #[error(
        "mirror {job}: the VM already runs a job with this id: cut or abort it first, or use another id"
    )]
    JobIdInUse { job: String },
    #[error(
        "mirror {job}: the VM has no block node named {node}: check the node name (system disk 'sys', application disk 'app')"
    )]
    NoSourceNode { job: String, node: String },
    #[error("mirror {job}: the target {path} is the source's own image: give another target path")]
    TargetIsSource { job: String, path: PathBuf },
    #[error(
        "mirror {job}: cannot create the target image {path}: check that its directory exists and is writable"
    )]
    CreateTarget {
        job: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "mirror {job}: not in sync after {waited:?} ({} of {} bytes copied): the guest writes faster than the copy; abort and start again with copy mode write-blocking",
        progress.offset, progress.len
    )]
    NotConverging {
        job: String,
        waited: Duration,
        progress: Progress,
    },
    #[error(
        "mirror {job}: the block job failed: {error}; the target is unusable (abort the mirror; the source is untouched)"
    )]
    JobFailed { job: String, error: String },
    #[error(
        "mirror {job}: the block job ended without a result (cancelled or gone); abort the mirror and start again"
    )]
    JobGone { job: String },
    #[error(
        "mirror {job}: not ready (source and target not yet in sync): call wait_ready before cutting"
    )]
    NotReady { job: String },
    #[error("mirror {job}: the job did not end within {after:?} of the cut; QEMU may be stuck")]
    CutTimeout { job: String, after: Duration },
    #[error("mirror {job}: cannot remove the half-made target {path}; remove it by hand")]
    RemoveTarget {
        job: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A running `blockdev-mirror` job and its target nodes. Must end with [`Mirror::cut`] or
/// [`Mirror::abort`]; dropping it leaves the job running in QEMU.
#[must_use = "a mirror job keeps running in QEMU until cut or aborted"]
#[derive(Debug)]
pub struct Mirror {
    spec: MirrorSpec,
    started: Instant,
    created_target: bool,
    /// Target nodes this mirror added (deleted on cleanup; never a node it did not add).
    added_nodes: Vec<String>,
    ready: bool,
    /// Dirty-tracking granularity in bytes (`None`: QEMU's default).
    granularity: Option<u32>,
}

impl Mirror {
    /// Creates and attaches the target, then starts the job. On error nothing is left behind
    /// (nodes deleted, an image this call created removed).
    pub fn start(qmp: &mut Qmp, spec: MirrorSpec) -> Result<Mirror, MirrorError> {
        Mirror::start_granular(qmp, spec, None)
    }

    /// [`Mirror::start`] with the job's dirty-tracking granularity (bytes, a power of 2 from
    /// 512 B to 64 MiB). QEMU's default is 64 KiB on a raw target, so a guest's random 4 KiB
    /// writes make a background mirror copy 16 times what they wrote; a granularity of the
    /// guest's block size copies what was written.
    pub fn start_granular(
        qmp: &mut Qmp,
        spec: MirrorSpec,
        granularity: Option<u32>,
    ) -> Result<Mirror, MirrorError> {
        let started = Instant::now();
        let job = spec.job_id.clone();
        let step = |step: &'static str| {
            let job = job.clone();
            move |source| MirrorError::Qmp { job, step, source }
        };
        let (size, source_files) = source_image(qmp, &spec.device_node)
            .map_err(step("reading the source size (query-named-block-nodes)"))?
            .ok_or_else(|| MirrorError::NoSourceNode {
                job: job.clone(),
                node: spec.device_node.clone(),
            })?;
        if let Ok(target) = fs::canonicalize(&spec.target_path)
            && source_files
                .iter()
                .any(|f| fs::canonicalize(f).is_ok_and(|f| f == target))
        {
            return Err(MirrorError::TargetIsSource {
                job,
                path: spec.target_path.clone(),
            });
        }
        let jobs = qmp
            .execute("query-jobs", Value::Null)
            .map_err(step("query-jobs"))?;
        if jobs.as_array().is_some_and(|a| {
            a.iter()
                .any(|j| j.get("id").and_then(Value::as_str) == Some(job.as_str()))
        }) {
            return Err(MirrorError::JobIdInUse { job });
        }
        // A job of the same id that ended earlier may have left events behind.
        qmp.discard_events(|e| e.job_id() == Some(job.as_str()));

        let raw_size = (spec.format == ImageFormat::Raw).then_some(size);
        let created_target = match create_target(&spec.target_path, raw_size) {
            Ok(created) => created,
            Err(source) => {
                return Err(MirrorError::CreateTarget {
                    job,
                    path: spec.target_path.clone(),
                    source,
                });
            }
        };
        let mut mirror = Mirror {
            spec,
            started,
            created_target,
            added_nodes: Vec::new(),
            ready: false,
            granularity,
        };
        tracing::info!(job = %mirror.spec.job_id, source = %mirror.spec.device_node,
            target = %mirror.spec.target_path.display(), size, created_target,
            copy_mode = mirror.spec.copy_mode.as_qmp(), "mirror: starting");
        match mirror.attach_and_start(qmp, size) {
            Ok(()) => Ok(mirror),
            Err(e) => {
                mirror.cleanup(qmp, false, mirror.created_target);
                Err(e)
            }
        }
    }

    fn attach_and_start(&mut self, qmp: &mut Qmp, size: u64) -> Result<(), MirrorError> {
        let file_node = self.file_node();
        qmp.blockdev_add(json!({
            "driver": "file",
            "filename": self.spec.target_path,
            "node-name": file_node,
        }))
        .map_err(self.step("adding the target file node"))?;
        self.added_nodes.push(file_node.clone());
        if self.created_target && self.spec.format == ImageFormat::Qcow2 {
            self.format_qcow2(qmp, size)?;
        }
        qmp.blockdev_add(json!({
            "driver": self.spec.format.driver(),
            "file": file_node,
            "node-name": self.spec.target_node,
        }))
        .map_err(self.step("adding the target format node"))?;
        self.added_nodes.insert(0, self.spec.target_node.clone());
        let s = &self.spec;
        qmp.blockdev_mirror_granular(
            &s.job_id,
            &s.device_node,
            &s.target_node,
            s.copy_mode,
            s.speed,
            self.granularity,
        )
        .map_err(self.step("starting blockdev-mirror"))
    }

    /// Writes an empty qcow2 of `size` bytes onto the file node with QEMU's `blockdev-create` job.
    fn format_qcow2(&self, qmp: &mut Qmp, size: u64) -> Result<(), MirrorError> {
        let create_job = format!("{}-create", self.spec.job_id);
        qmp.execute(
            "blockdev-create",
            json!({
                "job-id": create_job,
                "options": { "driver": "qcow2", "file": self.file_node(), "size": size },
            }),
        )
        .map_err(self.step("formatting the target as qcow2 (blockdev-create)"))?;
        let timeout = qmp.timeout();
        qmp.wait_event(
            |e| {
                e.name == "JOB_STATUS_CHANGE"
                    && e.job_id() == Some(create_job.as_str())
                    && e.str("status") == Some("concluded")
            },
            timeout,
        )
        .map_err(self.step("waiting for the qcow2 format job"))?;
        let jobs = qmp
            .execute("query-jobs", Value::Null)
            .map_err(self.step("query-jobs after formatting the target"))?;
        let error = jobs.as_array().and_then(|a| {
            a.iter()
                .find(|j| j.get("id").and_then(Value::as_str) == Some(create_job.as_str()))
                .and_then(|j| j.get("error").and_then(Value::as_str).map(str::to_string))
        });
        qmp.execute("job-dismiss", json!({ "id": create_job }))
            .map_err(self.step("dismissing the qcow2 format job"))?;
        qmp.discard_events(|e| e.job_id() == Some(create_job.as_str()));
        match error {
            Some(error) => Err(MirrorError::JobFailed {
                job: create_job,
                error,
            }),
            None => Ok(()),
        }
    }

    /// What the mirror copies where.
    pub fn spec(&self) -> &MirrorSpec {
        &self.spec
    }

    /// Changes the copy rate limit (bytes/s, 0: none) of the running job.
    pub fn set_speed(&self, qmp: &mut Qmp, speed: u64) -> Result<(), MirrorError> {
        qmp.block_job_set_speed(&self.spec.job_id, speed)
            .map_err(self.step("block-job-set-speed"))
    }

    /// The job's progress now (`query-block-jobs`).
    pub fn progress(&self, qmp: &mut Qmp) -> Result<Progress, MirrorError> {
        let job = self.job(qmp)?.ok_or_else(|| self.gone_or_failed(qmp))?;
        if let Some(error) = job.error {
            return Err(self.failed(error));
        }
        Ok(Progress {
            offset: job.offset,
            len: job.len,
        })
    }

    /// Waits until source and target are in sync (`BLOCK_JOB_READY`, or `ready: true` in
    /// `query-block-jobs`). Not ready by `timeout` → [`MirrorError::NotConverging`] (the job keeps
    /// running: wait again, cut is refused, abort is allowed). A failed job → `JobFailed`.
    pub fn wait_ready(
        &mut self,
        qmp: &mut Qmp,
        timeout: Duration,
    ) -> Result<Progress, MirrorError> {
        self.wait_ready_reporting(qmp, timeout, &mut |_| {})
    }

    /// [`Mirror::wait_ready`], handing `report` the job's progress each time it is read
    /// (each job event, at least every 200 ms), the ready one last.
    pub fn wait_ready_reporting(
        &mut self,
        qmp: &mut Qmp,
        timeout: Duration,
        report: &mut dyn FnMut(Progress),
    ) -> Result<Progress, MirrorError> {
        let deadline = Instant::now() + timeout;
        let id = self.spec.job_id.clone();
        loop {
            if let Some(err) = self.take_failure(qmp) {
                return Err(err);
            }
            // Ready/standby flips are many on a busy guest: the queue keeps none of them.
            qmp.discard_events(|e| {
                e.name == "JOB_STATUS_CHANGE" && e.job_id() == Some(id.as_str())
            });
            let job = self.job(qmp)?.ok_or_else(|| self.gone_or_failed(qmp))?;
            if let Some(error) = job.error {
                return Err(self.failed(error));
            }
            let progress = Progress {
                offset: job.offset,
                len: job.len,
            };
            report(progress);
            if job.ready {
                self.ready = true;
                qmp.discard_events(|e| e.name == "BLOCK_JOB_READY" && e.job_id() == Some(&id));
                tracing::info!(job = %id, offset = progress.offset, len = progress.len,
                    elapsed = ?self.started.elapsed(), "mirror: ready");
                return Ok(progress);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(MirrorError::NotConverging {
                    job: id,
                    waited: timeout,
                    progress,
                });
            }
            match qmp.wait_event(
                |e| e.job_id() == Some(id.as_str()) && e.name.starts_with("BLOCK_JOB_"),
                POLL.min(deadline - now),
            ) {
                Ok(e) if e.name == "BLOCK_JOB_READY" => {
                    // Confirmed by query-block-jobs on the next turn (and progress read there).
                    continue;
                }
                Ok(e) => {
                    if let Some(err) = self.failure_of(&e, false) {
                        return Err(err);
                    }
                }
                Err(QmpError::EventTimeout { .. }) => {}
                Err(source) => {
                    return Err(MirrorError::Qmp {
                        job: id,
                        step: "waiting for the job to be ready",
                        source,
                    });
                }
            }
        }
    }

    /// Ends the ready job with a point-in-time copy in the target and closes the target image.
    /// `timeout` bounds the wait for the job to end. On failure the target is removed as in
    /// [`Mirror::abort`] (best effort) and the error returned.
    pub fn cut(self, qmp: &mut Qmp, timeout: Duration) -> Result<CutReport, MirrorError> {
        match self.try_cut(qmp, timeout) {
            Ok(r) => Ok(r),
            Err(e) => {
                tracing::warn!(job = %self.spec.job_id, error = %e, "mirror: cut failed, removing the target");
                self.cleanup(qmp, true, true);
                Err(e)
            }
        }
    }

    fn try_cut(&self, qmp: &mut Qmp, timeout: Duration) -> Result<CutReport, MirrorError> {
        let id = self.spec.job_id.as_str();
        if let Some(err) = self.take_failure(qmp) {
            return Err(err);
        }
        if !self.ready {
            let job = self.job(qmp)?.ok_or_else(|| self.gone_or_failed(qmp))?;
            if !job.ready {
                return Err(MirrorError::NotReady {
                    job: id.to_string(),
                });
            }
        }
        let cut_start = Instant::now();
        qmp.block_job_cancel(id, false)
            .map_err(self.step("block-job-cancel (cut)"))?;
        let end = qmp
            .wait_event(
                |e| {
                    e.job_id() == Some(id)
                        && matches!(
                            e.name.as_str(),
                            "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED" | "BLOCK_JOB_ERROR"
                        )
                },
                timeout,
            )
            .map_err(|e| match e {
                QmpError::EventTimeout { .. } => MirrorError::CutTimeout {
                    job: id.to_string(),
                    after: timeout,
                },
                source => MirrorError::Qmp {
                    job: id.to_string(),
                    step: "waiting for the job to end after the cut",
                    source,
                },
            })?;
        if let Some(err) = self.failure_of(&end, true) {
            return Err(err);
        }
        let bytes = end.data.get("len").and_then(Value::as_u64).unwrap_or(0);
        self.wait_dismissed(qmp, cut_start + timeout)?;
        for node in &self.added_nodes {
            qmp.blockdev_del(node)
                .map_err(self.step("deleting a target node (closing the image)"))?;
        }
        qmp.discard_events(|e| e.job_id() == Some(id));
        let report = CutReport {
            bytes,
            cut: cut_start.elapsed(),
            total: self.started.elapsed(),
        };
        tracing::info!(job = %id, bytes, cut = ?report.cut, total = ?report.total, "mirror: cut");
        Ok(report)
    }

    /// Abandons the job (forced cancel), deletes the target nodes and removes the target image
    /// (a regular file; a block device is left alone). The source is untouched.
    pub fn abort(self, qmp: &mut Qmp) -> Result<(), MirrorError> {
        tracing::info!(job = %self.spec.job_id, "mirror: aborting");
        let id = self.spec.job_id.as_str();
        match qmp.block_job_cancel(id, true) {
            Ok(()) => {}
            // The job already ended (failed, or never started): nothing to cancel.
            Err(QmpError::Command { class, .. }) if class == "DeviceNotActive" => {}
            Err(QmpError::Command { .. }) if self.job(qmp).ok().flatten().is_none() => {}
            Err(source) => {
                return Err(MirrorError::Qmp {
                    job: id.to_string(),
                    step: "block-job-cancel (abort)",
                    source,
                });
            }
        }
        let timeout = qmp.timeout();
        self.wait_dismissed(qmp, Instant::now() + timeout)?;
        let mut first_err = None;
        for node in &self.added_nodes {
            if let Err(source) = qmp.blockdev_del(node)
                && !node_missing(&source)
            {
                first_err.get_or_insert(MirrorError::Qmp {
                    job: id.to_string(),
                    step: "deleting a target node",
                    source,
                });
            }
        }
        qmp.discard_events(|e| e.job_id() == Some(id));
        if let Some(e) = first_err {
            return Err(e);
        }
        remove_target(&self.spec.target_path).map_err(|source| MirrorError::RemoveTarget {
            job: id.to_string(),
            path: self.spec.target_path.clone(),
            source,
        })
    }

    // ---- internals -----------------------------------------------------------------------

    fn file_node(&self) -> String {
        format!("{}-file", self.spec.target_node)
    }

    fn step(&self, step: &'static str) -> impl FnOnce(QmpError) -> MirrorError + use<> {
        let job = self.spec.job_id.clone();
        move |source| MirrorError::Qmp { job, step, source }
    }

    fn failed(&self, error: String) -> MirrorError {
        MirrorError::JobFailed {
            job: self.spec.job_id.clone(),
            error,
        }
    }

    /// This job in `query-block-jobs`, `None` once it has ended.
    fn job(&self, qmp: &mut Qmp) -> Result<Option<crate::qmp::BlockJob>, MirrorError> {
        let jobs = qmp
            .query_block_jobs()
            .map_err(self.step("query-block-jobs"))?;
        Ok(jobs.into_iter().find(|j| j.device == self.spec.job_id))
    }

    /// The failure an event reports, if it reports one. `cutting`: a clean completion is the
    /// expected end (after our non-forced cancel), not a failure.
    fn failure_of(&self, e: &Event, cutting: bool) -> Option<MirrorError> {
        match e.name.as_str() {
            "BLOCK_JOB_ERROR" => Some(self.failed(format!(
                "{} error on the {} side (action {})",
                e.str("operation").unwrap_or("I/O"),
                // QEMU does not say which side; the operation tells: reads are from the source.
                if e.str("operation") == Some("read") {
                    "source"
                } else {
                    "target"
                },
                e.str("action").unwrap_or("?"),
            ))),
            "BLOCK_JOB_COMPLETED" => match e.str("error") {
                Some(err) => Some(self.failed(err.to_string())),
                // A completion we did not ask for (someone else cancelled or completed it).
                None if !cutting => Some(MirrorError::JobGone {
                    job: self.spec.job_id.clone(),
                }),
                None => None,
            },
            "BLOCK_JOB_CANCELLED" => Some(MirrorError::JobGone {
                job: self.spec.job_id.clone(),
            }),
            _ => None,
        }
    }

    /// Takes a queued failure event of this job, if any.
    fn take_failure(&self, qmp: &mut Qmp) -> Option<MirrorError> {
        let id = self.spec.job_id.clone();
        let e = qmp
            .wait_event(
                |e| {
                    e.job_id() == Some(id.as_str())
                        && matches!(
                            e.name.as_str(),
                            "BLOCK_JOB_ERROR" | "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED"
                        )
                },
                Duration::ZERO,
            )
            .ok()?;
        self.failure_of(&e, false)
    }

    /// Why the job is no longer listed: a queued end event tells, else it is just gone.
    fn gone_or_failed(&self, qmp: &mut Qmp) -> MirrorError {
        self.take_failure(qmp).unwrap_or(MirrorError::JobGone {
            job: self.spec.job_id.clone(),
        })
    }

    /// Waits until QEMU has dismissed the job (it no longer holds the target node).
    fn wait_dismissed(&self, qmp: &mut Qmp, deadline: Instant) -> Result<(), MirrorError> {
        let id = self.spec.job_id.as_str();
        loop {
            let jobs = qmp
                .execute("query-jobs", Value::Null)
                .map_err(self.step("query-jobs"))?;
            let present = jobs.as_array().is_some_and(|a| {
                a.iter()
                    .any(|j| j.get("id").and_then(Value::as_str) == Some(id))
            });
            if !present {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(MirrorError::CutTimeout {
                    job: id.to_string(),
                    after: deadline.saturating_duration_since(self.started),
                });
            }
            let _ = qmp.wait_event(
                |e| {
                    e.name == "JOB_STATUS_CHANGE"
                        && e.job_id() == Some(id)
                        && e.str("status") == Some("null")
                },
                Duration::from_millis(50).min(deadline - now),
            );
        }
    }

    /// Best-effort removal of the job, the nodes and (if `remove`) the image.
    fn cleanup(&self, qmp: &mut Qmp, cancel: bool, remove: bool) {
        let id = self.spec.job_id.as_str();
        if cancel && self.job(qmp).ok().flatten().is_some() {
            let _ = qmp.block_job_cancel(id, true);
            let _ = self.wait_dismissed(qmp, Instant::now() + qmp.timeout());
        }
        for node in &self.added_nodes {
            if let Err(e) = qmp.blockdev_del(node)
                && !node_missing(&e)
            {
                tracing::warn!(job = %id, node, error = %e, "mirror: cannot delete target node");
            }
        }
        qmp.discard_events(|e| e.job_id() == Some(id));
        if remove && let Err(e) = remove_target(&self.spec.target_path) {
            tracing::warn!(job = %id, path = %self.spec.target_path.display(), error = %e,
                "mirror: cannot remove the target image");
        }
    }
}

/// True when `blockdev-del` failed because the node does not exist (already gone).
fn node_missing(e: &QmpError) -> bool {
    matches!(e, QmpError::Command { desc, .. } if desc.contains("Failed to find node"))
}

/// Removes the target if it is a regular file (a missing one is fine).
fn remove_target(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => fs::remove_file(path),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The virtual size of node `node` and the files of its image chain (the image and its backing
/// files), `None` when there is no such node.
fn source_image(qmp: &mut Qmp, node: &str) -> Result<Option<(u64, Vec<PathBuf>)>, QmpError> {
    let nodes = qmp.execute("query-named-block-nodes", json!({ "flat": true }))?;
    let Some(image) = nodes.as_array().and_then(|a| {
        a.iter()
            .find(|n| n.get("node-name").and_then(Value::as_str) == Some(node))
            .and_then(|n| n.get("image"))
    }) else {
        return Ok(None);
    };
    let Some(size) = image.get("virtual-size").and_then(Value::as_u64) else {
        return Ok(None);
    };
    let mut files = Vec::new();
    let mut cur = Some(image);
    while let Some(img) = cur {
        if let Some(f) = img.get("filename").and_then(Value::as_str) {
            files.push(PathBuf::from(f));
        }
        cur = img.get("backing-image");
    }
    Ok(Some((size, files)))
}

/// Creates a copy's target file, of `size` bytes when given (a raw image QEMU writes into);
/// `false` when it exists already (the caller's `blockdev-add` then refuses or reuses it). A
/// file it created and could not size is removed again.
pub(crate) fn create_target(path: &std::path::Path, size: Option<u64>) -> io::Result<bool> {
    match OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(f) => {
            if let Some(size) = size
                && let Err(e) = f.set_len(size)
            {
                let _ = fs::remove_file(path);
                return Err(e);
            }
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}
