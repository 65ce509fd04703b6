//! Logical computers: the seed's resource partitioning mechanism (110) and LC control program
//! (305), behind one trait, [`LcBackend`].
//!
//! An LC is booted from its system disk, runs its own boot scripts, gets its application disk
//! mounted and its NICs plugged into the host bridge, and is controlled from the host: reboot,
//! stop, status, exec, freeze, attach disks and NICs, and the agent channel. Backends:
//! - [`ns::NsBackend`]: Linux namespaces + cgroups (software partitioning);
//! - QEMU VMs (hardware partitioning): `patchover_qemu::backend::QemuBackend`.
//!
//! Every privileged call of a backend goes through the [`host::Host`] seam, so the backend's
//! logic (ordering, rollback on failure, state checks) is unit-tested against a recording fake
//! without root; the real calls are exercised by the integration tests.

pub mod boot;
pub mod cgroup;
pub mod disks;
pub mod dispatch;
pub mod flows;
pub mod helper;
pub mod host;
pub mod images;
pub mod migrate;
pub mod ns;
pub mod probe;

use std::path::PathBuf;
use std::time::Duration;

use patchover_core::{LcId, LcSpec};
use serde::{Deserialize, Serialize};

pub use migrate::{
    Copied, CopyProgress, CutDone, DiskCopyError, Hold, LiveCopy, Migratable, NoProgress, Pausable,
    Progress, WriteWatch, Writes,
};

/// What the host sees of an LC.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LcStatus {
    pub id: LcId,
    pub state: LcState,
    /// The host PID of the LC's init.
    pub pid: Option<i32>,
    pub uptime_s: Option<f64>,
    /// Processes in the LC now.
    pub processes: usize,
    /// Limits as the kernel reports them.
    pub limits: Option<cgroup::Limits>,
    /// Host-side interface names of the LC's NICs.
    pub host_ports: Vec<String>,
    /// The agent socket on the host.
    pub agent_socket: Option<PathBuf>,
}

impl LcStatus {
    /// What a backend reports of an LC that does not run.
    pub fn stopped(id: &LcId) -> LcStatus {
        LcStatus {
            id: id.clone(),
            state: LcState::Stopped,
            pid: None,
            uptime_s: None,
            processes: 0,
            limits: None,
            host_ports: Vec::new(),
            agent_socket: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LcState {
    Running,
    Frozen,
    Stopped,
}

impl std::fmt::Display for LcState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LcState::Running => "running",
            LcState::Frozen => "frozen",
            LcState::Stopped => "stopped",
        })
    }
}

/// The output of a program run inside an LC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExecOutput {
    /// Exit status, `None` when killed by a signal.
    pub status: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Whether an exec's standard streams go to the caller's terminal or are captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdio {
    Inherit,
    Capture,
    /// Captured, and the program killed once it has run this long (its status is then `None`
    /// and its standard error says so): a check that must not hang.
    CaptureFor(std::time::Duration),
}

/// What a program killed at its time limit leaves at the end of its standard error.
pub fn killed_after(limit: std::time::Duration) -> String {
    format!("\n[patchover] the program was killed after {limit:?}\n")
}

#[derive(Debug, thiserror::Error)]
pub enum LcError {
    #[error("LC {0} is already running; stop it first or use `patchover lc reboot {0}`")]
    AlreadyRunning(LcId),
    #[error("LC {0} is not running; boot it with `patchover lc boot {0}`")]
    NotRunning(LcId),
    #[error("LC {lc}: {what} {path} does not exist; create it (e.g. `patchover image build-demo {path}`) or fix the config", path = path.display())]
    DiskMissing {
        lc: LcId,
        what: &'static str,
        path: PathBuf,
    },
    #[error("LC {lc}: disk {path} is marked incomplete (a copy that did not finish); copy it again before using it", path = path.display())]
    DiskIncomplete { lc: LcId, path: PathBuf },
    #[error("LC {lc}: disk {path} is in use by LC {other}; stop {other} or give {lc} its own disk", path = path.display())]
    DiskInUse {
        lc: LcId,
        path: PathBuf,
        other: String,
    },
    #[error("LC {lc}: the system disk {path} has no init at {init}; build the image with `patchover image build-demo` or set `init` in the config", path = path.display(), init = init.display())]
    NoInit {
        lc: LcId,
        path: PathBuf,
        init: PathBuf,
    },
    #[error("LC {lc}: {step} failed")]
    Host {
        lc: LcId,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("LC {lc}: booting failed inside the LC: {message}")]
    Launch { lc: LcId, message: String },
    #[error("LC {lc}: {what} did not happen within {timeout:?}")]
    Timeout {
        lc: LcId,
        what: &'static str,
        timeout: Duration,
    },
    #[error("LC {lc}: the agent did not answer")]
    Agent {
        lc: LcId,
        #[source]
        source: patchover_agent::AgentError,
    },
    #[error("LC {lc}: {message}")]
    Unsupported { lc: LcId, message: String },
}

impl LcError {
    /// A host step that failed with `e`, its whole cause chain kept in the message.
    pub fn host_chain(lc: &LcId, step: &'static str, e: &dyn std::error::Error) -> LcError {
        LcError::Host {
            lc: lc.clone(),
            step,
            source: std::io::Error::other(patchover_core::error_chain(e)),
        }
    }

    /// True when the error is about what was asked (exit code 2), not about the host.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            LcError::AlreadyRunning(_)
                | LcError::NotRunning(_)
                | LcError::DiskMissing { .. }
                | LcError::DiskIncomplete { .. }
                | LcError::DiskInUse { .. }
                | LcError::NoInit { .. }
                | LcError::Unsupported { .. }
        )
    }
}

/// The way into a running LC from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// The LC's network namespace (`/proc/<init>/ns/net` of an `ns` LC).
    Netns(PathBuf),
    /// The agent channel's socket on the host (a VM has no namespace on the host).
    Agent(PathBuf),
}

/// The partitioning mechanism and LC control program, one implementation per kind of LC. What
/// differs between kinds beyond boot and control — holding an LC still, copying its disks
/// while it runs, the way into it — is the backend's too ([`Pausable`], [`Migratable`],
/// [`LcBackend::access`]).
pub trait LcBackend: Migratable {
    /// Boots the LC from its system disk; it runs its own boot scripts. Fails without a trace
    /// left on the host if any step fails.
    fn boot(&self, spec: &LcSpec) -> Result<LcStatus, LcError>;
    /// Ends every process of the LC and boots it again from its disk.
    fn reboot(&self, spec: &LcSpec) -> Result<LcStatus, LcError> {
        self.stop(spec)?;
        self.boot(spec)
    }
    /// Shuts the LC down (its own shutdown scripts first, then force), leaving no process,
    /// mount, link or cgroup behind.
    fn stop(&self, spec: &LcSpec) -> Result<(), LcError>;
    fn status(&self, spec: &LcSpec) -> Result<LcStatus, LcError>;
    /// Runs a program inside the running LC.
    fn exec(&self, spec: &LcSpec, argv: &[String], stdio: Stdio) -> Result<ExecOutput, LcError>;
    /// Mounts a host directory into the running LC at `at`.
    fn attach_disk(
        &self,
        spec: &LcSpec,
        source: &std::path::Path,
        at: &std::path::Path,
    ) -> Result<(), LcError>;
    /// Plugs a new NIC into the running LC and the host bridge; returns the host-side port.
    fn attach_nic(&self, spec: &LcSpec, nic: &patchover_core::NicSpec) -> Result<String, LcError>;
    /// Waits until the agent inside answers.
    fn wait_agent(
        &self,
        spec: &LcSpec,
        timeout: Duration,
    ) -> Result<patchover_agent::Response, LcError>;
    /// Opens the agent channel.
    fn agent(&self, spec: &LcSpec) -> Result<patchover_agent::AgentClient, LcError>;
    /// Where the LC's console output goes (kept across boots).
    fn console_log(&self, spec: &LcSpec) -> PathBuf;
    /// Whether the LC's system has an agent to wait for. A system the host cannot look into
    /// (a VM's image) is taken to have one.
    fn has_agent(&self, spec: &LcSpec) -> bool {
        let _ = spec;
        true
    }
    /// The way into the running LC. By default its init's network namespace.
    fn access(&self, spec: &LcSpec) -> Result<Access, LcError> {
        let st = self.status(spec)?;
        match (st.state, st.pid) {
            (LcState::Running, Some(pid)) => {
                Ok(Access::Netns(PathBuf::from(format!("/proc/{pid}/ns/net"))))
            }
            _ => Err(LcError::NotRunning(spec.id.clone())),
        }
    }
    /// Whether the host can read the running LC's system disk consistently. A VM's image is
    /// not (the guest has it mounted): its malware check (702) reads the copy, after 703.
    fn system_disk_readable_live(&self, spec: &LcSpec) -> bool {
        let _ = spec;
        true
    }
}

/// Where the agent lives in an LC's root filesystem.
pub const AGENT_PATH_IN_LC: &str = "usr/sbin/patchover-agent";

/// The host-side name of NIC `index` of LC `id`: `po<id>n<index>` (≤ 15 bytes by the id rule).
pub fn host_port_name(id: &LcId, index: usize) -> String {
    format!("po{id}n{index}")
}

/// The most NICs an LC may have (one digit in the port name keeps it within 15 bytes).
pub const MAX_NICS: usize = 10;

/// The index and host port name of the next NIC of LC `id`, which has `attached` now.
pub fn next_nic(id: &LcId, attached: usize) -> Result<(usize, String), LcError> {
    if attached >= MAX_NICS {
        return Err(LcError::Unsupported {
            lc: id.clone(),
            message: format!("at most {MAX_NICS} NICs per LC"),
        });
    }
    Ok((attached, host_port_name(id, attached)))
}

/// The temporary name of the LC-side end before it moves into the LC.
pub fn peer_port_name(id: &LcId, index: usize) -> String {
    format!("pp{id}n{index}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nics_are_numbered_up_to_the_limit() {
        let id: LcId = "lc1".parse().unwrap();
        assert_eq!(next_nic(&id, 0).unwrap(), (0, "polc1n0".to_owned()));
        assert_eq!(next_nic(&id, 9).unwrap(), (9, "polc1n9".to_owned()));
        assert!(matches!(
            next_nic(&id, MAX_NICS),
            Err(LcError::Unsupported { message, .. }) if message.contains("at most 10 NICs")
        ));
    }
}
