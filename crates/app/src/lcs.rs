//! The resource table and the LC lifecycle: `lc list|show|boot|reboot|stop|attach-disk|
//! attach-nic` and `GET|POST /v1/lcs…`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use patchover_core::{BackendKind, Ipv4Cidr, LcId, LcSpec, MacAddr, NicSpec, check_iface_name};
use patchover_lc::cgroup::Limits;
use patchover_lc::{LcBackend, LcState, LcStatus};
use patchover_store::{LcRow, Role};
use serde::{Deserialize, Serialize};

use crate::{AppError, Env};

/// One LC as `lc list`, `lc show` and the API show it: its resource-table row, what the
/// backend reports now, its console log, and its whole config entry (`spec`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LcView {
    pub id: LcId,
    pub backend: BackendKind,
    pub cpu: u32,
    pub cpu_share: u32,
    pub memory_mib: u64,
    pub system_disk: PathBuf,
    pub app_disk: Option<PathBuf>,
    pub nics: Vec<NicSpec>,
    pub role: Role,
    pub console_log: PathBuf,
    pub spec: LcSpec,
    pub state: LcState,
    /// The host PID of the LC's init.
    pub pid: Option<i32>,
    pub uptime_s: Option<f64>,
    pub processes: usize,
    /// Limits as the kernel reports them.
    pub limits: Option<Limits>,
    pub host_ports: Vec<String>,
    pub agent_socket: Option<PathBuf>,
}

impl LcView {
    fn new(env: &Env, row: LcRow, st: LcStatus) -> LcView {
        let spec = row.spec;
        LcView {
            id: spec.id.clone(),
            backend: spec.backend,
            cpu: spec.cpu.cpu,
            cpu_share: spec.cpu.share_pct,
            memory_mib: spec.memory_mib,
            system_disk: spec.system_disk.path.clone(),
            app_disk: spec.app_disk.as_ref().map(|d| d.path.clone()),
            nics: spec.nics.clone(),
            role: row.role,
            console_log: env.backend.console_log(&spec),
            spec,
            state: st.state,
            pid: st.pid,
            uptime_s: st.uptime_s,
            processes: st.processes,
            limits: st.limits,
            host_ports: st.host_ports,
            agent_socket: st.agent_socket,
        }
    }
}

/// The resource table with each LC's state: `lc list` and `GET /v1/lcs`.
pub fn list(env: &Env) -> Result<Vec<LcView>, AppError> {
    let mut out = Vec::new();
    for row in env.store.lcs()? {
        let st = env.backend.status(&row.spec)?;
        out.push(LcView::new(env, row, st));
    }
    Ok(out)
}

/// One LC: `lc show`, `lc status` and `GET /v1/lcs/{id}`.
pub fn show(env: &Env, id: &str) -> Result<LcView, AppError> {
    env.lc(id)?;
    let row = env.store.lc(id)?.ok_or_else(|| {
        AppError::NotFound(format!(
            "LC {id} is in the config but not in the resource table; run the command again"
        ))
    })?;
    let st = env.backend.status(&row.spec)?;
    Ok(LcView::new(env, row, st))
}

/// A change of an LC's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LcAction {
    Boot,
    Reboot,
    Stop,
}

/// The LC after [`act`], with how long it took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Acted {
    #[serde(flatten)]
    pub lc: LcView,
    pub took_ms: u64,
    /// How long the agent took to answer after the boot, when it was waited for.
    pub agent_ms: Option<u64>,
}

/// Boots, reboots or stops LC `id` (after a boot waiting up to `timeout` for its agent, unless
/// `no_wait`): `lc boot|reboot|stop` and `POST /v1/lcs/{id}/{action}`.
pub fn act(
    env: &Env,
    id: &str,
    action: LcAction,
    no_wait: bool,
    timeout: Duration,
) -> Result<Acted, AppError> {
    let spec = env.lc(id)?;
    let start = Instant::now();
    let agent_ms = match action {
        LcAction::Boot => {
            env.backend.boot(spec)?;
            wait_agent(env, spec, no_wait, timeout)?
        }
        LcAction::Reboot => {
            env.backend.reboot(spec)?;
            wait_agent(env, spec, no_wait, timeout)?
        }
        LcAction::Stop => {
            env.backend.stop(spec)?;
            None
        }
    };
    let took_ms = start.elapsed().as_millis() as u64;
    Ok(Acted {
        lc: show(env, id)?,
        took_ms,
        agent_ms,
    })
}

/// Waits for the agent when the image has one; returns how long that took.
fn wait_agent(
    env: &Env,
    spec: &LcSpec,
    no_wait: bool,
    timeout: Duration,
) -> Result<Option<u64>, AppError> {
    if no_wait || !env.backend.has_agent(spec) {
        return Ok(None);
    }
    let start = Instant::now();
    env.backend
        .wait_agent(spec, timeout)
        .map_err(|source| AppError::AgentSilent {
            console_log: env.backend.console_log(spec),
            source,
        })?;
    Ok(Some(start.elapsed().as_millis() as u64))
}

/// A host directory mounted into an LC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskAttached {
    pub lc: String,
    pub source: PathBuf,
    pub at: PathBuf,
}

/// Mounts host directory `source` into the running LC `id` at `at`: `lc attach-disk` and
/// `POST /v1/lcs/{id}/disks`.
pub fn attach_disk(
    env: &Env,
    id: &str,
    source: &Path,
    at: &Path,
) -> Result<DiskAttached, AppError> {
    if !source.is_absolute() {
        return Err(AppError::BadInput(format!(
            "{} is not an absolute path; give the directory's whole path",
            source.display()
        )));
    }
    let spec = env.lc(id)?;
    env.backend.attach_disk(spec, source, at)?;
    Ok(DiskAttached {
        lc: id.to_owned(),
        source: source.to_owned(),
        at: at.to_owned(),
    })
}

/// A NIC plugged into an LC and the host bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicAttached {
    pub lc: String,
    pub nic: NicSpec,
    /// Its host-side interface.
    pub host_port: String,
}

/// Plugs NIC `name` into the running LC `id` and the host bridge (its MAC derived from the LC
/// and the name unless given): `lc attach-nic` and `POST /v1/lcs/{id}/nics`.
pub fn attach_nic(
    env: &Env,
    id: &str,
    name: &str,
    address: Option<Ipv4Cidr>,
    mac: Option<MacAddr>,
) -> Result<NicAttached, AppError> {
    // First, before anything is looked up or made: the name becomes a link's name inside the
    // LC and an argument of a guest's shell script.
    check_iface_name(name)
        .map_err(|e| AppError::BadInput(format!("NIC for LC {id}: {e}; nothing was changed")))?;
    let spec = env.lc(id)?;
    if spec.nics.iter().any(|n| n.name == name) {
        return Err(AppError::BadInput(format!(
            "LC {id} already has a NIC named {name}"
        )));
    }
    let nic = NicSpec {
        mac: mac.unwrap_or_else(|| MacAddr::derive(&format!("{id}/{name}"))),
        name: name.to_owned(),
        address,
        gateway: None,
        detached: false,
    };
    let host_port = env.backend.attach_nic(spec, &nic)?;
    Ok(NicAttached {
        lc: id.to_owned(),
        nic,
        host_port,
    })
}
