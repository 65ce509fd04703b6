//! `patchover monitor run-once | run | status`: the patch monitor (seed fig. 18–20).
//!
//! The logic lives in `patchover-monitor`; this file loads the config sections, opens the
//! store, and provides the [`PatchStarter`] that starts an approved patch cycle by spawning
//! `patchover patch LC --bundle ID…` detached (its own process group, output to a log file
//! in the state directory), so the monitor never waits for a cycle and a cycle outlives it.

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
use patchover_monitor::poll::FeedStatus;
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
    let monitor = MonitorConfig::from_extra(&config.extra).map_err(|e| BadInput(chain(&e)))?;
    let bundles = BundlesConfig::from_extra(&config.extra).map_err(|e| BadInput(chain(&e)))?;
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

fn print_report(r: &RunReport) {
    for f in &r.feeds {
        let status = match f.status {
            FeedStatus::Backoff => "backing off",
            FeedStatus::NotModified => "not modified",
            FeedStatus::Fetched => "fetched",
            FeedStatus::Failed => "FAILED",
        };
        println!(
            "feed {}: {status}, {} listed, {} new",
            f.feed,
            f.listed,
            f.registered.len()
        );
        for p in &f.registered {
            println!("  registered {} ({}, {})", p.id, p.category, p.severity);
        }
        for x in &f.rejected {
            println!("  rejected {} [{}]: {}", x.what, x.reason, x.detail);
        }
    }
    for n in &r.notices {
        match &n.error {
            None => println!(
                "notice sent: challenge {} ({})",
                n.challenge,
                n.patches.join(", ")
            ),
            Some(e) => println!("notice NOT sent: challenge {}: {e}", n.challenge),
        }
    }
    if let Some(e) = &r.mailbox_error {
        println!("mailbox FAILED: {e}");
    }
    for o in &r.replies {
        match &o.decision {
            Some(d) => println!(
                "reply {} from {}: {} on {} (started {})",
                o.uid,
                d.decided_by,
                d.decision,
                d.challenge,
                d.started
                    .iter()
                    .map(|h| h.lc.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => println!(
                "reply {} rejected [{}]: {}",
                o.uid,
                o.reason.unwrap_or("?"),
                o.detail.as_deref().unwrap_or("")
            ),
        }
    }
}

/// Holds `<state_dir>/monitor.lock` (flock) for one round, so overlapping rounds (a slow
/// cron run and the next one) never poll and decide at the same time.
fn lock_round(config: &Config) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("cannot create {}", config.state_dir.display()))?;
    let path = config.state_dir.join("monitor.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on a descriptor we own for the duration of the call; no memory involved.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        return Err(BadInput(format!(
            "another monitor round holds {}; try again when it is done",
            path.display()
        ))
        .into());
    }
    Ok(f)
}

fn round(ctx: &Ctx) -> anyhow::Result<RunReport> {
    let (env, mut store) = monitor_env(ctx)?;
    let _lock = lock_round(&env.config)?;
    let starter = SpawnStarter::new(ctx, &env.config)?;
    let report = env.monitor(&starter).run_once(&mut store);
    if ctx.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(report)
}

pub fn run(cmd: MonitorCmd, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    match cmd {
        MonitorCmd::RunOnce => {
            let r = round(ctx)?;
            let failed = r.mailbox_error.is_some()
                || r.feeds
                    .iter()
                    .any(|f| matches!(f.status, FeedStatus::Failed));
            Ok(if failed {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        MonitorCmd::Run => loop {
            let (env, _) = monitor_env(ctx)?;
            round(ctx)?;
            std::thread::sleep(env.monitor.interval);
        },
        MonitorCmd::Status => {
            let (_env, store) = monitor_env(ctx)?;
            let feeds = store.feed_states()?;
            let challenges = store.challenges()?;
            if ctx.json {
                println!(
                    "{}",
                    serde_json::json!({"feeds": feeds, "challenges": challenges})
                );
            } else {
                let rows: Vec<Vec<String>> = feeds
                    .iter()
                    .map(|f| {
                        vec![
                            f.feed.clone(),
                            f.failures.to_string(),
                            f.etag.clone().unwrap_or_default(),
                            f.last_error.clone().unwrap_or_default(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    super::table(&["feed", "failures", "etag", "last error"], &rows)
                );
                let rows: Vec<Vec<String>> = challenges
                    .iter()
                    .map(|c| {
                        vec![
                            c.id.clone(),
                            c.patches.join(","),
                            c.decision.clone().unwrap_or_else(|| "-".into()),
                            c.failed_attempts.to_string(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    super::table(&["challenge", "patches", "decision", "failed"], &rows)
                );
            }
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
