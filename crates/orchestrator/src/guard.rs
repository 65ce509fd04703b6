//! Crash safety of a live run: the per-LC run lock, and the guard process that recovers the run
//! at once if this patchover dies in the middle of it.
//!
//! A live run holds `<run_dir>/runs/<lc>.lock` with `flock`. The kernel drops the lock when the
//! process dies however it dies, so an unfinished run in the journal whose lock can be taken
//! belongs to a dead patchover (see [`crate::recover`]).

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use patchover_core::helper::{ArgReader, HelperArgsError, HelperCall};

use crate::OrchestratorError;

/// Held while a run for one LC is going.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

impl RunLock {
    /// Takes the lock of `lc`, or says who holds it.
    pub fn acquire(run_dir: &Path, lc: &str) -> Result<RunLock, OrchestratorError> {
        let dir = run_dir.join("runs");
        let io = |source| OrchestratorError::Prepare {
            disk: "run lock",
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let path = dir.join(format!("{lc}.lock"));
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io)?;
        if let Err(e) = f.try_lock() {
            if let std::fs::TryLockError::Error(source) = e {
                return Err(io(source));
            }
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(OrchestratorError::BadInput(format!(
                "a patch run for LC {lc} is in progress (patchover pid {}); wait for it, or see `patchover runs list`",
                holder.trim()
            )));
        }
        f.set_len(0).map_err(io)?;
        let _ = write!(f, "{}", std::process::id());
        Ok(RunLock { _file: f })
    }
}

/// A process that waits on a pipe from this one; dropping the guard disarms it. If this process
/// dies first, the guard sees end of input and runs `patchover runs recover`, logging (at
/// `info` unless `PATCHOVER_LOG` says otherwise) to [`RunGuard::LOG`] in the run dir.
pub struct RunGuard {
    stdin: Option<std::process::ChildStdin>,
    child: std::process::Child,
}

impl RunGuard {
    /// The guard's log, in the run dir: what a recovery after a crash did, and when.
    pub const LOG: &str = "run-guard.log";

    pub fn arm(exe: &Path, config: &Path, run_dir: &Path) -> std::io::Result<RunGuard> {
        use std::io::BufRead;
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(run_dir.join(Self::LOG))?;
        let mut cmd = RunGuardHelper.command(exe);
        cmd.env("PATCHOVER_CONFIG", config)
            .process_group(0)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(log);
        if std::env::var_os("PATCHOVER_LOG").is_none() {
            cmd.env("PATCHOVER_LOG", "info,netlink_packet_route=error");
        }
        let mut child = cmd.spawn()?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        if line.trim() != "armed" {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other("the run guard did not start"));
        }
        Ok(RunGuard {
            stdin: child.stdin.take(),
            child,
        })
    }
}

/// `patchover internal run-guard`, the process behind a [`RunGuard`]: it says `armed`, then
/// waits for `disarm` on stdin; `PATCHOVER_CONFIG` names the config (it takes no arguments).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunGuardHelper;

impl RunGuardHelper {
    /// The verb after `patchover internal`.
    pub const VERB: &str = "run-guard";

    /// Reads what [`HelperCall::args`] wrote (nothing).
    pub fn parse(args: &[OsString]) -> Result<RunGuardHelper, HelperArgsError> {
        ArgReader::new(Self::VERB, args)?.finish()?;
        Ok(RunGuardHelper)
    }
}

impl HelperCall for RunGuardHelper {
    fn verb(&self) -> &'static str {
        Self::VERB
    }
    fn args(&self) -> Vec<OsString> {
        Vec::new()
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"disarm\n");
        }
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_guard_call_reads_back_and_takes_no_arguments() {
        let cmd = RunGuardHelper.command(Path::new("/usr/bin/patchover"));
        let args: Vec<OsString> = cmd.get_args().map(OsString::from).collect();
        assert_eq!(args, ["internal", "run-guard"]);
        assert_eq!(RunGuardHelper::parse(&args[2..]).unwrap(), RunGuardHelper);
        let e = RunGuardHelper::parse(&["--config".into(), "/x".into()]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "internal run-guard: unexpected argument \"--config /x\""
        );
    }
}
