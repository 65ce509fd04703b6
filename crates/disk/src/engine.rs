//! The copy engine: validation, bulk copy, and replay rounds of the write history.
//!
//! Replay is idempotent by design: a history entry does not carry data, it says "this path may
//! differ now", and replay makes the copy's entry equal to the source's *current* state (fresh
//! copy for a new or renamed entry, removal for a gone one, block-hash diff for modified content,
//! metadata for attribute changes). So entries can be coalesced, replayed more than once, and
//! replayed while the source keeps changing: anything that changes after a path was looked at
//! raises a new entry for the next round. Once writers are frozen, one more round leaves nothing
//! behind, which is what makes a cut exact.
//!
//! Paths here (`rel`, relative to the disk root) are names for the journal and for messages; no
//! file is reached through one. Every operation goes through [`crate::tree::Dir`]: the directory
//! holding `rel` is opened from the root's descriptor with no link followed, and the entry is used
//! with `*at` calls that do not follow it. A link met on the way (the LC swapped a directory for
//! a link while we copy) is treated like a vanished entry (the trap has recorded the swap, and
//! replay copies the link as a link), and counted in [`Stats::refused_links`].

use std::collections::{BTreeSet, HashMap};
use std::ffi::{CStr, CString, OsStr};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use crate::error::CopyError;
use crate::fsops::{self, FastPaths, Hashes};
use crate::journal::Journal;
use crate::marker;
use crate::ranges::{Changed, RangeLog};
use crate::trap::{Op, Trap};
use crate::tree::{self, Dir, HandleRef, Meta};
use crate::{CopyOptions, Progress};

/// Counters of one copy; all cumulative.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Stats {
    /// Bytes of regular-file data in the bulk copy (however they were moved).
    pub bytes_copied: u64,
    pub bytes_reflinked: u64,
    pub bytes_copy_range: u64,
    pub bytes_read_write: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub specials: u64,
    pub hardlinks: u64,
    /// Bytes written to the copy by replay (changed blocks and fresh copies of new entries).
    pub bytes_replayed: u64,
    /// Bytes of source read by replay to find changed blocks.
    pub bytes_hashed: u64,
    /// Trapped writes recorded in the history.
    pub history_entries: u64,
    /// Paths replayed (after coalescing entries of one round).
    pub paths_replayed: u64,
    pub rounds: u64,
    /// Whether replay reads only the byte ranges the kernel reported written (ext4's
    /// tracepoints, see `ranges.rs`), rather than whole modified files.
    pub range_log: bool,
    /// Times a link stood where the copier walked a directory or opened a file, on either side,
    /// and was refused rather than followed: the source changed under the copy (a directory
    /// swapped for a link), or the copy holds a link where the source now has a directory.
    pub refused_links: u64,
}

/// Time spent by replay, by phase (cumulative).
#[derive(Debug, Default, Clone, Copy)]
pub struct Times {
    /// Reading the write trap and the range log.
    pub drain: std::time::Duration,
    /// Reading and hashing file data (source, and the copy where no hash is known).
    pub read: std::time::Duration,
    /// Writing changed blocks to the copy.
    pub write: std::time::Duration,
}

const REPLACE: u8 = 1;
const CONTENT: u8 = 2;
const META: u8 = 4;

/// The entry vanished or changed kind under us: the trap has recorded the change, replay copies
/// what is there now. ELOOP/EXDEV: a link where a directory was walked or a file opened;
/// ENOTDIR: something else where a directory was walked.
fn gone(e: &io::Error) -> bool {
    tree::is_link_refusal(e) || matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR))
}

fn gone_err(e: &CopyError) -> bool {
    matches!(e, CopyError::ReadSource { source, .. } if gone(source))
}

/// A link target read as something else: the entry is no longer a link.
fn not_link(e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::EINVAL) {
        io::Error::from_raw_os_error(libc::ENOENT)
    } else {
        e
    }
}

/// `rel` is the incomplete marker at the root, or inside it: the copy's own, never the LC's.
fn is_marker(rel: &Path) -> bool {
    rel.components().next() == Some(Component::Normal(OsStr::new(marker::MARKER)))
}

fn entry_name(n: &CStr) -> &OsStr {
    OsStr::from_bytes(n.to_bytes())
}

/// Checked and canonical source and destination.
pub struct Plan {
    pub src: PathBuf,
    pub dst: PathBuf,
    pub is_file: bool,
}

/// Checks the request; changes nothing unless it is valid, then clears a previous incomplete copy
/// at the destination and creates the destination root (directory disks) and the marker.
pub fn prepare(src: &Path, dst: &Path) -> Result<Plan, CopyError> {
    let src = fs::canonicalize(src).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            CopyError::SourceMissing(src.to_path_buf())
        } else {
            CopyError::read(src, e)
        }
    })?;
    let smd = fs::metadata(&src).map_err(|e| CopyError::read(&src, e))?;
    let is_file = if smd.is_dir() {
        false
    } else if smd.is_file() {
        true
    } else {
        return Err(CopyError::UnknownDiskKind(src));
    };
    if marker::marker_path(&src, is_file).exists() {
        return Err(CopyError::SourceIncomplete(src));
    }
    let dst = match fs::canonicalize(dst) {
        Ok(p) => p,
        Err(_) => {
            let name = dst
                .file_name()
                .ok_or_else(|| CopyError::DestinationParentMissing(dst.to_path_buf()))?;
            let parent = match dst.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            let parent = fs::canonicalize(parent)
                .map_err(|_| CopyError::DestinationParentMissing(dst.to_path_buf()))?;
            parent.join(name)
        }
    };
    if dst == src {
        return Err(CopyError::SamePath(src));
    }
    if dst.starts_with(&src) {
        return Err(CopyError::DestinationInsideSource { src, dst });
    }
    let mark = marker::marker_path(&dst, is_file);
    let mname = tree::name(OsStr::new(marker::MARKER)).map_err(|e| CopyError::write(&mark, e))?;
    let w = |e| CopyError::write(&dst, e);
    match fs::symlink_metadata(&dst) {
        Ok(dmd) if is_file => {
            if !dmd.is_file() {
                return Err(CopyError::KindMismatch {
                    src_kind: "image file",
                    dst,
                });
            }
            if dmd.len() > 0 && !mark.exists() {
                return Err(CopyError::DestinationNotEmpty(dst));
            }
            fs::remove_file(&dst).map_err(w)?;
            if mark.exists() {
                fs::remove_dir_all(&mark).map_err(|e| CopyError::write(&mark, e))?;
            }
        }
        Ok(dmd) => {
            if !dmd.is_dir() {
                return Err(CopyError::KindMismatch {
                    src_kind: "directory",
                    dst,
                });
            }
            // An old incomplete copy may hold the LC's links: it is removed through descriptors.
            let dd = Dir::open(&dst).map_err(w)?;
            let names = dd.names().map_err(w)?;
            let marked = dd.stat(&mname).is_ok_and(|m| m.is_dir());
            if !names.is_empty() {
                if !marked {
                    return Err(CopyError::DestinationNotEmpty(dst));
                }
                tracing::info!(dst = %dst.display(), "redoing an incomplete copy from scratch");
            }
            for n in names {
                dd.remove_all(&n)
                    .map_err(|e| CopyError::write(dst.join(entry_name(&n)), e))?;
            }
        }
        Err(_) if is_file => {
            if mark.exists() {
                fs::remove_dir_all(&mark).map_err(|e| CopyError::write(&mark, e))?;
            }
        }
        Err(_) => fs::create_dir(&dst).map_err(w)?,
    }
    marker::create(&mark, &src).map_err(|e| CopyError::write(&mark, e))?;
    Ok(Plan { src, dst, is_file })
}

#[derive(Clone, Copy)]
enum Side {
    Src,
    Dst,
}

/// One regular file for the bulk copy's workers: both parent directories, the name, and the
/// source's `stat` from the listing.
struct Job {
    sdir: Arc<Dir>,
    ddir: Arc<Dir>,
    name: CString,
    rel: PathBuf,
    md: Meta,
}

/// One running copy: source, destination, the armed trap and what replay knows.
pub struct Engine {
    pub src: PathBuf,
    pub dst: PathBuf,
    pub is_file: bool,
    /// The source root directory (directory disks) or the image's directory (image files).
    sroot: Arc<Dir>,
    /// The root's name in `sroot`: `.` for a directory disk, the image's file name.
    sroot_name: CString,
    droot: Arc<Dir>,
    droot_name: CString,
    root_dev: u64,
    marker: PathBuf,
    fp: FastPaths,
    trap: Trap,
    journal: Journal,
    /// Block hashes of destination files by destination (dev, inode).
    hashes: HashMap<(u64, u64), Hashes>,
    /// Names in the copy of each source inode (dev, inode), to rebuild hard links.
    names: HashMap<(u64, u64), Vec<PathBuf>>,
    touched: BTreeSet<PathBuf>,
    pub stats: Stats,
    /// Links refused, counted by this thread and the bulk copy's workers.
    refused: Arc<AtomicU64>,
    keep_history: Option<PathBuf>,
    sync: bool,
    /// True inside a replay round (false in the bulk copy).
    replaying: bool,
    /// True while the writers are frozen: replay may use every CPU.
    pub frozen: bool,
    /// The bulk copy has completed (replay rounds before it would copy nothing).
    pub bulk_done: bool,
    /// The bulk copy's worker pool, while it runs.
    pool: Option<Pool>,
    /// Byte ranges of the source's writes, where the kernel reports them.
    ranges: Option<RangeLog>,
    /// Diff whole files whatever the range log says (after a fanotify overflow).
    whole: bool,
    /// Where replay's time went, for a cut's phases (reset by the caller).
    pub times: Times,
    /// Directories whose metadata waits for the pool.
    deferred_dirs: Vec<PathBuf>,
}

/// The sending side of the bulk copy's worker pool.
struct Pool {
    tx: mpsc::SyncSender<Job>,
    failed: Arc<AtomicBool>,
}

impl Pool {
    fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }
}

/// Counts `e` if it is a refused link.
fn note(refused: &AtomicU64, e: &io::Error) {
    if tree::is_link_refusal(e) {
        refused.fetch_add(1, Ordering::Relaxed);
    }
}

fn note_err(refused: &AtomicU64, e: &CopyError) {
    if let CopyError::ReadSource { source, .. } | CopyError::WriteDestination { source, .. } = e {
        note(refused, source);
    }
}

/// Where the copy's bulk worker puts one regular file: data, then metadata from the opened
/// source file onto the new one.
fn copy_job(job: &Job, src: &Path, dst: &Path, fp: &mut FastPaths) -> Result<(), CopyError> {
    let (sp, dp) = (src.join(&job.rel), dst.join(&job.rel));
    let (sf, df, md) =
        fsops::copy_new_file((&job.sdir, &job.name, &sp), (&job.ddir, &job.name, &dp), fp)?;
    fsops::apply_meta(
        (HandleRef::open(&sf), &sp),
        (HandleRef::open(&df), &dp),
        &md,
        false,
    )
}

impl Engine {
    /// Arms the trap and opens the journal. Call right after [`prepare`]; every write to the
    /// source from now on is in the history.
    pub fn start(plan: Plan, opts: &CopyOptions) -> Result<Engine, CopyError> {
        let trap = Trap::start(&plan.src, plan.is_file).map_err(|e| CopyError::Trap {
            path: plan.src.clone(),
            source: e,
        })?;
        let marker = marker::marker_path(&plan.dst, plan.is_file);
        let jpath = marker.join("history");
        let mut journal = Journal::create(&jpath).map_err(|e| CopyError::Journal {
            path: jpath.clone(),
            source: e,
        })?;
        journal
            .append("start", None, Path::new(""))
            .map_err(|e| CopyError::Journal {
                path: jpath.clone(),
                source: e,
            })?;
        // The roots are host paths the operator named (checked by `prepare`); below them,
        // everything is the LC's and is reached through these descriptors only.
        let open_root = |p: &Path| -> io::Result<(Dir, CString)> {
            if plan.is_file {
                let parent = p.parent().unwrap_or(Path::new("/"));
                let name = tree::name(p.file_name().unwrap_or_default())?;
                Ok((Dir::open(parent)?, name))
            } else {
                Ok((Dir::open(p)?, c".".to_owned()))
            }
        };
        let (sroot, sroot_name) =
            open_root(&plan.src).map_err(|e| CopyError::read(&plan.src, e))?;
        let (droot, droot_name) =
            open_root(&plan.dst).map_err(|e| CopyError::write(&plan.dst, e))?;
        let plan_src = plan.src.clone();
        let root_dev = sroot
            .stat(&sroot_name)
            .map_err(|e| CopyError::read(&plan.src, e))?
            .dev();
        Ok(Engine {
            src: plan.src,
            dst: plan.dst,
            is_file: plan.is_file,
            sroot: Arc::new(sroot),
            sroot_name,
            droot: Arc::new(droot),
            droot_name,
            root_dev,
            marker,
            fp: FastPaths::new(opts.reflink),
            trap,
            journal,
            hashes: HashMap::new(),
            names: HashMap::new(),
            touched: BTreeSet::new(),
            stats: Stats::default(),
            refused: Arc::new(AtomicU64::new(0)),
            keep_history: opts.keep_history.clone(),
            sync: opts.sync,
            replaying: false,
            frozen: false,
            bulk_done: false,
            pool: None,
            deferred_dirs: Vec::new(),
            ranges: if opts.ranges {
                RangeLog::start(&plan_src)
            } else {
                None
            },
            whole: false,
            times: Times::default(),
        })
    }

    /// The source path of `rel`, for messages only.
    fn s(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            self.src.clone()
        } else {
            self.src.join(rel)
        }
    }

    /// The copy's path of `rel`, for messages only.
    fn d(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            self.dst.clone()
        } else {
            self.dst.join(rel)
        }
    }

    fn jerr(&self, e: io::Error) -> CopyError {
        CopyError::Journal {
            path: self.journal.path().to_path_buf(),
            source: e,
        }
    }

    fn note(&self, e: &io::Error) {
        note(&self.refused, e);
    }

    /// The directory holding `rel` on one side, opened from the root with no link followed, and
    /// `rel`'s name in it.
    fn locate(&self, side: Side, rel: &Path) -> io::Result<(Arc<Dir>, CString)> {
        let (root, root_name) = match side {
            Side::Src => (&self.sroot, &self.sroot_name),
            Side::Dst => (&self.droot, &self.droot_name),
        };
        if rel.as_os_str().is_empty() {
            return Ok((root.clone(), root_name.clone()));
        }
        let parent = rel.parent().unwrap_or(Path::new(""));
        let dir = if parent.as_os_str().is_empty() {
            root.clone()
        } else {
            Arc::new(root.beneath(parent)?)
        };
        Ok((dir, tree::name(rel.file_name().unwrap_or_default())?))
    }

    /// `stat` of `rel` on one side (never following a link).
    fn stat_rel(&self, side: Side, rel: &Path) -> io::Result<Meta> {
        let (d, n) = self.locate(side, rel)?;
        d.stat(&n)
    }

    /// Counts what the bulk copy will move, for a progress bar with an ETA.
    pub fn scan(&self) -> (u64, u64) {
        fn walk(d: &Dir, dev: u64, acc: &mut (u64, u64)) {
            let Ok(names) = d.names() else { return };
            for n in names {
                let Ok(md) = d.stat(&n) else { continue };
                if md.is_dir() {
                    if md.dev() == dev
                        && let Ok(sub) = d.sub(&n)
                    {
                        walk(&sub, dev, acc);
                    }
                } else {
                    acc.1 += 1;
                    if md.is_file() {
                        acc.0 += md.len();
                    }
                }
            }
        }
        let mut acc = (0, 0);
        if self.is_file {
            acc = (
                self.sroot
                    .stat(&self.sroot_name)
                    .map(|m| m.len())
                    .unwrap_or(0),
                1,
            );
        } else {
            walk(&self.sroot, self.root_dev, &mut acc);
        }
        acc
    }

    /// Copies the whole source once (writes during it are in the history). Regular files are
    /// copied by a pool of worker threads (one per CPU) while this thread walks the tree and makes
    /// directories, links and special files; directory metadata is applied once every file is in.
    pub fn bulk(&mut self, progress: &dyn Progress) -> Result<(), CopyError> {
        if self.is_file {
            let (sd, sn) = (self.sroot.clone(), self.sroot_name.clone());
            let (dd, dn) = (self.droot.clone(), self.droot_name.clone());
            let md = sd.stat(&sn).map_err(|e| CopyError::read(&self.src, e))?;
            self.copy_fresh(Path::new(""), (&sd, &sn), (&dd, &dn), &md, progress)?;
            self.refresh_fast_paths();
            self.bulk_done = true;
            return Ok(());
        }
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 8);
        // Each queued job holds its two directories open: the bound keeps descriptors in check.
        let (tx, rx) = mpsc::sync_channel::<Job>(1024);
        let rx = Mutex::new(rx);
        let failed = Arc::new(AtomicBool::new(false));
        let first_err: Mutex<Option<CopyError>> = Mutex::new(None);
        let bytes = AtomicU64::new(0);
        let files = AtomicU64::new(0);
        let fps: Mutex<Vec<FastPaths>> = Mutex::new(Vec::new());
        let (src, dst, reflink) = (self.src.clone(), self.dst.clone(), self.fp.reflink);
        let refused = self.refused.clone();
        let walked = std::thread::scope(|sc| {
            for _ in 0..workers {
                sc.spawn(|| {
                    let mut fp = FastPaths::new(reflink);
                    loop {
                        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok(job) = job else { break };
                        if failed.load(Ordering::Relaxed) {
                            continue;
                        }
                        match copy_job(&job, &src, &dst, &mut fp) {
                            Ok(()) => {
                                let len = job.md.len();
                                let b = bytes.fetch_add(len, Ordering::Relaxed) + len;
                                let f = files.fetch_add(1, Ordering::Relaxed) + 1;
                                progress.copied(b, f);
                            }
                            Err(e) if gone_err(&e) => note_err(&refused, &e),
                            Err(e) => {
                                failed.store(true, Ordering::Relaxed);
                                first_err
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .get_or_insert(e);
                            }
                        }
                    }
                    fps.lock().unwrap_or_else(|p| p.into_inner()).push(fp);
                });
            }
            self.pool = Some(Pool {
                tx,
                failed: failed.clone(),
            });
            let (sroot, droot) = (self.sroot.clone(), self.droot.clone());
            let r = self.copy_children(Path::new(""), sroot, droot, progress);
            self.pool = None; // closes the channel: the workers finish the queue and stop
            r
        });
        for fp in fps.into_inner().unwrap_or_else(|p| p.into_inner()) {
            self.fp.bytes_reflinked += fp.bytes_reflinked;
            self.fp.bytes_copy_range += fp.bytes_copy_range;
            self.fp.bytes_read_write += fp.bytes_read_write;
        }
        self.stats.files += files.load(Ordering::Relaxed);
        self.stats.bytes_copied += bytes.load(Ordering::Relaxed);
        self.refresh_fast_paths();
        if let Some(e) = first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        walked?;
        for rel in std::mem::take(&mut self.deferred_dirs) {
            match self.dir_meta(&rel, false) {
                Err(e) if gone_err(&e) => {}
                r => r?,
            }
        }
        self.dir_meta(Path::new(""), false)?;
        self.refresh_fast_paths();
        self.bulk_done = true;
        Ok(())
    }

    /// Copies the metadata of directory `rel` (both sides opened from their roots, no link
    /// followed; a directory missing in the copy is skipped).
    fn dir_meta(&self, rel: &Path, exact: bool) -> Result<(), CopyError> {
        let (sp, dp) = (self.s(rel), self.d(rel));
        let s = self.sroot.beneath(rel).map_err(|e| {
            self.note(&e);
            CopyError::read(&sp, e)
        })?;
        let d = match self.droot.beneath(rel) {
            Ok(d) => d,
            Err(e) if gone(&e) => {
                self.note(&e);
                return Ok(());
            }
            Err(e) => return Err(CopyError::write(&dp, e)),
        };
        let md = s.meta().map_err(|e| CopyError::read(&sp, e))?;
        fsops::apply_meta(
            (HandleRef::open(&s), &sp),
            (HandleRef::open(&d), &dp),
            &md,
            exact,
        )
    }

    /// Copies the entries of directory `rel`, open as `sdir`, into the copy's `ddir`.
    fn copy_children(
        &mut self,
        rel: &Path,
        sdir: Arc<Dir>,
        ddir: Arc<Dir>,
        progress: &dyn Progress,
    ) -> Result<(), CopyError> {
        let names = match sdir.names() {
            Ok(n) => n,
            Err(e) if gone(&e) => return Ok(()),
            Err(e) => return Err(CopyError::read(self.s(rel), e)),
        };
        for n in names {
            if self.pool.as_ref().is_some_and(Pool::failed) {
                return Ok(()); // a worker failed: bulk() reports its error
            }
            let crel = rel.join(entry_name(&n));
            if is_marker(&crel) {
                continue; // never the LC's: the copy's own marker lives there
            }
            let md = match sdir.stat(&n) {
                Ok(md) => md,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(CopyError::read(self.s(&crel), e)),
            };
            match self.copy_fresh(&crel, (&sdir, &n), (&ddir, &n), &md, progress) {
                Err(e) if gone_err(&e) => continue,
                r => r?,
            }
        }
        Ok(())
    }

    /// Creates `rel` (`dname` in `ddir`, which must not exist) like the source's `sname` in
    /// `sdir`, whose listing said `md`, recursively.
    fn copy_fresh(
        &mut self,
        rel: &Path,
        (sdir, sname): (&Arc<Dir>, &CStr),
        (ddir, dname): (&Arc<Dir>, &CStr),
        md: &Meta,
        progress: &dyn Progress,
    ) -> Result<(), CopyError> {
        let (sp, dp) = (self.s(rel), self.d(rel));
        let refused = self.refused.clone();
        let rd = |e: io::Error| {
            note(&refused, &e);
            CopyError::read(&sp, e)
        };
        if md.is_dir() {
            ddir.mkdir(dname, 0o700)
                .map_err(|e| CopyError::write(&dp, e))?;
            // A link swapped in since the listing is refused here: the trap has the swap.
            let s = Arc::new(sdir.sub(sname).map_err(rd)?);
            let d = Arc::new(ddir.sub(dname).map_err(|e| CopyError::write(&dp, e))?);
            let sm = s.meta().map_err(|e| CopyError::read(&sp, e))?;
            if sm.dev() == self.root_dev {
                self.copy_children(rel, s.clone(), d.clone(), progress)?;
            } else {
                tracing::warn!(path = %sp.display(), "not descending into another filesystem mounted in the source");
            }
            if self.pool.is_some() {
                // Files may still be in flight in the pool: their creation would move the times.
                self.deferred_dirs.push(rel.to_path_buf());
            } else {
                fsops::apply_meta(
                    (HandleRef::open(&*s), &sp),
                    (HandleRef::open(&*d), &dp),
                    &sm,
                    false,
                )?;
            }
            self.stats.dirs += 1;
            return Ok(());
        }
        let key = (md.dev(), md.ino());
        if md.nlink() > 1 && self.link_existing(rel, ddir, dname, key)? {
            if self.replaying {
                // The writes that brought us here may have gone through this very name: the
                // shared inode in the copy is brought up to date through it.
                self.sync(rel, CONTENT | META, progress)?;
            }
            self.stats.hardlinks += 1;
            if self.pool.is_none() {
                progress.copied(
                    self.stats.bytes_copied,
                    self.stats.files + self.stats.hardlinks,
                );
            }
            return Ok(());
        }
        if md.is_file()
            && md.nlink() == 1
            && let Some(pool) = &self.pool
        {
            // Hard-linked files stay on this thread: linking needs their first copy to exist.
            self.names.entry(key).or_default().push(rel.to_path_buf());
            let job = Job {
                sdir: sdir.clone(),
                ddir: ddir.clone(),
                name: sname.to_owned(),
                rel: rel.to_path_buf(),
                md: *md,
            };
            if pool.tx.send(job).is_err() {
                return Err(CopyError::WorkerDied);
            }
            return Ok(());
        }
        if md.is_file() {
            let (sf, df, sm) =
                fsops::copy_new_file((sdir, sname, &sp), (ddir, dname, &dp), &mut self.fp)?;
            if let Ok(dm) = tree::meta_of(&df) {
                self.hashes.remove(&(dm.dev(), dm.ino()));
            }
            fsops::apply_meta(
                (HandleRef::open(&sf), &sp),
                (HandleRef::open(&df), &dp),
                &sm,
                false,
            )?;
            self.stats.files += 1;
            self.stats.bytes_copied += md.len();
        } else if md.is_symlink() {
            // Copied as a link, its target bytes unchanged: never followed on either side.
            let target = sdir.readlink(sname).map_err(|e| rd(not_link(e)))?;
            ddir.symlink(&target, dname)
                .map_err(|e| CopyError::write(&dp, e))?;
            self.stats.symlinks += 1;
            self.meta_at((sdir, sname, &sp), (ddir, dname, &dp), md.kind(), false)?;
        } else if md.is_special() {
            ddir.mknod(dname, md.kind() | 0o600, md.rdev())
                .map_err(|e| CopyError::write(&dp, e))?;
            self.stats.specials += 1;
            self.meta_at((sdir, sname, &sp), (ddir, dname, &dp), md.kind(), false)?;
        } else {
            return Err(CopyError::UnknownDiskKind(sp));
        }
        self.names.entry(key).or_default().push(rel.to_path_buf());
        if self.pool.is_none() {
            // While the pool runs, its workers report (this thread's counts lag theirs).
            progress.copied(
                self.stats.bytes_copied,
                self.stats.files + self.stats.hardlinks,
            );
        }
        Ok(())
    }

    /// Applies the metadata of the source entry to the copy's, both through `O_PATH`
    /// descriptors (the entry is not opened: a link, a device, a FIFO). The source must still be
    /// of kind `kind`, else it changed under us (`ENOENT`: the trap has it).
    fn meta_at(
        &self,
        (sdir, sname, sp): (&Dir, &CStr, &Path),
        (ddir, dname, dp): (&Dir, &CStr, &Path),
        kind: u32,
        exact: bool,
    ) -> Result<(), CopyError> {
        let sh = sdir.handle(sname).map_err(|e| CopyError::read(sp, e))?;
        let sm = sh.as_ref().meta().map_err(|e| CopyError::read(sp, e))?;
        if sm.kind() != kind {
            if sm.is_symlink() {
                self.refused.fetch_add(1, Ordering::Relaxed);
            }
            return Err(CopyError::read(
                sp,
                io::Error::from_raw_os_error(libc::ENOENT),
            ));
        }
        let dh = ddir.handle(dname).map_err(|e| CopyError::write(dp, e))?;
        fsops::apply_meta((sh.as_ref(), sp), (dh.as_ref(), dp), &sm, exact)
    }

    /// The names in the copy of source inode `key` that still name it in the source.
    fn live_names(&self, key: (u64, u64)) -> Vec<PathBuf> {
        self.names
            .get(&key)
            .map(|v| {
                v.iter()
                    .filter(|n| {
                        self.stat_rel(Side::Src, n)
                            .map(|m| (m.dev(), m.ino()) == key)
                            .unwrap_or(false)
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Links `dname` in `ddir` (the copy's `rel`) to an existing name of the same source inode
    /// in the copy, if there is one.
    fn link_existing(
        &mut self,
        rel: &Path,
        ddir: &Dir,
        dname: &CStr,
        key: (u64, u64),
    ) -> Result<bool, CopyError> {
        let Some(names) = self.names.get(&key).cloned() else {
            return Ok(false);
        };
        let mut live = Vec::new();
        let mut found = None;
        for n in names {
            if n == rel {
                continue;
            }
            let same_src = self
                .stat_rel(Side::Src, &n)
                .map(|m| (m.dev(), m.ino()) == key)
                .unwrap_or(false);
            let in_dst = self
                .locate(Side::Dst, &n)
                .and_then(|(d, nm)| d.stat(&nm).map(|m| (d, nm, m)))
                .ok()
                .filter(|(_, _, m)| !m.is_dir());
            if same_src && let Some((d, nm, _)) = in_dst {
                if found.is_none() {
                    found = Some((d, nm));
                }
                live.push(n);
            }
        }
        let Some((odir, oname)) = found else {
            self.names.remove(&key);
            return Ok(false);
        };
        ddir.link_from(&odir, &oname, dname)
            .map_err(|e| CopyError::write(self.d(rel), e))?;
        live.push(rel.to_path_buf());
        self.names.insert(key, live);
        Ok(true)
    }

    /// Drains the trap and replays the history so far. Returns the number of trapped writes.
    pub fn round(&mut self, progress: &dyn Progress) -> Result<u64, CopyError> {
        let t = std::time::Instant::now();
        let events = self.trap.drain().map_err(|e| CopyError::Trap {
            path: self.src.clone(),
            source: e,
        })?;
        // After fanotify: every write seen there has its range in the log by now.
        if let Some(log) = &self.ranges {
            log.drain();
        }
        self.times.drain += t.elapsed();
        self.stats.rounds += 1;
        let n = events.len() as u64;
        let mut order: Vec<PathBuf> = Vec::new();
        let mut flags: HashMap<PathBuf, u8> = HashMap::new();
        let mut rescan = false;
        let mut expanded = Vec::with_capacity(events.len());
        for ev in events {
            match ev.inode {
                // Only the inode is known (its name went away): replay its other names.
                Some(key) => {
                    for rel in self.live_names(key) {
                        expanded.push(crate::trap::Event {
                            op: ev.op,
                            rel,
                            inode: None,
                        });
                    }
                }
                None => expanded.push(ev),
            }
        }
        for ev in &expanded {
            self.journal
                .append(ev.op.name(), None, &ev.rel)
                .map_err(|e| self.jerr(e))?;
            if !self.is_file && is_marker(&ev.rel) {
                continue; // the LC's entry of the marker's name is never copied
            }
            let f = match ev.op {
                Op::Overflow => {
                    rescan = true;
                    continue;
                }
                Op::Create | Op::MovedTo => REPLACE,
                Op::Delete | Op::MovedFrom => META,
                Op::Modify => CONTENT,
                Op::Attrib => META,
            };
            if matches!(ev.op, Op::Create | Op::MovedTo | Op::Delete | Op::MovedFrom)
                && let Some(p) = ev.rel.parent()
            {
                self.touched.insert(p.to_path_buf());
            }
            let slot = flags.entry(ev.rel.clone()).or_insert_with(|| {
                order.push(ev.rel.clone());
                0
            });
            *slot |= f;
        }
        self.stats.history_entries += n;
        self.replaying = true;
        let r = self.replay(&order, &flags, rescan, progress);
        self.replaying = false;
        r?;
        self.journal
            .append("round", Some((self.stats.rounds, n)), Path::new(""))
            .map_err(|e| self.jerr(e))?;
        self.journal.flush().map_err(|e| self.jerr(e))?;
        if let Some(log) = &self.ranges {
            log.end_round();
        }
        self.refresh_fast_paths();
        progress.replayed(
            self.stats.rounds,
            self.stats.history_entries,
            self.stats.bytes_replayed,
        );
        Ok(n)
    }

    fn replay(
        &mut self,
        order: &[PathBuf],
        flags: &HashMap<PathBuf, u8>,
        rescan: bool,
        progress: &dyn Progress,
    ) -> Result<(), CopyError> {
        for rel in order {
            let f = flags[rel];
            match self.sync(rel, f, progress) {
                Err(e) if gone_err(&e) => {} // vanished while we looked: its removal is queued
                r => r?,
            }
            self.stats.paths_replayed += 1;
        }
        if rescan {
            tracing::warn!("fanotify queue overflowed: comparing the whole tree");
            self.whole = true;
            let r = self.rescan(Path::new(""), progress);
            self.whole = false;
            r?;
        }
        self.fix_dirs()
    }

    /// Makes the copy's `rel` equal to the source's current `rel`.
    fn sync(&mut self, rel: &Path, flags: u8, progress: &dyn Progress) -> Result<(), CopyError> {
        if !self.is_file && is_marker(rel) {
            return Ok(()); // the LC's own entry of that name is never copied
        }
        let root = rel.as_os_str().is_empty();
        let (sp, dp) = (self.s(rel), self.d(rel));
        let (sdir, sname) = match self.locate(Side::Src, rel) {
            Ok(x) => x,
            // A link (or a file) where a directory was: `rel` is not in the source's tree any
            // more; the swap itself is an entry of its own.
            Err(e) if gone(&e) && !root => {
                self.note(&e);
                return self.remove(rel);
            }
            Err(e) => return Err(CopyError::read(&sp, e)),
        };
        let smd = match sdir.stat(&sname) {
            Ok(m) => m,
            Err(e) if gone(&e) && !root => return self.remove(rel),
            Err(e) => return Err(CopyError::read(&sp, e)),
        };
        let (ddir, dname) = match self.locate(Side::Dst, rel) {
            Ok(x) => x,
            Err(e) if gone(&e) => {
                // The parent is not in the copy yet, or is something else there (a link copied
                // from the source): copying the parent brings this entry along.
                self.note(&e);
                let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
                return self.sync(&parent, REPLACE, progress);
            }
            Err(e) => return Err(CopyError::write(&dp, e)),
        };
        let dmd = ddir.stat(&dname).ok();
        let same_kind = dmd.as_ref().is_some_and(|m| m.kind() == smd.kind());
        if !root && (flags & REPLACE != 0 || !same_kind) {
            self.remove_at(rel, &ddir, &dname)?;
            let before = self.stats.bytes_copied;
            self.copy_fresh(rel, (&sdir, &sname), (&ddir, &dname), &smd, progress)?;
            self.stats.bytes_replayed += self.stats.bytes_copied - before;
            if let Some(p) = rel.parent() {
                self.touched.insert(p.to_path_buf());
            }
            return Ok(());
        }
        if smd.is_dir() {
            self.touched.insert(rel.to_path_buf());
            return Ok(());
        }
        let Some(dmd) = dmd else {
            return Err(CopyError::write(
                &dp,
                io::Error::from_raw_os_error(libc::ENOENT),
            ));
        };
        if smd.is_file() {
            if flags & CONTENT != 0 || dmd.len() != smd.len() {
                self.diff_content(rel, (&sdir, &sname, &sp), (&ddir, &dname, &dp), &dmd)?;
            }
        } else if smd.is_symlink() {
            if sdir.readlink(&sname).ok() != ddir.readlink(&dname).ok() {
                self.remove_at(rel, &ddir, &dname)?;
                return self.copy_fresh(rel, (&sdir, &sname), (&ddir, &dname), &smd, progress);
            }
        } else if smd.rdev() != dmd.rdev() {
            self.remove_at(rel, &ddir, &dname)?;
            return self.copy_fresh(rel, (&sdir, &sname), (&ddir, &dname), &smd, progress);
        }
        if flags & (META | CONTENT) != 0 || !root {
            // Read from the source's inode now: the diff may have taken a while, and the times
            // must be the latest.
            self.meta_at((&sdir, &sname, &sp), (&ddir, &dname, &dp), dmd.kind(), true)?;
        }
        Ok(())
    }

    /// Makes the copy's regular file `rel` equal to the source's by block hashes: only the
    /// ranges the write-range log names, or the whole file where there is no log.
    fn diff_content(
        &mut self,
        rel: &Path,
        (sdir, sname, sp): (&Dir, &CStr, &Path),
        (ddir, dname, dp): (&Dir, &CStr, &Path),
        dmd: &Meta,
    ) -> Result<(), CopyError> {
        let sf = sdir.open_regular(sname, false).map_err(|e| {
            self.note(&e);
            CopyError::read(sp, e)
        })?;
        let df = ddir
            .open_regular(dname, true)
            .map_err(|e| CopyError::write(dp, e))?;
        let changed = self.changed(&sf, sp)?;
        let only = match &changed {
            Changed::Ranges(r) => Some(r.as_slice()),
            Changed::Whole => None,
        };
        let key = (dmd.dev(), dmd.ino());
        let mut h = self.hashes.remove(&key).unwrap_or_default();
        let mut ranges = Vec::new();
        let r = fsops::diff_fds(&sf, sp, &df, dp, &mut h, self.frozen, only, &mut |o, l| {
            ranges.push((o, l))
        });
        self.hashes.insert(key, h);
        let st = r?;
        self.stats.bytes_hashed += st.bytes_read;
        self.stats.bytes_replayed += st.bytes_written;
        self.times.read += st.read;
        self.times.write += st.write;
        for (o, l) in ranges {
            self.journal
                .append("ship", Some((o, l)), rel)
                .map_err(|e| self.jerr(e))?;
        }
        Ok(())
    }

    /// What may have changed in the opened source file since its last diff.
    fn changed(&self, sf: &fs::File, sp: &Path) -> Result<Changed, CopyError> {
        use std::os::unix::fs::MetadataExt;
        let Some(log) = self.ranges.as_ref().filter(|_| !self.whole) else {
            return Ok(Changed::Whole);
        };
        let md = sf.metadata().map_err(|e| CopyError::read(sp, e))?;
        if md.dev() != self.root_dev {
            return Ok(Changed::Whole);
        }
        Ok(log.take(md.ino()))
    }

    /// Removes the copy's `rel`, whatever it is. Nothing to do when a link stands on the way in
    /// the copy: `rel` is then not in the copy's tree (the link is replayed on its own).
    fn remove(&mut self, rel: &Path) -> Result<(), CopyError> {
        match self.locate(Side::Dst, rel) {
            Ok((d, n)) => self.remove_at(rel, &d, &n),
            Err(e) if gone(&e) => {
                self.note(&e);
                Ok(())
            }
            Err(e) => Err(CopyError::write(self.d(rel), e)),
        }
    }

    fn remove_at(&mut self, rel: &Path, ddir: &Dir, dname: &CStr) -> Result<(), CopyError> {
        ddir.remove_all(dname)
            .map_err(|e| CopyError::write(self.d(rel), e))?;
        if let Some(p) = rel.parent() {
            self.touched.insert(p.to_path_buf());
        }
        Ok(())
    }

    /// Compares a whole subtree (after a queue overflow): entries missing on either side are
    /// fixed, every file is diffed.
    fn rescan(&mut self, rel: &Path, progress: &dyn Progress) -> Result<(), CopyError> {
        self.sync(rel, CONTENT | META, progress)?;
        if self.is_file {
            return Ok(());
        }
        let s = match self.sroot.beneath(rel) {
            Ok(s) => s,
            Err(e) => {
                self.note(&e);
                return Ok(()); // not a directory (any more)
            }
        };
        let sn: BTreeSet<CString> = s.names().unwrap_or_default().into_iter().collect();
        let dn: BTreeSet<CString> = self
            .droot
            .beneath(rel)
            .and_then(|d| d.names())
            .unwrap_or_default()
            .into_iter()
            .collect();
        for n in dn.difference(&sn) {
            let crel = rel.join(entry_name(n));
            if !is_marker(&crel) {
                self.remove(&crel)?;
            }
        }
        for n in sn {
            let crel = rel.join(entry_name(&n));
            if !is_marker(&crel) {
                self.rescan(&crel, progress)?;
            }
        }
        self.touched.insert(rel.to_path_buf());
        Ok(())
    }

    /// Copies the metadata of every directory whose entries changed, deepest first (creating or
    /// removing an entry changes the directory's times).
    fn fix_dirs(&mut self) -> Result<(), CopyError> {
        let mut dirs: Vec<PathBuf> = std::mem::take(&mut self.touched).into_iter().collect();
        if self.is_file {
            return Ok(()); // an image file has no directories (its parent is not ours)
        }
        dirs.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for rel in dirs {
            if is_marker(&rel) {
                continue;
            }
            match self.dir_meta(&rel, true) {
                Err(e) if gone_err(&e) => {} // not a directory in the source (any more)
                r => r?,
            }
        }
        Ok(())
    }

    /// Flushes the copy to stable storage (when asked), then removes the incomplete marker.
    pub fn finish(mut self) -> Result<Stats, CopyError> {
        self.journal
            .append("done", None, Path::new(""))
            .map_err(|e| self.jerr(e))?;
        self.journal.flush().map_err(|e| self.jerr(e))?;
        if self.sync {
            self.droot
                .syncfs()
                .map_err(|e| CopyError::write(&self.dst, e))?;
        }
        let root = (!self.is_file).then(|| self.droot.meta().ok()).flatten();
        marker::finish(&self.marker, self.keep_history.as_deref())
            .map_err(|e| CopyError::write(&self.marker, e))?;
        if let Some(md) = root {
            // Removing the marker changed the root's times: put back what the copy had.
            HandleRef::open(&*self.droot)
                .set_times(md.atime(), md.mtime())
                .map_err(|e| CopyError::write(&self.dst, e))?;
        }
        self.refresh_fast_paths();
        Ok(self.stats.clone())
    }

    /// Counters kept outside `stats` so far (fast paths, refused links).
    pub fn refresh_fast_paths(&mut self) {
        self.stats.bytes_reflinked = self.fp.bytes_reflinked;
        self.stats.bytes_copy_range = self.fp.bytes_copy_range;
        self.stats.bytes_read_write = self.fp.bytes_read_write;
        self.stats.refused_links = self.refused.load(Ordering::Relaxed);
        self.stats.range_log = self.ranges.as_ref().is_some_and(RangeLog::exact);
    }
}
