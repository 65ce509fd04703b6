//! The write-range log (ext4 tracepoints): a cut reads only the bytes written since the last
//! round, not the whole modified file, and what the log cannot see (a shared `mmap`) is still
//! caught by the comparison at the cut.

mod common;

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{LoopFs, diff_trees};
use patchover_core::quiesce::NoWriters;
use patchover_disk::{CopyError, CopyOptions, FollowCopy, NoProgress};

const BIG: usize = 32 << 20;

/// A follow copy of `src` (one file `big` of 32 MiB) that replays only at checkpoints.
fn follow(base: &Path, ranges: bool) -> FollowCopy {
    let (src, dst) = (base.join("src"), base.join("dst"));
    fs::create_dir_all(&src).unwrap();
    let data: Vec<u8> = (0..BIG).map(|i| (i % 251) as u8).collect();
    fs::write(src.join("big"), data).unwrap();
    let opts = CopyOptions {
        sync: false,
        round_interval: Duration::from_secs(3600),
        ranges,
        ..CopyOptions::default()
    };
    let mut c = FollowCopy::start(&src, &dst, &opts, Arc::new(NoProgress)).unwrap();
    let cut = c.checkpoint(&mut NoWriters, true).unwrap();
    assert_eq!(cut.verified, Some(true));
    c
}

fn hashed(c: &FollowCopy) -> u64 {
    c.stats().unwrap().bytes_hashed
}

#[test]
fn a_write_in_the_middle_of_a_big_file_reaches_the_copy_reading_only_its_range() {
    let lfs = LoopFs::new("ext4", 128);
    let mut c = follow(&lfs.mnt, true);
    assert!(c.stats().unwrap().range_log, "ext4 reports write ranges");
    let src = lfs.mnt.join("src/big");
    let f = OpenOptions::new().write(true).open(&src).unwrap();
    let before = hashed(&c);
    f.write_all_at(&[0xAB; 100], (BIG / 2 + 10) as u64).unwrap();
    let cut = c.checkpoint(&mut NoWriters, true).unwrap();
    assert_eq!(cut.verified, Some(true), "{cut:?}");
    assert_eq!(hashed(&c) - before, 4096, "one block read, not {BIG} bytes");

    // A direct write, a punched hole, a shrinking and a growing truncate: each reaches the copy.
    let d = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&src)
        .unwrap();
    let mut buf = vec![0u8; 8192 + 4096];
    let at = buf.as_ptr().align_offset(4096);
    buf[at..at + 4096].fill(0xCD);
    d.write_all_at(&buf[at..at + 4096], 4096 * 100).unwrap();
    // SAFETY: fallocate on an open file with in-range arguments.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            4096 * 7,
            4096 * 3,
        )
    };
    assert_eq!(r, 0);
    let before = hashed(&c);
    let cut = c.checkpoint(&mut NoWriters, true).unwrap();
    assert_eq!(cut.verified, Some(true), "{cut:?}");
    assert!(hashed(&c) - before < 64 << 10, "{}", hashed(&c) - before);
    f.set_len((BIG / 4) as u64).unwrap();
    f.set_len(BIG as u64).unwrap();
    let cut = c.checkpoint(&mut NoWriters, true).unwrap();
    assert_eq!(cut.verified, Some(true), "{cut:?}");
    let rep = c.cut(&mut NoWriters).unwrap();
    assert!(rep.cut.unwrap().phases.read <= rep.duration);
    assert_eq!(
        diff_trees(&lfs.mnt.join("src"), &lfs.mnt.join("dst")),
        Vec::<String>::new()
    );
}

#[test]
fn a_write_through_a_shared_mmap_is_caught_by_the_comparison_at_the_cut() {
    let lfs = LoopFs::new("ext4", 128);
    let mut c = follow(&lfs.mnt, true);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(lfs.mnt.join("src/big"))
        .unwrap();
    // A write the log sees, and one through a shared mapping that neither fanotify nor the
    // tracepoints report, in the same file.
    f.write_all_at(&[1u8; 10], 4096).unwrap();
    mmap_write(&f, 20 << 20, 0x5A);
    match c.checkpoint(&mut NoWriters, true) {
        Err(CopyError::Mismatch(m)) => assert!(m.contains("big"), "{m}"),
        other => panic!("the mmap write went unnoticed: {other:?}"),
    }
}

#[test]
fn without_the_range_log_a_modified_file_is_read_whole() {
    let lfs = LoopFs::new("ext4", 128);
    let mut c = follow(&lfs.mnt, false);
    assert!(!c.stats().unwrap().range_log);
    let f = OpenOptions::new()
        .write(true)
        .open(lfs.mnt.join("src/big"))
        .unwrap();
    let before = hashed(&c);
    f.write_all_at(&[9u8; 10], 12345).unwrap();
    let cut = c.checkpoint(&mut NoWriters, true).unwrap();
    assert_eq!(cut.verified, Some(true));
    assert_eq!(hashed(&c) - before, BIG as u64);
}

/// Writes `byte` at `off` through a shared writable mapping and flushes it to the file.
fn mmap_write(f: &File, off: usize, byte: u8) {
    let page = 4096;
    let base = off / page * page;
    // SAFETY: a fresh shared mapping of one page of an open file that is that long.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            base as libc::off_t,
        );
        assert_ne!(p, libc::MAP_FAILED);
        *(p as *mut u8).add(off - base) = byte;
        assert_eq!(libc::msync(p, page, libc::MS_SYNC), 0);
        libc::munmap(p, page);
    }
}
