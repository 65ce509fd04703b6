//! A recording [`Network`] and [`ServiceControl`] for tests without root.
//!
//! [`FakeNetwork`] writes every change and check a switch makes, in order, into one log
//! (`"hold 10.0.0.10:8080 queue 1"`, `"a: del 10.0.0.10/24"`, `"drain a"`, …) and keeps a
//! small model of the network — which host ports are on the bridge, the addresses of each LC,
//! where the NAT points, how many connections an LC still has — so a test asserts both the
//! sequence and where the service ends up (through [`ServiceAddress`], as recovery sees it).
//! The check through the service address answers with the identity of whoever holds it in
//! the model. Any operation fails on demand ([`FakeNetwork::fail`]), by the start of its log
//! line, reads included (`"a: addresses"`, `"nat?"`, `"open a"`, `"a: busy"`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use patchover_core::{Ipv4Cidr, MacAddr};

use crate::health::{HealthCheck, HealthError, Mismatch};
use crate::hold::{HoldError, HoldStats};
use crate::lc::{HttpAnswer, InLc, InLcError};
use crate::netns::NetnsError;
use crate::network::{Held, HoldSpec, Network, NftChange, ServiceAddress};
use crate::nft::NftError;
use crate::rtnl::{LinkInfo, RtnlError};
use crate::switch::{BoxError, Endpoint, Mode, ServiceControl, SwitchError, SwitchPlan};

const BRIDGE_INDEX: u32 = 1;

#[derive(Debug)]
struct Model {
    log: Vec<String>,
    mode: Mode,
    bridge: String,
    service: Ipv4Addr,
    eps: Vec<Endpoint>,
    links: BTreeMap<String, LinkInfo>,
    addrs: BTreeMap<String, Vec<Ipv4Cidr>>,
    /// Where the clients' NAT (prerouting) and the host's own (output) point.
    nat: Option<Ipv4Addr>,
    host_nat: Option<Ipv4Addr>,
    mac_fix: Option<NftChange>,
    busy: BTreeMap<String, usize>,
    down: BTreeSet<String>,
    strangers: Vec<MacAddr>,
    /// A stranger that answers the check through the service address (its MAC).
    check_stranger: Option<MacAddr>,
    fail: Vec<String>,
    held: usize,
}

impl Model {
    /// Records `op` (when `record`) and fails it if a test asked for that.
    fn call(&mut self, op: String, record: bool) -> Result<(), String> {
        if record {
            self.log.push(op.clone());
        }
        match self.fail.iter().any(|f| op.starts_with(f.as_str())) {
            true => Err(format!("fake: {op} fails")),
            false => Ok(()),
        }
    }

    fn ep(&self, name: &str) -> Option<&Endpoint> {
        self.eps.iter().find(|e| e.name == name)
    }

    fn port_name(&self, index: u32) -> String {
        self.links
            .iter()
            .find(|(_, l)| l.index == index)
            .map_or_else(|| format!("#{index}"), |(n, _)| n.clone())
    }

    /// Who the host reaches on the service address, per mode.
    fn answering(&self) -> Option<&Endpoint> {
        self.eps.iter().find(|ep| match self.mode {
            Mode::Path => {
                self.links.get(&ep.host_port).and_then(|l| l.controller) == Some(BRIDGE_INDEX)
            }
            Mode::Readdress => self.addrs[&ep.name].iter().any(|a| a.addr == self.service),
            Mode::Seamless => self.host_nat == Some(ep.address.addr),
        })
    }
}

/// A network that records what a switch does to it (see the module docs).
#[derive(Clone)]
pub struct FakeNetwork {
    m: Arc<Mutex<Model>>,
}

fn io(msg: String) -> std::io::Error {
    std::io::Error::other(msg)
}

impl FakeNetwork {
    /// A network where the service is on `plan.from` as `plan.mode` has it: `path` — the old
    /// LC's port on the bridge, the standby's not; `readdress` — both ports on the bridge, the
    /// service address on the old LC; `seamless` — the NAT at the old LC. Every LC has its own
    /// address, answers with its identity, and has no open connection.
    pub fn for_plan(plan: &SwitchPlan) -> FakeNetwork {
        let mut links = BTreeMap::new();
        links.insert(
            plan.bridge.clone(),
            LinkInfo {
                index: BRIDGE_INDEX,
                controller: None,
                up: true,
                mac: Some(MacAddr([2, 0xb, 0, 0, 0, 1])),
            },
        );
        let mut addrs = BTreeMap::new();
        for (i, ep) in [&plan.from, &plan.to].into_iter().enumerate() {
            let bridged = i == 0 || plan.mode != Mode::Path;
            links.insert(
                ep.host_port.clone(),
                LinkInfo {
                    index: 2 + i as u32,
                    controller: bridged.then_some(BRIDGE_INDEX),
                    up: bridged,
                    mac: None,
                },
            );
            let mut a = vec![ep.address];
            if i == 0 && plan.mode == Mode::Readdress {
                a.push(plan.service);
            }
            addrs.insert(ep.name.clone(), a);
        }
        let nat = (plan.mode == Mode::Seamless).then_some(plan.from.address.addr);
        FakeNetwork {
            m: Arc::new(Mutex::new(Model {
                log: Vec::new(),
                mode: plan.mode,
                bridge: plan.bridge.clone(),
                service: plan.service.addr,
                eps: vec![plan.from.clone(), plan.to.clone()],
                links,
                addrs,
                nat,
                host_nat: nat,
                mac_fix: None,
                busy: BTreeMap::new(),
                down: BTreeSet::new(),
                strangers: Vec::new(),
                check_stranger: None,
                fail: Vec::new(),
                held: 0,
            })),
        }
    }

    fn m(&self) -> MutexGuard<'_, Model> {
        self.m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every later operation whose log line starts with `op` fails.
    pub fn fail(&self, op: &str) -> &FakeNetwork {
        self.m().fail.push(op.to_string());
        self
    }

    /// LC `lc` keeps `n` busy connections (until a test changes it).
    pub fn busy(&self, lc: &str, n: usize) -> &FakeNetwork {
        self.m().busy.insert(lc.to_string(), n);
        self
    }

    /// LC `lc`'s service does not answer.
    pub fn service_down(&self, lc: &str) -> &FakeNetwork {
        self.m().down.insert(lc.to_string());
        self
    }

    /// A host that is neither LC answers ARP for the service address with `mac`.
    pub fn stranger(&self, mac: MacAddr) -> &FakeNetwork {
        self.m().strangers.push(mac);
        self
    }

    /// A host that is neither LC answers the check through the service address (well: 200
    /// with the standby's identity) from `mac`.
    pub fn check_answered_by(&self, mac: MacAddr) -> &FakeNetwork {
        self.m().check_stranger = Some(mac);
        self
    }

    /// Connections the hold reports as held.
    pub fn held(&self, n: usize) -> &FakeNetwork {
        self.m().held = n;
        self
    }

    /// Writes `op` into the log (for a test's own hooks).
    pub fn record(&self, op: &str) {
        self.m().log.push(op.to_string());
    }

    /// Writes `op` into the log and fails if a test asked for that (for a test's own hooks,
    /// e.g. `in_window`).
    pub fn call(&self, op: &str) -> Result<(), BoxError> {
        Ok(self.m().call(op.to_string(), true)?)
    }

    /// The log so far.
    pub fn ops(&self) -> Vec<String> {
        self.m().log.clone()
    }

    /// Empties the log.
    pub fn clear(&self) {
        self.m().log.clear();
    }

    /// Whether host port `port` is on the bridge.
    pub fn port_on_bridge(&self, port: &str) -> bool {
        self.m().links.get(port).and_then(|l| l.controller) == Some(BRIDGE_INDEX)
    }

    /// The addresses of LC `lc`.
    pub fn addresses(&self, lc: &str) -> Vec<Ipv4Cidr> {
        self.m().addrs.get(lc).cloned().unwrap_or_default()
    }

    /// Where the clients' NAT and the host's own point.
    pub fn nat(&self) -> (Option<Ipv4Addr>, Option<Ipv4Addr>) {
        let m = self.m();
        (m.nat, m.host_nat)
    }

    /// The MAC fix rule in place, if any.
    pub fn mac_fix(&self) -> Option<NftChange> {
        self.m().mac_fix.clone()
    }

    /// Who holds the service address, as recovery asks it.
    pub fn holder(&self) -> Option<String> {
        let (addr, mode, bridge, eps) = {
            let m = self.m();
            (m.service, m.mode, m.bridge.clone(), m.eps.clone())
        };
        let sa = ServiceAddress::new(addr, mode, &bridge);
        let refs: Vec<&Endpoint> = eps.iter().collect();
        sa.holder(self, &refs)
            .expect("holder")
            .map(|e| e.name.clone())
    }

    /// A [`ServiceControl`] that records into the same log.
    pub fn control(&self) -> FakeControl {
        FakeControl { net: self.clone() }
    }
}

impl Network for FakeNetwork {
    fn link(&self, name: &str) -> Result<Option<LinkInfo>, RtnlError> {
        let mut m = self.m();
        m.call(format!("link {name}"), false)
            .map_err(|e| RtnlError::Socket(io(e)))?;
        Ok(m.links.get(name).cloned())
    }

    fn set_controller(&self, port: u32, bridge: Option<u32>) -> Result<(), RtnlError> {
        let mut m = self.m();
        let name = m.port_name(port);
        let op = match bridge {
            Some(b) => format!("port {name} master {}", m.port_name(b)),
            None => format!("port {name} nomaster"),
        };
        m.call(op, true).map_err(|e| RtnlError::Socket(io(e)))?;
        if let Some(l) = m.links.get_mut(&name) {
            l.controller = bridge;
        }
        Ok(())
    }

    fn set_up(&self, port: u32, up: bool) -> Result<(), RtnlError> {
        let mut m = self.m();
        let name = m.port_name(port);
        let op = format!("port {name} {}", if up { "up" } else { "down" });
        m.call(op, true).map_err(|e| RtnlError::Socket(io(e)))?;
        if let Some(l) = m.links.get_mut(&name) {
            l.up = up;
        }
        Ok(())
    }

    fn replace_neighbour(
        &self,
        bridge: u32,
        addr: Ipv4Addr,
        mac: MacAddr,
    ) -> Result<(), RtnlError> {
        let mut m = self.m();
        let op = format!("neighbour {addr} on {} -> {mac}", m.port_name(bridge));
        m.call(op, true).map_err(|e| RtnlError::Socket(io(e)))
    }

    fn who_has(
        &self,
        bridge: &str,
        _bridge_mac: MacAddr,
        addr: Ipv4Addr,
    ) -> Result<Vec<MacAddr>, SwitchError> {
        let mut m = self.m();
        m.call(format!("who-has {addr} on {bridge}"), true)
            .map_err(|e| SwitchError::Garp(crate::garp::GarpError::Socket(io(e))))?;
        let mut macs: Vec<MacAddr> = m.answering().map(|e| e.mac).into_iter().collect();
        macs.extend(m.strangers.iter().copied());
        Ok(macs)
    }

    fn nat_target(&self, service: Ipv4Addr) -> Result<Option<Ipv4Addr>, NftError> {
        let mut m = self.m();
        m.call(format!("nat? {service}"), false)
            .map_err(|e| NftError::Spawn(io(e)))?;
        Ok(m.nat)
    }

    fn prepare_nft(&self) -> Result<(), NftError> {
        self.m()
            .call("prepare nft".into(), true)
            .map_err(|e| NftError::Spawn(io(e)))
    }

    fn nft(&self, what: &str, change: &NftChange) -> Result<(), NftError> {
        let mut m = self.m();
        m.call(format!("nft {what}: {change}"), true)
            .map_err(|stderr| NftError::Rejected {
                what: what.to_string(),
                status: std::process::ExitStatus::from_raw(1 << 8),
                stderr,
            })?;
        match change {
            NftChange::ServiceNat { target, .. } => {
                m.nat = Some(*target);
                m.host_nat = Some(*target);
            }
            NftChange::ServiceNatSplit { old, new, .. } => {
                m.nat = Some(*old);
                m.host_nat = Some(*new);
            }
            NftChange::MacFix { .. } => m.mac_fix = Some(change.clone()),
            NftChange::Remove { family: "ip", .. } => (m.nat, m.host_nat) = (None, None),
            NftChange::Remove { .. } => m.mac_fix = None,
        }
        Ok(())
    }

    fn hold(&self, spec: &HoldSpec) -> Result<Box<dyn Held>, HoldError> {
        let mut m = self.m();
        let mut op = format!("hold {}:{} queue {}", spec.service, spec.port, spec.queue);
        if let Some(mark) = spec.mark {
            op += &format!(" mark {mark:#x}");
        }
        if let Some(p) = &spec.prime {
            op += &format!(" prime {}", p.port);
        }
        m.call(op, true).map_err(|e| HoldError::Reader(io(e)))?;
        Ok(Box::new(FakeHeld {
            net: self.clone(),
            released: false,
        }))
    }

    fn prepare_check(&self) -> Result<(), NetnsError> {
        self.m()
            .call("prepare check".into(), true)
            .map_err(|e| NetnsError::Open {
                path: PathBuf::from("/fake/check"),
                source: io(e),
            })
    }

    fn check(&self, addr: Ipv4Addr, hc: &HealthCheck) -> Result<(), HealthError> {
        let mut m = self.m();
        let sa = SocketAddr::from((addr, hc.port));
        let failed = |e: String| HealthError::Io {
            addr: sa,
            path: hc.path.clone(),
            source: io(e),
        };
        m.call(format!("check {addr} expect {}", hc.expect), true)
            .map_err(failed)?;
        let Some(ep) = m.answering() else {
            return Err(failed("nobody answers".into()));
        };
        if m.down.contains(&ep.name) {
            return Err(failed(format!("{} does not answer", ep.name)));
        }
        if !ep.identity.contains(&hc.expect) {
            return Err(HealthError::Mismatch(Box::new(Mismatch {
                addr: sa,
                path: hc.path.clone(),
                status_line: "HTTP/1.1 200 OK".into(),
                status: hc.status,
                expect: hc.expect.clone(),
                body: ep.identity.clone(),
            })));
        }
        Ok(())
    }

    fn check_path(&self, addr: Ipv4Addr) -> String {
        format!("fake path to {addr}")
    }

    fn check_neighbour(&self, addr: Ipv4Addr) -> Result<Option<MacAddr>, RtnlError> {
        let mut m = self.m();
        m.call(format!("neighbour {addr}"), false)
            .map_err(|e| RtnlError::Socket(io(e)))?;
        Ok(m.check_stranger.or_else(|| m.answering().map(|ep| ep.mac)))
    }

    fn forget_udp_flows(&self, old: Ipv4Addr) {
        let _ = self.m().call(format!("forget udp flows of {old}"), true);
    }

    fn open_lc(&self, ep: &Endpoint) -> Result<Box<dyn InLc>, InLcError> {
        let mut m = self.m();
        m.call(format!("open {}", ep.name), false)
            .map_err(|why| lc_error(&ep.name, "open", why))?;
        Ok(Box::new(FakeLc {
            name: ep.name.clone(),
            net: self.clone(),
        }))
    }
}

fn lc_error(lc: &str, command: &str, why: String) -> InLcError {
    InLcError::Output {
        socket: PathBuf::from(format!("/fake/{lc}")),
        command: command.to_string(),
        why,
    }
}

struct FakeHeld {
    net: FakeNetwork,
    released: bool,
}

impl Held for FakeHeld {
    fn release(mut self: Box<Self>) -> Result<HoldStats, HoldError> {
        self.released = true;
        let mut m = self.net.m();
        m.call("release".into(), true)
            .map_err(|e| HoldError::Reader(io(e)))?;
        let now = Instant::now();
        Ok(HoldStats {
            held: m.held,
            released_at: now,
            let_go_at: now,
            primed: m.held,
        })
    }
}

impl Drop for FakeHeld {
    fn drop(&mut self) {
        if !self.released {
            self.net.record("release (dropped)");
        }
    }
}

/// An LC of a [`FakeNetwork`]; its operations are logged as `"<lc>: <op>"`.
struct FakeLc {
    name: String,
    net: FakeNetwork,
}

impl FakeLc {
    fn call(&self, op: &str, record: bool) -> Result<MutexGuard<'_, Model>, InLcError> {
        let mut m = self.net.m();
        m.call(format!("{}: {op}", self.name), record)
            .map_err(|why| lc_error(&self.name, op, why))?;
        Ok(m)
    }
}

impl InLc for FakeLc {
    fn describe(&self) -> String {
        format!("fake LC {}", self.name)
    }

    fn prepare(&self, _iface: &str, addresses: bool, announce: bool) -> Result<(), InLcError> {
        let op = format!("prepare addresses={addresses} announce={announce}");
        self.call(&op, true).map(drop)
    }

    fn addresses(&self, _iface: &str) -> Result<Vec<Ipv4Cidr>, InLcError> {
        let m = self.call("addresses", false)?;
        Ok(m.addrs.get(&self.name).cloned().unwrap_or_default())
    }

    fn add_address(&self, _iface: &str, cidr: Ipv4Cidr) -> Result<(), InLcError> {
        let mut m = self.call(&format!("add {cidr}"), true)?;
        let a = m.addrs.entry(self.name.clone()).or_default();
        if !a.contains(&cidr) {
            a.push(cidr);
        }
        Ok(())
    }

    fn del_address(&self, _iface: &str, cidr: Ipv4Cidr) -> Result<(), InLcError> {
        let mut m = self.call(&format!("del {cidr}"), true)?;
        m.addrs
            .entry(self.name.clone())
            .or_default()
            .retain(|a| a.addr != cidr.addr);
        Ok(())
    }

    fn announce(
        &self,
        _iface: &str,
        _mac: MacAddr,
        ip: Ipv4Addr,
        count: u32,
        _interval: Duration,
    ) -> Result<u32, InLcError> {
        self.call(&format!("announce {ip} x{count}"), true)
            .map(drop)?;
        Ok(count)
    }

    fn http_get(
        &self,
        addr: SocketAddr,
        path: &str,
        _timeout: Duration,
    ) -> Result<HttpAnswer, InLcError> {
        let m = self.call(&format!("get {addr}{path}"), true)?;
        let refused = || InLcError::Http {
            addr,
            path: path.to_string(),
            source: std::io::ErrorKind::ConnectionRefused.into(),
        };
        // An LC reaches its own service on its own address.
        let ep = m.ep(&self.name).ok_or_else(refused)?;
        if std::net::IpAddr::V4(ep.address.addr) != addr.ip() || m.down.contains(&ep.name) {
            return Err(refused());
        }
        Ok(HttpAnswer {
            status_line: "HTTP/1.1 200 OK".into(),
            body: ep.identity.clone(),
        })
    }

    fn https_get(
        &self,
        addr: SocketAddr,
        path: &str,
        _trust: &patchover_core::TlsTrust,
        timeout: Duration,
    ) -> Result<HttpAnswer, InLcError> {
        self.http_get(addr, path, timeout)
    }

    fn connect(&self, addr: SocketAddr, _timeout: Duration) -> Result<(), InLcError> {
        let m = self.call(&format!("connect {addr}"), true)?;
        let ep = m.ep(&self.name);
        match ep {
            Some(ep)
                if std::net::IpAddr::V4(ep.address.addr) == addr.ip()
                    && !m.down.contains(&ep.name) =>
            {
                Ok(())
            }
            _ => Err(InLcError::Connect {
                addr,
                source: std::io::ErrorKind::ConnectionRefused.into(),
            }),
        }
    }

    fn busy_tcp_connections(&self, _port: u16) -> Result<usize, InLcError> {
        let m = self.call("busy", false)?;
        Ok(m.busy.get(&self.name).copied().unwrap_or(0))
    }

    fn network_state(&self, _iface: &str, port: u16) -> String {
        format!("fake state of {} on port {port}", self.name)
    }
}

/// A service that records what the switcher asks of it (`"drain a"`, `"park a"`, …) into the
/// [`FakeNetwork`]'s log; it fails like any fake operation. A `forward` moves the old LC's
/// connections away (its busy count drops to 0).
pub struct FakeControl {
    net: FakeNetwork,
}

impl FakeControl {
    fn call(&self, op: String) -> Result<(), BoxError> {
        Ok(self.net.m().call(op, true)?)
    }
}

impl ServiceControl for FakeControl {
    fn drain(&mut self, ep: &Endpoint) -> Result<(), BoxError> {
        self.call(format!("drain {}", ep.name))
    }
    fn resume(&mut self, ep: &Endpoint) -> Result<(), BoxError> {
        self.call(format!("resume {}", ep.name))
    }
    fn park(&mut self, ep: &Endpoint) -> Result<(), BoxError> {
        self.call(format!("park {}", ep.name))
    }
    fn forward(&mut self, ep: &Endpoint, to: SocketAddr) -> Result<(), BoxError> {
        self.call(format!("forward {} -> {to}", ep.name))?;
        self.net.m().busy.remove(&ep.name);
        Ok(())
    }
    fn unpark(&mut self, ep: &Endpoint) -> Result<(), BoxError> {
        self.call(format!("unpark {}", ep.name))
    }
    /// Logs `run <lc>: <argv>`; the program exits 0, or 1 saying "not ready" on an LC whose
    /// service is down.
    fn run_in(
        &self,
        ep: &Endpoint,
        argv: &[String],
        _timeout: Duration,
    ) -> Result<crate::lc::GuestOutput, BoxError> {
        let mut m = self.net.m();
        m.call(format!("run {}: {}", ep.name, argv.join(" ")), true)?;
        let down = m.down.contains(&ep.name);
        Ok(crate::lc::GuestOutput {
            status: Some(i32::from(down)),
            stderr: if down {
                "not ready".into()
            } else {
                String::new()
            },
            ..Default::default()
        })
    }
}
