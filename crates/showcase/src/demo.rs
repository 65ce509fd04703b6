//! `patchover demo`: the whole story on this host in one command. Two LCs, the demo service
//! v1.0.0 on one, a signed bundle that upgrades it to v1.0.1, a client that reads and writes
//! all along, and the patch cycle in between; then the report users care about: failed
//! requests, acknowledged writes lost, the pause, and the versions before and after.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::{Context, ShowcaseError};
use patchover_bundle::create::{create_bundle, sign_bundle};
use patchover_bundle::keys::{SigningKey, generate_keypair};
use patchover_core::BackendKind;
use patchover_lc::LcBackend;
use patchover_net::Mode;
use serde_json::json;

/// The service a demo patches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Service {
    /// The project's demo service on busybox LCs (fast; the tests' and benchmarks' world).
    #[default]
    Demo,
    /// Debian's nginx, unmodified, on Debian LCs, with its real pending updates
    /// ([`crate::nginx`]).
    Nginx,
    /// Debian's PostgreSQL 15 behind PgBouncer, under pgbench with the set check
    /// ([`crate::pgdemo`], docs/postgres.md).
    Postgres,
    // A next real service: a `Profile` in its own module beside `nginx` (on the
    // `debian_world`), a variant here, its name in `parse_service` and `run`.
}

/// `demo` or `nginx`.
pub fn parse_service(s: &str) -> Result<Service, String> {
    match s {
        "demo" => Ok(Service::Demo),
        "nginx" => Ok(Service::Nginx),
        "postgres" => Ok(Service::Postgres),
        _ => Err(format!(
            "unknown service {s:?}: use demo, nginx or postgres"
        )),
    }
}

/// What `patchover demo` does (its options).
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub service: Service,
    /// Where the demo keeps its config, disks, keys and state (wiped at the start).
    pub dir: PathBuf,
    /// The switch mode; `None`: the service's default (`readdress` for the demo service).
    pub mode: Option<Mode>,
    /// Read requests per second of the load (GET /version, new and keep-alive connections).
    pub rate: f64,
    /// Keep the LCs running after the demo (to look around with `patchover lc …`).
    pub keep: bool,
    /// How long the load runs, in seconds (the patch starts 2 s into it).
    pub load_seconds: u64,
    /// The kind of LC: `ns` (namespaces) or `qemu` (VMs; TCG where KVM does not work).
    pub backend: BackendKind,
    /// A request that takes this long counts as failed (default 2000 ms; 5000 ms on qemu,
    /// whose switch pause under TCG is 1–2 s: requests are held, not dropped).
    pub deadline_ms: Option<u64>,
    /// Real services: where the updates come from (`bundle from-apt --source`); empty: the
    /// host's apt sources for the LC's suite, `-updates` and `-security`.
    pub sources: Vec<patchover_debian::sources::Source>,
    /// Real services: bundle every pending update of the LC, not only the service's packages.
    pub all_updates: bool,
    /// Real services: patch → rollback cycles under load (each with its own clients).
    pub cycles: u32,
    /// Real services: connections of each of the two wrk runs.
    pub wrk_connections: u32,
    /// Real services: each wrk connection's pause between an answer and its next request
    /// (0: as fast as wrk can).
    pub wrk_delay_ms: u32,
    /// The demo service: write the run as one HTML page here (`patchover-report`): its steps
    /// and every read of the load around the switch.
    pub report: Option<PathBuf>,
}

/// `ns` or `qemu`.
pub fn parse_backend(s: &str) -> Result<BackendKind, String> {
    match s {
        "ns" => Ok(BackendKind::Ns),
        "qemu" => Ok(BackendKind::Qemu),
        _ => Err(format!("unknown backend {s:?}: use ns or qemu")),
    }
}

pub const BRIDGE: &str = "podemo0";
pub const NET: &str = "10.77.250";
/// The demo's names that are global on the host (a named network namespace, a cgroup), made
/// from its directory so that two demos (a test and a benchmark, say) in two directories do not
/// meet there. (The bridge and interface names are per network namespace: a second demo at the
/// same time runs in a namespace of its own, `ip netns exec NS patchover …`.)
fn instance(dir: &Path) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in dir.as_os_str().as_encoded_bytes() {
        h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    format!("{:06x}", h & 0xff_ffff)
}

/// The client's named network namespace.
fn client_ns(dir: &Path) -> String {
    format!("podemo-c-{}", instance(dir))
}

/// A demo's names and addresses on the host: its bridge and /24 (`NET.1` the host, `.10` the
/// service, `.1N` LC N, `.200` the client), and a client host (a named network namespace and
/// the host's end of its veth; in `seamless` mode routed through the host on `CLIENT_NET`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Net {
    pub bridge: String,
    /// The first three octets of the LCs' /24.
    pub net: String,
    /// The first three octets of the routed client's /24 (`seamless`).
    pub client_net: String,
    pub client_veth: String,
    pub client_ns: String,
}

impl Net {
    /// The busybox demo's names: fixed, so its README lines and the soak's census name them.
    pub fn busybox(dir: &Path) -> Net {
        Net {
            bridge: BRIDGE.to_owned(),
            net: NET.to_owned(),
            client_net: CLIENT_NET.to_owned(),
            client_veth: "podemocli".to_owned(),
            client_ns: client_ns(dir),
        }
    }

    /// The service address.
    pub fn service(&self, port: u16) -> Result<SocketAddr, ShowcaseError> {
        Ok(format!("{}.10:{port}", self.net).parse()?)
    }

    /// The `[network]` section of a demo's config.
    pub fn config_section(&self) -> String {
        format!(
            "[network]\nbridge = \"{b}\"\nbridge_address = \"{n}.1/24\"\nservice_address = \"{n}.10/24\"\n",
            b = self.bridge,
            n = self.net
        )
    }
}

/// The LCs' cgroup parent.
pub fn cgroup_parent(dir: &Path) -> String {
    format!("patchover-demo-{}", instance(dir))
}
/// The client's own network in `seamless` mode (routed through the host).
const CLIENT_NET: &str = "10.78.250";

fn sh(args: &[&str]) -> Result<(), ShowcaseError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn sha256_hex(data: &[u8]) -> String {
    patchover_bundle::Sha256::of(data).to_string()
}

/// Writes the demo's config and returns its path.
/// The demo's LCs: directories for `ns`, images and the image's kernel for `qemu`.
struct Layout {
    sys1: PathBuf,
    app1: PathBuf,
    sys2: PathBuf,
    app2: PathBuf,
    /// The `backend`, `kernel` and `initrd` lines of each LC.
    boot: String,
}

impl Layout {
    fn new(dir: &Path, backend: BackendKind) -> Layout {
        match backend {
            BackendKind::Ns => Layout {
                sys1: dir.join("lc1-sys"),
                app1: dir.join("lc1-app"),
                sys2: dir.join("lc2-sys"),
                app2: dir.join("lc2-app"),
                boot: String::new(),
            },
            BackendKind::Qemu => {
                let img = dir.join("qemu-image");
                Layout {
                    sys1: dir.join("lc1-sys.img"),
                    app1: dir.join("lc1-app.img"),
                    sys2: dir.join("lc2-sys.img"),
                    app2: dir.join("lc2-app.img"),
                    boot: format!(
                        "backend = \"qemu\"\nkernel = \"{}\"\ninitrd = \"{}\"\n",
                        img.join("vmlinuz").display(),
                        img.join("initrd.img").display()
                    ),
                }
            }
        }
    }
}

/// The NIC line of demo LC `n` (1 or 2) for a switch mode: own addresses (`readdress`), the
/// same MAC and the service address on both (`path`), or own addresses with the host as
/// gateway (`seamless`: clients are routed through the host's NAT).
pub fn nic_line(net: &Net, mode: Mode, n: u8) -> String {
    let net = &net.net;
    match mode {
        Mode::Readdress => format!("{{ name = \"eth0\", address = \"{net}.1{n}/24\" }}"),
        Mode::Path => {
            format!("{{ name = \"eth0\", address = \"{net}.10/24\", mac = \"02:50:4f:de:00:0a\" }}")
        }
        Mode::Seamless => {
            format!("{{ name = \"eth0\", address = \"{net}.1{n}/24\", gateway = \"{net}.1\" }}")
        }
    }
}

fn write_config(
    dir: &Path,
    pubkey: &Path,
    l: &Layout,
    mode: Mode,
) -> Result<PathBuf, ShowcaseError> {
    let d = dir.display();
    let net = Net::busybox(dir);
    let text = format!(
        r#"# Written by `patchover demo`.
state_dir = "{d}/state"
run_dir = "{d}/run"
cgroup_parent = "{cg}"

{network}
[bundles]
trusted_keys = ["{pk}"]

# The demo service (`patchover-demo`): how patchover checks it and the commands it runs in
# the LCs (docs/services.md). patchover itself knows no service.
[service]
port = 80
version_path = "/version"
health = {{ kind = "http", path = "/health", body = "\"status\":\"ok\"" }}
restart = ["/etc/init.d/S50demo", "restart"]
drain = ["/bin/sh", "-c", "kill -USR1 $(cat /var/run/patchover-demo.pid)"]
resume = ["/bin/sh", "-c", "kill -USR2 $(cat /var/run/patchover-demo.pid)"]
park = ["/usr/bin/patchover-demo", "ctl", "park"]
forward = ["/usr/bin/patchover-demo", "ctl", "forward", "{{to}}"]
unpark = ["/usr/bin/patchover-demo", "ctl", "resume"]

[[lc]]
id = "lc1"
{boot}cpu = 0
cpu_share = 50
memory_mib = 256
system_disk = {{ path = "{sys1}" }}
app_disk = {{ path = "{app1}", mount = "/data" }}
nic = [{nic1}]

[[lc]]
id = "lc2"
{boot}cpu = 1
cpu_share = 50
memory_mib = 256
system_disk = {{ path = "{sys2}" }}
app_disk = {{ path = "{app2}", mount = "/data" }}
nic = [{nic2}]
"#,
        cg = cgroup_parent(dir),
        network = net.config_section(),
        nic1 = nic_line(&net, mode, 1),
        nic2 = nic_line(&net, mode, 2),
        pk = pubkey.display(),
        boot = l.boot,
        sys1 = l.sys1.display(),
        app1 = l.app1.display(),
        sys2 = l.sys2.display(),
        app2 = l.app2.display(),
    );
    let path = dir.join("patchover.toml");
    fs::write(&path, text)?;
    Ok(path)
}

/// One request with a deadline on a fresh connection; the status code and the answer's body
/// (its first 200 bytes); `Err` says at which stage it failed and what it met.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    deadline: Duration,
) -> Result<(u16, String), String> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, deadline).map_err(|e| format!("connect: {e}"))?;
    let left = deadline
        .saturating_sub(start.elapsed())
        .max(Duration::from_millis(1));
    s.set_read_timeout(Some(left))
        .map_err(|e| format!("connect: {e}"))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: demo\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .map_err(|e| format!("send: {e}"))?;
    s.write_all(body).map_err(|e| format!("send: {e}"))?;
    let mut resp = Vec::new();
    if let Err(e) = s.read_to_end(&mut resp) {
        return Err(format!(
            "read (after {} bytes of the answer): {e}",
            resp.len()
        ));
    }
    let text = String::from_utf8_lossy(&resp);
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok());
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b);
    match (status, body) {
        (Some(status), Some(b)) => Ok((status, b.chars().take(200).collect())),
        _ => Err(format!(
            "malformed answer ({} bytes: {:?})",
            resp.len(),
            text.chars().take(80).collect::<String>()
        )),
    }
}

pub struct WriterResult {
    pub acked: BTreeMap<String, String>,
    /// What each failed write met, when it was sent (ms since `started`) and how long it took.
    pub failed: Vec<String>,
    /// When the writer started: the clock of the times in `failed`.
    pub started: Instant,
}

/// Writes keys as fast as the service acknowledges them, from inside the client namespace.
pub fn writer(
    netns: PathBuf,
    addr: SocketAddr,
    deadline: Duration,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<WriterResult> {
    let started = Instant::now();
    std::thread::spawn(move || {
        let mut r = WriterResult {
            acked: BTreeMap::new(),
            failed: Vec::new(),
            started,
        };
        if let Err(e) = patchover_net::netns::enter_netns(&netns) {
            r.failed
                .push(format!("cannot enter the client namespace: {e}"));
            return r;
        }
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let (k, v) = (format!("demo-{n}"), format!("value-{n}"));
            let sent = Instant::now();
            let res = request(addr, "PUT", &format!("/kv/{k}"), v.as_bytes(), deadline);
            let when = || {
                format!(
                    "PUT {k} sent at {} ms, after {} ms",
                    sent.duration_since(started).as_millis(),
                    sent.elapsed().as_millis()
                )
            };
            match res {
                Ok((201, _)) => {
                    r.acked.insert(k, v);
                }
                Ok((s, b)) => r
                    .failed
                    .push(format!("{}: HTTP {s} {:?}", when(), b.trim())),
                Err(e) => r.failed.push(format!("{}: {e}", when())),
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        r
    })
}

/// Counts the acknowledged writes the service no longer has.
pub fn lost_writes(
    netns: &Path,
    addr: SocketAddr,
    acked: &BTreeMap<String, String>,
) -> Result<u64, ShowcaseError> {
    let acked = acked.clone();
    let lost = patchover_net::netns::in_netns(Some(netns), move || {
        acked
            .iter()
            .filter(|(k, v)| {
                let get = || -> Result<Vec<u8>, String> {
                    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                        .map_err(|e| e.to_string())?;
                    s.set_read_timeout(Some(Duration::from_secs(2)))
                        .map_err(|e| e.to_string())?;
                    write!(
                        s,
                        "GET /kv/{k} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n"
                    )
                    .map_err(|e| e.to_string())?;
                    let mut resp = Vec::new();
                    s.read_to_end(&mut resp).map_err(|e| e.to_string())?;
                    let at = resp
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .ok_or("malformed")?
                        + 4;
                    Ok(resp[at..].to_vec())
                };
                get().map_or(true, |b| b != v.as_bytes())
            })
            .count() as u64
    })?;
    Ok(lost)
}

fn stop_previous(dir: &Path) {
    let cfg = dir.join("patchover.toml");
    if cfg.exists()
        && let Ok(exe) = std::env::current_exe()
    {
        for lc in ["lc1", "lc2"] {
            let _ = Command::new(&exe)
                .env("PATCHOVER_CONFIG", &cfg)
                .args(["lc", "stop", lc])
                .output();
        }
    }
    remove_net(&Net::busybox(dir));
}

/// Removes a demo's client host, bridge and the switcher's rules for its service address
/// (kept after a switch on purpose); what is not there is passed over.
pub fn remove_net(net: &Net) {
    remove_client(net);
    let _ = Command::new("ip")
        .args(["link", "del", &net.client_veth])
        .output();
    let _ = Command::new("ip")
        .args(["link", "del", &net.bridge])
        .output();
    if let Ok(ip) = format!("{}.10", net.net).parse() {
        let _ = patchover_net::teardown(None, ip);
    }
}

/// Removes the client's network namespace (its veth goes with it).
pub fn remove_client(net: &Net) {
    let _ = Command::new("ip")
        .args(["netns", "del", &net.client_ns])
        .output();
}

/// The demo's world, ready: two LCs configured, lc1 booted with the service address, a signed
/// bundle imported and marked, a client namespace on the bridge.
pub struct Prepared {
    pub config_path: PathBuf,
    pub seckey: PathBuf,
    /// The client's network namespace.
    pub netns: PathBuf,
    pub service: SocketAddr,
}

/// Builds the demo's world in `dir` (wiped first).
pub fn prepare(
    dir: &Path,
    backend: BackendKind,
    mode: Mode,
    say: &dyn Fn(&str),
) -> Result<Prepared, ShowcaseError> {
    stop_previous(dir);
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    fs::create_dir_all(dir)?;
    let keys = dir.join("keys");
    fs::create_dir_all(&keys)?;
    let (pubkey, seckey) = (keys.join("release.pub"), keys.join("release.key"));
    generate_keypair(&pubkey, &seckey, None).context("making the signing key")?;
    let layout = Layout::new(dir, backend);
    let config_path = write_config(dir, &pubkey, &layout, mode)?;

    match backend {
        BackendKind::Ns => {
            say("building the demo image (busybox, the agent, the demo service v1.0.0)");
            patchover_image::build_demo(&layout.sys1, "1.0.0", 80, true)?;
            for d in [&layout.app1, &layout.sys2, &layout.app2] {
                fs::create_dir_all(d)?;
            }
        }
        BackendKind::Qemu => {
            say(
                "building the QEMU demo image (Debian's cloud kernel, busybox, the agent, the demo service v1.0.0)",
            );
            let img = patchover_image::qemu::build_demo_qemu(
                &dir.join("qemu-image"),
                "1.0.0",
                80,
                true,
                None,
            )?;
            fs::copy(&img.system_disk, &layout.sys1)?;
            fs::copy(&img.app_disk, &layout.app1)?;
            // The standby's disks are made by the run's copies.
            for d in [&layout.sys2, &layout.app2] {
                fs::write(d, b"")?;
            }
        }
    }

    say("making and signing the bundle demo-1.0.1");
    let bdir = dir.join("bundle-src");
    fs::create_dir_all(bdir.join("payload"))?;
    fs::write(bdir.join("payload/version"), "1.0.1\n")?;
    fs::write(
        bdir.join("manifest.toml"),
        format!(
            r#"format = 1
id = "demo-1.0.1"
title = "Upgrade the demo service to 1.0.1"
category = "security"
severity = "high"
published = 2026-11-25T00:00:00Z

[[step]]
kind = "replace"
path = "/etc/demo/version"
file = "version"
old_sha256 = "{old}"

[[check]]
kind = "file_hash"
path = "/etc/demo/version"
sha256 = "{new}"
"#,
            old = sha256_hex(b"1.0.0\n"),
            new = sha256_hex(b"1.0.1\n")
        ),
    )?;
    let bundle = dir.join("demo-1.0.1.po");
    create_bundle(&bdir, &bundle).context("creating the bundle")?;
    sign_bundle(&bundle, &SigningKey::from_file(&seckey, None)?).context("signing the bundle")?;
    {
        let mut env = crate::env(&config_path)?;
        let config = env.config.clone();
        patchover_app::patches::import(&config, &mut env.store, &bundle, true)?;
    }

    say("booting lc1 and giving it the service");
    {
        let env = crate::env(&config_path)?;
        let lc1 = env.lc("lc1")?.clone();
        env.backend.boot(&lc1)?;
        env.backend.wait_agent(&lc1, Duration::from_secs(30))?;
    }
    match mode {
        // lc1's NIC has the service address itself; its port is the one on the bridge.
        Mode::Path => {}
        Mode::Readdress => {
            patchover_app::service::assign(&mut crate::env(&config_path)?, "lc1")?;
        }
        Mode::Seamless => {
            patchover_app::service::seamless_setup(&mut crate::env(&config_path)?, "lc1")?;
        }
    }

    let net = Net::busybox(dir);
    let netns = add_client(&net, mode)?;
    let service = net.service(80)?;

    Ok(Prepared {
        config_path,
        seckey,
        netns,
        service,
    })
}

/// Makes the demo's client host for `mode` (see [`Net`]); returns its network namespace.
pub fn add_client(net: &Net, mode: Mode) -> Result<PathBuf, ShowcaseError> {
    // A client host: on the bridge, or (seamless) behind the host, which routes and NATs.
    let cns = net.client_ns.as_str();
    let (veth, bridge) = (net.client_veth.as_str(), net.bridge.as_str());
    sh(&["ip", "netns", "add", cns])?;
    sh(&[
        "ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", cns,
    ])?;
    let client_addr = if mode == Mode::Seamless {
        // Forwarding for the demo's own two interfaces only; the host's setting stays.
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{}.1/24", net.client_net),
            "dev",
            veth,
        ])?;
        sh(&["ip", "link", "set", veth, "up"])?;
        for dev in [veth, bridge] {
            fs::write(format!("/proc/sys/net/ipv4/conf/{dev}/forwarding"), "1")
                .with_context(|| format!("switching on forwarding for {dev}"))?;
        }
        format!("{}.2/24", net.client_net)
    } else {
        sh(&["ip", "link", "set", veth, "master", bridge, "up"])?;
        format!("{}.200/24", net.net)
    };
    sh(&["ip", "-n", cns, "addr", "add", &client_addr, "dev", "eth0"])?;
    sh(&["ip", "-n", cns, "link", "set", "eth0", "up"])?;
    sh(&["ip", "-n", cns, "link", "set", "lo", "up"])?;
    if mode == Mode::Seamless {
        sh(&[
            "ip",
            "-n",
            cns,
            "route",
            "add",
            "default",
            "via",
            &format!("{}.1", net.client_net),
        ])?;
    }
    Ok(PathBuf::from(format!("/run/netns/{cns}")))
}

/// `--report FILE`: run `run_id`'s page from the demo's journal, with every read of the load
/// `r` (its samples, placed by its start on the wall clock) around the switch.
fn write_report(
    path: &Path,
    config_path: &Path,
    run_id: i64,
    r: &patchover_load::LoadReport,
    deadline: Duration,
) -> Result<(), ShowcaseError> {
    let env = crate::env(config_path)?;
    let detail = patchover_app::runs::show(&env.store, run_id)?;
    let started_unix_ms = r.started_unix_ms.ok_or_else(|| {
        ShowcaseError::Failed("the load did not say when it started; no report".into())
    })?;
    let load = patchover_report::Load {
        started_unix_ms,
        samples: &r.samples,
        deadline_ms: Some(deadline.as_secs_f64() * 1000.0),
    };
    let page = patchover_report::page(&detail, Some(&load)).context("the report page")?;
    patchover_report::write(path, &page).with_context(|| {
        format!(
            "writing the report to {}; check its directory exists and is writable",
            path.display()
        )
    })
}

/// Tears the demo's world down (the LCs, the client namespace).
pub fn teardown(dir: &Path) {
    stop_previous(dir);
}

/// Runs the demo of `a.service`; `true` when it met its guarantee (0 failed requests, …).
pub fn run(a: DemoOptions, json: bool) -> Result<bool, ShowcaseError> {
    match a.service {
        Service::Demo => run_demo_service(a, json),
        Service::Nginx => crate::nginx::run(&a, json),
        Service::Postgres => crate::pgdemo::run(
            &crate::pgdemo::PgDemoOptions {
                dir: a.dir.clone(),
                cycles: a.cycles,
                // pgbench's -T: the documented 60 s at least (raised to fit the cycles).
                seconds: a.load_seconds.max(60),
                pause_deadline_secs: 10,
            },
            json,
        ),
    }
}

fn run_demo_service(a: DemoOptions, json: bool) -> Result<bool, ShowcaseError> {
    let mode = a.mode.unwrap_or(Mode::Readdress);
    let say = |s: &str| {
        if !json {
            eprintln!("demo: {s}");
        }
    };
    let Prepared {
        config_path,
        netns,
        service,
        ..
    } = prepare(&a.dir, a.backend, mode, &say)?;
    let load_secs = a.load_seconds.max(5);
    let deadline = Duration::from_millis(a.deadline_ms.unwrap_or(match a.backend {
        BackendKind::Ns => 2000,
        BackendKind::Qemu => 5000,
    }));
    say(&format!(
        "driving load for {load_secs} s ({} reads/s + a writer) and patching lc1 meanwhile",
        a.rate
    ));
    let mut cfg = patchover_load::LoadConfig::for_url(
        &format!("http://{service}/version"),
        a.rate,
        Duration::from_secs(load_secs),
        patchover_load::ConnMode::Mixed,
    )?;
    cfg.netns = Some(netns.clone());
    cfg.deadline = deadline;
    let reads = std::thread::spawn(move || patchover_load::run(&cfg));
    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(netns.clone(), service, deadline, stop.clone());
    std::thread::sleep(Duration::from_secs(2));

    let started = Instant::now();
    let out = Command::new(std::env::current_exe()?)
        .env("PATCHOVER_CONFIG", &config_path)
        .args(["--json", "patch", "lc1", "--mode", &mode.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()?;
    let cycle_s = started.elapsed().as_secs_f64();
    let run: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("the patch run's report")?;
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let w = writes
        .join()
        .map_err(|_| ShowcaseError::Failed("the writer thread panicked".to_owned()))?;
    let r = reads
        .join()
        .map_err(|_| ShowcaseError::Failed("the load thread panicked".to_owned()))??;
    let lost = lost_writes(&netns, service, &w.acked)?;
    if let Some(path) = &a.report {
        write_report(
            path,
            &config_path,
            run["run_id"].as_i64().unwrap_or(0),
            &r,
            deadline,
        )?;
    }

    let requests_total = r.summary.total + w.acked.len() as u64 + w.failed.len() as u64;
    let requests_failed = r.summary.failed_total + w.failed.len() as u64;
    let report = json!({
        "mode": mode.to_string(),
        "backend": a.backend.to_string(),
        "deadline_ms": deadline.as_millis() as u64,
        "outcome": run["outcome"],
        "requests_total": requests_total,
        "requests_failed": requests_failed,
        "reads": {"total": r.summary.total, "failed": r.summary.failed, "p50_ms": r.summary.latency.p50_ms, "p99_ms": r.summary.latency.p99_ms, "max_ms": r.summary.latency.max_ms},
        "writes_acknowledged": w.acked.len(),
        "writes_failed": w.failed.len(),
        // What each failed write met (the first ten), to find its cause without a rerun.
        "write_failures": w.failed.iter().take(10).collect::<Vec<_>>(),
        // On the clock of write_failures' times (the steps' ms follow one another from here).
        "patch_started_ms": started.saturating_duration_since(w.started).as_millis() as u64,
        "writes_lost": lost,
        "pause_ms": run["pause_ms"],
        "freeze_ms": run["freeze_ms"],
        // The switcher's own figures: held connections, clients primed on the standby, drain.
        "switch": run["switch"],
        "bytes_copied": run["bytes_copied"],
        "bytes_replayed": run["bytes_replayed"],
        "version_before": run["version_before"],
        "version_after": run["version_after"],
        "cycle_s": cycle_s,
        "steps": run["steps"],
        "error": run["error"],
        "run_id": run["run_id"],
        "report_file": a.report,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "patchover demo ({} mode, {} LCs): {}",
            mode,
            a.backend,
            run["outcome"].as_str().unwrap_or("?")
        );
        println!(
            "  version            {} -> {}",
            run["version_before"].as_str().unwrap_or("?"),
            run["version_after"].as_str().unwrap_or("?")
        );
        println!(
            "  requests           {requests_total} total, {requests_failed} failed (a request failed if it took {} ms or more)",
            deadline.as_millis()
        );
        println!(
            "  writes             {} acknowledged, {lost} lost",
            w.acked.len()
        );
        for f in w.failed.iter().take(10) {
            println!("  failed write       {f}");
        }
        println!(
            "  pause              {} ms (freeze {} ms)",
            run["pause_ms"], run["freeze_ms"]
        );
        println!(
            "  copied / replayed  {} / {} bytes",
            run["bytes_copied"], run["bytes_replayed"]
        );
        println!("  the cycle took     {cycle_s:.1} s:");
        for s in run["steps"].as_array().into_iter().flatten() {
            println!(
                "    {:<18} {:>8.0} ms",
                s["step"].as_str().unwrap_or(""),
                s["ms"].as_f64().unwrap_or(0.0)
            );
        }
        if let Some(e) = run["error"].as_str() {
            println!("  error: {e}");
        }
        if let Some(p) = &a.report {
            println!("  report             {}", p.display());
        }
        for f in w.failed.iter().take(5) {
            println!("  failed: {f}");
        }
    }
    remove_client(&Net::busybox(&a.dir));
    if !a.keep {
        stop_previous(&a.dir);
    } else if !json {
        println!(
            "  LCs kept: PATCHOVER_CONFIG={} patchover lc list",
            config_path.display()
        );
    }
    let good = run["outcome"] == "ok" && requests_failed == 0 && lost == 0;
    Ok(good)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 20: patchover has no service defaults, so the demo's config states what the demo
    /// needs, and it must load.
    #[test]
    fn the_demo_config_states_its_service_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let host = patchover_core::HostFacts {
            cpus: 2,
            memory_mib: 4096,
        };
        for mode in [Mode::Readdress, Mode::Seamless] {
            let l = Layout::new(dir.path(), BackendKind::Ns);
            let path = write_config(dir.path(), &dir.path().join("k.pub"), &l, mode).unwrap();
            let text = fs::read_to_string(&path).unwrap();
            let c = patchover_core::Config::parse(&path, &text, &host).unwrap();
            let s = &c.service;
            assert!(
                matches!(&s.health, Some(patchover_core::HealthProbe::Http { path, .. }) if path == "/health"),
                "{s:?}"
            );
            assert_eq!(s.restart, ["/etc/init.d/S50demo", "restart"]);
            assert_eq!(s.version_path.as_deref(), Some("/version"));
            assert_eq!(s.forward[3], "{to}");
            assert!(!s.drain.is_empty() && !s.resume.is_empty() && !s.park.is_empty());
        }
    }
}
