//! The copy engine: validation, bulk copy, and replay rounds of the write history.
//!
//! Replay is idempotent by design: a history entry does not carry data, it says "this path may
//! differ now", and replay makes the copy's entry equal to the source's *current* state (fresh
//! copy for a new or renamed entry, removal for a gone one, block-hash diff for modified content,
//! metadata for attribute changes). So entries can be coalesced, replayed more than once, and
//! replayed while the source keeps changing: anything that changes after a path was looked at
//! raises a new entry for the next round. Once writers are frozen, one more round leaves nothing
//! behind, which is what makes a cut exact.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, Metadata};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use crate::error::CopyError;
use crate::fsops::{self, FastPaths, Hashes};
use crate::journal::Journal;
use crate::marker;
use crate::trap::{Op, Trap};
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
}

const REPLACE: u8 = 1;
const CONTENT: u8 = 2;
const META: u8 = 4;

fn kind(md: &Metadata) -> u32 {
    md.mode() & libc::S_IFMT
}

/// The source entry vanished or changed kind under us (ELOOP: a symlink where `O_NOFOLLOW` met
/// it): the trap has recorded the change, replay copies what is there now.
fn gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)
    )
}

fn gone_err(e: &CopyError) -> bool {
    matches!(e, CopyError::ReadSource { source, .. } if gone(source))
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
            fs::remove_file(&dst).map_err(|e| CopyError::write(&dst, e))?;
        }
        Ok(dmd) => {
            if !dmd.is_dir() {
                return Err(CopyError::KindMismatch {
                    src_kind: "directory",
                    dst,
                });
            }
            let mut entries = fs::read_dir(&dst).map_err(|e| CopyError::write(&dst, e))?;
            if entries.next().is_some() {
                if !mark.exists() {
                    return Err(CopyError::DestinationNotEmpty(dst));
                }
                tracing::info!(dst = %dst.display(), "redoing an incomplete copy from scratch");
                for e in fs::read_dir(&dst).map_err(|e| CopyError::write(&dst, e))? {
                    let p = e.map_err(|e| CopyError::write(&dst, e))?.path();
                    if p == mark {
                        continue;
                    }
                    remove_any(&p).map_err(|e| CopyError::write(&p, e))?;
                }
            }
        }
        Err(_) if is_file => {}
        Err(_) => fs::create_dir(&dst).map_err(|e| CopyError::write(&dst, e))?,
    }
    if mark.exists() {
        fs::remove_dir_all(&mark).map_err(|e| CopyError::write(&mark, e))?;
    }
    marker::create(&mark, &src).map_err(|e| CopyError::write(&mark, e))?;
    Ok(Plan { src, dst, is_file })
}

fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// One running copy: source, destination, the armed trap and what replay knows.
pub struct Engine {
    pub src: PathBuf,
    pub dst: PathBuf,
    pub is_file: bool,
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
    /// Directories whose metadata waits for the pool.
    deferred_dirs: Vec<(PathBuf, Metadata)>,
}

/// The sending side of the bulk copy's worker pool.
struct Pool {
    tx: mpsc::SyncSender<(PathBuf, Metadata)>,
    failed: Arc<AtomicBool>,
}

impl Pool {
    fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }
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
        let root_dev = fs::metadata(&plan.src)
            .map_err(|e| CopyError::read(&plan.src, e))?
            .dev();
        Ok(Engine {
            src: plan.src,
            dst: plan.dst,
            is_file: plan.is_file,
            root_dev,
            marker,
            fp: FastPaths::new(opts.reflink),
            trap,
            journal,
            hashes: HashMap::new(),
            names: HashMap::new(),
            touched: BTreeSet::new(),
            stats: Stats::default(),
            keep_history: opts.keep_history.clone(),
            sync: opts.sync,
            replaying: false,
            frozen: false,
            bulk_done: false,
            pool: None,
            deferred_dirs: Vec::new(),
        })
    }

    fn s(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            self.src.clone()
        } else {
            self.src.join(rel)
        }
    }

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

    /// Counts what the bulk copy will move, for a progress bar with an ETA.
    pub fn scan(&self) -> (u64, u64) {
        fn walk(p: &Path, dev: u64, acc: &mut (u64, u64)) {
            let Ok(rd) = fs::read_dir(p) else { return };
            for e in rd.flatten() {
                let Ok(md) = e.metadata() else { continue };
                if md.is_dir() {
                    if md.dev() == dev {
                        walk(&e.path(), dev, acc);
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
            acc = (fs::metadata(&self.src).map(|m| m.len()).unwrap_or(0), 1);
        } else {
            walk(&self.src, self.root_dev, &mut acc);
        }
        acc
    }

    /// Copies the whole source once (writes during it are in the history). Regular files are
    /// copied by a pool of worker threads (one per CPU) while this thread walks the tree and makes
    /// directories, links and special files; directory metadata is applied once every file is in.
    pub fn bulk(&mut self, progress: &dyn Progress) -> Result<(), CopyError> {
        let md = fs::symlink_metadata(&self.src).map_err(|e| CopyError::read(&self.src, e))?;
        if self.is_file {
            self.copy_fresh(Path::new(""), &md, progress)?;
            self.refresh_fast_paths();
            self.bulk_done = true;
            return Ok(());
        }
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 8);
        let (tx, rx) = mpsc::sync_channel::<(PathBuf, Metadata)>(4096);
        let rx = Mutex::new(rx);
        let failed = Arc::new(AtomicBool::new(false));
        let first_err: Mutex<Option<CopyError>> = Mutex::new(None);
        let bytes = AtomicU64::new(0);
        let files = AtomicU64::new(0);
        let fps: Mutex<Vec<FastPaths>> = Mutex::new(Vec::new());
        let (src, dst, reflink) = (self.src.clone(), self.dst.clone(), self.fp.reflink);
        let walked = std::thread::scope(|sc| {
            for _ in 0..workers {
                sc.spawn(|| {
                    let mut fp = FastPaths::new(reflink);
                    loop {
                        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        let Ok((rel, md)) = job else { break };
                        if failed.load(Ordering::Relaxed) {
                            continue;
                        }
                        let (s, d) = (src.join(&rel), dst.join(&rel));
                        let r = fsops::copy_new_file(&s, &d, &mut fp)
                            .and_then(|_| fsops::apply_meta(&s, &d, &md, false));
                        match r {
                            Ok(()) => {
                                let b = bytes.fetch_add(md.len(), Ordering::Relaxed) + md.len();
                                let f = files.fetch_add(1, Ordering::Relaxed) + 1;
                                progress.copied(b, f);
                            }
                            Err(e) if gone_err(&e) => {}
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
            let r = self.copy_children(Path::new(""), progress);
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
        for (rel, md) in std::mem::take(&mut self.deferred_dirs) {
            match fsops::apply_meta(&self.s(&rel), &self.d(&rel), &md, false) {
                Err(e) if gone_err(&e) => {}
                r => r?,
            }
        }
        fsops::apply_meta(&self.src, &self.dst, &md, false)?;
        self.bulk_done = true;
        Ok(())
    }

    fn copy_children(&mut self, rel: &Path, progress: &dyn Progress) -> Result<(), CopyError> {
        let s = self.s(rel);
        let rd = match fs::read_dir(&s) {
            Ok(rd) => rd,
            Err(e) if gone(&e) => return Ok(()),
            Err(e) => return Err(CopyError::read(&s, e)),
        };
        for ent in rd {
            if self.pool.as_ref().is_some_and(Pool::failed) {
                return Ok(()); // a worker failed: bulk() reports its error
            }
            let ent = ent.map_err(|e| CopyError::read(&s, e))?;
            let crel = rel.join(ent.file_name());
            let md = match fs::symlink_metadata(self.s(&crel)) {
                Ok(md) => md,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(CopyError::read(self.s(&crel), e)),
            };
            match self.copy_fresh(&crel, &md, progress) {
                Err(e) if gone_err(&e) => continue,
                r => r?,
            }
        }
        Ok(())
    }

    /// Creates `rel` in the copy (it must not exist there) like the source, recursively.
    fn copy_fresh(
        &mut self,
        rel: &Path,
        md: &Metadata,
        progress: &dyn Progress,
    ) -> Result<(), CopyError> {
        let (s, d) = (self.s(rel), self.d(rel));
        let ft = md.file_type();
        if ft.is_dir() {
            fs::create_dir(&d).map_err(|e| CopyError::write(&d, e))?;
            if md.dev() == self.root_dev {
                self.copy_children(rel, progress)?;
            } else {
                tracing::warn!(path = %s.display(), "not descending into another filesystem mounted in the source");
            }
            if self.pool.is_some() {
                // Files may still be in flight in the pool: their creation would move the times.
                self.deferred_dirs.push((rel.to_path_buf(), md.clone()));
            } else {
                fsops::apply_meta(&s, &d, md, false)?;
            }
            self.stats.dirs += 1;
            return Ok(());
        }
        let key = (md.dev(), md.ino());
        if md.nlink() > 1 && self.link_existing(rel, key)? {
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
        if ft.is_file()
            && md.nlink() == 1
            && let Some(pool) = &self.pool
        {
            // Hard-linked files stay on this thread: linking needs their first copy to exist.
            self.names.entry(key).or_default().push(rel.to_path_buf());
            if pool.tx.send((rel.to_path_buf(), md.clone())).is_err() {
                return Err(CopyError::WorkerDied);
            }
            return Ok(());
        }
        if ft.is_file() {
            let df = fsops::copy_new_file(&s, &d, &mut self.fp)?;
            if let Ok(dm) = df.metadata() {
                self.hashes.remove(&(dm.dev(), dm.ino()));
            }
            drop(df);
            self.stats.files += 1;
            self.stats.bytes_copied += md.len();
        } else if ft.is_symlink() {
            let target = fs::read_link(&s).map_err(|e| CopyError::read(&s, e))?;
            std::os::unix::fs::symlink(&target, &d).map_err(|e| CopyError::write(&d, e))?;
            self.stats.symlinks += 1;
        } else if fsops::is_special(&ft) {
            fsops::make_node(&d, md).map_err(|e| CopyError::write(&d, e))?;
            self.stats.specials += 1;
        } else {
            return Err(CopyError::UnknownDiskKind(s));
        }
        fsops::apply_meta(&s, &d, md, false)?;
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

    /// The names in the copy of source inode `key` that still name it in the source.
    fn live_names(&self, key: (u64, u64)) -> Vec<PathBuf> {
        self.names
            .get(&key)
            .map(|v| {
                v.iter()
                    .filter(|n| {
                        fs::symlink_metadata(self.s(n))
                            .map(|m| (m.dev(), m.ino()) == key)
                            .unwrap_or(false)
                    })
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Links `rel` to an existing name of the same source inode in the copy, if there is one.
    fn link_existing(&mut self, rel: &Path, key: (u64, u64)) -> Result<bool, CopyError> {
        let Some(names) = self.names.get(&key).cloned() else {
            return Ok(false);
        };
        let mut live = Vec::new();
        let mut found = None;
        for n in names {
            if n == rel {
                continue;
            }
            let same_src = fs::symlink_metadata(self.s(&n))
                .map(|m| (m.dev(), m.ino()) == key)
                .unwrap_or(false);
            let in_dst = fs::symlink_metadata(self.d(&n))
                .map(|m| !m.is_dir())
                .unwrap_or(false);
            if same_src && in_dst {
                if found.is_none() {
                    found = Some(n.clone());
                }
                live.push(n);
            }
        }
        let Some(existing) = found else {
            self.names.remove(&key);
            return Ok(false);
        };
        let d = self.d(rel);
        fs::hard_link(self.d(&existing), &d).map_err(|e| CopyError::write(&d, e))?;
        live.push(rel.to_path_buf());
        self.names.insert(key, live);
        Ok(true)
    }

    /// Drains the trap and replays the history so far. Returns the number of trapped writes.
    pub fn round(&mut self, progress: &dyn Progress) -> Result<u64, CopyError> {
        let events = self.trap.drain().map_err(|e| CopyError::Trap {
            path: self.src.clone(),
            source: e,
        })?;
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
            self.rescan(Path::new(""), progress)?;
        }
        self.fix_dirs()
    }

    /// Makes the copy's `rel` equal to the source's current `rel`.
    fn sync(&mut self, rel: &Path, flags: u8, progress: &dyn Progress) -> Result<(), CopyError> {
        let (s, d) = (self.s(rel), self.d(rel));
        let smd = match fs::symlink_metadata(&s) {
            Ok(m) => m,
            Err(e) if gone(&e) && !rel.as_os_str().is_empty() => return self.remove(rel),
            Err(e) => return Err(CopyError::read(&s, e)),
        };
        if let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) {
            let pd = fs::symlink_metadata(self.d(parent));
            if !pd.map(|m| m.is_dir()).unwrap_or(false) {
                // The parent is not in the copy yet (or is something else): copying the parent
                // brings this entry along.
                return self.sync(parent, REPLACE, progress);
            }
        }
        let dmd = fs::symlink_metadata(&d).ok();
        let same_kind = dmd.as_ref().is_some_and(|m| kind(m) == kind(&smd));
        let root = rel.as_os_str().is_empty();
        if !root && (flags & REPLACE != 0 || !same_kind) {
            self.remove(rel)?;
            let before = self.stats.bytes_copied;
            self.copy_fresh(rel, &smd, progress)?;
            self.stats.bytes_replayed += self.stats.bytes_copied - before;
            if let Some(p) = rel.parent() {
                self.touched.insert(p.to_path_buf());
            }
            return Ok(());
        }
        let ft = smd.file_type();
        if ft.is_dir() {
            self.touched.insert(rel.to_path_buf());
            return Ok(());
        }
        let Some(dmd) = dmd else {
            return Err(CopyError::write(
                &d,
                io::Error::from_raw_os_error(libc::ENOENT),
            ));
        };
        if ft.is_file() {
            if flags & CONTENT != 0 || dmd.len() != smd.len() {
                let key = (dmd.dev(), dmd.ino());
                let mut h = self.hashes.remove(&key).unwrap_or_default();
                let mut ranges = Vec::new();
                let r =
                    fsops::diff_file(&s, &d, &mut h, self.frozen, &mut |o, l| ranges.push((o, l)));
                self.hashes.insert(key, h);
                let st = r?;
                self.stats.bytes_hashed += st.bytes_read;
                self.stats.bytes_replayed += st.bytes_written;
                for (o, l) in ranges {
                    self.journal
                        .append("ship", Some((o, l)), rel)
                        .map_err(|e| self.jerr(e))?;
                }
            }
        } else if ft.is_symlink() {
            if fs::read_link(&s).ok() != fs::read_link(&d).ok() {
                self.remove(rel)?;
                return self.copy_fresh(rel, &smd, progress);
            }
        } else if smd.rdev() != dmd.rdev() {
            self.remove(rel)?;
            return self.copy_fresh(rel, &smd, progress);
        }
        if flags & (META | CONTENT) != 0 || !root {
            // Re-read: the diff may have taken a while, and the times must be the latest.
            let smd = fs::symlink_metadata(&s).map_err(|e| CopyError::read(&s, e))?;
            fsops::apply_meta(&s, &d, &smd, true)?;
        }
        Ok(())
    }

    fn remove(&mut self, rel: &Path) -> Result<(), CopyError> {
        let d = self.d(rel);
        remove_any(&d).map_err(|e| CopyError::write(&d, e))?;
        if let Some(p) = rel.parent() {
            self.touched.insert(p.to_path_buf());
        }
        Ok(())
    }

    /// Compares a whole subtree (after a queue overflow): entries missing on either side are
    /// fixed, every file is diffed.
    fn rescan(&mut self, rel: &Path, progress: &dyn Progress) -> Result<(), CopyError> {
        self.sync(rel, CONTENT | META, progress)?;
        let s = self.s(rel);
        let Ok(md) = fs::symlink_metadata(&s) else {
            return Ok(());
        };
        if !md.is_dir() {
            return Ok(());
        }
        let list = |p: &Path| -> BTreeSet<std::ffi::OsString> {
            fs::read_dir(p)
                .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default()
        };
        let mut sn = list(&s);
        let dn = list(&self.d(rel));
        for n in dn.difference(&sn) {
            if rel.as_os_str().is_empty() && n == marker::MARKER {
                continue;
            }
            self.remove(&rel.join(n))?;
        }
        sn.retain(|n| !(rel.as_os_str().is_empty() && n == marker::MARKER));
        for n in sn {
            self.rescan(&rel.join(n), progress)?;
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
            let (s, d) = (self.s(&rel), self.d(&rel));
            let Ok(smd) = fs::symlink_metadata(&s) else {
                continue;
            };
            let dir_in_copy = fs::symlink_metadata(&d)
                .map(|m| m.is_dir())
                .unwrap_or(false);
            if smd.is_dir() && dir_in_copy {
                match fsops::apply_meta(&s, &d, &smd, true) {
                    Err(e) if gone_err(&e) => {}
                    r => r?,
                }
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
            let f = fs::File::open(if self.is_file {
                &self.dst
            } else {
                &self.marker
            })
            .map_err(|e| CopyError::write(&self.dst, e))?;
            // SAFETY: syncfs on an open fd.
            if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) } < 0 {
                return Err(CopyError::write(&self.dst, io::Error::last_os_error()));
            }
        }
        let root = fs::symlink_metadata(&self.dst).ok();
        marker::finish(&self.marker, self.keep_history.as_deref())
            .map_err(|e| CopyError::write(&self.marker, e))?;
        if let (false, Some(md)) = (self.is_file, root) {
            // Removing the marker changed the root's times: put back what the copy had.
            fsops::apply_meta(&self.dst, &self.dst, &md, false)?;
        }
        Ok(self.stats.clone())
    }

    /// Fast-path counters so far.
    pub fn refresh_fast_paths(&mut self) {
        self.stats.bytes_reflinked = self.fp.bytes_reflinked;
        self.stats.bytes_copy_range = self.fp.bytes_copy_range;
        self.stats.bytes_read_write = self.fp.bytes_read_write;
    }
}
