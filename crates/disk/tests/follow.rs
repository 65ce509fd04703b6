//! Follow mode and cuts while a writer keeps changing the source, including a property test with
//! random workloads (writes, appends, truncates, renames, deletes, many small files, sparse files,
//! hard links, metadata). At every cut the copy must equal the frozen source, checked by the
//! test's own comparator.

mod common;

use common::{Gate, GateQ};

use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{LoopFs, diff_trees};
use patchover_disk::{CopyOptions, FollowCopy, NoProgress, is_incomplete};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Write { f: u8, off: u32, len: u16, b: u8 },
    Append { f: u8, len: u16 },
    Truncate { f: u8, len: u32 },
    Rename { a: u8, b: u8 },
    Delete { f: u8 },
    Many { d: u8, n: u16 },
    Sparse { f: u8, at: u32 },
    Link { a: u8, b: u8 },
    Chmod { f: u8, mode: u16 },
    Mkdir { d: u8 },
    RenameDir { a: u8, b: u8 },
    RmDir { d: u8 },
    Symlink { f: u8 },
}

fn file(root: &Path, f: u8) -> PathBuf {
    root.join(format!("d{}", f % 3)).join(format!("f{}", f % 7))
}

fn apply(root: &Path, op: &Op) {
    // Errors are expected (the target may not exist): a workload is a mix of whatever happens.
    let _ = (|| -> std::io::Result<()> {
        match *op {
            Op::Write { f, off, len, b } => {
                let fh = OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(false)
                    .open(file(root, f))?;
                fh.write_all_at(&vec![b; len as usize], off as u64 % (4 << 20))?;
            }
            Op::Append { f, len } => {
                let mut fh = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(file(root, f))?;
                std::io::Write::write_all(&mut fh, &vec![b'a'; len as usize])?;
            }
            Op::Truncate { f, len } => {
                OpenOptions::new()
                    .write(true)
                    .open(file(root, f))?
                    .set_len(len as u64 % (8 << 20))?;
            }
            Op::Rename { a, b } => fs::rename(file(root, a), file(root, b))?,
            Op::Delete { f } => fs::remove_file(file(root, f))?,
            Op::Many { d, n } => {
                let dir = root.join(format!("d{}", d % 3)).join("many");
                fs::create_dir_all(&dir)?;
                for i in 0..n {
                    fs::write(dir.join(format!("s{i}")), format!("{d}-{i}"))?;
                }
            }
            Op::Sparse { f, at } => {
                let fh = OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(false)
                    .open(file(root, f))?;
                fh.set_len((at as u64 % (64 << 20)) + 8192)?;
                fh.write_all_at(b"island", at as u64 % (64 << 20))?;
            }
            Op::Link { a, b } => fs::hard_link(file(root, a), file(root, b))?,
            Op::Chmod { f, mode } => fs::set_permissions(
                file(root, f),
                fs::Permissions::from_mode(mode as u32 & 0o777),
            )?,
            Op::Mkdir { d } => fs::create_dir(root.join(format!("d{}", d % 3)))?,
            Op::RenameDir { a, b } => fs::rename(
                root.join(format!("d{}", a % 3)),
                root.join(format!("d{}", b % 3)),
            )?,
            Op::RmDir { d } => fs::remove_dir_all(root.join(format!("d{}", d % 3)))?,
            Op::Symlink { f } => std::os::unix::fs::symlink(format!("f{}", f % 5), file(root, f))?,
        }
        Ok(())
    })();
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<u8>(), any::<u32>(), 1..20000u16, any::<u8>()).prop_map(|(f, off, len, b)| Op::Write { f, off, len, b }),
        2 => (any::<u8>(), 1..5000u16).prop_map(|(f, len)| Op::Append { f, len }),
        2 => (any::<u8>(), any::<u32>()).prop_map(|(f, len)| Op::Truncate { f, len }),
        2 => (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Op::Rename { a, b }),
        1 => any::<u8>().prop_map(|f| Op::Delete { f }),
        1 => (any::<u8>(), 1..400u16).prop_map(|(d, n)| Op::Many { d, n }),
        1 => (any::<u8>(), any::<u32>()).prop_map(|(f, at)| Op::Sparse { f, at }),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Op::Link { a, b }),
        1 => (any::<u8>(), any::<u16>()).prop_map(|(f, mode)| Op::Chmod { f, mode }),
        2 => any::<u8>().prop_map(|d| Op::Mkdir { d }),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Op::RenameDir { a, b }),
        1 => any::<u8>().prop_map(|d| Op::RmDir { d }),
        1 => any::<u8>().prop_map(|f| Op::Symlink { f }),
    ]
}

fn seed_tree(root: &Path) {
    for d in 0..3u8 {
        fs::create_dir_all(root.join(format!("d{d}"))).unwrap();
        for f in 0..7u8 {
            fs::write(file(root, d + 3 * f), vec![f; 3000 * f as usize]).unwrap();
        }
    }
    common::rich_tree(&root.join("rich"));
}

/// Runs `ops` (then cycles them) in a writer thread during a follow copy; checkpoints in the
/// middle and cuts at the end, comparing the trees at each cut with the writer frozen.
fn follow_with_workload(base: &Path, ops: Vec<Op>, checkpoints: usize) {
    let (src, dst) = (base.join("src"), base.join("dst"));
    fs::create_dir_all(&src).unwrap();
    seed_tree(&src);
    let gate = Arc::new(Gate::default());
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (gate, stop, src, ops) = (gate.clone(), stop.clone(), src.clone(), ops.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) && !ops.is_empty() {
                gate.run(|| apply(&src, &ops[i % ops.len()]));
                i += 1;
                if i >= ops.len() {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        })
    };
    let opts = CopyOptions {
        sync: false,
        round_interval: Duration::from_millis(20),
        ..CopyOptions::default()
    };
    let mut copy = FollowCopy::start(&src, &dst, &opts, Arc::new(NoProgress)).unwrap();
    let mut q = GateQ(gate.clone());
    for _ in 0..checkpoints {
        std::thread::sleep(Duration::from_millis(30));
        let cut = copy.checkpoint(&mut q, true).unwrap();
        assert_eq!(cut.verified, Some(true));
        assert!(
            is_incomplete(&dst),
            "a checkpoint is not the end of the copy"
        );
    }
    gate.hold(); // keep the writer frozen after the final cut
    let rep = copy.cut(&mut q).unwrap();
    let diffs = diff_trees(&src, &dst);
    gate.release();
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    assert_eq!(
        diffs,
        Vec::<String>::new(),
        "copy differs from the frozen source at the cut"
    );
    assert!(!is_incomplete(&dst));
    assert!(rep.cut.is_some());
}

#[test]
fn follow_copy_is_identical_at_every_cut() {
    let lfs = LoopFs::new("ext4", 512);
    let mut ops = Vec::new();
    let mut x: u32 = 12345;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    for _ in 0..400 {
        let r = next();
        let a = (r >> 8) as u8;
        let b = (r >> 16) as u8;
        ops.push(match r % 10 {
            0..=3 => Op::Write {
                f: a,
                off: next(),
                len: 4096,
                b,
            },
            4 => Op::Rename { a, b },
            5 => Op::Many { d: a, n: 50 },
            6 => Op::Truncate { f: a, len: next() },
            7 => Op::Link { a, b },
            8 => Op::Mkdir { d: a },
            _ => Op::Delete { f: a },
        });
    }
    follow_with_workload(&lfs.mnt, ops, 4);
}

#[test]
fn follow_copy_of_an_image_file_under_random_writes() {
    let lfs = LoopFs::new("ext4", 256);
    let src = lfs.mnt.join("disk.img");
    let f = fs::File::create(&src).unwrap();
    f.set_len(32 << 20).unwrap();
    drop(f);
    let gate = Arc::new(Gate::default());
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (gate, stop, src) = (gate.clone(), stop.clone(), src.clone());
        std::thread::spawn(move || {
            let fh = OpenOptions::new().write(true).open(&src).unwrap();
            let mut x: u64 = 99;
            while !stop.load(Ordering::SeqCst) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let off = (x >> 20) % (8192 - 1) * 4096;
                gate.run(|| fh.write_all_at(&[(x >> 8) as u8; 4096], off).unwrap());
            }
        })
    };
    let dst = lfs.mnt.join("copy.img");
    let opts = CopyOptions {
        sync: false,
        round_interval: Duration::from_millis(20),
        ..CopyOptions::default()
    };
    let mut copy = FollowCopy::start(&src, &dst, &opts, Arc::new(NoProgress)).unwrap();
    let mut q = GateQ(gate.clone());
    let mut shipped = 0;
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(50));
        let cut = copy.checkpoint(&mut q, true).unwrap();
        assert_eq!(cut.verified, Some(true));
        shipped += cut.bytes_shipped;
    }
    gate.hold();
    let rep = copy.cut(&mut q).unwrap();
    let same = fs::read(&src).unwrap() == fs::read(&dst).unwrap();
    gate.release();
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    assert!(same, "image differs at the cut");
    assert!(rep.stats.history_entries > 0);
    assert!(rep.stats.bytes_replayed > 0, "{rep:?}");
    // Block diffs ship what changed, not the whole image each time.
    assert!(shipped < 3 * (32 << 20), "shipped {shipped}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, max_shrink_iters: 64, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn random_workloads_are_identical_at_the_cut(ops in proptest::collection::vec(op_strategy(), 20..150)) {
        // One scratch filesystem per case, unmounted when the case ends (a static would leak).
        let lfs = LoopFs::new("ext4", 512);
        follow_with_workload(&lfs.mnt, ops, 1);
    }
}

fn quiet_copy(base: &Path) -> (PathBuf, PathBuf, FollowCopy) {
    let (src, dst) = (base.join("src"), base.join("dst"));
    fs::create_dir_all(&src).unwrap();
    (src.clone(), dst.clone(), {
        fs::create_dir_all(src.join("d0")).unwrap();
        fs::create_dir_all(src.join("d1")).unwrap();
        fs::write(src.join("d0/f"), vec![1u8; 10000]).unwrap();
        fs::hard_link(src.join("d0/f"), src.join("d1/g")).unwrap();
        let opts = CopyOptions {
            sync: false,
            round_interval: Duration::from_secs(3600), // only the checkpoints replay
            ..CopyOptions::default()
        };
        let mut c = FollowCopy::start(&src, &dst, &opts, Arc::new(NoProgress)).unwrap();
        c.checkpoint(&mut patchover_core::quiesce::NoWriters, true)
            .unwrap();
        c
    })
}

/// Regression (found by the property test): a write through a hard-link name whose directory is
/// removed before the trap reads the event must still reach the inode's other names.
#[test]
fn r_write_through_a_link_in_a_removed_dir_reaches_the_other_name() {
    let lfs = LoopFs::new("ext4", 64);
    let (src, dst, mut c) = quiet_copy(&lfs.mnt);
    OpenOptions::new()
        .write(true)
        .open(src.join("d0/f"))
        .unwrap()
        .write_all_at(&[7u8; 5000], 8000)
        .unwrap();
    fs::remove_dir_all(src.join("d0")).unwrap();
    let cut = c
        .checkpoint(&mut patchover_core::quiesce::NoWriters, true)
        .unwrap();
    assert_eq!(cut.verified, Some(true));
    assert_eq!(
        fs::read(dst.join("d1/g")).unwrap(),
        fs::read(src.join("d1/g")).unwrap()
    );
    assert_eq!(diff_trees(&src, &dst), Vec::<String>::new());
}

/// Regression (found by the property test): a new hard link written through in the same round
/// is linked in the copy and brought up to date through its new name.
#[test]
fn r_new_link_written_through_in_the_same_round() {
    let lfs = LoopFs::new("ext4", 64);
    let (src, dst, mut c) = quiet_copy(&lfs.mnt);
    fs::hard_link(src.join("d1/g"), src.join("d1/h")).unwrap();
    OpenOptions::new()
        .append(true)
        .open(src.join("d1/h"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"tail"))
        .unwrap();
    let cut = c
        .checkpoint(&mut patchover_core::quiesce::NoWriters, true)
        .unwrap();
    assert_eq!(cut.verified, Some(true));
    assert_eq!(diff_trees(&src, &dst), Vec::<String>::new());
    let rep = c.cut(&mut patchover_core::quiesce::NoWriters).unwrap();
    assert!(rep.stats.hardlinks >= 2, "{rep:?}");
}

/// Regression: a cut asked for before the background thread started its bulk copy must not
/// complete an empty copy (it does the bulk copy itself).
#[test]
fn r_cut_right_after_start_waits_for_the_bulk_copy() {
    let lfs = LoopFs::new("ext4", 512);
    let (src, dst) = (lfs.mnt.join("src"), lfs.mnt.join("dst"));
    common::rich_tree(&src);
    let opts = CopyOptions {
        sync: false,
        ..CopyOptions::default()
    };
    let c = FollowCopy::start(&src, &dst, &opts, Arc::new(NoProgress)).unwrap();
    let rep = c.cut(&mut patchover_core::quiesce::NoWriters).unwrap();
    assert!(!is_incomplete(&dst));
    assert!(rep.stats.files >= 5, "{rep:?}");
    assert_eq!(diff_trees(&src, &dst), Vec::<String>::new());
}
