//! An LC is untrusted: root inside the active LC plants what an attacker would — links at every
//! path patchover writes, links to host secrets, FIFOs, a directory that flips to a link during
//! the copy, a forged patch report, a replaced agent socket — and then a real `patchover patch`
//! runs. Each test asserts that nothing on the host changed (a canary tree hashed before and
//! after, and a host socket nobody may connect to), that nothing of the host leaked into the
//! standby, and that the run either succeeded without leaving the LC's root or failed cleanly
//! with the service untouched on the active LC.
//!
//! Attacks (numbered as the asserts name them):
//!  1 `/etc/init.d/S05patchover` → host file (absolute link)
//!  2 `/var/lib/patchover-agent/patchover-agent` → host file
//!  3 `/var/lib/patchover-agent/table.json` → host file
//!  4 `/var/lib/patchover-agent/bundles` → host directory
//!  5 `/var/lib/patchover-agent/keys` → host directory (relative link climbing out)
//!  6 `/root/leak` → host secret (absolute), on the copy's source side
//!  7 `/root/leak-rel` → host secret (relative)
//!  8 `/root/leak-dir` → host directory
//!  9 a FIFO where the malware scan and the copy expect a file
//! 10 a directory flipping to a link to a host directory during the copy
//! 11 links on the standby's own disk before the run (clearing the disk must not follow them)
//! 12 `/var/lib` → host directory (a parent of what patchover writes)
//! 13 a forged report with no bundle (the boot script's report replaced before it runs)
//! 14 a forged report naming a bundle this run did not stage
//! 15 the agent socket replaced by a link to a host socket (and the real agent kept from starting)
//! The systemd unit branch and an agent message dripped slowly are tested where they live
//! (`patchover-orchestrator` install tests, `patchover-agent` client tests).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::cycle::{Cycle, Load, assert_all_there, version};
use common::{Client, unique};

/// Host files an attacker wants: each holds `marker`, so a leak is found by content.
struct Canary {
    dir: PathBuf,
    marker: String,
    connections: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl Canary {
    fn new() -> Canary {
        let marker = format!("CANARY-{}", unique());
        let dir = PathBuf::from(format!("/tmp/po-{marker}"));
        fs::create_dir_all(dir.join("sub")).unwrap();
        fs::write(
            dir.join("passwd"),
            format!("root:x:0:0:{marker}:/root:/bin/sh\n"),
        )
        .unwrap();
        fs::write(dir.join("secret"), format!("{marker} secret\n")).unwrap();
        fs::write(dir.join("sub/file"), format!("{marker} in a directory\n")).unwrap();
        // A host socket: nothing patchover does may connect to it.
        let listener = UnixListener::bind(dir.join("host.sock")).unwrap();
        listener.set_nonblocking(true).unwrap();
        let connections = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (n, s) = (connections.clone(), stop.clone());
        let acceptor = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok(_) => {
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Canary {
            dir,
            marker,
            connections,
            stop,
            acceptor: Some(acceptor),
        }
    }

    fn path(&self, rel: &str) -> String {
        self.dir.join(rel).display().to_string()
    }

    /// Every entry of the canary tree: its kind, content or link target, mode and mtime.
    fn state(&self) -> BTreeMap<PathBuf, String> {
        let mut out = BTreeMap::new();
        let mut stack = vec![self.dir.clone()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let md = fs::symlink_metadata(&p).unwrap();
                let ft = md.file_type();
                let what = if ft.is_dir() {
                    stack.push(p.clone());
                    "dir".to_owned()
                } else if ft.is_file() {
                    format!("file {:?}", fs::read(&p).unwrap())
                } else if ft.is_symlink() {
                    format!("link {:?}", fs::read_link(&p).unwrap())
                } else if ft.is_socket() {
                    "socket".to_owned()
                } else {
                    "other".to_owned()
                };
                out.insert(
                    p,
                    format!("{what} mode {:o} mtime {}", md.mode(), md.mtime_nsec()),
                );
            }
        }
        out
    }

    fn assert_untouched(&self, before: &BTreeMap<PathBuf, String>) {
        assert_eq!(&self.state(), before, "the host's canary tree changed");
        assert_eq!(
            self.connections.load(Ordering::Relaxed),
            0,
            "something connected to the host's canary socket"
        );
    }

    /// No regular file under `root` (a disk seen from the host) holds the canary's content.
    fn assert_not_in(&self, root: &Path) {
        let mut stack = vec![root.to_owned()];
        while let Some(d) = stack.pop() {
            let Ok(rd) = fs::read_dir(&d) else { continue };
            for e in rd.flatten() {
                let p = e.path();
                let Ok(md) = fs::symlink_metadata(&p) else {
                    continue;
                };
                if md.is_dir() {
                    stack.push(p);
                } else if md.is_file() && md.len() < (64 << 20) {
                    let data = fs::read(&p).unwrap_or_default();
                    assert!(
                        !String::from_utf8_lossy(&data).contains(&self.marker),
                        "host data leaked into {}",
                        p.display()
                    );
                }
            }
        }
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Runs `script` as root inside `lc`.
fn inside(c: &Cycle, lc: &str, script: &str) -> String {
    c.t.po_ok(&["lc", "exec", lc, "--", "sh", "-c", script])
}

/// The run's JSON report and exit code.
fn patch(c: &Cycle, lc: &str) -> (Option<i32>, serde_json::Value) {
    let out = c.t.po(&["--json", "patch", lc]);
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code(), report)
}

/// The service answers from `lc`, with `version`.
fn assert_served_by(client: &Client, svc: &str, lc: &str, want_version: &str) {
    let s = svc.to_owned();
    let health = client.run(move || common::http_ready(&s, "/health"));
    assert!(
        String::from_utf8_lossy(&health.1).contains(&format!("\"host\":\"{lc}\"")),
        "served by another LC than {lc}: {health:?}"
    );
    assert_eq!(version(client, svc), want_version);
}

fn failed_step(report: &serde_json::Value) -> Vec<String> {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["ok"] == false)
        .map(|s| s["step"].as_str().unwrap().to_owned())
        .collect()
}

/// A boot script planted in the active LC: it is copied with the disk and runs on the standby
/// before patchover's own script (S05) and the agent (S10).
fn plant_boot_script(c: &Cycle, lc: &str, body: &str) {
    inside(
        c,
        lc,
        &format!(
            "cat > /etc/init.d/S04evil <<'EOF'\n#!/bin/sh\ncase \"$1\" in start)\n{body}\n;; esac\nexit 0\nEOF\nchmod 755 /etc/init.d/S04evil"
        ),
    );
}

/// Two LCs, the service on the first with the upgrade marked, a client, and a host canary.
struct Scene {
    c: Cycle,
    a: String,
    b: String,
    client: Client,
    svc: String,
    canary: Canary,
    before: BTreeMap<PathBuf, String>,
}

impl Scene {
    fn new(extra: &str) -> Scene {
        let c = Cycle::new(2, extra);
        c.upgrade_bundle();
        c.start_service();
        let (a, b) = (c.t.lcs[0].id.clone(), c.t.lcs[1].id.clone());
        let client = Client::new(&c.t.bridge, &c.t.client_addr(0));
        let svc = c.t.service();
        let canary = Canary::new();
        let before = canary.state();
        Scene {
            c,
            a,
            b,
            client,
            svc,
            canary,
            before,
        }
    }

    /// `patchover patch` on the active LC under load; whatever the run's outcome, the host's
    /// canary is untouched, no request failed and every acknowledged write is served.
    fn patch_under_load(&self) -> (Option<i32>, serde_json::Value) {
        let load = Load::start(&self.client, self.svc.clone());
        let (code, report) = patch(&self.c, &self.a);
        let (ok, failures, acked) = load.finish();
        self.canary.assert_untouched(&self.before);
        assert!(failures.is_empty() && ok > 0, "{failures:?}");
        assert_all_there(&self.client, &self.svc, &acked);
        (code, report)
    }
}

#[test]
fn links_planted_in_the_active_lc_never_lead_patchover_out_of_it() {
    let rules = tempfile::tempdir().unwrap();
    fs::write(
        rules.path().join("t.yar"),
        "rule never_here { strings: $a = \"NOT-ON-ANY-DISK-7f3a\" condition: $a }",
    )
    .unwrap();
    // The LC below flips a link as fast as its shell goes for the whole run (10), a hostile
    // CPU load beside the standby's service: on a loaded 2-core CI host the service took more
    // than the default 2 s to accept the switch's check once (the switch was rolled back,
    // safely). A service beside such a neighbour gets a longer check, as an operator would
    // configure it.
    let s = Scene::new(&format!(
        "\n[yara]\nrules = \"{}\"\n\n[service]\nhealth = {{ kind = \"http\", path = \"/health\", body = \"\\\"status\\\":\\\"ok\\\"\", patience_secs = 10 }}\n",
        rules.path().display()
    ));
    let (c, a, b, canary) = (&s.c, &s.a, &s.b, &s.canary);
    let up = "../../../../../../../../../..";
    inside(
        c,
        a,
        &format!(
            "set -e
            ln -sfn {passwd} /etc/init.d/S05patchover                       # 1
            mkdir -p /var/lib/patchover-agent /root
            ln -sfn {passwd} /var/lib/patchover-agent/patchover-agent       # 2
            ln -sfn {secret} /var/lib/patchover-agent/table.json            # 3
            ln -sfn {sub} /var/lib/patchover-agent/bundles                  # 4
            ln -sfn {up}{sub} /var/lib/patchover-agent/keys                 # 5
            ln -sfn {secret} /root/leak                                     # 6
            ln -sfn {up}{secret} /root/leak-rel                             # 7
            ln -sfn {dir} /root/leak-dir                                    # 8
            mkfifo /usr/bin/fifo-trap /root/fifo-trap                       # 9
            ",
            passwd = canary.path("passwd"),
            secret = canary.path("secret"),
            sub = canary.path("sub"),
            dir = canary.dir.display(),
        ),
    );
    // 10: flips /srv/flip between a directory with a file and a link to the host's directory,
    // as fast as the shell goes, for the whole run; counts its flips.
    inside(
        c,
        a,
        &format!(
            "mkdir -p /srv; (n=0; while :; do rm -rf /srv/flip; mkdir /srv/flip; echo inside > /srv/flip/file; \
             rm -rf /srv/flip; ln -s {sub} /srv/flip; n=$((n+1)); echo $n > /srv/flips.tmp; mv /srv/flips.tmp /srv/flips; done) \
             >/dev/null 2>&1 &",
            sub = canary.path("sub")
        ),
    );
    // 11: links on the standby's disk (left by whatever ran there before).
    let bsys = c.t.lcs[1].sys.clone();
    fs::create_dir_all(bsys.join("etc")).unwrap();
    std::os::unix::fs::symlink(&canary.dir, bsys.join("hostdir")).unwrap();
    std::os::unix::fs::symlink(canary.dir.join("passwd"), bsys.join("etc/passwd")).unwrap();

    // Read on the host (the old LC is stopped after the switch); a test may read its own disk.
    let asys = c.t.lcs[0].sys.clone();
    let flips = |_: &Cycle| -> u64 {
        fs::read_to_string(asys.join("srv/flips"))
            .unwrap_or_default()
            .trim()
            .parse()
            .unwrap_or(0)
    };
    let flips_before = flips(c);
    let (code, report) = s.patch_under_load();
    let flips_during = flips(c) - flips_before;
    eprintln!("10: {flips_during} flips of /srv/flip during the run");

    canary.assert_not_in(&bsys);
    canary.assert_not_in(&c.t.lcs[1].app);
    assert_eq!(code, Some(0), "{report:#}");
    assert_eq!(report["standby"], b.as_str());
    assert_served_by(&s.client, &s.svc, b, "1.0.1");
    assert!(
        flips_during > 10,
        "the race never ran: {flips_during} flips"
    );
    // The links are copied as the links they are (the standby's own business), never followed.
    for (p, target) in [
        ("root/leak", canary.path("secret")),
        ("root/leak-rel", format!("{up}{}", canary.path("secret"))),
        ("root/leak-dir", canary.dir.display().to_string()),
    ] {
        assert_eq!(
            fs::read_link(bsys.join(p)).unwrap(),
            Path::new(&target),
            "{p}"
        );
    }
    assert!(
        fs::symlink_metadata(bsys.join("usr/bin/fifo-trap"))
            .unwrap()
            .file_type()
            .is_fifo()
    );
    // Patchover's own files on the standby are what it wrote, not links (1–5 replaced).
    let script = fs::symlink_metadata(bsys.join("etc/init.d/S05patchover")).unwrap();
    assert!(script.is_file(), "the init script is a file on the standby");
    assert!(
        fs::symlink_metadata(bsys.join("var/lib/patchover-agent"))
            .unwrap()
            .is_dir()
    );
    // 11: the standby's old links went with the clearing; the host kept what they pointed at.
    assert!(fs::symlink_metadata(bsys.join("hostdir")).is_err());
}

#[test]
fn a_parent_directory_link_fails_the_run_cleanly() {
    let s = Scene::new("");
    let (c, a, b, canary) = (&s.c, &s.a, &s.b, &s.canary);
    // 12: /var/lib is a link to the host's directory (absolute). Inside the LC it points at
    // nothing; patchover must resolve it as the LC would and never reach the host's.
    inside(
        c,
        a,
        &format!(
            "set -e; rm -rf /var/lib; ln -s {} /var/lib",
            canary.path("sub")
        ),
    );
    let (code, report) = s.patch_under_load();
    canary.assert_not_in(&c.t.lcs[1].sys);
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(failed_step(&report), ["install_patches"], "{report:#}");
    let err = report["error"].as_str().unwrap();
    assert!(
        err.contains("inside the LC root") && err.contains("var/lib"),
        "{err}"
    );
    assert_served_by(&s.client, &s.svc, a, "1.0.0");
    assert_eq!(c.t.po_json(&["lc", "status", b])["state"], "stopped");
}

#[test]
fn a_forged_report_is_refused_and_nothing_of_it_is_recorded() {
    let s = Scene::new("");
    let (c, a) = (&s.c, &s.a);
    // The planted script reads the run and LC from the table patchover staged and writes the
    // report before the real script runs (which then finds "its" report and stops).
    let forge = |bundles: &str| {
        format!(
            "d=/var/lib/patchover-agent; [ -f $d/table.json ] || exit 0
             run=$(sed -n 's/.*\"run_id\": *\"\\([^\"]*\\)\".*/\\1/p' $d/table.json | head -n1)
             lc=$(sed -n 's/.*\"lc\": *\"\\([^\"]*\\)\".*/\\1/p' $d/table.json | head -n1)
             printf '{{\"run_id\":\"%s\",\"lc\":\"%s\",\"all_ok\":true,\"bundles\":[{bundles}]}}' \"$run\" \"$lc\" > $d/report.json"
        )
    };
    let evil = r#"{"id":"evil","status":"ok","exit_code":0,"output":"","duration_ms":1,"step":null,"error":null}"#;
    // 13, 14
    for (n, bundles, why) in [
        (13, String::new(), "this run staged"),
        (14, evil.to_owned(), "\"evil\""),
    ] {
        plant_boot_script(c, a, &forge(&bundles));
        let (code, report) = s.patch_under_load();
        assert_eq!(code, Some(1), "{n}: {report:#}");
        assert_eq!(failed_step(&report), ["patch_report"], "{n}: {report:#}");
        let err = report["error"].as_str().unwrap();
        assert!(
            err.contains("report is refused") && err.contains(why),
            "{n}: {err}"
        );
        assert_served_by(&s.client, &s.svc, a, "1.0.0");
        let p = c.t.po_json(&["patches", "show", "demo-1.0.1"]);
        assert_ne!(p["last_result"], "ok", "{n}: {p}");
        assert!(
            c.t.po(&["patches", "show", "evil"]).status.code() != Some(0),
            "{n}: a bundle the LC named was recorded"
        );
    }
}

#[test]
fn a_replaced_agent_socket_is_never_followed_to_the_host() {
    let s = Scene::new("");
    let (c, a) = (&s.c, &s.a);
    // 15: on the standby, the agent's socket is a link to a host socket (the directory is
    // bound writable into the LC), and the real agent is kept from starting, so that the link
    // is all patchover can meet there (a race with a live agent would make the test a lottery).
    plant_boot_script(
        c,
        a,
        &format!(
            "chmod -x /etc/init.d/S10agent; rm -f /run/patchover-agent/agent.sock; ln -s {} /run/patchover-agent/agent.sock",
            s.canary.path("host.sock")
        ),
    );
    let (code, report) = s.patch_under_load();
    // Patchover stops at the link: the run fails at the standby's boot, says why, and the
    // service stays (the canary socket saw no connection: checked by patch_under_load).
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(failed_step(&report), ["boot_standby"], "{report:#}");
    let err = report["error"].as_str().unwrap();
    assert!(err.contains("not a socket"), "{err}");
    assert_served_by(&s.client, &s.svc, a, "1.0.0");
}
