//! The orchestrator's side of the network: who holds the service, and the few host and in-LC
//! address changes a run and its recovery make outside the switcher.

use std::net::Ipv4Addr;

use patchover_core::{Config, Ipv4Cidr};
use patchover_net::rtnl::{Rtnl, RtnlError};
use patchover_net::{InLcError, LcAccess, ServiceAddress, SwitchError};

use crate::OrchestratorError;

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
pub(crate) fn path_back(
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
/// there; in `seamless` mode it is the LCs' gateway) and fixes the bridge's MAC.
///
/// Why the MAC: a bridge whose MAC was never set takes the lowest MAC of its ports, and a new
/// one when that port leaves — when the old LC stops after a switch. The LCs keep the old MAC
/// for the host's address, and what they send through the host goes to a MAC that is nobody's
/// until something makes them ask again (the host's next packet to them, or tens of seconds).
/// Issue 15: the seamless demo's standby answered a write it was storing while the old LC
/// stopped; no other client packet came by, and the answer never arrived.
pub fn ensure_bridge_address(config: &Config) -> Result<(), RtnlError> {
    let Some(addr) = config.network.bridge_address else {
        return Ok(());
    };
    let bridge = &config.network.bridge;
    let r = Rtnl::open(None)?;
    let l = r.need_link(bridge)?;
    r.add_address(l.index, addr)?;
    if let Some(mac) = l.mac
        && !mac_is_set(bridge)
    {
        // Its MAC of now: the neighbours that know the host's address keep the right one.
        r.set_mac(l.index, mac)?;
        tracing::info!(%bridge, %mac, "fixed the bridge's MAC (it followed its ports)");
    }
    Ok(())
}

/// Whether the MAC of `link` (in this process's namespace) was set, so the kernel keeps it
/// (`addr_assign_type` 3, `NET_ADDR_SET`). Unknown counts as not: setting it again only costs
/// the host one ARP round trip to each neighbour on it.
fn mac_is_set(link: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{link}/addr_assign_type"))
        .is_ok_and(|t| t.trim() == "3")
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
