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
    /// PgBouncer's admin console as the config has it (the front, or a proxy in front of it).
    admin: SocketAddr,
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
            admin: front,
            bouncer: None,
            pause_deadline,
        };
        me.bundle();
        me
    }

    /// The config: trusted key, PostgreSQL's `[service]`; `stop` replaced when given.
    fn configure(&self, stop: &str) {
        let pubkey = self.t.dir.path().join("release.pub");
        let mut svc = postgres::service_section(self.admin, self.pause_deadline);
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

    /// `patchover --json patch a` in the background, to be killed.
    fn spawn_patch(&self) -> std::process::Child {
        std::process::Command::new(common::BIN)
            .env("PATCHOVER_CONFIG", &self.t.config)
            .env("PATCHOVER_GUEST_DIR", common::guest_dir())
            .args(["--json", "patch", &self.a, "--mode", "readdress"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    }

    /// The newest run's id and its journal (`runs show --json`).
    fn last_run(&self) -> (i64, Vec<serde_json::Value>) {
        let runs = self.t.po_json(&["runs", "list"]);
        let id = runs
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["id"].as_i64())
            .max()
            .unwrap();
        let shown = self.t.po_json(&["runs", "show", &id.to_string()]);
        (id, shown["steps"].as_array().unwrap().clone())
    }

    /// Whether PgBouncer holds its clients (1.18's console does not show a `PAUSE` of every
    /// database): a client's `SELECT 1` through it gets no answer within 3 s.
    fn front_paused(&self) -> bool {
        let login = Login {
            timeout: Duration::from_secs(3),
            ..self.client()
        };
        match Conn::connect(&login).and_then(|mut c| c.query("SELECT 1")) {
            Ok(_) => false,
            Err(e) if e.timed_out() => true,
            Err(e) => panic!("a client through the front: {e}"),
        }
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

/// A TCP proxy in front of PgBouncer's admin console (the config's `[service.front] admin`),
/// flaky on demand: once it has forwarded a `PAUSE` it refuses (accepts and closes at once)
/// the next `refuse` connections, as a console that is restarting or full would.
struct FlakyConsole {
    addr: SocketAddr,
    state: std::sync::Arc<Flaky>,
}

#[derive(Default)]
struct Flaky {
    paused_seen: std::sync::atomic::AtomicBool,
    refuse: std::sync::atomic::AtomicUsize,
    refused: std::sync::atomic::AtomicUsize,
}

impl FlakyConsole {
    fn start(to: SocketAddr) -> FlakyConsole {
        use std::sync::atomic::Ordering::SeqCst;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let state = std::sync::Arc::new(Flaky::default());
        let st = state.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                if st.paused_seen.load(SeqCst) && st.refuse.load(SeqCst) > 0 {
                    st.refuse.fetch_sub(1, SeqCst);
                    st.refused.fetch_add(1, SeqCst);
                    continue;
                }
                if let Ok(up) = std::net::TcpStream::connect(to) {
                    pipe(c, up, st.clone());
                }
            }
        });
        FlakyConsole { addr, state }
    }

    /// From the next `PAUSE` on, refuse `n` connections.
    fn refuse_after_pause(&self, n: usize) {
        use std::sync::atomic::Ordering::SeqCst;
        self.state.paused_seen.store(false, SeqCst);
        self.state.refuse.store(n, SeqCst);
    }

    /// Pass every connection again.
    fn pass(&self) {
        self.state
            .refuse
            .store(0, std::sync::atomic::Ordering::SeqCst);
    }

    fn refused(&self) -> usize {
        self.state.refused.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Copies both ways between an admin client and PgBouncer, noting a `PAUSE` on the way in.
fn pipe(client: std::net::TcpStream, server: std::net::TcpStream, st: std::sync::Arc<Flaky>) {
    use std::io::{Read, Write};
    let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let (mut s_in, mut c_out) = (server, client);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut s_in, &mut c_out);
        let _ = c_out.shutdown(std::net::Shutdown::Both);
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = c_in.read(&mut buf) {
            if n == 0 || s_out.write_all(&buf[..n]).is_err() {
                break;
            }
            if buf[..n].windows(5).any(|w| w == b"PAUSE") {
                st.paused_seen
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let _ = s_out.shutdown(std::net::Shutdown::Both);
    });
}

/// The journal's lines named `name`, with their detail.
fn lines<'a>(journal: &'a [serde_json::Value], name: &str) -> Vec<&'a serde_json::Value> {
    journal.iter().filter(|l| l["step"] == name).collect()
}

/// The journal's front lines and the recovery line, for messages.
fn front_story(journal: &[serde_json::Value]) -> String {
    journal
        .iter()
        .filter(|l| {
            let s = l["step"].as_str().unwrap_or("");
            s.starts_with("front_") || s == "recover" || s == "switch"
        })
        .map(|l| format!("{}:{} {}", l["step"], l["state"], l["detail"]))
        .collect::<Vec<_>>()
        .join("\n")
}

/// pgbench's `-T` in the front's tests: room for two patch runs (a system disk copy took up
/// to 22 s here) and the waits around them.
const BENCH_SECS: u64 = 110;

/// The scenarios ended while pgbench still ran: its clients were held and let go, not idle.
fn still_running(bench: &postgres::Running) {
    assert!(
        bench.started.elapsed() < Duration::from_secs(BENCH_SECS),
        "pgbench ended ({BENCH_SECS} s) before the last scenario did: raise BENCH_SECS"
    );
}

/// A world whose front console goes through a [`FlakyConsole`], PgBouncer started.
fn flaky_world(stop: &str) -> (PgLcs, FlakyConsole) {
    let mut pg = PgLcs::new(10);
    let console = FlakyConsole::start(pg.front);
    pg.admin = console.addr;
    pg.configure(stop);
    pg.boot();
    pg.start_front();
    (pg, console)
}

/// Issue 21, gap 1: a front whose console refuses a few times after the switch is released
/// by the retries (journaled paused before `PAUSE`, released after, with the tries); one
/// whose console keeps refusing fails the run loudly (exit 1, outcome `switched`, the error
/// names the front, the release and the command that lets it go), the journal's last front
/// line says paused, its clients wait, and the named command lets them go. pgbench: nothing
/// failed, nothing lost.
#[test]
fn r21_a_flaky_front_console_is_retried_and_a_dead_one_fails_the_run_with_the_resume_command() {
    let (pg, console) = flaky_world("");
    let bench = pg.bench(BENCH_SECS);
    std::thread::sleep(Duration::from_secs(3));

    console.refuse_after_pause(3);
    let (code, report, took, _) = pg.run("patch");
    assert_eq!(code, Some(0), "{report:#}");
    assert_eq!(console.refused(), 3);
    let (_, journal) = pg.last_run();
    let story = front_story(&journal);
    eprintln!("flaky console, patch {took:?}: {}\n{story}", steps(&report));
    let switch = lines(&journal, "switch").pop().unwrap();
    assert_eq!(switch["detail"]["front_released"], true, "{story}");
    assert_eq!(switch["detail"]["front_tries"], 4, "{story}");
    let paused = journal.iter().position(|l| l["step"] == "front_paused");
    let released = journal.iter().position(|l| l["step"] == "front_released");
    assert!(paused.is_some() && paused < released, "{story}");
    let released = &journal[released.unwrap()]["detail"];
    assert_eq!(
        (&released["by"], &released["tries"]),
        (&"switch".into(), &4.into())
    );
    assert!(!pg.front_paused());

    let (code, back, _, _) = pg.run("rollback");
    assert_eq!(code, Some(0), "{back:#}");
    pg.t.po_ok(&["patches", "mark", "pg-level-1"]);
    console.refuse_after_pause(usize::MAX);
    let (code, report, took, _) = pg.run("patch");
    let (_, journal) = pg.last_run();
    let story = front_story(&journal);
    eprintln!(
        "dead console, patch {took:?}: {}: {}\n{story}",
        steps(&report),
        report["error"]
    );
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(report["outcome"], "switched", "{report:#}");
    let command = format!(
        "psql 'host=127.0.0.1 port={} user=pgbouncer dbname=pgbouncer' -c 'RESUME'",
        console.addr.port()
    );
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains(&format!(
            "the front pgbouncer at {} is still paused after the switch to",
            console.addr
        )) && error.contains("its release failed 9 times; let it go with: ")
            && error.contains(&command),
        "{error}"
    );
    let front_lines: Vec<_> = journal
        .iter()
        .filter(|l| l["step"].as_str().unwrap_or("").starts_with("front_"))
        .collect();
    assert_eq!(
        front_lines.last().unwrap()["step"],
        "front_paused",
        "{story}"
    );
    assert_eq!(
        lines(&journal, "switch").pop().unwrap()["detail"]["front_released"],
        false
    );
    assert!(pg.front_paused(), "its clients wait");

    console.pass();
    let out = std::process::Command::new("sh")
        .args(["-c", &command])
        .output()
        .unwrap();
    assert!(out.status.success(), "{command}: {out:?}");
    assert!(!pg.front_paused(), "the command in the error let it go");
    still_running(&bench);
    let r = bench.finish(&pg.client()).unwrap();
    assert_nothing_lost(&r);
}

/// Issue 21, gap 2: patchover SIGKILLed with PgBouncer paused, twice: (1) inside the switch
/// window (the old PostgreSQL stopped; the `stop` hook marks the moment, then sleeps), where
/// recovery rolls back and resumes the front on the old LC; (2) while the front's release is
/// retried after the switch (its console refusing), where recovery finishes the run and
/// releases the front onto the standby. Each time the journal says what recovery did, and
/// pgbench sees nothing fail and loses no commit.
#[test]
fn r21_sigkill_with_the_front_paused_is_recovered_and_the_front_let_go() {
    let marker = "/tmp/po-in-window";
    let (pg, console) = flaky_world(&format!(
        "{} stop && touch {marker} && sleep 5",
        postgres::PO_PG_PATH
    ));
    let bench = pg.bench(BENCH_SECS);
    std::thread::sleep(Duration::from_secs(3));

    let window = now_us();
    let mut child = pg.spawn_patch();
    let t0 = Instant::now();
    while !pg
        .t
        .po(&["lc", "exec", &pg.a, "--", "test", "-e", marker])
        .status
        .success()
    {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before its window"
        );
        assert!(t0.elapsed() < Duration::from_secs(120), "no window came");
        std::thread::sleep(Duration::from_millis(50));
    }
    let paused = pg.front_paused();
    child.kill().unwrap();
    let _ = child.wait();
    assert!(paused, "killed with the front paused");
    let outcome = pg.t.recovered_outcome("killed in the window");
    let window = (window, now_us());
    let (_, journal) = pg.last_run();
    let story = front_story(&journal);
    eprintln!(
        "killed in the window after {:?}: {outcome}\n{story}",
        t0.elapsed()
    );
    assert_eq!(outcome, "rolled-back", "{story}");
    let released = lines(&journal, "front_released");
    assert_eq!(released.len(), 1, "{story}");
    assert_eq!(
        (
            &released[0]["detail"]["by"],
            &released[0]["detail"]["action"]
        ),
        (&"recover".into(), &"resume".into()),
        "{story}"
    );
    assert_eq!(
        lines(&journal, "recover")[0]["detail"]["front"]["action"],
        "resume"
    );
    assert!(!pg.front_paused());

    pg.configure("");
    pg.t.po_ok(&["patches", "mark", "pg-level-1"]);
    console.refuse_after_pause(usize::MAX);
    let release = now_us();
    let mut child = pg.spawn_patch();
    let t0 = Instant::now();
    while console.refused() == 0 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before its release"
        );
        assert!(t0.elapsed() < Duration::from_secs(120), "no release came");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    let _ = child.wait();
    console.pass();
    let outcome = pg.t.recovered_outcome("killed in the release");
    let release = (release, now_us());
    let (_, journal) = pg.last_run();
    let story = front_story(&journal);
    eprintln!("killed in the release: {outcome}\n{story}");
    assert_eq!(outcome, "ok", "{story}");
    let released = lines(&journal, "front_released");
    assert_eq!(released.len(), 1, "{story}");
    assert_eq!(
        (
            &released[0]["detail"]["by"],
            &released[0]["detail"]["action"]
        ),
        (&"recover".into(), &"release".into()),
        "{story}"
    );
    assert!(!pg.front_paused());
    still_running(&bench);
    let r = bench.finish(&pg.client()).unwrap();
    assert_nothing_lost(&r);
    let (in_window, p99) = r.pause_and_steady_p99(window.0, window.1);
    let (in_release, _) = r.pause_and_steady_p99(release.0, release.1);
    eprintln!(
        "the slowest transaction (the clients' wait, kill and recovery included): killed in the window {in_window:.0} ms, killed in the release {in_release:.0} ms; steady p99 {p99:.1} ms"
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
