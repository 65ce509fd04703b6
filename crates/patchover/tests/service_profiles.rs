//! Issue 20, item 5: the service profiles docs/services.md shows, each taken from the page and
//! run with a real service through a patch cycle. (nginx's is the nginx demo's own config, run
//! by `demo_nginx.rs`; a unit test checks the page holds exactly it.)

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::Client;
use common::cycle::Cycle;

/// The ```toml block under `heading` in docs/services.md.
fn documented_profile(heading: &str) -> String {
    let doc = include_str!("../../../docs/services.md");
    let at = doc
        .find(heading)
        .unwrap_or_else(|| panic!("docs/services.md has no {heading:?}"));
    let rest = &doc[at..];
    let start = rest.find("```toml\n").expect("a toml block") + "```toml\n".len();
    let end = rest[start..].find("```").expect("the block's end");
    rest[start..start + end].to_owned()
}

/// A plain TCP echo server, not HTTP (busybox `nc`, a process per connection): the generic
/// TCP profile's service.
const ECHO: &str = "#!/bin/sh\ncase \"$1\" in\n  start) nc -ll -p 7000 -e /bin/cat </dev/null >/dev/null 2>&1 & ;;\nesac\n";

/// One line sent and echoed back on a new connection, within `deadline`.
fn echo(addr: &str, line: &str, deadline: Duration) -> Result<(), String> {
    let sa = addr.parse().map_err(|e| format!("{e}"))?;
    let mut s = TcpStream::connect_timeout(&sa, deadline).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(deadline))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut got = String::new();
    BufReader::new(&s)
        .read_line(&mut got)
        .map_err(|e| format!("read: {e}"))?;
    match got.trim_end() == line {
        true => Ok(()),
        false => Err(format!("echoed {got:?} for {line:?}")),
    }
}

/// The generic TCP profile (a `tcp` check, no HTTP anywhere) carries an echo server through a
/// patch cycle under a client that opens a connection per exchange, each with a 2 s deadline:
/// no exchange fails, and afterwards the echo comes from the new LC (the old one is stopped).
#[test]
fn a_generic_tcp_service_is_patched_with_its_documented_profile() {
    let profile = documented_profile("### A generic TCP service");
    assert!(profile.contains("kind = \"tcp\""), "{profile}");
    let c = Cycle::new(2, &format!("\n{profile}"));
    let script = c.t.lcs[0].sys.join("etc/init.d/S60echo");
    fs::write(&script, ECHO).unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    c.upgrade_bundle();
    let (a, b) = (c.t.lcs[0].id.clone(), c.t.lcs[1].id.clone());
    c.start_service();
    let client = Client::new(&c.t.bridge, &c.t.client_addr(0));
    let svc = format!("{}:7000", c.t.service());
    let s = svc.clone();
    client.run(move || {
        let until = Instant::now() + Duration::from_secs(20);
        while echo(&s, "ready?", Duration::from_secs(1)).is_err() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(100));
        }
    });

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (stop, s) = (stop.clone(), svc.clone());
        client.spawn(move || {
            let (mut ok, mut errors) = (0u64, Vec::new());
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                match echo(&s, &format!("exchange {n}"), Duration::from_secs(2)) {
                    Ok(()) => ok += 1,
                    Err(e) => errors.push(e),
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            (ok, errors)
        })
    };
    let report = c.t.po_json(&["patch", &a]);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let (ok, errors) = load.join().unwrap();
    eprintln!("echo exchanges: {ok} ok, {} failed", errors.len());
    assert_eq!(report["outcome"], "ok", "{report:#}");
    assert!(errors.is_empty(), "{:?}", &errors[..errors.len().min(5)]);
    assert!(ok > 20, "{ok}");
    assert_eq!(c.t.po_json(&["lc", "status", &a])["state"], "stopped");
    assert_eq!(c.t.po_json(&["lc", "status", &b])["state"], "running");
    let s = svc.clone();
    client
        .run(move || echo(&s, "after", Duration::from_secs(2)))
        .unwrap();
}
