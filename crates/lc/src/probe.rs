//! Probes of the kernel features the `ns` backend relies on, made for real (a namespace
//! unshared in a child, a cgroup frozen and thawed, a loop device asked for): `patchover
//! doctor` reports them before the first boot finds out.

use std::io;
use std::path::{Path, PathBuf};

pub use nix::sched::CloneFlags;

use crate::cgroup::Layout;

/// Unshares `flags` in a forked child (this process keeps its namespaces); `Err` with the
/// kernel's answer when it refuses.
pub fn namespace(flags: CloneFlags) -> io::Result<()> {
    // SAFETY: the child calls only async-signal-safe functions (unshare, _exit).
    match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
        nix::unistd::ForkResult::Child => {
            let code = match nix::sched::unshare(flags) {
                Ok(()) => 0,
                Err(e) => e as i32,
            };
            // SAFETY: _exit ends the forked child without running this process's destructors.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            match nix::sys::wait::waitpid(child, None).map_err(io::Error::from)? {
                nix::sys::wait::WaitStatus::Exited(_, 0) => Ok(()),
                nix::sys::wait::WaitStatus::Exited(_, errno) => {
                    Err(io::Error::from_raw_os_error(errno))
                }
                other => Err(io::Error::other(format!("probe child ended: {other:?}"))),
            }
        }
    }
}

/// The freezer an LC is held still with: a throw-away cgroup made under `mountinfo`'s cgroup
/// v2 mount (or the v1 freezer), frozen, seen frozen, thawed and removed. `Ok` says which.
pub fn freezer(mountinfo: &str) -> io::Result<String> {
    let layout = Layout::parse_mountinfo(mountinfo);
    let name = format!("patchover-doctor-{}", std::process::id());
    if let Some(v2) = &layout.v2 {
        let dir = v2.join(&name);
        let r = with_group(&dir, || {
            freeze_cycle(
                &dir.join("cgroup.freeze"),
                ("1", "0"),
                &dir.join("cgroup.events"),
                "frozen 1",
            )
        });
        return r.map(|()| format!("cgroup v2 freezer ({})", v2.display()));
    }
    let Some(v1) = &layout.v1_freezer else {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup2 mount and no v1 freezer hierarchy in /proc/self/mountinfo",
        ));
    };
    let dir = v1.join(&name);
    let state = dir.join("freezer.state");
    with_group(&dir, || {
        freeze_cycle(&state, ("FROZEN", "THAWED"), &state, "FROZEN")
    })
    .map(|()| format!("cgroup v1 freezer ({})", v1.display()))
}

fn with_group(dir: &PathBuf, f: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
    std::fs::create_dir(dir)?;
    let r = f();
    let removed = std::fs::remove_dir(dir);
    r.and(removed)
}

fn freeze_cycle(knob: &Path, (on, off): (&str, &str), seen: &Path, frozen: &str) -> io::Result<()> {
    std::fs::write(knob, on)?;
    let t = std::time::Instant::now();
    while !std::fs::read_to_string(seen)?.contains(frozen) {
        if t.elapsed() > std::time::Duration::from_secs(2) {
            let _ = std::fs::write(knob, off);
            return Err(io::Error::other(format!(
                "{} never said {frozen}",
                seen.display()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::fs::write(knob, off)
}

/// Loop devices (an `ns` LC's image disk is mounted through one): `control` answers
/// `LOOP_CTL_GET_FREE` with a free device's number; nothing is attached.
pub fn loop_device(control: &Path) -> io::Result<u32> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(control)?;
    const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
    // SAFETY: an ioctl without argument on an open fd.
    let n = unsafe { libc::ioctl(f.as_raw_fd(), LOOP_CTL_GET_FREE) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_the_kernel_refuses_is_an_error() {
        // A flag unshare(2) does not know is EINVAL on every kernel.
        let e = namespace(CloneFlags::from_bits_retain(0x1)).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
    }

    #[test]
    fn no_freezer_in_the_mountinfo_is_an_error() {
        let e = freezer("36 35 0:30 / /proc rw - proc proc rw\n").unwrap_err();
        assert!(e.to_string().contains("no cgroup2 mount"), "{e}");
        // A hierarchy that is not there: the group cannot be made.
        let bogus = "30 23 0:26 / /nonexistent/cgroup rw - cgroup2 cgroup2 rw\n";
        assert!(freezer(bogus).is_err());
    }

    #[test]
    fn a_missing_loop_control_is_an_error() {
        let e = loop_device(Path::new("/nonexistent/loop-control")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
