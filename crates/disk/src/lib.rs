//! Live disk copy with a write history (seed fig. 8–10).
//!
//! The standby LC needs copies of the active LC's disks while the service keeps writing to them.
//! A copy here is three things:
//!
//! 1. a **bulk copy** of the source as it is (reflink, `copy_file_range` with holes kept, or plain
//!    reads and writes; owners, modes, times, xattrs, hard links, symlinks, device nodes, FIFOs),
//! 2. a **write history** that starts *before* the bulk copy: a fanotify trap on the source's
//!    filesystem records every write (content, attributes, create, delete, rename) in an on-disk
//!    journal (see [`journal`]),
//! 3. **replay** rounds that apply the history to the copy, oldest first.
//!
//! Two modes: [`copy_once`] (system disk: copy, replay until a round finds nothing new, done) and
//! [`FollowCopy`] (application disk: keep replaying in the background until [`FollowCopy::cut`]
//! freezes the writers, replays the last writes, thaws them, and reports the freeze window). A
//! copy that has not completed carries a marker ([`is_incomplete`]) so it is never booted.

pub mod bench;
mod engine;
mod error;
mod freeze;
mod fsops;
pub mod journal;
mod marker;
mod ranges;
mod trap;
mod tree;
pub mod verify;
mod watch;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use engine::Stats;

/// Whether the write trap can be armed here: an fanotify group with the reporting flags the
/// live copy uses, marked `FAN_MARK_FILESYSTEM` on the filesystem holding `dir`, then closed
/// (`patchover doctor`).
pub fn probe_fanotify(dir: &Path) -> std::io::Result<()> {
    trap::Trap::start(dir, false).map(drop)
}
pub use error::CopyError;
pub use freeze::CgroupFreezer;
pub use fsops::{BLOCK, Reflink};
pub use marker::{MARKER, is_incomplete, mark_complete, mark_incomplete, marker_path};
use patchover_core::Quiesce;
pub use watch::{Seen, WriteWatch};

/// How to copy.
#[derive(Debug, Clone)]
pub struct CopyOptions {
    /// Use reflinks where the filesystem can (default) or always copy bytes.
    pub reflink: Reflink,
    /// Walk the source first to know the totals (for an ETA). Costs one extra `stat` walk.
    pub scan_totals: bool,
    /// Follow mode: pause between background replay rounds.
    pub round_interval: Duration,
    /// Once mode: give up catching up after this many rounds that still found writes (the
    /// source may be written all the time); the report says whether it caught up.
    pub max_rounds: u32,
    /// Flush the copy to stable storage (`syncfs`) before declaring it complete.
    pub sync: bool,
    /// Keep the history journal at this path when the copy completes (it is removed otherwise).
    pub keep_history: Option<PathBuf>,
    /// Read only the byte ranges the kernel reports written (ext4's tracepoints) when replaying
    /// a modified file, where the source's filesystem reports them; `false` reads every modified
    /// file whole (the benchmark's baseline).
    pub ranges: bool,
}

impl CopyOptions {
    /// The defaults, as a constant (for a `const` that changes one of them).
    pub const DEFAULT: CopyOptions = CopyOptions {
        reflink: Reflink::Auto,
        scan_totals: false,
        round_interval: Duration::from_millis(200),
        max_rounds: 20,
        sync: true,
        keep_history: None,
        ranges: true,
    };
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions::DEFAULT
    }
}

/// Where the copy is, for progress bars. All numbers are cumulative.
pub trait Progress: Send + Sync {
    /// Totals of the bulk copy (only with [`CopyOptions::scan_totals`]).
    fn scanned(&self, _bytes: u64, _files: u64) {}
    /// Bulk copy progress.
    fn copied(&self, _bytes: u64, _files: u64) {}
    /// A replay round finished.
    fn replayed(&self, _round: u64, _history_entries: u64, _bytes: u64) {}
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;
impl Progress for NoProgress {}

/// What a finished copy did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CopyReport {
    pub src: PathBuf,
    pub dst: PathBuf,
    /// `directory` or `image`.
    pub kind: &'static str,
    #[serde(flatten)]
    pub stats: Stats,
    /// Whether the last replay round found no new writes (always true after a cut).
    pub caught_up: bool,
    /// Wall time from start to completion.
    #[serde(serialize_with = "secs")]
    pub duration: Duration,
    /// The cut, in follow mode.
    pub cut: Option<CutReport>,
}

/// One cut (or checkpoint): writers frozen, last writes shipped, writers thawed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CutReport {
    /// How long the writers were frozen, from the freeze request to the end of the thaw, not
    /// counting a verification (which only tests and the benchmark ask for).
    #[serde(serialize_with = "secs")]
    pub freeze_window: Duration,
    /// Trapped writes replayed while frozen.
    pub history_entries: u64,
    /// Bytes written to the copy while frozen.
    pub bytes_shipped: u64,
    /// Bytes of file data read (and hashed) while frozen to find what changed.
    pub bytes_read: u64,
    /// `Some(true)` when the copy was compared with the frozen source and found identical.
    pub verified: Option<bool>,
    #[serde(serialize_with = "secs")]
    pub verify_time: Duration,
    /// Where the freeze window went.
    pub phases: CutPhases,
}

/// The freeze window by phase (seconds in JSON); they add up to the window.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CutPhases {
    /// From the freeze request until every writer is frozen.
    #[serde(serialize_with = "secs")]
    pub freeze: Duration,
    /// Reading the write trap and the range log.
    #[serde(serialize_with = "secs")]
    pub drain: Duration,
    /// The last catch-up's reads (and hashing) of file data.
    #[serde(serialize_with = "secs")]
    pub read: Duration,
    /// The last catch-up's writes to the copy.
    #[serde(serialize_with = "secs")]
    pub write: Duration,
    /// The rest of the frozen round: new and removed entries, metadata, the journal.
    #[serde(serialize_with = "secs")]
    pub other: Duration,
    /// From the thaw request until every writer runs.
    #[serde(serialize_with = "secs")]
    pub thaw: Duration,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

fn start_engine(src: &Path, dst: &Path, opts: &CopyOptions) -> Result<engine::Engine, CopyError> {
    let plan = engine::prepare(src, dst)?;
    engine::Engine::start(plan, opts)
}

/// Copies one regular file's data to `dst` (created, or truncated first), by the fastest path
/// there is: `FICLONE`, else `copy_file_range` extent by extent, else read/write; holes stay
/// holes. Reads go through the page cache, so a writer's buffered writes done before the call
/// are in the copy; writes during it may or may not be (callers that copy a file being written
/// track those writes themselves). Returns the bytes of data copied (holes not counted).
pub fn copy_file(src: &Path, dst: &Path) -> Result<u64, CopyError> {
    use std::os::unix::fs::OpenOptionsExt;
    // Host paths (image files the host owns), opened without following a link at the end and
    // read only when they are regular files.
    let parent = match src.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let (sf, md) = tree::Dir::open(parent)
        .and_then(|d| d.open_regular_meta(&tree::name(src.file_name().unwrap_or_default())?, false))
        .map_err(|e| CopyError::read(src, e))?;
    let df = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dst)
        .map_err(|e| CopyError::write(dst, e))?;
    let mut fp = fsops::FastPaths::new(Reflink::Auto);
    fsops::copy_data(&sf, src, &df, dst, md.len(), &mut fp)?;
    df.sync_all().map_err(|e| CopyError::write(dst, e))?;
    Ok(fp.bytes_reflinked + fp.bytes_copy_range + fp.bytes_read_write)
}

/// Copies `src` to `dst` (a directory tree or an image file) while it may be written, then
/// replays the history until a round finds no new writes (or [`CopyOptions::max_rounds`]).
/// For a disk nobody writes to (a stopped LC's system disk) the copy is exact.
pub fn copy_once(
    src: &Path,
    dst: &Path,
    opts: &CopyOptions,
    progress: &dyn Progress,
) -> Result<CopyReport, CopyError> {
    let started = Instant::now();
    let mut e = start_engine(src, dst, opts)?;
    if opts.scan_totals {
        let (b, f) = e.scan();
        progress.scanned(b, f);
    }
    e.bulk(progress)?;
    let mut caught_up = false;
    for _ in 0..opts.max_rounds.max(1) {
        if e.round(progress)? == 0 {
            caught_up = true;
            break;
        }
    }
    e.refresh_fast_paths();
    let (src_p, dst_p, is_file) = (e.src.clone(), e.dst.clone(), e.is_file);
    let stats = e.finish()?;
    tracing::info!(src = %src_p.display(), dst = %dst_p.display(), caught_up, "disk copy complete");
    Ok(CopyReport {
        src: src_p,
        dst: dst_p,
        kind: if is_file { "image" } else { "directory" },
        stats,
        caught_up,
        duration: started.elapsed(),
        cut: None,
    })
}

struct Shared {
    engine: Mutex<Option<engine::Engine>>,
    stop: AtomicBool,
    wake: (Mutex<()>, Condvar),
    error: Mutex<Option<CopyError>>,
}

/// A copy that keeps replaying the source's writes in the background until it is cut.
pub struct FollowCopy {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
    started: Instant,
}

impl FollowCopy {
    /// Checks the request, arms the trap and starts the bulk copy and the replay rounds in a
    /// background thread. Bad input is returned here, before anything is written.
    pub fn start(
        src: &Path,
        dst: &Path,
        opts: &CopyOptions,
        progress: Arc<dyn Progress>,
    ) -> Result<FollowCopy, CopyError> {
        let started = Instant::now();
        let e = start_engine(src, dst, opts)?;
        let shared = Arc::new(Shared {
            engine: Mutex::new(Some(e)),
            stop: AtomicBool::new(false),
            wake: (Mutex::new(()), Condvar::new()),
            error: Mutex::new(None),
        });
        let sh = shared.clone();
        let opts = opts.clone();
        let worker = std::thread::Builder::new()
            .name("disk-follow".into())
            .spawn(move || {
                if let Err(err) = follow_loop(&sh, &opts, &*progress) {
                    tracing::error!(error = %err, "background disk copy failed");
                    *lock(&sh.error) = Some(err);
                }
            })
            .map_err(|_| CopyError::WorkerDied)?;
        Ok(FollowCopy {
            shared,
            worker: Some(worker),
            started,
        })
    }

    /// True once the background copy has failed; the error comes out of the next `checkpoint`
    /// or `cut`.
    pub fn is_failed(&self) -> bool {
        lock(&self.shared.error).is_some()
    }

    /// The counters so far (waits for a running round).
    pub fn stats(&self) -> Option<Stats> {
        lock(&self.shared.engine).as_ref().map(|e| e.stats.clone())
    }

    /// Freezes the writers, replays the last writes, optionally compares the copy with the frozen
    /// source, thaws, and keeps following. Waits for the bulk copy first if it still runs.
    pub fn checkpoint(
        &mut self,
        quiesce: &mut dyn Quiesce,
        verify: bool,
    ) -> Result<CutReport, CopyError> {
        let mut guard = lock(&self.shared.engine);
        // Checked with the engine locked: the background thread fails while holding it.
        self.take_error()?;
        let e = guard.as_mut().ok_or(CopyError::WorkerDied)?;
        checkpoint(e, quiesce, verify)
    }

    /// The final cut: a checkpoint, then the copy is complete (the marker goes) and the
    /// background thread stops. After it returns, every write that finished before the freeze is
    /// on the copy.
    pub fn cut(mut self, quiesce: &mut dyn Quiesce) -> Result<CopyReport, CopyError> {
        self.cut_with(quiesce, false)
    }

    /// [`FollowCopy::cut`] with a comparison of the copy and the frozen source (slow: reads both).
    pub fn cut_with(
        &mut self,
        quiesce: &mut dyn Quiesce,
        verify: bool,
    ) -> Result<CopyReport, CopyError> {
        self.stop_worker();
        self.take_error()?;
        let mut e = lock(&self.shared.engine)
            .take()
            .ok_or(CopyError::WorkerDied)?;
        let cut = checkpoint(&mut e, quiesce, verify)?;
        e.refresh_fast_paths();
        let (src, dst, is_file) = (e.src.clone(), e.dst.clone(), e.is_file);
        let stats = e.finish()?;
        Ok(CopyReport {
            src,
            dst,
            kind: if is_file { "image" } else { "directory" },
            stats,
            caught_up: true,
            duration: self.started.elapsed(),
            cut: Some(cut),
        })
    }

    fn take_error(&self) -> Result<(), CopyError> {
        match lock(&self.shared.error).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn stop_worker(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.1.notify_all();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Drop for FollowCopy {
    fn drop(&mut self) {
        // An abandoned copy stays marked incomplete: only cut() removes the marker.
        self.stop_worker();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn follow_loop(sh: &Shared, opts: &CopyOptions, progress: &dyn Progress) -> Result<(), CopyError> {
    // The background copy must not take the CPU from the service it copies: this thread (and the
    // bulk copy's workers, which inherit it) runs at a lower priority. Cuts run on the caller's
    // thread at its own priority, since the writers wait for them.
    // SAFETY: setpriority/gettid take plain integers; PRIO_PROCESS with a TID affects this thread.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10) };
    if r != 0 {
        tracing::debug!("cannot lower the priority of the background copy");
    }
    {
        let mut g = lock(&sh.engine);
        let Some(e) = g.as_mut() else { return Ok(()) };
        if !e.bulk_done {
            if opts.scan_totals {
                let (b, f) = e.scan();
                progress.scanned(b, f);
            }
            e.bulk(progress)?;
        }
    }
    while !sh.stop.load(Ordering::SeqCst) {
        let t = Instant::now();
        {
            let mut g = lock(&sh.engine);
            let Some(e) = g.as_mut() else { return Ok(()) };
            e.round(progress)?;
        }
        // Never spend more than a quarter of the time replaying: the writers need the CPU too.
        let pause = opts.round_interval.max(t.elapsed() * 3);
        let g = lock(&sh.wake.0);
        if !sh.stop.load(Ordering::SeqCst) {
            let _ = sh.wake.1.wait_timeout(g, pause);
        }
    }
    Ok(())
}

/// Catch-up rounds before a freeze, at most.
const CATCH_UP_ROUNDS: usize = 3;

/// A catch-up round this short leaves the frozen round about nothing: stop catching up.
const CONVERGED: Duration = Duration::from_millis(3);

/// The nice value of the thread that freezes, replays and thaws.
const FROZEN_NICE: libc::c_int = -10;

/// This thread's nice value set for a while, and put back on drop.
struct Boost(Option<libc::c_int>);

impl Boost {
    fn new(nice: libc::c_int) -> Boost {
        // SAFETY: gettid/getpriority/setpriority take plain integers; PRIO_PROCESS with a TID
        // affects this thread only.
        unsafe {
            let tid = libc::gettid() as libc::id_t;
            *libc::__errno_location() = 0;
            let old = libc::getpriority(libc::PRIO_PROCESS, tid);
            if *libc::__errno_location() != 0 || old <= nice {
                return Boost(None);
            }
            if libc::setpriority(libc::PRIO_PROCESS, tid, nice) != 0 {
                return Boost(None); // not allowed (no CAP_SYS_NICE): run as we are
            }
            Boost(Some(old))
        }
    }
}

impl Drop for Boost {
    fn drop(&mut self) {
        if let Some(old) = self.0 {
            // SAFETY: as in `Boost::new`.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, old) };
        }
    }
}

fn checkpoint(
    e: &mut engine::Engine,
    q: &mut dyn Quiesce,
    verify: bool,
) -> Result<CutReport, CopyError> {
    // A cut asked for before the background thread started copying does the bulk copy itself.
    if !e.bulk_done {
        e.bulk(&NoProgress)?;
    }
    // Catch up while the writers still run, so the frozen round has little left to do. With
    // the write-range log a round costs what was written since the last one, so rounds
    // converge: repeat while one still took long (the next has only that time's writes).
    // Without it each round reads every modified file whole and one is enough.
    for _ in 0..CATCH_UP_ROUNDS {
        let t = Instant::now();
        e.round(&NoProgress)?;
        e.refresh_fast_paths();
        if !e.stats.range_log || t.elapsed() < CONVERGED {
            break;
        }
    }
    let entries0 = e.stats.history_entries;
    let bytes0 = e.stats.bytes_replayed;
    let read0 = e.stats.bytes_hashed;
    // The writers wait for this thread from the freeze to the thaw: on a loaded host it should
    // not queue behind other work for the CPU (the background rounds run at nice 10).
    let _boost = Boost::new(FROZEN_NICE);
    let t0 = Instant::now();
    if let Err(err) = q.freeze() {
        let _ = q.thaw();
        return Err(CopyError::Freeze(err));
    }
    let frozen_at = Instant::now();
    e.frozen = true;
    e.times = engine::Times::default();
    let shipped = e.round(&NoProgress);
    e.frozen = false;
    let t1 = Instant::now();
    let verdict = if verify && shipped.is_ok() {
        Some(verify::compare(&e.src, &e.dst))
    } else {
        None
    };
    let t2 = Instant::now();
    q.thaw().map_err(CopyError::Thaw)?;
    let t3 = Instant::now();
    shipped?;
    if let Some(Err(m)) = &verdict {
        return Err(CopyError::Mismatch(m.clone()));
    }
    let times = e.times;
    let round = t1 - frozen_at;
    Ok(CutReport {
        phases: CutPhases {
            freeze: frozen_at - t0,
            drain: times.drain,
            read: times.read,
            write: times.write,
            other: round.saturating_sub(times.drain + times.read + times.write),
            thaw: t3 - t2,
        },
        freeze_window: (t1 - t0) + (t3 - t2),
        history_entries: e.stats.history_entries - entries0,
        bytes_shipped: e.stats.bytes_replayed - bytes0,
        bytes_read: e.stats.bytes_hashed - read0,
        verified: verdict.map(|v| v.is_ok()),
        verify_time: t2 - t1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fanotify_probe_fails_where_no_filesystem_is() {
        let e = probe_fanotify(Path::new("/nonexistent/dir")).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
    }

    /// The orchestrator keeps a follow copy in its own thread or task.
    #[test]
    fn follow_copy_can_move_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<FollowCopy>();
        send_sync::<CopyReport>();
    }

    #[test]
    fn bad_input_errors_are_told_apart_from_host_failures() {
        assert!(CopyError::SamePath(PathBuf::from("/a")).is_bad_input());
        assert!(
            !CopyError::OutOfSpace {
                path: PathBuf::from("/a"),
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            }
            .is_bad_input()
        );
        let e = CopyError::write("/x", std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(matches!(e, CopyError::OutOfSpace { .. }), "{e:?}");
    }
}
