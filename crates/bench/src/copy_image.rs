//! `patchover bench copy --disk image`: issue 3's workload on an `ns` LC's *image* disk, copied
//! with a block-level write log instead of fanotify.
//!
//! The disk is an ext4 image served by the block server (`qemu-storage-daemon`, FUSE export,
//! buffered loop mount; `patchover_qemu::blockserver`) and copied by a dirty bitmap and
//! point-in-time backups (`patchover_qemu::backup`: QEMU 7.2 refuses `blockdev-mirror` on a
//! writable FUSE export). The writer is the directory bench's (random 4 KiB writes at the same
//! rate into a file of the same size, small-file churn), in its own cgroup v2, so that
//! freezing it freezes nothing else. In one run:
//!
//! 1. control: the writer alone on the served disk, before the copy and again after the cuts;
//! 2. the copy: the full backup, then rounds of the bitmap while the writer writes;
//! 3. `--cuts` cuts by `patchover_qemu::ServedCopy::cut` (the cycle's code), each: `syncfs`
//!    (until quick) → freeze the writer's cgroup → `syncfs` → start the point-in-time job (at
//!    a crawl, see `BitmapCopy::cut_round`) → thaw → lift the job's limit. The freeze window is freeze → thaw. At every cut, while the
//!    writer is still frozen, the source tree is hashed file by file (the reference; its time
//!    is taken out of the window, production does not do it); after the thaw the job finishes
//!    while the writer writes again (copy-before-write keeps the point in time), and the copy,
//!    mounted through a scratch copy of its image (mounting replays ext4's journal), is hashed
//!    and compared with the reference.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File};
use std::hash::Hasher;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{BenchError, Context};
use patchover_disk::CgroupFreezer;
use patchover_disk::bench::{BenchConfig, Cgroup, Writer, WriterResult, WriterSpec, pct};
use patchover_qemu::ServedCopy;
use patchover_qemu::blockserver::{BlockServer, BlockServerSpec, LoopMount, ServedDisk, syncfs};
use serde::Serialize;

/// Room on the disk besides the writer's file (churn, ext4 metadata).
const HEADROOM_MIB: u64 = 256;

/// What to run.
#[derive(Debug, Clone)]
pub struct ImageBenchConfig {
    pub file_mib: u64,
    pub rate_mb_s: f64,
    pub cuts: usize,
    /// How long the writer runs in each control phase and in the copy phase.
    pub phase_secs: f64,
    /// Between cuts.
    pub cut_gap: Duration,
    /// Between the bitmap rounds that ship writes while the copy follows (`None`: no rounds;
    /// the writes wait in the bitmap for the cut).
    pub round_every: Option<Duration>,
    pub writer_cmd: Vec<OsString>,
}

impl ImageBenchConfig {
    pub fn full(writer_cmd: Vec<OsString>) -> ImageBenchConfig {
        ImageBenchConfig {
            file_mib: 1024,
            rate_mb_s: 20.0,
            cuts: 20,
            phase_secs: 8.0,
            cut_gap: Duration::from_millis(300),
            // As the patch cycle follows: the writes wait in the bitmap, and the catch-up
            // before the cut ships them. Rounds while following cost the writer more than they
            // save (each 4 KiB write becomes a 64 KiB copy-before-write and a 64 KiB copy; see
            // docs/blockserver.md "Figures"); `--round-every` measures them.
            round_every: None,
            writer_cmd,
        }
    }

    pub fn quick(writer_cmd: Vec<OsString>) -> ImageBenchConfig {
        ImageBenchConfig {
            file_mib: 64,
            phase_secs: 3.0,
            cut_gap: Duration::from_millis(100),
            // The CI-sized run ships by rounds, so that they stay exercised.
            round_every: Some(Duration::from_millis(100)),
            ..ImageBenchConfig::full(writer_cmd)
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ImageBenchReport {
    pub disk: &'static str,
    pub copier: &'static str,
    pub disk_bytes: u64,
    pub file_mib: u64,
    pub freeze: Freeze,
    pub writer: WriterFigures,
    pub identical: Identical,
    pub bulk: Bulk,
    pub goals: Goals,
}

#[derive(Debug, Serialize)]
pub struct Freeze {
    pub cuts: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub measured_as: &'static str,
    /// The two parts of a window, p50: the `syncfs` while frozen, and the QMP call that starts
    /// the point-in-time job.
    pub syncfs_p50_ms: f64,
    pub job_start_p50_ms: f64,
    /// Hashing the frozen source for the identity check (taken out of the windows).
    pub reference_p50_ms: f64,
    /// Bytes the cut's job copied (after the thaw), mean.
    pub mean_shipped_kib: f64,
    /// From the thaw until the copy was complete, p50.
    pub complete_after_thaw_p50_ms: f64,
    pub windows_ms: Vec<f64>,
}

#[derive(Debug, Serialize)]
pub struct WriterFigures {
    pub target_mb_s: f64,
    /// The control phases (no copy), before and after.
    pub alone_before_mb_s: f64,
    pub alone_after_mb_s: f64,
    pub alone_mb_s: f64,
    /// While the copy ran (full copy, then bitmap rounds), no cuts.
    pub during_copy_mb_s: f64,
    /// The rounds while following: their interval (`null`: none), how many, what they shipped.
    pub round_every_ms: Option<f64>,
    pub follow_rounds: usize,
    pub follow_shipped_mib: f64,
    /// 1 − during_copy ÷ alone.
    pub loss: f64,
    /// During the cuts, over the phase's time minus the reference hashing (frozen time of the
    /// windows included).
    pub during_cuts_mb_s: f64,
    pub loss_with_cuts: f64,
    /// Slots the writer dropped for being > 100 ms late, in the cut phase.
    pub missed_in_cuts: u64,
}

#[derive(Debug, Serialize)]
pub struct Identical {
    pub cuts: usize,
    pub identical: usize,
    pub compared_as: &'static str,
    pub first_difference: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Bulk {
    pub bytes: u64,
    /// The first (full) job.
    pub copy_secs: f64,
    pub cp_secs: f64,
    /// cp time ÷ copy time.
    pub ratio: f64,
}

#[derive(Debug, Serialize)]
pub struct Goals {
    pub freeze_p99_lt_50ms: bool,
    pub writer_loss_le_10pct: bool,
    pub identical_at_every_cut: bool,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn run_tool(c: &mut Command) -> Result<(), BenchError> {
    let out = c
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {c:?}"))?;
    if !out.status.success() {
        bail!(
            "{c:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Every file under `root`: relative path → (length, hash of the content); directories with
/// length `u64::MAX`. `lost+found` is left out.
pub fn tree_digest(root: &Path) -> Result<BTreeMap<PathBuf, (u64, u64)>, BenchError> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    let mut buf = vec![0u8; 1 << 20];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            let rel = e
                .path()
                .strip_prefix(root)
                .map_err(|_| {
                    BenchError::Failed(format!("{} left {}", e.path().display(), root.display()))
                })?
                .to_path_buf();
            if rel == Path::new("lost+found") {
                continue;
            }
            if e.file_type()?.is_dir() {
                out.insert(rel, (u64::MAX, 0));
                stack.push(e.path());
                continue;
            }
            let mut f = File::open(e.path()).with_context(|| format!("{}", e.path().display()))?;
            let mut h = std::hash::DefaultHasher::new();
            let mut len = 0u64;
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.write(&buf[..n]);
                len += n as u64;
            }
            out.insert(rel, (len, h.finish()));
        }
    }
    Ok(out)
}

/// Where two digests first differ, `None` when equal.
pub fn first_difference(
    a: &BTreeMap<PathBuf, (u64, u64)>,
    b: &BTreeMap<PathBuf, (u64, u64)>,
) -> Option<String> {
    for (k, v) in a {
        match b.get(k) {
            None => return Some(format!("{} missing in the copy", k.display())),
            Some(w) if w != v => return Some(format!("{} differs", k.display())),
            Some(_) => {}
        }
    }
    b.keys()
        .find(|k| !a.contains_key(*k))
        .map(|k| format!("{} only in the copy", k.display()))
}

/// The run's scratch state; dropping it unmounts, stops the server and removes the work dir.
struct Rig {
    work: PathBuf,
    server: Option<BlockServer>,
    mount: Option<LoopMount>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        drop(self.mount.take());
        if let Some(mut s) = self.server.take()
            && let Err(e) = s.stop(Duration::from_secs(10))
        {
            tracing::warn!(error = %e, "bench: stopping the block server");
        }
        let _ = fs::remove_dir_all(&self.work);
    }
}

fn fill(path: &Path, mib: u64) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    let mut buf = vec![0u8; 1 << 20];
    for j in 0..mib {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ((i as u64 + j) % 253) as u8;
        }
        f.write_all(&buf)?;
    }
    f.sync_all()
}

/// Runs the bench. `say` gets one line per step.
pub fn run(cfg: &ImageBenchConfig, say: &dyn Fn(&str)) -> Result<ImageBenchReport, BenchError> {
    if cfg.cuts == 0 || cfg.file_mib == 0 {
        return Err(BenchError::Refused(
            "--cuts and the file size must be positive".to_owned(),
        ));
    }
    let mut rnd = [0u8; 4];
    File::open("/dev/urandom")?.read_exact(&mut rnd)?;
    let work = PathBuf::from(format!(
        "/var/tmp/patchover-bench-image-{}-{:08x}",
        std::process::id(),
        u32::from_ne_bytes(rnd)
    ));
    fs::create_dir_all(work.join("qsd")).with_context(|| format!("creating {}", work.display()))?;
    let mut rig = Rig {
        work: work.clone(),
        server: None,
        mount: None,
    };
    let disk_bytes = (cfg.file_mib + HEADROOM_MIB) << 20;
    let img = work.join("app.img");
    File::create(&img)?.set_len(disk_bytes)?;
    run_tool(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img))?;

    say("serving the image (qemu-storage-daemon, FUSE export) and loop-mounting it");
    let export = work.join("app.export");
    let disk = ServedDisk::new("app", &img, &export);
    let server = BlockServer::start(&BlockServerSpec::new(
        work.join("qsd"),
        work.join("qsd/jobs.sock"),
        vec![disk.clone()],
    ))
    .context("starting the block server")?;
    let jobs_socket = server.jobs_socket().to_path_buf();
    rig.server = Some(server);
    let mnt = work.join("mnt");
    fs::create_dir(&mnt)?;
    rig.mount = Some(LoopMount::mount(&export, &mnt, false).context("mounting the export")?);
    let src = mnt.join("app");
    fs::create_dir_all(src.join("churn"))?;
    say(&format!("filling a {} MiB file", cfg.file_mib));
    fill(&src.join("data.db"), cfg.file_mib).context("filling the data file")?;
    syncfs(&mnt).context("syncfs")?;

    let cg = Cgroup::new().context("creating the writer's cgroup")?;
    let bench_cfg = BenchConfig::quick(cfg.writer_cmd.clone());
    let spec = WriterSpec {
        file: src.join("data.db"),
        churn_dir: src.join("churn"),
        stop_file: work.join("stop"),
        rate_bytes_s: cfg.rate_mb_s * 1e6,
    };
    let phase = Duration::from_secs_f64(cfg.phase_secs);
    let alone = |what: &str| -> Result<WriterResult, BenchError> {
        say(&format!("writer alone ({what})"));
        let w = Writer::spawn(&bench_cfg, &spec, &cg)?;
        std::thread::sleep(phase);
        Ok(w.finish()?)
    };
    let alone_before = alone("control, before the copy")?;

    // cp of the image, for the bulk figure (the page cache is warm for both).
    let cp_dst = work.join("cp.img");
    let t = Instant::now();
    run_tool(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(&img)
            .arg(&cp_dst),
    )?;
    let cp_secs = t.elapsed().as_secs_f64();
    let _ = fs::remove_file(&cp_dst);

    say("writer during the copy (full copy, then bitmap rounds)");
    let target = work.join("copy.img");
    let w = Writer::spawn(&bench_cfg, &spec, &cg)?;
    let t = Instant::now();
    let mut copy = ServedCopy::start(&jobs_socket, &disk, "patchover-app", &target)
        .context("starting the copy")?;
    copy.wait(Duration::from_secs(600))
        .context("the full copy")?;
    let copy_secs = t.elapsed().as_secs_f64();
    let (mut follow_rounds, mut follow_shipped) = (0, 0u64);
    while t.elapsed() < phase {
        let Some(gap) = cfg.round_every else {
            std::thread::sleep(phase.saturating_sub(t.elapsed()));
            break;
        };
        std::thread::sleep(gap);
        for r in copy.catch_up(0, 1, Duration::from_secs(60))? {
            follow_rounds += 1;
            follow_shipped += r.bytes;
        }
    }
    let during = w.finish()?;

    say(&format!(
        "{} cuts, each compared with the frozen source",
        cfg.cuts
    ));
    let mut q = CgroupFreezer::new(cg.dir());
    // The scratch copy of the copy lives in memory: written to the host's disk, its writeback
    // would slow the flushes of the cuts that follow (a measurement artefact).
    let verify = PathBuf::from("/dev/shm")
        .join(format!("patchover-bench-verify-{}.img", std::process::id()));
    let vmnt = work.join("verify-mnt");
    fs::create_dir(&vmnt)?;
    let mut windows = Vec::new();
    let (mut syncs, mut starts, mut refs, mut completes) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut shipped = 0u64;
    let mut identical = 0;
    let mut first_diff = None;
    let mut ref_total = Duration::ZERO;
    let w = Writer::spawn(&bench_cfg, &spec, &cg)?;
    let phase_start = Instant::now();
    for i in 0..cfg.cuts {
        std::thread::sleep(cfg.cut_gap);
        // No bitmap round before the cut: the freeze does not depend on how much the cut's job
        // copies after the thaw, and a round's burst of 64 KiB clusters (QEMU 7.2's least
        // backup cluster) on the host's disk slows the flushes of the syncfs calls that follow
        // (measured: p50 20 → 35 ms with two rounds).
        let (cut, reference) =
            copy.cut(&mnt, &mut q, || tree_digest(&src), Duration::from_secs(60))?;
        let reference = reference?;
        tracing::debug!(cut = i + 1, presync = ?cut.presync, "bench: presync");
        windows.push(ms(cut.freeze));
        syncs.push(ms(cut.syncfs));
        starts.push(ms(cut.job_start));
        refs.push(ms(cut.while_frozen));
        ref_total += cut.while_frozen;
        completes.push(ms(cut.complete_after_thaw));
        shipped += cut.shipped;
        run_tool(
            Command::new("cp")
                .arg("--sparse=always")
                .arg(&target)
                .arg(&verify),
        )?;
        let vm = LoopMount::mount(&verify, &vmnt, false).context("mounting the copy")?;
        let copied = tree_digest(&vmnt.join("app"));
        drop(vm);
        let _ = fs::remove_file(&verify);
        match first_difference(&reference, &copied?) {
            None => identical += 1,
            Some(d) => {
                first_diff.get_or_insert(format!("cut {}: {d}", i + 1));
            }
        }
        say(&format!(
            "cut {}/{}: freeze {:.1} ms (syncfs {:.1}, job start {:.1}; reference {:.0} ms not counted; presync {:?}), {} KiB copied after the thaw in {:.0} ms, {}",
            i + 1,
            cfg.cuts,
            windows[i],
            ms(cut.syncfs),
            ms(cut.job_start),
            ms(cut.while_frozen),
            cut.presync
                .iter()
                .map(|d| ms(*d).round())
                .collect::<Vec<_>>(),
            cut.shipped / 1024,
            completes[i],
            if identical == i + 1 {
                "identical"
            } else {
                "DIFFERENT"
            }
        ));
    }
    let cut_phase = phase_start.elapsed();
    let during_cuts = w.finish()?;
    copy.close().context("closing the copy")?;
    let alone_after = alone("control, after the cuts")?;
    drop(cg);

    let mb_s = |r: &WriterResult| r.writes as f64 * 4096.0 / 1e6 / r.secs.max(1e-9);
    let alone_mb_s = (mb_s(&alone_before) + mb_s(&alone_after)) / 2.0;
    // The writer's own clock ran through the reference hashing, when it was frozen for the
    // check only.
    let cuts_secs = (during_cuts.secs - ref_total.as_secs_f64()).max(1e-9);
    let during_cuts_mb_s = during_cuts.writes as f64 * 4096.0 / 1e6 / cuts_secs;
    tracing::debug!(cut_phase = ?cut_phase, "bench: cut phase");
    let loss = (1.0 - mb_s(&during) / alone_mb_s).max(0.0);
    let p99 = pct(&windows, 0.99);
    Ok(ImageBenchReport {
        disk: "image",
        copier: "qemu-storage-daemon: dirty bitmap + point-in-time backup",
        disk_bytes,
        file_mib: cfg.file_mib,
        freeze: Freeze {
            cuts: windows.len(),
            p50_ms: pct(&windows, 0.5),
            p99_ms: p99,
            max_ms: pct(&windows, 1.0),
            measured_as: "from writing 1 to cgroup.freeze until cgroup.events said thawed, minus the hashing of the frozen source for the identity check",
            syncfs_p50_ms: pct(&syncs, 0.5),
            job_start_p50_ms: pct(&starts, 0.5),
            reference_p50_ms: pct(&refs, 0.5),
            mean_shipped_kib: shipped as f64 / 1024.0 / cfg.cuts as f64,
            complete_after_thaw_p50_ms: pct(&completes, 0.5),
            windows_ms: windows,
        },
        writer: WriterFigures {
            target_mb_s: cfg.rate_mb_s,
            alone_before_mb_s: mb_s(&alone_before),
            alone_after_mb_s: mb_s(&alone_after),
            alone_mb_s,
            during_copy_mb_s: mb_s(&during),
            round_every_ms: cfg.round_every.map(ms),
            follow_rounds,
            follow_shipped_mib: follow_shipped as f64 / (1 << 20) as f64,
            loss,
            during_cuts_mb_s,
            loss_with_cuts: (1.0 - during_cuts_mb_s / alone_mb_s).max(0.0),
            missed_in_cuts: during_cuts.missed,
        },
        identical: Identical {
            cuts: cfg.cuts,
            identical,
            compared_as: "file by file (length + hash): the source tree hashed while the writer was frozen, against the copy mounted (through a scratch copy of its image) once its job finished after the thaw",
            first_difference: first_diff,
        },
        bulk: Bulk {
            bytes: disk_bytes,
            copy_secs,
            cp_secs,
            ratio: cp_secs / copy_secs.max(1e-9),
        },
        goals: Goals {
            freeze_p99_lt_50ms: p99 < 50.0,
            writer_loss_le_10pct: loss <= 0.10,
            identical_at_every_cut: identical == cfg.cuts,
        },
    })
}

/// Prints the report as the directory bench does.
pub fn print(r: &ImageBenchReport) {
    let yes = |b: bool| if b { "met" } else { "MISSED" };
    println!(
        "image disk      ext4 image of {:.0} MiB served by qemu-storage-daemon (FUSE export, loop mount), copied by dirty bitmap + point-in-time backup",
        r.disk_bytes as f64 / 1048576.0,
    );
    println!(
        "bulk            full copy {:.2} s, cp --sparse {:.2} s → {:.2}× cp",
        r.bulk.copy_secs, r.bulk.cp_secs, r.bulk.ratio
    );
    println!(
        "freeze window   {} cuts: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (syncfs {:.1}, job start {:.1} p50); {:.0} KiB copied per cut, complete {:.0} ms after the thaw   (goal p99 < 50 ms: {})",
        r.freeze.cuts,
        r.freeze.p50_ms,
        r.freeze.p99_ms,
        r.freeze.max_ms,
        r.freeze.syncfs_p50_ms,
        r.freeze.job_start_p50_ms,
        r.freeze.mean_shipped_kib,
        r.freeze.complete_after_thaw_p50_ms,
        yes(r.goals.freeze_p99_lt_50ms)
    );
    println!(
        "writer          {:.1} MB/s alone ({:.1} before, {:.1} after), {:.1} MB/s while the copy runs ({} rounds{}, {:.0} MiB shipped) → {:.1}% loss   (goal ≤ 10%: {}); {:.1} MB/s during the cuts ({:.1}% loss, frozen time included)",
        r.writer.alone_mb_s,
        r.writer.alone_before_mb_s,
        r.writer.alone_after_mb_s,
        r.writer.during_copy_mb_s,
        r.writer.follow_rounds,
        r.writer
            .round_every_ms
            .map(|m| format!(" every {m:.0} ms"))
            .unwrap_or_default(),
        r.writer.follow_shipped_mib,
        r.writer.loss * 100.0,
        yes(r.goals.writer_loss_le_10pct),
        r.writer.during_cuts_mb_s,
        r.writer.loss_with_cuts * 100.0,
    );
    println!(
        "identical       {}/{} cuts{}   (goal all: {})",
        r.identical.identical,
        r.identical.cuts,
        r.identical
            .first_difference
            .as_ref()
            .map(|d| format!(", first difference: {d}"))
            .unwrap_or_default(),
        yes(r.goals.identical_at_every_cut)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_find_changed_missing_and_extra_files() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        for r in [&a, &b] {
            fs::create_dir_all(r.join("sub")).unwrap();
            fs::write(r.join("sub/x"), b"same").unwrap();
            fs::write(r.join("y"), b"one").unwrap();
        }
        let (da, db) = (tree_digest(&a).unwrap(), tree_digest(&b).unwrap());
        assert_eq!(first_difference(&da, &db), None);
        fs::write(b.join("y"), b"two").unwrap();
        let db = tree_digest(&b).unwrap();
        assert_eq!(first_difference(&da, &db).unwrap(), "y differs");
        fs::write(b.join("y"), b"one").unwrap();
        fs::write(b.join("z"), b"").unwrap();
        let db = tree_digest(&b).unwrap();
        assert_eq!(first_difference(&da, &db).unwrap(), "z only in the copy");
        assert_eq!(first_difference(&db, &da).unwrap(), "z missing in the copy");
    }
}
