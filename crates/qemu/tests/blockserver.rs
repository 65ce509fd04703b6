//! The block server against a real `qemu-storage-daemon`: an ext4 image served as a FUSE export
//! and loop-mounted keeps what is written through it, a live copy cut while a writer writes is
//! the tree at the freeze, exports come and go at run time, and bad input fails with nothing
//! left behind.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use patchover_qemu::blockserver::{
    BlockServer, BlockServerError, BlockServerSpec, LoopMount, ServedDisk, loop_user, syncfs,
};
use patchover_qemu::{BackupSpec, BitmapCopy, CopyMode, ImageFormat, Mirror, MirrorSpec, Qmp};

fn ext4_image(path: &Path, mib: u64) {
    fs::File::create(path).unwrap().set_len(mib << 20).unwrap();
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success(), "mkfs.ext4");
}

/// A server stopped on drop (tests only: LCs keep theirs running).
struct Guard(BlockServer);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.stop(Duration::from_secs(5));
    }
}

fn qsd_alive(pid: i32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("qemu-storage-daemon"))
}

/// Every file under `root` (relative path → content; directories as `None`).
fn tree(root: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let rel = e.path().strip_prefix(root).unwrap().to_path_buf();
            if rel == Path::new("lost+found") {
                continue;
            }
            let t = e.file_type().unwrap();
            if t.is_dir() {
                out.insert(rel, None);
                stack.push(e.path());
            } else {
                out.insert(rel, Some(fs::read(e.path()).unwrap()));
            }
        }
    }
    out
}

#[test]
fn served_ext4_keeps_what_is_written_through_the_loop_mount() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("app.img");
    ext4_image(&img, 64);
    let export = d.path().join("app.export");
    let spec = BlockServerSpec::new(
        d.path(),
        d.path().join("jobs.sock"),
        vec![ServedDisk::new("app", &img, &export)],
    );
    let mut s = BlockServer::start(&spec).unwrap();
    let pid = s.pid();
    assert!(qsd_alive(pid) && s.is_running());
    assert!(export.exists() && d.path().join("blockserver.json").exists());

    let mnt = d.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = LoopMount::mount(&export, &mnt, false).unwrap();
    assert!(
        loop_user(&export).is_some(),
        "the export backs a loop device"
    );
    // Buffered loop device (direct I/O corrupts through QEMU 7.2's FUSE export).
    let dev = loop_user(&export).unwrap();
    let dio = fs::read_to_string(format!("/sys/block/{}/loop/dio", &dev[5..])).unwrap();
    assert_eq!(dio.trim(), "0", "the loop device must be buffered");
    fs::create_dir(mnt.join("dir")).unwrap();
    let mut expect = BTreeMap::new();
    for i in 0..50u32 {
        let body: Vec<u8> = (0..(i * 997 + 1)).map(|j| (j * 31 + i) as u8).collect();
        fs::write(mnt.join("dir").join(format!("f{i}")), &body).unwrap();
        expect.insert(format!("f{i}"), body);
    }
    let big: Vec<u8> = (0..(8u32 << 20)).map(|j| (j % 251) as u8).collect();
    fs::write(mnt.join("big"), &big).unwrap();
    // Stopping is refused while the export is mounted: quitting would pull the disk away.
    let e = s.stop(Duration::from_secs(5)).unwrap_err();
    assert!(matches!(e, BlockServerError::ExportInUse { .. }), "{e}");
    assert!(qsd_alive(pid));
    m.unmount().unwrap();
    s.stop(Duration::from_secs(10)).unwrap();
    assert!(!qsd_alive(pid), "QSD has exited");
    assert!(!export.exists(), "the export file it created is removed");
    assert!(!d.path().join("qsd.pid").exists());
    assert!(!d.path().join("blockserver.json").exists());

    // The image itself (no server) has every file.
    let m = LoopMount::mount(&img, &mnt, true).unwrap();
    for (name, body) in &expect {
        assert_eq!(
            &fs::read(mnt.join("dir").join(name)).unwrap(),
            body,
            "{name}"
        );
    }
    assert!(fs::read(mnt.join("big")).unwrap() == big, "big differs");
    drop(m);
    let fsck = Command::new("e2fsck")
        .args(["-fn"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

/// A writer thread: random 4 KiB writes into `db` and small-file churn, paused while `hold` is
/// taken, until `stop`.
struct TestWriter {
    hold: Arc<Mutex<()>>,
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestWriter {
    fn start(root: &Path) -> TestWriter {
        let hold = Arc::new(Mutex::new(()));
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let (h, st, w, root) = (
            hold.clone(),
            stop.clone(),
            writes.clone(),
            root.to_path_buf(),
        );
        let thread = std::thread::spawn(move || {
            use std::os::unix::fs::FileExt;
            let db = fs::OpenOptions::new()
                .write(true)
                .open(root.join("db"))
                .unwrap();
            fs::create_dir_all(root.join("churn")).unwrap();
            let mut x: u64 = 0x1234_5678_9abc_def1;
            let mut n = 0u64;
            while !st.load(Ordering::Relaxed) {
                let g = h.lock().unwrap();
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let block = [(x % 251) as u8; 4096];
                db.write_all_at(&block, (x % 4096) * 4096).unwrap();
                if n.is_multiple_of(8) {
                    let name = root.join("churn").join(format!("c{}", n % 200));
                    fs::write(name, x.to_le_bytes()).unwrap();
                }
                n += 1;
                w.store(n, Ordering::Relaxed);
                drop(g);
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        TestWriter {
            hold,
            stop,
            writes,
            thread: Some(thread),
        }
    }

    fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}

impl Drop for TestWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn served_with_db(d: &Path) -> (Guard, LoopMount, PathBuf) {
    let img = d.join("app.img");
    ext4_image(&img, 128);
    let export = d.join("app.export");
    let spec = BlockServerSpec::new(
        d,
        d.join("jobs.sock"),
        vec![ServedDisk::new("app", &img, &export)],
    );
    let s = Guard(BlockServer::start(&spec).unwrap());
    let mnt = d.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = LoopMount::mount(&export, &mnt, false).unwrap();
    fs::write(mnt.join("db"), vec![0u8; 16 << 20]).unwrap();
    (s, m, mnt)
}

/// Three cuts of a live copy while the writer writes: at each, the writer is held, the
/// filesystem flushed, the point-in-time job started and the writer released at once (the
/// job then copies while the writer writes again); the copy, once the job is done, equals the
/// tree as it was at the hold, file by file.
#[test]
fn bitmap_copy_cut_while_a_writer_writes_is_the_tree_at_the_freeze() {
    bitmap_copy_cuts(false);
}

/// The same with the full copy made on the host (`source_file`): the image is copied by
/// `copy_file_range` while the writer writes through the export, after the bitmap started;
/// the rounds redo what the copy may have torn.
#[test]
fn bitmap_copy_with_a_host_full_copy_is_the_tree_at_every_freeze() {
    bitmap_copy_cuts(true);
}

fn bitmap_copy_cuts(host_full: bool) {
    let d = tempfile::tempdir().unwrap();
    let (mut s, m, mnt) = served_with_db(d.path());
    let w = TestWriter::start(&mnt);
    let mut qmp = Qmp::connect(s.0.jobs_socket(), Duration::from_secs(10)).unwrap();
    let target = d.path().join("copy.img");
    let mut copy = BitmapCopy::start(
        &mut qmp,
        BackupSpec {
            job: "copy-app".into(),
            device_node: "app".into(),
            target_path: target.clone(),
            target_node: "app-copy".into(),
            format: ImageFormat::Raw,
            granularity: Some(4096),
            source_file: host_full.then(|| d.path().join("app.img")),
        },
    )
    .unwrap();
    let full = copy.wait(&mut qmp, Duration::from_secs(60)).unwrap();
    if host_full {
        // Holes stay holes: what the image holds so far (what the LC's page cache has not
        // written back yet reaches the server later, and so the bitmap).
        assert!(full.bytes > 0 && full.bytes < 128 << 20, "{}", full.bytes);
        assert!(
            qmp.query_block_jobs().unwrap().is_empty(),
            "no backup job for the full copy"
        );
    } else {
        assert_eq!(full.bytes, 128 << 20, "the first job copies the whole disk");
    }
    let verify = d.path().join("verify.img");
    let vmnt = d.path().join("verify-mnt");
    fs::create_dir(&vmnt).unwrap();
    for cut in 0..3 {
        let before = w.writes();
        std::thread::sleep(Duration::from_millis(500));
        assert!(w.writes() > before + 100, "the writer writes between cuts");
        copy.round(&mut qmp).unwrap();
        let r = copy.wait(&mut qmp, Duration::from_secs(30)).unwrap();
        assert!(
            r.bytes < 64 << 20,
            "a round copies what was written, not the disk"
        );

        let g = w.hold.lock().unwrap();
        syncfs(&mnt).unwrap();
        // As a cut does: the job starts at a crawl, so the writer surely writes while it runs
        // (an unlimited job can end before the writer's next write on a loaded host).
        copy.cut_round(&mut qmp).unwrap();
        let reference = tree(&mnt); // not part of a freeze in production
        drop(g);
        let at_release = w.writes();
        let t = std::time::Instant::now();
        while w.writes() < at_release + 20 && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            !qmp.query_block_jobs().unwrap().is_empty(),
            "cut {cut}: the crawling job ended early"
        );
        assert!(
            w.writes() >= at_release + 20,
            "cut {cut}: the writer did not write while the job ran"
        );
        copy.release(&mut qmp).unwrap();
        copy.wait(&mut qmp, Duration::from_secs(30)).unwrap();
        // The copy as a filesystem: a scratch copy of it, since mounting replays the journal.
        fs::copy(&target, &verify).unwrap();
        let vm = LoopMount::mount(&verify, &vmnt, false).unwrap();
        let copied = tree(&vmnt);
        drop(vm);
        assert_eq!(
            reference.keys().collect::<Vec<_>>(),
            copied.keys().collect::<Vec<_>>(),
            "cut {cut}: paths differ"
        );
        for (k, v) in &reference {
            assert!(copied[k] == *v, "cut {cut}: {} differs", k.display());
        }
        assert!(reference.len() > 10, "the tree has the churn files");
    }
    copy.close(&mut qmp).unwrap();
    drop(w);
    drop(qmp);
    drop(m);
    s.0.stop(Duration::from_secs(10)).unwrap();
    assert!(target.exists(), "the copy stays after close");
}

/// Pins why the block server's disks are copied by backups: QEMU 7.2 refuses a mirror of a
/// writable FUSE export (the export holds RESIZE, the mirror unshares it). If this starts to
/// pass on a newer QEMU, the mirror path can be used for `ns` LCs too.
#[test]
fn r_mirror_of_a_writable_fuse_export_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let (mut s, m, _mnt) = served_with_db(d.path());
    let mut qmp = Qmp::connect(s.0.jobs_socket(), Duration::from_secs(10)).unwrap();
    let target = d.path().join("mirror.img");
    let e = Mirror::start(
        &mut qmp,
        MirrorSpec {
            job_id: "mirror-app".into(),
            device_node: "app".into(),
            target_path: target.clone(),
            target_node: "app-mirror".into(),
            format: ImageFormat::Raw,
            copy_mode: CopyMode::Background,
            speed: 0,
        },
    )
    .unwrap_err();
    assert!(
        patchover_core_chain(&e).contains("'resize'"),
        "unexpected: {}",
        patchover_core_chain(&e)
    );
    assert!(!target.exists(), "the failed mirror removed its target");
    drop(qmp);
    drop(m);
    s.0.stop(Duration::from_secs(10)).unwrap();
}

fn patchover_core_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[test]
fn exports_come_and_go_at_run_time_and_a_new_patchover_adopts_the_server() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.img"), d.path().join("b.img"));
    ext4_image(&a, 32);
    ext4_image(&b, 32);
    let spec = BlockServerSpec::new(
        d.path(),
        d.path().join("jobs.sock"),
        vec![ServedDisk::new("sys", &a, d.path().join("sys.export"))],
    );
    let mut s = Guard(BlockServer::start(&spec).unwrap());
    let disk1 = ServedDisk::new("disk1", &b, d.path().join("disk1.export"));
    s.0.add(&disk1).unwrap();
    assert_eq!(
        s.0.disks()
            .iter()
            .map(|d| d.node.as_str())
            .collect::<Vec<_>>(),
        ["sys", "disk1"]
    );
    let mnt = d.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let m = LoopMount::mount(&disk1.export, &mnt, false).unwrap();
    fs::write(mnt.join("hello"), b"disk1").unwrap();

    // Removing a mounted export is refused; unmounted, it goes with its nodes and file.
    let e = s.0.remove("disk1").unwrap_err();
    assert!(matches!(e, BlockServerError::ExportInUse { .. }), "{e}");
    m.unmount().unwrap();

    // patchover restarts: the server is found from its state directory.
    let mut adopted = BlockServer::adopt(d.path()).unwrap();
    assert_eq!(adopted.pid(), s.0.pid());
    assert_eq!(adopted.disks(), s.0.disks());
    adopted.remove("disk1").unwrap();
    assert!(!disk1.export.exists(), "the export file is removed");
    let e = adopted.remove("disk1").unwrap_err();
    assert!(matches!(e, BlockServerError::NoSuchNode { .. }), "{e}");
    // The node name is free again (nodes deleted), and the image's lock is released.
    adopted.add(&disk1).unwrap();
    let m = LoopMount::mount(&disk1.export, &mnt, true).unwrap();
    assert_eq!(fs::read(mnt.join("hello")).unwrap(), b"disk1");
    drop(m);
    let pid = adopted.pid();
    adopted.stop(Duration::from_secs(10)).unwrap();
    assert!(!qsd_alive(pid));
    assert!(matches!(
        BlockServer::adopt(d.path()).unwrap_err(),
        BlockServerError::NotRunning { .. }
    ));
}

#[test]
fn bad_input_fails_with_nothing_left_behind() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("a.img");
    ext4_image(&img, 16);
    let jobs = d.path().join("jobs.sock");

    // A missing image, a missing export directory: refused before QSD starts.
    let e = BlockServer::start(&BlockServerSpec::new(
        d.path(),
        &jobs,
        vec![ServedDisk::new(
            "app",
            d.path().join("nope.img"),
            d.path().join("e"),
        )],
    ))
    .unwrap_err();
    assert!(matches!(e, BlockServerError::ImageMissing { .. }), "{e}");
    let e = BlockServer::start(&BlockServerSpec::new(
        d.path(),
        &jobs,
        vec![ServedDisk::new("app", &img, d.path().join("no/dir/e"))],
    ))
    .unwrap_err();
    assert!(
        matches!(e, BlockServerError::ExportDirMissing { .. }),
        "{e}"
    );
    assert!(!d.path().join("qsd.pid").exists());

    // The same node twice in one spec.
    let e = BlockServer::start(&BlockServerSpec::new(
        d.path(),
        &jobs,
        vec![
            ServedDisk::new("app", &img, d.path().join("e1")),
            ServedDisk::new("app", &img, d.path().join("e2")),
        ],
    ))
    .unwrap_err();
    assert!(matches!(e, BlockServerError::NodeInUse { .. }), "{e}");

    // A node served already, at run time.
    let mut s = Guard(
        BlockServer::start(&BlockServerSpec::new(
            d.path(),
            &jobs,
            vec![ServedDisk::new("app", &img, d.path().join("app.export"))],
        ))
        .unwrap(),
    );
    let img2 = d.path().join("b.img");
    ext4_image(&img2, 16);
    let e =
        s.0.add(&ServedDisk::new(
            "app",
            &img2,
            d.path().join("other.export"),
        ))
        .unwrap_err();
    assert!(matches!(e, BlockServerError::NodeInUse { .. }), "{e}");
    assert!(
        !d.path().join("other.export").exists(),
        "nothing left behind"
    );

    // The image another server holds (QEMU's image lock): the second server's start is undone.
    let d2 = tempfile::tempdir().unwrap();
    let e = BlockServer::start(&BlockServerSpec::new(
        d2.path(),
        d2.path().join("jobs.sock"),
        vec![ServedDisk::new("app", &img, d2.path().join("app.export"))],
    ))
    .unwrap_err();
    assert!(matches!(e, BlockServerError::ImageLocked { .. }), "{e}");
    assert!(
        !d2.path().join("app.export").exists(),
        "the export file it made is removed"
    );
    assert!(
        !d2.path().join("qsd.pid").exists(),
        "the second server is stopped"
    );
    // The first server is unharmed.
    assert!(s.0.is_running());
    assert_eq!(s.0.disks().len(), 1);
    s.0.stop(Duration::from_secs(10)).unwrap();
}
