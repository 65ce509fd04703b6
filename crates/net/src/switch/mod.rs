//! The switchover itself: moving the service from the active LC to the standby (seed fig. 13–17,
//! 21–26) without a failed request, checking it, and rolling back on any failure.
//!
//! The switcher knows nothing about LCs: it works on [`Endpoint`]s (a way into the LC, a host
//! port on the bridge, an interface, a MAC and an address), so the orchestrator maps its LCs
//! onto them. What happens inside an LC goes through [`crate::lc::InLc`], for namespaces and
//! for VMs alike.
//! Two things only the orchestrator can do are passed in as [`Hooks`]: telling a service to stop
//! keeping connections alive ([`ServiceControl`]), and work that must happen while neither LC is
//! writing (the disk copier's final catch-up, `in_window`).
//!
//! One module per mode: [`path`] and [`readdress`] share the paused sequence ([`paused`]: hold,
//! drain, window, move, check, release), [`seamless`] switches a NAT without a pause and
//! [`handoff`] is `seamless` for services that write. [`common`] has the checks before anything
//! changes. Every operation on the network goes through a [`Network`] ([`crate::network`]), so
//! each mode's sequence and rollback is tested without root against the recording fake.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use patchover_core::{Ipv4Cidr, MacAddr};
use serde::{Deserialize, Serialize};

use crate::garp::{GarpConfig, GarpError};
use crate::health::{HealthCheck, HealthError, RunInLc};
use crate::hold::HoldError;
use crate::lc::{GuestOutput, InLc, InLcError, LcAccess};
use crate::live::{LiveNetwork, LowPriority};
use crate::netns::NetnsError;
use crate::network::{Network, NftChange};
use crate::nft::{self, NftError};
use crate::rtnl::RtnlError;

mod common;
mod handoff;
mod path;
mod paused;
pub mod phase;
mod readdress;
mod seamless;
#[cfg(test)]
mod testing;

use common::Ctx;
pub use common::check_through;
pub use phase::{Laps, Phase};

/// An error from a hook the orchestrator passed in.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One side of a switch: where a service instance lives on the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// A name for messages (the LC id).
    pub name: String,
    /// The way into the LC: its network namespace (`ns`) or its agent channel (`qemu`).
    /// Endpoints written before VMs had a `netns` path here; they still read.
    #[serde(alias = "netns")]
    pub access: LcAccess,
    /// The host end of the LC's veth (or its tap), a port of the bridge.
    pub host_port: String,
    /// The interface inside the LC, e.g. `eth0`.
    pub iface: String,
    pub mac: MacAddr,
    /// The LC's own address. In `path` mode both LCs have the service address here.
    pub address: Ipv4Cidr,
    /// A substring of the health answer that proves this LC answers (its version, its id).
    pub identity: String,
}

impl Endpoint {
    /// The LC's network namespace, for `ns` LCs.
    pub fn netns(&self) -> Option<&Path> {
        self.access.netns()
    }

    /// Opens the way into the LC (see [`LcAccess::open`]).
    pub fn open(&self) -> Result<Box<dyn InLc>, SwitchError> {
        self.access.open().map_err(on(self))
    }
}

/// Wraps an error from inside `ep`'s LC.
pub(crate) fn on(ep: &Endpoint) -> impl FnOnce(InLcError) -> SwitchError + '_ {
    move |source| SwitchError::InLc {
        lc: ep.name.clone(),
        source,
    }
}

/// How the service moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One NIC identity (same MAC and address on both LCs); the bridge port is swapped.
    Path,
    /// Two NICs; the service address moves and is announced with gratuitous ARP.
    Readdress,
    /// No pause: NAT on the host sends new flows to the standby, old flows finish on the old LC.
    Seamless,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Path => "path",
            Mode::Readdress => "readdress",
            Mode::Seamless => "seamless",
        })
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "path" => Ok(Mode::Path),
            "readdress" => Ok(Mode::Readdress),
            "seamless" => Ok(Mode::Seamless),
            _ => Err(format!(
                "unknown switch mode {s:?}: use path, readdress or seamless"
            )),
        }
    }
}

/// Everything a switch needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchPlan {
    /// The namespace holding the bridge (and the NAT of `seamless`); `None` is this process's.
    pub host_netns: Option<PathBuf>,
    pub bridge: String,
    /// The address clients use.
    pub service: Ipv4Cidr,
    pub from: Endpoint,
    pub to: Endpoint,
    pub mode: Mode,
    pub health: HealthCheck,
    /// Where the final check runs from; `None`: `host_netns` (needs an address on the bridge).
    pub check_from: Option<PathBuf>,
    pub garp: GarpConfig,
    /// How long the old LC may take to finish its connections.
    pub drain_deadline: Duration,
    /// NFQUEUE number for held SYNs (per namespace).
    pub queue: u16,
    /// Lock file that keeps two switches from running at once.
    pub lock_path: PathBuf,
    /// `seamless` only: the service hands off (see [`ServiceControl::park`]) instead of both
    /// LCs serving at once — for services that write (each LC has its own data disk).
    #[serde(default)]
    pub handoff: bool,
    /// The standby was drained by an earlier switch that this one undoes (a switch back to
    /// the LC a switch moved the service away from): [`ServiceControl::resume`] runs there
    /// before its check. A standby that was never drained (the patch cycle's, freshly booted)
    /// is not resumed: a `resume` such as a plain `nginx` fails where the service runs.
    #[serde(default)]
    pub resume_to: bool,
}

impl SwitchPlan {
    /// The plan that hands the service back (`from` and `to` swapped): the LC it goes back to
    /// was drained by this plan's switch, so it is resumed first.
    pub fn reversed(&self) -> SwitchPlan {
        SwitchPlan {
            from: self.to.clone(),
            to: self.from.clone(),
            resume_to: true,
            ..self.clone()
        }
    }
}

/// What the orchestrator does at the switcher's request.
pub trait ServiceControl {
    /// Makes the service on `ep` stop keeping connections alive: finish what is in flight, answer
    /// with `Connection: close`, close idle connections. It keeps listening.
    fn drain(&mut self, ep: &Endpoint) -> Result<(), BoxError>;
    /// Undoes `drain` (the service on `ep` is about to serve again).
    fn resume(&mut self, ep: &Endpoint) -> Result<(), BoxError>;
    /// Hand-off, step 1: the service on `ep` finishes its requests in flight and holds every
    /// later one (on its connections, old and new) without serving it; returns once nothing is
    /// in flight. From then on it writes nothing.
    fn park(&mut self, ep: &Endpoint) -> Result<(), BoxError> {
        Err(format!(
            "the service on {} cannot hand off (no park command)",
            ep.name
        )
        .into())
    }
    /// Hand-off, step 2: the service on `ep` sends the held requests, and every later one, to
    /// `to` (the standby's own address), answering each with `Connection: close`.
    fn forward(&mut self, ep: &Endpoint, to: std::net::SocketAddr) -> Result<(), BoxError> {
        let _ = to;
        Err(format!(
            "the service on {} cannot hand off (no forward command)",
            ep.name
        )
        .into())
    }
    /// Undoes `park` (before any `forward`): the service on `ep` serves its held requests itself.
    fn unpark(&mut self, ep: &Endpoint) -> Result<(), BoxError> {
        Err(format!(
            "the service on {} cannot hand off (no unpark command)",
            ep.name
        )
        .into())
    }
    /// Runs `argv` inside `ep`'s LC by its backend, killed after `timeout`: a `command` service
    /// check ([`crate::health::Probe::Command`]).
    fn run_in(
        &self,
        ep: &Endpoint,
        argv: &[String],
        timeout: Duration,
    ) -> Result<GuestOutput, BoxError> {
        let _ = timeout;
        Err(format!(
            "cannot run {argv:?} in {}: this switch has no way to run programs in LCs",
            ep.name
        )
        .into())
    }
}

/// A [`ServiceControl`] running the programs of `command` checks in one endpoint's LC.
pub(crate) struct RunOn<'a> {
    pub svc: &'a dyn ServiceControl,
    pub ep: &'a Endpoint,
}

impl RunInLc for RunOn<'_> {
    fn run(&self, argv: &[String], timeout: Duration) -> Result<GuestOutput, BoxError> {
        self.svc.run_in(self.ep, argv, timeout)
    }
}

/// For services that close their connections by themselves: the switcher only waits.
#[derive(Debug, Default)]
pub struct NoControl;

impl ServiceControl for NoControl {
    fn drain(&mut self, _: &Endpoint) -> Result<(), BoxError> {
        Ok(())
    }
    fn resume(&mut self, _: &Endpoint) -> Result<(), BoxError> {
        Ok(())
    }
}

/// The orchestrator's part of a switch.
pub struct Hooks<'a> {
    pub service: &'a mut dyn ServiceControl,
    /// Called once the old LC serves no request any more. In `path`/`readdress` the standby
    /// serves nothing yet either (the disk copier's final catch-up goes here); in `seamless` the
    /// standby is already serving (see docs/network-switch.md for the data disk). An error rolls
    /// the switch back (`path`/`readdress`) or is reported (`seamless`).
    pub in_window: &'a mut dyn FnMut(&SwitchPlan) -> Result<(), BoxError>,
}

/// What a switch did and how long each part took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwitchReport {
    pub mode: Mode,
    pub from: String,
    pub to: String,
    /// Time new connections were held (0 in `seamless`).
    pub pause_ms: f64,
    /// Time the old LC took to finish its connections.
    pub drain_ms: f64,
    /// Connections still open on the old LC at the drain deadline (seamless only; 0 otherwise).
    pub leftover_connections: usize,
    /// How many times the drain looked at the old LC's connections.
    #[serde(default)]
    pub drain_looks: u32,
    /// How long the drain's first look took (on a namespace LC one walk of the kernel's TCP
    /// table, whose cost grows with every socket in it, `TIME_WAIT` ones included).
    #[serde(default)]
    pub drain_first_look_ms: f64,
    /// From the decision to the first request the standby served through the service address
    /// (the switcher's own check).
    pub first_request_ms: f64,
    /// Time spent in the `in_window` hook.
    pub window_ms: f64,
    /// New connections held and released.
    pub held_syns: usize,
    /// Clients of held connections the standby was told about before the release, so that it
    /// answers them without an ARP round first (see `hold`).
    #[serde(default)]
    pub primed_neighbours: usize,
    /// Gratuitous ARP frames sent in the first burst.
    pub garp_sent: u32,
    /// Where the time went, phase by phase from the decision on ([`phase`]): consecutive,
    /// so they add up; in `path`/`readdress` the pause is the phases from `drain` to
    /// `release`.
    #[serde(default)]
    pub phases: Vec<Phase>,
}

impl SwitchReport {
    /// The report of a switch of `mode` from `from` to `to` with every figure zero (each mode
    /// fills in its own).
    pub fn new(mode: Mode, from: &str, to: &str) -> SwitchReport {
        SwitchReport {
            mode,
            from: from.to_owned(),
            to: to.to_owned(),
            pause_ms: 0.0,
            drain_ms: 0.0,
            leftover_connections: 0,
            drain_looks: 0,
            drain_first_look_ms: 0.0,
            first_request_ms: 0.0,
            window_ms: 0.0,
            held_syns: 0,
            primed_neighbours: 0,
            garp_sent: 0,
            phases: Vec::new(),
        }
    }
}

/// The result of a successful switch: the report and the pending ARP refreshes.
#[derive(Debug)]
pub struct Switched {
    pub report: SwitchReport,
    /// Sends the later gratuitous ARP bursts; join it before the process exits.
    pub refresh: Option<std::thread::JoinHandle<()>>,
}

/// A switch failed.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("switch: invalid plan: {0}")]
    Plan(String),
    #[error("switch: another switch holds {lock}; wait for it to finish")]
    Busy { lock: PathBuf },
    #[error("switch: cannot use lock file {lock}")]
    Lock {
        lock: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "switch: bridge {bridge:?} does not exist; create it or fix network.bridge in the config"
    )]
    NoBridge { bridge: String },
    #[error(
        "switch: the service address {addr} is answered by {mac}, which is neither {from} nor {to}; find the host that took it, nothing was changed"
    )]
    AddressTaken {
        addr: Ipv4Addr,
        mac: MacAddr,
        from: String,
        to: String,
    },
    #[error("switch: the live path is not what the plan says: {0}; nothing was changed")]
    State(String),
    #[error(
        "switch: the standby {to} is not ready (is it booted and its service started?); nothing was changed"
    )]
    StandbyNotReady {
        to: String,
        #[source]
        source: HealthError,
    },
    #[error(
        "switch: the old LC {from} still has {left} connections after {deadline:?}; nothing was changed"
    )]
    DrainTimeout {
        from: String,
        left: usize,
        deadline: Duration,
    },
    #[error("switch: the {hook} hook failed")]
    Hook {
        hook: &'static str,
        #[source]
        source: BoxError,
    },
    #[error("switch: netlink")]
    Rtnl(#[from] RtnlError),
    #[error("switch: holding new connections")]
    Hold(#[from] HoldError),
    #[error("switch: nftables")]
    Nft(#[from] NftError),
    #[error("switch: announcing the address")]
    Garp(#[from] GarpError),
    #[error("switch: namespace")]
    Netns(#[from] NetnsError),
    #[error("switch: inside {lc}")]
    InLc {
        lc: String,
        #[source]
        source: InLcError,
    },
    /// `seen`: what the checker's namespace and the standby saw then (routes, neighbour
    /// entries, addresses, listening sockets; bounded), so one failure tells its cause.
    #[error(
        "switch: the standby {to} did not answer on the service address (what the check saw: {seen})"
    )]
    Check {
        to: String,
        seen: String,
        #[source]
        source: Box<HealthError>,
    },
    #[error("switch to {to} failed and was rolled back; the service stays on {from}")]
    RolledBack {
        from: String,
        to: String,
        #[source]
        cause: Box<SwitchError>,
    },
    #[error(
        "switch to {to} failed AND the rollback failed ({rollback}); check the bridge and addresses by hand"
    )]
    RollbackFailed {
        to: String,
        rollback: String,
        #[source]
        cause: Box<SwitchError>,
    },
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Checks a plan for mistakes that need no system access.
pub fn validate(plan: &SwitchPlan) -> Result<(), SwitchError> {
    let bad = |m: String| Err(SwitchError::Plan(m));
    if plan.from.name == plan.to.name {
        return bad(format!("from and to are both {}", plan.from.name));
    }
    if plan.from.host_port == plan.to.host_port {
        return bad(format!(
            "{} and {} share host port {}",
            plan.from.name, plan.to.name, plan.from.host_port
        ));
    }
    if plan.health.port == 0 {
        return bad("the health check port is 0".into());
    }
    if plan.handoff && plan.mode != Mode::Seamless {
        return bad(format!(
            "a hand-off belongs to seamless mode; {} mode moves the service in a pause",
            plan.mode
        ));
    }
    let s = plan.service.addr;
    match plan.mode {
        Mode::Path => {
            if plan.from.address.addr != s || plan.to.address.addr != s {
                return bad(format!(
                    "path mode moves one NIC identity: both LCs need the service address {s} (have {} and {})",
                    plan.from.address, plan.to.address
                ));
            }
            if plan.from.mac != plan.to.mac {
                return bad(format!(
                    "path mode moves one NIC identity: both LCs need the same MAC (have {} and {})",
                    plan.from.mac, plan.to.mac
                ));
            }
        }
        Mode::Readdress | Mode::Seamless => {
            if plan.from.address.addr == s || plan.to.address.addr == s {
                return bad(format!(
                    "{} mode needs own addresses different from the service address {s}",
                    plan.mode
                ));
            }
            if plan.from.address.addr == plan.to.address.addr {
                return bad(format!("both LCs have address {}", plan.from.address));
            }
            if plan.mode == Mode::Readdress && plan.from.mac == plan.to.mac {
                return bad("readdress mode needs two NICs with different MACs".into());
            }
        }
    }
    Ok(())
}

/// Held while a switch runs; a second switch on the same lock file fails with `Busy`.
#[derive(Debug)]
pub struct SwitchLock(#[allow(dead_code)] File);

/// Takes the switch lock at `path` without waiting.
pub fn lock(path: &Path) -> Result<SwitchLock, SwitchError> {
    let err = |source| SwitchError::Lock {
        lock: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(err)?;
    match f.try_lock() {
        Ok(()) => Ok(SwitchLock(f)),
        Err(std::fs::TryLockError::WouldBlock) => Err(SwitchError::Busy {
            lock: path.to_path_buf(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(err(e)),
    }
}

/// Moves the service as `plan` says. On any failure after something changed, everything is put
/// back and [`SwitchError::RolledBack`] is returned; the service then stays on `plan.from`.
pub fn switch(plan: &SwitchPlan, hooks: &mut Hooks<'_>) -> Result<Switched, SwitchError> {
    validate(plan)?;
    let _lock = wait_for_lock(&plan.lock_path)?;
    // `seamless` has no pause: nothing it does is urgent for any client, while all of it competes
    // with the service for the CPU on a busy host, so it yields (see `LowPriority`). It starts
    // here so that the threads and processes of the switch inherit it: the namespace workers (the
    // old LC's worker polls the drain, and each poll walks the kernel's whole TCP socket table,
    // tens of thousands of `TIME_WAIT` sockets under new-connection load) and the `nft` runs.
    let _low = (plan.mode == Mode::Seamless && !plan.handoff).then(LowPriority::enter);
    let net = LiveNetwork::open(plan.host_netns.as_deref(), plan.check_from.as_deref())?;
    // Checked from the bridge's namespace: through the bridge (see `checking_via`).
    let net = match plan.check_from {
        None => net.checking_via(&plan.bridge),
        Some(_) => net,
    };
    run(&net, plan, hooks)
}

/// [`switch`] through another [`Network`] (the recording fake in tests). The calling thread's
/// priority is left as it is.
pub fn switch_with(
    net: &dyn Network,
    plan: &SwitchPlan,
    hooks: &mut Hooks<'_>,
) -> Result<Switched, SwitchError> {
    validate(plan)?;
    let _lock = wait_for_lock(&plan.lock_path)?;
    run(net, plan, hooks)
}

/// A gratuitous ARP refresh holds the lock for a few milliseconds; a switch does far longer.
fn wait_for_lock(path: &Path) -> Result<SwitchLock, SwitchError> {
    let start = Instant::now();
    loop {
        match lock(path) {
            Err(SwitchError::Busy { .. }) if start.elapsed() < Duration::from_millis(100) => {
                std::thread::sleep(Duration::from_millis(2));
            }
            r => return r,
        }
    }
}

/// The checks, then the mode's own sequence.
fn run(
    net: &dyn Network,
    plan: &SwitchPlan,
    hooks: &mut Hooks<'_>,
) -> Result<Switched, SwitchError> {
    let ctx = Ctx::checked(net, plan, hooks)?;
    let res = match plan.mode {
        Mode::Path => paused::run(&ctx, &path::Path, hooks),
        Mode::Readdress => paused::run(&ctx, &readdress::Readdress, hooks),
        Mode::Seamless if plan.handoff => handoff::run(&ctx, hooks),
        Mode::Seamless => seamless::run(&ctx, hooks),
    };
    match &res {
        Ok(sw) => tracing::info!(
            mode = %plan.mode, from = %plan.from.name, to = %plan.to.name,
            pause_ms = sw.report.pause_ms, drain_ms = sw.report.drain_ms,
            first_request_ms = sw.report.first_request_ms, "switched"
        ),
        Err(e) => tracing::error!(error = %e, "switch failed"),
    }
    res
}

/// Hands the service back from `plan.to` to `plan.from`, with the same checks and guarantees.
pub fn switch_back(plan: &SwitchPlan, hooks: &mut Hooks<'_>) -> Result<Switched, SwitchError> {
    switch(&plan.reversed(), hooks)
}

/// Installs the initial service NAT of `seamless` mode: `service` → `target`.
pub fn seamless_setup(
    host_netns: Option<&Path>,
    service: Ipv4Addr,
    target: Ipv4Addr,
) -> Result<(), NftError> {
    let change = NftChange::ServiceNat { service, target };
    nft::apply(host_netns, "service NAT setup", &change.batch())
}

/// Removes the switcher's nftables tables for `service` (NAT and MAC fix).
pub fn teardown(host_netns: Option<&Path>, service: Ipv4Addr) -> Result<(), NftError> {
    let ip = NftChange::Remove {
        family: "ip",
        service,
    };
    nft::apply(host_netns, "remove service NAT", &ip.batch())?;
    let bridge = NftChange::Remove {
        family: "bridge",
        service,
    };
    nft::apply(host_netns, "remove MAC fix", &bridge.batch())
}

pub(crate) fn rolled_back(
    plan: &SwitchPlan,
    cause: SwitchError,
    rollback_errors: Vec<String>,
) -> SwitchError {
    if rollback_errors.is_empty() {
        SwitchError::RolledBack {
            from: plan.from.name.clone(),
            to: plan.to.name.clone(),
            cause: Box::new(cause),
        }
    } else {
        SwitchError::RollbackFailed {
            to: plan.to.name.clone(),
            rollback: rollback_errors.join("; "),
            cause: Box::new(cause),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(name: &str, addr: &str, mac: u8) -> Endpoint {
        Endpoint {
            name: name.into(),
            access: LcAccess::Netns(PathBuf::from("/nonexistent")),
            host_port: format!("po{name}n0"),
            iface: "eth0".into(),
            mac: MacAddr([2, 0, 0, 0, 0, mac]),
            address: addr.parse().unwrap(),
            identity: name.into(),
        }
    }

    fn plan(mode: Mode, a: Endpoint, b: Endpoint) -> SwitchPlan {
        SwitchPlan {
            host_netns: None,
            bridge: "br".into(),
            service: "10.0.0.10/24".parse().unwrap(),
            from: a,
            to: b,
            mode,
            health: HealthCheck::new(8080, "/version", ""),
            check_from: None,
            garp: GarpConfig::default(),
            drain_deadline: Duration::from_secs(1),
            queue: 1,
            lock_path: PathBuf::from("/nonexistent/lock"),
            handoff: false,
            resume_to: false,
        }
    }

    #[test]
    fn path_mode_needs_one_identity() {
        let p = plan(
            Mode::Path,
            ep("a", "10.0.0.10/24", 1),
            ep("b", "10.0.0.10/24", 1),
        );
        validate(&p).unwrap();
        let p = plan(
            Mode::Path,
            ep("a", "10.0.0.10/24", 1),
            ep("b", "10.0.0.10/24", 2),
        );
        assert!(matches!(validate(&p), Err(SwitchError::Plan(m)) if m.contains("same MAC")));
        let p = plan(
            Mode::Path,
            ep("a", "10.0.0.10/24", 1),
            ep("b", "10.0.0.11/24", 1),
        );
        assert!(matches!(validate(&p), Err(SwitchError::Plan(m)) if m.contains("service address")));
    }

    #[test]
    fn readdress_needs_own_addresses_and_two_macs() {
        let p = plan(
            Mode::Readdress,
            ep("a", "10.0.0.2/24", 1),
            ep("b", "10.0.0.3/24", 2),
        );
        validate(&p).unwrap();
        let p = plan(
            Mode::Readdress,
            ep("a", "10.0.0.2/24", 1),
            ep("b", "10.0.0.3/24", 1),
        );
        assert!(validate(&p).is_err());
        let p = plan(
            Mode::Seamless,
            ep("a", "10.0.0.10/24", 1),
            ep("b", "10.0.0.3/24", 2),
        );
        assert!(validate(&p).is_err());
    }

    /// Issue 20: which LC answers the standby's check is proven by patchover (the check is
    /// made inside the standby to one of its own addresses), not by what the service prints.
    #[test]
    fn a_standby_without_its_own_address_is_not_ready_and_nothing_changes() {
        for mode in [Mode::Readdress, Mode::Seamless] {
            let bed = super::testing::bed(mode);
            let lc = crate::Network::open_lc(&bed.net, &bed.plan.to).unwrap();
            lc.del_address("eth0", bed.plan.to.address).unwrap();
            bed.net.clear();
            let e = bed.switch().unwrap_err();
            assert!(
                matches!(
                    &e,
                    SwitchError::StandbyNotReady {
                        source: HealthError::NotOwnAddress { addr, .. },
                        ..
                    } if *addr == bed.plan.to.address.addr
                ),
                "{mode}: {e:?}"
            );
            assert!(
                !bed.net.ops().iter().any(|o| o.starts_with("b: get")),
                "{mode}: no check was sent off the LC: {:?}",
                bed.net.ops()
            );
            assert!(
                !bed.net
                    .ops()
                    .iter()
                    .any(|o| o.contains("drain") || o.contains("nft")),
                "{mode}: nothing changed: {:?}",
                bed.net.ops()
            );
        }
    }

    #[test]
    fn handoff_is_for_seamless_only() {
        let mut p = plan(
            Mode::Readdress,
            ep("a", "10.0.0.2/24", 1),
            ep("b", "10.0.0.3/24", 2),
        );
        p.handoff = true;
        assert!(
            matches!(validate(&p), Err(SwitchError::Plan(m)) if m.contains("hand-off belongs to seamless"))
        );
        p.mode = Mode::Seamless;
        validate(&p).unwrap();
    }

    #[test]
    fn same_lc_twice_is_rejected() {
        let p = plan(
            Mode::Seamless,
            ep("a", "10.0.0.2/24", 1),
            ep("a", "10.0.0.3/24", 2),
        );
        assert!(matches!(validate(&p), Err(SwitchError::Plan(m)) if m.contains("both a")));
    }

    #[test]
    fn reversed_swaps_sides() {
        let p = plan(
            Mode::Seamless,
            ep("a", "10.0.0.2/24", 1),
            ep("b", "10.0.0.3/24", 2),
        );
        let r = p.reversed();
        assert_eq!(r.from.name, "b");
        assert_eq!(r.to.name, "a");
        // a, where the service goes back, was drained by p's switch: it is resumed first.
        assert!(r.resume_to && !p.resume_to);
        assert_eq!(
            r.reversed(),
            SwitchPlan {
                resume_to: true,
                ..p
            }
        );
    }

    #[test]
    fn endpoints_read_the_shape_before_vms() {
        let old = r#"{"name":"lc1","netns":"/proc/42/ns/net","host_port":"polc1n0","iface":"eth0",
            "mac":"02:00:00:00:00:01","address":"10.0.0.2/24","identity":"lc1"}"#;
        let ep: Endpoint = serde_json::from_str(old).unwrap();
        assert_eq!(ep.access, LcAccess::Netns(PathBuf::from("/proc/42/ns/net")));
        assert_eq!(ep.netns(), Some(Path::new("/proc/42/ns/net")));
        let vm = Endpoint {
            access: LcAccess::Agent {
                socket: PathBuf::from("/run/po/lc/lc2/agent.sock"),
            },
            ..ep
        };
        let text = serde_json::to_string(&vm).unwrap();
        assert!(text.contains(r#""access":{"agent":{"socket":"/run/po/lc/lc2/agent.sock"}}"#));
        assert_eq!(serde_json::from_str::<Endpoint>(&text).unwrap(), vm);
        assert_eq!(vm.netns(), None);
    }

    #[test]
    fn second_lock_is_busy() {
        let dir = std::env::temp_dir().join(format!("po-lock-{}", std::process::id()));
        let path = dir.join("switch.lock");
        let l = lock(&path).unwrap();
        assert!(matches!(lock(&path), Err(SwitchError::Busy { .. })));
        drop(l);
        lock(&path).unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }
}
