//! A [`Quiesce`] that freezes a cgroup v2 directory (`cgroup.freeze`), the freezer the ns LCs and
//! the benchmark's writer live in.

use std::fs;
use std::io;
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

    fn wait(&self, want: &str) -> io::Result<()> {
        let start = Instant::now();
        loop {
            let ev = fs::read_to_string(self.dir.join("cgroup.events"))?;
            if ev.lines().any(|l| l == want) {
                return Ok(());
            }
            if start.elapsed() > self.timeout {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{} did not report `{want}`", self.dir.display()),
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
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
