//! A [`Quiesce`] that freezes a cgroup v2 directory (`cgroup.freeze`), the freezer the ns LCs and
//! the benchmark's writer live in.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use patchover_core::Quiesce;

/// Freezes every task of one cgroup v2 directory.
#[derive(Debug, Clone)]
pub struct CgroupFreezer {
    dir: PathBuf,
    timeout: Duration,
}

impl CgroupFreezer {
    /// `dir` is a cgroup v2 directory (e.g. `/sys/fs/cgroup/unified/lc1`).
    pub fn new(dir: impl Into<PathBuf>) -> CgroupFreezer {
        CgroupFreezer {
            dir: dir.into(),
            timeout: Duration::from_secs(5),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Waits until `cgroup.events` holds the line `want`. The file is polled (kernfs wakes a
    /// `POLLPRI` waiter when it changes), so the wait ends as soon as the state is reached
    /// rather than at the next timer tick of a sleep loop, which a loaded host delays.
    fn wait(&self, want: &str) -> io::Result<()> {
        let start = Instant::now();
        let mut f = fs::File::open(self.dir.join("cgroup.events"))?;
        let mut buf = String::new();
        loop {
            buf.clear();
            f.seek(SeekFrom::Start(0))?;
            f.read_to_string(&mut buf)?;
            if buf.lines().any(|l| l == want) {
                return Ok(());
            }
            let left = self.timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{} did not report `{want}`", self.dir.display()),
                ));
            }
            // A change between the read and the poll is not lost: kernfs compares the file's
            // event count with the one seen at open/read. Wake at least every 10 ms anyway.
            let mut pfd = libc::pollfd {
                fd: f.as_raw_fd(),
                events: libc::POLLPRI,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, 10) as libc::c_int;
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, ms) };
        }
    }
}

impl Quiesce for CgroupFreezer {
    fn freeze(&mut self) -> io::Result<()> {
        fs::write(self.dir.join("cgroup.freeze"), "1")?;
        self.wait("frozen 1")
    }

    fn thaw(&mut self) -> io::Result<()> {
        fs::write(self.dir.join("cgroup.freeze"), "0")?;
        self.wait("frozen 0")
    }
}
