//! A write trap without a copy: counts the writes made to a directory tree from a moment on.
//!
//! Why: a service declared stateless (`[service] stateless = true`) promises that its LC does
//! not write its application disk. The copy's own trap ends with its cut, but the old LC keeps
//! serving the connections it accepted after the switch; this is the same fanotify trap
//! ([`crate::trap`]), armed before the cut and read after the old LC's last connection, so
//! that a write in between is seen and reported, not lost unnoticed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::CopyError;
use crate::trap::{Event, Op, Trap};

/// How many example paths a [`WriteWatch`] keeps for its report.
const EXAMPLES: usize = 5;
/// How often the background thread empties the trap's queue.
const DRAIN_EVERY: Duration = Duration::from_millis(100);

/// What a [`WriteWatch`] has seen so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    /// Trapped writes (content, attributes, create, delete, rename). The kernel merges a
    /// file's identical events while they wait in the queue, so this counts changes, not
    /// write calls.
    pub writes: u64,
    /// The first few paths written, relative to the watched root (`.` is the root).
    pub paths: Vec<String>,
}

impl Seen {
    fn add(&mut self, events: Vec<Event>) {
        // An event that names only an inode is a write to a file with no name left (the trap
        // resolves a file with another name to that name): nothing any disk keeps, and, since
        // the trap marks the whole filesystem, as likely another program's deleted temporary
        // file as the tree's. The tree's own unlink of it was an event with its path.
        for e in events.into_iter().filter(|e| e.inode.is_none()) {
            self.writes += 1;
            if self.paths.len() >= EXAMPLES {
                continue;
            }
            let p = match e.op {
                Op::Overflow => "(anything: the trap's queue overflowed)".to_owned(),
                _ if e.rel.as_os_str().is_empty() => ".".to_owned(),
                _ => e.rel.to_string_lossy().into_owned(),
            };
            if !self.paths.contains(&p) {
                self.paths.push(p);
            }
        }
    }
}

struct Inner {
    trap: Trap,
    seen: Seen,
    error: Option<std::io::Error>,
}

/// An armed trap on a directory tree that only counts. The trap marks the whole filesystem
/// (see [`crate::trap`]), so a background thread (at a low priority) empties its queue every
/// 100 ms, keeping only what falls under the root: a queue left to grow would hold every
/// write the host makes on that filesystem.
pub struct WriteWatch {
    inner: Arc<Mutex<Inner>>,
    root: PathBuf,
    stop: Arc<AtomicBool>,
    worker: Option<JoinHandle<()>>,
}

impl WriteWatch {
    /// Arms the trap on the directory `root`; every write to the tree made after this returns
    /// is counted by [`WriteWatch::seen`].
    pub fn start(root: &Path) -> Result<WriteWatch, CopyError> {
        let canon = root
            .canonicalize()
            .map_err(|_| CopyError::SourceMissing(root.to_owned()))?;
        if !canon.is_dir() {
            return Err(CopyError::UnknownDiskKind(root.to_owned()));
        }
        let trap = Trap::start(&canon, false).map_err(|source| CopyError::Trap {
            path: canon.clone(),
            source,
        })?;
        let inner = Arc::new(Mutex::new(Inner {
            trap,
            seen: Seen::default(),
            error: None,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (i, s) = (inner.clone(), stop.clone());
        let worker = std::thread::Builder::new()
            .name("disk-watch".into())
            .spawn(move || drain_loop(&i, &s))
            .map_err(|_| CopyError::WorkerDied)?;
        Ok(WriteWatch {
            inner,
            root: canon,
            stop,
            worker: Some(worker),
        })
    }

    /// Every write trapped since [`WriteWatch::start`] (reads what is queued, never waits).
    pub fn seen(&mut self) -> Result<Seen, CopyError> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let trap_err = |source| CopyError::Trap {
            path: self.root.clone(),
            source,
        };
        if let Some(e) = g.error.take() {
            return Err(trap_err(e));
        }
        let events = g.trap.drain().map_err(trap_err)?;
        g.seen.add(events);
        Ok(g.seen.clone())
    }
}

impl Drop for WriteWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn drain_loop(inner: &Mutex<Inner>, stop: &AtomicBool) {
    // SAFETY: setpriority/gettid take plain integers; PRIO_PROCESS with a TID affects this thread.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10) };
    loop {
        // Woken often enough that dropping the watch does not wait for a whole period.
        for _ in 0..10 {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(DRAIN_EVERY / 10);
        }
        let mut g = inner.lock().unwrap_or_else(|p| p.into_inner());
        match g.trap.drain() {
            Ok(events) => g.seen.add(events),
            Err(e) => {
                g.error = Some(e);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs fanotify (root); skipped, and says so, without it.
    #[test]
    fn writes_under_the_root_are_counted_and_others_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("app");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("before"), b"x").unwrap();
        let mut w = match WriteWatch::start(&root) {
            Ok(w) => w,
            Err(e) => {
                eprintln!("skipped: {e}");
                return;
            }
        };
        // Reads and writes beside the root are not writes of the tree.
        let _ = std::fs::read(root.join("before")).unwrap();
        std::fs::write(dir.path().join("beside"), b"y").unwrap();
        // Nor a write to a file with no name left (another program's deleted temporary file).
        let mut tmp = std::fs::File::create(dir.path().join("tmp")).unwrap();
        std::fs::remove_file(dir.path().join("tmp")).unwrap();
        std::io::Write::write_all(&mut tmp, b"z").unwrap();
        assert_eq!(w.seen().unwrap(), Seen::default());
        std::fs::write(root.join("kv.log"), b"k=v\n").unwrap();
        let seen = w.seen().unwrap();
        assert!(seen.writes >= 1, "{seen:?}");
        assert_eq!(seen.paths, ["kv.log"]);
        // Counts keep adding up.
        std::fs::remove_file(root.join("before")).unwrap();
        let later = w.seen().unwrap();
        assert!(later.writes > seen.writes, "{later:?}");
        assert_eq!(later.paths, ["kv.log", "before"]);
    }

    #[test]
    fn only_a_directory_is_watched() {
        let dir = tempfile::tempdir().unwrap();
        let e = WriteWatch::start(&dir.path().join("gone")).err().unwrap();
        assert!(matches!(e, CopyError::SourceMissing(_)), "{e}");
        let f = dir.path().join("img");
        std::fs::write(&f, b"").unwrap();
        let e = WriteWatch::start(&f).err().unwrap();
        assert!(matches!(e, CopyError::UnknownDiskKind(_)), "{e}");
    }
}
