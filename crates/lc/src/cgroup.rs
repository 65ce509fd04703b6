//! Cgroups for LCs on cgroup v1, v2, and the hybrid of both.
//!
//! An LC's CPU share becomes a CFS quota on its CPU (`cpu.cfs_quota_us` on v1, `cpu.max` on
//! v2) plus a cpuset, its memory a hard limit (`memory.limit_in_bytes` / `memory.max`). Where
//! cgroup v2 is mounted at all (pure v2, or the hybrid's `unified` hierarchy) the LC also gets
//! a v2 group: it tracks membership and gives `cgroup.freeze` and `cgroup.kill`, which work
//! there even when no controller is enabled. Without v2, the v1 freezer is used.
//!
//! The layout is read from `/proc/self/mountinfo`, never assumed.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::host::Host;

pub const CFS_PERIOD_US: u64 = 100_000;

/// Where each hierarchy is mounted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// The cgroup2 mount, if any.
    pub v2: Option<PathBuf>,
    /// Controllers available in `v2` (from its `cgroup.controllers`).
    pub v2_controllers: Vec<String>,
    pub v1_cpu: Option<PathBuf>,
    pub v1_cpuset: Option<PathBuf>,
    pub v1_memory: Option<PathBuf>,
    pub v1_freezer: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read the cgroup layout from /proc/self/mountinfo")]
    Mountinfo(#[source] io::Error),
    #[error(
        "no cgroup hierarchy offers the {0} controller; mount cgroup v2 or the v1 {0} controller"
    )]
    NoController(&'static str),
    #[error("cgroup {path}", path = path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Layout {
    pub fn detect(host: &dyn Host) -> Result<Layout, CgroupError> {
        let text = host
            .read_file(Path::new("/proc/self/mountinfo"))
            .map_err(CgroupError::Mountinfo)?;
        let mut l = Layout::parse_mountinfo(&text);
        if let Some(v2) = &l.v2 {
            l.v2_controllers = host
                .read_file(&v2.join("cgroup.controllers"))
                .map(|s| s.split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default();
        }
        Ok(l)
    }

    /// Parses mountinfo lines: `… mountpoint … - fstype source superoptions`.
    pub fn parse_mountinfo(text: &str) -> Layout {
        let mut l = Layout::default();
        for line in text.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let Some(mountpoint) = left.split(' ').nth(4) else {
                continue;
            };
            let mut r = right.split(' ');
            let fstype = r.next().unwrap_or_default();
            let superopts = r.nth(1).unwrap_or_default();
            let mp = PathBuf::from(mountpoint);
            match fstype {
                "cgroup2" if l.v2.is_none() => l.v2 = Some(mp),
                "cgroup" => {
                    for opt in superopts.split(',') {
                        let slot = match opt {
                            "cpu" => &mut l.v1_cpu,
                            "cpuset" => &mut l.v1_cpuset,
                            "memory" => &mut l.v1_memory,
                            "freezer" => &mut l.v1_freezer,
                            _ => continue,
                        };
                        if slot.is_none() {
                            *slot = Some(mp.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        l
    }

    fn v2_has(&self, c: &str) -> bool {
        self.v2.is_some() && self.v2_controllers.iter().any(|x| x == c)
    }

    /// The groups an LC named `name` under `parent` gets.
    pub fn groups(&self, parent: &str, name: &str) -> Result<LcGroups, CgroupError> {
        let sub = |root: &Option<PathBuf>| root.as_ref().map(|r| r.join(parent).join(name));
        let cpu = if let Some(p) = sub(&self.v1_cpu) {
            Knob::V1(p)
        } else if self.v2_has("cpu") {
            Knob::V2
        } else {
            return Err(CgroupError::NoController("cpu"));
        };
        let memory = if let Some(p) = sub(&self.v1_memory) {
            Knob::V1(p)
        } else if self.v2_has("memory") {
            Knob::V2
        } else {
            return Err(CgroupError::NoController("memory"));
        };
        let cpuset = if let Some(p) = sub(&self.v1_cpuset) {
            Some(Knob::V1(p))
        } else if self.v2_has("cpuset") {
            Some(Knob::V2)
        } else {
            None
        };
        let v2 = sub(&self.v2);
        let freezer = if v2.is_some() {
            None
        } else {
            Some(sub(&self.v1_freezer).ok_or(CgroupError::NoController("freezer"))?)
        };
        Ok(LcGroups {
            v2,
            cpu,
            memory,
            cpuset,
            freezer,
            v1_cpuset_root: self.v1_cpuset.clone(),
            v2_root: self.v2.clone(),
            v2_enable: ["cpu", "memory", "cpuset"]
                .into_iter()
                .filter(|c| self.v2_has(c))
                .map(str::to_owned)
                .collect(),
        })
    }
}

/// Where a controller's files live: its own v1 directory, or the LC's v2 group.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Knob {
    V1(PathBuf),
    V2,
}

/// The cgroups of one LC.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LcGroups {
    /// The LC's v2 group (membership, freeze, kill), where v2 is mounted.
    pub v2: Option<PathBuf>,
    pub cpu: Knob,
    pub memory: Knob,
    pub cpuset: Option<Knob>,
    /// The v1 freezer group, used only without v2.
    pub freezer: Option<PathBuf>,
    v1_cpuset_root: Option<PathBuf>,
    v2_root: Option<PathBuf>,
    /// v2 controllers to enable for the LC's group.
    v2_enable: Vec<String>,
}

/// Limits as read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub cpu_quota_us: Option<u64>,
    pub cpu_period_us: u64,
    pub cpus: Option<String>,
    pub memory_bytes: Option<u64>,
}

impl LcGroups {
    fn dir(&self, k: &Knob) -> Option<PathBuf> {
        match k {
            Knob::V1(p) => Some(p.clone()),
            Knob::V2 => self.v2.clone(),
        }
    }

    /// Every directory of the LC, parents first where they nest.
    pub fn dirs(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self.v2.iter().cloned().collect();
        for k in [Some(&self.cpu), Some(&self.memory), self.cpuset.as_ref()]
            .into_iter()
            .flatten()
        {
            if let Knob::V1(p) = k
                && !v.contains(p)
            {
                v.push(p.clone());
            }
        }
        if let Some(f) = &self.freezer {
            v.push(f.clone());
        }
        v
    }

    /// Creates the groups and writes the limits: `share_pct` of CPU `cpu`, `memory_mib`.
    pub fn create(
        &self,
        host: &dyn Host,
        cpu: u32,
        share_pct: u32,
        memory_mib: u64,
    ) -> Result<(), CgroupError> {
        // On v2, controllers must be enabled in every ancestor's subtree_control.
        if let (Some(root), Some(v2)) = (&self.v2_root, &self.v2)
            && !self.v2_enable.is_empty()
        {
            let enable: Vec<String> = self.v2_enable.iter().map(|c| format!("+{c}")).collect();
            let mut dir = root.clone();
            let parent = v2.parent().unwrap_or(v2);
            for comp in parent
                .strip_prefix(root)
                .unwrap_or(Path::new(""))
                .components()
            {
                host.write_file(&dir.join("cgroup.subtree_control"), &enable.join(" "))
                    .map_err(io_at(&dir))?;
                dir.push(comp);
                host.create_dir_all(&dir).map_err(io_at(&dir))?;
            }
            host.write_file(&dir.join("cgroup.subtree_control"), &enable.join(" "))
                .map_err(io_at(&dir))?;
        }
        for d in self.dirs() {
            // A v1 cpuset child starts with no CPUs and no memory nodes: fill each level.
            if let (Some(Knob::V1(cs)), Some(root)) = (&self.cpuset, &self.v1_cpuset_root)
                && &d == cs
            {
                let mems = host
                    .read_file(&root.join("cpuset.mems"))
                    .map_err(io_at(root))?;
                let cpus = host
                    .read_file(&root.join("cpuset.cpus"))
                    .map_err(io_at(root))?;
                // Every level between the root and the LC's group, top down: a parent may be
                // a path (`system.slice/patchover.service/lcs`).
                let parent = d.parent().unwrap_or(&d);
                let mut level = root.clone();
                for comp in parent
                    .strip_prefix(root)
                    .unwrap_or(Path::new(""))
                    .components()
                {
                    level.push(comp);
                    host.create_dir_all(&level).map_err(io_at(&level))?;
                    for (file, val) in [("cpuset.cpus", &cpus), ("cpuset.mems", &mems)] {
                        let cur = host.read_file(&level.join(file)).unwrap_or_default();
                        if cur.trim().is_empty() {
                            host.write_file(&level.join(file), val.trim())
                                .map_err(io_at(&level))?;
                        }
                    }
                }
                host.create_dir_all(&d).map_err(io_at(&d))?;
                host.write_file(&d.join("cpuset.mems"), mems.trim())
                    .map_err(io_at(&d))?;
                continue;
            }
            host.create_dir_all(&d).map_err(io_at(&d))?;
        }
        let quota = u64::from(share_pct) * CFS_PERIOD_US / 100;
        let cpu_dir = self.dir(&self.cpu).expect("cpu group");
        match &self.cpu {
            Knob::V1(_) => {
                host.write_file(
                    &cpu_dir.join("cpu.cfs_period_us"),
                    &CFS_PERIOD_US.to_string(),
                )
                .map_err(io_at(&cpu_dir))?;
                host.write_file(&cpu_dir.join("cpu.cfs_quota_us"), &quota.to_string())
                    .map_err(io_at(&cpu_dir))?;
            }
            Knob::V2 => host
                .write_file(
                    &cpu_dir.join("cpu.max"),
                    &format!("{quota} {CFS_PERIOD_US}"),
                )
                .map_err(io_at(&cpu_dir))?,
        }
        if let Some(k) = &self.cpuset {
            let d = self.dir(k).expect("cpuset group");
            host.write_file(&d.join("cpuset.cpus"), &cpu.to_string())
                .map_err(io_at(&d))?;
        }
        let bytes = memory_mib * 1024 * 1024;
        let mem_dir = self.dir(&self.memory).expect("memory group");
        let file = match &self.memory {
            Knob::V1(_) => "memory.limit_in_bytes",
            Knob::V2 => "memory.max",
        };
        host.write_file(&mem_dir.join(file), &bytes.to_string())
            .map_err(io_at(&mem_dir))?;
        Ok(())
    }

    /// The `cgroup.procs` files a process must be written to, to be in the LC.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs()
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// PIDs in the LC (host view).
    pub fn pids(&self, host: &dyn Host) -> Vec<i32> {
        let Some(d) = self.dirs().into_iter().next() else {
            return Vec::new();
        };
        host.read_file(&d.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Kills every process of the LC (`cgroup.kill` where there is one).
    pub fn kill_all(&self, host: &dyn Host) -> Result<(), CgroupError> {
        if let Some(v2) = &self.v2 {
            let kill = v2.join("cgroup.kill");
            if host.exists(&kill) {
                return host.write_file(&kill, "1").map_err(io_at(v2));
            }
        }
        // Thaw first: a frozen v1 task does not die until thawed.
        let _ = self.set_frozen(host, false);
        for pid in self.pids(host) {
            host.signal(pid, nix::sys::signal::Signal::SIGKILL)
                .map_err(io_at(Path::new("/proc")))?;
        }
        Ok(())
    }

    pub fn set_frozen(&self, host: &dyn Host, frozen: bool) -> Result<(), CgroupError> {
        if let Some(v2) = &self.v2 {
            return host
                .write_file(&v2.join("cgroup.freeze"), if frozen { "1" } else { "0" })
                .map_err(io_at(v2));
        }
        let f = self.freezer.as_ref().expect("v1 freezer without v2");
        host.write_file(
            &f.join("freezer.state"),
            if frozen { "FROZEN" } else { "THAWED" },
        )
        .map_err(io_at(f))
    }

    /// The file and value that thaw the group.
    pub fn thaw_file(&self) -> (PathBuf, &'static str) {
        match &self.v2 {
            Some(v2) => (v2.join("cgroup.freeze"), "0"),
            None => (
                self.freezer
                    .as_ref()
                    .expect("v1 freezer without v2")
                    .join("freezer.state"),
                "THAWED",
            ),
        }
    }

    /// Whether the kernel reports the group frozen.
    pub fn is_frozen(&self, host: &dyn Host) -> bool {
        if let Some(v2) = &self.v2 {
            return host
                .read_file(&v2.join("cgroup.events"))
                .is_ok_and(|s| s.lines().any(|l| l.trim() == "frozen 1"));
        }
        self.freezer.as_ref().is_some_and(|f| {
            host.read_file(&f.join("freezer.state"))
                .is_ok_and(|s| s.trim() == "FROZEN")
        })
    }

    pub fn read_limits(&self, host: &dyn Host) -> Limits {
        let read = |k: &Knob, file: &str| {
            self.dir(k)
                .and_then(|d| host.read_file(&d.join(file)).ok())
                .map(|s| s.trim().to_owned())
        };
        let (quota, period) = match &self.cpu {
            Knob::V1(_) => (
                read(&self.cpu, "cpu.cfs_quota_us").and_then(|s| s.parse::<i64>().ok()),
                read(&self.cpu, "cpu.cfs_period_us").and_then(|s| s.parse().ok()),
            ),
            Knob::V2 => {
                let s = read(&self.cpu, "cpu.max").unwrap_or_default();
                let mut it = s.split_whitespace();
                (
                    it.next().and_then(|q| q.parse::<i64>().ok()),
                    it.next().and_then(|p| p.parse().ok()),
                )
            }
        };
        let memory = match &self.memory {
            Knob::V1(_) => read(&self.memory, "memory.limit_in_bytes"),
            Knob::V2 => read(&self.memory, "memory.max"),
        }
        .and_then(|s| s.parse().ok());
        Limits {
            cpu_quota_us: quota.and_then(|q| u64::try_from(q).ok()),
            cpu_period_us: period.unwrap_or(CFS_PERIOD_US),
            cpus: self.cpuset.as_ref().and_then(|k| read(k, "cpuset.cpus")),
            memory_bytes: memory,
        }
    }

    /// Removes the groups (they must be empty), and the shared parent where it is empty now.
    pub fn remove(&self, host: &dyn Host) -> Result<(), CgroupError> {
        for d in self.dirs().iter().rev() {
            if host.exists(d) {
                host.remove_dir(d).map_err(io_at(d))?;
            }
            if let Some(parent) = d.parent() {
                // Other LCs may still use the parent: then this fails, which is fine.
                let _ = host.remove_dir(parent);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
35 25 0:30 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
36 35 0:31 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
37 35 0:32 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
38 35 0:33 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
39 35 0:34 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 35 0:35 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
44 35 0:39 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    const V2: &str = "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";

    #[test]
    fn hybrid_uses_v1_limits_and_v2_membership() {
        let l = Layout::parse_mountinfo(HYBRID);
        assert_eq!(l.v2.as_deref(), Some(Path::new("/sys/fs/cgroup/unified")));
        let g = l.groups("patchover", "lc1").unwrap();
        assert_eq!(g.cpu, Knob::V1("/sys/fs/cgroup/cpu/patchover/lc1".into()));
        assert_eq!(
            g.memory,
            Knob::V1("/sys/fs/cgroup/memory/patchover/lc1".into())
        );
        assert_eq!(
            g.v2.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified/patchover/lc1"))
        );
        assert!(g.freezer.is_none(), "v2 freeze is preferred");
        assert_eq!(g.dirs().len(), 4);
    }

    #[test]
    fn pure_v2_uses_v2_files() {
        let mut l = Layout::parse_mountinfo(V2);
        assert!(l.groups("p", "x").is_err(), "no controllers known yet");
        l.v2_controllers = vec!["cpu".into(), "memory".into()];
        let g = l.groups("p", "x").unwrap();
        assert_eq!(g.cpu, Knob::V2);
        assert_eq!(g.dirs(), vec![PathBuf::from("/sys/fs/cgroup/p/x")]);
        assert_eq!(g.v2_enable, vec!["cpu".to_owned(), "memory".to_owned()]);
    }

    #[test]
    fn pure_v1_uses_the_freezer() {
        let text: String = HYBRID
            .lines()
            .filter(|l| !l.contains("cgroup2"))
            .map(|l| format!("{l}\n"))
            .collect();
        let g = Layout::parse_mountinfo(&text).groups("p", "x").unwrap();
        assert_eq!(
            g.freezer.as_deref(),
            Some(Path::new("/sys/fs/cgroup/freezer/p/x"))
        );
        assert!(g.v2.is_none());
    }
}
