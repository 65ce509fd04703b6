//! `patchover bench soak`: patch → rollback cycles under load, and after each cycle a census of
//! what patchover leaves on the host. A resource whose count grows from after the first cycle
//! to after the last is a leak (`leaks` in the JSON is that growth, per resource; a count that
//! went down is not a leak); append-only history (the journal's SQLite files, logs) is
//! reported per cycle instead, since it grows by design.
//!
//! The load is the demo's own client (every request with a deadline, a new connection each):
//! a reader (`GET /version`) and a writer (`PUT /kv/…`) for the whole soak; at the end every
//! acknowledged write must be on the active LC.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::{Context, ShowcaseError};
use patchover_core::BackendKind;
use patchover_net::Mode;
use serde_json::json;

use crate::demo::{self, BRIDGE, NET, Prepared, prepare, teardown};

/// What `patchover bench soak` runs (its options).
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// patch → rollback cycles.
    pub cycles: u32,
    /// The switch mode of every patch and rollback.
    pub mode: Mode,
    /// The kind of LC: `ns` or `qemu`.
    pub backend: BackendKind,
    pub dir: PathBuf,
    /// A request slower than this fails (default 2000 ms on ns, 5000 ms on qemu).
    pub deadline_ms: Option<u64>,
}

/// What one census counts; see [`census`].
type Counts = BTreeMap<&'static str, i64>;

pub fn run(a: SoakOptions, json: bool) -> Result<bool, ShowcaseError> {
    ensure!(
        a.cycles >= 2,
        "--cycles must be at least 2 (leaks are growth after the first)"
    );
    let say = |s: &str| {
        if !json {
            eprintln!("bench soak: {s}");
        }
    };
    let p = prepare(&a.dir, a.backend, a.mode, &say)?;
    let deadline = Duration::from_millis(a.deadline_ms.unwrap_or(match a.backend {
        BackendKind::Ns => 2000,
        BackendKind::Qemu => 5000,
    }));
    let stamp = crate::cycle::import_stamp_bundle(&a.dir, &p)?;
    let exe = std::env::current_exe()?;
    let po = |args: &[&str]| -> Result<serde_json::Value, ShowcaseError> {
        let out = Command::new(&exe)
            .env("PATCHOVER_CONFIG", &p.config_path)
            .arg("--json")
            .args(args)
            .output()?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "patchover {}: no report: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })
    };

    let stop = Arc::new(AtomicBool::new(false));
    let reads = reader(p.netns.clone(), p.service, deadline, stop.clone());
    let writes = demo::writer(p.netns.clone(), p.service, deadline, stop.clone());
    std::thread::sleep(Duration::from_secs(1));

    let dirs = [a.dir.join("run"), a.dir.join("state")];
    let mut censuses: Vec<Counts> = Vec::new();
    let mut history: Vec<u64> = Vec::new();
    let mut cycle_errors = Vec::new();
    let mode = a.mode.to_string();
    for i in 0..a.cycles {
        say(&format!("cycle {} of {}", i + 1, a.cycles));
        if i > 0 {
            crate::cycle::mark(&stamp, &p)?;
        }
        for args in [
            ["patch", "lc1", "--mode", mode.as_str()],
            ["rollback", "lc1", "--mode", mode.as_str()],
        ] {
            let r = po(&args)?;
            if r["outcome"] != "ok" {
                cycle_errors.push(format!(
                    "cycle {}: {}: {} ({})",
                    i + 1,
                    args[0],
                    r["outcome"],
                    r["error"]
                ));
            }
        }
        censuses.push(census(&a.dir, &dirs, &p));
        history.push(history_bytes(&dirs));
        if !cycle_errors.is_empty() {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (reads_ok, reads_failed) = reads
        .join()
        .map_err(|_| ShowcaseError::Failed("the reader thread panicked".to_owned()))?;
    let w = writes
        .join()
        .map_err(|_| ShowcaseError::Failed("the writer thread panicked".to_owned()))?;
    let lost = demo::lost_writes(&p.netns, p.service, &w.acked)?;
    teardown(&a.dir);

    let first = censuses.first().cloned().unwrap_or_default();
    let last = censuses.last().cloned().unwrap_or_default();
    let leaks: BTreeMap<&str, i64> = first
        .iter()
        .map(|(k, v)| (*k, last.get(k).copied().unwrap_or(0) - v))
        .collect();
    let per_cycle: Vec<i64> = history
        .windows(2)
        .map(|w| w[1] as i64 - w[0] as i64)
        .collect();
    let history_per_cycle = if per_cycle.is_empty() {
        0.0
    } else {
        per_cycle.iter().sum::<i64>() as f64 / per_cycle.len() as f64
    };
    let requests_failed = reads_failed + w.failed.len() as u64;
    let report = json!({
        "cycles": censuses.len(),
        "mode": mode,
        "backend": a.backend.to_string(),
        "deadline_ms": deadline.as_millis() as u64,
        "requests_total": reads_ok + reads_failed + w.acked.len() as u64 + w.failed.len() as u64,
        "requests_failed": requests_failed,
        "writes_acknowledged": w.acked.len(),
        "writes_lost": lost,
        "leaks": leaks,
        "history_bytes_per_cycle": history_per_cycle,
        "history_bytes": history,
        "census_after_first": first,
        "census_after_last": last,
        "cycle_errors": cycle_errors,
        "failures": w.failed.iter().take(10).collect::<Vec<_>>(),
    });
    let good = cycle_errors.is_empty()
        && censuses.len() == a.cycles as usize
        && requests_failed == 0
        && lost == 0
        && leaks.values().all(|v| *v <= 0);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "soak ({} mode, {} LCs): {} of {} patch → rollback cycles",
            a.mode,
            a.backend,
            censuses.len(),
            a.cycles
        );
        println!(
            "  requests  {} total, {requests_failed} failed (deadline {} ms)",
            report["requests_total"],
            deadline.as_millis()
        );
        println!("  writes    {} acknowledged, {lost} lost", w.acked.len());
        for (k, v) in &leaks {
            println!(
                "  {k:<22} {:>5} after cycle 1, {:>5} after the last: {}",
                first[k],
                last[k],
                if *v == 0 {
                    "no leak".to_owned()
                } else {
                    format!("LEAK {v:+}")
                }
            );
        }
        println!("  history   {history_per_cycle:.0} bytes per cycle (journal, logs)");
        for e in &cycle_errors {
            println!("  error: {e}");
        }
        println!("{}", if good { "MET" } else { "MISSED" });
    }
    Ok(good)
}

/// `GET /version` on a fresh connection, as fast as answered, until `stop`: (ok, failed).
fn reader(
    netns: PathBuf,
    addr: SocketAddr,
    deadline: Duration,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        let (ok, failed) = (AtomicU64::new(0), AtomicU64::new(0));
        if patchover_net::netns::enter_netns(&netns).is_err() {
            return (0, 1);
        }
        while !stop.load(Ordering::Relaxed) {
            match demo::request(addr, "GET", "/version", b"", deadline) {
                Ok((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                _ => failed.fetch_add(1, Ordering::Relaxed),
            };
            std::thread::sleep(Duration::from_millis(2));
        }
        (ok.into_inner(), failed.into_inner())
    })
}

/// What patchover may leave behind, counted on the host. Only the demo's own names are counted
/// (other work on the machine does not show up as a leak).
fn census(dir: &Path, dirs: &[PathBuf], p: &Prepared) -> Counts {
    let dir_s = dir.display().to_string();
    let cg = demo::cgroup_parent(dir);
    let exe = std::env::current_exe().ok();
    let mut c = Counts::new();
    // This process's descriptors (but the load's own sockets, which come and go with its
    // requests), and all of every other patchover process (helpers).
    let mut fds = count_fds(Path::new("/proc/self/fd"), false);
    let mut procs = 0;
    for pid in pids() {
        if pid == std::process::id() {
            continue;
        }
        let exe_of = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let ours = exe_of.is_some() && exe_of == exe;
        let of_dir = String::from_utf8_lossy(&cmdline).contains(&dir_s);
        if ours || of_dir || cgroup.contains(&cg) {
            procs += 1;
            if ours {
                fds += count_fds(Path::new(&format!("/proc/{pid}/fd")), true);
            }
        }
    }
    c.insert("open_fds", fds);
    c.insert("processes", procs);
    c.insert(
        "nft_rules",
        output("nft", &["-j", "list", "ruleset"])
            .and_then(|o| serde_json::from_str::<serde_json::Value>(&o).ok())
            .map_or(-1, |v| {
                v["nftables"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|o| o.get("rule").is_some())
                    .count() as i64
            }),
    );
    c.insert(
        "iptables_rules",
        output("iptables-save", &[]).map_or(-1, |o| {
            o.lines().filter(|l| l.starts_with("-A")).count() as i64
        }),
    );
    // Established flows whose replies come from the stopped LC (lc2 after a rollback).
    let stopped = format!("src={NET}.12 ");
    c.insert(
        "conntrack_to_stopped_lc",
        output("conntrack", &["-L", "-n"]).map_or(-1, |o| {
            o.lines()
                .filter(|l| l.contains("ESTABLISHED"))
                .filter(|l| {
                    l.match_indices("src=")
                        .nth(1)
                        .is_some_and(|(i, _)| l[i..].starts_with(&stopped))
                })
                .count() as i64
        }),
    );
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    c.insert(
        "mounts",
        mountinfo.lines().filter(|l| l.contains(&dir_s)).count() as i64,
    );
    c.insert(
        "loop_devices",
        output("losetup", &["-a"]).map_or(-1, |o| {
            o.lines().filter(|l| l.contains(&dir_s)).count() as i64
        }),
    );
    c.insert("cgroups", cgroups(&cg));
    c.insert(
        "network_namespaces",
        mountinfo
            .lines()
            .filter(|l| {
                l.contains(" nsfs ") && (l.contains(&dir_s) || l.contains("/run/netns/podemo"))
            })
            .count() as i64
            + count_dir_matching(Path::new("/run/netns"), "podemo"),
    );
    c.insert(
        "veths",
        output("ip", &["-o", "link", "show"]).map_or(-1, |o| {
            o.lines()
                .filter(|l| {
                    let name = l.split(": ").nth(1).unwrap_or("");
                    name.starts_with("polc1")
                        || name.starts_with("polc2")
                        || name.starts_with("podemocli")
                        || l.contains(&format!("master {BRIDGE} "))
                })
                .count() as i64
        }),
    );
    c.insert(
        "files_in_run_and_state",
        dirs.iter()
            .map(|d| count_files(d, &|n| !is_history(n)))
            .sum(),
    );
    let _ = p;
    c
}

/// Journal and log files: history, not leaks.
fn is_history(name: &str) -> bool {
    name.ends_with(".log")
        || name.contains(".db")
        || name.contains(".sqlite")
        || name.ends_with("-wal")
        || name.ends_with("-shm")
        || name.ends_with(".log.1")
}

fn history_bytes(dirs: &[PathBuf]) -> u64 {
    fn walk(d: &Path, acc: &mut u64) {
        let Ok(rd) = std::fs::read_dir(d) else { return };
        for e in rd.flatten() {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            if md.is_dir() {
                walk(&e.path(), acc);
            } else if md.is_file() && is_history(&e.file_name().to_string_lossy()) {
                *acc += md.len();
            }
        }
    }
    let mut acc = 0;
    for d in dirs {
        walk(d, &mut acc);
    }
    acc
}

fn count_files(d: &Path, keep: &dyn Fn(&str) -> bool) -> i64 {
    let Ok(rd) = std::fs::read_dir(d) else {
        return 0;
    };
    let mut n = 0;
    for e in rd.flatten() {
        let Ok(md) = e.path().symlink_metadata() else {
            continue;
        };
        if md.is_dir() {
            n += count_files(&e.path(), keep);
        } else if keep(&e.file_name().to_string_lossy()) {
            n += 1;
        }
    }
    n
}

/// The descriptors in a `/proc/PID/fd` directory; sockets only if `sockets`.
fn count_fds(d: &Path, sockets: bool) -> i64 {
    std::fs::read_dir(d).map_or(0, |rd| {
        rd.flatten()
            .filter(|e| {
                sockets
                    || !std::fs::read_link(e.path())
                        .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
            })
            .count() as i64
    })
}

fn count_dir_matching(d: &Path, prefix: &str) -> i64 {
    std::fs::read_dir(d).map_or(0, |rd| {
        rd.flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
            .count() as i64
    })
}

/// Directories named `parent` (and everything under them) in every cgroup hierarchy.
fn cgroups(parent: &str) -> i64 {
    fn walk(d: &Path) -> i64 {
        std::fs::read_dir(d).map_or(0, |rd| {
            rd.flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| 1 + walk(&e.path()))
                .sum()
        })
    }
    let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") else {
        return -1;
    };
    rd.flatten()
        .map(|h| h.path().join(parent))
        .filter(|p| p.is_dir())
        .map(|p| 1 + walk(&p))
        .sum()
}

fn pids() -> Vec<u32> {
    std::fs::read_dir("/proc").map_or(Vec::new(), |rd| {
        rd.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect()
    })
}

fn output(prog: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(prog).args(args).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}
