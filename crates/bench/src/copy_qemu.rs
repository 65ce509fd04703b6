//! `patchover bench copy --backend qemu`: the live disk copy of a VM LC (QEMU's `blockdev-mirror`,
//! see `patchover_qemu::mirror`) measured against issue 3's goals, in one run:
//!
//! 1. boots a VM of the demo image with an application disk of `--file-mib` + 256 MiB (ext4),
//!    fills a `--file-mib` file on it (in the guest, `dd`), and starts `patchover-demo writer` in
//!    the guest: random 4 KiB `O_DIRECT` writes to that file at `--rate-mib`, plus small-file
//!    churn on the same disk;
//! 2. measures the writer while mirror jobs run, alone (a continuous baseline, after the cuts),
//!    and in *control phases* interleaved with the copies: as long as the copy phase before,
//!    with the same readings and a pause/resume at the end, but no mirror (so the readings' own
//!    cost in the guest and the host's load at the time weigh on both alike);
//! 3. cuts `--cuts` times as the patch cycle does (`patchover_orchestrator`'s `MirrorJob`):
//!    mirror start (background; write-blocking if it does not converge) → ready → pause the
//!    guest (`Pausable::set_frozen`) → non-forced cancel (a point-in-time copy) → *compare the
//!    images on the host while the guest is still paused* → resume;
//! 4. reports the freeze window (pause → resume, minus the compare, which production does not
//!    do), the writer's loss, identical N/N, and the first mirror's bulk rate against
//!    `cp --sparse=always` of the same image.
//!
//! Why the writer's figures are in guest time: the writer's report carries the guest's
//! monotonic clock, which stands still while the VM is paused, so the copy's cost to the
//! writer (I/O contention while the mirror runs) is measured apart from the pauses; the pauses
//! are added back in the "with freeze" figure.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{BenchError, Context};
use patchover_core::{Config, HostFacts, LcSpec};
use patchover_disk::bench::pct;
use patchover_lc::{LcBackend, Pausable, Stdio};
use patchover_qemu::backend::{QemuBackend, QemuConfig};
use patchover_qemu::{CopyMode, ImageFormat, Mirror, MirrorError, MirrorSpec, Qmp};
use serde::Serialize;

/// Room on the application disk besides the writer's file (churn, ext4 metadata).
const DISK_HEADROOM_MIB: u64 = 256;
/// How long a background mirror may take to be ready before it is restarted write-blocking.
const CONVERGE: Duration = Duration::from_secs(120);
/// Where the writer lives in the guest.
const GUEST_FILE_DIR: &str = "/data/bench";
const GUEST_REPORT: &str = "/tmp/po-writer.report";
const GUEST_LOG: &str = "/tmp/po-writer.log";

/// What to measure (the CLI's `--file-mib`, `--rate-mib`, … of `bench copy --backend qemu`).
#[derive(Debug, Clone)]
pub struct QemuBenchConfig {
    /// qemu: size of the file the guest writer writes to (MiB); the application disk is this
    /// plus 256 MiB.
    pub file_mib: u64,
    /// qemu: the writer's target rate of random 4 KiB writes (MiB/s).
    pub rate_mib: f64,
    /// qemu: writer threads in the guest.
    pub writer_threads: u32,
    /// qemu: how long the writer runs alone for the baseline (s).
    pub baseline_secs: f64,
    /// qemu: how long each ready mirror keeps in sync with the writer before its cut (ms).
    pub hold_ms: u64,
    /// qemu: the mirror's dirty-tracking granularity in bytes (0: QEMU's default, 64 KiB on a
    /// raw image, which makes each random 4 KiB write cost a 64 KiB copy).
    pub granularity: u32,
    /// qemu: the mirror's copy rate limit in MiB/s until it is ready (0: none); lifted once in
    /// sync.
    pub speed_mib: u64,
    /// qemu: start every mirror write-blocking (each guest write reaches both images before it
    /// completes) instead of background.
    pub write_blocking: bool,
    /// qemu: an image directory from `patchover image build-demo --qemu` (default: build one).
    pub image: Option<PathBuf>,
    /// qemu: the work directory (images, run and state dirs; default under /var/tmp, removed
    /// after the run).
    pub work_dir: Option<PathBuf>,
}

/// The whole result (`--json` prints it as one object).
#[derive(Debug, Serialize)]
pub struct QemuBenchReport {
    pub backend: &'static str,
    pub accel: String,
    pub disk_bytes: u64,
    pub file_mib: u64,
    pub writer: WriterFigures,
    pub freeze: FreezeFigures,
    pub identical: Identical,
    pub bulk: BulkFigures,
    pub copy_modes: CopyModes,
    /// The mirrors' dirty-tracking granularity (bytes; 0: QEMU's default).
    pub granularity: u32,
    pub goals: Goals,
}

#[derive(Debug, Serialize)]
pub struct WriterFigures {
    pub target_mib_s: f64,
    pub threads: u32,
    pub io: &'static str,
    /// The writer alone, no copy running, read at the start and end of one long window.
    pub baseline_mib_s: f64,
    pub baseline_secs: f64,
    /// The control phases: no copy, same length and readings as the copy phases, interleaved.
    pub control_mib_s: f64,
    pub control_secs: f64,
    /// While the mirror jobs ran (start → just before each pause), guest time.
    pub during_copy_mib_s: f64,
    pub during_copy_secs: f64,
    /// The same split: mirror start → ready (the bulk copy), and ready → pause (in sync).
    pub until_ready_mib_s: f64,
    pub until_ready_secs: f64,
    pub in_sync_mib_s: f64,
    pub in_sync_secs: f64,
    /// 1 − during_copy ÷ control.
    pub loss: f64,
    /// 1 − during_copy ÷ baseline.
    pub loss_vs_baseline: f64,
    /// Bytes of the copy phases over their time plus the freeze windows (loss against control).
    pub with_freeze_mib_s: f64,
    pub loss_with_freeze: f64,
    /// Small files created (and fsynced) per second during the baseline.
    pub churn_files_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct FreezeFigures {
    pub cuts: usize,
    /// Pause → resume minus the compare: what the service sees in production.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub measured_as: &'static str,
    /// The host compare of the images, done while paused and taken out of the windows above.
    pub compare_p50_ms: f64,
    /// The QMP `stop` call (including its connection) and the cut (`block-job-cancel` until
    /// the target is closed), each p50.
    pub pause_call_p50_ms: f64,
    pub cut_p50_ms: f64,
    pub resume_call_p50_ms: f64,
    /// Pause → resume with no cut (the control phases): the floor under the windows above.
    pub pause_resume_only_p50_ms: f64,
    /// Every window, in cut order.
    pub windows_ms: Vec<f64>,
}

#[derive(Debug, Serialize)]
pub struct Identical {
    pub identical: usize,
    pub cuts: usize,
    pub first_difference: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct BulkFigures {
    /// The image's size: what both copies covered.
    pub bytes: u64,
    /// First mirror: start → ready (it also copied what the writer rewrote meanwhile).
    pub mirror_secs: f64,
    pub mirror_bytes_per_s: f64,
    /// The job's own count of bytes copied by ready time.
    pub mirror_job_bytes: u64,
    pub cp_secs: f64,
    pub cp_bytes_per_s: f64,
    /// mirror ÷ cp.
    pub ratio: f64,
}

#[derive(Debug, Serialize)]
pub struct CopyModes {
    pub background: usize,
    pub write_blocking: usize,
}

#[derive(Debug, Serialize)]
pub struct Goals {
    pub freeze_p99_lt_50ms: bool,
    pub writer_loss_le_10pct: bool,
    pub identical_at_every_cut: bool,
}

/// One reading of the writer's report: guest ms since it started, random-write bytes so far,
/// small files so far.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sample {
    ms: f64,
    bytes: f64,
    churn: f64,
}

impl Sample {
    fn parse(line: &str) -> Option<Sample> {
        let f: Vec<f64> = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        (f.len() == 5).then(|| Sample {
            ms: f[0],
            bytes: f[1],
            churn: f[4],
        })
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Compares two images byte for byte; `None` when equal, else where they first differ.
pub fn compare_images(a: &Path, b: &Path) -> Result<Option<String>, BenchError> {
    let (la, lb) = (
        fs::metadata(a)
            .with_context(|| format!("stat {}", a.display()))?
            .len(),
        fs::metadata(b)
            .with_context(|| format!("stat {}", b.display()))?
            .len(),
    );
    if la != lb {
        return Ok(Some(format!("sizes differ: {la} vs {lb} bytes")));
    }
    const CHUNK: usize = 8 << 20;
    let (mut fa, mut fb) = (
        File::open(a).with_context(|| format!("open {}", a.display()))?,
        File::open(b).with_context(|| format!("open {}", b.display()))?,
    );
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut off = 0u64;
    while off < la {
        let n = CHUNK.min((la - off) as usize);
        // The second file is read on another thread: the compare is bound by reading both.
        let (ra, rb) = std::thread::scope(|s| {
            let h = s.spawn(|| fb.read_exact(&mut bb[..n]));
            (fa.read_exact(&mut ba[..n]), h.join())
        });
        ra.with_context(|| format!("read {}", a.display()))?;
        rb.map_err(|_| BenchError::Failed("reader thread panicked".to_owned()))?
            .with_context(|| format!("read {}", b.display()))?;
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            return Ok(Some(format!("first difference at byte {}", off + i as u64)));
        }
        off += n as u64;
    }
    Ok(None)
}

/// The run's VM and host leftovers; dropping it stops the VM and removes what the run made.
struct Rig {
    backend: QemuBackend<patchover_lc::host::LinuxHost>,
    spec: LcSpec,
    run_dir: PathBuf,
    work: PathBuf,
    remove_work: bool,
    bridge: String,
    made_bridge: bool,
    cgroup_parent: String,
    booted: bool,
}

impl Rig {
    fn exec(&self, script: &str) -> Result<String, BenchError> {
        let out = self
            .backend
            .exec(
                &self.spec,
                &["sh".to_owned(), "-c".to_owned(), script.to_owned()],
                Stdio::Capture,
            )
            .with_context(|| format!("in the guest: {script}"))?;
        if out.status != Some(0) {
            bail!(
                "in the guest: `{script}` exited with {:?}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn jobs_qmp(&self) -> Result<Qmp, BenchError> {
        let sock = patchover_qemu::backend::jobs_socket(&self.run_dir, &self.spec.id);
        Qmp::connect(&sock, Duration::from_secs(10)).context("connecting to the jobs monitor")
    }

    /// The writer's latest report line (it writes one every 100 ms).
    fn sample(&self, pid: &str) -> Result<Sample, BenchError> {
        for _ in 0..50 {
            let out = self.exec(&format!("tail -n 1 {GUEST_REPORT}"))?;
            if let Some(s) = Sample::parse(out.trim()) {
                return Ok(s);
            }
            self.writer_alive(pid)?;
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("the guest writer wrote no figures to {GUEST_REPORT}")
    }

    fn writer_alive(&self, pid: &str) -> Result<(), BenchError> {
        if self.exec(&format!("kill -0 {pid}")).is_err() {
            let log = self.exec(&format!("cat {GUEST_LOG}")).unwrap_or_default();
            bail!(
                "the guest writer (pid {pid}) is gone: {}; if it does not know `writer`, rebuild the guest binaries (scripts/build-guest) and the image",
                log.trim()
            );
        }
        Ok(())
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if self.booted
            && let Err(e) = self.backend.stop(&self.spec)
        {
            tracing::warn!(error = %patchover_core::error_chain(&e), "bench: stopping the VM");
        }
        if self.made_bridge {
            let _ = Command::new("ip")
                .args(["link", "del", &self.bridge])
                .output();
        }
        // The LC's own group went with stop; its parent is ours alone.
        for root in [
            "/sys/fs/cgroup",
            "/sys/fs/cgroup/cpu",
            "/sys/fs/cgroup/cpuset",
            "/sys/fs/cgroup/memory",
        ] {
            let _ = fs::remove_dir(Path::new(root).join(&self.cgroup_parent));
        }
        if self.remove_work {
            let _ = fs::remove_dir_all(&self.work);
        }
    }
}

fn run_tool(cmd: &mut Command) -> Result<(), BenchError> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Makes an empty ext4 application disk of `bytes` (sparse). Inode tables and journal are
/// written now (`lazy_*_init=0`): left lazy, the guest kernel zeroes them in the background
/// for the first minute after mounting, which would weigh on the baseline.
fn make_ext4(img: &Path, bytes: u64) -> Result<(), BenchError> {
    let f = File::create(img).with_context(|| format!("creating {}", img.display()))?;
    f.set_len(bytes)
        .with_context(|| format!("sizing {}", img.display()))?;
    drop(f);
    run_tool(
        Command::new("mkfs.ext4")
            .args(["-F", "-q", "-L", "app", "-m", "0"])
            .args(["-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(img),
    )
    .context("making the application disk (install e2fsprogs)")
}

fn unique() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{:05x}", (std::process::id() ^ t.rotate_left(9)) & 0xfffff)
}

/// Starts a mirror of the application disk and waits until it is ready: background first,
/// write-blocking if the writer keeps it from converging (as the patch cycle does).
fn mirror_ready(
    qmp: &mut Qmp,
    target: &Path,
    a: &QemuBenchConfig,
    mut say: impl FnMut(&str),
) -> Result<(Mirror, CopyMode, patchover_qemu::Progress), BenchError> {
    let granularity = (a.granularity > 0).then_some(a.granularity);
    let spec = |mode| MirrorSpec {
        job_id: "bench-app".to_owned(),
        device_node: "app".to_owned(),
        target_path: target.to_owned(),
        target_node: "bench-app-copy".to_owned(),
        format: ImageFormat::Raw,
        copy_mode: mode,
        speed: a.speed_mib << 20,
    };
    let first = if a.write_blocking {
        CopyMode::WriteBlocking
    } else {
        CopyMode::Background
    };
    let mut m = Mirror::start_granular(qmp, spec(first), granularity).context("mirror start")?;
    match m.wait_ready(qmp, CONVERGE) {
        Ok(p) => Ok((m, first, p)),
        Err(MirrorError::NotConverging { .. }) => {
            say("the mirror does not converge; starting again write-blocking");
            m.abort(qmp).context("mirror abort")?;
            let mut m = Mirror::start_granular(qmp, spec(CopyMode::WriteBlocking), granularity)
                .context("mirror start")?;
            match m.wait_ready(qmp, CONVERGE) {
                Ok(p) => Ok((m, CopyMode::WriteBlocking, p)),
                Err(e) => {
                    let _ = m.abort(qmp);
                    Err(e).context("mirror (write-blocking) not ready")
                }
            }
        }
        Err(e) => {
            let _ = m.abort(qmp);
            Err(e).context("mirror not ready")
        }
    }
}

/// Prints the report as the CLI shows it without `--json`.
pub fn print(r: &QemuBenchReport) {
    let mib = |b: f64| b / 1048576.0;
    let met = |b: bool| if b { "met" } else { "MISSED" };
    let f = &r.freeze;
    println!(
        "freeze window   {} cuts: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms   (goal p99 < 50 ms: {})",
        f.cuts,
        f.p50_ms,
        f.p99_ms,
        f.max_ms,
        met(r.goals.freeze_p99_lt_50ms)
    );
    println!("                measured as: {}", f.measured_as);
    println!(
        "                p50 parts: QMP stop {:.1} ms, cut {:.1} ms, QMP cont {:.1} ms; host compare (excluded) {:.0} ms; pause+resume alone {:.1} ms",
        f.pause_call_p50_ms,
        f.cut_p50_ms,
        f.resume_call_p50_ms,
        f.compare_p50_ms,
        f.pause_resume_only_p50_ms
    );
    let w = &r.writer;
    println!(
        "writer          target {:.0} MiB/s ({} threads, {}), {:.2} MiB/s alone ({:.0} s), {:.2} MiB/s in control phases ({:.0} s), {:.2} MiB/s while the mirror runs ({:.0} s) → {:.1}% loss vs control, {:.1}% vs alone   (goal ≤ 10%: {}); {:.2} MiB/s with the freeze windows ({:.1}% loss); {:.0} small files/s",
        w.target_mib_s,
        w.threads,
        w.io,
        w.baseline_mib_s,
        w.baseline_secs,
        w.control_mib_s,
        w.control_secs,
        w.during_copy_mib_s,
        w.during_copy_secs,
        w.loss * 100.0,
        w.loss_vs_baseline * 100.0,
        met(r.goals.writer_loss_le_10pct),
        w.with_freeze_mib_s,
        w.loss_with_freeze * 100.0,
        w.churn_files_per_s
    );
    println!(
        "                while copying: {:.2} MiB/s until ready ({:.1} s), {:.2} MiB/s once in sync ({:.1} s)",
        w.until_ready_mib_s, w.until_ready_secs, w.in_sync_mib_s, w.in_sync_secs
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
        met(r.goals.identical_at_every_cut)
    );
    let b = &r.bulk;
    println!(
        "bulk            {:.0} MiB image: first mirror {:.2} s = {:.0} MiB/s, cp --sparse=always {:.2} s = {:.0} MiB/s → {:.2}× cp",
        mib(b.bytes as f64),
        b.mirror_secs,
        mib(b.mirror_bytes_per_s),
        b.cp_secs,
        mib(b.cp_bytes_per_s),
        b.ratio
    );
    println!(
        "                accel {}; mirrors: {} background, {} write-blocking, granularity {} B",
        r.accel, r.copy_modes.background, r.copy_modes.write_blocking, r.granularity
    );
}

/// Runs the benchmark (`cuts` cuts, at least one), telling its progress to `say`.
pub fn run(
    cuts: usize,
    a: &QemuBenchConfig,
    say: &dyn Fn(&str),
) -> Result<QemuBenchReport, BenchError> {
    let cuts = cuts.max(1);
    if a.file_mib == 0 || a.rate_mib.is_nan() || a.rate_mib <= 0.0 || a.writer_threads == 0 {
        return Err(BenchError::Refused(
            "--file-mib, --rate-mib and --writer-threads must be positive".to_owned(),
        ));
    }
    let u = unique();
    let (work, remove_work) = match &a.work_dir {
        Some(d) => (d.clone(), false),
        None => (
            PathBuf::from(format!("/var/tmp/patchover-bench-qemu-{u}")),
            true,
        ),
    };
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let work = work.canonicalize()?;

    // 1. The image: kernel, initrd, system disk, and a grown application disk.
    let img = match &a.image {
        Some(d) => d.clone(),
        None => {
            say("building the demo VM image");
            let d = work.join("image");
            patchover_image::qemu::build_demo_qemu(&d, "1.0.0", 80, true, None)
                .context("building the demo VM image")?;
            d
        }
    };
    let (sys, app) = (work.join("system.img"), work.join("app.img"));
    fs::copy(img.join("system.img"), &sys).context("copying system.img")?;
    // The demo's app.img holds an empty data directory: an empty filesystem of the size
    // wanted is the same disk.
    let disk_bytes = (a.file_mib + DISK_HEADROOM_MIB) << 20;
    make_ext4(&app, disk_bytes)?;

    let bridge = format!("pobq{u}");
    let cgroup_parent = format!("po-benchq-{u}");
    let id = format!("bq{}", &u[..5]);
    let config_path = work.join("po.toml");
    fs::write(
        &config_path,
        format!(
            "state_dir = \"{w}/state\"\nrun_dir = \"{w}/run\"\ncgroup_parent = \"{cgroup_parent}\"\n\
             [network]\nbridge = \"{bridge}\"\n\
             [[lc]]\nid = \"{id}\"\nbackend = \"qemu\"\nkernel = \"{k}\"\ninitrd = \"{i}\"\n\
             cpu_share = 100\nmemory_mib = 256\n\
             system_disk = {{ path = \"{s}\" }}\napp_disk = {{ path = \"{ap}\", mount = \"/data\" }}\n",
            w = work.display(),
            k = img.join("vmlinuz").display(),
            i = img.join("initrd.img").display(),
            s = sys.display(),
            ap = app.display(),
        ),
    )?;
    let config = Config::load(&config_path, &HostFacts::probe()).context("bench config")?;
    let spec = config.lcs[0].clone();
    let exe = std::env::current_exe().context("cannot find the patchover binary")?;
    let made_bridge = !Path::new("/sys/class/net").join(&bridge).exists();
    let mut rig = Rig {
        backend: QemuBackend::new(
            patchover_lc::host::LinuxHost::new(exe),
            QemuConfig::from_config(&config),
        ),
        spec,
        run_dir: config.run_dir.clone(),
        work: work.clone(),
        remove_work,
        bridge,
        made_bridge,
        cgroup_parent,
        booted: false,
    };

    say("booting the VM");
    rig.booted = true;
    rig.backend
        .boot(&rig.spec)
        .context("booting the bench VM")?;
    rig.backend
        .wait_agent(&rig.spec, Duration::from_secs(120))
        .context("waiting for the guest agent")?;
    let accel = rig
        .backend
        .running(&rig.spec.id)
        .map_or_else(|| "?".to_owned(), |s| s.accel.to_string());

    say(&format!("filling a {} MiB file in the guest", a.file_mib));
    let file = format!("{GUEST_FILE_DIR}/big");
    let t = Instant::now();
    // In the background: one agent call must answer within seconds.
    rig.exec(&format!(
        "mkdir -p {GUEST_FILE_DIR} && rm -f /tmp/po-fill.rc && \
         (dd if=/dev/zero of={file} bs=1048576 count={} conv=fsync >/tmp/po-fill.log 2>&1; \
          echo $? >/tmp/po-fill.rc) </dev/null >/dev/null 2>&1 &",
        a.file_mib
    ))?;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let rc = rig.exec("cat /tmp/po-fill.rc 2>/dev/null || true")?;
        match rc.trim() {
            "" if t.elapsed() < Duration::from_secs(900) => continue,
            "" => bail!("filling {file} in the guest took more than 15 min"),
            "0" => break,
            rc => bail!(
                "dd of {file} in the guest exited with {rc}: {}",
                rig.exec("cat /tmp/po-fill.log").unwrap_or_default().trim()
            ),
        }
    }
    say(&format!("filled in {:.1} s", t.elapsed().as_secs_f64()));
    // Let the fill settle (the host writing the image's dirty pages back, the guest's ext4
    // journal) so that it does not weigh on the baseline.
    rig.exec("sync")?;
    run_tool(Command::new("sync").arg(&app))?;

    // 2. The writer, and its baseline.
    let pid = rig
        .exec(&format!(
            "rm -f {GUEST_REPORT}; patchover-demo writer --file {file} --rate-mib {} --block 4096 \
             --threads {} --churn-dir {GUEST_FILE_DIR}/churn --report {GUEST_REPORT} \
             --interval-ms 100 >{GUEST_LOG} 2>&1 </dev/null & echo $!",
            a.rate_mib, a.writer_threads
        ))?
        .trim()
        .to_owned();
    std::thread::sleep(Duration::from_secs(3));
    rig.writer_alive(&pid)?;
    // 3. cp of the same image, for the bulk comparison.
    let cp_dst = work.join("cp.img");
    let t = Instant::now();
    run_tool(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(&app)
            .arg(&cp_dst),
    )?;
    let cp_secs = t.elapsed().as_secs_f64();
    let _ = fs::remove_file(&cp_dst);
    say(&format!("cp --sparse=always: {cp_secs:.2} s"));

    // 4. The cuts.
    let mut qmp = rig.jobs_qmp()?;
    let target = work.join("copy.img");
    let mut windows = Vec::new();
    let (mut compares, mut pauses, mut cut_ms, mut resumes) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut copy_bytes, mut copy_ms) = (0.0, 0.0);
    let (mut bulk_bytes, mut bulk_ms, mut sync_bytes, mut sync_ms) = (0.0, 0.0, 0.0, 0.0);
    let (mut ctl_bytes, mut ctl_ms) = (0.0, 0.0);
    let mut bare_pauses = Vec::new();
    let mut identical = 0;
    let mut first_difference = None;
    let mut modes = CopyModes {
        background: 0,
        write_blocking: 0,
    };
    let mut bulk = None;
    for i in 0..cuts {
        let s0 = rig.sample(&pid)?;
        let t0 = Instant::now();
        let phase = Instant::now();
        let (mirror, mode, progress) = mirror_ready(&mut qmp, &target, a, say)?;
        let ready = t0.elapsed();
        match mode {
            CopyMode::Background => modes.background += 1,
            _ => modes.write_blocking += 1,
        }
        if bulk.is_none() {
            bulk = Some((ready.as_secs_f64(), progress.offset));
        }
        if a.speed_mib > 0 {
            // The limit spares the writer during the bulk copy; in sync the job copies only
            // what the guest writes, and a limit would only hold up the drain at the pause.
            mirror
                .set_speed(&mut qmp, 0)
                .context("lifting the mirror's rate limit")?;
        }
        let sr = rig.sample(&pid)?;
        std::thread::sleep(Duration::from_millis(a.hold_ms));
        let phase = phase.elapsed();
        let s1 = rig.sample(&pid)?;
        copy_bytes += s1.bytes - s0.bytes;
        copy_ms += s1.ms - s0.ms;
        bulk_bytes += sr.bytes - s0.bytes;
        bulk_ms += sr.ms - s0.ms;
        sync_bytes += s1.bytes - sr.bytes;
        sync_ms += s1.ms - sr.ms;

        let t_freeze = Instant::now();
        let frozen = rig.backend.set_frozen(&rig.spec, true);
        let t_paused = Instant::now();
        let cut = match frozen {
            Ok(()) => mirror.cut(&mut qmp, Duration::from_secs(60)).context("cut"),
            Err(e) => {
                let _ = mirror.abort(&mut qmp);
                Err(e).context("pausing the guest")
            }
        };
        let t_cut = Instant::now();
        let cmp = cut.as_ref().ok().map(|_| compare_images(&app, &target));
        let t_cmp = Instant::now();
        let resumed = rig.backend.set_frozen(&rig.spec, false);
        let t_resumed = Instant::now();
        let _ = fs::remove_file(&target);
        resumed.context("resuming the guest")?;
        cut?;
        let cmp = cmp.expect("compared after a cut")?;

        let compare = t_cmp - t_cut;
        let window = ms((t_resumed - t_freeze) - compare);
        windows.push(window);
        compares.push(ms(compare));
        pauses.push(ms(t_paused - t_freeze));
        cut_ms.push(ms(t_cut - t_paused));
        resumes.push(ms(t_resumed - t_cmp));
        // The control phase: the same, without a mirror.
        let c0 = rig.sample(&pid)?;
        std::thread::sleep(ready);
        let _ = rig.sample(&pid)?;
        std::thread::sleep(phase.saturating_sub(ready));
        let c1 = rig.sample(&pid)?;
        ctl_bytes += c1.bytes - c0.bytes;
        ctl_ms += c1.ms - c0.ms;
        let t = Instant::now();
        rig.backend
            .set_frozen(&rig.spec, true)
            .context("pausing the guest")?;
        let resumed = rig.backend.set_frozen(&rig.spec, false);
        bare_pauses.push(ms(t.elapsed()));
        resumed.context("resuming the guest")?;

        match cmp {
            None => identical += 1,
            Some(d) => {
                first_difference.get_or_insert(format!("cut {}: {d}", i + 1));
            }
        }
        say(&format!(
            "cut {}/{cuts}: {:?}, ready after {:.2} s, freeze {window:.1} ms (compare {:.0} ms), writer {:.2} MiB/s copying, {:.2} MiB/s control, {}",
            i + 1,
            mode,
            ready.as_secs_f64(),
            ms(compare),
            (s1.bytes - s0.bytes) / 1048576.0 / ((s1.ms - s0.ms) / 1000.0),
            (c1.bytes - c0.bytes) / 1048576.0 / ((c1.ms - c0.ms) / 1000.0),
            if identical == i + 1 {
                "identical"
            } else {
                "DIFFERENT"
            }
        ));
    }
    drop(qmp);

    // 5. The writer alone, after the cuts: right after the fill and boot it runs slower here
    // for a while, which would flatter the copy.
    say(&format!("writer alone for {:.0} s", a.baseline_secs));
    let b0 = rig.sample(&pid)?;
    std::thread::sleep(Duration::from_secs_f64(a.baseline_secs));
    let b1 = rig.sample(&pid)?;
    let baseline_secs = (b1.ms - b0.ms) / 1000.0;
    if baseline_secs <= 0.0 {
        bail!("the writer's clock did not advance during the baseline");
    }
    let baseline = (b1.bytes - b0.bytes) / 1048576.0 / baseline_secs;
    let churn_rate = (b1.churn - b0.churn) / baseline_secs;
    say(&format!(
        "writer alone: {baseline:.2} MiB/s, {churn_rate:.0} files/s"
    ));

    rig.writer_alive(&pid)?;

    let during = if copy_ms > 0.0 {
        copy_bytes / 1048576.0 / (copy_ms / 1000.0)
    } else {
        0.0
    };
    let freeze_total: f64 = windows.iter().sum();
    let with_freeze = copy_bytes / 1048576.0 / ((copy_ms + freeze_total) / 1000.0);
    let (mirror_secs, mirror_job_bytes) = bulk.unwrap_or_default();
    let mirror_rate = disk_bytes as f64 / mirror_secs;
    let cp_rate = disk_bytes as f64 / cp_secs;
    let control = if ctl_ms > 0.0 {
        ctl_bytes / 1048576.0 / (ctl_ms / 1000.0)
    } else {
        0.0
    };
    let loss = (1.0 - during / control).max(0.0);
    let p99 = pct(&windows, 0.99);
    Ok(QemuBenchReport {
        backend: "qemu",
        accel,
        disk_bytes,
        file_mib: a.file_mib,
        writer: WriterFigures {
            target_mib_s: a.rate_mib,
            threads: a.writer_threads,
            io: "O_DIRECT random 4 KiB + small-file churn",
            baseline_mib_s: baseline,
            baseline_secs,
            control_mib_s: control,
            control_secs: ctl_ms / 1000.0,
            during_copy_mib_s: during,
            during_copy_secs: copy_ms / 1000.0,
            until_ready_mib_s: bulk_bytes / 1048576.0 / (bulk_ms / 1000.0).max(1e-9),
            until_ready_secs: bulk_ms / 1000.0,
            in_sync_mib_s: sync_bytes / 1048576.0 / (sync_ms / 1000.0).max(1e-9),
            in_sync_secs: sync_ms / 1000.0,
            loss,
            loss_vs_baseline: (1.0 - during / baseline).max(0.0),
            with_freeze_mib_s: with_freeze,
            loss_with_freeze: (1.0 - with_freeze / control).max(0.0),
            churn_files_per_s: churn_rate,
        },
        freeze: FreezeFigures {
            cuts,
            p50_ms: pct(&windows, 0.5),
            p99_ms: p99,
            max_ms: pct(&windows, 1.0),
            measured_as: "from before the QMP stop until the QMP cont returned, minus the host compare done while paused (production does no compare)",
            compare_p50_ms: pct(&compares, 0.5),
            pause_call_p50_ms: pct(&pauses, 0.5),
            cut_p50_ms: pct(&cut_ms, 0.5),
            resume_call_p50_ms: pct(&resumes, 0.5),
            pause_resume_only_p50_ms: pct(&bare_pauses, 0.5),
            windows_ms: windows,
        },
        identical: Identical {
            identical,
            cuts,
            first_difference,
        },
        bulk: BulkFigures {
            bytes: disk_bytes,
            mirror_secs,
            mirror_bytes_per_s: mirror_rate,
            mirror_job_bytes,
            cp_secs,
            cp_bytes_per_s: cp_rate,
            ratio: mirror_rate / cp_rate,
        },
        copy_modes: modes,
        granularity: a.granularity,
        goals: Goals {
            freeze_p99_lt_50ms: p99 < 50.0,
            writer_loss_le_10pct: loss <= 0.10,
            identical_at_every_cut: identical == cuts,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_parse_figure_lines_only() {
        let s = Sample::parse("1200 5242880 524288 5.00 12").unwrap();
        assert_eq!((s.ms, s.bytes, s.churn), (1200.0, 5242880.0, 12.0));
        assert!(
            Sample::parse("# elapsed_ms total_bytes interval_bytes interval_mib_s churn_files")
                .is_none()
        );
        assert!(Sample::parse("").is_none());
        assert!(Sample::parse("1 2 3").is_none());
    }

    #[test]
    fn compare_finds_the_first_difference_and_size_mismatch() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        let mut data = vec![7u8; (8 << 20) + 4097];
        fs::write(&a, &data).unwrap();
        fs::write(&b, &data).unwrap();
        assert_eq!(compare_images(&a, &b).unwrap(), None);
        data[(8 << 20) + 5] = 0;
        fs::write(&b, &data).unwrap();
        assert_eq!(
            compare_images(&a, &b).unwrap().unwrap(),
            format!("first difference at byte {}", (8 << 20) + 5)
        );
        fs::write(&b, &data[..100]).unwrap();
        assert!(
            compare_images(&a, &b)
                .unwrap()
                .unwrap()
                .contains("sizes differ")
        );
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(pct(&v, 0.5), 10.0);
        assert_eq!(pct(&v, 0.99), 20.0);
        assert_eq!(pct(&[], 0.5), 0.0);
    }
}
