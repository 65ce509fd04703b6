//! `patchover bench copy`: the figures of issue 3, each against a baseline measured in the same
//! run, on scratch filesystems the benchmark makes and removes itself (loop-mounted images under
//! `/var/tmp`, so other activity on the host's filesystems does not reach the write trap).
//!
//! 1. Bulk throughput against `cp -a --reflink=never` on ext4 (no reflink possible there).
//! 2. The reflink case on xfs against the same `cp`.
//! 3. A writer process in its own cgroup v2 does random 4 KiB writes at a fixed rate to a large
//!    file plus small-file churn; its throughput alone is the baseline, then it runs during a
//!    follow copy with repeated cuts (freeze windows p50/p99), then more cuts compare the copy
//!    with the frozen source (identical at every cut).
//!
//! The writer is a separate process (the caller supplies the command, normally the `patchover`
//! binary itself with a hidden flag) so that freezing its cgroup freezes it and nothing else.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{CgroupFreezer, CopyOptions, FollowCopy, NoProgress, Reflink, copy_once};

/// Errors of the benchmark harness (the copies themselves report [`crate::CopyError`]).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("benchmark setup: {what}")]
    Setup {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("benchmark step `{0}` failed: run it by hand to see why")]
    Command(String),
    #[error("benchmark copy failed")]
    Copy(#[source] crate::CopyError),
    #[error("the writer process failed: {0}")]
    Writer(String),
}

fn setup(what: impl Into<String>) -> impl FnOnce(io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Setup { what, source }
}

/// Sizes of one benchmark run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchConfig {
    pub small_files: usize,
    pub big_files: usize,
    pub big_file_mib: u64,
    pub writer_file_mib: u64,
    pub writer_rate_mb_s: f64,
    pub cuts: usize,
    pub verified_cuts: usize,
    pub cut_gap: Duration,
    pub baseline_secs: f64,
    pub repeats: usize,
    /// Replay reads whole modified files (no write-range log): the baseline of the freeze window.
    pub whole_file: bool,
    /// Only the writer's part (loss, freeze windows, comparisons): no bulk or reflink figures.
    pub freeze_only: bool,
    /// Program and leading arguments that run [`writer_main`]; the spec (JSON) is appended.
    #[serde(skip)]
    pub writer_cmd: Vec<OsString>,
}

impl BenchConfig {
    /// The workload: ≥20 cuts, a 1 GiB file written at 20 MB/s.
    pub fn full(writer_cmd: Vec<OsString>) -> BenchConfig {
        BenchConfig {
            small_files: 20_000,
            big_files: 4,
            big_file_mib: 128,
            writer_file_mib: 1024,
            writer_rate_mb_s: 20.0,
            cuts: 20,
            verified_cuts: 8,
            cut_gap: Duration::from_millis(300),
            baseline_secs: 8.0,
            repeats: 2,
            whole_file: false,
            freeze_only: false,
            writer_cmd,
        }
    }

    /// A CI-sized run (seconds, not minutes).
    pub fn quick(writer_cmd: Vec<OsString>) -> BenchConfig {
        BenchConfig {
            small_files: 3000,
            big_files: 2,
            big_file_mib: 32,
            writer_file_mib: 64,
            writer_rate_mb_s: 20.0,
            cuts: 20,
            verified_cuts: 5,
            cut_gap: Duration::from_millis(100),
            baseline_secs: 3.0,
            repeats: 1,
            whole_file: false,
            freeze_only: false,
            writer_cmd,
        }
    }
}

/// What the writer child is told to do.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WriterSpec {
    pub file: PathBuf,
    pub churn_dir: PathBuf,
    pub stop_file: PathBuf,
    pub rate_bytes_s: f64,
}

/// What the writer child did.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct WriterResult {
    pub writes: u64,
    pub missed: u64,
    pub churn_ops: u64,
    pub secs: f64,
}

impl WriterResult {
    pub fn mb_s(&self) -> f64 {
        self.writes as f64 * 4096.0 / 1e6 / self.secs.max(1e-9)
    }
}

/// The writer: random 4 KiB writes at `rate_bytes_s` (slots more than 100 ms late are dropped and
/// counted as missed) plus small-file churn, until `stop_file` exists. Prints nothing; returns
/// the counts.
pub fn writer_main(spec: &WriterSpec) -> io::Result<WriterResult> {
    let f = OpenOptions::new().write(true).open(&spec.file)?;
    let blocks = f.metadata()?.len() / 4096;
    fs::create_dir_all(&spec.churn_dir)?;
    let per_s = spec.rate_bytes_s / 4096.0;
    let max_backlog = (per_s * 0.1).max(1.0) as u64;
    let mut buf = [0u8; 4096];
    let mut x: u64 = 0x9E3779B97F4A7C15 ^ std::process::id() as u64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut r = WriterResult::default();
    let start = Instant::now();
    let mut slots: u64 = 0;
    let mut last_check = Instant::now();
    let mut n_churn: u64 = 0;
    loop {
        if last_check.elapsed() > Duration::from_millis(50) {
            last_check = Instant::now();
            if spec.stop_file.exists() {
                break;
            }
        }
        let due = (start.elapsed().as_secs_f64() * per_s) as u64;
        if due > slots + max_backlog {
            r.missed += due - slots - max_backlog;
            slots = due - max_backlog;
        }
        if slots >= due {
            std::thread::sleep(Duration::from_micros(300));
            continue;
        }
        let v = rnd();
        buf[..8].copy_from_slice(&v.to_le_bytes());
        buf[4088..].copy_from_slice(&slots.to_le_bytes());
        f.write_all_at(&buf, (v % blocks) * 4096)?;
        slots += 1;
        r.writes += 1;
        if r.writes % 64 == 0 {
            churn(&spec.churn_dir, n_churn, &mut rnd)?;
            n_churn += 1;
            r.churn_ops += 1;
        }
    }
    r.secs = start.elapsed().as_secs_f64();
    Ok(r)
}

fn churn(dir: &Path, n: u64, rnd: &mut impl FnMut() -> u64) -> io::Result<()> {
    let len = 512 + (rnd() % 8192) as usize;
    fs::write(dir.join(format!("c{n}")), vec![(n % 251) as u8; len])?;
    if n % 4 == 1 {
        let _ = fs::rename(
            dir.join(format!("c{}", n - 1)),
            dir.join(format!("r{}", n - 1)),
        );
    }
    if n >= 100 {
        let _ = fs::remove_file(dir.join(format!("c{}", n - 100)));
        let _ = fs::remove_file(dir.join(format!("r{}", n - 100)));
    }
    Ok(())
}

/// All figures of one run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub config: BenchConfig,
    /// The three copy figures (none with `freeze_only`).
    pub bulk: Option<Versus>,
    /// The bulk tree on xfs, reflinked.
    pub reflink: Option<Versus>,
    /// One image file (the size of the writer's file) on xfs, reflinked.
    pub reflink_image: Option<Versus>,
    pub freeze: Freeze,
    pub writer: WriterLoss,
    pub identical: Identical,
    pub goals: Goals,
}

/// One timed copy of the same tree by `cp -a --reflink=never` and by patchover.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Versus {
    pub fs: &'static str,
    pub bytes: u64,
    pub files: u64,
    pub cp_secs: f64,
    pub patchover_secs: f64,
    /// cp time / patchover time: > 1 means patchover is faster.
    pub ratio: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Freeze {
    pub cuts: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_shipped_kib: f64,
    /// Source bytes read (and hashed) per frozen round, mean.
    pub mean_read_kib: f64,
    /// Whether the write-range log was in use (false: whole modified files were read).
    pub range_log: bool,
    /// Each phase of the window (ms): p50 and p99 over the cuts.
    pub phases: Vec<Phase>,
}

/// One phase of the freeze window over the cuts.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Phase {
    pub name: &'static str,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// The phases of [`crate::CutReport::phases`], by name.
fn phases(cuts: &[crate::CutPhases]) -> Vec<Phase> {
    type Get = fn(&crate::CutPhases) -> Duration;
    let all: [(&'static str, Get); 6] = [
        ("freeze", |p| p.freeze),
        ("drain", |p| p.drain),
        ("read", |p| p.read),
        ("write", |p| p.write),
        ("other", |p| p.other),
        ("thaw", |p| p.thaw),
    ];
    all.iter()
        .map(|(name, get)| {
            let v: Vec<f64> = cuts.iter().map(|c| get(c).as_secs_f64() * 1000.0).collect();
            Phase {
                name,
                p50_ms: pct(&v, 0.5),
                p99_ms: pct(&v, 0.99),
            }
        })
        .collect()
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct WriterLoss {
    pub target_mb_s: f64,
    pub alone_mb_s: f64,
    /// While the copy runs: bulk copy, then background replay rounds (no cuts).
    pub during_copy_mb_s: f64,
    /// 1 - during_copy/alone.
    pub loss: f64,
    /// While cuts are made back to back (`cuts` freezes, `cut_gap` apart).
    pub during_cuts_mb_s: f64,
    /// 1 - during_cuts/alone: includes the time frozen.
    pub loss_with_cuts: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Identical {
    pub cuts: usize,
    pub identical: usize,
    pub first_difference: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Goals {
    pub bulk_ge_0_9_cp: Option<bool>,
    /// Judged on the image file (data-dominated, as reflink is about data).
    pub reflink_ge_10x_cp: Option<bool>,
    /// Issue 26: p99 < 20 ms whatever the size of the files written.
    pub freeze_p99_lt_20ms: bool,
    pub writer_loss_le_10pct: bool,
    pub identical_at_every_cut: bool,
}

/// A filesystem image on a loop device; unmounted and deleted on drop.
struct Scratch {
    dir: PathBuf,
    mnt: PathBuf,
}

impl Scratch {
    fn new(fstype: &str, size_mib: u64) -> Result<Scratch, BenchError> {
        let dir = PathBuf::from(format!(
            "/var/tmp/patchover-bench-{}-{}-{fstype}",
            std::process::id(),
            Instant::now().elapsed().subsec_nanos() ^ rand_u32()
        ));
        fs::create_dir_all(dir.join("mnt")).map_err(setup(format!("create {}", dir.display())))?;
        let s = Scratch {
            mnt: dir.join("mnt"),
            dir,
        };
        let img = s.dir.join("img");
        File::create(&img)
            .and_then(|f| f.set_len(size_mib << 20))
            .map_err(setup("create the image file"))?;
        let mk = match fstype {
            "xfs" => sh(Command::new("mkfs.xfs")
                .args(["-q", "-f", "-m", "reflink=1"])
                .arg(&img)),
            _ => sh(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img)),
        };
        mk?;
        sh(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&s.mnt))?;
        Ok(s)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.mnt)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    let _ = File::open("/dev/urandom").and_then(|mut f| io::Read::read_exact(&mut f, &mut b));
    u32::from_ne_bytes(b)
}

fn sh(c: &mut Command) -> Result<(), BenchError> {
    let out = c
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(setup(format!("run {c:?}")))?;
    if !out.status.success() {
        tracing::error!(cmd = ?c, stderr = %String::from_utf8_lossy(&out.stderr), "bench step failed");
        return Err(BenchError::Command(format!("{c:?}")));
    }
    Ok(())
}

/// A cgroup v2 directory for the writer; removed on drop (after its tasks are gone).
pub struct Cgroup {
    dir: PathBuf,
}

impl Cgroup {
    /// A fresh group under the v2 hierarchy, so that freezing it freezes the writer alone.
    pub fn new() -> Result<Cgroup, BenchError> {
        let dir = PathBuf::from(format!(
            "/sys/fs/cgroup/unified/patchover-bench-{}-{:08x}",
            std::process::id(),
            rand_u32()
        ));
        fs::create_dir(&dir).map_err(setup(format!("create cgroup {}", dir.display())))?;
        Ok(Cgroup { dir })
    }

    /// The group's directory (for a [`CgroupFreezer`]).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = fs::write(self.dir.join("cgroup.freeze"), "0");
        for _ in 0..100 {
            if fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A running writer child (in its own [`Cgroup`]); killed on drop if still running.
pub struct Writer {
    child: Option<Child>,
    stop: PathBuf,
}

impl Writer {
    /// Runs `cfg.writer_cmd` with `spec` and moves it into `cg`.
    pub fn spawn(cfg: &BenchConfig, spec: &WriterSpec, cg: &Cgroup) -> Result<Writer, BenchError> {
        let _ = fs::remove_file(&spec.stop_file);
        let (prog, args) = cfg
            .writer_cmd
            .split_first()
            .ok_or_else(|| BenchError::Writer("no writer command".into()))?;
        let json = serde_json::to_string(spec).map_err(|e| BenchError::Writer(e.to_string()))?;
        let child = Command::new(prog)
            .args(args)
            .arg(json)
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .map_err(setup("spawn the writer"))?;
        fs::write(cg.dir.join("cgroup.procs"), child.id().to_string())
            .map_err(setup("move the writer into its cgroup"))?;
        Ok(Writer {
            child: Some(child),
            stop: spec.stop_file.clone(),
        })
    }

    /// Tells the writer to stop and returns what it did.
    pub fn finish(mut self) -> Result<WriterResult, BenchError> {
        File::create(&self.stop).map_err(setup("stop the writer"))?;
        let child = self
            .child
            .take()
            .ok_or_else(|| BenchError::Writer("gone".into()))?;
        let out = child
            .wait_with_output()
            .map_err(setup("wait for the writer"))?;
        if !out.status.success() {
            return Err(BenchError::Writer(format!("exited with {}", out.status)));
        }
        serde_json::from_slice(&out.stdout)
            .map_err(|e| BenchError::Writer(format!("bad report: {e}")))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn gen_tree(root: &Path, cfg: &BenchConfig) -> io::Result<(u64, u64)> {
    let mut bytes = 0;
    let mut x: u64 = 88172645463325252;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut buf = vec![0u8; 1 << 20];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i * 131 % 251) as u8;
    }
    for i in 0..cfg.small_files {
        let d = root
            .join(format!("d{:03}", i % 100))
            .join(format!("e{}", i % 7));
        if i < 700 {
            fs::create_dir_all(&d)?;
        }
        let len = 256 + (rnd() % 16384) as usize;
        let off = (rnd() % (buf.len() as u64 - 20000)) as usize;
        fs::write(d.join(format!("f{i}")), &buf[off..off + len])?;
        bytes += len as u64;
    }
    for i in 0..cfg.big_files {
        let mut f = File::create(root.join(format!("big{i}.img")))?;
        for j in 0..cfg.big_file_mib {
            buf[0..8].copy_from_slice(&(j ^ i as u64).to_le_bytes());
            f.write_all(&buf)?;
        }
        bytes += cfg.big_file_mib << 20;
    }
    Ok((bytes, (cfg.small_files + cfg.big_files) as u64))
}

fn fill(p: &Path, mib: u64) -> io::Result<()> {
    let mut f = File::create(p)?;
    let mut buf = vec![0u8; 1 << 20];
    for j in 0..mib {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ((i as u64 + j) % 253) as u8;
        }
        f.write_all(&buf)?;
    }
    Ok(())
}

fn sync_all() {
    // SAFETY: sync(2) takes no arguments.
    unsafe { libc::sync() };
}

fn time_pair(
    src: &Path,
    scratch: &Path,
    reflink: Reflink,
    repeats: usize,
) -> Result<(f64, f64), BenchError> {
    let mut best_cp = f64::MAX;
    let mut best_us = f64::MAX;
    for r in 0..repeats.max(1) {
        let dst = scratch.join(format!("cp{r}"));
        sync_all();
        let t = Instant::now();
        sh(Command::new("cp")
            .args(["-a", "--reflink=never"])
            .arg(src)
            .arg(&dst))?;
        best_cp = best_cp.min(t.elapsed().as_secs_f64());
        let _ = fs::remove_dir_all(&dst);

        let dst = scratch.join(format!("po{r}"));
        sync_all();
        let opts = CopyOptions {
            reflink,
            sync: false,
            ..CopyOptions::default()
        };
        let t = Instant::now();
        copy_once(src, &dst, &opts, &NoProgress).map_err(BenchError::Copy)?;
        best_us = best_us.min(t.elapsed().as_secs_f64());
        let _ = fs::remove_dir_all(&dst).or_else(|_| fs::remove_file(&dst));
    }
    Ok((best_cp, best_us))
}

/// The `p` quantile of `v` (nearest rank); 0 for no values.
pub fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let i = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
    s[i]
}

/// Bulk and reflink figures: (bulk on ext4, tree on xfs, image on xfs).
fn copy_figures(
    cfg: &BenchConfig,
    say: &dyn Fn(&str),
) -> Result<(Versus, Versus, Versus), BenchError> {
    let data_mib =
        ((cfg.small_files as u64 * 9 * 1024) >> 20) + cfg.big_files as u64 * cfg.big_file_mib;

    // 1. Bulk on ext4.
    say("bulk copy on ext4 against cp -a --reflink=never");
    let ext = Scratch::new("ext4", (data_mib * 3 + 512).max(1024))?;
    let src = ext.mnt.join("src");
    let (bytes, files) = gen_tree(&src, cfg).map_err(setup("generate the tree"))?;
    let (cp, us) = time_pair(&src, &ext.mnt, Reflink::Never, cfg.repeats)?;
    let bulk = Versus {
        fs: "ext4",
        bytes,
        files,
        cp_secs: cp,
        patchover_secs: us,
        ratio: cp / us,
    };
    drop(ext);

    // 2. Reflink on xfs.
    say("reflink copy on xfs against cp -a --reflink=never");
    let xfs = Scratch::new("xfs", data_mib * 3 + cfg.writer_file_mib * 2 + 1024)?;
    let src = xfs.mnt.join("src");
    gen_tree(&src, cfg).map_err(setup("generate the tree"))?;
    let (cp, us) = time_pair(&src, &xfs.mnt, Reflink::Auto, cfg.repeats)?;
    let reflink = Versus {
        fs: "xfs",
        bytes,
        files,
        cp_secs: cp,
        patchover_secs: us,
        ratio: cp / us,
    };
    fs::remove_dir_all(&src).map_err(setup("remove the tree"))?;
    say("reflink copy of an image file on xfs against cp -a --reflink=never");
    let img_dir = xfs.mnt.join("images");
    fs::create_dir(&img_dir).map_err(setup("create the image dir"))?;
    let img = img_dir.join("disk.img");
    fill(&img, cfg.writer_file_mib).map_err(setup("create the image file"))?;
    let (cp, us) = time_pair(&img, &xfs.mnt, Reflink::Auto, cfg.repeats)?;
    let reflink_image = Versus {
        fs: "xfs",
        bytes: cfg.writer_file_mib << 20,
        files: 1,
        cp_secs: cp,
        patchover_secs: us,
        ratio: cp / us,
    };
    Ok((bulk, reflink, reflink_image))
}

/// Runs the whole benchmark. `say` gets one line per step, for a human watching.
pub fn run(cfg: &BenchConfig, say: &dyn Fn(&str)) -> Result<BenchReport, BenchError> {
    let copies = if cfg.freeze_only {
        None
    } else {
        Some(copy_figures(cfg, say)?)
    };
    let (bulk, reflink, reflink_image) = match copies {
        Some((a, b, c)) => (Some(a), Some(b), Some(c)),
        None => (None, None, None),
    };

    // 3. Writer, cuts.
    let wfs = Scratch::new("ext4", cfg.writer_file_mib * 3 + 1024)?;
    let src = wfs.mnt.join("app");
    fs::create_dir_all(src.join("churn")).map_err(setup("create the app tree"))?;
    fill(&src.join("data.db"), cfg.writer_file_mib).map_err(setup("fill the data file"))?;
    sync_all();
    let cg = Cgroup::new()?;
    let spec = WriterSpec {
        file: src.join("data.db"),
        churn_dir: src.join("churn"),
        stop_file: wfs.dir.join("stop"),
        rate_bytes_s: cfg.writer_rate_mb_s * 1e6,
    };
    say("writer alone (baseline)");
    let w = Writer::spawn(cfg, &spec, &cg)?;
    std::thread::sleep(Duration::from_secs_f64(cfg.baseline_secs));
    let alone = w.finish()?;

    say("writer during a follow copy (bulk copy, then background replay)");
    let mut q = CgroupFreezer::new(&cg.dir);
    let w = Writer::spawn(cfg, &spec, &cg)?;
    let dst = wfs.mnt.join("copy");
    let opts = CopyOptions {
        sync: false,
        ranges: !cfg.whole_file,
        ..CopyOptions::default()
    };
    let mut follow =
        FollowCopy::start(&src, &dst, &opts, Arc::new(NoProgress)).map_err(BenchError::Copy)?;
    std::thread::sleep(Duration::from_secs_f64(cfg.baseline_secs));
    let during = w.finish()?;

    say("writer during cuts");
    let w = Writer::spawn(cfg, &spec, &cg)?;
    let mut windows = Vec::new();
    let mut cut_phases = Vec::new();
    let mut shipped = 0u64;
    let mut read = 0u64;
    for _ in 0..cfg.cuts {
        std::thread::sleep(cfg.cut_gap);
        let c = follow.checkpoint(&mut q, false).map_err(BenchError::Copy)?;
        windows.push(c.freeze_window.as_secs_f64() * 1000.0);
        cut_phases.push(c.phases);
        shipped += c.bytes_shipped;
        read += c.bytes_read;
    }
    let range_log = follow.stats().is_some_and(|s| s.range_log);
    let during_cuts = w.finish()?;

    say("cuts compared with the frozen source");
    let w = Writer::spawn(cfg, &spec, &cg)?;
    let mut identical = Identical {
        cuts: 0,
        identical: 0,
        first_difference: None,
    };
    for _ in 0..cfg.verified_cuts {
        std::thread::sleep(cfg.cut_gap);
        identical.cuts += 1;
        match follow.checkpoint(&mut q, true) {
            Ok(c) => {
                if c.verified == Some(true) {
                    identical.identical += 1;
                }
            }
            Err(crate::CopyError::Mismatch(m)) => {
                identical.first_difference.get_or_insert(m);
            }
            Err(e) => return Err(BenchError::Copy(e)),
        }
    }
    let _ = w.finish()?;
    let rep = follow.cut_with(&mut q, true).map_err(BenchError::Copy)?;
    if let Some(c) = &rep.cut {
        identical.cuts += 1;
        if c.verified == Some(true) {
            identical.identical += 1;
        }
    }
    drop(cg);
    drop(wfs);

    let freeze = Freeze {
        cuts: windows.len(),
        p50_ms: pct(&windows, 0.5),
        p99_ms: pct(&windows, 0.99),
        max_ms: windows.iter().cloned().fold(0.0, f64::max),
        mean_shipped_kib: shipped as f64 / 1024.0 / cfg.cuts.max(1) as f64,
        mean_read_kib: read as f64 / 1024.0 / cfg.cuts.max(1) as f64,
        range_log,
        phases: phases(&cut_phases),
    };
    let writer = WriterLoss {
        target_mb_s: cfg.writer_rate_mb_s,
        alone_mb_s: alone.mb_s(),
        during_copy_mb_s: during.mb_s(),
        loss: 1.0 - during.mb_s() / alone.mb_s().max(1e-9),
        during_cuts_mb_s: during_cuts.mb_s(),
        loss_with_cuts: 1.0 - during_cuts.mb_s() / alone.mb_s().max(1e-9),
    };
    let goals = Goals {
        bulk_ge_0_9_cp: bulk.as_ref().map(|b| b.ratio >= 0.9),
        reflink_ge_10x_cp: reflink_image.as_ref().map(|r| r.ratio >= 10.0),
        freeze_p99_lt_20ms: freeze.p99_ms < 20.0,
        writer_loss_le_10pct: writer.loss <= 0.10,
        identical_at_every_cut: identical.cuts > 0 && identical.identical == identical.cuts,
    };
    Ok(BenchReport {
        config: cfg.clone(),
        bulk,
        reflink,
        reflink_image,
        freeze,
        writer,
        identical,
        goals,
    })
}
