//! The load generator against real servers on loopback: every outcome kind is seen as what it is.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use patchover_load::server::RefServer;
use patchover_load::{ConnMode, LoadConfig, run};

fn cfg(addr: SocketAddr, rate: f64, ms: u64, conns: ConnMode) -> LoadConfig {
    LoadConfig::for_url(
        &format!("http://{addr}/version"),
        rate,
        Duration::from_millis(ms),
        conns,
    )
    .unwrap()
}

fn local_server(id: &str) -> RefServer {
    RefServer::start(None, "127.0.0.1:0".parse().unwrap(), id).unwrap()
}

#[test]
fn all_ok_in_every_connection_mode() {
    let srv = local_server("v1");
    for conns in [ConnMode::New, ConnMode::Keepalive, ConnMode::Mixed] {
        let r = run(&cfg(srv.addr, 500.0, 1000, conns)).unwrap();
        assert_eq!(r.summary.total, 500, "{conns:?}");
        assert_eq!(r.summary.ok, 500, "{conns:?}: {:?}", r.summary.failed);
        assert!(r.summary.latency.p50_ms > 0.0);
        assert_eq!(r.timeline.len(), 1);
        assert_eq!(r.timeline[0].sent, 500);
        assert!(r.samples.windows(2).all(|w| w[0].due_us <= w[1].due_us));
    }
    assert!(srv.served() >= 1500);
}

#[test]
fn nothing_listening_is_refused() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let r = run(&cfg(addr, 200.0, 250, ConnMode::New)).unwrap();
    assert_eq!(r.summary.total, 50);
    assert_eq!(r.summary.failed.refused, 50, "{:?}", r.summary.failed);
}

#[test]
fn a_server_that_never_answers_times_out() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let _accepting = std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().take(20) {
            held.push(s);
        }
        std::thread::sleep(Duration::from_secs(2));
    });
    let mut c = cfg(addr, 100.0, 100, ConnMode::New);
    c.deadline = Duration::from_millis(300);
    let r = run(&c).unwrap();
    assert_eq!(r.summary.total, 10);
    assert_eq!(r.summary.failed.timeout, 10, "{:?}", r.summary.failed);
    assert!(r.summary.latency.max_ms >= 299.0 && r.summary.latency.max_ms < 400.0);
}

#[test]
fn server_errors_and_resets_are_counted_by_kind() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for (i, s) in l.incoming().enumerate().take(20) {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            if i % 2 == 0 {
                let _ = s.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            } else {
                // Close with half an answer.
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort");
            }
        }
    });
    let r = run(&cfg(addr, 100.0, 200, ConnMode::New)).unwrap();
    assert_eq!(r.summary.total, 20);
    assert_eq!(r.summary.failed.status_5xx, 10, "{:?}", r.summary.failed);
    assert_eq!(r.summary.failed.reset, 10, "{:?}", r.summary.failed);
    assert_eq!(r.summary.ok, 0);
}

#[test]
fn draining_keepalive_server_causes_no_failure() {
    let srv = local_server("v1");
    let addr = srv.addr;
    let load =
        std::thread::spawn(move || run(&cfg(addr, 1000.0, 1500, ConnMode::Keepalive)).unwrap());
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(200));
        srv.drain();
        std::thread::sleep(Duration::from_millis(50));
        srv.resume();
    }
    let r = load.join().unwrap();
    assert_eq!(r.summary.total, 1500);
    assert_eq!(r.summary.failed_total, 0, "{:?}", r.summary.failed);
}

/// A run with a long duration ends when its stop flag is set: requests already sent finish
/// and are counted, none is sent after, and the report says how long it really ran.
#[test]
fn a_stopped_run_ends_early_and_counts_what_it_sent() {
    let srv = local_server("v1");
    let c = cfg(srv.addr, 200.0, 60_000, ConnMode::Mixed);
    let stop = c.stop.clone();
    let started = std::time::Instant::now();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        stop.stop();
    });
    let r = run(&c).unwrap();
    stopper.join().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!((50..=200).contains(&r.summary.total), "{}", r.summary.total);
    assert_eq!(r.summary.ok, r.summary.total, "{:?}", r.summary.failed);
    assert!(r.duration_s < 5.0, "{}", r.duration_s);
    assert!(r.achieved_rate > 100.0, "{}", r.achieved_rate);
}
