//! The real [`Network`]: what a switch does to this host's network (see [`crate::network`]).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use patchover_core::MacAddr;

use crate::diag::run_in;
use crate::garp;
use crate::health::{self, HealthCheck, HealthError};
use crate::hold::{HoldError, HoldStats, SynHold};
use crate::lc::{InLc, InLcError};
use crate::netns::{NetnsError, NsWorker, idle_command_in};
use crate::network::{Held, HoldSpec, Network, NftChange};
use crate::nft::{self, NftError};
use crate::rtnl::{LinkInfo, Rtnl, RtnlError};
use crate::switch::{Endpoint, SwitchError};

/// This host's network, as seen from `host_netns` (the bridge, the NAT, the SYN hold) and
/// `check_from` (the service check).
pub struct LiveNetwork {
    host_netns: Option<PathBuf>,
    check_from: Option<PathBuf>,
    rtnl: Rtnl,
    /// An `nft` started ahead of time for the next change.
    nft: Mutex<Option<nft::Prepared>>,
    /// A worker in the check namespace, started ahead of time.
    check: Mutex<Option<NsWorker>>,
    /// The device checks leave by (see [`LiveNetwork::checking_via`]).
    via: Option<String>,
}

impl LiveNetwork {
    /// Opens netlink in `host_netns`; checks run from `check_from`, or `host_netns` if `None`.
    pub fn open(
        host_netns: Option<&Path>,
        check_from: Option<&Path>,
    ) -> Result<LiveNetwork, RtnlError> {
        Ok(LiveNetwork {
            host_netns: host_netns.map(Path::to_path_buf),
            check_from: check_from.map(Path::to_path_buf),
            rtnl: Rtnl::open(host_netns)?,
            nft: Mutex::new(None),
            check: Mutex::new(None),
            via: None,
        })
    }

    /// Checks leave through `device` (bound to it), whatever the check namespace's routes say.
    /// A switch checking from the bridge's own namespace checks through the bridge: there the
    /// service address's neighbour entry points at the LC that has it, while a route of
    /// another interface with an address in the same subnet (added earlier, so it wins) would
    /// send the check somewhere no LC of this switch is.
    pub fn checking_via(self, device: &str) -> LiveNetwork {
        LiveNetwork {
            via: Some(device.to_owned()),
            ..self
        }
    }

    fn host_ns(&self) -> Option<&Path> {
        self.host_netns.as_deref()
    }

    fn check_ns(&self) -> Option<&Path> {
        self.check_from.as_deref().or(self.host_ns())
    }
}

impl Network for LiveNetwork {
    fn link(&self, name: &str) -> Result<Option<LinkInfo>, RtnlError> {
        self.rtnl.link(name)
    }

    fn set_controller(&self, port: u32, bridge: Option<u32>) -> Result<(), RtnlError> {
        self.rtnl.set_controller(port, bridge)
    }

    fn set_up(&self, port: u32, up: bool) -> Result<(), RtnlError> {
        self.rtnl.set_up(port, up)
    }

    fn replace_neighbour(
        &self,
        bridge: u32,
        addr: Ipv4Addr,
        mac: MacAddr,
    ) -> Result<(), RtnlError> {
        self.rtnl.replace_neighbour(bridge, addr, mac)
    }

    fn who_has(
        &self,
        bridge: &str,
        bridge_mac: MacAddr,
        addr: Ipv4Addr,
    ) -> Result<Vec<MacAddr>, SwitchError> {
        let (br, ns) = (bridge.to_string(), self.host_netns.clone());
        Ok(crate::netns::in_netns(self.host_ns(), move || {
            garp::who_has_here(ns, &br, bridge_mac, addr, garp::CONFLICT_WAIT)
        })??)
    }

    fn nat_target(&self, service: Ipv4Addr) -> Result<Option<Ipv4Addr>, NftError> {
        nft::service_nat_target(self.host_ns(), service)
    }

    fn prepare_nft(&self) -> Result<(), NftError> {
        let p = nft::Prepared::spawn(self.host_ns())?;
        *self.nft.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        Ok(())
    }

    fn nft(&self, what: &str, change: &NftChange) -> Result<(), NftError> {
        let prepared = self.nft.lock().unwrap_or_else(|e| e.into_inner()).take();
        match prepared {
            Some(p) => p.apply(what, &change.batch()),
            None => nft::apply(self.host_ns(), what, &change.batch()),
        }
    }

    fn hold(&self, spec: &HoldSpec) -> Result<Box<dyn Held>, HoldError> {
        Ok(Box::new(SynHold::start(
            self.host_ns(),
            spec.service,
            spec.port,
            spec.queue,
            spec.mark,
            spec.prime.clone(),
        )?))
    }

    fn prepare_check(&self) -> Result<(), NetnsError> {
        let w = NsWorker::start(self.check_ns())?;
        *self.check.lock().unwrap_or_else(|e| e.into_inner()) = Some(w);
        Ok(())
    }

    fn check(&self, addr: Ipv4Addr, hc: &HealthCheck) -> Result<(), HealthError> {
        let worker = self.check.lock().unwrap_or_else(|e| e.into_inner());
        match &*worker {
            Some(w) => health::check_on(w, addr, hc, self.via.as_deref()),
            None => health::check(self.check_ns(), addr, hc, self.via.as_deref()),
        }
    }

    fn check_path(&self, addr: Ipv4Addr) -> String {
        let (ns, a) = (self.check_ns(), addr.to_string());
        let mut parts = vec![run_in(ns, "route", "ip", &["-o", "route", "get", &a])];
        if let Some(dev) = &self.via {
            let label = format!("route via {dev}");
            let args = ["-o", "route", "get", &a, "oif", dev];
            parts.push(run_in(ns, &label, "ip", &args));
        }
        parts.push(run_in(ns, "neighbours", "ip", &["neigh", "show", "to", &a]));
        parts.join("; ")
    }

    fn check_neighbour(&self, addr: Ipv4Addr) -> Result<Option<MacAddr>, RtnlError> {
        let opened;
        let rtnl = match &self.check_from {
            None => &self.rtnl,
            Some(ns) => {
                opened = Rtnl::open(Some(ns))?;
                &opened
            }
        };
        // A check bound to a device used that device's entry.
        let index = match &self.via {
            Some(dev) => Some(rtnl.need_link(dev)?.index),
            None => None,
        };
        rtnl.neighbour(addr, index)
    }

    fn forget_udp_flows(&self, old: Ipv4Addr) {
        forget_udp_flows(self.host_ns(), old)
    }

    fn open_lc(&self, ep: &Endpoint) -> Result<Box<dyn InLc>, InLcError> {
        ep.access.open()
    }
}

impl Held for SynHold {
    fn release(self: Box<Self>) -> Result<HoldStats, HoldError> {
        SynHold::release(*self)
    }
}

/// UDP has no end: at the deadline its conntrack entries to the old LC are deleted so the
/// next datagram of each flow is NATed to the standby.
fn forget_udp_flows(host_netns: Option<&Path>, old: Ipv4Addr) {
    // `conntrack` dumps the host's whole connection-tracking table into user space (every TCP
    // flow of the last two minutes: ~100,000 at 5,000 new connections per second). At nice 19
    // that still stalled the service for 10–15 ms in some switches (window p99.9 up to
    // 6.5 ms over steady, new connections); under `SCHED_IDLE` it did not. On a host whose
    // CPUs are saturated an idle task barely runs, so after `IDLE_GRACE` it goes back to
    // normal scheduling at nice 19: the switch never waits long for it.
    const IDLE_GRACE: Duration = Duration::from_secs(2);
    let run = || -> Result<std::process::Output, String> {
        let mut cmd = idle_command_in(host_netns, "conntrack").map_err(|e| e.to_string())?;
        cmd.args(["-D", "-p", "udp", "--reply-src", &old.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| e.to_string())?;
        let start = Instant::now();
        while child.try_wait().map_err(|e| e.to_string())?.is_none() {
            if start.elapsed() >= IDLE_GRACE {
                // `nsenter` and `chrt` exec: the child's PID is conntrack's.
                unidle(child.id() as libc::pid_t);
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        child.wait_with_output().map_err(|e| e.to_string())
    };
    match run() {
        // `nsenter` and `chrt` exit 126/127 when they cannot start their program.
        Ok(out) if matches!(out.status.code(), Some(126 | 127)) => tracing::warn!(
            error = %String::from_utf8_lossy(&out.stderr).trim(),
            "cannot move UDP flows (install conntrack)"
        ),
        // conntrack exits 1 when nothing matched: that is fine.
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot move UDP flows (install conntrack and util-linux)")
        }
    }
}

/// Puts process `pid` back under normal scheduling, at nice 19 (it ran `SCHED_IDLE`).
fn unidle(pid: libc::pid_t) {
    let normal = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscalls on a PID we started and have not reaped; `normal` outlives them.
    let ok = unsafe {
        libc::sched_setscheduler(pid, libc::SCHED_OTHER, &normal) == 0
            && libc::setpriority(libc::PRIO_PROCESS, pid as libc::id_t, 19) == 0
    };
    if !ok {
        tracing::debug!(pid, error = %std::io::Error::last_os_error(), "cannot lift an idle process");
    }
}

/// The calling thread at the lowest CPU priority (nice 19) until dropped. Threads and
/// processes it starts meanwhile inherit it.
pub(crate) struct LowPriority {
    tid: libc::id_t,
    before: Option<libc::c_int>,
}

impl LowPriority {
    pub(crate) fn enter() -> LowPriority {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as libc::id_t;
        // getpriority can return -1 legitimately: errno tells an error apart.
        // SAFETY: errno is this thread's; getpriority reads the scheduler state only.
        let before = unsafe {
            *libc::__errno_location() = 0;
            let p = libc::getpriority(libc::PRIO_PROCESS, tid);
            (*libc::__errno_location() == 0).then_some(p)
        };
        // SAFETY: PRIO_PROCESS with a TID changes that thread only.
        if before.is_some() && unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 19) } != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower the switcher's priority");
        }
        LowPriority { tid, before }
    }
}

impl Drop for LowPriority {
    fn drop(&mut self) {
        if let Some(p) = self.before
            // SAFETY: as in `enter`; raising it back needs CAP_SYS_NICE, which root has.
            && unsafe { libc::setpriority(libc::PRIO_PROCESS, self.tid, p) } != 0
        {
            tracing::warn!(error = %std::io::Error::last_os_error(), "cannot restore the switcher's priority");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_process_is_lifted_to_nice_19() {
        let mut child = std::process::Command::new("chrt")
            .args(["--idle", "0", "sleep", "5"])
            .spawn()
            .unwrap();
        let pid = child.id() as libc::pid_t;
        // (policy, nice) from /proc/<pid>/stat: fields 41 and 19.
        let sched = || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            let f = |n| crate::netns::tests::stat_field(&stat, n).to_owned();
            (f(41), f(19))
        };
        let start = Instant::now();
        while sched().0 != libc::SCHED_IDLE.to_string() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "chrt did not exec"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        unidle(pid);
        assert_eq!(sched(), (libc::SCHED_OTHER.to_string(), "19".to_owned()));
        let _ = child.kill();
        let _ = child.wait();
    }
}
