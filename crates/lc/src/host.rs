//! The seam between backend logic and the host's privileged calls.
//!
//! [`LinuxHost`] does the real thing; tests use a recording fake (see `ns::tests`). The seam
//! sits at the level of "create this veth", "write this cgroup file", "start this launcher",
//! which is where the backend's decisions end and the kernel's work begins.

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use patchover_core::MacAddr;
use patchover_netlink::rtnl::{Rtnl, RtnlError};

use crate::helper::{self, HelperCall, LcHelper, Netcfg};
use crate::ns::launch::LaunchSpec;

/// A launcher that has created the LC's namespaces and its init process, which is waiting
/// for [`Launch::release`] before it mounts its disks and execs init.
pub trait Launch {
    /// The host PID of the LC's init-to-be.
    fn pid(&self) -> i32;
    /// Lets init go on; returns once init was exec'd, or the error the LC met on the way.
    fn release(self: Box<Self>) -> Result<(), String>;
}

/// Seconds since the process that started `start_time` clock ticks after boot began.
pub fn uptime_since(host: &dyn Host, start_time: u64) -> Option<f64> {
    let up: f64 = host
        .read_file(Path::new("/proc/uptime"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    // USER_HZ is 100 on every architecture patchover supports.
    Some(up - start_time as f64 / 100.0)
}

pub trait Host {
    fn read_file(&self, path: &Path) -> io::Result<String>;
    fn write_file(&self, path: &Path, data: &str) -> io::Result<()>;
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Removes an empty directory (a cgroup).
    fn remove_dir(&self, path: &Path) -> io::Result<()>;
    fn remove_all(&self, path: &Path) -> io::Result<()>;
    fn exists(&self, path: &Path) -> bool;
    /// True if `path` is a file that its owner may execute, following symlinks *inside* `root`.
    fn is_executable_in(&self, root: &Path, path: &Path) -> bool;

    /// Creates the bridge if missing; true if it was created.
    fn ensure_bridge(&self, name: &str) -> io::Result<bool>;
    fn link_exists(&self, name: &str) -> bool;
    fn create_veth(&self, host_end: &str, peer: &str, peer_mac: MacAddr) -> io::Result<()>;
    /// Creates a tap device (a VM's NIC on the host), down and on no bridge.
    fn create_tap(&self, name: &str) -> io::Result<()>;
    /// Makes `port` a port of `bridge` and brings it up.
    fn attach_to_bridge(&self, port: &str, bridge: &str) -> io::Result<()>;
    /// Brings a link up without making it a bridge port.
    fn set_link_up(&self, link: &str) -> io::Result<()>;
    fn move_to_netns(&self, link: &str, pid: i32) -> io::Result<()>;
    fn delete_link(&self, name: &str) -> io::Result<()>;
    /// Deletes the host's connection-tracking entries of the flows `addr` answered (an LC
    /// that stopped: [`crate::flows::forget_answered_by`]). Best effort.
    fn forget_flows(&self, addr: Ipv4Addr);
    /// Configures NICs inside the netns of `pid` (rename, address, up, default route).
    fn configure_nics(&self, pid: i32, nics: &[crate::ns::launch::NicSetup]) -> io::Result<()>;

    fn spawn_launcher(&self, spec: &LaunchSpec) -> io::Result<Box<dyn Launch + '_>>;
    /// The process's start time (clock ticks since boot), `None` if it is gone or a zombie.
    fn process_start_time(&self, pid: i32) -> Option<u64>;
    fn signal(&self, pid: i32, signal: Signal) -> io::Result<()>;
    fn sleep(&self, d: Duration);
    /// Starts a guard process that writes `value` to `file` when this process goes away
    /// without dropping the guard (a crash): a frozen LC is thawed even if patchover dies
    /// while it holds it frozen. Returns once the guard is armed.
    fn spawn_thaw_guard(
        &self,
        file: &Path,
        value: &str,
    ) -> io::Result<Box<dyn std::any::Any + Send>>;
    /// Runs a helper process of the launcher binary and waits for it; used for exec, netcfg
    /// and attach, which must enter namespaces from a single-threaded process.
    fn run_helper(&self, call: &LcHelper, stdio: crate::Stdio) -> io::Result<crate::ExecOutput>;
    /// Attaches a free loop device to `file` here in the host's mount namespace (buffered:
    /// never direct I/O, see `patchover_qemu::blockserver`); returns the device.
    fn loop_attach(&self, file: &Path) -> io::Result<PathBuf>;
    /// Detaches loop device `dev` now, or, while it is mounted, once its last mount goes.
    fn loop_detach(&self, dev: &Path) -> io::Result<()>;
}

/// The real host.
pub struct LinuxHost {
    /// The `patchover` binary, whose hidden `internal` verbs enter namespaces.
    pub launcher: PathBuf,
    /// The host namespace's rtnetlink connection, opened on first use.
    rtnl: OnceLock<Rtnl>,
}

impl LinuxHost {
    pub fn new(launcher: PathBuf) -> LinuxHost {
        LinuxHost {
            launcher,
            rtnl: OnceLock::new(),
        }
    }

    /// Runs `f` on the host's rtnetlink connection; an error keeps the kernel's errno as its
    /// kind (`AlreadyExists` for a name taken...) and says which link it was about.
    fn rtnl<T>(&self, f: impl FnOnce(&Rtnl) -> Result<T, RtnlError>) -> io::Result<T> {
        let rtnl = match self.rtnl.get() {
            Some(r) => r,
            None => {
                let r = Rtnl::open(None).map_err(link_error)?;
                self.rtnl.get_or_init(|| r)
            }
        };
        f(rtnl).map_err(link_error)
    }
}

/// An rtnetlink error as the [`Host`] seam's `io::Error`: the kind from the errno, the whole
/// chain in the message (the seam's callers wrap it as one source).
fn link_error(e: RtnlError) -> io::Error {
    let kind = e.raw_os_error().map_or(io::ErrorKind::Other, |c| {
        io::Error::from_raw_os_error(c).kind()
    });
    io::Error::new(kind, patchover_core::error_chain(&e))
}

/// Runs a command, turning a non-zero exit into an error carrying its stderr.
pub(crate) fn run_quiet(cmd: &mut Command) -> io::Result<()> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| {
        io::Error::new(e.kind(), format!("cannot run {:?}: {e}", cmd.get_program()))
    })?;
    if out.status.success() {
        return Ok(());
    }
    let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
    Err(io::Error::other(format!(
        "`{} {}` failed: {}",
        cmd.get_program().to_string_lossy(),
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

impl Host for LinuxHost {
    fn read_file(&self, path: &Path) -> io::Result<String> {
        fs::read_to_string(path)
    }
    fn write_file(&self, path: &Path, data: &str) -> io::Result<()> {
        // cgroup files want one write(2) per value.
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        f.write_all(data.as_bytes()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("writing {data:?} to {}: {e}", path.display()),
            )
        })
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir(path)
    }
    fn remove_all(&self, path: &Path) -> io::Result<()> {
        match fs::remove_dir_all(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
    fn is_executable_in(&self, root: &Path, path: &Path) -> bool {
        use std::os::unix::fs::PermissionsExt;
        let mut cur = path.to_path_buf();
        for _ in 0..16 {
            let host = root.join(cur.strip_prefix("/").unwrap_or(&cur));
            let Ok(meta) = fs::symlink_metadata(&host) else {
                return false;
            };
            if meta.file_type().is_symlink() {
                let Ok(target) = fs::read_link(&host) else {
                    return false;
                };
                cur = if target.is_absolute() {
                    target
                } else {
                    cur.parent().unwrap_or(Path::new("/")).join(target)
                };
                continue;
            }
            return meta.is_file() && meta.permissions().mode() & 0o100 != 0;
        }
        false
    }

    fn ensure_bridge(&self, name: &str) -> io::Result<bool> {
        if self.link_exists(name) {
            return Ok(false);
        }
        match self.rtnl(|r| r.add_bridge(name)) {
            // Made by someone else since the check.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            r => r.map(|()| true),
        }
    }
    fn link_exists(&self, name: &str) -> bool {
        Path::new("/sys/class/net").join(name).exists()
    }
    fn create_veth(&self, host_end: &str, peer: &str, peer_mac: MacAddr) -> io::Result<()> {
        self.rtnl(|r| r.add_veth(host_end, peer, peer_mac))
    }
    fn create_tap(&self, name: &str) -> io::Result<()> {
        self.rtnl(|r| r.add_tap(name))
    }
    fn attach_to_bridge(&self, port: &str, bridge: &str) -> io::Result<()> {
        self.rtnl(|r| r.attach(port, bridge))
    }
    fn set_link_up(&self, link: &str) -> io::Result<()> {
        self.rtnl(|r| r.set_up_by_name(link))
    }
    fn move_to_netns(&self, link: &str, pid: i32) -> io::Result<()> {
        let pid = u32::try_from(pid)
            .map_err(|_| io::Error::other(format!("move link {link:?}: no process {pid}")))?;
        self.rtnl(|r| r.move_to_netns_of(link, pid))
    }
    fn delete_link(&self, name: &str) -> io::Result<()> {
        // A link that is gone is fine: the kernel removes a veth by itself when the namespace
        // of its peer goes away.
        self.rtnl(|r| r.delete(name)).map(drop)
    }
    fn forget_flows(&self, addr: Ipv4Addr) {
        crate::flows::forget_answered_by(addr)
    }
    fn configure_nics(&self, pid: i32, nics: &[crate::ns::launch::NicSetup]) -> io::Result<()> {
        let call = LcHelper::Netcfg(Netcfg {
            pid,
            nics: nics.to_vec(),
        });
        let out = self.run_helper(&call, crate::Stdio::Capture)?;
        if out.status == Some(0) {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "configuring NICs inside the LC failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    fn spawn_launcher(&self, spec: &LaunchSpec) -> io::Result<Box<dyn Launch + '_>> {
        let mut child = LcHelper::Launch
            .command(&self.launcher)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot start the launcher {}: {e}", self.launcher.display()),
                )
            })?;
        let mut stdin = child.stdin.take().expect("piped");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = serde_json::to_vec(spec).map_err(io::Error::other)?;
        line.push(b'\n');
        stdin.write_all(&line)?;
        let reply = read_reply(&mut stdout)?;
        let pid = match reply.strip_prefix("pid ") {
            Some(p) => p
                .parse()
                .map_err(|_| io::Error::other(format!("launcher said {reply:?}")))?,
            None => {
                let _ = child.wait();
                return Err(io::Error::other(
                    reply.strip_prefix("err ").unwrap_or(&reply).to_owned(),
                ));
            }
        };
        Ok(Box::new(RealLaunch {
            pid,
            child,
            stdin: Some(stdin),
            stdout,
        }))
    }
    fn process_start_time(&self, pid: i32) -> Option<u64> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let after = stat.rsplit_once(')')?.1;
        let mut fields = after.split_whitespace();
        let state = fields.next()?;
        if state == "Z" || state == "X" {
            return None;
        }
        // Field 22 of stat; `after` starts at field 3.
        fields.nth(18)?.parse().ok()
    }
    fn signal(&self, pid: i32, signal: Signal) -> io::Result<()> {
        match kill(Pid::from_raw(pid), signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
    fn sleep(&self, d: Duration) {
        std::thread::sleep(d)
    }
    fn spawn_thaw_guard(
        &self,
        file: &Path,
        value: &str,
    ) -> io::Result<Box<dyn std::any::Any + Send>> {
        let call = LcHelper::ThawGuard(helper::ThawGuard {
            file: file.to_owned(),
            value: value.to_owned(),
        });
        let mut child = call
            .command(&self.launcher)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut out = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        out.read_line(&mut line)?;
        if line.trim() != "armed" {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::other("the thaw guard did not start"));
        }
        Ok(Box::new(ThawGuard {
            stdin: child.stdin.take(),
            child,
        }))
    }
    fn loop_attach(&self, file: &Path) -> io::Result<PathBuf> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .stdin(std::process::Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "losetup --find --show {}: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    }

    fn loop_detach(&self, dev: &Path) -> io::Result<()> {
        // A busy device gets LO_FLAGS_AUTOCLEAR instead: it goes with its last mount.
        run_quiet(Command::new("losetup").arg("-d").arg(dev))
    }

    fn run_helper(&self, call: &LcHelper, stdio: crate::Stdio) -> io::Result<crate::ExecOutput> {
        let mut cmd = call.command(&self.launcher);
        match stdio {
            crate::Stdio::Inherit => {
                let status = cmd.status()?;
                Ok(crate::ExecOutput {
                    status: status.code(),
                    stdout: Vec::new(),
                    stderr: Vec::new(),
                })
            }
            crate::Stdio::Capture => {
                let out = cmd.stdin(Stdio::null()).output()?;
                Ok(crate::ExecOutput {
                    status: out.status.code(),
                    stdout: out.stdout,
                    stderr: out.stderr,
                })
            }
            crate::Stdio::CaptureFor(limit) => output_within(&mut cmd, limit),
        }
    }
}

/// What [`output_within`] keeps of each stream: its last 64 KiB (an LC's program is not
/// trusted to write little).
const KEPT_OUTPUT: usize = 64 << 10;

/// Reads `r` to its end in a thread, keeping only its last [`KEPT_OUTPUT`] bytes.
struct TailReader {
    kept: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    done: std::sync::mpsc::Receiver<()>,
}

impl TailReader {
    fn start(r: Option<Box<dyn io::Read + Send>>) -> TailReader {
        let kept = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, done) = std::sync::mpsc::channel();
        let buf = kept.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            if let Some(mut r) = r {
                while let Ok(n @ 1..) = io::Read::read(&mut r, &mut chunk) {
                    let mut b = buf.lock().unwrap_or_else(|e| e.into_inner());
                    b.extend_from_slice(&chunk[..n]);
                    if b.len() > 2 * KEPT_OUTPUT {
                        let cut = b.len() - KEPT_OUTPUT;
                        b.drain(..cut);
                    }
                }
            }
            let _ = tx.send(());
        });
        TailReader { kept, done }
    }

    /// What was read by the end of the stream, or within `grace` (a stream something else
    /// still holds open).
    fn take(self, grace: Duration) -> Vec<u8> {
        let _ = self.done.recv_timeout(grace);
        let mut b = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let cut = b.len().saturating_sub(KEPT_OUTPUT);
        b.split_off(cut)
    }
}

/// Runs `cmd` with its output captured (the last [`KEPT_OUTPUT`] bytes of each stream); kills
/// it once it has run `limit` (the exec helper's command dies with it: parent-death signal).
/// A stream still held open after the program ended (by something it started) is read for at
/// most a second more, so a program cannot hold the caller past its limit.
fn output_within(cmd: &mut Command, limit: Duration) -> io::Result<crate::ExecOutput> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    type Pipe = Box<dyn io::Read + Send>;
    let out = TailReader::start(child.stdout.take().map(|r| Box::new(r) as Pipe));
    let err = TailReader::start(child.stderr.take().map(|r| Box::new(r) as Pipe));
    let start = std::time::Instant::now();
    let (status, killed) = loop {
        if let Some(st) = child.try_wait()? {
            break (st.code(), false);
        }
        if start.elapsed() >= limit {
            let _ = child.kill();
            let _ = child.wait();
            break (None, true);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let grace = Duration::from_secs(1);
    let stdout = out.take(grace);
    let mut stderr = err.take(grace);
    if killed {
        stderr.extend_from_slice(crate::killed_after(limit).as_bytes());
    }
    Ok(crate::ExecOutput {
        status,
        stdout,
        stderr,
    })
}

fn read_reply(r: &mut BufReader<ChildStdout>) -> io::Result<String> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    if line.is_empty() {
        return Err(io::Error::other(
            "the launcher exited without a word; see its stderr",
        ));
    }
    Ok(line.trim_end().to_owned())
}

/// Dropping it disarms the guard (it exits without writing).
struct ThawGuard {
    stdin: Option<ChildStdin>,
    child: Child,
}

impl Drop for ThawGuard {
    fn drop(&mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"disarm\n");
        }
        let _ = self.child.wait();
    }
}

struct RealLaunch {
    pid: i32,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Launch for RealLaunch {
    fn pid(&self) -> i32 {
        self.pid
    }
    fn release(mut self: Box<Self>) -> Result<(), String> {
        self.stdin
            .as_mut()
            .expect("released once")
            .write_all(b"go\n")
            .map_err(|e| format!("cannot signal the launcher: {e}"))?;
        let reply = read_reply(&mut self.stdout).map_err(|e| e.to_string());
        let _ = self.child.wait();
        let reply = reply?;
        match reply.as_str() {
            "ok" => Ok(()),
            other => Err(other.strip_prefix("err ").unwrap_or(other).to_owned()),
        }
    }
}

impl Drop for RealLaunch {
    fn drop(&mut self) {
        // Dropped without release: the launcher sees EOF on stdin and kills the waiting init.
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod output_tests {
    use super::*;

    #[test]
    fn a_program_that_outlives_its_limit_is_killed_and_says_so() {
        let start = std::time::Instant::now();
        let out = output_within(
            Command::new("sh").args(["-c", "echo started; exec sleep 30"]),
            Duration::from_millis(300),
        )
        .unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(out.status, None);
        assert_eq!(out.stdout, b"started\n");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("killed after 300ms"), "{err}");
    }

    #[test]
    fn only_the_end_of_a_flood_is_kept_and_a_held_stream_does_not_hold_the_caller() {
        let start = std::time::Instant::now();
        // 1 MiB of 'x' then "end"; a background child keeps stdout open for 15 s (it then ends by itself).
        let out = output_within(
            Command::new("sh").args([
                "-c",
                "head -c 1048576 /dev/zero | tr '\\0' x; echo end; (sleep 15 &) ; exit 4",
            ]),
            Duration::from_secs(20),
        )
        .unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(out.status, Some(4));
        assert!(out.stdout.len() <= KEPT_OUTPUT, "{}", out.stdout.len());
        assert!(
            out.stdout.ends_with(b"xend\n"),
            "{:?}",
            &out.stdout[out.stdout.len() - 8..]
        );
    }

    #[test]
    fn a_program_within_its_limit_keeps_its_status_and_output() {
        let out = output_within(
            Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(20),
        )
        .unwrap();
        assert_eq!(out.status, Some(3));
        assert_eq!(
            (&out.stdout[..], &out.stderr[..]),
            (&b"out\n"[..], &b"err\n"[..])
        );
    }
}
