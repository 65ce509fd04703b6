//! `patchover disk copy SRC DST [--follow]`: copy a live disk with its write history.
//!
//! The work is in `patchover-disk`; this file parses, shows progress (a bar on a terminal, plain
//! lines otherwise) and prints the summary (a table, or one JSON object with `--json`).

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use patchover_core::Quiesce;
use patchover_core::quiesce::NoWriters;
use patchover_disk::{
    CgroupFreezer, CopyError, CopyOptions, CopyReport, FollowCopy, Progress, Reflink,
};

use super::{BadInput, Ctx};

#[derive(Subcommand)]
pub enum DiskCmd {
    /// Copy a disk (a directory tree or an image file) while it may be written.
    ///
    /// Without --follow: copy, replay the write history until caught up, done. With --follow:
    /// keep shipping writes until a line (or end of input) on stdin or --cut-after, then freeze
    /// the writers (--freeze-cgroup), ship the last writes, thaw and report the freeze window.
    /// Ctrl-C aborts and leaves the copy marked incomplete.
    Copy(CopyArgs),
}

#[derive(Args)]
pub struct CopyArgs {
    /// The disk to copy: a directory (rootfs, data tree) or an image file.
    pub src: PathBuf,
    /// Where the copy goes: a missing or empty directory, or a new image file path.
    pub dst: PathBuf,
    /// Keep shipping writes until the cut (application disks).
    #[arg(long)]
    pub follow: bool,
    /// cgroup v2 directory whose tasks are frozen at the cut (follow mode). Without it nothing is
    /// frozen, and only writes made before the cut request are guaranteed on the copy.
    #[arg(long, value_name = "DIR")]
    pub freeze_cgroup: Option<PathBuf>,
    /// Cut automatically after this many seconds of following.
    #[arg(long, value_name = "SECS")]
    pub cut_after: Option<f64>,
    /// Compare the copy with the frozen source at the cut (reads both; not in the freeze window).
    #[arg(long)]
    pub verify: bool,
    /// Never reflink, always copy bytes.
    #[arg(long)]
    pub no_reflink: bool,
    /// Keep the write history journal at this path when the copy completes.
    #[arg(long, value_name = "FILE")]
    pub keep_history: Option<PathBuf>,
    /// Do not flush the copy to disk (syncfs) before declaring it complete.
    #[arg(long)]
    pub no_sync: bool,
}

pub fn run(cmd: DiskCmd, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    match cmd {
        DiskCmd::Copy(a) => copy(a, ctx),
    }
}

fn bad(e: CopyError) -> anyhow::Error {
    if e.is_bad_input() {
        anyhow::Error::new(BadInput(e.to_string()))
    } else {
        anyhow::Error::new(e)
    }
}

fn copy(a: CopyArgs, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let tty = std::io::stderr().is_terminal() && !ctx.json;
    let opts = CopyOptions {
        reflink: if a.no_reflink {
            Reflink::Never
        } else {
            Reflink::Auto
        },
        scan_totals: tty,
        sync: !a.no_sync,
        keep_history: a.keep_history.clone(),
        ..CopyOptions::default()
    };
    let progress: Arc<dyn Progress> = if tty {
        Arc::new(Bar::new())
    } else {
        Arc::new(Lines::new(!ctx.json))
    };
    let report = if a.follow {
        let mut quiesce: Box<dyn Quiesce> = match &a.freeze_cgroup {
            Some(dir) => {
                if !dir.join("cgroup.freeze").exists() {
                    return Err(BadInput(format!(
                        "{} is not a cgroup v2 directory with cgroup.freeze: give one under /sys/fs/cgroup/unified",
                        dir.display()
                    ))
                    .into());
                }
                Box::new(CgroupFreezer::new(dir))
            }
            None => Box::new(NoWriters),
        };
        let mut f = FollowCopy::start(&a.src, &a.dst, &opts, progress.clone()).map_err(bad)?;
        wait_for_cut(&f, a.cut_after, !ctx.json);
        f.cut_with(&mut *quiesce, a.verify)
            .context("disk copy: cut")?
    } else {
        patchover_disk::copy_once(&a.src, &a.dst, &opts, &*progress).map_err(bad)?
    };
    drop(progress); // clears the bar before the summary
    print_report(&report, ctx)?;
    Ok(ExitCode::SUCCESS)
}

/// Blocks until a line or end of input on stdin, or until `cut_after` seconds, or until the
/// background copy fails (the cut then reports the error).
fn wait_for_cut(f: &FollowCopy, cut_after: Option<f64>, say: bool) {
    let (tx, rx) = mpsc::channel::<()>();
    match cut_after {
        None => {
            if say {
                eprintln!("following the source: press Enter to cut over (Ctrl-C aborts)");
            }
            std::thread::spawn(move || {
                let mut line = String::new();
                let _ = std::io::stdin().lock().read_line(&mut line);
                let _ = tx.send(());
            });
        }
        Some(s) => {
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs_f64(s.max(0.0)));
                let _ = tx.send(());
            });
        }
    }
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Err(mpsc::RecvTimeoutError::Timeout) if !f.is_failed() => continue,
            _ => return,
        }
    }
}

fn print_report(r: &CopyReport, ctx: &Ctx) -> anyhow::Result<()> {
    if ctx.json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    let s = &r.stats;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "copied      {} -> {} ({})",
        r.src.display(),
        r.dst.display(),
        r.kind
    );
    println!(
        "bulk        {:.1} MiB in {} files, {} dirs, {} symlinks, {} special, {} hard links",
        mib(s.bytes_copied),
        s.files,
        s.dirs,
        s.symlinks,
        s.specials,
        s.hardlinks
    );
    println!(
        "fast paths  reflink {:.1} MiB, copy_file_range {:.1} MiB, read/write {:.1} MiB",
        mib(s.bytes_reflinked),
        mib(s.bytes_copy_range),
        mib(s.bytes_read_write)
    );
    println!(
        "history     {} writes trapped, {:.1} MiB replayed in {} rounds{}",
        s.history_entries,
        mib(s.bytes_replayed),
        s.rounds,
        if r.caught_up {
            ""
        } else {
            " (still being written: not caught up)"
        }
    );
    if s.refused_links > 0 {
        println!(
            "links       {} refused, not followed (the source swapped directories for links while it was copied)",
            s.refused_links
        );
    }
    println!("duration    {:.2} s", r.duration.as_secs_f64());
    if let Some(c) = &r.cut {
        println!(
            "cut         freeze window {:.1} ms, {} writes / {:.2} MiB shipped while frozen{}",
            c.freeze_window.as_secs_f64() * 1000.0,
            c.history_entries,
            mib(c.bytes_shipped),
            match c.verified {
                Some(true) => ", verified identical",
                Some(false) => ", DIFFERS",
                None => "",
            }
        );
    }
    Ok(())
}

/// A progress bar on a terminal: bytes, rate, files, ETA.
struct Bar {
    pb: ProgressBar,
}

impl Bar {
    fn new() -> Bar {
        let pb = ProgressBar::new(0);
        pb.set_style(
            ProgressStyle::with_template(
                "{bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Bar { pb }
    }
}

impl Progress for Bar {
    fn scanned(&self, bytes: u64, _files: u64) {
        self.pb.set_length(bytes);
    }
    fn copied(&self, bytes: u64, files: u64) {
        self.pb.set_position(bytes);
        if files.is_multiple_of(64) {
            self.pb.set_message(format!("{files} files"));
        }
    }
    fn replayed(&self, round: u64, entries: u64, bytes: u64) {
        self.pb.set_message(format!(
            "round {round}: {entries} writes, {:.1} MiB replayed",
            bytes as f64 / 1048576.0
        ));
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.pb.finish_and_clear();
    }
}

/// Plain progress lines on stderr, at most one a second.
struct Lines {
    on: bool,
    start: Instant,
    last: Mutex<Instant>,
}

impl Lines {
    fn new(on: bool) -> Lines {
        let now = Instant::now();
        Lines {
            on,
            start: now,
            last: Mutex::new(now),
        }
    }
    fn due(&self) -> bool {
        let mut l = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if self.on && l.elapsed() >= Duration::from_secs(1) {
            *l = Instant::now();
            true
        } else {
            false
        }
    }
}

impl Progress for Lines {
    fn copied(&self, bytes: u64, files: u64) {
        if self.due() {
            let t = self.start.elapsed().as_secs_f64().max(1e-3);
            eprintln!(
                "copied {:.1} MiB, {files} files, {:.1} MiB/s",
                bytes as f64 / 1048576.0,
                bytes as f64 / 1048576.0 / t
            );
        }
    }
    fn replayed(&self, round: u64, entries: u64, bytes: u64) {
        if self.due() {
            eprintln!(
                "replay round {round}: {entries} writes trapped, {:.1} MiB replayed",
                bytes as f64 / 1048576.0
            );
        }
    }
}
