//! The harness for integration tests: real LCs on a bridge of the test's own, a client network
//! namespace, and the real `patchover` binary. Every name carries a unique suffix so tests run
//! in parallel, and every resource is removed on drop, also when the test fails.

#![allow(dead_code)]

pub mod cycle;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_patchover");

/// Wall-clock milliseconds since the epoch: failures print it so they can be lined up with what
/// patchover did at that moment.
pub fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// A suffix unique to this test process and call.
/// A `runs show --json` answer's journal as `step:state` lines, in order.
pub fn step_lines(run: &serde_json::Value) -> Vec<String> {
    run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{}:{}",
                s["step"].as_str().unwrap(),
                s["state"].as_str().unwrap()
            )
        })
        .collect()
}

pub fn unique() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{:05x}",
        (std::process::id() ^ t.rotate_left(7) ^ (n << 16)) & 0xfffff
    )
}

/// The static guest binaries, built once per test run (cargo skips the work when fresh).
pub fn guest_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("PATCHOVER_GUEST_DIR") {
            return PathBuf::from(d);
        }
        let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let target = ws.join("target/guest");
        let status = Command::new(env!("CARGO"))
            .current_dir(&ws)
            .env("CARGO_TARGET_DIR", &target)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .args([
                "build",
                "--release",
                "--target",
                "x86_64-unknown-linux-gnu",
                "-p",
                "patchover-agent",
                "-p",
                "patchover-demo",
            ])
            .status()
            .expect("run cargo to build the guest binaries");
        assert!(
            status.success(),
            "building the static guest binaries failed"
        );
        target.join("x86_64-unknown-linux-gnu/release")
    })
    .clone()
}

/// Runs the patchover binary.
pub fn po(config: &Path, args: &[&str]) -> Output {
    po_env(config, args, &[])
}

/// Runs the patchover binary with extra environment variables.
pub fn po_env(config: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .env("PATCHOVER_CONFIG", config)
        .env("PATCHOVER_GUEST_DIR", guest_dir())
        .envs(env.iter().copied())
        .args(args)
        .output()
        .expect("run patchover")
}

/// Runs patchover and insists it succeeded; returns stdout.
pub fn po_ok(config: &Path, args: &[&str]) -> String {
    let out = po(config, args);
    assert!(
        out.status.success(),
        "patchover {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn po_json(config: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&po_ok(config, &a)).expect("JSON output")
}

/// An LC of the test.
pub struct LcDef {
    pub id: String,
    pub cpu: u32,
    pub share: u32,
    pub memory_mib: u64,
    pub address: String,
    pub sys: PathBuf,
    pub app: PathBuf,
}

/// A bridge, its LCs' disks and a config, all of this test's own.
pub struct Topo {
    pub dir: tempfile::TempDir,
    /// This test's /24: 10.77.<net>.0, held by no other test or interface ([`reserve_net`]).
    pub net: u8,
    pub suffix: String,
    pub bridge: String,
    pub cgroup_parent: String,
    pub config: PathBuf,
    pub lcs: Vec<LcDef>,
    /// `path` mode layout: every LC's NIC has the same MAC and the service address.
    pub shared_identity: bool,
    /// QEMU LCs booting the kernel of this image directory (`image build-demo --qemu`);
    /// their disks are `lc<i>-sys.img` and `lc<i>-app.img`.
    pub qemu: Option<PathBuf>,
    /// Clients are routed through the host (`seamless` mode): every LC's NIC gets the host's
    /// bridge address as its gateway, so replies to [`Client::routed`] go back through the host.
    pub routed: bool,
    /// `ns` LCs whose application disk is an ext4 image (`lc<i>-app.img`), served by the LC's
    /// block server and copied by its dirty bitmap.
    pub app_image: bool,
    /// Holds `net` for this test until it ends.
    _net_lock: fs::File,
}

/// Where tests lock the /24s they use (one file per net; see [`reserve_net`]).
const NET_LOCKS: &str = "/run/patchover-test-nets";

/// A /24 of 10.77 for a test, from `start` on: one no other running test holds (a lock on
/// `NET_LOCKS/<n>`, which the kernel lets go when its holder ends, even killed) and no
/// interface of this host has (a bridge a killed test left; the demo's 10.77.250, never
/// given out). Two topologies on one /24 share the host's route to it (the one added first
/// wins, so the other's checks from the host go to the wrong bridge: issue 19's timed-out
/// switch check) and the switcher's nftables tables, named by the service address.
fn reserve_net(start: u32) -> (u8, fs::File) {
    fs::create_dir_all(NET_LOCKS).unwrap();
    let used = host_nets();
    for i in 0..249 {
        let net = ((start + i) % 249 + 1) as u8;
        if used.contains(&net) {
            continue;
        }
        let f = fs::File::create(Path::new(NET_LOCKS).join(net.to_string())).unwrap();
        if f.try_lock().is_ok() {
            return (net, f);
        }
    }
    panic!("every 10.77.N.0/24 is held by a running test or an interface of this host");
}

/// The N of every 10.77.N.x address on this host's interfaces.
fn host_nets() -> std::collections::HashSet<u8> {
    let out = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("10.77.")?.split('.').next()?.parse().ok())
        .collect()
}

impl Topo {
    /// `lcs`: (cpu, share %, memory MiB) each; LC i gets address 10.77.<net>.(11+i), the
    /// service address is .10, the host's address on the bridge .1, clients .200 and up.
    pub fn new(lcs: &[(u32, u32, u64)]) -> Topo {
        let suffix = unique();
        let (net, net_lock) = reserve_net(u32::from_str_radix(&suffix, 16).unwrap());
        let dir = tempfile::Builder::new()
            .prefix("po-test-")
            .tempdir()
            .unwrap();
        let defs: Vec<LcDef> = lcs
            .iter()
            .enumerate()
            .map(|(i, &(cpu, share, memory_mib))| LcDef {
                id: format!("{}{suffix}", (b'a' + i as u8) as char),
                cpu,
                share,
                memory_mib,
                address: format!("10.77.{net}.{}", 11 + i),
                sys: dir.path().join(format!("lc{i}-sys")),
                app: dir.path().join(format!("lc{i}-app")),
            })
            .collect();
        let t = Topo {
            net,
            bridge: format!("pob{suffix}"),
            cgroup_parent: format!("po-test-{suffix}"),
            config: dir.path().join("patchover.toml"),
            suffix,
            lcs: defs,
            dir,
            shared_identity: false,
            qemu: None,
            routed: false,
            app_image: false,
            _net_lock: net_lock,
        };
        t.write_config("");
        t
    }

    /// The service address (without prefix).
    pub fn service(&self) -> String {
        format!("10.77.{}.10", self.net)
    }

    /// A client address on the test's network.
    pub fn client_addr(&self, n: u8) -> String {
        format!("10.77.{}.{}/24", self.net, 200 + n)
    }

    pub fn write_config(&self, extra: &str) {
        self.write_config_with(&with_demo_service(extra));
    }

    /// The config with `extra` as it is: a `[service]` there is the whole service (no demo
    /// keys are added).
    pub fn write_config_with(&self, extra: &str) {
        let mut text = format!(
            "state_dir = \"{d}/state\"\nrun_dir = \"{d}/run\"\ncgroup_parent = \"{cg}\"\n\n[network]\nbridge = \"{br}\"\nservice_address = \"{svc}/24\"\nbridge_address = \"10.77.{n}.1/24\"\n",
            d = self.dir.path().display(),
            cg = self.cgroup_parent,
            br = self.bridge,
            svc = self.service(),
            n = self.net,
        );
        for l in &self.lcs {
            let nic = if self.shared_identity {
                format!(
                    "{{ name = \"eth0\", address = \"{}/24\", mac = \"02:50:4f:00:{:02x}:0a\" }}",
                    self.service(),
                    self.net
                )
            } else if self.routed {
                format!(
                    "{{ name = \"eth0\", address = \"{}/24\", gateway = \"10.77.{}.1\" }}",
                    l.address, self.net
                )
            } else {
                format!("{{ name = \"eth0\", address = \"{}/24\" }}", l.address)
            };
            let (sys, app) = self.disks(l);
            if let Some(img) = &self.qemu {
                text.push_str(&format!(
                    "\n[[lc]]\nbackend = \"qemu\"\nkernel = \"{k}\"\ninitrd = \"{i}\"",
                    k = img.join("vmlinuz").display(),
                    i = img.join("initrd.img").display(),
                ));
            } else {
                text.push_str("\n[[lc]]");
            }
            text.push_str(&format!(
                "\nid = \"{}\"\ncpu = {}\ncpu_share = {}\nmemory_mib = {}\nsystem_disk = {{ path = \"{}\" }}\napp_disk = {{ path = \"{}\", mount = \"/data\" }}\nnic = [{nic}]\n",
                l.id,
                l.cpu,
                l.share,
                l.memory_mib,
                sys.display(),
                app.display(),
            ));
        }
        text.push_str(extra);
        fs::write(&self.config, text).unwrap();
    }

    /// LC `l`'s system and application disks: directories, or images for QEMU LCs.
    pub fn disks(&self, l: &LcDef) -> (PathBuf, PathBuf) {
        if self.qemu.is_some() {
            (l.sys.with_extension("img"), l.app.with_extension("img"))
        } else if self.app_image {
            (l.sys.clone(), l.app.with_extension("img"))
        } else {
            (l.sys.clone(), l.app.clone())
        }
    }

    /// Makes this a topology of QEMU LCs: builds the QEMU demo image (kernel, initramfs,
    /// disks) once, in `<dir>/qemu-image`, and rewrites the config.
    pub fn use_qemu(&mut self, extra: &str) {
        let img = self.dir.path().join("qemu-image");
        po_ok(
            &self.config,
            &["image", "build-demo", "--qemu", img.to_str().unwrap()],
        );
        self.qemu = Some(img);
        self.write_config(extra);
    }

    /// Builds the demo image for LC `i`.
    pub fn build_image(&self, i: usize, version: &str) {
        let l = &self.lcs[i];
        if self.qemu.is_some() {
            // The QEMU image with this version, copied to the LC's own disks.
            let v = self.dir.path().join(format!("qemu-image-{version}"));
            if !v.exists() {
                po_ok(
                    &self.config,
                    &[
                        "image",
                        "build-demo",
                        "--qemu",
                        v.to_str().unwrap(),
                        "--version",
                        version,
                    ],
                );
            }
            let (sys, app) = self.disks(l);
            for (from, to) in [("system.img", &sys), ("app.img", &app)] {
                let st = Command::new("cp")
                    .args(["--sparse=always"])
                    .arg(v.join(from))
                    .arg(to)
                    .status()
                    .unwrap();
                assert!(st.success());
            }
            return;
        }
        po_ok(
            &self.config,
            &[
                "image",
                "build-demo",
                l.sys.to_str().unwrap(),
                "--app-dir",
                l.app.to_str().unwrap(),
                "--version",
                version,
            ],
        );
        if self.app_image {
            // The application directory as an ext4 image of 64 MiB.
            let (_, img) = self.disks(l);
            let st = Command::new("mkfs.ext4")
                .args(["-q", "-F", "-d"])
                .arg(&l.app)
                .arg(&img)
                .arg("64M")
                .status()
                .unwrap();
            assert!(st.success(), "mkfs.ext4 -d {}", l.app.display());
        }
    }

    pub fn po(&self, args: &[&str]) -> Output {
        po(&self.config, args)
    }
    /// Makes a bundle of directory `dir` (manifest and payload), signs it with `key`, imports
    /// and marks it; returns the bundle file.
    pub fn sign_and_import(&self, dir: &Path, key: &Path, name: &str) -> PathBuf {
        let file = self.dir.path().join(format!("{name}.po"));
        let (dir, file_s, key) = (
            dir.to_str().unwrap(),
            file.to_str().unwrap(),
            key.to_str().unwrap(),
        );
        self.po_ok(&["bundle", "create", dir, "-o", file_s]);
        self.po_ok(&["bundle", "sign", file_s, "--key", key]);
        self.po_ok(&["patches", "import", file_s, "--mark"]);
        file
    }

    pub fn po_ok(&self, args: &[&str]) -> String {
        po_ok(&self.config, args)
    }
    pub fn po_json(&self, args: &[&str]) -> serde_json::Value {
        po_json(&self.config, args)
    }

    /// Waits (at most 60 s, running `runs recover`: a killed run's guard normally did it) until
    /// the newest run has ended; its outcome. `moment` names the kill in the failure message.
    pub fn recovered_outcome(&self, moment: &str) -> String {
        let t = std::time::Instant::now();
        loop {
            let _ = self.po(&["runs", "recover"]);
            let runs = self.po_json(&["runs", "list"]);
            let last = runs.as_array().unwrap().last().cloned().unwrap();
            if !last["ended_ms"].is_null() {
                return last["outcome"].as_str().unwrap_or("?").to_owned();
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{moment}: not recovered"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The LC's v2 cgroup directory (this host has the unified hierarchy).
    pub fn v2_group(&self, id: &str) -> PathBuf {
        PathBuf::from(format!(
            "/sys/fs/cgroup/unified/{}/{id}",
            self.cgroup_parent
        ))
    }

    /// Host PIDs of every process of the LC.
    pub fn pids(&self, id: &str) -> Vec<i32> {
        fs::read_to_string(self.v2_group(id).join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect()
    }

    /// SIGKILLs the demo service's process in LC `id` (found among the LC's cgroup's
    /// processes by its `--listen`); returns when, in unix ms.
    pub fn kill_the_service_of(&self, id: &str) -> u128 {
        let pid = self
            .pids(id)
            .into_iter()
            .find(|p| {
                fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|cmd| String::from_utf8_lossy(&cmd).contains("--listen"))
            })
            .unwrap_or_else(|| panic!("no demo service in {id}"));
        let at = unix_ms();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        at
    }

    /// Asserts that LC `id` left nothing on the host.
    pub fn assert_nothing_left(&self, id: &str) {
        for ctl in ["unified", "cpu", "memory", "cpuset", "freezer"] {
            let p = PathBuf::from(format!("/sys/fs/cgroup/{ctl}/{}/{id}", self.cgroup_parent));
            assert!(!p.exists(), "cgroup {} left behind", p.display());
        }
        assert!(
            !Path::new(&format!("/sys/class/net/po{id}n0")).exists(),
            "veth po{id}n0 left behind"
        );
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let d = self.dir.path().to_str().unwrap();
        assert!(!mounts.contains(d), "a mount under {d} is left:\n{mounts}");
        let run = self.dir.path().join("run/lc").join(id);
        assert!(!run.exists(), "run dir {} left behind", run.display());
        let qsd = self.dir.path().join("run/blockserver").join(id);
        assert!(!qsd.exists(), "block server {} left behind", qsd.display());
        // No process of the LC anywhere: none has a root in its disk.
        for e in fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(cmd) = fs::read_to_string(e.path().join("cmdline"))
                && cmd.contains("patchover-demo")
                && let Ok(root) = fs::read_link(e.path().join("root"))
            {
                assert!(
                    !root.starts_with(self.dir.path()),
                    "process {:?} of the LC left",
                    e.path()
                );
            }
        }
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        // Best effort: stop every LC, remove the bridge and cgroup parents.
        for l in &self.lcs {
            let _ = po(&self.config, &["lc", "stop", &l.id]);
            for ctl in ["unified", "cpu", "memory", "cpuset", "freezer"] {
                let g = PathBuf::from(format!(
                    "/sys/fs/cgroup/{ctl}/{}/{}",
                    self.cgroup_parent, l.id
                ));
                if g.exists() {
                    if let Ok(p) = fs::read_to_string(g.join("cgroup.procs")) {
                        for pid in p.lines() {
                            let _ = Command::new("kill").args(["-9", pid]).status();
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                    let _ = fs::remove_dir(&g);
                }
            }
            let _ = Command::new("ip")
                .args(["link", "del", &format!("po{}n0", l.id)])
                .output();
            // A block server left by a failed test (its FUSE exports go with it).
            let qsd = self.dir.path().join("run/blockserver").join(&l.id);
            if let Ok(pid) = fs::read_to_string(qsd.join("qsd.pid")) {
                let _ = Command::new("kill").args(["-9", pid.trim()]).status();
                std::thread::sleep(Duration::from_millis(100));
                if let Ok(entries) = fs::read_dir(&qsd) {
                    for e in entries.flatten() {
                        let _ = Command::new("umount").arg("-l").arg(e.path()).output();
                    }
                }
            }
        }
        for ctl in ["unified", "cpu", "memory", "cpuset", "freezer"] {
            let _ = fs::remove_dir(format!("/sys/fs/cgroup/{ctl}/{}", self.cgroup_parent));
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
        // The switcher keeps its MAC-fix rule after a switch; this test's address goes now.
        if let Ok(ip) = self.service().parse() {
            let _ = patchover_net::teardown(None, ip);
        }
    }
}

/// Runs `ip ARGS`; a failure fails the test.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A client host: its own network namespace with a veth on the test's bridge.
pub struct Client {
    pub name: String,
    ns: fs::File,
}

impl Client {
    pub fn new(bridge: &str, address: &str) -> Client {
        Client::make(address, |ip, host_end| {
            ip(&["link", "set", host_end, "master", bridge, "up"]);
        })
    }

    /// A client behind the host as a router (the `seamless` layout): its own /24
    /// (10.78.<net>.0), a veth to the host that is not on the bridge, and forwarding switched on
    /// for that veth and the test's bridge only (per device: the host's global setting stays).
    pub fn routed(t: &Topo) -> Client {
        let c = Client::make(&format!("10.78.{}.2/24", t.net), |ip, host_end| {
            ip(&[
                "addr",
                "add",
                &format!("10.78.{}.1/24", t.net),
                "dev",
                host_end,
            ]);
            ip(&["link", "set", host_end, "up"]);
            for dev in [host_end, t.bridge.as_str()] {
                fs::write(format!("/proc/sys/net/ipv4/conf/{dev}/forwarding"), "1")
                    .unwrap_or_else(|e| panic!("forwarding on {dev}: {e}"));
            }
        });
        let via = format!("10.78.{}.1", t.net);
        ip(&["-n", &c.name, "route", "add", "default", "via", &via]);
        c
    }

    /// A namespace `poc<unique>` with `eth0` at `address`, whose veth peer `<name>h` on the
    /// host `host_side` connects.
    fn make(address: &str, host_side: impl FnOnce(&dyn Fn(&[&str]), &str)) -> Client {
        let name = format!("poc{}", unique());
        let host_end = format!("{name}h");
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &name,
        ]);
        host_side(&ip, &host_end);
        ip(&["-n", &name, "addr", "add", address, "dev", "eth0"]);
        ip(&["-n", &name, "link", "set", "eth0", "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        let ns = fs::File::open(format!("/run/netns/{name}")).unwrap();
        Client { name, ns }
    }

    /// Runs `f` on a thread inside the client's network namespace (a thread's network
    /// namespace is its own, so the test process stays where it is).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn(f).join().unwrap()
    }

    /// Starts `f` on a thread inside the client's network namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let ns = self.ns.try_clone().unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &format!("{}h", self.name)])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// One HTTP/1.1 request on a fresh connection; (status, body).
pub fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    // Long enough for two SYN retransmissions (1 s + 2 s) and then some: callers judge the
    // time a request took against their own deadline.
    http_within(addr, method, path, body, Duration::from_secs(7))
}

/// [`http`] with `timeout` for the connect and each read.
pub fn http_within(
    addr: &str,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<(u16, Vec<u8>)> {
    let addr: SocketAddr = format!("{addr}:80").parse().unwrap();
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response {text:?}")))?;
    let body_at = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(resp.len(), |p| p + 4);
    Ok((status, resp[body_at..].to_vec()))
}

/// Retries `http` until the service answers (it starts in the background at boot).
pub fn http_ready(addr: &str, path: &str) -> (u16, Vec<u8>) {
    let start = std::time::Instant::now();
    loop {
        match http(addr, "GET", path, b"") {
            Ok(r) => return r,
            Err(e) if start.elapsed() > Duration::from_secs(15) => panic!("{addr}{path}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The `[service]` of the demo service these tests' LCs run (what `patchover demo` writes):
/// patchover itself has no service defaults.
pub const DEMO_SERVICE: &str = r#"[service]
port = 80
version_path = "/version"
health = { kind = "http", path = "/health", body = "\"status\":\"ok\"" }
restart = ["/etc/init.d/S50demo", "restart"]
drain = ["/bin/sh", "-c", "kill -USR1 $(cat /var/run/patchover-demo.pid)"]
resume = ["/bin/sh", "-c", "kill -USR2 $(cat /var/run/patchover-demo.pid)"]
park = ["/usr/bin/patchover-demo", "ctl", "park"]
forward = ["/usr/bin/patchover-demo", "ctl", "forward", "{to}"]
unpark = ["/usr/bin/patchover-demo", "ctl", "resume"]
"#;

/// `extra` with the demo's `[service]`: a `[service]` in `extra` keeps its own keys and gets
/// the demo's others.
pub fn with_demo_service(extra: &str) -> String {
    let header = "[service]\n";
    let Some(at) = extra.find(header) else {
        return format!("{extra}\n{DEMO_SERVICE}");
    };
    let end = at + header.len();
    let key = |l: &str| l.split_once('=').map(|(k, _)| k.trim().to_owned());
    let own: Vec<String> = extra[end..]
        .lines()
        .take_while(|l| !l.starts_with('['))
        .filter_map(key)
        .collect();
    let demo: String = DEMO_SERVICE
        .lines()
        .skip(1)
        .filter(|l| key(l).is_some_and(|k| !own.contains(&k)))
        .map(|l| format!("{l}\n"))
        .collect();
    format!("{}{demo}{}", &extra[..end], &extra[end..])
}

/// Each `(args, says)`: `patchover ARGS --dir DIR` exits 2 with `says` in its error, and
/// makes nothing (DIR is not created).
pub fn refused_before_anything_is_made(cases: &[(&[&str], &str)], d: &Path) {
    for (args, says) in cases {
        let out = Command::new(BIN)
            .args(*args)
            .arg("--dir")
            .arg(d)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!d.exists(), "{args:?} made {}", d.display());
    }
}

/// What `promtool check metrics` (Debian's prometheus package; scripts/install-deps installs
/// it) says of `text`: empty when it is clean.
pub fn promtool_check(text: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/install-deps installs it)");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.success() {
        true => said.trim().to_owned(),
        false => format!("exit {}: {said}", out.status),
    }
}

/// A page as headless Chromium (Debian's chromium; scripts/install-deps installs it) renders
/// it: the screenshot's distinct colours (a blank page has one) and the rendered DOM.
pub struct Rendered {
    pub colours: usize,
    pub dom: String,
}

/// Opens `page` in headless Chromium at 1400x1000: a screenshot (kept beside the page as
/// `NAME.png`, decoded here) and `--dump-dom`.
pub fn chromium(page: &Path) -> Rendered {
    let shot = page.with_extension("png");
    let profile = page.with_extension("chromium-profile");
    let url = format!("file://{}", page.canonicalize().unwrap().display());
    let run = |args: &[&str]| {
        let out = Command::new("chromium")
            .args(["--headless", "--no-sandbox", "--disable-gpu"])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(args)
            .arg(&url)
            .output()
            .expect("chromium (Debian's chromium package; scripts/install-deps installs it)");
        assert!(out.status.success(), "chromium {args:?}: {out:?}");
        out.stdout
    };
    run(&[
        &format!("--screenshot={}", shot.display()),
        "--window-size=1400,1000",
    ]);
    let dom = String::from_utf8(run(&["--dump-dom"])).unwrap();
    let _ = std::fs::remove_dir_all(&profile);
    Rendered {
        colours: png_colours(&shot),
        dom,
    }
}

/// The distinct colours of a PNG.
fn png_colours(path: &Path) -> usize {
    let file = std::fs::File::open(path)
        .unwrap_or_else(|e| panic!("no screenshot at {}: {e}", path.display()));
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let px = info.color_type.samples() * (info.bit_depth as usize).div_ceil(8);
    let colours: std::collections::HashSet<&[u8]> = buf[..info.buffer_size()].chunks(px).collect();
    colours.len()
}
