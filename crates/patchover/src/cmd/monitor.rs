//! `patchover monitor run-once | run | status`: the patch monitor (seed fig. 18–20).
//!
//! The logic lives in `patchover-monitor`; this file loads the config sections, opens the
//! store, and provides the [`PatchStarter`] that starts an approved patch cycle by spawning
//! `patchover patch LC --bundle ID…` detached (its own process group, output to a log file
//! in the state directory), so the monitor never waits for a cycle and a cycle outlives it.
//!
//! `run-once` and `status` go through the daemon when one runs (see [`super::remote`]): both
//! paths call [`round`] / [`status_json`] and print their JSON with one printer.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use anyhow::Context;
use clap::Subcommand;
use patchover_bundle::{BundlesConfig, Limits, TrustedKeys};
use patchover_core::Config;
use patchover_monitor::MonitorConfig;
use patchover_monitor::monitor::{
    Monitor, PatchStarter, RunHandle, RunReport, StartError, hostname,
};
use patchover_store::Store;

use super::{BadInput, Ctx};

#[derive(Subcommand)]
pub enum MonitorCmd {
    /// One round: poll the feeds, mail notices, read replies, act on genuine decisions.
    /// Exits 1 when a feed or the mailbox failed (for cron).
    RunOnce,
    /// Run rounds forever, one per [monitor] interval_secs.
    Run,
    /// The feeds' polling state and the approval challenges.
    Status,
}

/// An error with its causes on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    patchover_monitor::poll::chain(e)
}

/// What the monitor verbs need besides the store.
pub struct MonitorEnv {
    pub config: Config,
    pub monitor: MonitorConfig,
    pub bundle_keys: TrustedKeys,
    pub limits: Limits,
}

impl MonitorEnv {
    pub fn monitor<'a>(&'a self, starter: &'a dyn PatchStarter) -> Monitor<'a> {
        Monitor {
            config: &self.monitor,
            bundle_keys: self.bundle_keys.clone(),
            limits: self.limits,
            bundles_dir: self.config.state_dir.join("bundles"),
            lcs: self.config.lcs.iter().map(|l| l.id.to_string()).collect(),
            host: hostname(),
            starter,
        }
    }
}

/// Loads the config's [monitor] and [bundles] sections and opens the store.
pub fn monitor_env(ctx: &Ctx) -> anyhow::Result<(MonitorEnv, Store)> {
    let config = ctx.config()?;
    let monitor = config.monitor()?.clone();
    let bundles = BundlesConfig::from_section(&config.bundles);
    let bundle_keys = bundles
        .load_trusted_keys()
        .map_err(|e| BadInput(chain(&e)))?;
    let store = Store::open(&config.store_path())?;
    Ok((
        MonitorEnv {
            config,
            monitor,
            bundle_keys,
            limits: bundles.limits,
        },
        store,
    ))
}

/// Starts `patchover patch LC --bundle ID…` detached.
pub struct SpawnStarter {
    exe: PathBuf,
    config_path: PathBuf,
    log_dir: PathBuf,
}

impl SpawnStarter {
    pub fn new(ctx: &Ctx, config: &Config) -> anyhow::Result<SpawnStarter> {
        Ok(SpawnStarter {
            exe: std::env::current_exe().context("cannot find the patchover binary")?,
            config_path: ctx.config_path.clone(),
            log_dir: config.state_dir.join("logs"),
        })
    }
}

impl PatchStarter for SpawnStarter {
    fn start(&self, lc: &str, bundle_ids: &[String]) -> Result<RunHandle, StartError> {
        let err = |source| StartError::Spawn {
            lc: lc.to_owned(),
            source,
        };
        std::fs::create_dir_all(&self.log_dir).map_err(err)?;
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let log = self.log_dir.join(format!("patch-{lc}-{ts}.log"));
        let out = std::fs::File::create(&log).map_err(err)?;
        let errf = out.try_clone().map_err(err)?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--config")
            .arg(&self.config_path)
            .arg("patch")
            .arg(lc);
        for id in bundle_ids {
            cmd.arg("--bundle").arg(id);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(errf)
            .process_group(0)
            .spawn()
            .map_err(err)?;
        let pid = child.id();
        tracing::info!(lc, bundles = ?bundle_ids, pid, log = %log.display(), "patch cycle spawned");
        // Reap it when it ends, so a long-running monitor leaves no zombies; the cycle itself
        // does not depend on us (own process group, output in the log).
        let mut child = child;
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        Ok(RunHandle {
            lc: lc.to_owned(),
            bundles: bundle_ids.to_vec(),
            pid: Some(pid),
        })
    }
}

/// A JSON value as text: strings as they are, null as `-`.
fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

fn items(v: &serde_json::Value) -> &[serde_json::Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// A round's report (the JSON of [`RunReport`]) as text.
fn print_report(r: &serde_json::Value) {
    for f in items(&r["feeds"]) {
        let status = match f["status"].as_str() {
            Some("backoff") => "backing off",
            Some("not-modified") => "not modified",
            Some("fetched") => "fetched",
            _ => "FAILED",
        };
        println!(
            "feed {}: {status}, {} listed, {} new",
            text(&f["feed"]),
            text(&f["listed"]),
            items(&f["registered"]).len()
        );
        for p in items(&f["registered"]) {
            println!(
                "  registered {} ({}, {})",
                text(&p["id"]),
                text(&p["category"]),
                text(&p["severity"])
            );
        }
        for x in items(&f["rejected"]) {
            println!(
                "  rejected {} [{}]: {}",
                text(&x["what"]),
                text(&x["reason"]),
                text(&x["detail"])
            );
        }
    }
    for n in items(&r["notices"]) {
        let patches: Vec<String> = items(&n["patches"]).iter().map(text).collect();
        match n["error"].as_str() {
            None => println!(
                "notice sent: challenge {} ({})",
                text(&n["challenge"]),
                patches.join(", ")
            ),
            Some(e) => println!("notice NOT sent: challenge {}: {e}", text(&n["challenge"])),
        }
    }
    if let Some(e) = r["mailbox_error"].as_str() {
        println!("mailbox FAILED: {e}");
    }
    for o in items(&r["replies"]) {
        let d = &o["decision"];
        if d.is_object() {
            let started: Vec<String> = items(&d["started"])
                .iter()
                .map(|h| text(&h["lc"]))
                .collect();
            println!(
                "reply {} from {}: {} on {} (started {})",
                text(&o["uid"]),
                text(&d["decided_by"]),
                text(&d["decision"]),
                text(&d["challenge"]),
                started.join(", ")
            );
        } else {
            println!(
                "reply {} rejected [{}]: {}",
                text(&o["uid"]),
                o["reason"].as_str().unwrap_or("?"),
                o["detail"].as_str().unwrap_or("")
            );
        }
    }
}

/// Whether a round's report says a feed or the mailbox failed (exit code 1, for cron).
fn round_failed(r: &serde_json::Value) -> bool {
    !r["mailbox_error"].is_null() || items(&r["feeds"]).iter().any(|f| f["status"] == "failed")
}

/// Holds `<state_dir>/monitor.lock` (flock) for one round, so overlapping rounds (a slow
/// cron run and the next one) never poll and decide at the same time.
fn lock_round(config: &Config) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("cannot create {}", config.state_dir.display()))?;
    let path = config.state_dir.join("monitor.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(BadInput(format!(
            "another monitor round holds {}; try again when it is done",
            path.display()
        ))
        .into()),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(anyhow::Error::new(e).context(format!("cannot lock {}", path.display())))
        }
    }
}

/// One monitor round, under the round lock: `monitor run-once`, `monitor run`, the daemon's
/// `POST /v1/monitor/run-once` and its interval loop.
pub fn round(ctx: &Ctx) -> anyhow::Result<RunReport> {
    let (env, mut store) = monitor_env(ctx)?;
    let _lock = lock_round(&env.config)?;
    let starter = SpawnStarter::new(ctx, &env.config)?;
    Ok(env.monitor(&starter).run_once(&mut store))
}

/// The feeds' polling state and the approval challenges: `monitor status` and
/// `GET /v1/monitor`.
pub fn status_json(ctx: &Ctx) -> anyhow::Result<serde_json::Value> {
    let (_env, store) = monitor_env(ctx)?;
    Ok(serde_json::json!({"feeds": store.feed_states()?, "challenges": store.challenges()?}))
}

fn print_round(ctx: &Ctx, r: &serde_json::Value) {
    if ctx.json {
        println!("{r}");
    } else {
        print_report(r);
    }
}

pub fn run(cmd: MonitorCmd, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    match cmd {
        MonitorCmd::RunOnce => {
            let r = super::remote::route(
                ctx,
                |c| super::remote::call(c, "POST", "/v1/monitor/run-once", None),
                || Ok(serde_json::to_value(round(ctx)?)?),
            )?;
            print_round(ctx, &r);
            Ok(if round_failed(&r) {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        // The rounds of a daemon run in the daemon (`[daemon] monitor`); this loop is for
        // hosts without one.
        MonitorCmd::Run => loop {
            let (env, _) = monitor_env(ctx)?;
            print_round(ctx, &serde_json::to_value(round(ctx)?)?);
            std::thread::sleep(env.monitor.interval);
        },
        MonitorCmd::Status => {
            let v = super::remote::route(
                ctx,
                |c| super::remote::call(c, "GET", "/v1/monitor", None),
                || status_json(ctx),
            )?;
            if ctx.json {
                println!("{v}");
                return Ok(ExitCode::SUCCESS);
            }
            let rows: Vec<Vec<String>> = items(&v["feeds"])
                .iter()
                .map(|f| {
                    vec![
                        text(&f["feed"]),
                        text(&f["failures"]),
                        f["etag"].as_str().unwrap_or_default().to_owned(),
                        f["last_error"].as_str().unwrap_or_default().to_owned(),
                    ]
                })
                .collect();
            print!(
                "{}",
                super::table(&["feed", "failures", "etag", "last error"], &rows)
            );
            let rows: Vec<Vec<String>> = items(&v["challenges"])
                .iter()
                .map(|c| {
                    vec![
                        text(&c["id"]),
                        items(&c["patches"])
                            .iter()
                            .map(text)
                            .collect::<Vec<_>>()
                            .join(","),
                        text(&c["decision"]),
                        text(&c["failed_attempts"]),
                    ]
                })
                .collect();
            print!(
                "{}",
                super::table(&["challenge", "patches", "decision", "failed"], &rows)
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawn_starter_runs_patch_with_the_bundles_detached() {
        let dir = tempfile::tempdir().unwrap();
        let args_file = dir.path().join("args");
        let exe = dir.path().join("fake-patchover");
        std::fs::write(
            &exe,
            format!(
                "#!/bin/sh\necho \"$@\" > {}.tmp\nmv {0}.tmp {0}\n",
                args_file.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let s = SpawnStarter {
            exe,
            config_path: PathBuf::from("/etc/po.toml"),
            log_dir: dir.path().join("logs"),
        };
        let h = s.start("lc1", &["a".to_owned(), "b".to_owned()]).unwrap();
        assert_eq!(h.lc, "lc1");
        assert!(h.pid.is_some());
        let t0 = std::time::Instant::now();
        while !args_file.exists() {
            assert!(t0.elapsed() < std::time::Duration::from_secs(10));
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(
            std::fs::read_to_string(&args_file).unwrap().trim(),
            "--config /etc/po.toml patch lc1 --bundle a --bundle b"
        );
    }
}
