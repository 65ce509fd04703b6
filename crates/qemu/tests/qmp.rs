//! The QMP client against a real QEMU, and against fake servers for the hang cases.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use common::QemuGuard;
use patchover_qemu::{Qmp, QmpError, RunState};
use serde_json::{Value, json};

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": []}}"#;

#[test]
fn connects_negotiates_and_reports_status_and_events() {
    let q = QemuGuard::start(1 << 20, &vec![0u8; 1 << 20]);
    let mut qmp = q.connect();
    assert_eq!(qmp.greeting()["version"]["qemu"]["major"], 7);
    assert_eq!(qmp.query_status().unwrap(), RunState::Prelaunch); // -S

    qmp.cont().unwrap();
    assert_eq!(qmp.query_status().unwrap(), RunState::Running);
    let resume = qmp
        .wait_event(|e| e.name == "RESUME", Duration::from_secs(5))
        .unwrap();
    assert!(resume.timestamp.is_some());
    qmp.stop().unwrap();
    let stop = qmp
        .wait_event(|e| e.name == "STOP", Duration::from_secs(5))
        .unwrap();
    assert!(stop.timestamp.is_some());
    assert_eq!(qmp.query_status().unwrap(), RunState::Paused);
    qmp.cont().unwrap();
    assert_eq!(qmp.query_status().unwrap(), RunState::Running);
    // RESUME arrived while cont/query-status waited: it is in the queue, not lost.
    let events = qmp.drain_events();
    assert!(
        events.iter().any(|e| e.name == "RESUME"),
        "RESUME missing from {events:?}"
    );
    assert!(qmp.drain_events().is_empty());

    let nodes = qmp
        .execute("query-named-block-nodes", json!({ "flat": true }))
        .unwrap();
    assert!(
        nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node-name"] == "src")
    );
    assert!(qmp.query_block_jobs().unwrap().is_empty());
}

#[test]
fn command_errors_are_mapped() {
    let q = QemuGuard::start(1 << 20, &vec![0u8; 1 << 20]);
    let mut qmp = q.connect();
    match qmp.blockdev_del("no-such-node") {
        Err(QmpError::Command { cmd, class, desc }) => {
            assert_eq!(cmd, "blockdev-del");
            assert_eq!(class, "GenericError");
            assert!(desc.contains("no-such-node"), "{desc}");
        }
        other => panic!("expected a command error, got {other:?}"),
    }
    match qmp.execute("no-such-command", Value::Null) {
        Err(e @ QmpError::Command { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("CommandNotFound"), "{msg}");
            assert!(msg.contains("no-such-command"), "{msg}");
        }
        other => panic!("expected a command error, got {other:?}"),
    }
    // The session is still usable after errors.
    assert_eq!(qmp.query_status().unwrap(), RunState::Prelaunch);
}

#[test]
fn eof_when_qemu_is_killed() {
    let mut q = QemuGuard::start(1 << 20, &vec![0u8; 1 << 20]);
    let mut qmp = q.connect();
    q.kill();
    let start = Instant::now();
    let err = qmp.query_status().unwrap_err();
    assert!(matches!(err, QmpError::Eof { .. }), "{err:?}");
    assert!(err.to_string().contains("exited"), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "EOF must not wait for the timeout"
    );
    assert!(qmp.is_closed());
    // Later calls fail the same way, at once.
    assert!(matches!(qmp.stop(), Err(QmpError::Eof { .. })));
    assert!(matches!(
        qmp.wait_event(|_| true, Duration::from_secs(5)),
        Err(QmpError::Eof { .. })
    ));
}

#[test]
fn quit_ends_qemu_and_events_before_eof_are_kept() {
    let mut q = QemuGuard::start(1 << 20, &vec![0u8; 1 << 20]);
    let mut qmp = q.connect();
    qmp.quit().unwrap();
    let status = q.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let ev = qmp
        .wait_event(|e| e.name == "SHUTDOWN", Duration::from_secs(5))
        .unwrap();
    assert_eq!(ev.str("reason"), Some("host-qmp-quit"));
}

#[test]
fn connect_fails_clearly_when_nothing_listens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let start = Instant::now();
    let err = Qmp::connect(&path, Duration::from_millis(300)).unwrap_err();
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert!(matches!(err, QmpError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("may not be running"), "{err}");
}

#[test]
fn connect_waits_for_a_late_socket() {
    // QEMU creates its socket a moment after it starts: connect retries.
    let q = QemuGuard::start(1 << 20, &vec![0u8; 1 << 20]);
    let mut qmp = Qmp::connect(&q.qmp_path, Duration::from_secs(10)).unwrap();
    assert_eq!(qmp.query_status().unwrap(), RunState::Prelaunch);
}

#[test]
fn connect_now_takes_a_running_qemu_and_does_not_wait_for_an_absent_one() {
    // Recovery's check for leftover block jobs: a monitor that listens answers at once, and
    // its commands get the full reply timeout (not the zero wait of the connect).
    let q = QemuGuard::start(1 << 20, &vec![0u8; 1 << 20]);
    drop(Qmp::connect(&q.qmp_path, Duration::from_secs(10)).unwrap()); // it listens now
    let mut qmp = Qmp::connect_now(&q.qmp_path, Duration::from_secs(10)).unwrap();
    assert_eq!(qmp.query_status().unwrap(), RunState::Prelaunch);
    assert!(qmp.query_block_jobs().unwrap().is_empty());
    // Nothing listens: refused at once, not after the 10 s.
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let err = Qmp::connect_now(&dir.path().join("none.sock"), Duration::from_secs(10)).unwrap_err();
    assert!(matches!(err, QmpError::Connect { .. }), "{err:?}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

/// A fake QMP server: sends the greeting, then hands each request line to `answer`, which
/// returns the lines to send back (after an optional delay).
fn fake_server(
    path: &std::path::Path,
    answer: impl Fn(&Value) -> (Duration, Vec<String>) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut w = stream.try_clone().unwrap();
        writeln!(w, "{GREETING}").unwrap();
        let mut r = BufReader::new(stream);
        let mut line = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let req: Value = serde_json::from_str(&line).unwrap();
            let (delay, lines) = answer(&req);
            let mut w = w.try_clone().unwrap();
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                for l in lines {
                    let _ = writeln!(w, "{l}");
                }
            });
        }
    })
}

fn reply(req: &Value, ret: Value) -> String {
    json!({ "return": ret, "id": req["id"] }).to_string()
}

#[test]
fn timeout_when_the_greeting_comes_but_capabilities_never_answer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let _srv = fake_server(&path, |_| (Duration::ZERO, vec![]));
    let start = Instant::now();
    let err = Qmp::connect(&path, Duration::from_millis(400)).unwrap_err();
    match &err {
        QmpError::Timeout { cmd, .. } => assert_eq!(cmd, "qmp_capabilities"),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(err.to_string().contains("stopped answering"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[test]
fn timeout_when_qemu_goes_silent_and_a_late_reply_is_not_taken_for_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let _srv = fake_server(&path, |req| {
        match req["execute"].as_str().unwrap() {
        "qmp_capabilities" => (Duration::ZERO, vec![reply(req, json!({}))]),
        // Answers 800 ms late: after the client gave up.
        "query-status" => (
            Duration::from_millis(800),
            vec![reply(req, json!({ "status": "paused", "running": false }))],
        ),
        "query-block-jobs" => (
            Duration::from_millis(900),
            vec![
                r#"{"event": "BLOCK_JOB_READY", "data": {"device": "j"}, "timestamp": {"seconds": 1, "microseconds": 2}}"#.to_string(),
                reply(req, json!([])),
            ],
        ),
        "silent" => (Duration::from_secs(3600), vec![]),
        other => panic!("unexpected {other}"),
    }
    });
    let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
    qmp.set_timeout(Duration::from_millis(300));
    let start = Instant::now();
    let err = qmp.query_status().unwrap_err();
    let waited = start.elapsed();
    match &err {
        QmpError::Timeout { cmd, after, .. } => {
            assert_eq!(cmd, "query-status");
            assert_eq!(*after, Duration::from_millis(300));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_millis(700),
        "{waited:?}"
    );
    // The late query-status reply arrives while this call waits: it must be dropped, and this
    // call must get its own answer (an empty job list), with the event queued.
    qmp.set_timeout(Duration::from_secs(3));
    assert_eq!(qmp.query_block_jobs().unwrap(), vec![]);
    let ev = qmp
        .wait_event(|e| e.name == "BLOCK_JOB_READY", Duration::ZERO)
        .unwrap();
    assert_eq!(ev.job_id(), Some("j"));

    qmp.set_timeout(Duration::from_millis(200));
    assert!(matches!(
        qmp.execute("silent", Value::Null),
        Err(QmpError::Timeout { .. })
    ));
    assert!(matches!(
        qmp.wait_event(|_| true, Duration::from_millis(100)),
        Err(QmpError::EventTimeout { .. })
    ));
}

#[test]
fn garbage_from_the_server_is_a_protocol_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let _srv = fake_server(&path, |req| match req["execute"].as_str().unwrap() {
        "qmp_capabilities" => (Duration::ZERO, vec![reply(req, json!({}))]),
        _ => (Duration::ZERO, vec!["this is not json".to_string()]),
    });
    let mut qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
    let err = qmp.query_status().unwrap_err();
    assert!(matches!(err, QmpError::Protocol { .. }), "{err:?}");
    assert!(err.to_string().contains("not JSON"), "{err}");
}
