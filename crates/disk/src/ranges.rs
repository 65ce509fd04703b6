//! The byte ranges of writes, from the kernel's filesystem tracepoints.
//!
//! fanotify names the file a write went to, not the bytes, so without this a modified file is
//! read whole to find its changed blocks, and the freeze window of a cut grows with the size of
//! the files being written (a 1 GiB database under random writes: a 1 GiB read under the
//! freeze). ext4 (and iomap's direct I/O) report every data change at a tracepoint that carries
//! the inode and the byte range: a private tracing instance (tracefs `instances/`, nothing shared
//! with other users of tracing) enables them, filtered to the source's filesystem, and a thread
//! reads them into a map inode → ranges that replay takes a file's ranges from.
//!
//! Why this is enough to be exact:
//! - Buffered writes are reported at `write_end` (after the bytes are in the page cache); direct
//!   writes at `iomap_dio_complete`; hole punching, zeroing and allocation at their own entry
//!   points with their range; collapse/insert (data moves) as "from the offset to the end"; a
//!   shrinking truncate as "the whole file". Each of these comes *before* the `FAN_MODIFY` of the
//!   same write, so when a round has drained fanotify and then this log, every write whose
//!   `FAN_MODIFY` it saw has its range here, and the bytes of a range taken are in place.
//! - A range taken before its write's `FAN_MODIFY` arrived was read after the bytes were there;
//!   the later `FAN_MODIFY` finds no range and reads nothing.
//! - Ranges of inodes that no round asked for in [`KEEP_ROUNDS`] rounds (files outside the
//!   source, the copy's own writes) are dropped, and the inode is remembered: if it ever turns up
//!   in a round, it is read whole. Lost events (a full trace buffer) turn the whole copy back to
//!   whole-file reads.
//! - Writes through a shared writable `mmap` are reported neither here nor by fanotify; the
//!   comparison at a cut still finds them.
//!
//! Other filesystems, a DAX mount, or no tracefs: [`RangeLog::start`] returns `None` and replay
//! reads modified files whole, as before.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Rounds a range may wait for its file's `FAN_MODIFY` before it is dropped (and its inode read
/// whole if it ever comes).
pub const KEEP_ROUNDS: u64 = 4;

/// Trace buffer per CPU (KiB).
const BUFFER_KB: usize = 4096;

/// Ranges kept for one inode before it is read whole instead.
const MAX_RANGES: usize = 1 << 16;

/// Inodes remembered as dropped before the log gives up and reads every file whole.
const MAX_FORGOTTEN: usize = 1 << 20;

/// The mount points tracefs is found at.
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// ext4's superblock magic (`statfs.f_type`).
const EXT4_MAGIC: i64 = 0xEF53;

/// What changed in one file since its ranges were last taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    /// Unknown: read the whole file.
    Whole,
    /// Only these `(offset, length)` ranges (a length may reach past the end of the file).
    Ranges(Vec<(u64, u64)>),
}

/// The tracepoints enabled, and what each one's range is.
#[derive(Clone, Copy)]
enum Kind {
    /// `pos`, `len`, `copied` (buffered write, after the copy into the page cache).
    WriteEnd,
    /// `offset`, `len` (punch, zero, allocate).
    Span,
    /// `offset` to the end (collapse, insert: data moves).
    Tail,
    /// The whole file (a shrinking truncate).
    Whole,
    /// iomap's direct I/O completion (reads too): `offset` (hex, already advanced) and `ret`.
    Dio,
}

const EVENTS: [(&str, Kind); 10] = [
    ("ext4/ext4_da_write_end", Kind::WriteEnd),
    ("ext4/ext4_write_end", Kind::WriteEnd),
    ("ext4/ext4_journalled_write_end", Kind::WriteEnd),
    ("ext4/ext4_punch_hole", Kind::Span),
    ("ext4/ext4_zero_range", Kind::Span),
    ("ext4/ext4_fallocate_enter", Kind::Span),
    ("ext4/ext4_collapse_range", Kind::Tail),
    ("ext4/ext4_insert_range", Kind::Tail),
    ("ext4/ext4_truncate_enter", Kind::Whole),
    ("iomap/iomap_dio_complete", Kind::Dio),
];

fn kind_of(event: &str) -> Option<Kind> {
    EVENTS
        .iter()
        .find(|(path, _)| path.rsplit('/').next() == Some(event))
        .map(|(_, k)| *k)
}

/// One parsed record: the inode and what changed in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub dev: (u32, u32),
    pub ino: u64,
    pub change: Change,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Range(u64, u64),
    Whole,
}

fn num(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

fn signed(s: &str) -> Option<i64> {
    match s.strip_prefix('-') {
        Some(r) => num(r).map(|v| -(v as i64)),
        None => num(s).map(|v| v as i64),
    }
}

/// Parses one line of `trace_pipe` (`… event: key value key value …`). Lines of other events,
/// or that do not parse, give `None`.
pub fn parse_line(line: &str) -> Option<Record> {
    // The fields never hold ": "; the task's name before them may.
    let mut parts = line.rsplitn(3, ": ");
    let fields = parts.next()?;
    let event = parts.next()?.rsplit(' ').next()?;
    let kind = kind_of(event)?;
    let toks: Vec<&str> = fields.split_whitespace().collect();
    let get = |k: &str| toks.windows(2).find(|w| w[0] == k).map(|w| w[1]).ok_or(());
    let dev = get("dev").ok()?;
    let (ma, mi) = dev.split_once([',', ':'])?;
    let dev = (ma.parse().ok()?, mi.parse().ok()?);
    let ino = num(get("ino").ok()?)?;
    let field = |k: &str| get(k).ok().and_then(signed);
    let change = match kind {
        Kind::WriteEnd => {
            let pos = field("pos")?.max(0) as u64;
            let len = field("len")?.max(field("copied")?).max(0) as u64;
            Change::Range(pos, len)
        }
        Kind::Span => Change::Range(field("offset")?.max(0) as u64, field("len")?.max(0) as u64),
        Kind::Tail => {
            let off = field("offset")?.max(0) as u64;
            Change::Range(off, u64::MAX - off)
        }
        Kind::Whole => Change::Whole,
        Kind::Dio => {
            let ret = field("ret")?;
            // Reads complete here too, and the flags do not tell them apart on every kernel
            // (6.18 prints no WRITE for a write): a read's range is read again, harmlessly.
            if ret <= 0 {
                return None;
            }
            // The offset may or may not be advanced by `ret` yet: cover both.
            let off = field("offset")?.max(0) as u64;
            let ret = ret as u64;
            Change::Range(off.saturating_sub(ret), ret * 2)
        }
    };
    Some(Record { dev, ino, change })
}

#[derive(Default)]
struct Pending {
    ranges: Vec<(u64, u64)>,
    whole: bool,
    /// The round the newest of them was read in.
    round: u64,
}

struct Inner {
    /// `trace_pipe`; closed before the instance is removed.
    pipe: Option<File>,
    stats: Vec<PathBuf>,
    lost: u64,
    dev: (u32, u32),
    pending: HashMap<u64, Pending>,
    forgotten: HashSet<u64>,
    round: u64,
    /// Events were lost (or too many inodes were forgotten): every file is read whole.
    degraded: bool,
    carry: Vec<u8>,
    buf: Vec<u8>,
    /// Bytes of text one drain reads at most: more than the trace buffers hold.
    max_read: usize,
    /// The tracing instance.
    dir: PathBuf,
}

impl Inner {
    fn drain(&mut self) -> io::Result<()> {
        if self.degraded {
            return Ok(()); // every file is read whole: nothing to read here any more
        }
        let mut data = std::mem::take(&mut self.carry);
        if let Some(pipe) = self.pipe.as_mut() {
            // `trace_pipe` gives events oldest first over all CPUs, so everything recorded
            // before this call comes within the buffer's capacity: stop there, or a writer
            // faster than this loop would keep it reading forever.
            let mut left = self.max_read;
            while left > 0 {
                match pipe.read(&mut self.buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        data.extend_from_slice(&self.buf[..n]);
                        left = left.saturating_sub(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let end = data.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        for line in data[..end].split(|b| *b == b'\n') {
            self.add(line);
        }
        self.carry = data[end..].to_vec();
        let lost = lost_events(&self.stats)?;
        if lost != self.lost && !self.degraded {
            tracing::warn!(
                lost = lost - self.lost,
                "write-range events lost: modified files are read whole from now on"
            );
            self.degrade();
        }
        self.lost = lost;
        Ok(())
    }

    fn add(&mut self, line: &[u8]) {
        let Ok(line) = std::str::from_utf8(line) else {
            return;
        };
        let Some(r) = parse_line(line) else { return };
        if r.dev != self.dev {
            return;
        }
        let p = self.pending.entry(r.ino).or_default();
        p.round = self.round;
        match r.change {
            Change::Range(o, l) if !p.whole && p.ranges.len() < MAX_RANGES => p.ranges.push((o, l)),
            // So many writes that reading the whole file costs about the same (and a file
            // outside the source, such as the copy, never grows the map without bound).
            _ => {
                p.whole = true;
                p.ranges = Vec::new();
            }
        }
    }

    fn take(&mut self, ino: u64) -> Changed {
        let p = self.pending.remove(&ino);
        if self.forgotten.remove(&ino) || self.degraded {
            return Changed::Whole;
        }
        match p {
            Some(p) if p.whole => Changed::Whole,
            Some(p) => Changed::Ranges(p.ranges),
            None => Changed::Ranges(Vec::new()),
        }
    }

    fn end_round(&mut self) {
        self.round += 1;
        let old = self.round.saturating_sub(KEEP_ROUNDS);
        let forgotten = &mut self.forgotten;
        self.pending.retain(|ino, p| {
            if p.round < old {
                forgotten.insert(*ino);
                false
            } else {
                true
            }
        });
        if self.forgotten.len() > MAX_FORGOTTEN && !self.degraded {
            tracing::warn!("too many inodes written outside the copy: reading files whole");
            self.degrade();
        }
    }

    /// From now on every file is read whole: the events stop (writers no longer pay for them)
    /// and what was kept goes.
    fn degrade(&mut self) {
        self.degraded = true;
        let _ = fs::write(self.dir.join("tracing_on"), "0");
        self.pending = HashMap::new();
        self.forgotten = HashSet::new();
    }
}

/// Sum of the events a tracing instance lost, over its CPUs.
fn lost_events(stats: &[PathBuf]) -> io::Result<u64> {
    let mut n = 0;
    for p in stats {
        for line in fs::read_to_string(p)?.lines() {
            if let Some((k, v)) = line.split_once(':')
                && matches!(k.trim(), "overrun" | "commit overrun" | "dropped events")
            {
                n += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    Ok(n)
}

/// A private tracing instance reporting the write ranges of one filesystem.
pub struct RangeLog {
    inner: Arc<Mutex<Inner>>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    dir: PathBuf,
}

static INSTANCES: AtomicU64 = AtomicU64::new(0);

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RangeLog {
    /// Arms the log for the filesystem holding `root` (every write to it from now on is
    /// reported), or `None` where it cannot report every write (not ext4, a DAX mount, no
    /// tracefs or no permission): the caller then reads modified files whole.
    pub fn start(root: &Path) -> Option<RangeLog> {
        match Self::try_start(root) {
            Ok(log) => log,
            Err(e) => {
                tracing::info!(error = %e, "no write-range log: modified files are read whole");
                None
            }
        }
    }

    fn try_start(root: &Path) -> io::Result<Option<RangeLog>> {
        let md = fs::metadata(root)?;
        if fs_magic(root)? != EXT4_MAGIC || is_dax(md.dev())? {
            return Ok(None);
        }
        let Some(base) = TRACEFS
            .iter()
            .map(Path::new)
            .find(|p| p.join("instances").is_dir())
        else {
            return Ok(None);
        };
        remove_stale(&base.join("instances"));
        let dir = base.join("instances").join(format!(
            "patchover-{}-{}",
            std::process::id(),
            INSTANCES.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&dir)?;
        let log = Self::arm(&dir, md.dev());
        if log.is_err() {
            let _ = fs::remove_dir(&dir);
        }
        log.map(Some)
    }

    fn arm(dir: &Path, st_dev: u64) -> io::Result<RangeLog> {
        let dev = (libc::major(st_dev), libc::minor(st_dev));
        let kdev = (u64::from(dev.0) << 20) | u64::from(dev.1);
        fs::write(dir.join("buffer_size_kb"), BUFFER_KB.to_string())?;
        let _ = fs::write(dir.join("options/context-info"), "0");
        for (ev, _) in EVENTS {
            let e = dir.join("events").join(ev);
            let filter = format!("dev == {kdev}");
            fs::write(e.join("filter"), filter)?;
            fs::write(e.join("enable"), "1")?;
        }
        let pipe = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(dir.join("trace_pipe"))?;
        let mut stats = Vec::new();
        for e in fs::read_dir(dir.join("per_cpu"))? {
            stats.push(e?.path().join("stats"));
        }
        let mut inner = Inner {
            pipe: Some(pipe),
            lost: 0,
            stats: stats.clone(),
            dev,
            pending: HashMap::new(),
            forgotten: HashSet::new(),
            round: 0,
            degraded: false,
            carry: Vec::new(),
            buf: vec![0u8; 256 * 1024],
            // A text line is under twice its binary event (four times with the context).
            max_read: BUFFER_KB * 1024 * 8 * stats.len().max(1),
            dir: dir.to_path_buf(),
        };
        inner.lost = lost_events(&inner.stats)?;
        let inner = Arc::new(Mutex::new(inner));
        let stop = Arc::new(AtomicBool::new(false));
        let (i2, s2) = (inner.clone(), stop.clone());
        let reader = std::thread::Builder::new()
            .name("disk-ranges".into())
            .spawn(move || {
                while !s2.load(Ordering::Relaxed) {
                    if let Err(e) = lock(&i2).drain() {
                        tracing::warn!(error = %e, "write-range log unreadable: files are read whole");
                        lock(&i2).degrade();
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })?;
        Ok(RangeLog {
            inner,
            stop,
            reader: Some(reader),
            dir: dir.to_path_buf(),
        })
    }

    /// Reads every event so far. Call after draining fanotify: the ranges of every write whose
    /// `FAN_MODIFY` was seen are then here.
    pub fn drain(&self) {
        let mut g = lock(&self.inner);
        if let Err(e) = g.drain() {
            tracing::warn!(error = %e, "write-range log unreadable: files are read whole");
            g.degrade();
        }
    }

    /// What changed in source inode `ino` since its ranges were last taken.
    pub fn take(&self, ino: u64) -> Changed {
        lock(&self.inner).take(ino)
    }

    /// A round ended: ranges no round asked for in [`KEEP_ROUNDS`] rounds are dropped.
    pub fn end_round(&self) {
        lock(&self.inner).end_round();
    }

    /// False once events were lost: from then on every modified file is read whole.
    pub fn exact(&self) -> bool {
        !lock(&self.inner).degraded
    }
}

impl Drop for RangeLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        lock(&self.inner).pipe = None; // an instance with an open file cannot be removed
        remove_instance(&self.dir);
    }
}

fn remove_instance(dir: &Path) {
    for (ev, _) in EVENTS {
        let _ = fs::write(dir.join("events").join(ev).join("enable"), "0");
    }
    if let Err(e) = fs::remove_dir(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the tracing instance");
    }
}

/// Removes the instances of patchover processes that are gone (a crash leaves its instance).
fn remove_stale(instances: &Path) {
    let Ok(rd) = fs::read_dir(instances) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("patchover-"))
            .and_then(|r| r.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            remove_instance(&e.path());
        }
    }
}

fn fs_magic(p: &Path) -> io::Result<i64> {
    let c = crate::fsops::cstr(p)?;
    // SAFETY: zeroed statfs is a valid out-parameter; c is a valid C string.
    let mut sfs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &mut sfs) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sfs.f_type as i64)
}

/// Whether the filesystem of device `dev` is mounted with DAX (writes bypass `write_end`).
fn is_dax(dev: u64) -> io::Result<bool> {
    let want = format!("{}:{}", libc::major(dev), libc::minor(dev));
    let mi = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(mi.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(2) == Some(&want.as_str()) && l.contains("dax")
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_end_lines_give_their_range() {
        let r = parse_line("ext4_da_write_end: dev 7,3 ino 12 pos 8192 len 4096 copied 4096");
        assert_eq!(
            r,
            Some(Record {
                dev: (7, 3),
                ino: 12,
                change: Change::Range(8192, 4096)
            })
        );
        // With the context (task name with ": " in it) in front.
        let r = parse_line(
            "   a: b ext4_da_write_end-99 [001] ..... 1.0: ext4_write_end: dev 254,0 ino 5 pos 0 len 10 copied 3",
        )
        .unwrap();
        assert_eq!(r.change, Change::Range(0, 10));
    }

    #[test]
    fn truncate_collapse_and_direct_writes_are_covered() {
        let r = parse_line("ext4_truncate_enter: dev 7,3 ino 12 blocks 8").unwrap();
        assert_eq!(r.change, Change::Whole);
        let r = parse_line("ext4_collapse_range: dev 7,3 ino 12 offset 4096 len 4096").unwrap();
        assert_eq!(r.change, Change::Range(4096, u64::MAX - 4096));
        let r = parse_line(
            "iomap_dio_complete: dev 7:3 ino 0xc size 0x100000 offset 0x3000 flags DIRECT aio 0 error 0 ret 4096",
        )
        .unwrap();
        assert_eq!(r.change, Change::Range(0x2000, 8192));
        assert_eq!(
            parse_line(
                "iomap_dio_complete: dev 7:3 ino 0xc size 0x1 offset 0x3000 flags DIRECT aio 0 error -5 ret -5"
            ),
            None,
            "a failed direct write changed nothing"
        );
        assert_eq!(parse_line("sched_switch: prev_comm=x"), None);
    }
}
