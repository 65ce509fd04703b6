//! Crash safety: the per-LC run lock, and finishing or rolling back a run whose patchover died.
//!
//! A live run holds `<run_dir>/runs/<lc>.lock` with `flock`. The kernel drops the lock when the
//! process dies however it dies, so an unfinished run in the journal whose lock can be taken
//! belongs to a dead patchover, and [`recover`] deals with it:
//! - the switch was done: finish (stop the old LC, set the roles);
//! - the switch started but did not finish: whoever holds the service address now decides —
//!   the standby with a healthy service keeps it (finish), otherwise the address goes back to
//!   the old LC (roll back), the switcher's nftables leftovers are removed;
//! - the switch never started: release the standby; the service never moved.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;

use patchover_core::{Config, Ipv4Cidr};
use patchover_lc::LcState;
use patchover_net::rtnl::{Rtnl, RtnlError};
use patchover_net::{InLcError, LcAccess, ServiceAddress, SwitchError};
use patchover_store::Role;

use crate::cycle::{Orchestrator, endpoint};
use crate::{OrchestratorError, RunReport};

/// Held while a run for one LC is going.
#[derive(Debug)]
pub struct RunLock {
    _file: File,
}

impl RunLock {
    /// Takes the lock of `lc`, or says who holds it.
    pub fn acquire(run_dir: &Path, lc: &str) -> Result<RunLock, OrchestratorError> {
        let dir = run_dir.join("runs");
        let io = |source| OrchestratorError::Prepare {
            disk: "run lock",
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let path = dir.join(format!("{lc}.lock"));
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io)?;
        if let Err(e) = f.try_lock() {
            if let std::fs::TryLockError::Error(source) = e {
                return Err(io(source));
            }
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            return Err(OrchestratorError::BadInput(format!(
                "a patch run for LC {lc} is in progress (patchover pid {}); wait for it, or see `patchover runs list`",
                holder.trim()
            )));
        }
        f.set_len(0).map_err(io)?;
        let _ = write!(f, "{}", std::process::id());
        Ok(RunLock { _file: f })
    }
}

/// Runs the `[service] resume` command in `lc` (undoes a drain; harmless without one). A
/// failure is logged, not returned: the service answers either way, only without keep-alive.
fn resume_service(o: &Orchestrator<'_>, lc: &patchover_core::LcSpec) {
    let r = endpoint(o.backend, lc)
        .map_err(|e| patchover_core::error::chain(&e))
        .and_then(|ep| {
            let mut ctl = crate::service::LcServiceControl {
                backend: o.backend,
                lcs: &o.config.lcs,
                settings: &o.settings.service,
            };
            patchover_net::ServiceControl::resume(&mut ctl, &ep).map_err(|e| e.to_string())
        });
    match r {
        Ok(()) => tracing::info!(lc = %lc.id, "resumed the old service (undid the drain)"),
        Err(e) => {
            tracing::warn!(lc = %lc.id, error = %e, "cannot resume the old service; it answers without keeping connections alive until it restarts")
        }
    }
}

/// A process that waits on a pipe from this one; dropping the guard disarms it. If this process
/// dies first, the guard sees end of input and runs `patchover runs recover`, logging (at
/// `info` unless `PATCHOVER_LOG` says otherwise) to [`RunGuard::LOG`] in the run dir.
pub struct RunGuard {
    stdin: Option<std::process::ChildStdin>,
    child: std::process::Child,
}

impl RunGuard {
    /// The guard's log, in the run dir: what a recovery after a crash did, and when.
    pub const LOG: &str = "run-guard.log";

    pub fn arm(exe: &Path, config: &Path, run_dir: &Path) -> std::io::Result<RunGuard> {
        use std::io::BufRead;
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(run_dir.join(Self::LOG))?;
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["internal", "run-guard"])
            .env("PATCHOVER_CONFIG", config)
            .process_group(0)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(log);
        if std::env::var_os("PATCHOVER_LOG").is_none() {
            cmd.env("PATCHOVER_LOG", "info,netlink_packet_route=error");
        }
        let mut child = cmd.spawn()?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        if line.trim() != "armed" {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other("the run guard did not start"));
        }
        Ok(RunGuard {
            stdin: child.stdin.take(),
            child,
        })
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"disarm\n");
        }
        let _ = self.child.wait();
    }
}

/// Whether the service is on the LC of endpoint `ep`: [`ServiceAddress::is_on`], the same
/// answer the switcher's own checks give.
pub fn service_is_on(
    config: &Config,
    mode: patchover_net::Mode,
    ep: &patchover_net::Endpoint,
    service: Ipv4Addr,
) -> Result<bool, OrchestratorError> {
    ServiceAddress::new(service, mode, &config.network.bridge)
        .is_on_host(None, ep)
        .map_err(|e| match e {
            // The errors this question always had: netlink, and inside the LC.
            SwitchError::Rtnl(e) => OrchestratorError::net(e),
            SwitchError::NoBridge { bridge } => {
                OrchestratorError::net(RtnlError::NoSuchLink { name: bridge })
            }
            SwitchError::InLc { source, .. } => OrchestratorError::in_lc(source),
            e => e.into(),
        })
}

/// Puts the service path back on `active` in `path` mode: its port on the bridge, the
/// standby's off.
fn path_back(
    config: &Config,
    active_port: &str,
    standby_port: Option<&str>,
) -> Result<(), RtnlError> {
    let r = Rtnl::open(None)?;
    let bridge = r.need_link(&config.network.bridge)?;
    if let Some(p) = standby_port
        && let Some(l) = r.link(p)?
    {
        r.set_controller(l.index, None)?;
    }
    let a = r.need_link(active_port)?;
    r.set_controller(a.index, Some(bridge.index))
}

/// Gives the host its configured address on the bridge (the switcher checks the service from
/// there).
pub fn ensure_bridge_address(config: &Config) -> Result<(), RtnlError> {
    let Some(addr) = config.network.bridge_address else {
        return Ok(());
    };
    let r = Rtnl::open(None)?;
    let l = r.need_link(&config.network.bridge)?;
    r.add_address(l.index, addr)
}

/// An NFQUEUE number for a run's held SYNs, distinct between concurrent runs on one host.
pub fn queue_number(run_id: i64) -> u16 {
    (1000 + (std::process::id() as i64 * 31 + run_id).rem_euclid(30_000)) as u16
}

/// Puts `service` on `iface` of the LC `access` reaches, and announces it.
pub fn assign_service(
    access: &LcAccess,
    iface: &str,
    mac: patchover_core::MacAddr,
    service: Ipv4Cidr,
) -> Result<(), InLcError> {
    // A switcher rule left from an earlier switch of this address (the readdress MAC fix)
    // would send the clients' frames to the LC that had it then.
    if let Err(e) = patchover_net::teardown(None, service.addr) {
        tracing::warn!(error = %e, "cannot remove old switcher rules for the service address");
    }
    let lc = access.open()?;
    lc.add_address(iface, service)?;
    let g = patchover_net::GarpConfig::default();
    let _ = lc.announce(iface, mac, service.addr, g.count, g.interval);
    Ok(())
}

/// Recovery of a `seamless` hand-off whose clients' NAT already points at the standby: the old
/// service forwards what it holds to the standby, and its connections get the drain deadline
/// to end, before the old LC is stopped. Best effort: the old LC stops either way.
fn forward_held(
    o: &Orchestrator<'_>,
    active: &patchover_core::LcSpec,
    standby: &patchover_core::LcSpec,
) {
    let (Ok(from), Ok(to)) = (endpoint(o.backend, active), endpoint(o.backend, standby)) else {
        return;
    };
    let mut ctl = crate::service::LcServiceControl {
        backend: o.backend,
        lcs: &o.config.lcs,
        settings: &o.settings.service,
    };
    let target = std::net::SocketAddr::from((to.address.addr, o.settings.service.port));
    if let Err(e) = patchover_net::ServiceControl::forward(&mut ctl, &from, target) {
        tracing::warn!(lc = %active.id, error = %e, "cannot make the old service forward its held requests");
        return;
    }
    let Ok(lc) = from.access.open() else { return };
    let start = std::time::Instant::now();
    while start.elapsed() < o.settings.drain_deadline {
        if lc
            .busy_tcp_connections(o.settings.service.port)
            .is_ok_and(|n| n == 0)
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Finishes or rolls back every unfinished run whose patchover is gone. Returns what was done.
pub fn recover(o: &mut Orchestrator<'_>) -> Result<Vec<RunReport>, OrchestratorError> {
    let mut done = Vec::new();
    for run in o.store.runs()?.into_iter().filter(|r| r.ended_ms.is_none()) {
        let Ok(_lock) = RunLock::acquire(&o.config.run_dir, &run.lc) else {
            continue; // a live patchover is on it
        };
        let steps = o.store.steps(run.id)?;
        let has =
            |name: &str, state: &str| steps.iter().any(|s| s.step == name && s.state == state);
        let last = steps
            .last()
            .map(|s| format!("{}:{}", s.step, s.state))
            .unwrap_or_else(|| "start".into());
        tracing::info!(run = run.id, lc = %run.lc, %last, "recovering an unfinished run");
        let active = o.config.lc(&run.lc).cloned();
        let standby = run.standby.as_deref().and_then(|s| o.config.lc(s)).cloned();
        let mut report = RunReport {
            run_id: run.id,
            lc: run.lc.clone(),
            standby: run.standby.clone(),
            mode: run.mode.clone(),
            dry_run: run.dry_run,
            ..RunReport::default()
        };
        // A crash during the disk copier's cut could leave the active LC frozen (its thaw
        // guard normally thaws it first): never leave it so.
        if let Some(a) = &active
            && o.backend
                .status(a)
                .is_ok_and(|st| st.state == LcState::Frozen)
        {
            let _ = o.backend.set_frozen(a, false);
        }
        // Mirror jobs outlive the patchover that started them: end them before the standby's
        // disks are touched.
        if let Some(a) = &active {
            let ended = crate::copy::abort_leftover_jobs(&o.config.run_dir, a);
            if !ended.is_empty() {
                tracing::info!(run = run.id, jobs = ?ended, "ended the mirror jobs of the interrupted run");
            }
        }
        let service = o.config.network.service_address;
        let mode: patchover_net::Mode = run.mode.parse().unwrap_or(patchover_net::Mode::Readdress);
        let standby_holds = match (&standby, service) {
            (Some(s), Some(svc)) if has("switch", "started") => endpoint(o.backend, s)
                .ok()
                .and_then(|ep| {
                    ServiceAddress::new(svc.addr, mode, &o.config.network.bridge)
                        .is_on_host(None, &ep)
                        .ok()
                })
                .unwrap_or(false),
            _ => false,
        };
        if has("switch", "done") || standby_holds {
            // The service is on the standby: finish the run. A switch cut short did not get
            // to its announcements (and left the rule for held SYNs only): announce the
            // address from the standby now, so clients stop sending to the old LC's MAC.
            if !has("switch", "done")
                && mode != patchover_net::Mode::Seamless
                && let (Some(s), Some(svc)) = (&standby, service)
                && let Ok(ep) = endpoint(o.backend, s)
            {
                assign_service(&ep.access, &ep.iface, ep.mac, svc)
                    .map_err(OrchestratorError::in_lc)?;
            }
            // A hand-off cut short: the old service may still hold requests; they go to the
            // standby, whose data is the truth now, before the old LC stops.
            if !has("switch", "done")
                && mode == patchover_net::Mode::Seamless
                && let (Some(a), Some(s)) = (&active, &standby)
            {
                forward_held(o, a, s);
            }
            tracing::info!(
                run = run.id,
                "the service is on the standby; stopping the old LC"
            );
            if let Some(a) = &active
                && o.backend
                    .status(a)
                    .is_ok_and(|st| st.state != LcState::Stopped)
            {
                o.backend.stop(a)?;
            }
            if let Some(s) = &standby {
                o.store.set_role(s.id.as_str(), Role::Active)?;
            }
            o.store.set_role(&run.lc, Role::Standby)?;
            report.outcome = "ok".into();
            report.error = Some(format!(
                "patchover stopped at {last}; the run was finished by recovery"
            ));
        } else {
            // The service never moved, or must move back.
            if let (Some(a), Some(svc)) = (&active, service)
                && has("switch", "started")
            {
                if mode == patchover_net::Mode::Path {
                    let sport = standby
                        .as_ref()
                        .map(|s| patchover_lc::host_port_name(&s.id, 0));
                    path_back(
                        o.config,
                        &patchover_lc::host_port_name(&a.id, 0),
                        sport.as_deref(),
                    )
                    .map_err(OrchestratorError::net)?;
                } else if mode == patchover_net::Mode::Seamless {
                    // The clients' NAT never left the old LC (or goes back to it now); its
                    // service, parked for the hand-off, serves its held requests itself.
                    let ep = endpoint(o.backend, a)?;
                    patchover_net::seamless_setup(None, svc.addr, ep.address.addr)
                        .map_err(|e| OrchestratorError::Switch(Box::new(e.into())))?;
                    let mut ctl = crate::service::LcServiceControl {
                        backend: o.backend,
                        lcs: &o.config.lcs,
                        settings: &o.settings.service,
                    };
                    if let Err(e) = patchover_net::ServiceControl::unpark(&mut ctl, &ep) {
                        tracing::warn!(lc = %a.id, error = %e, "cannot unpark the old service (it resumes by itself when its park expires)");
                    }
                } else {
                    let _ = patchover_net::teardown(None, svc.addr);
                    if let Some(s) = &standby
                        && let Ok(ep) = endpoint(o.backend, s)
                        && let Ok(lc) = ep.access.open()
                    {
                        let _ = lc.del_address(&ep.iface, svc);
                    }
                    let ep = endpoint(o.backend, a)?;
                    assign_service(&ep.access, &ep.iface, ep.mac, svc)
                        .map_err(OrchestratorError::in_lc)?;
                }
                if mode != patchover_net::Mode::Seamless {
                    // The switch may have drained the old service (told it to stop keeping
                    // connections alive) before patchover died; the switcher's own rollback
                    // resumes it, so must this one, or it stays draining until it restarts.
                    resume_service(o, a);
                }
            }
            tracing::info!(
                run = run.id,
                "the service is on the active LC; releasing the standby"
            );
            if let Some(s) = &standby {
                o.release_standby(s, None);
            }
            report.outcome = if has("switch", "started") {
                "rolled-back"
            } else {
                "failed"
            }
            .into();
            report.error = Some(format!(
                "patchover stopped at {last}; recovery rolled the run back and the service is on {}",
                run.lc
            ));
        }
        o.store.record_step(
            run.id,
            "recover",
            "done",
            Some(&serde_json::json!({"outcome": report.outcome, "last": last})),
        )?;
        o.store.end_run(
            run.id,
            &report.outcome,
            &serde_json::to_value(&report).unwrap_or_default(),
        )?;
        tracing::info!(run = run.id, outcome = %report.outcome, "recovered an unfinished run");
        done.push(report);
    }
    Ok(done)
}
