//! How a VM's disks are copied while it runs (seed 703/704): QEMU copies the disk itself with
//! a `blockdev-mirror` job (the hypervisor's own write tracking). The system disk is cut at
//! once after READY (a point-in-time copy); the application disk is kept mirroring and cut in
//! the switch window, with the guest paused. A mirror that does not converge in the
//! background is started again in write-blocking mode, where every guest write reaches both
//! images before it completes.
//!
//! Also here: ending the copy jobs a dead patchover left on a VM or on an `ns` LC's block
//! server ([`end_jobs`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use patchover_core::{DiskSpec, LcSpec, Quiesce};
use patchover_lc::host::Host;
use patchover_lc::migrate::BoxError;
use patchover_lc::{Copied, CutDone, DiskCopyError, LiveCopy, Migratable, Progress};

use crate::backend::{QemuBackend, image_format, jobs_socket};
use crate::{CopyMode, ImageFormat, Mirror, MirrorSpec, Qmp};

/// How long a background mirror may take to reach READY before it is restarted write-blocking.
const CONVERGE: Duration = Duration::from_secs(600);

impl<H: Host> Migratable for QemuBackend<H> {
    fn copy_system_disk(
        &self,
        active: &LcSpec,
        dst: &Path,
        progress: &dyn Progress,
    ) -> Result<Copied, DiskCopyError> {
        let job = MirrorJob::start(&self.jobs_socket(active), active, ("sys", dst), progress)
            .map_err(DiskCopyError::system)?;
        let detail = job.cut().map_err(DiskCopyError::system)?;
        Ok(Copied {
            bytes_copied: detail["bytes"].as_u64().unwrap_or(0),
            bytes_replayed: 0,
            detail,
        })
    }

    fn live_copy(
        &self,
        active: &LcSpec,
        _src: &DiskSpec,
        dst: &DiskSpec,
        progress: Arc<dyn Progress>,
    ) -> Result<Box<dyn LiveCopy>, DiskCopyError> {
        let job = MirrorJob::start(
            &self.jobs_socket(active),
            active,
            ("app", &dst.path),
            &*progress,
        )
        .map_err(DiskCopyError::application)?;
        Ok(Box::new(job))
    }

    fn end_leftover_copies(&self, active: &LcSpec) -> Vec<String> {
        end_jobs(&self.jobs_socket(active), None)
    }
}

/// A mirror's progress as a disk copy's: its first length is the total counted, its offset
/// the bytes copied.
fn metered(progress: &dyn Progress) -> impl FnMut(crate::mirror::Progress) + '_ {
    let mut counted = false;
    move |p| {
        if !counted {
            progress.scanned(p.len, 0);
            counted = true;
        }
        progress.copied(p.offset, 0);
    }
}

impl<H: Host> QemuBackend<H> {
    fn jobs_socket(&self, spec: &LcSpec) -> PathBuf {
        jobs_socket(&self.cfg.run_dir, &spec.id)
    }
}

/// A mirror job of one disk of a running VM, with its own monitor connection. Dropped
/// unfinished (a failed run), it aborts: the job ends and the half-made target is removed.
pub struct MirrorJob {
    qmp: Qmp,
    mirror: Option<Mirror>,
    started: Instant,
    mode: CopyMode,
    /// The target, marked incomplete until the cut.
    dst: PathBuf,
}

impl MirrorJob {
    /// Mirrors block node `node` of the VM whose jobs monitor is `socket` into `dst`, until
    /// READY; the job's offset and length (`query-block-jobs`) go to `progress` as it goes.
    pub fn start(
        socket: &Path,
        active: &LcSpec,
        (node, dst): (&str, &Path),
        progress: &dyn Progress,
    ) -> Result<MirrorJob, BoxError> {
        let mut qmp = Qmp::connect(socket, Duration::from_secs(10))?;
        let started = Instant::now();
        patchover_disk::mark_incomplete(dst, Path::new(&format!("{}:{node}", active.id)))?;
        let spec = |mode| MirrorSpec {
            job_id: format!("patchover-{node}"),
            device_node: node.to_owned(),
            target_path: dst.to_owned(),
            target_node: format!("patchover-{node}-copy"),
            format: match image_format(dst) {
                "qcow2" => ImageFormat::Qcow2,
                _ => ImageFormat::Raw,
            },
            copy_mode: mode,
            speed: 0,
        };
        let mut report = metered(progress);
        let mut mirror = Mirror::start(&mut qmp, spec(CopyMode::Background))?;
        let mode = match mirror.wait_ready_reporting(&mut qmp, CONVERGE, &mut report) {
            Ok(_) => CopyMode::Background,
            Err(crate::MirrorError::NotConverging { .. }) => {
                tracing::warn!(lc = %active.id, node, "the mirror does not converge; starting again write-blocking");
                mirror.abort(&mut qmp)?;
                let mut m = Mirror::start(&mut qmp, spec(CopyMode::WriteBlocking))?;
                if let Err(e) = m.wait_ready_reporting(&mut qmp, CONVERGE, &mut report) {
                    let _ = m.abort(&mut qmp);
                    return Err(e.into());
                }
                mirror = m;
                CopyMode::WriteBlocking
            }
            Err(e) => {
                let _ = mirror.abort(&mut qmp);
                return Err(e.into());
            }
        };
        Ok(MirrorJob {
            qmp,
            mirror: Some(mirror),
            started,
            mode,
            dst: dst.to_owned(),
        })
    }

    /// Ends the job with a point-in-time copy; the caller holds the guest still if it must.
    pub fn cut(mut self) -> Result<serde_json::Value, BoxError> {
        let Some(m) = self.mirror.take() else {
            return Err("the mirror job was already cut".into());
        };
        let r = m.cut(&mut self.qmp, Duration::from_secs(60))?;
        patchover_disk::mark_complete(&self.dst)?;
        Ok(serde_json::json!({
            "mirror": true,
            "copy_mode": format!("{:?}", self.mode),
            "bytes": r.bytes,
            "cut_ms": r.cut.as_secs_f64() * 1000.0,
            "total_s": self.started.elapsed().as_secs_f64(),
        }))
    }
}

impl LiveCopy for MirrorJob {
    /// The application disk's cut, with the guest paused around it.
    fn cut(self: Box<Self>, hold: &mut dyn Quiesce) -> Result<CutDone, DiskCopyError> {
        let t = Instant::now();
        hold.freeze().map_err(DiskCopyError::application)?;
        let res = MirrorJob::cut(*self);
        let thawed = hold.thaw();
        let freeze_ms = t.elapsed().as_secs_f64() * 1000.0;
        let detail = res.map_err(DiskCopyError::application)?;
        thawed.map_err(DiskCopyError::application)?;
        Ok(CutDone {
            bytes_replayed: 0,
            freeze_ms: Some(freeze_ms),
            detail,
            // A mirror job keeps no count of the guest's writes.
            writes: None,
        })
    }
}

impl Drop for MirrorJob {
    fn drop(&mut self) {
        if let Some(m) = self.mirror.take()
            && let Err(e) = m.abort(&mut self.qmp)
        {
            tracing::warn!(error = %patchover_core::error_chain(&e), "aborting a mirror job");
        }
    }
}

/// Ends the `patchover-*` copy jobs on the monitor `socket` (a VM's, or an `ns` LC's block
/// server's) and removes their target nodes, and the dirty bitmap of a bitmap copy of
/// `bitmap_node`. Returns the jobs ended and the nodes removed.
pub fn end_jobs(socket: &Path, bitmap_node: Option<&str>) -> Vec<String> {
    // One attempt, no waiting: the VM or block server either runs (and its monitor answers at
    // once) or does not (no job). Recovery calls this before it puts the service back, so a
    // wait here is a wait of the service (a 10 s wait for an absent socket once held every
    // recovery of an ns LC without a block server).
    let Ok(mut qmp) = Qmp::connect_now(socket, Duration::from_secs(10)) else {
        return Vec::new(); // not running: no job
    };
    let jobs = qmp.query_block_jobs().unwrap_or_default();
    let mut ended = Vec::new();
    for j in jobs
        .into_iter()
        .filter(|j| j.device.starts_with("patchover-"))
    {
        if qmp.block_job_cancel(&j.device, true).is_ok() {
            let id = j.device.clone();
            let _ = qmp.wait_event(
                |e| {
                    e.job_id() == Some(id.as_str())
                        && (e.name == "BLOCK_JOB_CANCELLED" || e.name == "BLOCK_JOB_COMPLETED")
                },
                Duration::from_secs(30),
            );
        }
        ended.push(j.device);
    }
    // The target nodes (`patchover-<node>-copy` over `…-copy-file`), also when patchover died
    // after adding them and before the job started: a format node goes before its file node.
    let mut nodes: Vec<String> = qmp
        .execute("query-named-block-nodes", serde_json::json!({"flat": true}))
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|n| n["node-name"].as_str().map(str::to_owned))
        .filter(|n| n.starts_with("patchover-"))
        .collect();
    nodes.sort_by_key(|n| n.ends_with("-file"));
    nodes.dedup();
    // A bitmap copy's dirty bitmap on the served disk (`<job>-dirty`, see `crate::backup`): a
    // new copy could not add its own.
    if let Some(node) = bitmap_node {
        let bitmap = format!("{}-dirty", crate::nsdisks::APP_JOB);
        if qmp
            .execute(
                "block-dirty-bitmap-remove",
                serde_json::json!({"node": node, "name": &bitmap}),
            )
            .is_ok()
        {
            ended.push(bitmap);
        }
    }
    for n in nodes {
        if qmp.blockdev_del(&n).is_ok() {
            ended.push(n);
        }
    }
    ended
}
