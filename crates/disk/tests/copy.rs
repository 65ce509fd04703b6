//! Bulk copy, bad input and out-of-space, on real filesystems (needs root: mknod, chown, loop).

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::{LoopFs, diff_trees, fingerprint, rich_tree};
use patchover_disk::{CopyError, CopyOptions, NoProgress, Reflink, copy_once, is_incomplete};

fn opts() -> CopyOptions {
    CopyOptions {
        sync: false,
        ..CopyOptions::default()
    }
}

#[test]
fn copy_once_keeps_every_kind_of_entry() {
    let fs = LoopFs::new("ext4", 256);
    let (src, dst) = (fs.mnt.join("src"), fs.mnt.join("dst"));
    rich_tree(&src);
    let rep = copy_once(&src, &dst, &opts(), &NoProgress).unwrap();
    assert_eq!(diff_trees(&src, &dst), Vec::<String>::new());
    assert!(!is_incomplete(&dst));
    assert!(rep.caught_up);
    assert_eq!(rep.kind, "directory");
    assert!(rep.stats.hardlinks >= 2, "{rep:?}");
    assert!(rep.stats.specials >= 2 && rep.stats.symlinks >= 2);
    // Holes stay holes: 256 MiB apparent, only the data islands allocated.
    let sp = fs::metadata(dst.join("sparse.img")).unwrap();
    assert_eq!(sp.len(), 256 << 20);
    assert!(
        sp.blocks() * 512 < 1 << 20,
        "sparse file got {} bytes allocated",
        sp.blocks() * 512
    );
    // ext4 cannot reflink: the bytes went through copy_file_range.
    assert_eq!(rep.stats.bytes_reflinked, 0);
    assert!(rep.stats.bytes_copy_range > 3 << 20);
}

#[test]
fn reflink_on_xfs_shares_blocks() {
    let fs = LoopFs::new("xfs", 512);
    let (src, dst) = (fs.mnt.join("src"), fs.mnt.join("dst"));
    rich_tree(&src);
    let rep = copy_once(&src, &dst, &opts(), &NoProgress).unwrap();
    assert_eq!(diff_trees(&src, &dst), Vec::<String>::new());
    assert!(rep.stats.bytes_reflinked >= 3 << 20, "{rep:?}");
    assert_eq!(rep.stats.bytes_copy_range + rep.stats.bytes_read_write, 0);

    let dst2 = fs.mnt.join("dst2");
    let o = CopyOptions {
        reflink: Reflink::Never,
        ..opts()
    };
    let rep = copy_once(&src, &dst2, &o, &NoProgress).unwrap();
    assert_eq!(rep.stats.bytes_reflinked, 0);
    assert_eq!(diff_trees(&src, &dst2), Vec::<String>::new());
}

#[test]
fn image_file_copy_keeps_holes() {
    let fs = LoopFs::new("ext4", 128);
    let src = fs.mnt.join("disk.img");
    let f = fs::File::create(&src).unwrap();
    f.set_len(64 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 65536], 1 << 20).unwrap();
    drop(f);
    let dst = fs.mnt.join("copy.img");
    let rep = copy_once(&src, &dst, &opts(), &NoProgress).unwrap();
    assert_eq!(rep.kind, "image");
    assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
    assert!(fs::metadata(&dst).unwrap().blocks() * 512 < 1 << 20);
    assert!(!is_incomplete(&dst));
}

fn assert_bad(r: Result<impl std::fmt::Debug, CopyError>, want: fn(&CopyError) -> bool) {
    let e = r.expect_err("bad input must fail");
    assert!(want(&e), "unexpected error: {e:?}");
    assert!(e.is_bad_input(), "{e:?} must count as bad input");
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    fs::create_dir_all(src.join("a")).unwrap();
    fs::write(src.join("a/f"), b"x").unwrap();
    let before = fingerprint(&src);
    let o = opts();

    assert_bad(
        copy_once(
            &d.path().join("missing"),
            &d.path().join("x"),
            &o,
            &NoProgress,
        ),
        |e| matches!(e, CopyError::SourceMissing(_)),
    );
    assert_bad(
        copy_once(&src, &src.join("a/inside"), &o, &NoProgress),
        |e| matches!(e, CopyError::DestinationInsideSource { .. }),
    );
    assert_bad(copy_once(&src, &src, &o, &NoProgress), |e| {
        matches!(e, CopyError::SamePath(_))
    });
    assert_bad(
        copy_once(&src, &d.path().join("no/parent/here"), &o, &NoProgress),
        |e| matches!(e, CopyError::DestinationParentMissing(_)),
    );
    let full = d.path().join("full");
    fs::create_dir(&full).unwrap();
    fs::write(full.join("keep"), b"mine").unwrap();
    assert_bad(copy_once(&src, &full, &o, &NoProgress), |e| {
        matches!(e, CopyError::DestinationNotEmpty(_))
    });
    assert_eq!(fs::read(full.join("keep")).unwrap(), b"mine");
    assert_eq!(fs::read_dir(&full).unwrap().count(), 1);
    let fifo = d.path().join("fifo");
    common::mknod(&fifo, libc::S_IFIFO | 0o600, 0);
    assert_bad(
        copy_once(&fifo, &d.path().join("y"), &o, &NoProgress),
        |e| matches!(e, CopyError::UnknownDiskKind(_)),
    );
    let img = d.path().join("img");
    fs::write(&img, b"data").unwrap();
    assert_bad(copy_once(&img, &full, &o, &NoProgress), |e| {
        matches!(e, CopyError::KindMismatch { .. })
    });
    assert_eq!(fingerprint(&src), before);
    assert!(!d.path().join("x").exists() && !d.path().join("y").exists());
}

#[test]
fn out_of_space_marks_the_copy_incomplete_and_a_rerun_starts_over() {
    let big = LoopFs::new("ext4", 128);
    let small = LoopFs::new("ext4", 20);
    let src = big.mnt.join("src");
    fs::create_dir(&src).unwrap();
    for i in 0..6 {
        let data: Vec<u8> = (0..5 << 20)
            .map(|j: u32| (j.wrapping_mul(31) ^ i) as u8)
            .collect();
        fs::write(src.join(format!("f{i}")), data).unwrap();
    }
    let before = fingerprint(&src);
    let dst = small.mnt.join("dst");
    let e = copy_once(&src, &dst, &opts(), &NoProgress).expect_err("20 MiB cannot hold 30 MiB");
    assert!(matches!(e, CopyError::OutOfSpace { .. }), "{e:?}");
    assert!(!e.is_bad_input());
    assert!(is_incomplete(&dst), "an unfinished copy must be marked");
    assert_eq!(fingerprint(&src), before, "the source must be untouched");

    // Free space on the source side of the story: shrink the source, rerun into the same dst.
    for i in 2..6 {
        fs::remove_file(src.join(format!("f{i}"))).unwrap();
    }
    let rep = copy_once(&src, &dst, &opts(), &NoProgress).unwrap();
    assert!(!is_incomplete(&dst));
    assert_eq!(rep.stats.files, 2);
    assert_eq!(diff_trees(&src, &dst), Vec::<String>::new());
}

#[test]
fn image_out_of_space_leaves_a_sidecar_marker() {
    let big = LoopFs::new("ext4", 128);
    let small = LoopFs::new("ext4", 20);
    let src = big.mnt.join("disk.img");
    let data: Vec<u8> = (0..40u32 << 20).map(|j| (j % 253) as u8).collect();
    fs::write(&src, data).unwrap();
    let dst = small.mnt.join("disk.img");
    let e = copy_once(&src, &dst, &opts(), &NoProgress).unwrap_err();
    assert!(matches!(e, CopyError::OutOfSpace { .. }), "{e:?}");
    assert!(is_incomplete(&dst));
    assert!(Path::new(&format!("{}.patchover-incomplete", dst.display())).is_dir());
}
