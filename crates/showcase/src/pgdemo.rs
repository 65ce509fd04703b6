//! `patchover demo --service postgres`: PostgreSQL 15 (Debian's) in two Debian ns LCs, Debian's
//! PgBouncer on the host in front of the service address, Debian's pgbench through it with the
//! documented command line (`-c 8 -j 2 -M simple -T 60`, docs/postgres.md), and patch →
//! rollback cycles meanwhile; then the counts: transactions, failed, aborted clients, retried,
//! commits acknowledged and lost (the set check), the pause beside the steady p99.
//!
//! Every name it makes on the host is its own (derived from its process id): the bridge, the
//! LCs' ids and cgroup parent, the /24, PgBouncer's port; so it can run beside the tests and the
//! other demos.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use patchover_bundle::create::{create_bundle, sign_bundle};
use patchover_bundle::keys::{SigningKey, generate_keypair};
use patchover_front::process::{BouncerSpec, PgBouncerProcess, free_port};
use patchover_front::wire::Login;
use serde_json::json;

use crate::postgres::{self, Bench};
use crate::{Context, ShowcaseError};

/// What `patchover demo --service postgres` does.
#[derive(Debug, Clone)]
pub struct PgDemoOptions {
    /// Its config, disks and logs (wiped at the start).
    pub dir: PathBuf,
    /// Patch → rollback cycles under the one pgbench run.
    pub cycles: u32,
    /// pgbench's `-T`; at least long enough for the cycles (it is raised to fit them).
    pub seconds: u64,
    /// PgBouncer's pause deadline (`[service.front] pause_deadline_secs`).
    pub pause_deadline_secs: u64,
}

/// The demo's names, from its process id.
struct World {
    dir: PathBuf,
    suffix: String,
    net: u8,
    config: PathBuf,
    front: SocketAddr,
}

impl World {
    fn new(dir: &Path) -> Result<World, ShowcaseError> {
        let pid = std::process::id();
        Ok(World {
            dir: dir.to_owned(),
            suffix: format!("{:05x}", pid & 0xf_ffff),
            net: (pid % 250 + 1) as u8,
            config: dir.join("patchover.toml"),
            front: SocketAddr::from(([127, 0, 0, 1], free_port()?)),
        })
    }
    fn lc(&self, n: u8) -> String {
        format!("pg{n}{}", self.suffix)
    }
    fn bridge(&self) -> String {
        format!("popg{}", self.suffix)
    }
    fn service(&self) -> SocketAddr {
        SocketAddr::from(([10, 79, self.net, 10], 5432))
    }
    fn lc_dir(&self, n: u8, what: &str) -> PathBuf {
        self.dir.join(format!("lc{n}-{what}"))
    }

    fn write_config(&self, pubkey: &Path, deadline: u64) -> Result<(), ShowcaseError> {
        let d = self.dir.display();
        let mut text = format!(
            "# Written by `patchover demo --service postgres`.\nstate_dir = \"{d}/state\"\nrun_dir = \"{d}/run\"\ncgroup_parent = \"patchover-pgdemo-{s}\"\n\n[network]\nbridge = \"{br}\"\nservice_address = \"10.79.{n}.10/24\"\nbridge_address = \"10.79.{n}.1/24\"\n\n[bundles]\ntrusted_keys = [\"{pk}\"]\n",
            s = self.suffix,
            br = self.bridge(),
            n = self.net,
            pk = pubkey.display(),
        );
        for i in [1u8, 2] {
            text.push_str(&format!(
                "\n[[lc]]\nid = \"{id}\"\ncpu = {cpu}\ncpu_share = 50\nmemory_mib = 384\nsystem_disk = {{ path = \"{sys}\" }}\napp_disk = {{ path = \"{app}\", mount = \"/data\" }}\nnic = [{{ name = \"eth0\", address = \"10.79.{n}.1{i}/24\" }}]\n",
                id = self.lc(i),
                cpu = i - 1,
                sys = self.lc_dir(i, "sys").display(),
                app = self.lc_dir(i, "app").display(),
                n = self.net,
            ));
        }
        text.push_str(&postgres::service_section(self.front, deadline));
        fs::write(&self.config, text)?;
        Ok(())
    }

    /// Runs this patchover binary with the demo's config; its exit code and stdout.
    fn po(&self, args: &[&str]) -> Result<(Option<i32>, String, String), ShowcaseError> {
        let out = Command::new(std::env::current_exe()?)
            .env("PATCHOVER_CONFIG", &self.config)
            .args(args)
            .output()
            .context("running patchover")?;
        Ok((
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    fn po_ok(&self, args: &[&str]) -> Result<String, ShowcaseError> {
        let (code, out, err) = self.po(args)?;
        ensure!(
            code == Some(0),
            "patchover {}: {}",
            args.join(" "),
            err.trim()
        );
        Ok(out)
    }

    /// The LCs stopped, the bridge and the switcher's rules gone.
    fn teardown(&self) {
        for i in [1, 2] {
            let _ = self.po(&["lc", "stop", &self.lc(i)]);
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge()])
            .output();
        if let std::net::IpAddr::V4(ip) = self.service().ip() {
            let _ = patchover_net::teardown(None, ip);
        }
    }
}

/// The bundle each patch run applies: `/etc/po-patch-level` appears.
fn bundle(w: &World, seckey: &Path) -> Result<(), ShowcaseError> {
    let b = w.dir.join("bundle-src");
    fs::create_dir_all(b.join("payload"))?;
    fs::write(b.join("payload/level"), "1\n")?;
    fs::write(
        b.join("manifest.toml"),
        "format = 1\nid = \"pg-level-1\"\ntitle = \"patch level 1 of the PostgreSQL LC\"\ncategory = \"security\"\nseverity = \"high\"\npublished = 2026-12-07T00:00:00Z\n\n[[step]]\nkind = \"replace\"\npath = \"/etc/po-patch-level\"\nfile = \"level\"\nold_sha256 = \"absent\"\n\n[[check]]\nkind = \"command_output\"\ncommand = [\"/bin/cat\", \"/etc/po-patch-level\"]\ncontains = \"1\"\n",
    )?;
    let file = w.dir.join("pg-level-1.po");
    create_bundle(&b, &file).context("creating the bundle")?;
    sign_bundle(&file, &SigningKey::from_file(seckey, None)?).context("signing the bundle")?;
    let mut env = crate::env(&w.config)?;
    let config = env.config.clone();
    patchover_app::patches::import(&config, &mut env.store, &file, true)?;
    Ok(())
}

/// Builds the world: the image, the LCs' disks, the config, the bundle, lc1 serving.
fn prepare(w: &World, opts: &PgDemoOptions, say: &dyn Fn(&str)) -> Result<(), ShowcaseError> {
    if w.dir.exists() {
        fs::remove_dir_all(&w.dir).with_context(|| format!("clearing {}", w.dir.display()))?;
    }
    fs::create_dir_all(&w.dir)?;
    // PgBouncer runs as postgres and keeps its files in here.
    fs::set_permissions(&w.dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let (pubkey, seckey) = (w.dir.join("release.pub"), w.dir.join("release.key"));
    generate_keypair(&pubkey, &seckey, None).context("making the signing key")?;
    w.write_config(&pubkey, opts.pause_deadline_secs)?;
    say("building the Debian image with postgresql-15 (mmdebstrap; cached after the first time)");
    let sys1 = w.lc_dir(1, "sys");
    w.po_ok(&[
        "image",
        "build-debian",
        &sys1.to_string_lossy(),
        "--packages",
        "postgresql-15",
    ])?;
    postgres::prepare_lc(&sys1, &w.lc_dir(1, "app"))?;
    for d in [w.lc_dir(2, "sys"), w.lc_dir(2, "app")] {
        fs::create_dir_all(d)?;
    }
    say("making and signing the bundle pg-level-1");
    bundle(w, &seckey)?;
    say("booting the first LC and giving it the service address");
    w.po_ok(&["lc", "boot", &w.lc(1)])?;
    w.po_ok(&["service", "assign", &w.lc(1)])?;
    Ok(())
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// One patch or rollback run under the load: its report, and when it ran (µs since the epoch).
fn cycle_run(w: &World, verb: &str) -> Result<(serde_json::Value, u64, u64), ShowcaseError> {
    let from = now_us();
    let (code, out, err) = w.po(&["--json", verb, &w.lc(1), "--mode", "readdress"])?;
    let to = now_us();
    let mut report: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|_| json!({ "error": err.trim() }));
    report["exit_code"] = json!(code);
    Ok((report, from, to))
}

/// Runs the demo; `Ok(true)` when no transaction failed, no client aborted, no commit was lost
/// and every run went through.
pub fn run(opts: &PgDemoOptions, json_out: bool) -> Result<bool, ShowcaseError> {
    let say = |s: &str| {
        if !json_out {
            eprintln!("demo: {s}");
        }
    };
    let w = World::new(&opts.dir)?;
    let result = run_in(&w, opts, &say);
    w.teardown();
    let report = result?;
    let ok = report["transactions_failed"] == 0
        && report["clients_aborted"] == 0
        && report["commits_lost"] == 0
        && report["runs"]
            .as_array()
            .is_some_and(|r| r.iter().all(|r| r["outcome"] == "ok"));
    if json_out {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    Ok(ok)
}

fn run_in(
    w: &World,
    opts: &PgDemoOptions,
    say: &dyn Fn(&str),
) -> Result<serde_json::Value, ShowcaseError> {
    prepare(w, opts, say)?;
    let bouncer = PgBouncerProcess::start(&BouncerSpec {
        dir: &w.dir.join("pgbouncer"),
        port: w.front.port(),
        target: w.service(),
        databases: &["postgres"],
        server_user: "postgres",
        pool_size: 10,
    })
    .context("starting PgBouncer")?;
    let login = Login {
        addr: w.front,
        user: "postgres",
        database: "postgres",
        password: None,
        timeout: Duration::from_secs(60),
    };
    let t0 = Instant::now();
    while let Err(e) = postgres::create_schema(&login) {
        ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "PostgreSQL does not answer through PgBouncer: {e}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Room for the cycles: a patch and its rollback took 12-44 s on a busy 2-core machine.
    let seconds = opts.seconds.max(10 + 45 * u64::from(opts.cycles));
    let bench = Bench {
        seconds,
        ..Bench::DEMO
    };
    say(&format!(
        "pgbench -c {} -j {} -M simple -T {seconds} through PgBouncer; {} patch/rollback cycle(s) meanwhile",
        bench.clients, bench.threads, opts.cycles
    ));
    let running = postgres::start(&bench, w.front, &w.dir.join("pgbench"))?;
    std::thread::sleep(Duration::from_secs(5));
    let mut runs = Vec::new();
    for _ in 0..opts.cycles {
        // A run that went through leaves its patch applied and unmarked: mark it again.
        w.po_ok(&["patches", "mark", "pg-level-1"])?;
        for verb in ["patch", "rollback"] {
            say(&format!("{verb} {}", w.lc(1)));
            runs.push((verb, cycle_run(w, verb)?));
            std::thread::sleep(Duration::from_secs(2));
        }
    }
    say("waiting for pgbench to end; the set check");
    let r = running.finish(&login)?;
    drop(bouncer);
    let mut report = r.json();
    let windows: Vec<(u64, u64)> = runs.iter().map(|(_, (_, a, b))| (*a, *b)).collect();
    let steady = steady_p99(&r, &windows);
    report["steady_p99_ms"] = json!(steady);
    report["runs"] = runs
        .iter()
        .map(|(verb, (rep, a, b))| {
            let (pause, _) = r.pause_and_steady_p99(*a, *b);
            json!({
                "verb": verb,
                "outcome": rep["outcome"],
                "exit_code": rep["exit_code"],
                "ms": (b - a) as f64 / 1000.0,
                "pause_ms": pause,
                "switch_pause_ms": rep["pause_ms"],
                "error": rep["error"],
            })
        })
        .collect();
    report["command"] = json!(format!(
        "pgbench -h 127.0.0.1 -p PORT -U postgres -n -M simple -P 1 -l -c {} -j {} -T {seconds} -D n=0 -f acked.sql postgres",
        bench.clients, bench.threads
    ));
    Ok(report)
}

/// The 99th percentile of the transactions that ended outside every run.
fn steady_p99(r: &postgres::BenchResult, windows: &[(u64, u64)]) -> f64 {
    let mut lat: Vec<u64> = r
        .latencies
        .iter()
        .filter(|(end, _)| !windows.iter().any(|(a, b)| (a..=b).contains(&end)))
        .map(|(_, l)| *l)
        .collect();
    lat.sort_unstable();
    lat.get((lat.len() * 99 / 100).min(lat.len().saturating_sub(1)))
        .map_or(0.0, |l| *l as f64 / 1000.0)
}

fn print_text(r: &serde_json::Value) {
    println!("{}", r["pgbench"].as_str().unwrap_or_default().trim_end());
    println!(
        "\ntransactions: {} total, {} failed, {} retried; clients aborted: {}",
        r["transactions_total"],
        r["transactions_failed"],
        r["transactions_retried"],
        r["clients_aborted"]
    );
    println!(
        "commits acknowledged: {}, lost: {}; steady p99 {} ms",
        r["commits_acknowledged"], r["commits_lost"], r["steady_p99_ms"]
    );
    for run in r["runs"].as_array().into_iter().flatten() {
        println!(
            "{} {}: {} in {:.1} s, pause (slowest transaction) {} ms",
            run["verb"].as_str().unwrap_or("?"),
            run["exit_code"],
            run["outcome"],
            run["ms"].as_f64().unwrap_or(0.0) / 1000.0,
            run["pause_ms"]
        );
    }
}
