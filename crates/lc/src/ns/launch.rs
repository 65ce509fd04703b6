//! The code that runs in fresh single-threaded processes (`patchover internal …`) to create
//! and enter an LC's namespaces.
//!
//! Why a separate process: `unshare(CLONE_NEWNS)` and `setns` into a mount namespace refuse
//! multi-threaded callers, and `fork` in a multi-threaded program may only call
//! async-signal-safe functions. So patchover spawns itself, and the child does the namespace
//! work with nothing else running.
//!
//! Launch protocol (over the launcher's stdin/stdout, one line each):
//! 1. patchover writes the [`LaunchSpec`] as JSON;
//! 2. the launcher joins the LC's cgroups, unshares the namespaces, forks the LC's init-to-be
//!    (PID 1 of the new PID namespace) and answers `pid <host pid>`;
//! 3. patchover moves the NICs into the new network namespace, configures them, and writes
//!    `go` (or closes stdin to abort: the launcher then kills the child);
//! 4. the child mounts the disks, `/proc`, `/sys`, `/dev`, the agent directory, pivots into
//!    the system disk and execs init; the launcher answers `ok`, or `err <why>` if any of it
//!    failed, and exits. Init is left without a parent in patchover, so it outlives patchover.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::fcntl::OFlag;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns};
use nix::sys::stat::{Mode, SFlag, makedev, mknodat};
use nix::sys::wait::waitpid;
use nix::unistd::{
    ForkResult, chdir, dup2_stderr, dup2_stdin, dup2_stdout, execve, fork, pipe2, pivot_root,
    sethostname, setsid,
};
use patchover_core::{DiskKind, Ipv4Cidr};
use patchover_lcroot::LcRoot;
use patchover_netlink::rtnl::{Rtnl, RtnlError};
use serde::{Deserialize, Serialize};

use crate::host::run_quiet;

/// Prefix of the launcher's error when the system disk has no init; the backend maps it to
/// [`crate::LcError::NoInit`].
pub const NO_INIT: &str = "no init at ";

const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A disk to mount inside the LC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    pub source: PathBuf,
    pub kind: DiskKind,
    /// Path inside the LC.
    pub target: PathBuf,
}

/// Everything the launcher needs; written by the backend, read by `internal launch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchSpec {
    pub lc: String,
    pub hostname: String,
    pub system_disk: MountSpec,
    /// An empty host directory where the system disk is mounted (in the LC's mount
    /// namespace only) before the pivot.
    pub staging: PathBuf,
    pub init: PathBuf,
    pub mounts: Vec<MountSpec>,
    /// Host directory bound at [`patchover_agent::GUEST_SOCKET_DIR`] inside.
    pub agent_dir: Option<PathBuf>,
    pub cgroup_procs: Vec<PathBuf>,
    /// Where init's stdout and stderr go (on the host).
    pub console: PathBuf,
}

/// One NIC as configured inside the LC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSetup {
    /// The name it arrives with.
    pub temp_name: String,
    pub name: String,
    pub address: Option<String>,
    pub gateway: Option<String>,
}

fn errno(context: &str) -> impl FnOnce(nix::errno::Errno) -> String + '_ {
    move |e| format!("{context}: {e}")
}

/// `internal launch`: see the module docs. Returns the process exit code.
pub fn launch_main() -> i32 {
    let stdin = io::stdin();
    let mut input = stdin.lock();
    let mut out = io::stdout();
    let mut line = String::new();
    if input.read_line(&mut line).is_err() {
        return 1;
    }
    let reply = |out: &mut io::Stdout, s: &str| {
        let _ = writeln!(out, "{s}");
        let _ = out.flush();
    };
    let spec: LaunchSpec = match serde_json::from_str(&line) {
        Ok(s) => s,
        Err(e) => {
            reply(&mut out, &format!("err bad launch spec: {e}"));
            return 1;
        }
    };
    let prepared = (|| -> Result<(File, OwnedFd, OwnedFd, OwnedFd, OwnedFd), String> {
        let console = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.console)
            .map_err(|e| {
                format!(
                    "cannot open the console log {}: {e}",
                    spec.console.display()
                )
            })?;
        let me = std::process::id().to_string();
        for f in &spec.cgroup_procs {
            fs::write(f, &me).map_err(|e| format!("cannot join cgroup {}: {e}", f.display()))?;
        }
        // The LC's network namespace gets a TCP table of its own, so a switch's drain walks
        // only the LC's sockets (patchover_netlink::tcptable).
        patchover_netlink::tcptable::unshare_with_own_tcp_table(
            CloneFlags::CLONE_NEWNS
                | CloneFlags::CLONE_NEWUTS
                | CloneFlags::CLONE_NEWIPC
                | CloneFlags::CLONE_NEWNET
                | CloneFlags::CLONE_NEWPID,
            patchover_netlink::tcptable::LC_TCP_TABLE_BUCKETS,
        )
        .map_err(|e| {
            format!(
                "creating the namespaces: {}",
                patchover_core::error_chain(&e)
            )
        })?;
        let (go_r, go_w) = pipe2(OFlag::O_CLOEXEC).map_err(errno("pipe"))?;
        let (err_r, err_w) = pipe2(OFlag::O_CLOEXEC).map_err(errno("pipe"))?;
        Ok((console, go_r, go_w, err_r, err_w))
    })();
    let (console, go_r, go_w, err_r, err_w) = match prepared {
        Ok(p) => p,
        Err(e) => {
            reply(&mut out, &format!("err {e}"));
            return 1;
        }
    };
    // SAFETY: this process is single-threaded (it is `patchover internal launch`, which
    // starts no thread), so the child may do anything a normal program does.
    match unsafe { fork() } {
        Err(e) => {
            reply(&mut out, &format!("err fork: {e}"));
            1
        }
        Ok(ForkResult::Child) => {
            drop(go_w);
            drop(err_r);
            let mut go = [0u8; 1];
            let mut go_r = File::from(go_r);
            if go_r.read_exact(&mut go).is_err() {
                // Aborted by patchover before release.
                std::process::exit(1);
            }
            let err = child_boot(&spec, &console).unwrap_err();
            let mut err_w = File::from(err_w);
            let _ = err_w.write_all(err.as_bytes());
            std::process::exit(1);
        }
        Ok(ForkResult::Parent { child }) => {
            drop(go_r);
            drop(err_w);
            reply(&mut out, &format!("pid {child}"));
            let mut cmd = String::new();
            let _ = input.read_line(&mut cmd);
            if cmd.trim() != "go" {
                let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
                let _ = waitpid(child, None);
                return 1;
            }
            let mut go_w = File::from(go_w);
            if go_w.write_all(b"g").is_err() {
                reply(&mut out, "err the LC's init died before release");
                return 1;
            }
            drop(go_w);
            // The error pipe is close-on-exec: EOF without data means init was exec'd.
            let mut msg = String::new();
            let _ = File::from(err_r).read_to_string(&mut msg);
            if msg.is_empty() {
                reply(&mut out, "ok");
                0
            } else {
                let _ = waitpid(child, None);
                reply(&mut out, &format!("err {}", msg.replace('\n', " ")));
                1
            }
        }
    }
}

/// Runs in the LC's init-to-be: mounts, pivots and execs. Returns only on failure.
fn child_boot(spec: &LaunchSpec, console: &File) -> Result<std::convert::Infallible, String> {
    setsid().map_err(errno("setsid"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(errno("making / private"))?;
    sethostname(&spec.hostname).map_err(errno("sethostname"))?;

    let root = &spec.staging;
    fs::create_dir_all(root).map_err(|e| format!("creating {}: {e}", root.display()))?;
    mount_disk(&spec.system_disk, root)?;
    // From here every path inside the LC is resolved within its root: the disk may hold links
    // that point at host paths (runc's CVE-2021-30465 class); mounts go onto the resolved
    // directory's descriptor, never onto a path looked up again.
    let lc = LcRoot::open(root).map_err(|e| e.to_string())?;
    if !lc.is_executable_file(&spec.init) {
        return Err(format!(
            "{NO_INIT}{} on the system disk {}",
            spec.init.display(),
            spec.system_disk.source.display()
        ));
    }
    for m in &spec.mounts {
        let target = lc
            .mount_target(&m.target, 0o755)
            .map_err(|e| e.to_string())?;
        mount_disk(m, &fd_path(&target))?;
    }
    mount_kernel_fs(&lc)?;
    if let Some(agent) = &spec.agent_dir {
        let target = lc
            .mount_target(Path::new(patchover_agent::GUEST_SOCKET_DIR), 0o755)
            .map_err(|e| e.to_string())?;
        bind(agent, &fd_path(&target))?;
    }

    chdir(root).map_err(errno("chdir to the new root"))?;
    pivot_root(".", ".").map_err(errno("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(errno("detaching the old root"))?;
    chdir("/").map_err(errno("chdir /"))?;

    let null = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/null")
        .map_err(|e| format!("opening /dev/null: {e}"))?;
    dup2_stdin(null.as_fd()).map_err(errno("dup2"))?;
    dup2_stdout(console.as_fd()).map_err(errno("dup2"))?;
    dup2_stderr(console.as_fd()).map_err(errno("dup2"))?;

    let init = CString::new(spec.init.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    let env = [
        CString::new(PATH_ENV).expect("no NUL"),
        CString::new("TERM=linux").expect("no NUL"),
        CString::new("container=patchover").expect("no NUL"),
    ];
    execve(&init, &[&init], &env).map_err(errno("exec init"))
}

/// The path of an open descriptor, for `mount(2)` and for `mount(8)` started from here (the
/// descriptor must then be inherited: [`inheritable`]).
fn fd_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn bind(source: &Path, target: &Path) -> Result<(), String> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("binding {} at {}: {e}", source.display(), target.display()))
}

fn mount_disk(m: &MountSpec, target: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let block_device = fs::metadata(&m.source).is_ok_and(|md| md.file_type().is_block_device());
    match m.kind {
        DiskKind::Dir => bind(&m.source, target),
        // A loop device the host attached (an image served by the image server).
        DiskKind::Image if block_device => run_quiet(mount_cmd(target)?.arg(&m.source).arg(target))
            .map_err(|e| format!("mounting {}: {e}", m.source.display())),
        // util-linux sets up the loop device with autoclear: it goes when the LC's mount
        // namespace (and so the mount) goes.
        DiskKind::Image => run_quiet(
            mount_cmd(target)?
                .arg("-o")
                .arg("loop")
                .arg(&m.source)
                .arg(target),
        )
        .map_err(|e| format!("mounting image {}: {e}", m.source.display())),
    }
}

/// `mount --no-canonicalize`: a `/proc/self/fd/N` target is passed to the kernel as it is (a
/// canonical path would be looked up again). The descriptor `N` is made inheritable for it.
fn mount_cmd(target: &Path) -> Result<Command, String> {
    if let Some(n) = target
        .strip_prefix("/proc/self/fd")
        .ok()
        .and_then(|n| n.to_str()?.parse::<i32>().ok())
    {
        // SAFETY: `n` is a descriptor this process holds open for the command's lifetime
        // (the caller's target); F_SETFD only changes its close-on-exec flag.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(n) };
        nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .map_err(errno("making the mount point inheritable"))?;
    }
    let mut c = Command::new("mount");
    c.arg("--no-canonicalize");
    Ok(c)
}

fn mount_kernel_fs(lc: &LcRoot) -> Result<(), String> {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let at = |p: &str| {
        lc.mount_target(Path::new(p), 0o755)
            .map_err(|e| e.to_string())
    };
    let proc_ = at("proc")?;
    mount(
        Some("proc"),
        &fd_path(&proc_),
        Some("proc"),
        nosuid,
        None::<&str>,
    )
    .map_err(errno("mounting /proc"))?;
    let sys = at("sys")?;
    mount(
        Some("sysfs"),
        &fd_path(&sys),
        Some("sysfs"),
        nosuid | MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .map_err(errno("mounting /sys"))?;
    let dev = at("dev")?;
    mount(
        Some("tmpfs"),
        &fd_path(&dev),
        Some("tmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=755,size=64k"),
    )
    .map_err(errno("mounting /dev"))?;
    // The fresh tmpfs, opened again now that it is mounted: what follows is created in it.
    let dev = lc
        .mkdir_all(Path::new("dev"), 0o755)
        .map_err(|e| e.to_string())?;
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        mknodat(
            dev.as_fd(),
            name,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(major, minor),
        )
        .map_err(errno("creating device nodes"))?;
    }
    let pts = at("dev/pts")?;
    mount(
        Some("devpts"),
        &fd_path(&pts),
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=620"),
    )
    .map_err(errno("mounting /dev/pts"))?;
    let shm = at("dev/shm")?;
    mount(
        Some("tmpfs"),
        &fd_path(&shm),
        Some("tmpfs"),
        nosuid,
        Some("mode=1777"),
    )
    .map_err(errno("mounting /dev/shm"))?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        nix::unistd::symlinkat(target, dev.as_fd(), link)
            .map_err(|e| format!("creating /dev/{link}: {e}"))?;
    }
    Ok(())
}

/// Opens `/proc/<pid>/ns/<kind>`.
fn ns_fd(pid: i32, kind: &str) -> Result<OwnedFd, String> {
    let f = File::open(format!("/proc/{pid}/ns/{kind}")).map_err(|e| {
        format!("LC process {pid} has no {kind} namespace (is the LC running?): {e}")
    })?;
    Ok(OwnedFd::from(f))
}

/// `internal exec --pid P [--cgroup-procs F]… -- ARGV`: runs ARGV inside the LC whose init is
/// P, in its cgroups and all its namespaces. Returns the program's exit code.
///
/// The command ends with the patchover that asked for it (parent-death signals on this helper
/// and on the command): a command patchover was killed in the middle of must not act after
/// the recovery that followed — a service parked for a hand-off by an orphaned `park` after
/// recovery's `unpark` would hold its requests until its park expires. What the command
/// starts in the background (its forks) is not touched.
pub fn exec_main(pid: i32, cgroup_procs: &[PathBuf], argv: &[String]) -> Result<i32, String> {
    die_with_parent()?;
    let fds: Vec<(OwnedFd, CloneFlags)> = [
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("net", CloneFlags::CLONE_NEWNET),
        ("pid", CloneFlags::CLONE_NEWPID),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ]
    .into_iter()
    .map(|(k, f)| Ok((ns_fd(pid, k)?, f)))
    .collect::<Result<_, String>>()?;
    let me = std::process::id().to_string();
    for f in cgroup_procs {
        fs::write(f, &me).map_err(|e| format!("cannot join cgroup {}: {e}", f.display()))?;
    }
    for (fd, flag) in &fds {
        setns(fd, *flag).map_err(errno("setns"))?;
    }
    let (prog, args) = argv.split_first().ok_or("nothing to run")?;
    // The child is the first process in the LC's PID namespace we spawn after setns.
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .env_clear()
        .env("PATH", &PATH_ENV[5..])
        .env("TERM", "linux")
        .current_dir("/");
    // SAFETY: the hook only calls prctl(2), which is async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(io::Error::from)
        });
    }
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {prog:?} inside the LC: {e}"))?;
    Ok(status.code().unwrap_or(128 + 9))
}

/// Makes this process get SIGKILL when its parent ends; fails if the parent already has.
fn die_with_parent() -> Result<(), String> {
    let parent = nix::unistd::getppid();
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(errno("prctl(PR_SET_PDEATHSIG)"))?;
    if nix::unistd::getppid() != parent {
        return Err("patchover ended before its command could start".to_owned());
    }
    Ok(())
}

/// `internal netcfg --pid P --nics JSON`: configures NICs inside the network namespace of P
/// over rtnetlink, on a socket opened after joining only that namespace.
pub fn netcfg_main(pid: i32, nics: &[NicSetup]) -> Result<(), String> {
    let fd = ns_fd(pid, "net")?;
    setns(&fd, CloneFlags::CLONE_NEWNET).map_err(errno("setns net"))?;
    let rtnl = Rtnl::open(None).map_err(|e| patchover_core::error_chain(&e))?;
    configure_nics(&rtnl, nics)
}

/// Loopback up; each NIC renamed, addressed, up, and given its default route.
fn configure_nics(r: &Rtnl, nics: &[NicSetup]) -> Result<(), String> {
    let chain = |e: RtnlError| patchover_core::error_chain(&e);
    r.set_up_by_name("lo").map_err(chain)?;
    for n in nics {
        if n.temp_name != n.name {
            r.rename(&n.temp_name, &n.name).map_err(chain)?;
        }
        let index = r.need_link(&n.name).map_err(chain)?.index;
        if let Some(a) = &n.address {
            let cidr: Ipv4Cidr = a.parse().map_err(|e| format!("NIC {}: {e}", n.name))?;
            r.add_address(index, cidr).map_err(chain)?;
        }
        r.set_up(index, true).map_err(chain)?;
        if let Some(g) = &n.gateway {
            let gw: std::net::Ipv4Addr = g
                .parse()
                .map_err(|e| format!("NIC {}: gateway {g:?}: {e}", n.name))?;
            r.add_default_route(gw, index).map_err(chain)?;
        }
    }
    Ok(())
}

/// `internal attach-disk --pid P --source DIR|IMAGE --target PATH [--image-staging DIR]`: mounts
/// a host directory (or an image, loop-mounted on the host first) into the
/// running LC's mount namespace. The tree is cloned with `open_tree` while still in the
/// host's namespace, then attached inside with `move_mount`.
pub fn attach_main(
    pid: i32,
    source: &Path,
    target: &Path,
    image_staging: Option<&Path>,
) -> Result<(), String> {
    let mnt = ns_fd(pid, "mnt")?;
    // An image: loop-mounted here on the host (buffered, autoclear: the loop device goes with
    // the last mount), cloned below, then unmounted here; the LC keeps the clone.
    let staged = match image_staging {
        Some(dir) => {
            fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
            mount_disk(
                &MountSpec {
                    source: source.to_owned(),
                    kind: DiskKind::Image,
                    target: dir.to_owned(),
                },
                dir,
            )?;
            Some(dir)
        }
        None => None,
    };
    let tree = open_tree(staged.unwrap_or(source));
    if let Some(dir) = staged {
        let _ = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_dir(dir);
    }
    let tree = tree?;
    setns(&mnt, CloneFlags::CLONE_NEWNS).map_err(errno("setns mnt"))?;
    move_into(&tree, target)
}

/// A detached copy of the mount tree at `source`.
fn open_tree(source: &Path) -> Result<OwnedFd, String> {
    let src = CString::new(source.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: open_tree takes a valid NUL-terminated path and flags; the result is a new fd
    // we own, or -1.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src.as_ptr(),
            (libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_RECURSIVE as u32)
                as libc::c_uint,
        )
    };
    if tree < 0 {
        return Err(format!(
            "open_tree {}: {}",
            source.display(),
            io::Error::last_os_error()
        ));
    }
    // SAFETY: `tree` is a fresh fd returned by open_tree and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(tree as i32) })
}

/// Mounts `tree` at `target` in this process's mount namespace (the LC's) and checks it is
/// there.
fn move_into(tree: &OwnedFd, target: &Path) -> Result<(), String> {
    // This process is in the LC's mount namespace now, "/" is the LC's root; the target is
    // still resolved within it and the mount goes onto the resolved descriptor.
    let lc = LcRoot::open(Path::new("/")).map_err(|e| e.to_string())?;
    let at = lc
        .mount_target(target, 0o755)
        .map_err(|e| format!("creating {} inside the LC: {e}", target.display()))?;
    let empty = CString::new("").expect("no NUL");
    // SAFETY: valid fds and NUL-terminated (empty) paths; MOVE_MOUNT_F_EMPTY_PATH and
    // MOVE_MOUNT_T_EMPTY_PATH make the kernel use `tree` and `at` themselves.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            at.as_raw_fd(),
            empty.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(format!(
            "move_mount to {}: {}",
            target.display(),
            io::Error::last_os_error()
        ));
    }
    // Check from inside that the mount is there: an attach that cannot be seen is a failure.
    // (This process is not in the LC's PID namespace, so /proc/self does not exist in the
    // LC's /proc; its init, PID 1 there, sees the same mounts.)
    let info = fs::read_to_string("/proc/1/mountinfo")
        .map_err(|e| format!("reading the LC's mount table: {e}"))?;
    let want = target.to_string_lossy();
    if !info.lines().any(|l| l.split(' ').nth(4) == Some(&want)) {
        return Err(format!(
            "{} is not a mount point inside the LC after the attach",
            target.display()
        ));
    }
    Ok(())
}

/// `internal thaw-guard --file F --value V`: says `armed`, then waits on stdin. `disarm`
/// ends it quietly; end of input without it (patchover died) writes V to F first.
pub fn thaw_guard_main(file: &Path, value: &str) -> i32 {
    let mut out = io::stdout();
    let _ = writeln!(out, "armed");
    let _ = out.flush();
    let mut line = String::new();
    let _ = io::stdin().lock().read_line(&mut line);
    if line.trim() == "disarm" {
        return 0;
    }
    match fs::write(file, value) {
        Ok(()) => {
            eprintln!(
                "patchover thaw guard: patchover went away while an LC was frozen; thawed {}",
                file.display()
            );
            0
        }
        Err(e) => {
            eprintln!("patchover thaw guard: cannot thaw {}: {e}", file.display());
            1
        }
    }
}
