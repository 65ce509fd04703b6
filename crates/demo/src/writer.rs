//! `patchover-demo writer`: the disk-copy benchmark's workload, run inside the LC.
//!
//! Why it lives here: a VM guest has busybox and this static binary only, and the benchmark
//! (`patchover bench copy --backend qemu`) needs a writer whose writes really reach the virtual
//! disk at a known rate, so that the hypervisor's write tracking sees them while a copy runs.
//!
//! What it does: random, block-aligned writes of `--block` bytes to an existing file at
//! `--rate-mib` MiB/s, by `--threads` threads, each paced against its own schedule (a thread
//! that falls behind catches up at most [`MAX_DEBT`], so a stall is lost throughput, not a
//! burst later). Writes are `O_DIRECT` (each one is a request to the disk) or, with
//! `--sync-every N`, buffered with an `fdatasync` every N blocks. Beside them, with
//! `--churn-dir`, a thread creates, fsyncs and deletes small files (`--churn-rate` files/s,
//! keeping the last `--churn-keep`). Every `--interval-ms` one line goes to `--report`:
//!
//! ```text
//! # elapsed_ms total_bytes interval_bytes interval_mib_s churn_files
//! 1000 20971520 20971520 20.00 50
//! ```
//!
//! `elapsed_ms` is the guest's monotonic clock since the start, which stands still while the
//! VM is paused; `total_bytes` counts the random writes only (churn is counted in files).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How far behind its schedule a writer thread may be before the rest is written off.
const MAX_DEBT: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, PartialEq)]
pub struct WriterArgs {
    pub file: PathBuf,
    /// MiB/s for all threads together; 0: as fast as possible.
    pub rate_mib: f64,
    pub block: usize,
    pub threads: usize,
    /// 0: O_DIRECT; N: buffered writes with an fdatasync every N blocks (per thread).
    pub sync_every: u64,
    pub churn_dir: Option<PathBuf>,
    pub churn_rate: f64,
    pub churn_keep: usize,
    pub report: PathBuf,
    pub interval: Duration,
    /// Stop after this long (guest time); `None`: until killed.
    pub seconds: Option<f64>,
}

pub const USAGE: &str = "usage: patchover-demo writer --file F --report R [--rate-mib 20] [--block 4096] \
[--threads 4] [--sync-every N (default: O_DIRECT)] [--churn-dir D] [--churn-rate 50] \
[--churn-keep 64] [--interval-ms 1000] [--seconds S]";

pub fn parse(args: impl IntoIterator<Item = String>) -> Result<WriterArgs, String> {
    let mut file = None;
    let mut report = None;
    let mut w = WriterArgs {
        file: PathBuf::new(),
        rate_mib: 20.0,
        block: 4096,
        threads: 4,
        sync_every: 0,
        churn_dir: None,
        churn_rate: 50.0,
        churn_keep: 64,
        report: PathBuf::new(),
        interval: Duration::from_secs(1),
        seconds: None,
    };
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{a} needs a value"));
        fn num<T: std::str::FromStr>(a: &str, v: String) -> Result<T, String> {
            v.parse()
                .map_err(|_| format!("{a}: {v:?} is not a valid number"))
        }
        match a.as_str() {
            "--file" => file = Some(PathBuf::from(val()?)),
            "--report" => report = Some(PathBuf::from(val()?)),
            "--rate-mib" => w.rate_mib = num(&a, val()?)?,
            "--block" => w.block = num(&a, val()?)?,
            "--threads" => w.threads = num(&a, val()?)?,
            "--sync-every" => w.sync_every = num(&a, val()?)?,
            "--churn-dir" => w.churn_dir = Some(PathBuf::from(val()?)),
            "--churn-rate" => w.churn_rate = num(&a, val()?)?,
            "--churn-keep" => w.churn_keep = num(&a, val()?)?,
            "--interval-ms" => w.interval = Duration::from_millis(num(&a, val()?)?),
            "--seconds" => w.seconds = Some(num(&a, val()?)?),
            "--help" | "-h" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}; {USAGE}")),
        }
    }
    w.file = file.ok_or_else(|| format!("--file is required; {USAGE}"))?;
    w.report = report.ok_or_else(|| format!("--report is required; {USAGE}"))?;
    if w.block == 0 || !w.block.is_multiple_of(512) {
        return Err(format!(
            "--block {} must be a positive multiple of 512 (O_DIRECT alignment)",
            w.block
        ));
    }
    if w.threads == 0 || w.threads > 64 {
        return Err(format!("--threads {} must be 1..=64", w.threads));
    }
    if w.rate_mib.is_nan() || w.rate_mib < 0.0 || w.rate_mib.is_infinite() {
        return Err(format!("--rate-mib {} must be ≥ 0", w.rate_mib));
    }
    if w.interval.is_zero() {
        return Err("--interval-ms must be > 0".to_owned());
    }
    Ok(w)
}

/// A block-sized buffer aligned for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("block size checked");
        // SAFETY: `layout` has a non-zero size (the block size is checked to be > 0).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, layout }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` points to `layout.size()` initialised bytes owned by this buffer.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// xorshift64*: cheap pseudo-random numbers (offsets and block contents).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn seed(i: u64) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (t ^ (i.wrapping_mul(0x9E37_79B9_7F4A_7C15)) ^ u64::from(std::process::id())) | 1
}

/// Sleeps until `due` unless less than a millisecond is left; forgives debt over [`MAX_DEBT`].
fn pace(due: &mut Instant, step: Duration) {
    let now = Instant::now();
    if *due > now + Duration::from_millis(1) {
        std::thread::sleep(*due - now);
    } else if now > *due + MAX_DEBT {
        *due = now;
    }
    *due += step;
}

fn write_loop(
    a: &WriterArgs,
    i: u64,
    blocks: u64,
    total: &AtomicU64,
    stop: &AtomicBool,
) -> io::Result<()> {
    let mut opts = OpenOptions::new();
    opts.write(true);
    if a.sync_every == 0 {
        opts.custom_flags(libc::O_DIRECT);
    }
    let f = opts.open(&a.file)?;
    let mut buf = AlignedBuf::new(a.block);
    let mut rng = Rng(seed(i));
    let step = if a.rate_mib > 0.0 {
        Duration::from_secs_f64(a.block as f64 * a.threads as f64 / (a.rate_mib * 1048576.0))
    } else {
        Duration::ZERO
    };
    let mut due = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if !step.is_zero() {
            pace(&mut due, step);
        }
        for c in buf.as_mut().chunks_exact_mut(8) {
            c.copy_from_slice(&rng.next().to_le_bytes());
        }
        let off = (rng.next() % blocks) * a.block as u64;
        f.write_all_at(buf.as_mut(), off)?;
        n += 1;
        if a.sync_every > 0 && n.is_multiple_of(a.sync_every) {
            f.sync_data()?;
        }
        total.fetch_add(a.block as u64, Ordering::Relaxed);
    }
    if a.sync_every > 0 {
        f.sync_data()?;
    }
    Ok(())
}

fn churn_loop(
    a: &WriterArgs,
    dir: &PathBuf,
    files: &AtomicU64,
    stop: &AtomicBool,
) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let mut rng = Rng(seed(1000));
    let step = Duration::from_secs_f64(1.0 / a.churn_rate.max(0.01));
    let mut due = Instant::now();
    let mut n = 0u64;
    let mut data = vec![0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        pace(&mut due, step);
        let len = 512 + (rng.next() % (16 * 1024 - 512)) as usize;
        for c in data[..len].chunks_mut(8) {
            let r = rng.next().to_le_bytes();
            c.copy_from_slice(&r[..c.len()]);
        }
        let path = dir.join(format!("f{n}"));
        let mut f = File::create(&path)?;
        f.write_all(&data[..len])?;
        f.sync_all()?;
        if n >= a.churn_keep as u64 {
            let old = dir.join(format!("f{}", n - a.churn_keep as u64));
            match fs::remove_file(old) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        n += 1;
        files.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Runs the writer until `--seconds` have passed (or forever). Errors name the failing part.
pub fn run(a: &WriterArgs) -> Result<(), String> {
    let size = fs::metadata(&a.file)
        .map_err(|e| format!("cannot stat --file {}: {e}", a.file.display()))?
        .len();
    let blocks = size / a.block as u64;
    if blocks == 0 {
        return Err(format!(
            "--file {} has {size} bytes, less than one block of {}; create it first (dd)",
            a.file.display(),
            a.block
        ));
    }
    let mut report = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&a.report)
        .map_err(|e| format!("cannot open --report {}: {e}", a.report.display()))?;
    let total = Arc::new(AtomicU64::new(0));
    let churned = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let failed: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let mut handles = Vec::new();
    for i in 0..a.threads {
        let (a, total, stop, failed) = (a.clone(), total.clone(), stop.clone(), failed.clone());
        handles.push(std::thread::spawn(move || {
            if let Err(e) = write_loop(&a, i as u64, blocks, &total, &stop) {
                *failed.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(format!("writing {}: {e}", a.file.display()));
                stop.store(true, Ordering::Relaxed);
            }
        }));
    }
    if let Some(dir) = a.churn_dir.clone() {
        let (a, churned, stop, failed) = (a.clone(), churned.clone(), stop.clone(), failed.clone());
        handles.push(std::thread::spawn(move || {
            if let Err(e) = churn_loop(&a, &dir, &churned, &stop) {
                *failed.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(format!("small-file churn in {}: {e}", dir.display()));
                stop.store(true, Ordering::Relaxed);
            }
        }));
    }
    let start = Instant::now();
    let _ = writeln!(
        report,
        "# elapsed_ms total_bytes interval_bytes interval_mib_s churn_files"
    );
    let mut last = (start, 0u64);
    let mut next = start + a.interval;
    let end = a
        .seconds
        .map(|s| start + Duration::from_secs_f64(s.max(0.0)));
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        next += a.interval;
        let now = Instant::now();
        let t = total.load(Ordering::Relaxed);
        let secs = (now - last.0).as_secs_f64();
        let _ = writeln!(
            report,
            "{} {t} {} {:.2} {}",
            (now - start).as_millis(),
            t - last.1,
            (t - last.1) as f64 / 1048576.0 / secs.max(1e-9),
            churned.load(Ordering::Relaxed)
        );
        last = (now, t);
        if end.is_some_and(|e| now >= e) {
            stop.store(true, Ordering::Relaxed);
        }
    }
    for h in handles {
        let _ = h.join();
    }
    match failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Result<WriterArgs, String> {
        parse(s.split_whitespace().map(str::to_owned))
    }

    #[test]
    fn parse_defaults_and_checks() {
        let a = args("--file /d/big --report /r").unwrap();
        assert_eq!((a.block, a.threads, a.sync_every), (4096, 4, 0));
        assert_eq!(a.rate_mib, 20.0);
        assert!(args("--report /r").unwrap_err().contains("--file"));
        assert!(
            args("--file f --report r --block 1000")
                .unwrap_err()
                .contains("multiple of 512")
        );
        assert!(
            args("--file f --report r --rate-mib x")
                .unwrap_err()
                .contains("not a valid")
        );
        assert!(
            args("--file f --report r --bogus")
                .unwrap_err()
                .contains("unknown")
        );
    }

    #[test]
    fn writes_at_the_paced_rate_and_churns() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("big");
        fs::write(&file, vec![0u8; 4 << 20]).unwrap();
        let before = fs::read(&file).unwrap();
        let report = dir.path().join("report");
        let a = args(&format!(
            "--file {} --report {} --rate-mib 4 --sync-every 16 --churn-dir {} --churn-rate 100 \
             --churn-keep 5 --interval-ms 200 --seconds 1",
            file.display(),
            report.display(),
            dir.path().join("churn").display()
        ))
        .unwrap();
        run(&a).unwrap();
        let text = fs::read_to_string(&report).unwrap();
        let last: Vec<f64> = text
            .lines()
            .last()
            .unwrap()
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        let (ms, total, churn) = (last[0], last[1], last[4]);
        let rate = total / 1048576.0 / (ms / 1000.0);
        // Paced at 4 MiB/s: neither far below nor above (debt catch-up is bounded).
        assert!((2.0..=4.6).contains(&rate), "{rate} MiB/s\n{text}");
        assert!(churn >= 20.0, "{text}");
        assert_eq!(fs::read_dir(dir.path().join("churn")).unwrap().count(), 5);
        assert_ne!(fs::read(&file).unwrap(), before, "the file was written");
        assert_eq!(fs::metadata(&file).unwrap().len(), 4 << 20, "size kept");
    }
}
