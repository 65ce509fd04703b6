//! The patch monitor's operations (seed fig. 18-20): `monitor run-once|run|status`, the
//! daemon's `POST /v1/monitor/run-once`, `GET /v1/monitor` and its interval loop, and the
//! approvals (`approve`, `GET /v1/approve`).
//!
//! The logic lives in `patchover-monitor`; this loads its config sections, opens the store,
//! holds the round lock, and provides the [`PatchStarter`] that starts an approved patch cycle
//! by spawning `patchover patch LC --bundle ID…` detached (its own process group, output to a
//! log file in the state directory), so the monitor never waits for a cycle and a cycle
//! outlives it.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use patchover_bundle::{BundlesConfig, Limits, TrustedKeys};
use patchover_core::Config;
use patchover_monitor::MonitorConfig;
use patchover_monitor::apt::{AptFeed, ExecOut, VmAccess};
use patchover_monitor::monitor::{
    Monitor, PatchStarter, RunHandle, RunReport, StartError, hostname,
};
use patchover_store::{ChallengeRow, FeedStateRow, Store};
use serde::{Deserialize, Serialize};

use crate::AppError;

/// What the monitor needs besides the store: the config with its `[monitor]` section, and the
/// keys and limits of `[bundles]`.
pub struct MonitorEnv {
    pub config: Config,
    pub monitor: MonitorConfig,
    pub bundle_keys: TrustedKeys,
    pub limits: Limits,
    /// The `kind = "apt"` feeds, their signing keys loaded and checked against `[bundles]`.
    pub apt_feeds: Vec<AptFeed>,
    /// The LC backends, when an apt feed may watch a VM (its state and its agent).
    vms: Option<BackendVms>,
}

/// The LC backends as the apt feed's [`VmAccess`]: a VM's state, and exec through its agent.
struct BackendVms(patchover_lc::dispatch::ByKind);

impl VmAccess for BackendVms {
    fn is_running(&self, spec: &patchover_core::LcSpec) -> Result<bool, String> {
        patchover_lc::LcBackend::status(&self.0, spec)
            .map(|s| s.state != patchover_lc::LcState::Stopped)
            .map_err(|e| {
                format!(
                    "the state of {}: {}",
                    spec.id,
                    patchover_core::error_chain(&e)
                )
            })
    }

    fn exec(
        &self,
        spec: &patchover_core::LcSpec,
        argv: &[String],
    ) -> Result<ExecOut, Box<dyn std::error::Error + Send + Sync>> {
        let o = patchover_lc::LcBackend::exec(&self.0, spec, argv, patchover_lc::Stdio::Capture)?;
        Ok(ExecOut {
            status: o.status,
            stdout: o.stdout,
        })
    }
}

impl MonitorEnv {
    /// Takes the config's `[monitor]` and `[bundles]` sections and opens the store.
    pub fn open(config: Config) -> Result<(MonitorEnv, Store), AppError> {
        let monitor = config.monitor()?.clone();
        let bundles = BundlesConfig::from_section(&config.bundles);
        let bundle_keys = bundles
            .load_trusted_keys()
            .map_err(|e| AppError::BadInput(patchover_monitor::poll::chain(&e)))?;
        // Refused at load: an apt feed's key that is missing, or trusted for more or less than
        // apt bundles.
        let apt_feeds = monitor
            .apt_feeds
            .iter()
            .map(|f| AptFeed::load(f, &bundle_keys))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| AppError::BadInput(patchover_monitor::poll::chain(&e)))?;
        let store = Store::open(&config.store_path())?;
        // A VM is watched through the backends (its agent while it runs).
        let vms = match !apt_feeds.is_empty()
            && config
                .lcs
                .iter()
                .any(|l| l.system_disk.kind != patchover_core::DiskKind::Dir)
        {
            true => Some(BackendVms(crate::env::backends(&config)?)),
            false => None,
        };
        Ok((
            MonitorEnv {
                config,
                monitor,
                bundle_keys,
                limits: bundles.limits,
                apt_feeds,
                vms,
            },
            store,
        ))
    }

    pub fn monitor<'a>(&'a self, starter: &'a dyn PatchStarter) -> Monitor<'a> {
        Monitor {
            config: &self.monitor,
            bundle_keys: self.bundle_keys.clone(),
            limits: self.limits,
            bundles_dir: self.config.state_dir.join("bundles"),
            lcs: self.config.lcs.iter().map(|l| l.id.to_string()).collect(),
            host: hostname(),
            starter,
            apt_feeds: self.apt_feeds.clone(),
            vms: self.vms.as_ref().map(|v| v as &dyn VmAccess),
        }
    }
}

/// Starts `patchover patch LC --bundle ID…` detached.
pub struct SpawnStarter {
    pub exe: PathBuf,
    pub config_path: PathBuf,
    pub log_dir: PathBuf,
}

impl SpawnStarter {
    /// Runs this executable (the `patchover` binary) with `config`'s file.
    pub fn new(config: &Config) -> Result<SpawnStarter, AppError> {
        Ok(SpawnStarter {
            exe: std::env::current_exe().map_err(|source| AppError::Io {
                what: "cannot find the patchover binary".to_owned(),
                source,
            })?,
            config_path: config.path.clone(),
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
        let out = File::create(&log).map_err(err)?;
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

/// Holds `<state_dir>/monitor.lock` for one round, so overlapping rounds (a slow cron run and
/// the next one) never poll and decide at the same time.
fn lock_round(config: &Config) -> Result<File, AppError> {
    let io = |what: String| move |source| AppError::Io { what, source };
    std::fs::create_dir_all(&config.state_dir)
        .map_err(io(format!("cannot create {}", config.state_dir.display())))?;
    let path = config.state_dir.join("monitor.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io(format!("cannot open {}", path.display())))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(AppError::BadInput(format!(
            "another monitor round holds {}; try again when it is done",
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(io(format!("cannot lock {}", path.display()))(e))
        }
    }
}

/// One monitor round, under the round lock.
pub fn round(config: Config) -> Result<RunReport, AppError> {
    let (env, mut store) = MonitorEnv::open(config)?;
    let _lock = lock_round(&env.config)?;
    let starter = SpawnStarter::new(&env.config)?;
    Ok(env.monitor(&starter).run_once(&mut store))
}

/// The feeds' polling state and the approval challenges.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MonitorStatus {
    pub feeds: Vec<FeedStateRow>,
    pub challenges: Vec<ChallengeRow>,
}

/// `monitor status` and `GET /v1/monitor`.
pub fn status(config: Config) -> Result<MonitorStatus, AppError> {
    let (_env, store) = MonitorEnv::open(config)?;
    Ok(MonitorStatus {
        feeds: store.feed_states()?,
        challenges: store.challenges()?,
    })
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
