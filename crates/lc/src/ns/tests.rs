//! The backend's logic against a recording fake of the host: no root needed.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use nix::sys::signal::Signal;
use patchover_core::{Config, HostFacts, LcSpec, MacAddr};

use super::*;
use crate::helper::HelperCall;
use crate::host::Launch;

const MOUNTINFO: &str = "\
36 35 0:31 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
38 35 0:33 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
39 35 0:34 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
44 35 0:39 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

#[derive(Default)]
struct World {
    files: BTreeMap<PathBuf, String>,
    dirs: BTreeSet<PathBuf>,
    links: BTreeSet<String>,
    /// veth end → its peer
    peers: BTreeMap<String, String>,
    /// pid → start time
    procs: BTreeMap<i32, u64>,
    calls: Vec<String>,
    fail_on: Option<&'static str>,
    release_error: Option<String>,
    /// Whether init shuts down when asked.
    graceful: bool,
    next_pid: i32,
}

/// Clones share one world, as two patchover processes share one host.
#[derive(Default, Clone)]
struct FakeHost {
    w: Rc<RefCell<World>>,
}

impl FakeHost {
    fn new() -> FakeHost {
        let f = FakeHost::default();
        {
            let mut w = f.w.borrow_mut();
            w.files
                .insert("/proc/self/mountinfo".into(), MOUNTINFO.into());
            w.files
                .insert("/sys/fs/cgroup/cpuset/cpuset.cpus".into(), "0-1\n".into());
            w.files
                .insert("/sys/fs/cgroup/cpuset/cpuset.mems".into(), "0\n".into());
            w.files.insert(
                "/sys/fs/cgroup/unified/cgroup.controllers".into(),
                String::new(),
            );
            w.files
                .insert("/proc/uptime".into(), "1000.0 10.0\n".into());
            for d in ["/srv/lc1/sys", "/srv/lc1/app", "/srv/lc2/sys"] {
                w.dirs.insert(d.into());
            }
            w.files.insert("/srv/lc1/sys/sbin/init".into(), "x".into());
            w.graceful = true;
            w.next_pid = 1000;
        }
        f
    }
    fn op(&self, name: &'static str, detail: String) -> io::Result<()> {
        let mut w = self.w.borrow_mut();
        w.calls.push(format!("{name} {detail}"));
        if w.fail_on == Some(name) {
            return Err(io::Error::other(format!("injected failure in {name}")));
        }
        Ok(())
    }
    fn calls(&self) -> Vec<String> {
        self.w.borrow().calls.clone()
    }
    fn mutations(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| !c.starts_with("read ") && !c.starts_with("exists "))
            .collect()
    }
    fn file(&self, p: &str) -> Option<String> {
        self.w.borrow().files.get(Path::new(p)).cloned()
    }
    /// Every process in the LC's v2 group.
    fn procs_file(lc: &str) -> PathBuf {
        PathBuf::from(format!(
            "/sys/fs/cgroup/unified/patchover/{lc}/cgroup.procs"
        ))
    }
    /// Ends every process listed in `procs`; as in the kernel, a dead process leaves every
    /// hierarchy's cgroup.
    fn end_all(w: &mut World, procs: &Path) {
        let Some(list) = w.files.get(procs).cloned() else {
            return;
        };
        let dead: Vec<String> = list.lines().map(str::to_owned).collect();
        for pid in dead.iter().filter_map(|l| l.parse::<i32>().ok()) {
            w.procs.remove(&pid);
        }
        for (path, content) in w.files.iter_mut() {
            if path.ends_with("cgroup.procs") {
                *content = content
                    .lines()
                    .filter(|l| !dead.iter().any(|d| d == l))
                    .map(|l| format!("{l}\n"))
                    .collect();
            }
        }
    }
}

struct FakeLaunch<'a> {
    host: &'a FakeHost,
    pid: i32,
}

impl Launch for FakeLaunch<'_> {
    fn pid(&self) -> i32 {
        self.pid
    }
    fn release(self: Box<Self>) -> Result<(), String> {
        self.host
            .op("release", self.pid.to_string())
            .map_err(|e| e.to_string())?;
        match self.host.w.borrow().release_error.clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Host for FakeHost {
    fn read_file(&self, path: &Path) -> io::Result<String> {
        let mut w = self.w.borrow_mut();
        w.calls.push(format!("read {}", path.display()));
        w.files
            .get(path)
            .cloned()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }
    fn write_file(&self, path: &Path, data: &str) -> io::Result<()> {
        self.op("write", format!("{} {data}", path.display()))?;
        let mut w = self.w.borrow_mut();
        if path.ends_with("cgroup.kill") {
            let procs = path.with_file_name("cgroup.procs");
            FakeHost::end_all(&mut w, &procs);
            return Ok(());
        }
        w.files.insert(path.to_owned(), data.to_owned());
        Ok(())
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.op("mkdir", path.display().to_string())?;
        let mut w = self.w.borrow_mut();
        for a in path.ancestors() {
            w.dirs.insert(a.to_owned());
        }
        if path.starts_with("/sys/fs/cgroup") {
            w.files.entry(path.join("cgroup.procs")).or_default();
            w.files.entry(path.join("cgroup.kill")).or_default();
        }
        Ok(())
    }
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        self.op("rmdir", path.display().to_string())?;
        let mut w = self.w.borrow_mut();
        let busy = w
            .files
            .get(&path.join("cgroup.procs"))
            .is_some_and(|s| !s.trim().is_empty());
        let has_children = w.dirs.iter().any(|d| d != path && d.starts_with(path));
        if busy || has_children || !w.dirs.contains(path) {
            return Err(io::Error::other("busy or missing"));
        }
        w.dirs.remove(path);
        w.files.retain(|f, _| !f.starts_with(path));
        Ok(())
    }
    fn remove_all(&self, path: &Path) -> io::Result<()> {
        self.op("rm -r", path.display().to_string())?;
        let mut w = self.w.borrow_mut();
        w.dirs.retain(|d| !d.starts_with(path));
        w.files.retain(|f, _| !f.starts_with(path));
        Ok(())
    }
    fn exists(&self, path: &Path) -> bool {
        let mut w = self.w.borrow_mut();
        w.calls.push(format!("exists {}", path.display()));
        w.dirs.contains(path) || w.files.contains_key(path)
    }
    fn is_executable_in(&self, root: &Path, path: &Path) -> bool {
        let p = root.join(path.strip_prefix("/").unwrap());
        self.w.borrow().files.contains_key(&p)
    }
    fn ensure_bridge(&self, name: &str) -> io::Result<bool> {
        self.op("ensure_bridge", name.to_owned())?;
        Ok(self.w.borrow_mut().links.insert(name.to_owned()))
    }
    fn link_exists(&self, name: &str) -> bool {
        self.w.borrow().links.contains(name)
    }
    fn create_tap(&self, name: &str) -> io::Result<()> {
        self.op("create_tap", name.to_owned())?;
        self.w.borrow_mut().links.insert(name.to_owned());
        Ok(())
    }
    fn create_veth(&self, host_end: &str, peer: &str, mac: MacAddr) -> io::Result<()> {
        self.op("create_veth", format!("{host_end} {peer} {mac}"))?;
        let mut w = self.w.borrow_mut();
        w.links.insert(host_end.to_owned());
        w.links.insert(peer.to_owned());
        w.peers.insert(host_end.to_owned(), peer.to_owned());
        w.peers.insert(peer.to_owned(), host_end.to_owned());
        Ok(())
    }
    fn attach_to_bridge(&self, port: &str, bridge: &str) -> io::Result<()> {
        self.op("attach_to_bridge", format!("{port} {bridge}"))
    }
    fn set_link_up(&self, link: &str) -> io::Result<()> {
        self.op("set_link_up", link.to_owned())
    }
    fn move_to_netns(&self, link: &str, pid: i32) -> io::Result<()> {
        self.op("move_to_netns", format!("{link} {pid}"))?;
        self.w.borrow_mut().links.remove(link);
        Ok(())
    }
    fn forget_flows(&self, addr: std::net::Ipv4Addr) {
        let _ = self.op("forget_flows", addr.to_string());
    }
    fn delete_link(&self, name: &str) -> io::Result<()> {
        if !self.link_exists(name) {
            return Ok(());
        }
        self.op("delete_link", name.to_owned())?;
        let mut w = self.w.borrow_mut();
        w.links.remove(name);
        // Deleting one end of a veth deletes the other, wherever it is.
        if let Some(peer) = w.peers.remove(name) {
            w.links.remove(&peer);
            w.peers.remove(&peer);
        }
        Ok(())
    }
    fn configure_nics(&self, pid: i32, nics: &[NicSetup]) -> io::Result<()> {
        let names: Vec<_> = nics
            .iter()
            .map(|n| format!("{}>{}", n.temp_name, n.name))
            .collect();
        self.op("configure_nics", format!("{pid} {}", names.join(",")))
    }
    fn spawn_launcher(&self, spec: &LaunchSpec) -> io::Result<Box<dyn Launch + '_>> {
        self.op("spawn_launcher", spec.lc.clone())?;
        let mut w = self.w.borrow_mut();
        w.next_pid += 1;
        let pid = w.next_pid;
        w.procs.insert(pid, 4242);
        for f in &spec.cgroup_procs {
            w.files.insert(f.clone(), format!("{pid}\n"));
        }
        drop(w);
        Ok(Box::new(FakeLaunch { host: self, pid }))
    }
    fn process_start_time(&self, pid: i32) -> Option<u64> {
        self.w.borrow().procs.get(&pid).copied()
    }
    fn signal(&self, pid: i32, signal: Signal) -> io::Result<()> {
        self.op("signal", format!("{pid} {signal}"))?;
        let mut w = self.w.borrow_mut();
        if w.graceful || signal == Signal::SIGKILL {
            let procs: Vec<PathBuf> = w
                .files
                .keys()
                .filter(|k| {
                    k.ends_with("cgroup.procs") && w.files[*k].lines().any(|l| l == pid.to_string())
                })
                .cloned()
                .collect();
            for p in procs {
                FakeHost::end_all(&mut w, &p);
            }
            w.procs.remove(&pid);
        }
        Ok(())
    }
    fn sleep(&self, _d: Duration) {}
    fn spawn_thaw_guard(
        &self,
        file: &Path,
        value: &str,
    ) -> io::Result<Box<dyn std::any::Any + Send>> {
        self.op("thaw_guard", format!("{} {value}", file.display()))?;
        Ok(Box::new(()))
    }
    fn loop_attach(&self, file: &Path) -> io::Result<PathBuf> {
        self.op("loop_attach", file.display().to_string())?;
        Ok(PathBuf::from("/dev/loop9"))
    }
    fn loop_detach(&self, dev: &Path) -> io::Result<()> {
        self.op("loop_detach", dev.display().to_string())
    }
    fn run_helper(&self, call: &LcHelper, _stdio: Stdio) -> io::Result<ExecOutput> {
        let args: Vec<String> = std::iter::once(call.verb().to_owned())
            .chain(call.args().iter().map(|a| a.to_string_lossy().into_owned()))
            .collect();
        self.op("internal", args.join(" "))?;
        Ok(ExecOutput {
            status: Some(0),
            stdout: b"out".to_vec(),
            stderr: Vec::new(),
        })
    }
}

fn config() -> Config {
    Config::parse(
        Path::new("t.toml"),
        r#"
run_dir = "/run/po"
cgroup_parent = "patchover"
state_dir = "/var/lib/po"
[[lc]]
id = "lc1"
cpu = 1
cpu_share = 50
memory_mib = 64
system_disk = { path = "/srv/lc1/sys" }
app_disk = { path = "/srv/lc1/app", mount = "/data" }
nic = [{ name = "eth0", address = "10.77.0.10/24" }]
[[lc]]
id = "lc2"
cpu_share = 20
memory_mib = 64
system_disk = { path = "/srv/lc2/sys" }
"#,
        &HostFacts {
            cpus: 2,
            memory_mib: 1024,
        },
    )
    .unwrap()
}

fn backend(host: &FakeHost) -> NsBackend<FakeHost> {
    let c = config();
    let mut cfg = NsConfig::from_config(&c);
    cfg.stop_timeout = Duration::from_millis(30);
    NsBackend::new(host.clone(), cfg)
}

fn lc(id: &str) -> LcSpec {
    config().lc(id).unwrap().clone()
}

fn position(calls: &[String], prefix: &str) -> usize {
    calls
        .iter()
        .position(|c| c.starts_with(prefix))
        .unwrap_or_else(|| panic!("no call {prefix:?} in {calls:#?}"))
}

#[test]
fn boot_sets_limits_plugs_nics_before_release_and_records_state() {
    let host = FakeHost::new();
    let b = backend(&host);
    let st = b.boot(&lc("lc1")).unwrap();
    assert_eq!(st.state, LcState::Running);
    assert_eq!(st.pid, Some(1001));
    assert_eq!(st.host_ports, vec!["polc1n0".to_owned()]);
    assert_eq!(
        host.file("/sys/fs/cgroup/cpu/patchover/lc1/cpu.cfs_quota_us")
            .as_deref(),
        Some("50000")
    );
    assert_eq!(
        host.file("/sys/fs/cgroup/memory/patchover/lc1/memory.limit_in_bytes")
            .as_deref(),
        Some("67108864")
    );
    assert_eq!(
        host.file("/sys/fs/cgroup/cpuset/patchover/lc1/cpuset.cpus")
            .as_deref(),
        Some("1")
    );
    // The parent cpuset got CPUs and memory nodes before the child was made.
    assert_eq!(
        host.file("/sys/fs/cgroup/cpuset/patchover/cpuset.mems")
            .as_deref(),
        Some("0")
    );
    let limits = st.limits.unwrap();
    assert_eq!(limits.cpu_quota_us, Some(50_000));
    assert_eq!(limits.memory_bytes, Some(64 << 20));

    let calls = host.calls();
    let order = [
        "ensure_bridge pobr0",
        "write /sys/fs/cgroup/cpu/patchover/lc1/cpu.cfs_quota_us",
        "create_veth polc1n0 pplc1n0",
        "attach_to_bridge polc1n0 pobr0",
        "spawn_launcher lc1",
        "move_to_netns pplc1n0 1001",
        "configure_nics 1001 pplc1n0>eth0",
        "release 1001",
        "write /run/po/lc/lc1/state.json",
    ];
    let pos: Vec<usize> = order.iter().map(|p| position(&calls, p)).collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "out of order: {pos:?}");
    assert!(
        host.file("/run/po/lc/lc1/state.json")
            .unwrap()
            .contains("\"pid\":1001")
    );
}

#[test]
fn booting_a_running_lc_is_refused_without_changes() {
    let host = FakeHost::new();
    let b = backend(&host);
    b.boot(&lc("lc1")).unwrap();
    let before = host.mutations().len();
    let err = b.boot(&lc("lc1")).unwrap_err();
    assert!(matches!(err, LcError::AlreadyRunning(_)), "{err}");
    assert!(err.is_bad_input());
    assert_eq!(
        host.mutations().len(),
        before,
        "a refused boot changes nothing"
    );
}

fn assert_nothing_left(host: &FakeHost) {
    let w = host.w.borrow();
    assert!(
        w.links.iter().all(|l| l == "pobr0"),
        "links left: {:?}",
        w.links
    );
    assert!(
        !w.dirs
            .iter()
            .any(|d| d.starts_with("/sys/fs/cgroup") && d.ends_with("lc1")),
        "cgroups left: {:?}",
        w.dirs
    );
    assert!(
        !w.dirs.iter().any(|d| d.starts_with("/run/po/lc/lc1")),
        "run dir left"
    );
    assert!(w.procs.is_empty(), "processes left: {:?}", w.procs);
}

#[test]
fn a_failure_half_way_undoes_every_step() {
    for step in [
        "move_to_netns",
        "configure_nics",
        "release",
        "spawn_launcher",
        "attach_to_bridge",
    ] {
        let host = FakeHost::new();
        host.w.borrow_mut().fail_on = Some(step);
        let err = backend(&host).boot(&lc("lc1")).unwrap_err();
        assert!(
            matches!(err, LcError::Host { .. } | LcError::Launch { .. }),
            "{step}: {err}"
        );
        host.w.borrow_mut().fail_on = None;
        assert_nothing_left(&host);
    }
}

#[test]
fn a_rootfs_without_init_reported_by_the_launcher_is_no_init() {
    let host = FakeHost::new();
    host.w.borrow_mut().release_error = Some("no init at /sbin/init on the system disk /x".into());
    let err = backend(&host).boot(&lc("lc1")).unwrap_err();
    assert!(matches!(err, LcError::NoInit { .. }), "{err}");
    assert_nothing_left(&host);
}

#[test]
fn bad_disks_are_refused_before_any_change() {
    let host = FakeHost::new();
    let b = backend(&host);
    // lc2's system disk has no init.
    let err = b.boot(&lc("lc2")).unwrap_err();
    assert!(matches!(err, LcError::NoInit { .. }), "{err}");
    assert!(
        err.to_string().contains("has no init at /sbin/init"),
        "{err}"
    );

    host.w.borrow_mut().dirs.remove(Path::new("/srv/lc1/app"));
    let err = b.boot(&lc("lc1")).unwrap_err();
    assert!(
        matches!(
            err,
            LcError::DiskMissing {
                what: "application disk",
                ..
            }
        ),
        "{err}"
    );

    host.w.borrow_mut().dirs.insert("/srv/lc1/app".into());
    host.w.borrow_mut().files.insert(
        PathBuf::from("/srv/lc1/app").join(INCOMPLETE_MARKER),
        String::new(),
    );
    let err = b.boot(&lc("lc1")).unwrap_err();
    assert!(matches!(err, LcError::DiskIncomplete { .. }), "{err}");
    assert!(host.mutations().is_empty(), "{:?}", host.mutations());
}

#[test]
fn a_disk_held_by_a_running_lc_is_in_use() {
    let host = FakeHost::new();
    let b = backend(&host);
    b.boot(&lc("lc1")).unwrap();
    // Another config names lc1's system disk for lc2 (two configs, one host).
    let mut other = lc("lc2");
    other.system_disk.path = "/srv/lc1/sys".into();
    let err = b.boot(&other).unwrap_err();
    assert!(
        matches!(err, LcError::DiskInUse { ref other, .. } if other == "lc1"),
        "{err}"
    );
}

#[test]
fn stop_asks_init_then_cleans_up_everything() {
    let host = FakeHost::new();
    let b = backend(&host);
    b.boot(&lc("lc1")).unwrap();
    b.stop(&lc("lc1")).unwrap();
    let calls = host.calls();
    assert!(
        calls.iter().any(|c| c == "signal 1001 SIGUSR2"),
        "{calls:#?}"
    );
    assert!(
        !calls.iter().any(|c| c.contains("cgroup.kill")),
        "graceful stop needs no kill"
    );
    // The flows it answered are forgotten once nothing of it runs (`crate::flows`).
    assert!(
        position(&calls, "forget_flows 10.77.0.10") > position(&calls, "signal 1001 SIGUSR2"),
        "{calls:#?}"
    );
    assert_nothing_left(&host);
    assert_eq!(b.status(&lc("lc1")).unwrap().state, LcState::Stopped);
    let err = b.stop(&lc("lc1")).unwrap_err();
    assert!(matches!(err, LcError::NotRunning(_)), "{err}");
}

#[test]
fn stop_kills_when_init_ignores_the_request() {
    let host = FakeHost::new();
    host.w.borrow_mut().graceful = false;
    let b = backend(&host);
    b.boot(&lc("lc1")).unwrap();
    b.stop(&lc("lc1")).unwrap();
    assert!(
        host.calls()
            .iter()
            .any(|c| c.starts_with("write /sys/fs/cgroup/unified/patchover/lc1/cgroup.kill 1"))
    );
    assert_nothing_left(&host);
}

#[test]
fn a_new_backend_adopts_a_running_lc_but_not_a_reused_pid() {
    let host = FakeHost::new();
    backend(&host).boot(&lc("lc1")).unwrap();
    // patchover restarts: a new backend over the same host.
    let b2 = backend(&host);
    assert_eq!(b2.status(&lc("lc1")).unwrap().pid, Some(1001));
    // The init died and its PID was reused by an unrelated process.
    host.w.borrow_mut().procs.insert(1001, 9999);
    assert_eq!(b2.status(&lc("lc1")).unwrap().state, LcState::Stopped);
    // Booting again cleans what the dead LC left and works.
    host.w.borrow_mut().procs.remove(&1001);
    FakeHost::end_all(&mut host.w.borrow_mut(), &FakeHost::procs_file("lc1"));
    b2.boot(&lc("lc1")).unwrap();
}

#[test]
fn a_detached_nic_is_not_plugged_into_the_bridge() {
    let host = FakeHost::new();
    let b = backend(&host);
    let mut spec = lc("lc1");
    spec.nics[0].detached = true;
    b.boot(&spec).unwrap();
    let calls = host.calls();
    assert!(
        calls.iter().any(|c| c == "set_link_up polc1n0"),
        "{calls:#?}"
    );
    assert!(
        !calls.iter().any(|c| c.starts_with("attach_to_bridge")),
        "{calls:#?}"
    );
}

#[test]
fn freezing_arms_a_thaw_guard_first() {
    let host = FakeHost::new();
    let b = backend(&host);
    b.boot(&lc("lc1")).unwrap();
    host.w.borrow_mut().files.insert(
        "/sys/fs/cgroup/unified/patchover/lc1/cgroup.events".into(),
        "populated 1\nfrozen 1\n".into(),
    );
    b.set_frozen(&lc("lc1"), true).unwrap();
    let calls = host.calls();
    let guard = position(
        &calls,
        "thaw_guard /sys/fs/cgroup/unified/patchover/lc1/cgroup.freeze 0",
    );
    let freeze = position(
        &calls,
        "write /sys/fs/cgroup/unified/patchover/lc1/cgroup.freeze 1",
    );
    assert!(guard < freeze, "the guard must be armed before the freeze");
    assert_eq!(b.guards.lock().unwrap().len(), 1);
    host.w.borrow_mut().files.insert(
        "/sys/fs/cgroup/unified/patchover/lc1/cgroup.events".into(),
        "populated 1\nfrozen 0\n".into(),
    );
    b.set_frozen(&lc("lc1"), false).unwrap();
    assert!(
        b.guards.lock().unwrap().is_empty(),
        "thawing disarms the guard"
    );
}

#[test]
fn exec_enters_by_pid_and_cgroups() {
    let host = FakeHost::new();
    let b = backend(&host);
    let err = b
        .exec(&lc("lc1"), &["true".into()], Stdio::Capture)
        .unwrap_err();
    assert!(matches!(err, LcError::NotRunning(_)));
    b.boot(&lc("lc1")).unwrap();
    let out = b
        .exec(&lc("lc1"), &["cat".into(), "/x".into()], Stdio::Capture)
        .unwrap();
    assert_eq!(out.stdout, b"out");
    let call = host
        .calls()
        .into_iter()
        .find(|c| c.starts_with("internal exec"))
        .unwrap();
    assert!(call.starts_with("internal exec --pid 1001 --cgroup-procs /sys/fs/cgroup/unified/patchover/lc1/cgroup.procs"), "{call}");
    assert!(call.ends_with("-- cat /x"), "{call}");
}

/// An image server that records its calls; `serve` fails when told to; it copies the disks
/// it serves when told to (`copies`).
#[derive(Default)]
struct FakeImages {
    calls: std::sync::Mutex<Vec<String>>,
    fail_serve: bool,
    copies: bool,
}

/// A copy that has nothing to do.
struct NoCopy;

impl crate::LiveCopy for NoCopy {
    fn cut(
        self: Box<Self>,
        _: &mut dyn patchover_core::Quiesce,
    ) -> Result<crate::CutDone, crate::DiskCopyError> {
        Ok(crate::CutDone {
            bytes_replayed: 0,
            freeze_ms: None,
            detail: serde_json::Value::Null,
            writes: None,
        })
    }
}

impl ImageServer for FakeImages {
    fn serve(&self, lc: &LcId, node: &str, image: &Path) -> io::Result<PathBuf> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("serve {lc} {node} {}", image.display()));
        if self.fail_serve {
            return Err(io::Error::other("injected: no qemu-storage-daemon"));
        }
        Ok(PathBuf::from(format!(
            "/run/po/blockserver/{lc}/{node}.export"
        )))
    }
    fn stop(&self, lc: &LcId) -> io::Result<()> {
        self.calls.lock().unwrap().push(format!("stop {lc}"));
        Ok(())
    }
    fn unserve(&self, lc: &LcId, node: &str) -> io::Result<()> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("unserve {lc} {node}"));
        Ok(())
    }
    fn served(&self, _lc: &LcId) -> Vec<String> {
        Vec::new()
    }
    fn live_copy(
        &self,
        lc: &LcId,
        node: &str,
        dst: &Path,
        at: &Path,
    ) -> Option<Result<Box<dyn crate::LiveCopy>, crate::DiskCopyError>> {
        self.calls.lock().unwrap().push(format!(
            "live_copy {lc} {node} {} at {}",
            dst.display(),
            at.display()
        ));
        self.copies
            .then(|| Ok(Box::new(NoCopy) as Box<dyn crate::LiveCopy>))
    }
    fn end_copies(&self, lc: &LcId) -> Vec<String> {
        self.calls.lock().unwrap().push(format!("end_copies {lc}"));
        vec!["patchover-app".to_owned()]
    }
}

fn image_lc() -> LcSpec {
    let mut spec = lc("lc1");
    spec.app_disk.as_mut().unwrap().kind = DiskKind::Image;
    spec
}

#[test]
fn an_image_app_disk_is_served_and_mounted_through_a_loop_device_of_the_host() {
    let host = FakeHost::new();
    let images = std::sync::Arc::new(FakeImages::default());
    let b = backend(&host).with_images(images.clone());
    b.boot(&image_lc()).unwrap();
    let calls = host.calls();
    let order = [
        "loop_attach /run/po/blockserver/lc1/app.export",
        "spawn_launcher lc1",
        "release 1001",
        // Mounted by the LC: the device goes with that mount.
        "loop_detach /dev/loop9",
    ];
    let pos: Vec<usize> = order.iter().map(|p| position(&calls, p)).collect();
    assert!(
        pos.windows(2).all(|w| w[0] < w[1]),
        "out of order: {calls:#?}"
    );
    // A clean boot of a stopped LC first ends a server a crash may have left.
    assert_eq!(
        *images.calls.lock().unwrap(),
        ["stop lc1", "serve lc1 app /srv/lc1/app"]
    );
    b.stop(&image_lc()).unwrap();
    let after = images.calls.lock().unwrap().clone();
    assert_eq!(after[2..], ["stop lc1".to_owned(), "stop lc1".to_owned()]);
    assert_nothing_left(&host);
}

#[test]
fn a_failed_serve_or_loop_attach_ends_the_server_and_leaves_nothing() {
    for (fail_serve, fail_on) in [(true, None), (false, Some("loop_attach"))] {
        let host = FakeHost::new();
        host.w.borrow_mut().fail_on = fail_on;
        let images = std::sync::Arc::new(FakeImages {
            fail_serve,
            ..Default::default()
        });
        let err = backend(&host)
            .with_images(images.clone())
            .boot(&image_lc())
            .unwrap_err();
        assert!(
            err.to_string().contains("serving the application image")
                || err.to_string().contains("loop device"),
            "{err}"
        );
        host.w.borrow_mut().fail_on = None;
        assert_nothing_left(&host);
        let calls = host.calls();
        assert!(
            !calls.iter().any(|c| c.starts_with("spawn_launcher")),
            "launched anyway: {calls:#?}"
        );
        assert_eq!(
            images.calls.lock().unwrap().last().map(String::as_str),
            Some("stop lc1"),
            "the server was not ended"
        );
    }
}

/// sysvinit gets SIGINT (its ctrl-alt-del shutdown); busybox, and a root without an inittab
/// entry for it, keep the configured signal.
#[test]
fn a_sysvinit_lc_is_stopped_with_its_ctrlaltdel_signal() {
    use std::os::unix::fs::symlink;
    let t = tempfile::tempdir().unwrap();
    let disk = |p: &std::path::Path| DiskSpec {
        role: patchover_core::DiskRole::System,
        path: p.to_owned(),
        kind: DiskKind::Dir,
        mount: "/".into(),
    };
    let sysv = t.path().join("sysv");
    std::fs::create_dir_all(sysv.join("sbin")).unwrap();
    std::fs::create_dir_all(sysv.join("etc")).unwrap();
    std::fs::write(sysv.join("sbin/init"), "sysvinit").unwrap();
    std::fs::write(sysv.join("etc/inittab"), "id:2:initdefault:\n").unwrap();
    assert_eq!(sysvinit_stop_signal(&disk(&sysv)), None);
    std::fs::write(
        sysv.join("etc/inittab"),
        "id:2:initdefault:\nca:12345:ctrlaltdel:/sbin/shutdown -t1 -h now\n",
    )
    .unwrap();
    assert_eq!(sysvinit_stop_signal(&disk(&sysv)), Some(Signal::SIGINT));
    let bb = t.path().join("busybox");
    std::fs::create_dir_all(bb.join("bin")).unwrap();
    std::fs::create_dir_all(bb.join("sbin")).unwrap();
    std::fs::create_dir_all(bb.join("etc")).unwrap();
    std::fs::write(bb.join("bin/busybox"), "busybox").unwrap();
    symlink("/bin/busybox", bb.join("sbin/init")).unwrap();
    std::fs::write(bb.join("etc/inittab"), "::ctrlaltdel:/sbin/reboot\n").unwrap();
    assert_eq!(sysvinit_stop_signal(&disk(&bb)), None);
    assert_eq!(sysvinit_stop_signal(&disk(&t.path().join("absent"))), None);
}

/// The boot transaction both backends share: a boot that fails takes back what it recorded,
/// newest first (a backend's own step too); a committed one keeps everything.
#[test]
fn the_boot_transaction_takes_back_what_it_recorded_newest_first_unless_committed() {
    use crate::boot::{BootTxn, PortKind, Undo};
    let host = FakeHost::new();
    let spec = lc("lc1");
    {
        let mut txn = BootTxn::new(&host, &spec.id);
        txn.bridge("pobr0").unwrap();
        txn.ports(&spec, "pobr0", PortKind::Veth, |h, port, i, nic| {
            h.create_veth(port, &format!("pp{i}"), nic.mac)
        })
        .unwrap();
        txn.run_dir(Path::new("/run/t/lc1"), &[Path::new("/run/t/lc1/agent")])
            .unwrap();
        let h = host.clone();
        txn.push(Undo::Then(
            "a backend's own step",
            Box::new(move || {
                let _ = h.op("own-undo", String::new());
            }),
        ));
    }
    let calls = host.mutations();
    let own = position(&calls, "own-undo");
    let rm = position(&calls, "rm -r /run/t/lc1");
    let del = position(&calls, "delete_link polc1n0");
    assert!(own < rm && rm < del, "{calls:?}");
    assert!(
        !calls.iter().any(|c| c.starts_with("delete_link pobr0")),
        "the bridge stays"
    );

    let host = FakeHost::new();
    {
        let mut txn = BootTxn::new(&host, &spec.id);
        txn.run_dir(Path::new("/run/t/lc1"), &[]).unwrap();
        txn.commit();
    }
    assert!(!host.mutations().iter().any(|c| c.starts_with("rm -r")));
}

/// The `ns` backend owns its copies: a served application image is copied by its image server
/// (the LC's filesystem on it as the host sees it, for the cut's sync); a disk the server does
/// not serve falls back to the file copier; leftovers of a dead run are the server's to end.
#[test]
fn a_served_image_is_copied_by_its_server_and_leftover_copies_end_there() {
    use crate::Migratable;
    let host = FakeHost::new();
    let images = std::sync::Arc::new(FakeImages {
        copies: true,
        ..Default::default()
    });
    let b = backend(&host).with_images(images.clone());
    let spec = image_lc();
    b.boot(&spec).unwrap();
    let src = spec.app_disk.clone().unwrap();
    let mut dst = src.clone();
    dst.path = "/srv/lc2/app.img".into();
    let copy = b
        .live_copy(&spec, &src, &dst, std::sync::Arc::new(crate::NoProgress))
        .unwrap();
    assert!(!copy.catches_up(), "the fake copy keeps up by itself");
    let at = format!(
        "/proc/1001/root/{}",
        src.mount.strip_prefix("/").unwrap().display()
    );
    assert_eq!(
        images.calls.lock().unwrap().last().unwrap(),
        &format!("live_copy lc1 app /srv/lc2/app.img at {at}")
    );
    assert_eq!(b.end_leftover_copies(&spec), ["patchover-app"]);

    // Not served: the file copier is asked (and finds no such directory on this host).
    let images = std::sync::Arc::new(FakeImages::default());
    let host = FakeHost::new();
    let b = backend(&host).with_images(images.clone());
    b.boot(&spec).unwrap();
    let e = b
        .live_copy(&spec, &src, &dst, std::sync::Arc::new(crate::NoProgress))
        .err()
        .unwrap();
    assert_eq!(e.disk, "application");
    assert!(
        images
            .calls
            .lock()
            .unwrap()
            .last()
            .unwrap()
            .starts_with("live_copy")
    );
    // Without an image server there is nothing of a dead run to end.
    assert!(
        backend(&FakeHost::new())
            .end_leftover_copies(&spec)
            .is_empty()
    );
}
