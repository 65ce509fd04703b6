//! Steps 703/704, by the kind of LC: the disk copies with a write history.
//!
//! - `ns` LCs: `patchover-disk` copies files and traps writes with fanotify; the system disk is
//!   replayed until caught up, the application disk followed until the cut.
//! - `qemu` LCs: QEMU copies the disk itself with a `blockdev-mirror` job (the hypervisor's own
//!   write tracking); the system disk is cut at once after READY (a point-in-time copy), the
//!   application disk is kept mirroring and cut in the switch window, with the guest paused.
//!   A mirror that does not converge in the background is started again in write-blocking
//!   mode, where every guest write reaches both images before it completes.

use patchover_lcroot::LcRoot;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use patchover_core::{BackendKind, DiskSpec, LcSpec, Quiesce};
use patchover_disk::{CopyOptions, FollowCopy, NoProgress};
use patchover_lc::LcBackend;
use patchover_qemu::{CopyMode, ImageFormat, Mirror, MirrorSpec, Qmp, ServedCopy};

use crate::OrchestratorError;
use crate::cycle::FreezeLc;

/// How long a background mirror may take to reach READY before it is restarted write-blocking.
const CONVERGE: Duration = Duration::from_secs(600);

fn copy_err(disk: &'static str) -> impl Fn(BoxError) -> OrchestratorError {
    move |source| OrchestratorError::Copy { disk, source }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A failure of the application disk's copy.
fn app_err(e: impl std::error::Error + Send + Sync + 'static) -> OrchestratorError {
    copy_err("application")(Box::new(e))
}

/// The job (and so `<job>-dirty` bitmap and `<job>-copy` node) of a served application image's
/// copy (see `patchover_qemu::backup`).
const APP_JOB: &str = "patchover-app";

/// What a finished copy did.
pub(crate) struct Copied {
    pub bytes_copied: u64,
    pub bytes_replayed: u64,
    pub detail: serde_json::Value,
}

/// The monitor a VM keeps for block jobs (see `patchover_qemu::backend`).
fn jobs_qmp(run_dir: &Path, active: &LcSpec) -> Result<Qmp, BoxError> {
    let sock = patchover_qemu::backend::jobs_socket(run_dir, &active.id);
    Ok(Qmp::connect(&sock, Duration::from_secs(10))?)
}

/// A mirror job of one disk of a running VM, with its own monitor connection. Dropped
/// unfinished (a failed run), it aborts: the job ends and the half-made target is removed.
pub(crate) struct MirrorJob {
    qmp: Qmp,
    mirror: Option<Mirror>,
    started: Instant,
    mode: CopyMode,
    /// The target, marked incomplete until the cut.
    dst: PathBuf,
}

impl MirrorJob {
    fn start(
        run_dir: &Path,
        active: &LcSpec,
        node: &str,
        dst: &Path,
    ) -> Result<MirrorJob, BoxError> {
        let mut qmp = jobs_qmp(run_dir, active)?;
        let started = Instant::now();
        patchover_disk::mark_incomplete(dst, Path::new(&format!("{}:{node}", active.id)))?;
        let spec = |mode| MirrorSpec {
            job_id: format!("patchover-{node}"),
            device_node: node.to_owned(),
            target_path: dst.to_owned(),
            target_node: format!("patchover-{node}-copy"),
            format: match patchover_qemu::backend::image_format(dst) {
                "qcow2" => ImageFormat::Qcow2,
                _ => ImageFormat::Raw,
            },
            copy_mode: mode,
            speed: 0,
        };
        let mut mirror = Mirror::start(&mut qmp, spec(CopyMode::Background))?;
        let mode = match mirror.wait_ready(&mut qmp, CONVERGE) {
            Ok(_) => CopyMode::Background,
            Err(patchover_qemu::MirrorError::NotConverging { .. }) => {
                tracing::warn!(lc = %active.id, node, "the mirror does not converge; starting again write-blocking");
                mirror.abort(&mut qmp)?;
                let mut m = Mirror::start(&mut qmp, spec(CopyMode::WriteBlocking))?;
                if let Err(e) = m.wait_ready(&mut qmp, CONVERGE) {
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
    fn cut(mut self) -> Result<serde_json::Value, BoxError> {
        let m = self.mirror.take().expect("a job is cut once");
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

impl Drop for MirrorJob {
    fn drop(&mut self) {
        if let Some(m) = self.mirror.take()
            && let Err(e) = m.abort(&mut self.qmp)
        {
            tracing::warn!(error = %patchover_core::error_chain(&e), "aborting a mirror job");
        }
    }
}

/// 703: copies the active LC's system disk to `dst` (empty), until caught up.
pub(crate) fn copy_system(
    run_dir: &Path,
    active: &LcSpec,
    dst: &Path,
) -> Result<Copied, OrchestratorError> {
    let src = &active.system_disk.path;
    match active.backend {
        BackendKind::Ns => {
            let r = patchover_disk::copy_once(src, dst, &CopyOptions::default(), &NoProgress)
                .map_err(|e| copy_err("system")(Box::new(e)))?;
            Ok(Copied {
                bytes_copied: r.stats.bytes_copied,
                bytes_replayed: r.stats.bytes_replayed,
                detail: serde_json::to_value(&r).unwrap_or_default(),
            })
        }
        BackendKind::Qemu => {
            let job = MirrorJob::start(run_dir, active, "sys", dst).map_err(copy_err("system"))?;
            let detail = job.cut().map_err(copy_err("system"))?;
            Ok(Copied {
                bytes_copied: detail["bytes"].as_u64().unwrap_or(0),
                bytes_replayed: 0,
                detail,
            })
        }
    }
}

/// 704: a copy of the application disk that goes on until [`LiveCopy::cut`].
pub(crate) enum LiveCopy {
    Files(FollowCopy),
    Mirror(Box<MirrorJob>),
    /// An `ns` LC's application image served by its block server: dirty bitmap + point-in-time
    /// backups (`patchover_qemu::ServedCopy`).
    Blocks(Box<BlocksJob>),
}

/// A [`ServedCopy`] of an `ns` LC's application image, and where the LC mounts it.
pub(crate) struct BlocksJob {
    copy: ServedCopy,
    mount: PathBuf,
    /// The target, marked incomplete until the cut.
    dst: PathBuf,
    started: Instant,
    rounds: Vec<patchover_qemu::RoundReport>,
}

/// How long one block job may take.
const JOB_TIMEOUT: Duration = Duration::from_secs(600);

/// What the cut did.
pub(crate) struct CutDone {
    pub bytes_replayed: u64,
    pub freeze_ms: Option<f64>,
    pub detail: serde_json::Value,
}

impl LiveCopy {
    pub(crate) fn start(
        run_dir: &Path,
        active: &LcSpec,
        src: &DiskSpec,
        dst: &DiskSpec,
    ) -> Result<LiveCopy, OrchestratorError> {
        if active.backend == BackendKind::Ns
            && src.kind == patchover_core::DiskKind::Image
            && let Some(disk) = patchover_qemu::nsdisks::served_disk(
                run_dir,
                &active.id,
                patchover_lc::images::APP_NODE,
            )
        {
            let started = Instant::now();
            patchover_disk::mark_incomplete(&dst.path, &src.path).map_err(app_err)?;
            let mut copy = ServedCopy::start(
                &patchover_qemu::nsdisks::jobs_socket(run_dir, &active.id),
                &disk,
                APP_JOB,
                &dst.path,
            )
            .map_err(app_err)?;
            // The full copy, then the LC runs on while the bitmap records its writes.
            copy.wait(JOB_TIMEOUT).map_err(app_err)?;
            return Ok(LiveCopy::Blocks(Box::new(BlocksJob {
                copy,
                mount: src.mount.clone(),
                dst: dst.path.clone(),
                started,
                rounds: Vec::new(),
            })));
        }
        match active.backend {
            BackendKind::Ns => FollowCopy::start(
                &src.path,
                &dst.path,
                &CopyOptions::default(),
                Arc::new(NoProgress),
            )
            .map(LiveCopy::Files)
            .map_err(app_err),
            BackendKind::Qemu => MirrorJob::start(run_dir, active, "app", &dst.path)
                .map(|m| LiveCopy::Mirror(Box::new(m)))
                .map_err(copy_err("application")),
        }
    }

    /// Whether [`LiveCopy::catch_up`] has anything to do.
    pub(crate) fn catches_up(&self) -> bool {
        matches!(self, LiveCopy::Blocks(_))
    }

    /// Brings the copy close to the source while the LC runs, so that the cut in the switch
    /// window leaves little to copy: bitmap rounds until one ships ≤ 8 MiB (at most 4). The
    /// file copier and QEMU's mirror keep up by themselves: `None`.
    pub(crate) fn catch_up(&mut self) -> Result<Option<serde_json::Value>, OrchestratorError> {
        let LiveCopy::Blocks(job) = self else {
            return Ok(None);
        };
        let rounds = job
            .copy
            .catch_up(8 << 20, 4, JOB_TIMEOUT)
            .map_err(app_err)?;
        job.rounds.extend(rounds.iter().copied());
        Ok(Some(serde_json::json!({
            "rounds": rounds.len(),
            "bytes": rounds.iter().map(|r| r.bytes).collect::<Vec<_>>(),
        })))
    }

    /// Holds the active LC still, makes the copy complete, lets the LC go.
    pub(crate) fn cut(
        self,
        backend: &dyn LcBackend,
        active: &LcSpec,
    ) -> Result<CutDone, OrchestratorError> {
        let mut q = FreezeLc {
            backend,
            spec: active,
        };
        match self {
            LiveCopy::Files(f) => {
                let r = f.cut(&mut q).map_err(app_err)?;
                Ok(CutDone {
                    bytes_replayed: r.stats.bytes_replayed,
                    freeze_ms: r
                        .cut
                        .as_ref()
                        .map(|c| c.freeze_window.as_secs_f64() * 1000.0),
                    detail: serde_json::to_value(&r).unwrap_or_default(),
                })
            }
            LiveCopy::Blocks(job) => {
                let BlocksJob {
                    mut copy,
                    mount,
                    dst,
                    started,
                    rounds,
                } = *job;
                let pid = backend
                    .status(active)?
                    .pid
                    .ok_or_else(|| OrchestratorError::Copy {
                        disk: "application",
                        source: format!("{} is not running", active.id).into(),
                    })?;
                // The LC's filesystem on the served disk, seen from the host.
                let at = PathBuf::from(format!("/proc/{pid}/root"))
                    .join(mount.strip_prefix("/").unwrap_or(&mount));
                let (cut, ()) = copy.cut(&at, &mut q, || (), JOB_TIMEOUT).map_err(app_err)?;
                copy.close().map_err(app_err)?;
                patchover_disk::mark_complete(&dst).map_err(app_err)?;
                let ms = |d: Duration| d.as_secs_f64() * 1000.0;
                Ok(CutDone {
                    bytes_replayed: cut.shipped,
                    freeze_ms: Some(ms(cut.freeze)),
                    detail: serde_json::json!({
                        "bitmap": true,
                        "rounds_before_cut": rounds.len(),
                        "bytes_before_cut": rounds.iter().map(|r| r.bytes).sum::<u64>(),
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
            LiveCopy::Mirror(job) => {
                let t = Instant::now();
                q.freeze().map_err(app_err)?;
                let res = job.cut();
                let thawed = q.thaw();
                let freeze_ms = t.elapsed().as_secs_f64() * 1000.0;
                let detail = res.map_err(copy_err("application"))?;
                thawed.map_err(app_err)?;
                Ok(CutDone {
                    bytes_replayed: 0,
                    freeze_ms: Some(freeze_ms),
                    detail,
                })
            }
        }
    }
}

/// Ends the copy jobs a run left on a VM or an `ns` LC's block server (patchover died while
/// they ran: a job outlives the monitor connection that started it, and would go on writing
/// into the standby's image).
/// Returns the jobs ended and the nodes removed.
pub(crate) fn abort_leftover_jobs(run_dir: &Path, active: &LcSpec) -> Vec<String> {
    let sock = match active.backend {
        BackendKind::Qemu => patchover_qemu::backend::jobs_socket(run_dir, &active.id),
        // An ns LC's block server, if it serves the LC's application image.
        BackendKind::Ns => patchover_qemu::nsdisks::jobs_socket(run_dir, &active.id),
    };
    // One attempt, no waiting: the VM or block server either runs (and its monitor answers at
    // once) or does not (no job). Recovery calls this before it puts the service back, so a
    // wait here is a wait of the service (a 10 s wait for an absent socket once held every
    // recovery of an ns LC without a block server).
    let Ok(mut qmp) = Qmp::connect_now(&sock, Duration::from_secs(10)) else {
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
    // A bitmap copy's dirty bitmap on the served disk (`<job>-dirty`, see
    // `patchover_qemu::backup`): a new copy could not add its own.
    let bitmap = format!("{APP_JOB}-dirty");
    if active.backend == BackendKind::Ns
        && qmp
            .execute(
                "block-dirty-bitmap-remove",
                serde_json::json!({"node": patchover_lc::images::APP_NODE, "name": &bitmap}),
            )
            .is_ok()
    {
        ended.push(bitmap);
    }
    for n in nodes {
        if qmp.blockdev_del(&n).is_ok() {
            ended.push(n);
        }
    }
    ended
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
    let fmt = patchover_qemu::backend::image_format(&disk.path);
    let out = if fmt == "raw" {
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
