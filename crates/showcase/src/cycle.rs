//! `patchover bench cycle`: how long a patch cycle takes, step by step, and how much of it is
//! patchover's own doing (the orchestration overhead), against what patching costs users today
//! measured in the same run: stop the service, patch in place, start it again.
//!
//! The overhead is a cycle's wall time (the `patchover patch` process, start to exit) minus
//! the steps whose time belongs to the disks, the LC and the network: the two disk copies, the
//! standby's boot, the patch report (applying the patches), the reboot, the switch, and the
//! old LC's shutdown after the switch (busybox init's own: SIGTERM, 1 s, SIGKILL).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{Context, ShowcaseError};
use patchover_lc::{LcBackend, Stdio};
use patchover_net::Mode;
use serde_json::json;

use crate::demo::{Prepared, prepare, teardown};

/// What `patchover bench cycle` measures (its options).
#[derive(Debug, Clone)]
pub struct CycleOptions {
    /// Patch cycles to run (they alternate between the two LCs).
    pub cycles: u32,
    /// Stop-patch-restart baseline runs.
    pub baseline_runs: u32,
    pub dir: PathBuf,
    /// The kind of LC: `ns` or `qemu`.
    pub backend: patchover_core::BackendKind,
    /// The switch mode of the cycles: path, readdress or seamless (a hand-off).
    pub mode: Mode,
}

/// Steps whose time is the work itself, not orchestration.
const WORK_STEPS: &[&str] = &[
    "copy_system_disk",
    "copy_app_disk",
    "boot_standby",
    "patch_report",
    "reboot_standby",
    "switch",
    "stop_old",
];

fn probe_ok(p: &Prepared) -> bool {
    let addr = p.service;
    patchover_net::netns::in_netns(Some(&p.netns), move || {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
        else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        if s.write_all(b"GET /version HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        buf.starts_with(b"HTTP/1.1 200")
    })
    .unwrap_or(false)
}

/// Makes, signs and imports (marked) an idempotent bundle that every cycle after the first
/// applies (the first also applies demo-1.0.1); returns its id.
pub fn import_stamp_bundle(dir: &std::path::Path, p: &Prepared) -> Result<String, ShowcaseError> {
    let stamp = dir.join("stamp-src");
    std::fs::create_dir_all(stamp.join("payload"))?;
    std::fs::write(
        stamp.join("payload/stamp.sh"),
        "date > /etc/demo/last-patch\n",
    )?;
    std::fs::write(
        stamp.join("manifest.toml"),
        "format = 1\nid = \"bench-stamp\"\ntitle = \"bench stamp\"\ncategory = \"bugfix\"\nseverity = \"low\"\npublished = 2026-11-25T00:00:00Z\n[[step]]\nkind = \"script\"\nfile = \"stamp.sh\"\n",
    )?;
    let file = dir.join("bench-stamp.po");
    patchover_bundle::create::create_bundle(&stamp, &file)?;
    patchover_bundle::create::sign_bundle(
        &file,
        &patchover_bundle::keys::SigningKey::from_file(&p.seckey, None)?,
    )?;
    let mut env = crate::env(&p.config_path)?;
    let config = env.config.clone();
    patchover_app::patches::import(&config, &mut env.store, &file, true)?;
    Ok("bench-stamp".into())
}

/// Marks bundle `id` for the next run.
pub fn mark(id: &str, p: &Prepared) -> Result<(), ShowcaseError> {
    let mut env = crate::env(&p.config_path)?;
    patchover_app::patches::mark(&mut env.store, &[id.to_owned()], true)?;
    Ok(())
}

pub fn run(a: CycleOptions, json: bool) -> Result<bool, ShowcaseError> {
    let say = |s: &str| {
        if !json {
            eprintln!("bench cycle: {s}");
        }
    };
    let p = prepare(&a.dir, a.backend, a.mode, &say)?;
    let exe = std::env::current_exe()?;
    let stamp = import_stamp_bundle(&a.dir, &p)?;

    let mut cycles = Vec::new();
    let mut active = "lc1".to_owned();
    for i in 0..a.cycles {
        if i > 0 {
            mark(&stamp, &p)?;
        }
        say(&format!("cycle {} of {} on {active}", i + 1, a.cycles));
        let t = Instant::now();
        let out = Command::new(&exe)
            .env("PATCHOVER_CONFIG", &p.config_path)
            .args(["--json", "patch", &active, "--mode", &a.mode.to_string()])
            .output()?;
        let wall_ms = t.elapsed().as_secs_f64() * 1000.0;
        let r: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("the run's report")?;
        ensure!(
            r["outcome"] == "ok",
            "cycle {} failed: {}",
            i + 1,
            r["error"]
        );
        let steps: Vec<(String, f64)> = r["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                (
                    s["step"].as_str().unwrap_or("").to_owned(),
                    s["ms"].as_f64().unwrap_or(0.0),
                )
            })
            .collect();
        let work: f64 = steps
            .iter()
            .filter(|(n, _)| WORK_STEPS.contains(&n.as_str()))
            .map(|(_, m)| m)
            .sum();
        cycles.push(json!({
            "wall_ms": wall_ms,
            "work_ms": work,
            "overhead_ms": wall_ms - work,
            "pause_ms": r["pause_ms"],
            "steps": steps.iter().map(|(n, m)| json!({"step": n, "ms": m})).collect::<Vec<_>>(),
        }));
        active = r["standby"].as_str().unwrap_or("lc2").to_owned();
    }

    // Baseline: what patching means today, on the active LC: stop, patch, start.
    let env = crate::env(&p.config_path)?;
    let spec = env.lc(&active)?.clone();
    let mut downtimes = Vec::new();
    for i in 0..a.baseline_runs {
        let t = Instant::now();
        let run = |argv: &[&str]| {
            env.backend.exec(
                &spec,
                &argv.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                Stdio::Capture,
            )
        };
        run(&["/etc/init.d/S50demo", "stop"])?;
        run(&[
            "/bin/sh",
            "-c",
            &format!("echo 1.0.{} > /etc/demo/version", 10 + i),
        ])?;
        run(&["/etc/init.d/S50demo", "start"])?;
        while !probe_ok(&p) {
            ensure!(
                t.elapsed() < Duration::from_secs(30),
                "the service did not come back"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        downtimes.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    drop(env);
    teardown(&a.dir);

    let mean = |xs: &mut dyn Iterator<Item = f64>| {
        let v: Vec<f64> = xs.collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let overhead = mean(
        &mut cycles
            .iter()
            .map(|c| c["overhead_ms"].as_f64().unwrap_or(0.0)),
    );
    let wall = mean(&mut cycles.iter().map(|c| c["wall_ms"].as_f64().unwrap_or(0.0)));
    let pause = mean(&mut cycles.iter().map(|c| c["pause_ms"].as_f64().unwrap_or(0.0)));
    let downtime = mean(&mut downtimes.iter().copied());
    let report = json!({
        "cycles": cycles,
        "mean_cycle_ms": wall,
        "mean_overhead_ms": overhead,
        "overhead_goal_ms": 1000,
        "mean_pause_ms": pause,
        "baseline_downtime_ms": downtimes,
        "mean_baseline_downtime_ms": downtime,
        "pause_vs_baseline_downtime": pause / downtime.max(f64::MIN_POSITIVE),
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("patch cycle, mean of {} cycles: {wall:.0} ms", a.cycles);
        let mut names: Vec<String> = Vec::new();
        for c in &cycles {
            for s in c["steps"].as_array().into_iter().flatten() {
                let n = s["step"].as_str().unwrap_or("").to_owned();
                if !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        for n in names {
            let m = mean(&mut cycles.iter().filter_map(|c| {
                c["steps"]
                    .as_array()?
                    .iter()
                    .find(|s| s["step"] == n.as_str())?["ms"]
                    .as_f64()
            }));
            println!(
                "  {n:<18} {m:>8.1} ms{}",
                if WORK_STEPS.contains(&n.as_str()) {
                    ""
                } else {
                    "   (orchestration)"
                }
            );
        }
        println!("orchestration overhead: {overhead:.0} ms per cycle (goal < 1000 ms)");
        println!(
            "service pause at the switch: {pause:.1} ms; stop-patch-restart downtime today: {downtime:.1} ms ({:.2}x)",
            pause / downtime.max(f64::MIN_POSITIVE)
        );
    }
    Ok(true)
}
