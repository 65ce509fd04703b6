//! The switcher's seam to the network: every operation a switch makes outside its own process.
//!
//! The switch modes (`switch::path`, `switch::readdress`, `switch::seamless`,
//! `switch::handoff`) decide *what* happens, in which order, and how it is put back;
//! a [`Network`] does it. [`LiveNetwork`](crate::live::LiveNetwork) is the real one: rtnetlink,
//! nftables batches, the NFQUEUE SYN hold, packet sockets, `conntrack`, namespace workers.
//! `fake::FakeNetwork` (feature `fake`, and this crate's own tests) records every call and keeps
//! a small model of ports, addresses and the NAT, so each mode's sequence, its rollback and the
//! "who holds the service address" decision of recovery are unit-tested without root
//! (youki's `Syscall` / `TestHelperSyscall` shape). The fake is injected explicitly
//! ([`crate::switch::switch_with`]); production code never asks whether it runs in a test.
//!
//! Operations inside an LC go through [`InLc`], which a `Network` opens, so the fake records
//! them in the same sequence.

use std::net::Ipv4Addr;

use patchover_core::MacAddr;
use serde_json::Value;

use crate::health::{HealthCheck, HealthError};
use crate::hold::{HoldError, HoldStats, Prime};
use crate::lc::{InLc, InLcError};
use crate::netns::NetnsError;
use crate::nft::{self, NftError};
use crate::rtnl::{LinkInfo, RtnlError};
use crate::switch::{Endpoint, SwitchError};

/// Everything a switch does to the network outside the LCs, and the way into the LCs.
///
/// One value serves one switch (or one question): implementations may keep what they opened
/// (a netlink socket, a started `nft`, a worker in the check namespace) between calls.
pub trait Network {
    /// A link of the host namespace by name.
    fn link(&self, name: &str) -> Result<Option<LinkInfo>, RtnlError>;
    /// Makes link `port` a port of bridge `bridge` (`None`: of no bridge).
    fn set_controller(&self, port: u32, bridge: Option<u32>) -> Result<(), RtnlError>;
    /// Sets link `port` up or down.
    fn set_up(&self, port: u32, up: bool) -> Result<(), RtnlError>;
    /// Points the host's own neighbour entry of `addr` on `bridge` at `mac`.
    fn replace_neighbour(&self, bridge: u32, addr: Ipv4Addr, mac: MacAddr)
    -> Result<(), RtnlError>;
    /// The MACs that answer an ARP probe for `addr` on bridge `bridge` (whose MAC is
    /// `bridge_mac`) within a few tens of milliseconds.
    fn who_has(
        &self,
        bridge: &str,
        bridge_mac: MacAddr,
        addr: Ipv4Addr,
    ) -> Result<Vec<MacAddr>, SwitchError>;
    /// Where the host's NAT sends connections to `service` (`None`: no NAT for it).
    fn nat_target(&self, service: Ipv4Addr) -> Result<Option<Ipv4Addr>, NftError>;
    /// Starts what the next [`Network::nft`] needs ahead of time (an `nft` process), so that
    /// a change inside the pause only commits.
    fn prepare_nft(&self) -> Result<(), NftError>;
    /// Applies one nftables change atomically; `what` names it in errors and logs.
    fn nft(&self, what: &str, change: &NftChange) -> Result<(), NftError>;
    /// Starts holding new connections to the service (see [`crate::hold`]).
    fn hold(&self, spec: &HoldSpec) -> Result<Box<dyn Held>, HoldError>;
    /// Opens ahead of time what [`Network::check`] needs (a worker in the check namespace).
    fn prepare_check(&self) -> Result<(), NetnsError>;
    /// The service check against `addr` from where the switch checks (the host, or
    /// `SwitchPlan::check_from`), retried for `hc.patience`.
    fn check(&self, addr: Ipv4Addr, hc: &HealthCheck) -> Result<(), HealthError>;
    /// How the check's namespace reaches `addr` (its route, its neighbour entries), on one
    /// bounded line, for the message of a failed check.
    fn check_path(&self, addr: Ipv4Addr) -> String;
    /// The MAC of the check namespace's neighbour entry for `addr` (where the check's packets
    /// to `addr` went), `None` without one.
    fn check_neighbour(&self, addr: Ipv4Addr) -> Result<Option<MacAddr>, RtnlError>;
    /// Deletes the connection-tracking entries of UDP flows answered by `old`, so their next
    /// datagram is NATed anew. Best effort: failures are logged.
    fn forget_udp_flows(&self, old: Ipv4Addr);
    /// The way into `ep`'s LC.
    fn open_lc(&self, ep: &Endpoint) -> Result<Box<dyn InLc>, InLcError>;
}

/// An active hold of new connections; dropping it releases them too.
pub trait Held {
    /// Lets every held SYN go on (they now take the new path) and stops holding.
    fn release(self: Box<Self>) -> Result<HoldStats, HoldError>;
}

/// What to hold (see [`crate::hold::SynHold::start`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldSpec {
    pub service: Ipv4Addr,
    pub port: u16,
    /// NFQUEUE number.
    pub queue: u16,
    /// Firewall mark of released SYNs.
    pub mark: Option<u32>,
    /// The standby to prime with the held clients' MACs.
    pub prime: Option<Prime>,
}

/// The nftables changes a switch makes, each one atomic batch (see [`crate::nft`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NftChange {
    /// Connections to `service`, the clients' and the host's own, go to `target`.
    ServiceNat { service: Ipv4Addr, target: Ipv4Addr },
    /// The host's own connections to `service` go to `new`, the clients' still to `old`.
    ServiceNatSplit {
        service: Ipv4Addr,
        old: Ipv4Addr,
        new: Ipv4Addr,
    },
    /// Bridged frames for `service` addressed to MAC `old` are rewritten to `new`; with
    /// `mark`, only packets with that firewall mark (the released SYNs).
    MacFix {
        service: Ipv4Addr,
        old: MacAddr,
        new: MacAddr,
        mark: Option<u32>,
    },
    /// The switcher's table of `family` (`ip`: NAT, `bridge`: MAC fix) for `service` goes.
    Remove {
        family: &'static str,
        service: Ipv4Addr,
    },
}

impl NftChange {
    /// The `nft -j` batch.
    pub fn batch(&self) -> Value {
        match *self {
            NftChange::ServiceNat { service, target } => nft::service_nat_batch(service, target),
            NftChange::ServiceNatSplit { service, old, new } => {
                nft::service_nat_split_batch(service, old, new)
            }
            NftChange::MacFix {
                service,
                old,
                new,
                mark: None,
            } => nft::mac_fix_batch(service, old, new),
            NftChange::MacFix {
                service,
                old,
                new,
                mark: Some(m),
            } => nft::mac_fix_marked_batch(service, old, new, m),
            NftChange::Remove { family, service } => nft::remove_batch(family, service),
        }
    }
}

impl std::fmt::Display for NftChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NftChange::ServiceNat { service, target } => write!(f, "nat {service} -> {target}"),
            NftChange::ServiceNatSplit { service, old, new } => {
                write!(f, "nat {service} -> {old}, host -> {new}")
            }
            NftChange::MacFix {
                old,
                new,
                mark: None,
                ..
            } => write!(f, "mac fix {old} -> {new}"),
            NftChange::MacFix {
                old,
                new,
                mark: Some(m),
                ..
            } => write!(f, "mac fix {old} -> {new} mark {m:#x}"),
            NftChange::Remove { family, service } => write!(f, "remove {family} {service}"),
        }
    }
}

/// Who holds the service address, answered the same way for the switcher (its checks before
/// anything changes) and for recovery (which side keeps the service after a crash).
///
/// Holding means, per mode: `path` — the LC's host port is a port of the bridge (both LCs have
/// the address; only the bridged one is reachable); `readdress` — the LC's NIC has the address;
/// `seamless` — the host's NAT for the address points at the LC's own address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAddress {
    pub addr: Ipv4Addr,
    pub mode: crate::switch::Mode,
    /// The bridge of the LCs' host ports.
    pub bridge: String,
}

impl ServiceAddress {
    pub fn new(addr: Ipv4Addr, mode: crate::switch::Mode, bridge: &str) -> ServiceAddress {
        ServiceAddress {
            addr,
            mode,
            bridge: bridge.to_string(),
        }
    }

    /// The service address of a switch plan.
    pub fn of(plan: &crate::switch::SwitchPlan) -> ServiceAddress {
        ServiceAddress::new(plan.service.addr, plan.mode, &plan.bridge)
    }

    /// Whether the service is on `ep` (see the type's docs).
    pub fn is_on(&self, net: &dyn Network, ep: &Endpoint) -> Result<bool, SwitchError> {
        use crate::switch::Mode;
        match self.mode {
            Mode::Path => self.port_on_bridge(net, &self.bridge_link(net)?, &ep.host_port),
            Mode::Readdress => {
                let lc = net.open_lc(ep).map_err(crate::switch::on(ep))?;
                self.held_by(&*lc, ep)
            }
            Mode::Seamless => Ok(self.nat_target(net)? == Some(ep.address.addr)),
        }
    }

    /// [`ServiceAddress::is_on`] on this host's live network; `host_netns` holds the bridge and
    /// the NAT (`None`: this process's namespace).
    pub fn is_on_host(
        &self,
        host_netns: Option<&std::path::Path>,
        ep: &Endpoint,
    ) -> Result<bool, SwitchError> {
        let net = crate::live::LiveNetwork::open(host_netns, None)?;
        self.is_on(&net, ep)
    }

    /// Which of `eps` holds the service address, if any (the first that does).
    pub fn holder<'e>(
        &self,
        net: &dyn Network,
        eps: &[&'e Endpoint],
    ) -> Result<Option<&'e Endpoint>, SwitchError> {
        for ep in eps {
            if self.is_on(net, ep)? {
                return Ok(Some(ep));
            }
        }
        Ok(None)
    }

    /// The bridge, or the error that says it is missing.
    pub(crate) fn bridge_link(&self, net: &dyn Network) -> Result<LinkInfo, SwitchError> {
        net.link(&self.bridge)?
            .ok_or_else(|| SwitchError::NoBridge {
                bridge: self.bridge.clone(),
            })
    }

    /// `path`: whether host port `port` is a port of `bridge` (a missing port is not).
    pub(crate) fn port_on_bridge(
        &self,
        net: &dyn Network,
        bridge: &LinkInfo,
        port: &str,
    ) -> Result<bool, SwitchError> {
        Ok(net
            .link(port)?
            .is_some_and(|l| l.controller == Some(bridge.index)))
    }

    /// `readdress`: whether `ep`'s NIC, reached through `lc`, has the address.
    pub(crate) fn held_by(&self, lc: &dyn InLc, ep: &Endpoint) -> Result<bool, SwitchError> {
        Ok(lc
            .addresses(&ep.iface)
            .map_err(crate::switch::on(ep))?
            .iter()
            .any(|a| a.addr == self.addr))
    }

    /// `seamless`: where the NAT for the address points.
    pub(crate) fn nat_target(&self, net: &dyn Network) -> Result<Option<Ipv4Addr>, SwitchError> {
        Ok(net.nat_target(self.addr)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeNetwork;
    use crate::switch::{Mode, SwitchPlan};

    fn plan(mode: Mode) -> SwitchPlan {
        let ep = |name: &str, addr: &str, mac: u8| Endpoint {
            name: name.into(),
            access: crate::lc::LcAccess::Netns(format!("/fake/{name}").into()),
            host_port: format!("po{name}"),
            iface: "eth0".into(),
            mac: MacAddr([2, 0, 0, 0, 0, mac]),
            address: addr.parse().unwrap(),
            identity: name.into(),
        };
        let (a, b) = match mode {
            Mode::Path => (ep("a", "10.0.0.10/24", 1), ep("b", "10.0.0.10/24", 1)),
            _ => (ep("a", "10.0.0.2/24", 1), ep("b", "10.0.0.3/24", 2)),
        };
        SwitchPlan {
            host_netns: None,
            bridge: "br".into(),
            service: "10.0.0.10/24".parse().unwrap(),
            from: a,
            to: b,
            mode,
            health: crate::HealthCheck::new(8080, "/version", ""),
            check_from: None,
            garp: crate::GarpConfig::default(),
            drain_deadline: std::time::Duration::from_secs(1),
            queue: 1,
            lock_path: "/nonexistent/lock".into(),
            handoff: false,
            resume_to: false,
        }
    }

    #[test]
    fn the_holder_is_where_each_mode_puts_the_service() {
        for mode in [Mode::Path, Mode::Readdress, Mode::Seamless] {
            let p = plan(mode);
            let net = FakeNetwork::for_plan(&p);
            let sa = ServiceAddress::of(&p);
            assert!(sa.is_on(&net, &p.from).unwrap(), "{mode}");
            assert!(!sa.is_on(&net, &p.to).unwrap(), "{mode}");
            // Move it the way each mode does, by hand.
            match mode {
                Mode::Path => {
                    net.set_controller(2, None).unwrap();
                    net.set_controller(3, Some(1)).unwrap();
                }
                Mode::Readdress => {
                    let (a, b) = (net.open_lc(&p.from).unwrap(), net.open_lc(&p.to).unwrap());
                    a.del_address("eth0", p.service).unwrap();
                    b.add_address("eth0", p.service).unwrap();
                }
                Mode::Seamless => {
                    let change = NftChange::ServiceNat {
                        service: p.service.addr,
                        target: p.to.address.addr,
                    };
                    net.nft("test", &change).unwrap();
                }
            }
            assert_eq!(
                sa.holder(&net, &[&p.from, &p.to]).unwrap().map(|e| &e.name),
                Some(&p.to.name),
                "{mode}"
            );
        }
    }

    #[test]
    fn nobody_holds_an_address_whose_nat_is_gone() {
        let p = plan(Mode::Seamless);
        let net = FakeNetwork::for_plan(&p);
        let change = NftChange::Remove {
            family: "ip",
            service: p.service.addr,
        };
        net.nft("test", &change).unwrap();
        let sa = ServiceAddress::of(&p);
        assert_eq!(sa.holder(&net, &[&p.from, &p.to]).unwrap(), None);
    }

    #[test]
    fn a_missing_bridge_is_said_so() {
        let p = plan(Mode::Path);
        let net = FakeNetwork::for_plan(&p);
        let sa = ServiceAddress::new(p.service.addr, Mode::Path, "nobridge");
        assert!(matches!(
            sa.is_on(&net, &p.from),
            Err(SwitchError::NoBridge { bridge }) if bridge == "nobridge"
        ));
    }

    #[test]
    fn readdress_asks_the_lc_itself() {
        let p = plan(Mode::Readdress);
        let net = FakeNetwork::for_plan(&p);
        net.fail("a: addresses");
        let sa = ServiceAddress::of(&p);
        assert!(matches!(
            sa.is_on(&net, &p.from),
            Err(SwitchError::InLc { lc, .. }) if lc == "a"
        ));
    }
}
