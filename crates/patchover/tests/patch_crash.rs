//! Crash safety of a patch run: patchover is SIGKILLed at random moments of patch cycles; each
//! time the run guard (or `patchover runs recover`) finishes or rolls the run back. Across all
//! of it the service answers every request and keeps every acknowledged write.
//!
//! The per-request deadline here is 7 s, not 2 s: connection attempts that patchover held in
//! its NFQUEUE when it was killed are dropped by the kernel with the queue, and their clients
//! retransmit the SYN after 1 s (then 2 s more); those requests are late, not lost.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::cycle::{
    Cycle, KeepAlive, Load, Reads, assert_all_there, first_answer_by, split_failures,
};
use common::{BIN, Client, guest_dir, unix_ms};

/// A small deterministic generator (xorshift), seeded per run and printed for reruns.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn sigkill_at_random_points_never_interrupts_the_service() {
    let points = env_or("PATCHOVER_CRASH_POINTS", 20);
    crash_at_random_points(
        Cycle::new(2, ""),
        points,
        Duration::from_millis(7000),
        "readdress",
    );
}

/// The same in `seamless` mode, where a kill can leave the old service parked in the middle of
/// its hand-off (recovery forwards or unparks it) and the clients' NAT half-moved.
#[test]
fn sigkill_at_random_points_never_interrupts_the_service_in_seamless_mode() {
    let points = env_or("PATCHOVER_SEAMLESS_CRASH_POINTS", 10);
    crash_at_random_points(
        Cycle::routed(2, ""),
        points,
        // A seamless ns cycle takes ≈ 4.5 s here: kill inside it, not after.
        Duration::from_millis(5000),
        "seamless",
    );
}

/// The same with image application disks, served by each LC's block server and copied by
/// dirty bitmap: a kill can leave a backup job, its bitmap and target nodes in the active LC's
/// server, or the LC frozen in the middle of a cut; recovery ends them and thaws it.
#[test]
fn sigkill_at_random_points_never_interrupts_the_service_with_an_image_app_disk() {
    let points = env_or("PATCHOVER_IMAGE_CRASH_POINTS", 8);
    crash_at_random_points(
        Cycle::app_image(2, ""),
        points,
        Duration::from_millis(6000),
        "readdress",
    );
}

/// The same on QEMU LCs: a cycle takes ≈ 20–25 s under TCG, so fewer points spread over longer.
#[test]
fn sigkill_at_random_points_never_interrupts_the_service_on_qemu() {
    let points = env_or("PATCHOVER_QEMU_CRASH_POINTS", 5);
    crash_at_random_points(
        Cycle::qemu(2, "", false),
        points,
        Duration::from_secs(30),
        "readdress",
    );
}

/// The two moments of a hand-off that recovery must tell apart, each held open by a slow
/// hand-off command so patchover can be killed inside it: (1) the old service parked, the
/// clients' NAT still on it → recovery unparks it and the service stays; (2) the clients' NAT
/// on the standby, the old service still parked → recovery makes it forward and finishes.
#[test]
fn sigkill_inside_a_hand_off_is_recovered_both_ways() {
    let c = Cycle::routed(
        2,
        "\n[service]\npark = [\"/bin/sh\", \"-c\", \"/usr/bin/patchover-demo ctl park && sleep 3\"]\nforward = [\"/bin/sh\", \"-c\", \"sleep 3; exec /usr/bin/patchover-demo ctl forward {to}\"]\n",
    );
    c.stamp_bundle();
    let client = c.start_seamless();
    let svc = c.t.service();
    let (a, b) = (c.t.lcs[0].id.clone(), c.t.lcs[1].id.clone());
    // Requests are held from the park (whose command then sleeps 3 s) until recovery's forward
    // (which sleeps 3 s first): ≥ 6 s by design, more on a loaded host (one CI run: 7.04 s).
    let deadline = Duration::from_secs(15);
    let load = Load::with_deadline(&client, svc.clone(), deadline);
    let kept = KeepAlive::start(&client, svc.clone(), deadline);
    let nat = || patchover_net::nft::service_nat_target(None, svc.parse().unwrap()).unwrap();
    let addr = |i: usize| Some(c.t.lcs[i].address.parse().unwrap());
    let parked = |lc: &str| {
        let out = c.t.po(&[
            "lc",
            "exec",
            lc,
            "--",
            "/usr/bin/patchover-demo",
            "ctl",
            "state",
        ]);
        String::from_utf8_lossy(&out.stdout).contains("parked")
    };
    for (moment, expect_on, expect_outcome) in
        [("parked", 0, "rolled-back"), ("nat moved", 1, "ok")]
    {
        c.t.po_ok(&["patches", "mark", "stamp-1"]);
        let mut child = spawn_patch(&c, &a, "seamless");
        let start = Instant::now();
        loop {
            let there = match moment {
                "parked" => parked(&a),
                _ => nat() == addr(1) && parked(&a),
            };
            if there {
                break;
            }
            assert!(
                child.try_wait().unwrap().is_none(),
                "{moment}: the run ended before the moment came"
            );
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{moment}: never came"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill().unwrap();
        let _ = child.wait();
        // The run guard recovers at once; `runs recover` waits for it (or does it).
        let outcome = c.t.recovered_outcome(moment);
        assert_eq!(outcome, expect_outcome, "{moment}");
        let on = &c.t.lcs[expect_on].id;
        assert_eq!(nat(), addr(expect_on), "{moment}: the NAT points at {on}");
        let state = c.t.po_ok(&[
            "lc",
            "exec",
            on,
            "--",
            "/usr/bin/patchover-demo",
            "ctl",
            "state",
        ]);
        assert!(state.contains("serving"), "{moment}: {state}");
        let st = |lc: &str| c.t.po_json(&["lc", "status", lc])["state"].clone();
        assert_eq!(
            st(&a),
            if expect_on == 0 { "running" } else { "stopped" },
            "{moment}"
        );
        assert_eq!(
            st(&b),
            if expect_on == 0 { "stopped" } else { "running" },
            "{moment}"
        );
        eprintln!("{moment}: killed, recovered as {outcome}, service on {on}");
    }
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failures, acked) = load.finish();
    let (k_ok, k_failures, k_acked, moved) = kept.finish();
    assert!(
        failures.is_empty() && k_failures.is_empty(),
        "{:?} {:?}",
        &failures[..failures.len().min(5)],
        &k_failures[..k_failures.len().min(5)]
    );
    assert!(moved >= 1, "the recovery's forward moved no held request");
    assert_all_there(&client, &svc, &acked);
    assert_all_there(&client, &svc, &k_acked);
    eprintln!("{ok} + {k_ok} requests, none failed, {moved} forwarded");
}

/// Issue 20, item 2: a stateless run killed after its NAT flipped, while the old LC still
/// serves the flows it accepted: recovery finishes the run (nothing to forward or unpark),
/// lets the old LC's flows end, then stops it; no read failed.
#[test]
fn sigkill_after_a_stateless_flip_is_finished_once_the_old_flows_ended() {
    let c = Cycle::routed(
        2,
        "\n[service]\nstateless = true\nstateless_drain_secs = 20\n",
    );
    c.upgrade_bundle();
    let client = c.start_seamless();
    let svc = c.t.service();
    let (a, b) = (c.t.lcs[0].id.clone(), c.t.lcs[1].id.clone());
    // Kept-alive connections the client closes after 4 s, and new connections.
    let kept = Reads::start(&client, svc.clone(), Some(Duration::from_secs(4)));
    let fresh = Reads::start(&client, svc.clone(), None);
    let nat = || patchover_net::nft::service_nat_target(None, svc.parse().unwrap()).unwrap();
    let to = Some(c.t.lcs[1].address.parse().unwrap());
    let mut child = spawn_patch(&c, &a, "seamless");
    let start = Instant::now();
    while nat() != to {
        if child.try_wait().unwrap().is_some() {
            let runs = c.t.po_json(&["runs", "list"]);
            panic!("the run ended before its NAT flipped: {runs:#}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the NAT never flipped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    let _ = child.wait();
    let killed_ms = unix_ms();
    let outcome = c.t.recovered_outcome("nat flipped");
    std::thread::sleep(Duration::from_millis(300));
    let (k, k_failures, closed) = kept.finish();
    let (f, f_failures, _) = fresh.finish();
    eprintln!("{} kept-alive + {} new-connection reads", k.len(), f.len());
    assert_eq!(outcome, "ok");
    assert!(
        k_failures.is_empty() && f_failures.is_empty(),
        "{k_failures:?} {f_failures:?}"
    );
    assert_eq!(closed, 0, "nothing drained the old service");
    assert_eq!(nat(), to, "the NAT stays on the standby");
    let st = |lc: &str| c.t.po_json(&["lc", "status", lc])["state"].clone();
    assert_eq!((st(&a), st(&b)), ("stopped".into(), "running".into()));
    // The old LC served its pinned flow after patchover died: recovery waited for it.
    let old = &k[0].by;
    assert!(
        k.iter().any(|x| &x.by == old && x.done_ms > killed_ms),
        "no answer from {old} after the kill"
    );
}

/// Issue 23: patchover SIGKILLed in a run's watch after the switch. First with the service
/// healthy on the new LC: recovery finishes the run (the old LC stops). Then, the next run
/// (back the other way), with the new LC's service killed just before patchover (the watch
/// checks every 5 s, so it has not seen it): recovery finds it failing and hands the service
/// back to the old LC, still running, with a new reverse copy cut in the switch window.
/// Across both, no request fails outside the window from the service's kill to the first
/// answer from the old LC, and no acknowledged write is lost.
#[test]
fn sigkill_in_a_watch_is_finished_when_healthy_and_handed_back_when_not() {
    let c = Cycle::new(
        2,
        "\n[service]\nwatch_secs = 30\nwatch_interval_ms = 5000\n",
    );
    c.stamp_bundle();
    c.start_service();
    let client = Client::new(&c.t.bridge, &c.t.client_addr(0));
    let svc = c.t.service();
    let (a, b) = (c.t.lcs[0].id.clone(), c.t.lcs[1].id.clone());
    let load = Load::with_deadline(&client, svc.clone(), Duration::from_secs(7));
    let reads = Reads::start(&client, svc.clone(), None);
    let st = |lc: &str| c.t.po_json(&["lc", "status", lc])["state"].clone();

    let mut child = kill_in_the_watch(&c, &a, None);
    let outcome = c.t.recovered_outcome("killed in a healthy watch");
    let _ = child.wait();
    assert_eq!(outcome, "ok", "a healthy watch is finished");
    assert_eq!((st(&a), st(&b)), ("stopped".into(), "running".into()));

    let killed = std::cell::Cell::new(0);
    let mut child = kill_in_the_watch(&c, &b, Some(&|| killed.set(c.t.kill_the_service_of(&a))));
    let outcome =
        c.t.recovered_outcome("killed in a watch of a failed service");
    let _ = child.wait();
    let run =
        c.t.po_json(&["runs", "show", &last_run_id(&c).unwrap().to_string()]);
    assert_eq!(outcome, "handed-back", "{:#}", run["run"]);
    assert_eq!((st(&a), st(&b)), ("stopped".into(), "running".into()));
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failures, acked) = load.finish();
    let (answers, read_failures, _) = reads.finish();
    // The first answers are lc a's (before the runs), then lc b's (after the first).
    let a_by = &answers.first().expect("reads before the runs").by;
    let b_by = &answers.iter().find(|x| &x.by != a_by).expect("b served").by;
    let back = first_answer_by(&answers, b_by, killed.get()).expect("the old LC answers again");
    let split = split_failures(
        failures.iter().chain(&read_failures),
        killed.get(),
        back.done_ms,
    );
    eprintln!(
        "recovered hand-back: answering from the old LC {} ms after the service's kill; {ok} requests, {} reads, failed: {} in flight, {} in the window, {} outside; {} writes acknowledged",
        back.done_ms - killed.get(),
        answers.len(),
        split.in_flight,
        split.inside,
        split.outside.len(),
        acked.len()
    );
    assert!(
        split.outside.is_empty(),
        "{:?}",
        &split.outside[..split.outside.len().min(5)]
    );
    assert_all_there(&client, &svc, &acked);
}

/// Starts a patch of `lc` (the marked bundle), waits until its watch has started, runs
/// `before` (if any), then SIGKILLs patchover.
fn kill_in_the_watch(c: &Cycle, lc: &str, before: Option<&dyn Fn()>) -> std::process::Child {
    c.t.po_ok(&["patches", "mark", "stamp-1"]);
    let mut child = spawn_patch(c, lc, "readdress");
    wait_for_step(c, &mut child, "watch");
    // The watch's first check (at once) has passed: the service was healthy when it began.
    std::thread::sleep(Duration::from_millis(500));
    if let Some(f) = before {
        f();
    }
    child.kill().unwrap();
    child
}

/// Waits until the newest run, still going, has journaled `step`.
fn wait_for_step(c: &Cycle, child: &mut std::process::Child, step: &str) {
    let start = Instant::now();
    loop {
        let there = last_run_id(c).is_some_and(|id| {
            let run = c.t.po_json(&["runs", "show", &id.to_string()]);
            run["run"]["ended_ms"].is_null()
                && run["steps"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s["step"] == step)
        });
        if there {
            return;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before {step}"
        );
        assert!(start.elapsed() < Duration::from_secs(60), "no {step}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Issue 23: patchover SIGKILLed inside a hand-back (the new LC's service killed in a watch
/// checking every 250 ms), at moments from its start to the failed LC's stop: recovery
/// finishes the hand-back (the old LC holds the service again) or does it again from the
/// start; each time the old LC serves, the failed one is stopped, nothing acknowledged is lost
/// and nothing fails outside the window from the service's kill to the old LC's first answer.
#[test]
fn sigkill_inside_a_hand_back_is_finished_by_recovery() {
    let c = Cycle::new(2, "\n[service]\nwatch_secs = 30\nwatch_interval_ms = 250\n");
    c.stamp_bundle();
    c.start_service();
    let client = Client::new(&c.t.bridge, &c.t.client_addr(0));
    let svc = c.t.service();
    let (a, b) = (c.t.lcs[0].id.clone(), c.t.lcs[1].id.clone());
    let st = |lc: &str| c.t.po_json(&["lc", "status", lc])["state"].clone();
    for delay_ms in [0, 250, 1500] {
        let load = Load::with_deadline(&client, svc.clone(), Duration::from_secs(7));
        let reads = Reads::start(&client, svc.clone(), None);
        std::thread::sleep(Duration::from_millis(300));
        c.t.po_ok(&["patches", "mark", "stamp-1"]);
        let mut child = spawn_patch(&c, &a, "readdress");
        wait_for_step(&c, &mut child, "watch");
        std::thread::sleep(Duration::from_millis(500));
        let killed = c.t.kill_the_service_of(&b);
        wait_for_step(&c, &mut child, "hand_back");
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap();
        let _ = child.wait();
        let moment = format!("{delay_ms} ms into a hand-back");
        let outcome = c.t.recovered_outcome(&moment);
        let run =
            c.t.po_json(&["runs", "show", &last_run_id(&c).unwrap().to_string()]);
        assert_eq!(outcome, "handed-back", "{moment}: {:#}", run["run"]);
        assert_eq!(
            (st(&a), st(&b)),
            ("running".into(), "stopped".into()),
            "{moment}"
        );
        std::thread::sleep(Duration::from_millis(300));
        let (ok, failures, acked) = load.finish();
        let (answers, read_failures, _) = reads.finish();
        let a_by = &answers.first().expect("reads before the run").by;
        let back = first_answer_by(&answers, a_by, killed).expect("the old LC answers again");
        let split = split_failures(failures.iter().chain(&read_failures), killed, back.done_ms);
        let steps = common::step_lines(&run);
        eprintln!(
            "{moment}: recovered as {outcome} ({}); answering from the old LC {} ms after the service's kill; {ok} requests, {} reads, failed: {} in flight, {} in the window, {} outside; {} writes acknowledged",
            steps[steps.len().saturating_sub(4)..].join(" "),
            back.done_ms - killed,
            answers.len(),
            split.in_flight,
            split.inside,
            split.outside.len(),
            acked.len()
        );
        assert!(
            split.outside.is_empty(),
            "{moment}: {:?}",
            &split.outside[..split.outside.len().min(5)]
        );
        assert_all_there(&client, &svc, &acked);
    }
}

/// The id of the newest run in the journal (`None`: no run yet).
/// `patchover patch LC --mode MODE` started in the background (to be killed by the test).
fn spawn_patch(c: &Cycle, lc: &str, mode: &str) -> std::process::Child {
    Command::new(BIN)
        .env("PATCHOVER_CONFIG", &c.t.config)
        .env("PATCHOVER_GUEST_DIR", guest_dir())
        .args(["--json", "patch", lc, "--mode", mode])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn last_run_id(c: &Cycle) -> Option<i64> {
    c.t.po_json(&["runs", "list"])
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["id"].as_i64())
        .max()
}

/// Issue 15: recovery rolled a readdress run killed after its drain back (the address back on
/// the old LC) but never undid the drain, so the old service went on answering every request
/// with `Connection: close` and closing idle connections until it restarted. The drain
/// command here marks that it ran and then takes 3 s, so patchover is killed inside it.
#[test]
fn r15_sigkill_inside_the_drain_leaves_the_service_keeping_connections_alive() {
    let c = Cycle::new(
        2,
        "\n[service]\ndrain = [\"/bin/sh\", \"-c\", \"kill -USR1 $(cat /var/run/patchover-demo.pid) && touch /var/run/po-drained && sleep 3\"]\n",
    );
    c.stamp_bundle();
    c.start_service();
    let client = Client::new(&c.t.bridge, &c.t.client_addr(0));
    let svc = c.t.service();
    let a = c.t.lcs[0].id.clone();
    let keeps_alive = || {
        let s = svc.clone();
        client.run(move || keep_alive_answer(&s))
    };
    assert_eq!(keeps_alive(), "keep-alive", "before the run");
    // SYNs held by the killed patchover are dropped with its queue: their clients retransmit
    // after 1 s (as in the random-point tests).
    let load = Load::with_deadline(&client, svc.clone(), Duration::from_secs(7));
    let mut child = spawn_patch(&c, &a, "readdress");
    let start = Instant::now();
    while !c
        .t
        .po(&["lc", "exec", &a, "--", "test", "-e", "/var/run/po-drained"])
        .status
        .success()
    {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before its drain"
        );
        assert!(start.elapsed() < Duration::from_secs(90), "no drain came");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    let _ = child.wait();
    let outcome = c.t.recovered_outcome("killed in the drain");
    assert_eq!(outcome, "rolled-back");
    let health = {
        let s = svc.clone();
        client.run(move || common::http_ready(&s, "/health"))
    };
    assert!(
        String::from_utf8_lossy(&health.1).contains(&format!("\"host\":\"{a}\"")),
        "{health:?}"
    );
    assert_eq!(
        keeps_alive(),
        "keep-alive",
        "the recovered service still drains"
    );
    std::thread::sleep(Duration::from_millis(200));
    let (ok, failures, acked) = load.finish();
    assert!(
        failures.is_empty(),
        "{} failed requests of {}: {:?}",
        failures.len(),
        ok,
        &failures[..failures.len().min(10)]
    );
    assert_all_there(&client, &svc, &acked);
}

/// The `Connection` header of the answer to a keep-alive `GET /version` on a new connection.
fn keep_alive_answer(service: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect((service, 80)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /version HTTP/1.1\r\nHost: s\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "closed without an answer: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got)
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("connection:")
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default()
}

fn env_or(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `points` patch cycles in `mode`, each SIGKILLed after a random delay below
/// `max_delay`.
fn crash_at_random_points(c: Cycle, points: u32, max_delay: Duration, mode: &str) {
    let seed = std::env::var("PATCHOVER_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("crash points: {points}, seed: {seed} (rerun with PATCHOVER_CRASH_SEED={seed})");
    let mut rng = Rng(seed);

    // An idempotent patch, so that every cycle can apply it again.
    c.stamp_bundle();
    let seamless = mode == "seamless";
    let client = if seamless {
        c.start_seamless()
    } else {
        c.start_service();
        Client::new(&c.t.bridge, &c.t.client_addr(0))
    };
    let svc = c.t.service();
    let load = Load::with_deadline(&client, svc.clone(), Duration::from_secs(7));
    // Kept-alive connections are what a hand-off holds and forwards.
    let kept = seamless.then(|| KeepAlive::start(&client, svc.clone(), Duration::from_secs(7)));

    let mut outcomes = Vec::new();
    let mut incomplete_refused = 0;
    for i in 0..points {
        let list = c.t.po_json(&["lc", "list"]);
        let active = list
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["role"] == "active")
            .expect("an active LC")["id"]
            .as_str()
            .unwrap()
            .to_owned();
        c.t.po_ok(&["patches", "mark", "stamp-1"]);
        // A kill before the run is journaled (during the checks that change nothing) is a
        // point like any other, with no run of its own: never mistake an earlier run for it.
        let last_run_before = last_run_id(&c);
        let delay = Duration::from_millis(rng.below(max_delay.as_millis() as u64));
        let mut child = Command::new(BIN)
            .env("PATCHOVER_CONFIG", &c.t.config)
            .env("PATCHOVER_GUEST_DIR", guest_dir())
            .args(["--json", "patch", &active, "--mode", mode])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        let mut finished = false;
        while start.elapsed() < delay {
            if child.try_wait().unwrap().is_some() {
                finished = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if !finished {
            child.kill().unwrap();
        }
        let killed_at = common::unix_ms();
        let out = child.wait_with_output().unwrap();
        if finished {
            // A run that ended by itself must have ended well: a crash test whose runs all fail
            // at once would prove nothing.
            let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            assert_eq!(
                r["outcome"], "ok",
                "point {i}: the run ended by itself: {r:#}"
            );
        }
        // The run guard starts the recovery the moment patchover dies; `runs recover` does it
        // too, and returns empty while the guard holds the run.
        let t = Instant::now();
        let mut recovered = serde_json::Value::Array(Vec::new());
        loop {
            let r = c.t.po_json(&["runs", "recover"]);
            if r.as_array().is_some_and(|a| !a.is_empty()) {
                recovered = r;
            }
            let runs = c.t.po_json(&["runs", "list"]);
            if runs
                .as_array()
                .unwrap()
                .iter()
                .all(|r| !r["ended_ms"].is_null())
            {
                if recovered.as_array().is_some_and(|a| a.is_empty())
                    && !finished
                    && let Some(this) = runs
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|r| r["id"].as_i64() > last_run_before)
                {
                    recovered = serde_json::json!([{"outcome": this["outcome"]}]);
                }
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "point {i}: an unfinished run is left: {runs:#}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // Exactly one LC runs, and it is the active one, answering on the service address.
        let list = c.t.po_json(&["lc", "list"]);
        let running: Vec<_> = list
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["state"] == "running")
            .collect();
        assert_eq!(running.len(), 1, "point {i} ({delay:?}): {list:#}");
        assert_eq!(running[0]["role"], "active", "point {i}: {list:#}");
        let host = running[0]["id"].as_str().unwrap().to_owned();
        let s = svc.clone();
        let health = client.run(move || common::http_ready(&s, "/health"));
        assert!(
            String::from_utf8_lossy(&health.1).contains(&format!("\"host\":\"{host}\"")),
            "point {i}: {health:?}"
        );
        if c.t.app_image {
            // One block server: the active LC's (a standby's went with it).
            let servers: Vec<String> = std::fs::read_dir(c.t.dir.path().join("run/blockserver"))
                .unwrap()
                .flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(
                servers,
                std::slice::from_ref(&host),
                "point {i}: block servers"
            );
            // A copy cut short is marked incomplete, and no LC boots from it.
            for l in c.t.lcs.iter().filter(|l| l.id != host) {
                let (_, app) = c.t.disks(l);
                if patchover_disk::is_incomplete(&app) {
                    let out = c.t.po(&["lc", "boot", &l.id]);
                    assert_eq!(
                        out.status.code(),
                        Some(2),
                        "point {i}: booted from a partial copy"
                    );
                    incomplete_refused += 1;
                }
            }
        }
        // This point's run, if patchover got as far as opening one.
        let run =
            c.t.po_json(&["runs", "list"])
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["id"].as_i64() > last_run_before)
                .max_by_key(|r| r["id"].as_i64())
                .cloned();
        assert!(
            run.is_some() || !finished,
            "point {i}: the run ended by itself but is not in the journal"
        );
        let outcome = recovered.as_array().unwrap().first().map_or(
            match (finished, &run) {
                (true, _) => "finished",
                (false, Some(_)) => "nothing to recover",
                (false, None) => "killed before its run was journaled",
            }
            .to_owned(),
            |r| r["outcome"].as_str().unwrap_or("?").to_owned(),
        );
        // Where the run was when it died, and when recovery had ended it: a late request
        // lines up with these.
        let (died_in, ended_ms) = match &run {
            None => ("the checks before the run".to_owned(), "-".to_owned()),
            Some(run) => {
                let steps = c.t.po_json(&["runs", "show", &run["id"].to_string()]);
                let died_in = steps["steps"]
                    .as_array()
                    .and_then(|s| s.iter().rev().find(|s| s["step"] != "recover"))
                    .map(|s| {
                        format!(
                            "{}:{} (unix ms {})",
                            s["step"].as_str().unwrap_or("?"),
                            s["state"].as_str().unwrap_or("?"),
                            s["at_ms"]
                        )
                    })
                    .unwrap_or_else(|| "the run's start".to_owned());
                (died_in, run["ended_ms"].to_string())
            }
        };
        eprintln!(
            "point {i}: killed after {delay:?} (unix ms {killed_at}) in {died_in} -> {outcome} (ended at unix ms {ended_ms}), service on {host}"
        );
        outcomes.push(outcome);
    }
    std::thread::sleep(Duration::from_millis(200));
    let (ok, failures, acked) = load.finish();
    // What each recovery did and when, to line up with a failed request.
    let log = std::fs::read_to_string(c.t.dir.path().join("run/run-guard.log"));
    eprintln!("run guard's log:\n{}", log.unwrap_or_default());
    assert!(
        failures.is_empty(),
        "{} failed requests of {}: {:?}",
        failures.len(),
        ok,
        &failures[..failures.len().min(10)]
    );
    assert_all_there(&client, &svc, &acked);
    if let Some(kept) = kept {
        let (k_ok, k_failures, k_acked, moved) = kept.finish();
        assert!(
            k_failures.is_empty(),
            "kept-alive: {} failed of {}: {:?}",
            k_failures.len(),
            k_ok,
            &k_failures[..k_failures.len().min(10)]
        );
        assert_all_there(&client, &svc, &k_acked);
        eprintln!("kept-alive: {k_ok} requests, {moved} forwarded by a parked service");
    }
    eprintln!(
        "outcomes: {outcomes:?}; {ok} requests, none failed; {incomplete_refused} boots from a partial copy refused"
    );
}
