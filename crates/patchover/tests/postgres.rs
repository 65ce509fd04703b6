//! PostgreSQL patched under pgbench (issue 21, docs/postgres.md): Debian's postgresql-15 in
//! Debian ns LCs (the cluster's data on the application disk), Debian's PgBouncer on the host
//! in front of the service address, Debian's pgbench through it with the set check, and the
//! readdress cycle and its rollback: no failed transaction, no aborted client, no lost commit.
//! Bad input: a front that does not answer (refused before anything changes), a transaction
//! longer than the pause deadline and a PostgreSQL that did not shut down cleanly (each rolls
//! the switch back; nothing lost).
//!
//! The image comes from `PATCHOVER_DEBIAN_CACHE` (default `/var/tmp/patchover-test-debian`)
//! after the first build on a machine (docs/debian.md).

mod common;

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Topo, po_env};
use patchover_front::process::{BouncerSpec, PgBouncerProcess, free_port};
use patchover_front::wire::{Conn, Login};
use patchover_showcase::postgres::{self, Bench, BenchResult};

fn cache() -> String {
    std::env::var("PATCHOVER_DEBIAN_CACHE")
        .unwrap_or_else(|_| "/var/tmp/patchover-test-debian".into())
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// Two Debian LCs with PostgreSQL (LC 0 built, LC 1 empty), a marked signed bundle, and the
/// PostgreSQL `[service]` with a PgBouncer front on a loopback port of its own.
struct PgLcs {
    // Dropped first: PgBouncer's server connections would hold up the LCs' stop.
    bouncer: Option<PgBouncerProcess>,
    t: Topo,
    a: String,
    front: SocketAddr,
    pause_deadline: u64,
}

impl PgLcs {
    fn new(pause_deadline: u64) -> PgLcs {
        let t = Topo::new(&[(0, 50, 384), (1, 50, 384)]);
        // PgBouncer (as postgres) keeps its files in here.
        fs::set_permissions(t.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let (sys, app) = (t.lcs[0].sys.clone(), t.lcs[0].app.clone());
        let t0 = Instant::now();
        let out = po_env(
            &t.config,
            &[
                "image",
                "build-debian",
                sys.to_str().unwrap(),
                "--packages",
                "postgresql-15",
            ],
            &[("PATCHOVER_DEBIAN_CACHE", &cache())],
        );
        assert!(
            out.status.success(),
            "build-debian: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("build-debian postgresql-15: {:?}", t0.elapsed());
        postgres::prepare_lc(&sys, &app).unwrap();
        for l in &t.lcs[1..] {
            fs::create_dir_all(&l.sys).unwrap();
            fs::create_dir_all(&l.app).unwrap();
        }
        let front = SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
        let me = PgLcs {
            a: t.lcs[0].id.clone(),
            t,
            front,
            bouncer: None,
            pause_deadline,
        };
        me.bundle();
        me
    }

    /// The config: trusted key, PostgreSQL's `[service]`; `stop` replaced when given.
    fn configure(&self, stop: &str) {
        let pubkey = self.t.dir.path().join("release.pub");
        let mut svc = postgres::service_section(self.front, self.pause_deadline);
        if !stop.is_empty() {
            let line = svc
                .lines()
                .find(|l| l.starts_with("stop = "))
                .unwrap()
                .to_owned();
            let mine = serde_json::to_string(&["/bin/sh", "-c", stop]).unwrap();
            svc = svc.replace(&line, &format!("stop = {mine}"));
        }
        self.t.write_config_with(&format!(
            "\n[bundles]\ntrusted_keys = [\"{}\"]\n{svc}",
            pubkey.display()
        ));
    }

    /// A bundle that creates `/etc/po-patch-level`, signed, imported and marked.
    fn bundle(&self) {
        let d = self.t.dir.path();
        let (key, pubkey) = (d.join("release.key"), d.join("release.pub"));
        self.t.po_ok(&[
            "bundle",
            "keygen",
            "--public",
            pubkey.to_str().unwrap(),
            "--secret",
            key.to_str().unwrap(),
        ]);
        self.configure("");
        let b = d.join("bundle");
        fs::create_dir_all(b.join("payload")).unwrap();
        fs::write(b.join("payload/level"), "1\n").unwrap();
        fs::write(
            b.join("manifest.toml"),
            "format = 1\nid = \"pg-level-1\"\ntitle = \"patch level 1\"\ncategory = \"security\"\nseverity = \"high\"\npublished = 2026-12-07T00:00:00Z\n\n[[step]]\nkind = \"replace\"\npath = \"/etc/po-patch-level\"\nfile = \"level\"\nold_sha256 = \"absent\"\n\n[[check]]\nkind = \"command_output\"\ncommand = [\"/bin/cat\", \"/etc/po-patch-level\"]\ncontains = \"1\"\n",
        )
        .unwrap();
        self.t.sign_and_import(&b, &key, "pg-level-1");
    }

    fn boot(&self) {
        let t0 = Instant::now();
        self.t.po_ok(&["lc", "boot", &self.a]);
        self.t.po_ok(&["service", "assign", &self.a]);
        eprintln!("boot: {:?}", t0.elapsed());
    }

    /// PgBouncer in front of the service address; returns once PostgreSQL answers through it
    /// and the set check's table exists.
    fn start_front(&mut self) {
        let service: SocketAddr = format!("{}:5432", self.t.service()).parse().unwrap();
        self.bouncer = Some(
            PgBouncerProcess::start(&BouncerSpec {
                dir: &self.t.dir.path().join("pgbouncer"),
                port: self.front.port(),
                target: service,
                databases: &["postgres"],
                server_user: "postgres",
                pool_size: 10,
            })
            .unwrap(),
        );
        let t0 = Instant::now();
        loop {
            match postgres::create_schema(&self.client()) {
                Ok(()) => break,
                Err(e) if t0.elapsed() > Duration::from_secs(30) => {
                    panic!("PostgreSQL through the front: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
        eprintln!("PostgreSQL answers through the front: {:?}", t0.elapsed());
    }

    fn client(&self) -> Login<'static> {
        Login {
            addr: self.front,
            user: "postgres",
            database: "postgres",
            password: None,
            timeout: Duration::from_secs(60),
        }
    }

    /// `patchover --json VERB a`: its exit code and report.
    fn run(&self, verb: &str) -> (Option<i32>, serde_json::Value, Duration, (u64, u64)) {
        let (t0, from) = (Instant::now(), now_us());
        let out = self.t.po(&["--json", verb, &self.a, "--mode", "readdress"]);
        let took = t0.elapsed();
        let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            serde_json::json!({ "stdout": String::from_utf8_lossy(&out.stdout), "stderr": String::from_utf8_lossy(&out.stderr) })
        });
        eprintln!(
            "{verb}: exit {:?} in {took:?}: {}",
            out.status.code(),
            report["outcome"]
        );
        (out.status.code(), report, took, (from, now_us()))
    }

    fn bench(&self, seconds: u64) -> postgres::Running {
        let bench = Bench {
            seconds,
            ..Bench::DEMO
        };
        postgres::start(&bench, self.front, &self.t.dir.path().join("pgbench")).unwrap()
    }
}

fn assert_nothing_lost(r: &BenchResult) {
    eprintln!(
        "pgbench: {} transactions, {} failed, {} clients aborted, {} retried; {} commits acknowledged, {} lost\n{}",
        r.transactions_total,
        r.transactions_failed,
        r.clients_aborted,
        r.transactions_retried,
        r.commits_acknowledged,
        r.commits_lost,
        r.stderr_tail
    );
    assert_eq!(r.transactions_failed, 0, "{}\n{}", r.pgbench, r.stderr_tail);
    assert_eq!(r.clients_aborted, 0, "{}", r.stderr_tail);
    assert_eq!(r.commits_lost, 0, "lost: {:?}", r.lost);
    assert!(r.commits_acknowledged > 100, "{}", r.pgbench);
    assert_eq!(
        r.commits_acknowledged, r.transactions_total,
        "{}",
        r.pgbench
    );
}

fn steps(report: &serde_json::Value) -> String {
    report["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            format!(
                "{}={:.0}ms",
                s["step"].as_str().unwrap_or("?"),
                s["ms"].as_f64().unwrap_or(0.0)
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn postgres_patched_and_rolled_back_under_pgbench_loses_no_commit() {
    let t0 = Instant::now();
    let mut pg = PgLcs::new(10);
    pg.boot();
    // The front does not answer yet: refused before anything changes.
    let out = pg.t.po(&["patch", &pg.a, "--mode", "readdress"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cannot be reached") && err.contains("nothing was changed"),
        "{err}"
    );
    assert!(
        pg.t.po_ok(&["runs", "list"]).lines().count() <= 1,
        "a run was opened"
    );

    pg.start_front();
    let bench = pg.bench(40);
    std::thread::sleep(Duration::from_secs(4));
    let (code, patched, took, patch_at) = pg.run("patch");
    assert_eq!(
        (code, &patched["outcome"]),
        (Some(0), &serde_json::json!("ok")),
        "{patched:#}"
    );
    eprintln!(
        "patch cycle {took:?}: {}; switch: {}",
        steps(&patched),
        patched["switch"]
    );
    std::thread::sleep(Duration::from_secs(2));
    let (code, back, took, back_at) = pg.run("rollback");
    assert_eq!(code, Some(0), "{back:#}");
    eprintln!("rollback {took:?}: {}", steps(&back));
    let r = bench.finish(&pg.client()).unwrap();
    assert_nothing_lost(&r);
    let (pause, p99) = r.pause_and_steady_p99(patch_at.0, patch_at.1);
    let (pause_back, _) = r.pause_and_steady_p99(back_at.0, back_at.1);
    eprintln!(
        "pause (max transaction latency): patch {pause:.0} ms, rollback {pause_back:.0} ms; steady p99 {p99:.1} ms"
    );
    eprintln!("whole test: {:?}", t0.elapsed());
}

/// A transaction longer than the pause deadline, then a PostgreSQL killed instead of stopped:
/// each switch rolls back, pgbench sees nothing fail, and every acknowledged commit (the long
/// transaction's too) is there.
#[test]
fn a_long_transaction_and_an_unclean_stop_roll_back_with_nothing_lost() {
    let mut pg = PgLcs::new(2);
    pg.boot();
    pg.start_front();
    let bench = pg.bench(75);
    std::thread::sleep(Duration::from_secs(3));

    let login = pg.client();
    let long = std::thread::spawn(move || {
        let mut c = Conn::connect(&login).unwrap();
        c.query("BEGIN").unwrap();
        c.query("INSERT INTO po_acked (client, n) VALUES (999, 1)")
            .unwrap();
        // Still running at the switch, 15-20 s into the run.
        c.query("SELECT pg_sleep(30)").unwrap();
        c.query("COMMIT").unwrap();
    });
    std::thread::sleep(Duration::from_millis(500));
    let (code, report, took, _) = pg.run("patch");
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(report["outcome"], "rolled-back", "{report:#}");
    let text = report.to_string();
    assert!(
        text.contains("within 2s") && text.contains("pause deadline"),
        "{report:#}"
    );
    eprintln!("long transaction: rolled back in {took:?}");
    long.join().unwrap();

    // The old PostgreSQL is killed, not stopped: the cut would need crash recovery.
    pg.configure("kill -9 $(head -1 /data/15/main/postmaster.pid)");
    // A failed run leaves its patch unmarked.
    pg.t.po_ok(&["patches", "mark", "pg-level-1"]);
    let (code, report, took, _) = pg.run("patch");
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(report["outcome"], "rolled-back", "{report:#}");
    assert!(report.to_string().contains("cut_check"), "{report:#}");
    eprintln!("unclean stop: rolled back in {took:?}");

    let r = bench.finish(&pg.client()).unwrap();
    assert_nothing_lost(&r);
    let mut c = Conn::connect(&pg.client()).unwrap();
    let long_row = c
        .query("SELECT count(*)::text FROM po_acked WHERE client = 999")
        .unwrap();
    assert_eq!(
        long_row.rows[0][0].as_deref(),
        Some("1"),
        "the long transaction's commit"
    );
}

/// The benchmark (slow tier): ten patch → rollback cycles under one pgbench run, the pause of
/// each run beside the steady p99, no failed transaction, no lost commit.
#[test]
fn postgres_bench_ten_cycles() {
    const CYCLES: u64 = 10;
    let mut pg = PgLcs::new(10);
    pg.boot();
    pg.start_front();
    // Room for every cycle: a patch took 9-38 s and a rollback 3-6 s in one run here.
    let bench = pg.bench(10 + 45 * CYCLES);
    std::thread::sleep(Duration::from_secs(4));
    let mut windows = Vec::new();
    for i in 0..CYCLES {
        // A run that went through leaves its patch applied and unmarked: mark it again.
        pg.t.po_ok(&["patches", "mark", "pg-level-1"]);
        for verb in ["patch", "rollback"] {
            let (code, report, took, at) = pg.run(verb);
            assert_eq!(code, Some(0), "cycle {i} {verb}: {report:#}");
            windows.push((format!("{i} {verb}"), took, at, report["pause_ms"].clone()));
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    let r = bench.finish(&pg.client()).unwrap();
    assert_nothing_lost(&r);
    let mut steady: Vec<u64> = r
        .latencies
        .iter()
        .filter(|(end, _)| {
            !windows
                .iter()
                .any(|(_, _, (a, b), _)| (a..=b).contains(&end))
        })
        .map(|(_, l)| *l)
        .collect();
    steady.sort_unstable();
    let p99 = steady[steady.len() * 99 / 100] as f64 / 1000.0;
    for (what, took, (a, b), switch_pause) in &windows {
        let (pause, _) = r.pause_and_steady_p99(*a, *b);
        eprintln!(
            "{what}: {took:?}, slowest transaction {pause:.0} ms (switch pause {switch_pause} ms)"
        );
    }
    eprintln!(
        "{} runs; {} transactions, {} commits acknowledged, 0 lost; steady p99 {p99:.1} ms",
        windows.len(),
        r.transactions_total,
        r.commits_acknowledged
    );
}

/// `patchover demo --service postgres` refuses what it does not use, before it makes anything.
#[test]
fn the_postgres_demo_refuses_what_it_does_not_use() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("demo");
    common::refused_before_anything_is_made(
        &[
            (
                &[
                    "demo",
                    "--service",
                    "postgres",
                    "--source",
                    "deb http://x bookworm main",
                ][..],
                "--source is for --service nginx",
            ),
            (
                &["demo", "--service", "postgres", "--all-updates"][..],
                "--all-updates is for --service nginx",
            ),
            (
                &["demo", "--service", "postgres", "--mode", "seamless"][..],
                "leave --mode out",
            ),
            (
                &["demo", "--service", "postgres", "--cycles", "0"][..],
                "at least 1",
            ),
        ],
        &d,
    );
}
