//! File-level operations: data copy with fast paths, metadata, xattrs, special files, block diffs.
//!
//! Data is copied with the cheapest mechanism that works, tried in order and remembered per copy
//! (one failed probe per run, not per file): `FICLONE` (a reflink shares the blocks, O(extents)),
//! then `copy_file_range` extent by extent (the kernel copies, holes found with
//! `SEEK_DATA`/`SEEK_HOLE` stay holes), then `pread`/`pwrite` over the same extents. Metadata is
//! applied after the data in the order that keeps it: owner first (chown clears set-id bits and
//! file capabilities), then mode, then xattrs, then timestamps last (every other change moves them).

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use xxhash_rust::xxh3::xxh3_128;

use crate::error::CopyError;
use crate::tree::{Dir, HandleRef, Meta};

/// Block size of the hash diff. 4 KiB matches the page size and the typical write size, so a
/// random 4 KiB write ships 4 KiB.
pub const BLOCK: usize = 4096;
const CHUNK: usize = 1 << 20;

/// How reflinks are used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Reflink {
    /// Reflink when the filesystem can, copy otherwise.
    #[default]
    Auto,
    /// Never reflink (always copy the bytes).
    Never,
}

/// Which fast paths still work for this copy, and what each one moved.
#[derive(Debug, Default, Clone)]
pub struct FastPaths {
    pub reflink: Reflink,
    reflink_broken: bool,
    cfr_broken: bool,
    pub bytes_reflinked: u64,
    pub bytes_copy_range: u64,
    pub bytes_read_write: u64,
}

impl FastPaths {
    pub fn new(reflink: Reflink) -> Self {
        FastPaths {
            reflink,
            ..FastPaths::default()
        }
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EOPNOTSUPP
                | libc::EXDEV
                | libc::EINVAL
                | libc::ENOTTY
                | libc::ENOSYS
                | libc::EBADF
        )
    )
}

pub fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Copies a regular file's data from `sname` in `sdir` into the new file `dname` in `ddir`
/// (which must not exist: a link there is not followed). Returns both open files, so the caller
/// applies metadata through the descriptors, and the source's `stat` when it was opened. `sp`/`dp`
/// name the files in errors only.
pub fn copy_new_file(
    (sdir, sname, sp): (&Dir, &CStr, &Path),
    (ddir, dname, dp): (&Dir, &CStr, &Path),
    fp: &mut FastPaths,
) -> Result<(File, File, Meta), CopyError> {
    let (sf, md) = sdir
        .open_regular_meta(sname, false)
        .map_err(|e| CopyError::read(sp, e))?;
    let df = ddir
        .create_file(dname, 0o600)
        .map_err(|e| CopyError::write(dp, e))?;
    copy_data(&sf, sp, &df, dp, md.len(), fp)?;
    Ok((sf, df, md))
}

/// Copies all data of `sf` (`len` bytes when it was opened) into the empty `df`, keeping holes.
pub fn copy_data(
    sf: &File,
    src: &Path,
    df: &File,
    dst: &Path,
    len: u64,
    fp: &mut FastPaths,
) -> Result<(), CopyError> {
    if len == 0 {
        return Ok(());
    }
    if fp.reflink == Reflink::Auto && !fp.reflink_broken {
        // SAFETY: FICLONE takes the source fd as its integer argument; both fds are open.
        let r = unsafe { libc::ioctl(df.as_raw_fd(), libc::FICLONE, sf.as_raw_fd()) };
        if r == 0 {
            fp.bytes_reflinked += len;
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if is_unsupported(&e) {
            fp.reflink_broken = true;
        } else {
            return Err(CopyError::write(dst, e));
        }
    }
    df.set_len(len).map_err(|e| CopyError::write(dst, e))?;
    let mut pos: i64 = 0;
    let end = len as i64;
    let mut buf: Vec<u8> = Vec::new();
    while pos < end {
        // SAFETY: lseek on an open fd has no memory effects.
        let data = unsafe { libc::lseek(sf.as_raw_fd(), pos, libc::SEEK_DATA) };
        let data = if data < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ENXIO) => break, // only a hole remains
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => pos,
                _ => return Err(CopyError::read(src, e)),
            }
        } else {
            data
        };
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(sf.as_raw_fd(), data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { end } else { hole.min(end) };
        if hole <= data {
            break;
        }
        copy_range(
            sf,
            src,
            df,
            dst,
            data as u64,
            (hole - data) as u64,
            fp,
            &mut buf,
        )?;
        pos = hole;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn copy_range(
    sf: &File,
    src: &Path,
    df: &File,
    dst: &Path,
    off: u64,
    len: u64,
    fp: &mut FastPaths,
    buf: &mut Vec<u8>,
) -> Result<(), CopyError> {
    let mut done = 0u64;
    if !fp.cfr_broken {
        while done < len {
            let mut so = (off + done) as i64;
            let mut doff = (off + done) as i64;
            let want = (len - done).min(1 << 30) as usize;
            // SAFETY: both offsets point to valid i64s; fds are open.
            let n = unsafe {
                libc::copy_file_range(sf.as_raw_fd(), &mut so, df.as_raw_fd(), &mut doff, want, 0)
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if is_unsupported(&e) && done == 0 {
                    fp.cfr_broken = true;
                    break;
                }
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                // copy_file_range cannot tell which side failed; ENOSPC/EDQUOT/EIO on write is
                // the usual case, a read error shows up again on the plain path.
                return Err(CopyError::write(dst, e));
            }
            if n == 0 {
                return Ok(()); // the source shrank under us: the history replays it
            }
            done += n as u64;
            fp.bytes_copy_range += n as u64;
        }
        if done >= len {
            return Ok(());
        }
    }
    buf.resize(CHUNK, 0);
    while done < len {
        let want = ((len - done) as usize).min(CHUNK);
        let n = sf
            .read_at(&mut buf[..want], off + done)
            .map_err(|e| CopyError::read(src, e))?;
        if n == 0 {
            return Ok(());
        }
        df.write_all_at(&buf[..n], off + done)
            .map_err(|e| CopyError::write(dst, e))?;
        done += n as u64;
        fp.bytes_read_write += n as u64;
    }
    Ok(())
}

/// Applies owner, mode, xattrs and timestamps of the source inode `s` (whose `stat` is `md`) to
/// the copy's inode `d`, both reached through descriptors. `exact_xattrs` also removes xattrs `d`
/// has and the source has not (needed on replay, not on a fresh copy). `sp`/`dp` name them in
/// errors only.
pub fn apply_meta(
    (s, sp): (HandleRef<'_>, &Path),
    (d, dp): (HandleRef<'_>, &Path),
    md: &Meta,
    exact_xattrs: bool,
) -> Result<(), CopyError> {
    let w = |e| CopyError::write(dp, e);
    d.chown(md.uid(), md.gid()).map_err(w)?;
    if !md.is_symlink() {
        d.chmod(md.mode() & 0o7777).map_err(w)?;
    }
    let names = s.list_xattrs().map_err(|e| CopyError::read(sp, e))?;
    for name in &names {
        let val = match s.get_xattr(name) {
            Ok(v) => v,
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => continue,
            Err(e) => return Err(CopyError::read(sp, e)),
        };
        d.set_xattr(name, &val).map_err(w)?;
    }
    if exact_xattrs {
        let have = d.list_xattrs().map_err(w)?;
        for name in have.iter().filter(|n| !names.contains(n)) {
            d.remove_xattr(name).map_err(w)?;
        }
    }
    d.set_times(md.atime(), md.mtime()).map_err(w)?;
    Ok(())
}

/// Block hashes of a destination file, as far as they are known (`None`: never read).
pub type Hashes = Vec<Option<u128>>;

/// What a diff shipped.
#[derive(Debug, Default, Clone, Copy)]
pub struct DiffStats {
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Time spent reading the source (and the copy, for blocks with no hash yet) and hashing.
    pub read: Duration,
    /// Time spent writing (and punching) changed blocks.
    pub write: Duration,
}

impl DiffStats {
    fn add(&mut self, o: &DiffStats) {
        self.bytes_read += o.bytes_read;
        self.bytes_written += o.bytes_written;
        self.read += o.read;
        self.write += o.write;
    }
}

/// Makes the existing regular file `df` equal to `sf` by comparing 4 KiB block hashes, writing
/// only the blocks that differ (all-zero blocks are punched as holes). `hashes` holds what is
/// known about `df` and is updated. `only`: the byte ranges that may have changed (from the
/// write-range log), or `None` to compare the whole file; a change of size adds the bytes
/// between the two sizes. Changed ranges are reported to `on_range`. `parallel` splits large
/// whole-file diffs over the CPUs. `src`/`dst` name the files in errors only.
#[allow(clippy::too_many_arguments)]
pub fn diff_fds(
    sf: &File,
    src: &Path,
    df: &File,
    dst: &Path,
    hashes: &mut Hashes,
    parallel: bool,
    only: Option<&[(u64, u64)]>,
    on_range: &mut dyn FnMut(u64, u64),
) -> Result<DiffStats, CopyError> {
    let slen = sf.metadata().map_err(|e| CopyError::read(src, e))?.len();
    let dlen = df.metadata().map_err(|e| CopyError::write(dst, e))?.len();
    if slen != dlen {
        df.set_len(slen).map_err(|e| CopyError::write(dst, e))?;
        let keep = (slen.min(dlen) as usize) / BLOCK;
        hashes.truncate(keep);
    }
    let nblocks = (slen as usize).div_ceil(BLOCK);
    hashes.resize(nblocks, None);
    let spans = match only {
        None => whole_spans(nblocks, slen, parallel),
        Some(r) => {
            let mut r = r.to_vec();
            if slen > dlen {
                r.push((dlen, slen - dlen));
            }
            block_spans(&r, slen)
        }
    };
    let threads = spans.len() > 1 && only.is_none();
    let wall = Instant::now();
    let mut results: Vec<SpanResult> = Vec::new();
    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        let mut rest: &mut [Option<u128>] = hashes;
        let mut first = 0usize;
        for (start, end) in spans {
            let (b0, b1) = (start as usize / BLOCK, (end as usize).div_ceil(BLOCK));
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(b0 - first);
            let (mine, tail) = tail.split_at_mut(b1 - b0);
            rest = tail;
            first = b1;
            if threads {
                handles.push(scope.spawn(move || diff_span(sf, src, df, dst, mine, start, end)));
            } else {
                results.push(diff_span(sf, src, df, dst, mine, start, end));
            }
        }
        for h in handles {
            results.push(h.join().unwrap_or(Err(CopyError::WorkerDied)));
        }
    });
    let wall = wall.elapsed();
    let mut st = DiffStats::default();
    for r in results {
        let (s, ranges) = r?;
        st.add(&s);
        for (o, l) in ranges {
            on_range(o, l);
        }
    }
    if threads {
        // Threads' times overlap: split the wall time in their proportion.
        let busy = (st.read + st.write).as_secs_f64().max(1e-9);
        st.write = wall.mul_f64(st.write.as_secs_f64() / busy);
        st.read = wall.saturating_sub(st.write);
    }
    Ok(st)
}

/// The whole file as spans, one per thread when `parallel` and the file is large (while the
/// writers are frozen at a cut, the scan is the freeze window, and the cores are otherwise idle).
fn whole_spans(nblocks: usize, slen: u64, parallel: bool) -> Vec<(u64, u64)> {
    let threads = if parallel && slen >= PARALLEL_MIN {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(8)
    } else {
        1
    };
    let per = (nblocks.div_ceil(threads).div_ceil(CHUNK / BLOCK) * (CHUNK / BLOCK)).max(1);
    (0..nblocks)
        .step_by(per)
        .map(|b| ((b * BLOCK) as u64, (((b + per) * BLOCK) as u64).min(slen)))
        .collect()
}

/// Byte ranges widened to whole blocks, clipped to `len`, sorted and merged.
pub fn block_spans(ranges: &[(u64, u64)], len: u64) -> Vec<(u64, u64)> {
    let b = BLOCK as u64;
    let mut v: Vec<(u64, u64)> = ranges
        .iter()
        .filter(|(o, l)| *l > 0 && *o < len)
        .map(|(o, l)| {
            (
                o / b * b,
                (o.saturating_add(*l).min(len).div_ceil(b) * b).min(len),
            )
        })
        .collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1.div_ceil(b) * b => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// What one thread's diff did, and the ranges it wrote.
type SpanResult = Result<(DiffStats, Vec<(u64, u64)>), CopyError>;

/// Files at least this large are diffed by several threads.
const PARALLEL_MIN: u64 = 64 << 20;

/// Diffs bytes `start..end` (block-aligned start) whose block hashes are `hashes`.
fn diff_span(
    sf: &File,
    src: &Path,
    df: &File,
    dst: &Path,
    hashes: &mut [Option<u128>],
    start: u64,
    end: u64,
) -> SpanResult {
    let mut st = DiffStats::default();
    let mut ranges = Vec::new();
    let mut on_range = |o, l| ranges.push((o, l));
    let size = ((end - start) as usize).div_ceil(BLOCK).max(1) * BLOCK;
    let mut sbuf = vec![0u8; CHUNK.min(size)];
    let mut dbuf = vec![0u8; CHUNK.min(size)];
    let zero = [0u8; BLOCK];
    let mut off = start;
    while off < end {
        let (t, w0) = (Instant::now(), st.write);
        let want = ((end - off) as usize).min(sbuf.len());
        let n = read_full(sf, &mut sbuf[..want], off).map_err(|e| CopyError::read(src, e))?;
        st.bytes_read += n as u64;
        if n == 0 {
            break;
        }
        let first = ((off - start) as usize) / BLOCK;
        let nb = n.div_ceil(BLOCK);
        let mut dst_read = false;
        // A run of consecutive changed blocks: (start block, end block).
        let mut run: Option<(usize, usize)> = None;
        for i in 0..nb {
            let b = &sbuf[i * BLOCK..((i + 1) * BLOCK).min(n)];
            let h = xxh3_128(b);
            let changed = match hashes[first + i] {
                Some(k) => k != h,
                None => {
                    if !dst_read {
                        let dn = read_full(df, &mut dbuf[..n], off)
                            .map_err(|e| CopyError::write(dst, e))?;
                        dbuf[dn..n].fill(0);
                        dst_read = true;
                    }
                    dbuf[i * BLOCK..((i + 1) * BLOCK).min(n)] != *b
                }
            };
            hashes[first + i] = Some(h);
            if changed {
                run = match run {
                    Some((s, e)) if e == i => Some((s, i + 1)),
                    Some((s, e)) => {
                        write_run(df, dst, &sbuf, off, s, e, n, &zero, &mut st, &mut on_range)?;
                        Some((i, i + 1))
                    }
                    None => Some((i, i + 1)),
                };
            }
        }
        if let Some((s, e)) = run {
            write_run(df, dst, &sbuf, off, s, e, n, &zero, &mut st, &mut on_range)?;
        }
        st.read += t.elapsed().saturating_sub(st.write - w0);
        off += n as u64;
    }
    Ok((st, ranges))
}

#[allow(clippy::too_many_arguments)]
fn write_run(
    df: &File,
    dst: &Path,
    sbuf: &[u8],
    off: u64,
    s: usize,
    e: usize,
    n: usize,
    zero: &[u8],
    st: &mut DiffStats,
    on_range: &mut dyn FnMut(u64, u64),
) -> Result<(), CopyError> {
    let t = Instant::now();
    let r = write_blocks(df, dst, sbuf, off, (s, e), n, zero, st, on_range);
    st.write += t.elapsed();
    r
}

#[allow(clippy::too_many_arguments)]
fn write_blocks(
    df: &File,
    dst: &Path,
    sbuf: &[u8],
    off: u64,
    (s, e): (usize, usize),
    n: usize,
    zero: &[u8],
    st: &mut DiffStats,
    on_range: &mut dyn FnMut(u64, u64),
) -> Result<(), CopyError> {
    let a = s * BLOCK;
    let b = (e * BLOCK).min(n);
    let data = &sbuf[a..b];
    let at = off + a as u64;
    on_range(at, data.len() as u64);
    if data.len().is_multiple_of(BLOCK) && data.chunks(BLOCK).all(|c| c == zero) {
        // SAFETY: fallocate on an open fd with in-range arguments.
        let r = unsafe {
            libc::fallocate(
                df.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                at as i64,
                data.len() as i64,
            )
        };
        if r == 0 {
            st.bytes_written += data.len() as u64;
            return Ok(());
        }
    }
    df.write_all_at(data, at)
        .map_err(|e| CopyError::write(dst, e))?;
    st.bytes_written += data.len() as u64;
    Ok(())
}

fn read_full(f: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::fs::OpenOptions;

    fn diff_file(
        src: &Path,
        dst: &Path,
        hashes: &mut Hashes,
        parallel: bool,
        on_range: &mut dyn FnMut(u64, u64),
    ) -> Result<DiffStats, CopyError> {
        let sf = File::open(src).unwrap();
        let df = OpenOptions::new().read(true).write(true).open(dst).unwrap();
        diff_fds(&sf, src, &df, dst, hashes, parallel, None, on_range)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn diff_ships_only_changed_blocks_and_follows_size_changes() {
        let d = tempfile::tempdir().unwrap();
        let (s, t) = (d.path().join("s"), d.path().join("t"));
        let mut data = pattern(10 * BLOCK + 100, 1);
        fs::write(&s, &data).unwrap();
        fs::write(&t, &data).unwrap();
        let mut h = Hashes::new();
        let mut ranges = Vec::new();
        // First diff: nothing known, copy compared byte for byte, nothing differs.
        let st = diff_file(&s, &t, &mut h, true, &mut |o, l| ranges.push((o, l))).unwrap();
        assert_eq!(st.bytes_written, 0);
        assert!(ranges.is_empty());
        // One block changes: exactly that block ships (from the hashes, without reading t).
        data[3 * BLOCK + 7] ^= 0xff;
        fs::write(&s, &data).unwrap();
        let st = diff_file(&s, &t, &mut h, true, &mut |o, l| ranges.push((o, l))).unwrap();
        assert_eq!(ranges, vec![((3 * BLOCK) as u64, BLOCK as u64)]);
        assert_eq!(st.bytes_written, BLOCK as u64);
        assert_eq!(fs::read(&t).unwrap(), data);
        // Grow with a tail, then shrink into the middle of a block.
        data.extend(pattern(3 * BLOCK, 9));
        fs::write(&s, &data).unwrap();
        diff_file(&s, &t, &mut h, true, &mut |_, _| {}).unwrap();
        assert_eq!(fs::read(&t).unwrap(), data);
        data.truncate(5 * BLOCK + 17);
        fs::write(&s, &data).unwrap();
        diff_file(&s, &t, &mut h, true, &mut |_, _| {}).unwrap();
        assert_eq!(fs::read(&t).unwrap(), data);
    }

    #[test]
    fn diff_punches_zeroed_blocks_as_holes() {
        let d = tempfile::tempdir().unwrap();
        let (s, t) = (d.path().join("s"), d.path().join("t"));
        let data = pattern(64 * BLOCK, 3);
        fs::write(&s, &data).unwrap();
        fs::write(&t, &data).unwrap();
        let mut h = Hashes::new();
        diff_file(&s, &t, &mut h, true, &mut |_, _| {}).unwrap();
        let mut zeroed = data.clone();
        zeroed[..32 * BLOCK].fill(0);
        fs::write(&s, &zeroed).unwrap();
        diff_file(&s, &t, &mut h, true, &mut |_, _| {}).unwrap();
        assert_eq!(fs::read(&t).unwrap(), zeroed);
        use std::os::unix::fs::MetadataExt;
        let alloc = fs::metadata(&t).unwrap().blocks() * 512;
        assert!(
            alloc <= 40 * BLOCK as u64,
            "zero blocks were written, not punched: {alloc}"
        );
    }

    #[test]
    fn large_files_are_diffed_in_parallel_spans() {
        let d = tempfile::tempdir().unwrap();
        let (s, t) = (d.path().join("s"), d.path().join("t"));
        let mut data = pattern((PARALLEL_MIN as usize) + 3 * BLOCK + 5, 7);
        fs::write(&s, &data).unwrap();
        fs::write(&t, &data).unwrap();
        let mut h = Hashes::new();
        diff_file(&s, &t, &mut h, true, &mut |_, _| {}).unwrap();
        for at in [0, 5 * BLOCK + 1, data.len() / 2 + 9, data.len() - 1] {
            data[at] ^= 0x5a;
        }
        fs::write(&s, &data).unwrap();
        let mut ranges = Vec::new();
        let st = diff_file(&s, &t, &mut h, true, &mut |o, l| ranges.push((o, l))).unwrap();
        assert_eq!(fs::read(&t).unwrap(), data);
        assert_eq!(ranges.len(), 4, "{ranges:?}");
        assert!(st.bytes_written <= 4 * BLOCK as u64);
    }

    #[test]
    fn ranges_merge_to_whole_blocks_within_the_file() {
        let b = BLOCK as u64;
        assert_eq!(
            block_spans(
                &[(5 * b + 1, 10), (b, 1), (0, 1), (5 * b, 3), (99 * b, 1)],
                6 * b
            ),
            vec![(0, 2 * b), (5 * b, 6 * b)]
        );
        assert_eq!(
            block_spans(&[(b, u64::MAX - b)], 3 * b + 7),
            vec![(b, 3 * b + 7)]
        );
    }

    #[test]
    fn a_diff_limited_to_ranges_reads_and_ships_only_those() {
        let d = tempfile::tempdir().unwrap();
        let (s, t) = (d.path().join("s"), d.path().join("t"));
        let mut data = pattern(64 * BLOCK, 3);
        fs::write(&s, &data).unwrap();
        fs::write(&t, &data).unwrap();
        // Two changes; only the second is named, plus a growth of the file.
        data[BLOCK] ^= 1;
        data[40 * BLOCK + 9] ^= 1;
        data.extend_from_slice(&[7u8; 100]);
        fs::write(&s, &data).unwrap();
        let sf = File::open(&s).unwrap();
        let df = OpenOptions::new().read(true).write(true).open(&t).unwrap();
        let mut h = Hashes::new();
        let mut shipped = Vec::new();
        let only = [((40 * BLOCK + 9) as u64, 1)];
        let st = diff_fds(&sf, &s, &df, &t, &mut h, false, Some(&only), &mut |o, l| {
            shipped.push((o, l))
        })
        .unwrap();
        let grown = (64 * BLOCK) as u64;
        assert_eq!(
            shipped,
            vec![((40 * BLOCK) as u64, BLOCK as u64), (grown, 100)]
        );
        assert_eq!(st.bytes_read, (BLOCK + 100) as u64, "{st:?}");
        let copy = fs::read(&t).unwrap();
        assert_eq!(copy[40 * BLOCK + 9], data[40 * BLOCK + 9]);
        assert_ne!(copy[BLOCK], data[BLOCK], "an unnamed range is not read");
    }
}
