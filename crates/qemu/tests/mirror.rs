//! The hypervisor's disk copy against a real QEMU: the source is written while the job runs,
//! the cut gives a point-in-time copy, abort and failures leave nothing behind.

mod common;

use std::time::{Duration, Instant};

use common::{QemuGuard, Rng, assert_same, guest_write};
use patchover_qemu::{
    CopyMode, ImageFormat, Mirror, MirrorError, MirrorSpec, Qmp, QmpError, RunState,
};
use serde_json::json;

const SIZE: usize = 64 << 20;

fn spec(
    q: &QemuGuard,
    source: &str,
    target: &str,
    format: ImageFormat,
    mode: CopyMode,
) -> MirrorSpec {
    MirrorSpec {
        job_id: format!("mirror-{target}"),
        device_node: source.to_string(),
        target_path: q.path(&format!("{target}.img")),
        target_node: target.to_string(),
        format,
        copy_mode: mode,
        speed: 0,
    }
}

/// Random 64 KiB-aligned writes of random patterns, applied to the model too.
fn random_writes(qmp: &mut Qmp, rng: &mut Rng, n: usize, model: &mut [u8]) {
    for _ in 0..n {
        let len = (1 + rng.next() as usize % 16) * 64 * 1024;
        let offset = (rng.next() as usize % ((SIZE - len) / 4096)) * 4096;
        let pattern = (rng.next() % 255) as u8 + 1;
        guest_write(qmp, "src-dev", pattern, offset, len, model);
    }
}

fn mirror_under_writes(mode: CopyMode) {
    let mut rng = Rng(0x5eed_0000 + mode as u64);
    let mut model = rng.bytes(SIZE);
    let q = QemuGuard::start(SIZE, &model);
    let mut qmp = q.connect();
    let mut sp = spec(&q, "src", "copy", ImageFormat::Raw, mode);
    // Slow the copy down (16 MiB, then a pause) so the writes below land while the job copies.
    sp.speed = 1 << 20;
    let target = sp.target_path.clone();
    assert!(!target.exists());

    let mut m = Mirror::start(&mut qmp, sp).unwrap();
    assert!(target.exists(), "the target image is created");
    let mut during = 0;
    for _ in 0..20 {
        random_writes(&mut qmp, &mut rng, 2, &mut model);
        let job = &qmp.query_block_jobs().unwrap()[0];
        if !job.ready && job.offset < job.len {
            during += 2;
        }
    }
    assert!(
        during >= 30,
        "only {during} writes landed while the job was copying"
    );
    m.set_speed(&mut qmp, 0).unwrap();
    let p = m.wait_ready(&mut qmp, Duration::from_secs(60)).unwrap();
    assert!(p.len >= SIZE as u64, "{p:?}");
    // Writes after ready are mirrored too.
    random_writes(&mut qmp, &mut rng, 20, &mut model);

    // The caller freezes the source before the cut (here: no CPU runs and nothing writes).
    let report = m.cut(&mut qmp, Duration::from_secs(30)).unwrap();
    assert!(report.bytes >= SIZE as u64, "{report:?}");
    assert!(report.cut <= report.total);
    eprintln!("{mode:?}: {report:?}");

    assert_same("source", &q.src(), &model);
    assert_same("target after the cut", &target, &model);

    // Point in time: a write after the cut reaches the source, not the copy.
    let frozen = model.clone();
    guest_write(&mut qmp, "src-dev", 0xEE, 0, 1 << 20, &mut model);
    assert_same("source", &q.src(), &model);
    assert_same("target after a later write", &target, &frozen);

    // The target nodes are gone and the job with them; the VM still runs.
    assert!(qmp.query_block_jobs().unwrap().is_empty());
    let nodes = qmp
        .execute("query-named-block-nodes", json!({ "flat": true }))
        .unwrap();
    let names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["node-name"].as_str())
        .collect();
    assert!(
        !names.contains(&"copy") && !names.contains(&"copy-file"),
        "{names:?}"
    );
    assert_eq!(qmp.query_status().unwrap(), RunState::Prelaunch);
}

#[test]
fn mirror_background_under_writes_cut_is_point_in_time() {
    mirror_under_writes(CopyMode::Background);
}

#[test]
fn mirror_write_blocking_under_writes_cut_is_point_in_time() {
    mirror_under_writes(CopyMode::WriteBlocking);
}

#[test]
fn qcow2_target_round_trips() {
    // src -> qcow2 (made by QEMU's blockdev-create), then that qcow2 -> raw: the raw must equal
    // the source, so the qcow2 held the right content.
    let mut rng = Rng(7);
    let mut model = rng.bytes(SIZE);
    let q = QemuGuard::start(SIZE, &model);
    let mut qmp = q.connect();
    let mut m = Mirror::start(
        &mut qmp,
        spec(&q, "src", "q", ImageFormat::Qcow2, CopyMode::Background),
    )
    .unwrap();
    random_writes(&mut qmp, &mut rng, 10, &mut model);
    m.wait_ready(&mut qmp, Duration::from_secs(60)).unwrap();
    random_writes(&mut qmp, &mut rng, 10, &mut model);
    m.cut(&mut qmp, Duration::from_secs(30)).unwrap();
    let qcow = q.path("q.img");
    let magic = std::fs::read(&qcow).unwrap();
    assert_eq!(&magic[..4], b"QFI\xfb", "the target is a qcow2 image");

    qmp.blockdev_add(json!({ "driver": "file", "filename": qcow, "node-name": "q2-file" }))
        .unwrap();
    qmp.blockdev_add(json!({ "driver": "qcow2", "file": "q2-file", "node-name": "q2" }))
        .unwrap();
    let mut back = Mirror::start(
        &mut qmp,
        spec(&q, "q2", "back", ImageFormat::Raw, CopyMode::Background),
    )
    .unwrap();
    back.wait_ready(&mut qmp, Duration::from_secs(60)).unwrap();
    back.cut(&mut qmp, Duration::from_secs(30)).unwrap();
    assert_same("raw copy of the qcow2 copy", &q.path("back.img"), &model);
}

#[test]
fn not_converging_then_abort_leaves_no_target() {
    let mut rng = Rng(11);
    let model = rng.bytes(SIZE);
    let q = QemuGuard::start(SIZE, &model);
    let mut qmp = q.connect();
    let mut sp = spec(&q, "src", "slow", ImageFormat::Raw, CopyMode::Background);
    sp.speed = 1 << 20; // 64 s for 64 MiB
    let mut m = Mirror::start(&mut qmp, sp).unwrap();
    let start = Instant::now();
    let err = m
        .wait_ready(&mut qmp, Duration::from_millis(600))
        .unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    match &err {
        MirrorError::NotConverging { progress, .. } => assert!(progress.offset < progress.len),
        other => panic!("expected NotConverging, got {other:?}"),
    }
    assert!(err.to_string().contains("write-blocking"), "{err}");
    assert!(q.path("slow.img").exists());

    m.abort(&mut qmp).unwrap();
    assert!(
        !q.path("slow.img").exists(),
        "abort removes the half-made target"
    );
    assert!(qmp.query_block_jobs().unwrap().is_empty());
    // The same job id and target can be used again.
    let mut again = Mirror::start(
        &mut qmp,
        spec(&q, "src", "slow", ImageFormat::Raw, CopyMode::WriteBlocking),
    )
    .unwrap();
    again.wait_ready(&mut qmp, Duration::from_secs(60)).unwrap();
    again.cut(&mut qmp, Duration::from_secs(30)).unwrap();
    assert_same("target", &q.path("slow.img"), &model);
}

#[test]
fn cut_before_ready_is_refused_and_cleans_up() {
    let mut rng = Rng(13);
    let model = rng.bytes(SIZE);
    let q = QemuGuard::start(SIZE, &model);
    let mut qmp = q.connect();
    let mut sp = spec(&q, "src", "early", ImageFormat::Raw, CopyMode::Background);
    sp.speed = 1 << 20;
    let m = Mirror::start(&mut qmp, sp).unwrap();
    let err = m.cut(&mut qmp, Duration::from_secs(5)).unwrap_err();
    assert!(matches!(err, MirrorError::NotReady { .. }), "{err:?}");
    assert!(!q.path("early.img").exists());
    assert!(qmp.query_block_jobs().unwrap().is_empty());
}

#[test]
fn target_in_a_missing_directory_is_a_clear_error_and_the_source_still_answers() {
    let q = QemuGuard::start(SIZE, &vec![1u8; SIZE]);
    let mut qmp = q.connect();
    let mut sp = spec(&q, "src", "nodir", ImageFormat::Raw, CopyMode::Background);
    sp.target_path = q.path("no/such/dir/copy.img");
    let err = Mirror::start(&mut qmp, sp).unwrap_err();
    assert!(matches!(err, MirrorError::CreateTarget { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("no/such/dir/copy.img") && msg.contains("directory exists"),
        "{msg}"
    );
    assert_eq!(qmp.query_status().unwrap(), RunState::Prelaunch);
    assert!(qmp.query_block_jobs().unwrap().is_empty());
}

#[test]
fn the_source_image_as_target_is_refused_and_left_alone() {
    let model = Rng(23).bytes(SIZE);
    let q = QemuGuard::start(SIZE, &model);
    let mut qmp = q.connect();
    let mut sp = spec(&q, "src", "self", ImageFormat::Raw, CopyMode::Background);
    sp.target_path = q.dir.path().join(".").join("src.img");
    let err = Mirror::start(&mut qmp, sp).unwrap_err();
    assert!(matches!(err, MirrorError::TargetIsSource { .. }), "{err:?}");
    assert_same("source", &q.src(), &model);
}

#[test]
fn unknown_source_node_is_a_clear_error() {
    let q = QemuGuard::start(1 << 20, &vec![1u8; 1 << 20]);
    let mut qmp = q.connect();
    let err = Mirror::start(
        &mut qmp,
        spec(&q, "nope", "x", ImageFormat::Raw, CopyMode::Background),
    )
    .unwrap_err();
    assert!(matches!(err, MirrorError::NoSourceNode { .. }), "{err:?}");
    assert!(!q.path("x.img").exists());
}

#[test]
fn a_start_failure_in_qemu_leaves_nothing_behind_and_never_deletes_other_nodes() {
    // Target node "src": its file node would be "src-file", which the source already uses, so
    // QEMU refuses the target. The cleanup must not delete the source's nodes.
    let q = QemuGuard::start(SIZE, &vec![1u8; SIZE]);
    let mut qmp = q.connect();
    let mut sp = spec(&q, "src", "src", ImageFormat::Raw, CopyMode::Background);
    sp.target_path = q.path("collide.img");
    let err = Mirror::start(&mut qmp, sp.clone()).unwrap_err();
    match &err {
        MirrorError::Qmp {
            source: QmpError::Command { cmd, desc, .. },
            ..
        } => assert_eq!(cmd, "blockdev-add", "{desc}"),
        other => panic!("expected blockdev-add to fail, got {other:?}"),
    }
    assert!(
        !sp.target_path.exists(),
        "the image this call created is removed"
    );
    let nodes = qmp
        .execute("query-named-block-nodes", json!({ "flat": true }))
        .unwrap();
    let names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["node-name"].as_str())
        .collect();
    assert!(
        names.contains(&"src") && names.contains(&"src-file"),
        "{names:?}"
    );
    assert_eq!(qmp.query_status().unwrap(), RunState::Prelaunch);
}

#[test]
fn a_second_job_with_the_same_id_is_refused_and_the_first_goes_on() {
    let model = Rng(19).bytes(SIZE);
    let q = QemuGuard::start(SIZE, &model);
    let mut qmp = q.connect();
    let mut first = Mirror::start(
        &mut qmp,
        spec(&q, "src", "one", ImageFormat::Raw, CopyMode::Background),
    )
    .unwrap();
    let mut sp = spec(&q, "src", "two", ImageFormat::Raw, CopyMode::Background);
    sp.job_id = "mirror-one".into();
    let err = Mirror::start(&mut qmp, sp).unwrap_err();
    assert!(matches!(err, MirrorError::JobIdInUse { .. }), "{err:?}");
    assert!(!q.path("two.img").exists());
    first.wait_ready(&mut qmp, Duration::from_secs(60)).unwrap();
    first.cut(&mut qmp, Duration::from_secs(30)).unwrap();
    assert_same("target", &q.path("one.img"), &model);
}

#[test]
fn a_failing_target_is_a_job_failure_and_the_source_still_answers() {
    // The target sits on a 2 MiB tmpfs: the copy of 64 MiB of data runs out of space.
    let mut rng = Rng(17);
    let model = rng.bytes(SIZE);
    let q = QemuGuard::start(SIZE, &model);
    let mnt = q.path("small-fs");
    std::fs::create_dir(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "po-h1-test"])
        .arg(&mnt)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mounting a tmpfs needs root");
    struct Umount(std::path::PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _umount = Umount(mnt.clone());

    let mut qmp = q.connect();
    let mut sp = spec(&q, "src", "full", ImageFormat::Raw, CopyMode::Background);
    sp.target_path = mnt.join("full.img");
    let mut m = Mirror::start(&mut qmp, sp).unwrap();
    let err = m.wait_ready(&mut qmp, Duration::from_secs(30)).unwrap_err();
    assert!(matches!(err, MirrorError::JobFailed { .. }), "{err:?}");
    assert!(err.to_string().contains("source is untouched"), "{err}");
    m.abort(&mut qmp).unwrap();
    assert!(!mnt.join("full.img").exists());
    assert_eq!(qmp.query_status().unwrap(), RunState::Prelaunch);
    assert_same("source", &q.src(), &model);
}

#[test]
fn a_fine_granularity_mirror_copies_4k_writes_and_a_bad_one_reaches_qemu_and_is_refused() {
    let mut rng = Rng(0x4b);
    let mut model = rng.bytes(SIZE);
    let q = QemuGuard::start(SIZE, &model);
    let mut qmp = q.connect();
    // QEMU takes powers of 2 only: an error from QEMU shows the option is passed on.
    let err = Mirror::start_granular(
        &mut qmp,
        spec(&q, "src", "bad", ImageFormat::Raw, CopyMode::Background),
        Some(3000),
    )
    .unwrap_err();
    assert!(matches!(err, MirrorError::Qmp { .. }), "{err:?}");
    assert!(
        !q.path("bad.img").exists(),
        "a refused start leaves no target"
    );

    let sp = spec(&q, "src", "fine", ImageFormat::Raw, CopyMode::Background);
    let target = sp.target_path.clone();
    let mut m = Mirror::start_granular(&mut qmp, sp, Some(4096)).unwrap();
    m.wait_ready(&mut qmp, Duration::from_secs(60)).unwrap();
    // Random 4 KiB writes once in sync, each tracked at its own granule.
    for _ in 0..64 {
        let offset = (rng.next() as usize % (SIZE / 4096)) * 4096;
        let pattern = (rng.next() % 255) as u8 + 1;
        guest_write(&mut qmp, "src-dev", pattern, offset, 4096, &mut model);
    }
    m.cut(&mut qmp, Duration::from_secs(30)).unwrap();
    assert_same("target after the cut", &target, &model);
}

/// Issue 25: waiting for ready hands on the job's progress as it reads it (what a patch run
/// shows of a VM's disk copy): several readings, offsets never going back, the last the ready
/// one, all of the length copied.
#[test]
fn waiting_for_ready_reports_the_jobs_progress_up_to_its_length() {
    let mut rng = Rng(0x5eed_0025);
    let model = rng.bytes(SIZE);
    let q = QemuGuard::start(SIZE, &model);
    let mut qmp = q.connect();
    let mut sp = spec(&q, "src", "copy", ImageFormat::Raw, CopyMode::Background);
    // About 2 s for 64 MiB: several readings at one each 200 ms.
    sp.speed = 32 << 20;
    let mut m = Mirror::start(&mut qmp, sp).unwrap();
    let mut seen = Vec::new();
    let p = m
        .wait_ready_reporting(&mut qmp, Duration::from_secs(60), &mut |p| seen.push(p))
        .unwrap();
    assert!(seen.len() >= 3, "{seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0].offset <= w[1].offset),
        "{seen:?}"
    );
    assert!(seen[0].offset < SIZE as u64, "{seen:?}");
    assert_eq!(seen.last(), Some(&p));
    assert_eq!(p.offset, p.len, "{p:?}");
    assert!(p.len >= SIZE as u64, "{p:?}");
    m.abort(&mut qmp).unwrap();
}
