//! The apply engine: runs verified bundles' steps in order on a root file system, and the
//! post-checks after the reboot (seed fig. 12, steps 1203–1206; fig. 7 step 708).
//!
//! Inside the standby LC the agent calls [`apply_bundles`] with the LC's own root `/`; tests
//! call it with a temporary directory. Every step uses the OS's own program (`/bin/sh`,
//! `patch`, `dpkg`) or an atomic rename, as the seed asks, so what a patch does is what an
//! administrator would have typed. Paths from the manifest are resolved *under* the root with
//! [`resolve_in_root`], so even a bundle signed by mistake cannot reach outside it.
//!
//! Failure semantics, which the report carries back to the host:
//! - a bundle is `ok` only if all its steps succeeded;
//! - the first failing step makes its bundle `failed` (with that step's index, exit code, the
//!   combined output and an error line), and every later bundle `skipped`, naming the failure;
//! - a `patch` step first runs `patch --dry-run`, so a diff that does not apply changes
//!   nothing; a `replace` step checks the old file's SHA-256 first and swaps by rename.
//!
//! Programs get an empty stdin (a pipe with no writer, so nothing can prompt). Output is
//! captured from stdout and stderr through one pipe (so the order is kept) and
//! capped per bundle, keeping the head and the tail, where errors usually are.

use std::collections::{HashSet, VecDeque};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::archive::{Limits, PAYLOAD_DIR, extract_archive};
use crate::hash::Sha256;
use crate::manifest::{Check, Manifest, OldFile, Step, resolve_in_root};
use crate::verify::{VerifiedBundle, read_bundle_file};

/// The default cap of the output kept per bundle and per check.
pub const DEFAULT_OUTPUT_CAP: usize = 64 * 1024;
/// The PATH given to steps when the agent runs without one (early boot).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where and how to apply.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// The root file system to patch: `/` inside the LC.
    pub root: PathBuf,
    /// A directory the engine owns, where each bundle is unpacked to `<work_dir>/<id>`.
    pub work_dir: PathBuf,
    /// The most output bytes kept per bundle (head and tail).
    pub output_cap: usize,
    pub limits: Limits,
    /// The PATH steps run with (and `patch`/`dpkg` are looked up in). `None`: the engine's
    /// own PATH, or a standard one if it has none (early boot).
    pub path_env: Option<std::ffi::OsString>,
}

impl ApplyOptions {
    pub fn new(root: impl Into<PathBuf>, work_dir: impl Into<PathBuf>) -> ApplyOptions {
        ApplyOptions {
            root: root.into(),
            work_dir: work_dir.into(),
            output_cap: DEFAULT_OUTPUT_CAP,
            limits: Limits::default(),
            path_env: None,
        }
    }
}

/// How a bundle's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BundleStatus {
    /// Every step succeeded.
    Ok,
    /// A step failed (or the bundle could not be unpacked); see `step` and `error`.
    Failed,
    /// Not run, because an earlier bundle failed.
    Skipped,
}

impl BundleStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            BundleStatus::Ok => "ok",
            BundleStatus::Failed => "failed",
            BundleStatus::Skipped => "skipped",
        }
    }
}

/// The result of one bundle, as the agent writes it into the table copy and reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleResult {
    pub id: String,
    pub status: BundleStatus,
    /// The exit code of the last step that ran a program (`None` if none did, or it was
    /// killed by a signal).
    pub exit_code: Option<i32>,
    /// The steps' combined stdout and stderr, capped (see `output_truncated`).
    pub output: String,
    #[serde(default)]
    pub output_truncated: bool,
    pub duration_ms: u64,
    /// The 0-based index of the step that failed.
    pub step: Option<usize>,
    /// Why the bundle failed or was skipped, in one line.
    pub error: Option<String>,
    /// When the run of this bundle ended, in seconds since the Unix epoch (LC clock).
    #[serde(default)]
    pub finished_unix: u64,
}

/// What the agent reports back with the table (seed 1207).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyReport {
    pub bundles: Vec<BundleResult>,
}

impl ApplyReport {
    /// True when every bundle is `ok` (an empty report is ok: nothing was marked).
    pub fn all_ok(&self) -> bool {
        self.bundles.iter().all(|b| b.status == BundleStatus::Ok)
    }
    /// The bundle that failed, if one did.
    pub fn failed(&self) -> Option<&BundleResult> {
        self.bundles
            .iter()
            .find(|b| b.status == BundleStatus::Failed)
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn skipped(id: &str, why: String) -> BundleResult {
    BundleResult {
        id: id.to_owned(),
        status: BundleStatus::Skipped,
        exit_code: None,
        output: String::new(),
        output_truncated: false,
        duration_ms: 0,
        step: None,
        error: Some(why),
        finished_unix: now_unix(),
    }
}

/// Applies `bundles` in order under `opts.root`. `on_result` is called after each bundle
/// (skipped ones included), so the caller can record each result as it happens (1205).
/// Never panics on a failing step; every bundle gets exactly one result, in input order.
pub fn apply_bundles(
    opts: &ApplyOptions,
    bundles: &[VerifiedBundle],
    on_result: &mut dyn FnMut(&BundleResult),
) -> ApplyReport {
    let mut report = ApplyReport::default();
    let mut push = |r: BundleResult, report: &mut ApplyReport| {
        on_result(&r);
        report.bundles.push(r);
    };

    // A list with a repeated id is a caller's mistake: apply none of it.
    let mut seen = HashSet::new();
    if let Some(dup) = bundles.iter().find(|b| !seen.insert(b.id().to_owned())) {
        let why = format!(
            "bundle id {} is listed twice: nothing was applied",
            dup.id()
        );
        for b in bundles {
            push(
                BundleResult {
                    status: BundleStatus::Failed,
                    ..skipped(b.id(), why.clone())
                },
                &mut report,
            );
        }
        return report;
    }

    let mut failed: Option<String> = None;
    for b in bundles {
        if let Some(f) = &failed {
            push(
                skipped(b.id(), format!("not run: bundle {f} failed before it")),
                &mut report,
            );
            continue;
        }
        let r = apply_one(opts, b);
        tracing::info!(bundle = %r.id, status = r.status.as_str(), step = ?r.step, exit_code = ?r.exit_code, duration_ms = r.duration_ms, "bundle applied");
        if r.status != BundleStatus::Ok {
            failed = Some(r.id.clone());
        }
        push(r, &mut report);
    }
    report
}

fn apply_one(opts: &ApplyOptions, b: &VerifiedBundle) -> BundleResult {
    let start = Instant::now();
    let mut out = OutputBuf::new(opts.output_cap);
    let mut result = BundleResult {
        id: b.id().to_owned(),
        status: BundleStatus::Failed,
        exit_code: None,
        output: String::new(),
        output_truncated: false,
        duration_ms: 0,
        step: None,
        error: None,
        finished_unix: 0,
    };
    let finish = |mut r: BundleResult, out: OutputBuf| {
        let (text, cut) = out.into_string();
        r.output = text;
        r.output_truncated = cut;
        r.duration_ms = start.elapsed().as_millis() as u64;
        r.finished_unix = now_unix();
        r
    };

    // Re-read and compare: the file applied must be the file that verified.
    let bytes = match read_bundle_file(b.path(), &opts.limits) {
        Ok(bytes) => bytes,
        Err(e) => {
            result.error = Some(chain(&e));
            return finish(result, out);
        }
    };
    let sha = Sha256::of(&bytes);
    if sha != b.sha256() {
        result.error = Some(format!(
            "bundle file {} changed since it was verified (sha256 {sha}, verified {}): not applied",
            b.path().display(),
            b.sha256()
        ));
        return finish(result, out);
    }
    let dir = opts.work_dir.join(b.id());
    if let Err(e) =
        std::fs::create_dir_all(&opts.work_dir).and_then(|()| match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        })
    {
        result.error = Some(format!("cannot prepare {}: {e}", dir.display()));
        return finish(result, out);
    }
    if let Err(e) = extract_archive(&bytes, &dir, &opts.limits) {
        result.error = Some(format!("cannot unpack the bundle: {}", chain(&e)));
        return finish(result, out);
    }
    let ctx = StepCtx {
        root: &opts.root,
        payload: dir.join(PAYLOAD_DIR),
        id: b.id(),
        cap: opts.output_cap,
        path_env: opts.path_env.as_deref(),
    };
    let steps = &b.manifest().steps;
    for (i, step) in steps.iter().enumerate() {
        out.push(format!("== step {i}: {} ==\n", step.describe()).as_bytes());
        let o = run_step(&ctx, i, step, &mut out);
        if o.exit_code.is_some() {
            result.exit_code = o.exit_code;
        }
        if let Some(err) = o.error {
            out.push(format!("== step {i} failed: {err} ==\n").as_bytes());
            result.step = Some(i);
            result.error = Some(format!(
                "step {i} ({}) of {}: {err}",
                step.describe(),
                steps.len()
            ));
            // The unpacked bundle stays in the work dir for a look at what failed.
            return finish(result, out);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    result.status = BundleStatus::Ok;
    finish(result, out)
}

use patchover_core::error_chain as chain;

struct StepCtx<'a> {
    root: &'a Path,
    payload: PathBuf,
    id: &'a str,
    cap: usize,
    path_env: Option<&'a std::ffi::OsStr>,
}

struct StepOutcome {
    exit_code: Option<i32>,
    error: Option<String>,
    /// False if the program could not even be started.
    ran: bool,
}

impl StepOutcome {
    fn ok() -> StepOutcome {
        StepOutcome {
            exit_code: None,
            error: None,
            ran: true,
        }
    }
    fn fail(msg: impl Into<String>) -> StepOutcome {
        StepOutcome {
            exit_code: None,
            error: Some(msg.into()),
            ran: true,
        }
    }
}

fn root_is_slash(root: &Path) -> bool {
    root == Path::new("/")
}

fn base_command(program: &str, ctx: &StepCtx<'_>, i: usize) -> Command {
    let mut c = Command::new(program);
    if let Some(p) = ctx.path_env {
        c.env("PATH", p);
    } else if std::env::var_os("PATH").is_none() {
        c.env("PATH", DEFAULT_PATH);
    }
    c.current_dir(&ctx.payload)
        .env("PATCHOVER_ROOT", ctx.root)
        .env("PATCHOVER_PAYLOAD", &ctx.payload)
        .env("PATCHOVER_BUNDLE", ctx.id)
        .env("PATCHOVER_STEP", i.to_string())
        .env("DEBIAN_FRONTEND", "noninteractive");
    c
}

/// Runs a program to completion and turns its end into a step outcome.
fn run_program(cmd: Command, timeout: Duration, cap: usize, out: &mut OutputBuf) -> StepOutcome {
    let what = format!("{:?}", cmd.get_program());
    match run_command(cmd, timeout, cap) {
        Err(e) => StepOutcome {
            ran: false,
            ..StepOutcome::fail(format!(
                "cannot run {what}: {e} (is it installed in the LC?)"
            ))
        },
        Ok(run) => {
            out.append(run.output);
            let exit_code = run.status.and_then(|s| s.code());
            let error = if run.timed_out {
                Some(format!(
                    "timed out after {} s and was killed",
                    timeout.as_secs()
                ))
            } else {
                match run.status {
                    Some(s) if s.success() => None,
                    Some(s) => Some(match (s.code(), s.signal()) {
                        (Some(c), _) => format!("exited with status {c}"),
                        (None, Some(sig)) => format!("killed by signal {sig}"),
                        _ => "failed".to_owned(),
                    }),
                    None => Some("did not finish".to_owned()),
                }
            };
            StepOutcome {
                exit_code,
                error,
                ran: true,
            }
        }
    }
}

fn run_step(ctx: &StepCtx<'_>, i: usize, step: &Step, out: &mut OutputBuf) -> StepOutcome {
    let file = ctx.payload.join(step.payload_file().as_str());
    match step {
        Step::Script {
            args, timeout_secs, ..
        } => {
            let mut c = base_command("/bin/sh", ctx, i);
            c.arg(&file).args(args);
            run_program(c, Duration::from_secs(*timeout_secs), ctx.cap, out)
        }
        Step::Patch {
            dir,
            strip,
            timeout_secs,
            ..
        } => {
            let target = match resolve_in_root(ctx.root, dir.relative(), true) {
                Ok(t) if t.is_dir() => t,
                Ok(_) => return StepOutcome::fail(format!("{dir} is not a directory in the LC")),
                Err(e) => return StepOutcome::fail(format!("cannot resolve {dir}: {e}")),
            };
            let timeout = Duration::from_secs(*timeout_secs);
            for dry in [true, false] {
                let mut c = base_command("patch", ctx, i);
                c.current_dir(&target)
                    .arg(format!("-p{strip}"))
                    .arg("-N")
                    .arg("-i")
                    .arg(&file);
                if dry {
                    c.arg("--dry-run");
                }
                let o = run_program(c, timeout, ctx.cap, out);
                if let Some(e) = o.error {
                    let error = if !o.ran {
                        e
                    } else if dry {
                        format!("the diff does not apply (dry run), nothing changed: patch {e}")
                    } else {
                        format!("patch failed after a clean dry run: patch {e}")
                    };
                    return StepOutcome {
                        error: Some(error),
                        ..o
                    };
                }
                if !dry {
                    return o;
                }
            }
            StepOutcome::ok()
        }
        Step::Dpkg { timeout_secs, .. } => {
            let mut c = base_command("dpkg", ctx, i);
            if !root_is_slash(ctx.root) {
                c.arg(format!("--root={}", ctx.root.display()));
            }
            c.args(["--force-confdef", "--force-confold", "-i"])
                .arg(&file);
            let o = run_program(c, Duration::from_secs(*timeout_secs), ctx.cap, out);
            match o.error {
                Some(e) if o.ran => StepOutcome {
                    error: Some(format!("dpkg {e}")),
                    ..o
                },
                _ => o,
            }
        }
        Step::Replace {
            path, old, mode, ..
        } => match replace(ctx.root, path.relative(), &file, old, *mode) {
            Ok(msg) => {
                out.push(format!("{msg}\n").as_bytes());
                StepOutcome::ok()
            }
            Err(e) => StepOutcome::fail(format!("{path}: {e}")),
        },
    }
}

/// Replaces `rel` under `root` with `src` after checking the current file against `old`.
/// Returns a line for the output.
fn replace(
    root: &Path,
    rel: &Path,
    src: &Path,
    old: &OldFile,
    mode: Option<u32>,
) -> Result<String, String> {
    let target = resolve_in_root(root, rel, false).map_err(|e| format!("cannot resolve: {e}"))?;
    let new_data = std::fs::read(src).map_err(|e| format!("cannot read the payload file: {e}"))?;
    let new_sha = Sha256::of(&new_data);
    let current = match std::fs::symlink_metadata(&target) {
        Ok(md) if md.file_type().is_symlink() => {
            return Err("is a symlink: name the file it points to".to_owned());
        }
        Ok(md) if !md.is_file() => return Err("is not a regular file".to_owned()),
        Ok(md) => Some((
            md,
            Sha256::of_file(&target).map_err(|e| format!("cannot read: {e}"))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("cannot stat: {e}")),
    };
    if let Some((_, sha)) = &current
        && *sha == new_sha
    {
        // Already in place (an earlier run got this far): nothing to do.
        return Ok(format!("{} already has sha256 {new_sha}", rel.display()));
    }
    match (old, &current) {
        (OldFile::Sha256(want), Some((_, have))) if want != have => {
            return Err(format!(
                "has sha256 {have}, expected {want}: it is not the version this patch is for"
            ));
        }
        (OldFile::Sha256(want), None) => {
            return Err(format!("does not exist (expected one with sha256 {want})"));
        }
        (OldFile::Absent, Some((_, have))) => {
            return Err(format!("exists (sha256 {have}) but the patch creates it"));
        }
        _ => {}
    }
    let parent = target
        .parent()
        .filter(|p| p.is_dir())
        .ok_or_else(|| "its directory does not exist".to_owned())?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.patchover-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let perm = mode.unwrap_or_else(|| current.as_ref().map_or(0o644, |(md, _)| md.mode() & 0o7777));
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(&new_data)?;
        if let Some((md, _)) = &current {
            std::os::unix::fs::fchown(&f, Some(md.uid()), Some(md.gid()))?;
        }
        // After chown, which clears setuid bits.
        f.set_permissions(std::fs::Permissions::from_mode(perm))?;
        f.sync_all()?;
        std::fs::rename(&tmp, &target)?;
        std::fs::File::open(parent)?.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("cannot write: {e}"));
    }
    let from = current.map_or("absent".to_owned(), |(_, s)| s.to_string());
    Ok(format!(
        "replaced {} (sha256 {from} -> {new_sha}, mode {perm:04o})",
        rel.display()
    ))
}

/// One program run's captured end.
struct CommandRun {
    status: Option<ExitStatus>,
    timed_out: bool,
    output: OutputBuf,
}

/// Runs `cmd` with stdin from /dev/null and stdout+stderr into one pipe, in its own process
/// group; on timeout the whole group is killed.
fn run_command(mut cmd: Command, timeout: Duration, cap: usize) -> std::io::Result<CommandRun> {
    let (mut reader, writer) = std::io::pipe()?;
    // stdin: a pipe with no writer (reads give EOF at once). Unlike /dev/null it also works
    // in an early-boot or chroot tree without /dev.
    let (stdin, stdin_writer) = std::io::pipe()?;
    drop(stdin_writer);
    cmd.stdin(Stdio::from(stdin))
        .stdout(writer.try_clone()?)
        .stderr(writer)
        .process_group(0);
    let spawned = cmd.spawn();
    // The Command holds the pipe's write ends: drop it so EOF comes when the child exits.
    drop(cmd);
    let mut child = spawned?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = OutputBuf::new(cap);
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            match reader.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.push(&chunk[..n]),
            }
        }
        let _ = tx.send(buf);
    });
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if Instant::now() >= deadline {
            timed_out = true;
            let pgid = child.id() as libc::pid_t;
            // SAFETY: kill(2) with a negative pid signals the process group we created for
            // this child (process_group(0) above); it touches no memory of ours.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
            break child.wait().ok();
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let output = match rx.recv_timeout(Duration::from_secs(2)) {
        Ok(buf) => buf,
        Err(_) => {
            // A background process the step started still holds the pipe: stop waiting.
            let mut b = OutputBuf::new(cap);
            b.push(b"[output incomplete: a background process still holds stdout]\n");
            b
        }
    };
    Ok(CommandRun {
        status,
        timed_out,
        output,
    })
}

/// Output kept within a cap: the first half and the last half, with a marker between.
struct OutputBuf {
    cap: usize,
    head: Vec<u8>,
    tail: VecDeque<u8>,
    cut: u64,
}

impl OutputBuf {
    fn new(cap: usize) -> OutputBuf {
        OutputBuf {
            cap: cap.max(2),
            head: Vec::new(),
            tail: VecDeque::new(),
            cut: 0,
        }
    }

    fn push(&mut self, mut data: &[u8]) {
        let half = self.cap / 2;
        if self.head.len() < half {
            let n = (half - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..n]);
            data = &data[n..];
        }
        let tail_cap = self.cap - half;
        for &b in data {
            if self.tail.len() == tail_cap {
                self.tail.pop_front();
                self.cut += 1;
            }
            self.tail.push_back(b);
        }
    }

    fn append(&mut self, other: OutputBuf) {
        let cut = other.cut;
        self.push(&other.head);
        if cut > 0 {
            self.push(format!("\n[... {cut} bytes cut ...]\n").as_bytes());
        }
        let (a, b) = other.tail.as_slices();
        self.push(a);
        self.push(b);
        self.cut += cut;
    }

    fn into_string(self) -> (String, bool) {
        let mut v = self.head;
        if self.cut > 0 {
            v.extend_from_slice(format!("\n[... {} bytes cut ...]\n", self.cut).as_bytes());
        }
        v.extend(self.tail);
        (String::from_utf8_lossy(&v).into_owned(), self.cut > 0)
    }
}

/// One post-check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckResult {
    pub bundle: String,
    /// The 0-based index of the check in the bundle's manifest.
    pub index: usize,
    pub kind: String,
    pub passed: bool,
    /// What was found (a hash, the output) or why the check failed.
    pub detail: String,
}

/// The post-checks of all bundles; the switch may go ahead only if `passed`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostCheckReport {
    pub checks: Vec<CheckResult>,
    pub passed: bool,
}

/// Runs every post-check of `manifests` under `root` (after the reboot, fig. 7 step 708).
/// All checks run even after one fails, so the report is complete.
pub fn run_post_checks<'a>(
    root: &Path,
    manifests: impl IntoIterator<Item = &'a Manifest>,
) -> PostCheckReport {
    let mut checks = Vec::new();
    for m in manifests {
        for (index, check) in m.checks.iter().enumerate() {
            let (passed, detail) = run_check(root, check);
            tracing::info!(bundle = %m.id, index, kind = check.kind(), passed, "post-check");
            checks.push(CheckResult {
                bundle: m.id.to_string(),
                index,
                kind: check.kind().to_owned(),
                passed,
                detail,
            });
        }
    }
    let passed = checks.iter().all(|c| c.passed);
    PostCheckReport { checks, passed }
}

fn run_check(root: &Path, check: &Check) -> (bool, String) {
    match check {
        Check::FileHash { path, sha256 } => {
            let p = match resolve_in_root(root, path.relative(), true) {
                Ok(p) => p,
                Err(e) => return (false, format!("{path}: cannot resolve: {e}")),
            };
            match Sha256::of_file(&p) {
                Ok(h) if h == *sha256 => (true, format!("{path}: sha256 {h}")),
                Ok(h) => (false, format!("{path}: sha256 {h}, expected {sha256}")),
                Err(e) => (false, format!("{path}: cannot read: {e}")),
            }
        }
        Check::CommandOutput {
            command,
            contains,
            exit_code,
            timeout_secs,
        } => {
            let mut c = Command::new(&command[0]);
            c.args(&command[1..])
                .current_dir(root)
                .env("PATCHOVER_ROOT", root);
            if std::env::var_os("PATH").is_none() {
                c.env("PATH", DEFAULT_PATH);
            }
            let timeout = Duration::from_secs(*timeout_secs);
            match run_command(c, timeout, 8 * 1024) {
                Err(e) => (false, format!("cannot run {:?}: {e}", command[0])),
                Ok(run) => {
                    let (text, _) = run.output.into_string();
                    let code = run.status.and_then(|s| s.code());
                    if run.timed_out {
                        (
                            false,
                            format!("timed out after {} s; output: {text}", timeout.as_secs()),
                        )
                    } else if code != Some(*exit_code) {
                        (
                            false,
                            format!("exit status {code:?}, expected {exit_code}; output: {text}"),
                        )
                    } else if !text.contains(contains.as_str()) {
                        (
                            false,
                            format!("output does not contain {contains:?}; output: {text}"),
                        )
                    } else {
                        (true, format!("output contains {contains:?}"))
                    }
                }
            }
        }
        Check::PackageVersion { package, version } => {
            let mut c = Command::new("dpkg-query");
            if !root_is_slash(root) {
                c.arg(format!(
                    "--admindir={}",
                    root.join("var/lib/dpkg").display()
                ));
            }
            c.args(["-W", "-f=${Version}", package.as_str()]);
            if std::env::var_os("PATH").is_none() {
                c.env("PATH", DEFAULT_PATH);
            }
            match run_command(c, Duration::from_secs(60), 4096) {
                Err(e) => (false, format!("cannot run dpkg-query: {e}")),
                Ok(run) => {
                    let (text, _) = run.output.into_string();
                    let ok_exit = run.status.is_some_and(|s| s.success());
                    let have = text.trim();
                    if ok_exit && have == version {
                        (true, format!("{package} {have}"))
                    } else if ok_exit {
                        (
                            false,
                            format!("{package} is at {have:?}, expected {version}"),
                        )
                    } else {
                        (false, format!("{package} is not installed: {have}"))
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_buf_keeps_head_and_tail() {
        let mut b = OutputBuf::new(10);
        b.push(b"0123456789abcdefghij");
        let (s, cut) = b.into_string();
        assert!(cut);
        assert!(s.starts_with("01234"), "{s}");
        assert!(s.ends_with("fghij"), "{s}");
        assert!(s.contains("10 bytes cut"), "{s}");
        let mut b = OutputBuf::new(100);
        b.push(b"short");
        assert_eq!(b.into_string(), ("short".to_owned(), false));
    }

    #[test]
    fn command_timeout_kills_the_group() {
        let mut c = Command::new("/bin/sh");
        c.arg("-c").arg("echo started; sleep 30 & sleep 30");
        let t = Instant::now();
        let run = run_command(c, Duration::from_millis(300), 1024).unwrap();
        assert!(run.timed_out);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let (text, _) = run.output.into_string();
        assert!(text.contains("started"), "{text}");
    }

    #[test]
    fn stdout_and_stderr_are_merged_in_order() {
        let mut c = Command::new("/bin/sh");
        c.arg("-c")
            .arg("echo one; echo two >&2; echo three; exit 3");
        let run = run_command(c, Duration::from_secs(10), 1024).unwrap();
        assert_eq!(run.status.and_then(|s| s.code()), Some(3));
        assert_eq!(run.output.into_string().0, "one\ntwo\nthree\n");
    }
}
