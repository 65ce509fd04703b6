//! `patchover bench copy`: disk copy throughput against `cp -a`, reflink, freeze windows and the
//! writer's throughput loss, all measured in one run (see `patchover_disk::bench`).
//! `--backend qemu` measures the VM's copy (QEMU mirror jobs) instead: see
//! [`patchover_bench::copy_qemu`]. `--disk image` measures an `ns` LC's image disk served by
//! qemu-storage-daemon and copied by QEMU's dirty bitmap: see [`patchover_bench::copy_image`].

use std::process::ExitCode;

use anyhow::Context;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use patchover_disk::bench::{self, BenchConfig, WriterSpec};

use patchover_bench::BenchError;
use patchover_bench::copy_image::{self as bench_copy_image, ImageBenchConfig};
use patchover_bench::copy_qemu::{self as bench_copy_qemu, QemuBenchConfig};

use super::{BadInput, Ctx};

/// Which kind of `ns` disk to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DiskArg {
    /// A directory (the file copier, fanotify write history).
    Dir,
    /// An ext4 image served by qemu-storage-daemon and loop-mounted (QEMU's dirty bitmap).
    Image,
}

/// Which kind of LC's disk copy to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CopyBackend {
    /// The file copier of namespace LCs (fanotify write history).
    Ns,
    /// QEMU's mirror jobs on a VM's disk (the VM's own write tracking).
    Qemu,
}

#[derive(Args, Debug, Clone)]
pub struct QemuArgs {
    /// qemu: size of the file the guest writer writes to (MiB); the application disk is this
    /// plus 256 MiB.
    #[arg(long, default_value_t = 1024)]
    pub file_mib: u64,
    /// qemu: the writer's target rate of random 4 KiB writes (MiB/s).
    #[arg(long, default_value_t = 20.0)]
    pub rate_mib: f64,
    /// qemu: writer threads in the guest.
    #[arg(long, default_value_t = 4)]
    pub writer_threads: u32,
    /// qemu: how long the writer runs alone for the baseline (s).
    #[arg(long, default_value_t = 20.0)]
    pub baseline_secs: f64,
    /// qemu: how long each ready mirror keeps in sync with the writer before its cut (ms).
    #[arg(long, default_value_t = 1000)]
    pub hold_ms: u64,
    /// qemu: the mirror's dirty-tracking granularity in bytes (0: QEMU's default, 64 KiB on a
    /// raw image, which makes each random 4 KiB write cost a 64 KiB copy).
    #[arg(long, default_value_t = 4096)]
    pub granularity: u32,
    /// qemu: the mirror's copy rate limit in MiB/s until it is ready (0: none); lifted once in
    /// sync.
    #[arg(long, default_value_t = 0)]
    pub speed_mib: u64,
    /// qemu: start every mirror write-blocking (each guest write reaches both images before it
    /// completes) instead of background.
    #[arg(long)]
    pub write_blocking: bool,
    /// qemu: an image directory from `patchover image build-demo --qemu` (default: build one).
    #[arg(long, value_name = "DIR")]
    pub image: Option<PathBuf>,
    /// qemu: the work directory (images, run and state dirs; default under /var/tmp, removed
    /// after the run).
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
}

impl QemuArgs {
    /// The benchmark's configuration.
    fn config(&self) -> QemuBenchConfig {
        QemuBenchConfig {
            file_mib: self.file_mib,
            rate_mib: self.rate_mib,
            writer_threads: self.writer_threads,
            baseline_secs: self.baseline_secs,
            hold_ms: self.hold_ms,
            granularity: self.granularity,
            speed_mib: self.speed_mib,
            write_blocking: self.write_blocking,
            image: self.image.clone(),
            work_dir: self.work_dir.clone(),
        }
    }
}

/// A benchmark's failure at the edge: a refusal is bad input (exit code 2).
fn bench_error(e: BenchError) -> anyhow::Error {
    if e.is_bad_input() {
        BadInput(e.to_string()).into()
    } else {
        e.into()
    }
}

#[derive(Args)]
pub struct BenchArgs {
    /// The copier to measure.
    #[arg(long, value_enum, default_value_t = CopyBackend::Ns)]
    pub backend: CopyBackend,
    /// ns: the kind of disk to copy.
    #[arg(long, value_enum, default_value_t = DiskArg::Dir)]
    pub disk: DiskArg,
    /// A CI-sized run: smaller tree and data file, fewer verified cuts (about 30 s).
    #[arg(long)]
    pub quick: bool,
    /// Cuts for the freeze-window figures.
    #[arg(long)]
    pub cuts: Option<usize>,
    /// --disk image: milliseconds between the dirty-bitmap rounds that ship writes while the
    /// copy follows the source. Default: none, as in the patch cycle (the writes wait in the
    /// bitmap for the catch-up before the cut); `--quick`: 100. Each 4 KiB random write costs
    /// a 64 KiB cluster copy (QEMU 7.2's least), so rounds cost the writer more than they save
    /// the cut.
    #[arg(long, value_name = "MS")]
    pub round_every: Option<u64>,
    /// ns directory disk: replay reads whole modified files (no write-range log), the
    /// baseline of the freeze window.
    #[arg(long)]
    pub whole_file: bool,
    /// ns directory disk: only the writer's part (writer loss, freeze windows, comparisons at
    /// the cut), without the bulk and reflink figures.
    #[arg(long)]
    pub freeze_only: bool,
    /// Internal: run as the benchmark's writer process with this spec (JSON).
    #[arg(long, hide = true, value_name = "SPEC")]
    pub internal_writer: Option<String>,
    #[command(flatten)]
    pub qemu: QemuArgs,
}

pub fn run(args: BenchArgs, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    if let Some(spec) = args.internal_writer {
        let spec: WriterSpec = serde_json::from_str(&spec).context("writer spec")?;
        let r = bench::writer_main(&spec).context("writer")?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    if args.backend == CopyBackend::Qemu && args.disk == DiskArg::Image {
        anyhow::bail!(super::BadInput(
            "--disk image is for ns LCs: a VM's disks are always images (drop --disk)".to_owned()
        ));
    }
    if args.round_every.is_some() && args.disk != DiskArg::Image {
        anyhow::bail!(super::BadInput(
            "--round-every is for --disk image (bitmap rounds); the file copier ships every write as it comes".to_owned()
        ));
    }
    if (args.whole_file || args.freeze_only)
        && (args.backend == CopyBackend::Qemu || args.disk == DiskArg::Image)
    {
        anyhow::bail!(super::BadInput(
            "--whole-file and --freeze-only are for the directory disk's file copier (drop --backend qemu / --disk image)".to_owned()
        ));
    }
    if args.backend == CopyBackend::Qemu {
        let json = ctx.json;
        let say = |s: &str| {
            if !json {
                eprintln!("… {s}");
            }
        };
        let r = bench_copy_qemu::run(args.cuts.unwrap_or(20), &args.qemu.config(), &say)
            .map_err(bench_error)?;
        if json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            bench_copy_qemu::print(&r);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let exe = std::env::current_exe().context("find the patchover binary for the writer")?;
    let writer_cmd = vec![
        exe.into_os_string(),
        "bench".into(),
        "copy".into(),
        "--internal-writer".into(),
    ];
    let json = ctx.json;
    if args.disk == DiskArg::Image {
        let mut cfg = if args.quick {
            ImageBenchConfig::quick(writer_cmd)
        } else {
            ImageBenchConfig::full(writer_cmd)
        };
        if let Some(c) = args.cuts {
            cfg.cuts = c;
        }
        if let Some(ms) = args.round_every {
            cfg.round_every = (ms > 0).then(|| std::time::Duration::from_millis(ms));
        }
        let r = bench_copy_image::run(&cfg, &|s| {
            if !json {
                eprintln!("… {s}");
            }
        })
        .map_err(bench_error)
        .context("bench copy --disk image")?;
        if json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            bench_copy_image::print(&r);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut cfg = if args.quick {
        BenchConfig::quick(writer_cmd)
    } else {
        BenchConfig::full(writer_cmd)
    };
    if let Some(c) = args.cuts {
        cfg.cuts = c.max(1);
    }
    cfg.whole_file = args.whole_file;
    cfg.freeze_only = args.freeze_only;
    let r = bench::run(&cfg, &|s| {
        if !json {
            eprintln!("… {s}");
        }
    })
    .context("bench copy")?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(ExitCode::SUCCESS);
    }
    print_dir(&r);
    Ok(ExitCode::SUCCESS)
}

fn yes(b: bool) -> &'static str {
    if b { "met" } else { "MISSED" }
}

/// The directory disk's figures, a line each.
fn print_dir(r: &bench::BenchReport) {
    let mib = |b: u64| b as f64 / 1048576.0;
    if let (Some(b), Some(t), Some(i)) = (&r.bulk, &r.reflink, &r.reflink_image) {
        println!(
            "bulk (ext4)     {:.0} MiB, {} files: cp -a {:.2} s, patchover {:.2} s  → {:.2}× cp   (goal ≥ 0.9×: {})",
            mib(b.bytes),
            b.files,
            b.cp_secs,
            b.patchover_secs,
            b.ratio,
            yes(b.ratio >= 0.9)
        );
        println!(
            "reflink (xfs)   tree: cp -a {:.2} s, patchover {:.3} s → {:.1}× cp; image {:.0} MiB: cp -a {:.2} s, patchover {:.3} s → {:.0}× cp   (goal ≥ 10×: {})",
            t.cp_secs,
            t.patchover_secs,
            t.ratio,
            mib(i.bytes),
            i.cp_secs,
            i.patchover_secs,
            i.ratio,
            yes(i.ratio >= 10.0)
        );
    }
    let f = &r.freeze;
    println!(
        "freeze window   {} cuts, {} MiB file, {}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; per cut {:.0} KiB read, {:.0} KiB shipped   (goal p99 < 20 ms: {})",
        f.cuts,
        r.config.writer_file_mib,
        if f.range_log {
            "write-range log"
        } else {
            "whole modified files read"
        },
        f.p50_ms,
        f.p99_ms,
        f.max_ms,
        f.mean_read_kib,
        f.mean_shipped_kib,
        yes(r.goals.freeze_p99_lt_20ms)
    );
    let phases: Vec<String> = f
        .phases
        .iter()
        .map(|p| format!("{} {:.1}/{:.1}", p.name, p.p50_ms, p.p99_ms))
        .collect();
    println!("  phases (ms, p50/p99): {}", phases.join(", "));
    println!(
        "writer          {:.1} MB/s alone, {:.1} MB/s while the copy runs → {:.1}% loss   (goal ≤ 10%: {}); {:.1} MB/s during back-to-back cuts ({:.1}% loss, frozen time included)",
        r.writer.alone_mb_s,
        r.writer.during_copy_mb_s,
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
