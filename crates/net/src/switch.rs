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

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use patchover_core::{Ipv4Cidr, MacAddr};
use serde::{Deserialize, Serialize};

use crate::garp::{self, GarpConfig, GarpError};
use crate::health::{self, HealthCheck, HealthError};
use crate::hold::{HoldError, Prime, SynHold};
use crate::lc::{InLc, InLcError, LcAccess};
use crate::netns::{NetnsError, NsWorker, idle_command_in};
use crate::nft::{self, NftError};
use crate::rtnl::{Rtnl, RtnlError};

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
fn on(ep: &Endpoint) -> impl FnOnce(InLcError) -> SwitchError + '_ {
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
}

impl SwitchPlan {
    /// The plan that hands the service back (`from` and `to` swapped).
    pub fn reversed(&self) -> SwitchPlan {
        SwitchPlan {
            from: self.to.clone(),
            to: self.from.clone(),
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
}

/// The result of a successful switch: the report and the pending ARP refreshes.
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
    #[error("switch: the standby {to} did not answer on the service address")]
    Check {
        to: String,
        #[source]
        source: HealthError,
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
    // A gratuitous ARP refresh holds the lock for a few milliseconds; a switch does far longer.
    let _lock = {
        let start = Instant::now();
        loop {
            match lock(&plan.lock_path) {
                Err(SwitchError::Busy { .. }) if start.elapsed() < Duration::from_millis(100) => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                r => break r?,
            }
        }
    };
    // `seamless` has no pause: nothing it does is urgent for any client, while all of it competes
    // with the service for the CPU on a busy host, so it yields (see `LowPriority`). It starts
    // here so that the threads and processes of the switch inherit it: the namespace workers (the
    // old LC's worker polls the drain, and each poll walks the kernel's whole TCP socket table,
    // tens of thousands of `TIME_WAIT` sockets under new-connection load) and the `nft` runs.
    let _low = (plan.mode == Mode::Seamless && !plan.handoff).then(LowPriority::enter);
    let host_ns = plan.host_netns.as_deref();
    let host = Rtnl::open(host_ns)?;
    let bridge = host
        .link(&plan.bridge)?
        .ok_or_else(|| SwitchError::NoBridge {
            bridge: plan.bridge.clone(),
        })?;
    let from_port = host.need_link(&plan.from.host_port)?;
    let to_port = host.need_link(&plan.to.host_port)?;
    let s = plan.service.addr;
    // One way into each LC for the whole switch (a namespace worker, or the agent channel).
    let from_lc = plan.from.open()?;
    let to_lc = plan.to.open()?;

    // The live path must be what the plan says, or we would "switch" something else.
    match plan.mode {
        Mode::Path => {
            if from_port.controller != Some(bridge.index) {
                return Err(SwitchError::State(format!(
                    "{} ({}) is not a port of {}; the service is not on {}",
                    plan.from.host_port, plan.from.name, plan.bridge, plan.from.name
                )));
            }
            if to_port.controller == Some(bridge.index) {
                return Err(SwitchError::State(format!(
                    "{} ({}) is already a port of {}: two LCs would share one MAC",
                    plan.to.host_port, plan.to.name, plan.bridge
                )));
            }
        }
        Mode::Readdress => {
            for (ep, port) in [(&plan.from, &from_port), (&plan.to, &to_port)] {
                if port.controller != Some(bridge.index) {
                    return Err(SwitchError::State(format!(
                        "{} ({}) is not a port of {}",
                        ep.host_port, ep.name, plan.bridge
                    )));
                }
            }
            let has = |ep: &Endpoint, lc: &dyn InLc| -> Result<bool, SwitchError> {
                Ok(lc
                    .addresses(&ep.iface)
                    .map_err(on(ep))?
                    .iter()
                    .any(|a| a.addr == s))
            };
            if !has(&plan.from, &*from_lc)? {
                return Err(SwitchError::State(format!(
                    "{} does not hold the service address {s}",
                    plan.from.name
                )));
            }
            if has(&plan.to, &*to_lc)? {
                return Err(SwitchError::State(format!(
                    "{} already holds the service address {s}",
                    plan.to.name
                )));
            }
        }
        Mode::Seamless => {
            let target = nft::service_nat_target(host_ns, s)?;
            if target != Some(plan.from.address.addr) {
                return Err(SwitchError::State(format!(
                    "the service NAT of {s} points at {} instead of {} ({}); run seamless setup first",
                    target.map_or("nothing".to_string(), |t| t.to_string()),
                    plan.from.address.addr,
                    plan.from.name
                )));
            }
        }
    }

    // Nobody else may answer for the service address on the bridge.
    if plan.mode != Mode::Seamless
        && let Some(bridge_mac) = bridge.mac
    {
        let (br, ns) = (plan.bridge.clone(), plan.host_netns.clone());
        let owners = crate::netns::in_netns(host_ns, move || {
            garp::who_has_here(ns, &br, bridge_mac, s, Duration::from_millis(30))
        })??;
        if let Some(mac) = owners
            .into_iter()
            .find(|m| *m != plan.from.mac && *m != plan.to.mac)
        {
            return Err(SwitchError::AddressTaken {
                addr: s,
                mac,
                from: plan.from.name.clone(),
                to: plan.to.name.clone(),
            });
        }
    }

    // The standby must answer before we touch anything.
    hooks
        .service
        .resume(&plan.to)
        .map_err(|source| SwitchError::Hook {
            hook: "resume",
            source,
        })?;
    health::check_in(
        &*to_lc,
        plan.to.address.addr,
        &plan.health.expecting(&plan.to.identity),
    )
    .map_err(|source| SwitchError::StandbyNotReady {
        to: plan.to.name.clone(),
        source,
    })?;

    let t0 = Instant::now();
    let ctx = Ctx {
        plan,
        host: &host,
        bridge: bridge.index,
        from_port: from_port.index,
        to_port: to_port.index,
        from_lc,
        to_lc,
        t0,
    };
    let res = match plan.mode {
        Mode::Path | Mode::Readdress => ctx.paused(hooks),
        Mode::Seamless if plan.handoff => ctx.handoff(hooks),
        Mode::Seamless => ctx.seamless(hooks),
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
    nft::apply(
        host_netns,
        "service NAT setup",
        &nft::service_nat_batch(service, target),
    )
}

/// Removes the switcher's nftables tables for `service` (NAT and MAC fix).
pub fn teardown(host_netns: Option<&Path>, service: Ipv4Addr) -> Result<(), NftError> {
    nft::apply(
        host_netns,
        "remove service NAT",
        &nft::remove_batch("ip", service),
    )?;
    nft::apply(
        host_netns,
        "remove MAC fix",
        &nft::remove_batch("bridge", service),
    )
}

/// How often the drain is polled while new connections are held (the pause waits on it).
const PAUSED_DRAIN_POLL: Duration = Duration::from_micros(500);
/// How often the drain is polled once the standby serves (nothing waits on it but the report).
const BACKGROUND_DRAIN_POLL: Duration = Duration::from_millis(5);

/// The calling thread at the lowest CPU priority (nice 19) until dropped. Threads and
/// processes it starts meanwhile inherit it.
struct LowPriority {
    tid: libc::id_t,
    before: Option<libc::c_int>,
}

impl LowPriority {
    fn enter() -> LowPriority {
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

/// Firewall mark of SYNs released after a hold.
const HELD_MARK: u32 = 0x504f_4844;

/// Everything opened before the pause, so the pause only does the switching itself.
struct Ready {
    check_w: NsWorker,
    nft: Option<nft::Prepared>,
}

struct Ctx<'a> {
    plan: &'a SwitchPlan,
    host: &'a Rtnl,
    bridge: u32,
    from_port: u32,
    to_port: u32,
    from_lc: Box<dyn InLc>,
    to_lc: Box<dyn InLc>,
    t0: Instant,
}

impl Ctx<'_> {
    fn host_ns(&self) -> Option<&Path> {
        self.plan.host_netns.as_deref()
    }

    /// This switch's report with every figure zero (the modes fill in theirs).
    fn report(&self) -> SwitchReport {
        SwitchReport {
            mode: self.plan.mode,
            from: self.plan.from.name.clone(),
            to: self.plan.to.name.clone(),
            pause_ms: 0.0,
            drain_ms: 0.0,
            leftover_connections: 0,
            first_request_ms: 0.0,
            window_ms: 0.0,
            held_syns: 0,
            primed_neighbours: 0,
            garp_sent: 0,
        }
    }

    fn check_ns(&self) -> Option<&Path> {
        self.plan.check_from.as_deref().or(self.host_ns())
    }

    fn ready(&self) -> Result<Ready, SwitchError> {
        let plan = self.plan;
        // Netlink in both LCs (readdress moves the address) and a packet socket in the standby
        // (the announcement inside the pause); an agent is pinged, so a dead one fails here.
        let readdress = plan.mode == Mode::Readdress;
        let announce = plan.mode != Mode::Seamless;
        self.to_lc
            .prepare(&plan.to.iface, readdress, announce)
            .map_err(on(&plan.to))?;
        self.from_lc
            .prepare(&plan.from.iface, readdress, false)
            .map_err(on(&plan.from))?;
        Ok(Ready {
            check_w: NsWorker::start(self.check_ns())?,
            nft: match plan.mode {
                Mode::Readdress | Mode::Seamless => Some(nft::Prepared::spawn(self.host_ns())?),
                Mode::Path => None,
            },
        })
    }

    /// Waits, polling every `poll`, until the old LC has no busy connection on the service
    /// port or the drain deadline passed.
    fn wait_drained(&self, poll: Duration) -> Result<(Duration, usize), SwitchError> {
        let start = Instant::now();
        let mut warned = false;
        loop {
            // A failed count counts as busy, so a drain never ends on an error.
            let left = match self.from_lc.busy_tcp_connections(self.plan.health.port) {
                Ok(n) => n,
                Err(e) => {
                    if !warned {
                        tracing::warn!(lc = %self.plan.from.name, error = %e, "cannot count the old LC's connections");
                        warned = true;
                    }
                    usize::MAX
                }
            };
            if left == 0 {
                return Ok((start.elapsed(), 0));
            }
            if start.elapsed() >= self.plan.drain_deadline {
                return Ok((start.elapsed(), left));
            }
            std::thread::sleep(poll);
        }
    }

    fn check_to(&self, ready: &Ready) -> Result<(), SwitchError> {
        let plan = self.plan;
        let mut hc = plan.health.expecting(&plan.to.identity);
        hc.patience = Duration::from_secs(1);
        health::check_on(&ready.check_w, plan.service.addr, &hc).map_err(|source| {
            SwitchError::Check {
                to: plan.to.name.clone(),
                source,
            }
        })
    }

    /// `path` and `readdress`: hold, drain, move, check, release.
    fn paused(&self, hooks: &mut Hooks<'_>) -> Result<Switched, SwitchError> {
        let plan = self.plan;
        let s = plan.service.addr;
        let mut ready = self.ready()?;
        let mark = match plan.mode {
            Mode::Readdress => {
                // Held SYNs still carry the old MAC; this rule (marked packets only, so inert
                // until the release) sends them to the standby without an nft run in the pause.
                nft::apply(
                    self.host_ns(),
                    "MAC fix for held connections",
                    &nft::mac_fix_marked_batch(s, plan.from.mac, plan.to.mac, HELD_MARK),
                )?;
                Some(HELD_MARK)
            }
            _ => None,
        };
        // The standby learns the held clients' MACs before it answers them (see `hold`).
        let prime = Prime {
            port: plan.to.host_port.clone(),
            mac: plan.to.mac,
            service: plan.service,
        };
        let hold = SynHold::start(
            self.host_ns(),
            s,
            plan.health.port,
            plan.queue,
            mark,
            Some(prime),
        )?;
        let t_hold = Instant::now();
        tracing::debug!(hold_ms = ms(self.t0.elapsed()), "holding new connections");
        let mut moved = false;
        let mut attempt =
            |ready: &mut Ready| -> Result<(Duration, Duration, u32, Duration), SwitchError> {
                hooks
                    .service
                    .drain(&plan.from)
                    .map_err(|source| SwitchError::Hook {
                        hook: "drain",
                        source,
                    })?;
                let (drain, left) = self.wait_drained(PAUSED_DRAIN_POLL)?;
                tracing::debug!(at_ms = ms(t_hold.elapsed()), "drained");
                if left > 0 {
                    return Err(SwitchError::DrainTimeout {
                        from: plan.from.name.clone(),
                        left,
                        deadline: plan.drain_deadline,
                    });
                }
                let tw = Instant::now();
                (hooks.in_window)(plan).map_err(|source| SwitchError::Hook {
                    hook: "in_window",
                    source,
                })?;
                let window = tw.elapsed();
                moved = true;
                let garp_sent = self.move_service(&plan.from, &plan.to, ready)?;
                tracing::debug!(at_ms = ms(t_hold.elapsed()), "moved");
                self.check_to(ready)?;
                tracing::debug!(at_ms = ms(t_hold.elapsed()), "checked");
                Ok((drain, window, garp_sent, self.t0.elapsed()))
            };
        match attempt(&mut ready) {
            Ok((drain, window, garp_sent, first)) => {
                let stats = hold.release()?;
                let pause = stats.released_at.duration_since(t_hold);
                if plan.mode == Mode::Readdress {
                    // Now for every frame: neighbours that missed the announcement still reach
                    // the service.
                    let batch = nft::mac_fix_batch(s, plan.from.mac, plan.to.mac);
                    match ready.nft.take() {
                        Some(p) => p.apply("MAC fix", &batch)?,
                        None => nft::apply(self.host_ns(), "MAC fix", &batch)?,
                    }
                }
                let refresh = self.spawn_refresh(&plan.to);
                Ok(Switched {
                    report: SwitchReport {
                        pause_ms: ms(pause),
                        drain_ms: ms(drain),
                        first_request_ms: ms(first),
                        window_ms: ms(window),
                        held_syns: stats.held,
                        primed_neighbours: stats.primed,
                        garp_sent,
                        ..self.report()
                    },
                    refresh,
                })
            }
            Err(cause) => {
                let mut rb = Vec::new();
                if moved {
                    if let Err(e) = self.move_service(&plan.to, &plan.from, &mut ready) {
                        rb.push(format!("moving back: {e}"));
                    }
                } else if plan.mode == Mode::Readdress {
                    // The marked MAC fix would send the held SYNs to the standby: point it back.
                    let batch = nft::mac_fix_batch(s, plan.to.mac, plan.from.mac);
                    let r = match ready.nft.take() {
                        Some(p) => p.apply("MAC fix rollback", &batch),
                        None => nft::apply(self.host_ns(), "MAC fix rollback", &batch),
                    };
                    if let Err(e) = r {
                        rb.push(format!("MAC fix: {e}"));
                    }
                }
                if let Err(e) = hooks.service.resume(&plan.from) {
                    rb.push(format!("resuming {}: {e}", plan.from.name));
                }
                if let Err(e) = hold.release() {
                    rb.push(format!("releasing held connections: {e}"));
                }
                Err(rolled_back(plan, cause, rb))
            }
        }
    }

    /// Moves the service address's path from `a` to `b`; returns GARP frames sent. Only the
    /// first announcement is sent here (inside the pause); the rest of the burst follows from
    /// the refresh thread.
    fn move_service(
        &self,
        a: &Endpoint,
        b: &Endpoint,
        ready: &mut Ready,
    ) -> Result<u32, SwitchError> {
        let plan = self.plan;
        let s = plan.service;
        let forward = a.name == plan.from.name;
        let (a_port, b_port) = if forward {
            (self.from_port, self.to_port)
        } else {
            (self.to_port, self.from_port)
        };
        let (a_lc, b_lc) = if forward {
            (&*self.from_lc, &*self.to_lc)
        } else {
            (&*self.to_lc, &*self.from_lc)
        };
        let garp_one = || -> Result<u32, SwitchError> {
            b_lc.announce(&b.iface, b.mac, s.addr, 1, Duration::ZERO)
                .map_err(on(b))
        };
        let mut nft_apply = |what: &str, batch: &serde_json::Value| -> Result<(), SwitchError> {
            match ready.nft.take() {
                Some(p) => p.apply(what, batch)?,
                None => nft::apply(self.host_ns(), what, batch)?,
            }
            Ok(())
        };
        match plan.mode {
            Mode::Path => {
                self.host.set_controller(a_port, None)?;
                self.host.set_controller(b_port, Some(self.bridge))?;
                self.host.set_up(b_port, true)?;
                // One announcement makes the bridge learn the MAC on the new port at once
                // instead of flooding until the LC sends something.
                garp_one()
            }
            Mode::Readdress => {
                a_lc.del_address(&a.iface, s).map_err(on(a))?;
                b_lc.add_address(&b.iface, s).map_err(on(b))?;
                if !forward {
                    // Rolling back: frames already sent to the standby's MAC go back too.
                    nft_apply("MAC fix", &nft::mac_fix_batch(s.addr, a.mac, b.mac))?;
                }
                self.host.replace_neighbour(self.bridge, s.addr, b.mac)?;
                garp_one()
            }
            Mode::Seamless => {
                nft_apply(
                    "service NAT switch",
                    &nft::service_nat_batch(s.addr, b.address.addr),
                )?;
                Ok(0)
            }
        }
    }

    fn spawn_refresh(&self, ep: &Endpoint) -> Option<std::thread::JoinHandle<()>> {
        if self.plan.mode != Mode::Readdress {
            return None;
        }
        let ep = ep.clone();
        let garp = self.plan.garp.clone();
        let s = self.plan.service.addr;
        let lock_path = self.plan.lock_path.clone();
        let start = Instant::now();
        std::thread::Builder::new()
            .name("po-garp-refresh".into())
            .spawn(move || {
                let lc = match ep.access.open() {
                    Ok(lc) => lc,
                    Err(e) => {
                        tracing::warn!(lc = %ep.name, error = %e, "gratuitous ARP refresh: cannot reach the LC");
                        return;
                    }
                };
                let rest = garp.count.saturating_sub(1);
                if rest > 0 {
                    std::thread::sleep(garp.interval);
                    if let Err(e) = lc.announce(&ep.iface, ep.mac, s, rest, garp.interval) {
                        tracing::warn!(error = %e, "gratuitous ARP burst failed");
                    }
                }
                for at in &garp.refresh_after {
                    if let Some(wait) = at.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                    // A later switch may have moved the address on: announcing a stale owner
                    // would send clients to an LC that no longer has it. Refresh only while no
                    // switch runs and this LC still holds the address.
                    let Ok(_lock) = lock(&lock_path) else {
                        tracing::info!("gratuitous ARP refresh skipped: a switch is running");
                        return;
                    };
                    let holds = lc.addresses(&ep.iface).map(|v| v.iter().any(|a| a.addr == s));
                    if !matches!(holds, Ok(true)) {
                        tracing::info!(lc = %ep.name, "gratuitous ARP refresh stopped: the address moved on");
                        return;
                    }
                    if let Err(e) = lc.announce(&ep.iface, ep.mac, s, garp.count, garp.interval) {
                        tracing::warn!(error = %e, "gratuitous ARP refresh failed");
                    }
                }
            })
            .ok()
    }

    /// `seamless`: switch the NAT at once, then let the old LC drain.
    fn seamless(&self, hooks: &mut Hooks<'_>) -> Result<Switched, SwitchError> {
        let plan = self.plan;
        // Runs at low priority (entered in `switch`).
        let mut ready = self.ready()?;
        self.move_service(&plan.from, &plan.to, &mut ready)?;
        if let Err(cause) = self.check_to(&ready) {
            let mut rb = Vec::new();
            if let Err(e) = self.move_service(&plan.to, &plan.from, &mut ready) {
                rb.push(format!("NAT back: {e}"));
            }
            return Err(rolled_back(plan, cause, rb));
        }
        let first = self.t0.elapsed();
        hooks
            .service
            .drain(&plan.from)
            .map_err(|source| SwitchError::Hook {
                hook: "drain",
                source,
            })?;
        let (drain, left) = self.wait_drained(BACKGROUND_DRAIN_POLL)?;
        if left > 0 {
            tracing::warn!(left, from = %plan.from.name, "old LC still has connections at the drain deadline");
        }
        self.move_udp_flows(plan.from.address.addr);
        let tw = Instant::now();
        (hooks.in_window)(plan).map_err(|source| SwitchError::Hook {
            hook: "in_window",
            source,
        })?;
        Ok(Switched {
            report: SwitchReport {
                drain_ms: ms(drain),
                leftover_connections: left,
                first_request_ms: ms(first),
                window_ms: ms(tw.elapsed()),
                ..self.report()
            },
            refresh: None,
        })
    }

    /// `seamless` with a hand-off, for services that write: the old service parks (finishes
    /// what is in flight, holds the rest), `in_window` moves the last writes to the standby and
    /// starts its service, the host's own connections are pointed at the standby and checked
    /// through the service address, then the clients' NAT follows and the old service forwards
    /// what it holds, and every later request on its connections, to the standby. No SYN is
    /// held; requests that reach the old LC while it is parked wait for the forward.
    fn handoff(&self, hooks: &mut Hooks<'_>) -> Result<Switched, SwitchError> {
        let plan = self.plan;
        let s = plan.service.addr;
        let (old, new) = (plan.from.address.addr, plan.to.address.addr);
        let mut ready = self.ready()?;
        let hook = |hook: &'static str| move |source| SwitchError::Hook { hook, source };
        let t_park = Instant::now();
        if let Err(e) = hooks.service.park(&plan.from) {
            let rb = match hooks.service.unpark(&plan.from) {
                Ok(()) => Vec::new(),
                Err(u) => vec![format!("unpark {}: {u}", plan.from.name)],
            };
            return Err(rolled_back(plan, hook("park")(e), rb));
        }
        // Until the clients' NAT moves, a failure puts everything back: the standby has served
        // nobody but the switcher's check, so the old LC's data is still the whole truth.
        let unpark = |hooks: &mut Hooks<'_>, cause: SwitchError, mut rb: Vec<String>| {
            if let Err(u) = hooks.service.unpark(&plan.from) {
                rb.push(format!("unpark {}: {u}", plan.from.name));
            }
            rolled_back(plan, cause, rb)
        };
        let tw = Instant::now();
        if let Err(e) = (hooks.in_window)(plan) {
            return Err(unpark(hooks, hook("in_window")(e), Vec::new()));
        }
        let window = tw.elapsed();
        if let Err(e) =
            health::check_in(&*self.to_lc, new, &plan.health.expecting(&plan.to.identity))
        {
            let cause = SwitchError::StandbyNotReady {
                to: plan.to.name.clone(),
                source: e,
            };
            return Err(unpark(hooks, cause, Vec::new()));
        }
        let host_first = match ready.nft.take() {
            Some(p) => p.apply(
                "service NAT: the host first",
                &nft::service_nat_split_batch(s, old, new),
            ),
            None => nft::apply(
                self.host_ns(),
                "service NAT: the host first",
                &nft::service_nat_split_batch(s, old, new),
            ),
        };
        if let Err(e) = host_first {
            return Err(unpark(hooks, e.into(), Vec::new()));
        }
        let back = |what: &str| {
            nft::apply(self.host_ns(), what, &nft::service_nat_batch(s, old))
                .err()
                .map(|e| format!("NAT back: {e}"))
                .into_iter()
                .collect::<Vec<_>>()
        };
        if let Err(cause) = self.check_to(&ready) {
            let rb = back("service NAT back");
            return Err(unpark(hooks, cause, rb));
        }
        if let Err(e) = nft::apply(
            self.host_ns(),
            "service NAT switch",
            &nft::service_nat_batch(s, new),
        ) {
            let rb = back("service NAT back");
            return Err(unpark(hooks, e.into(), rb));
        }
        let first = self.t0.elapsed();
        // From here the standby serves clients: the old service must never serve again. A
        // failed forward leaves it parked (its held requests fail when the old LC stops) —
        // reported, never undone.
        let to = std::net::SocketAddr::from((new, plan.health.port));
        let mut forward = hooks.service.forward(&plan.from, to);
        for _ in 0..2 {
            if forward.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
            forward = hooks.service.forward(&plan.from, to);
        }
        let pause = t_park.elapsed();
        if let Err(e) = &forward {
            tracing::error!(from = %plan.from.name, error = %e, "the old service did not take the forward; its held requests will fail");
        }
        let (drain, left) = self.wait_drained(BACKGROUND_DRAIN_POLL)?;
        if left > 0 {
            tracing::warn!(left, from = %plan.from.name, "old LC still has connections at the drain deadline");
        }
        self.move_udp_flows(old);
        if let Err(e) = forward {
            return Err(hook("forward")(e));
        }
        Ok(Switched {
            report: SwitchReport {
                pause_ms: ms(pause),
                drain_ms: ms(drain),
                leftover_connections: left,
                first_request_ms: ms(first),
                window_ms: ms(window),
                ..self.report()
            },
            refresh: None,
        })
    }

    /// UDP has no end: at the deadline its conntrack entries to the old LC are deleted so the
    /// next datagram of each flow is NATed to the standby.
    fn move_udp_flows(&self, old: Ipv4Addr) {
        // `conntrack` dumps the host's whole connection-tracking table into user space (every TCP
        // flow of the last two minutes: ~100,000 at 5,000 new connections per second). At nice 19
        // that still stalled the service for 10–15 ms in some switches (window p99.9 up to
        // 6.5 ms over steady, new connections); under `SCHED_IDLE` it did not. On a host whose
        // CPUs are saturated an idle task barely runs, so after `IDLE_GRACE` it goes back to
        // normal scheduling at nice 19: the switch never waits long for it.
        const IDLE_GRACE: Duration = Duration::from_secs(2);
        let run = || -> Result<std::process::Output, String> {
            let mut cmd =
                idle_command_in(self.host_ns(), "conntrack").map_err(|e| e.to_string())?;
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

fn rolled_back(plan: &SwitchPlan, cause: SwitchError, rollback_errors: Vec<String>) -> SwitchError {
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
        assert_eq!(r.reversed(), p);
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
