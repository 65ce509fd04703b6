//! The service address: `service assign` and `POST /v1/service/assign` give it to an LC the
//! first time; `net setup` puts the host's NAT in front of the active LC for `seamless` mode.
//! Later the switches move it.

use std::net::Ipv4Addr;

use patchover_core::{Ipv4Cidr, LcSpec};
use patchover_lc::{LcBackend, LcState};
use patchover_net::Endpoint;
use patchover_store::Role;
use serde::{Deserialize, Serialize};

use crate::{AppError, Env};

/// Refuses to make `spec` the active LC while another active LC runs: the service is moved
/// between LCs by `patchover patch` or `patchover net switch`, not by assigning it twice.
pub fn refuse_second_active(env: &Env, spec: &LcSpec) -> Result<(), AppError> {
    if let Some(other) = env
        .store
        .lcs()?
        .into_iter()
        .find(|r| r.role == Role::Active && r.spec.id != spec.id)
        && env
            .backend
            .status(&other.spec)
            .is_ok_and(|s| s.pid.is_some())
    {
        return Err(AppError::BadInput(format!(
            "LC {} is the active LC; move the service with `patchover patch` or `patchover net switch`",
            other.spec.id
        )));
    }
    Ok(())
}

/// The service address given to an LC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assigned {
    pub lc: String,
    pub service_address: String,
}

/// Gives LC `lc` the service address and makes it the active LC: `service assign` and
/// `POST /v1/service/assign`.
pub fn assign(env: &mut Env, lc: &str) -> Result<Assigned, AppError> {
    let spec = env.lc(lc)?.clone();
    let service = env.config.service_address()?;
    refuse_second_active(env, &spec)?;
    let ep = patchover_orchestrator::cycle_endpoint(&env.backend, &spec)?;
    patchover_orchestrator::recover::assign_service(&ep.access, &ep.iface, ep.mac, service)
        .map_err(AppError::host)?;
    patchover_orchestrator::recover::ensure_bridge_address(&env.config).map_err(AppError::host)?;
    env.store.set_role(spec.id.as_str(), Role::Active)?;
    Ok(Assigned {
        lc: lc.to_owned(),
        service_address: service.to_string(),
    })
}

/// An LC as the switcher sees it: its first NIC, which must have an address, and the way in.
pub fn endpoint(env: &Env, spec: &LcSpec) -> Result<Endpoint, AppError> {
    let nic = spec.nics.first().ok_or_else(|| {
        AppError::BadInput(format!(
            "LC {} has no NIC in the config; add one under [[lc.nic]]",
            spec.id
        ))
    })?;
    let address = nic.address.ok_or_else(|| {
        AppError::BadInput(format!(
            "NIC {} of LC {} has no address in the config",
            nic.name, spec.id
        ))
    })?;
    let status = env
        .backend
        .status(spec)
        .map_err(|source| AppError::Status {
            lc: spec.id.to_string(),
            source,
        })?;
    if status.state != LcState::Running {
        return Err(AppError::BadInput(format!(
            "LC {} is not running; boot it first (patchover lc boot {})",
            spec.id, spec.id
        )));
    }
    let access = patchover_orchestrator::lc_access(&env.backend, spec)?;
    Ok(Endpoint {
        name: spec.id.to_string(),
        access,
        host_port: patchover_lc::host_port_name(&spec.id, 0),
        iface: nic.name.clone(),
        mac: nic.mac,
        address,
        identity: String::new(),
    })
}

/// The host's NAT in front of the active LC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatSetup {
    pub service: Ipv4Cidr,
    pub active: String,
    /// The active LC's own address, the NAT's target.
    pub target: Ipv4Addr,
}

/// Puts the host's NAT for the service address in front of LC `active` and makes it the
/// active LC: `net setup` (seamless mode).
pub fn seamless_setup(env: &mut Env, active: &str) -> Result<NatSetup, AppError> {
    let service = env.config.service_address()?;
    if env.config.network.bridge_address.is_none() {
        return Err(AppError::BadInput(
            "seamless mode routes clients through the host to the LCs on the bridge: set network.bridge_address (the LCs' gateway)".into(),
        ));
    }
    let spec = env.lc(active)?.clone();
    refuse_second_active(env, &spec)?;
    let ep = endpoint(env, &spec)?;
    // The host forwards the NATed traffic onto the bridge: it needs its address there.
    patchover_orchestrator::recover::ensure_bridge_address(&env.config).map_err(AppError::host)?;
    patchover_net::seamless_setup(None, service.addr, ep.address.addr).map_err(AppError::host)?;
    // The NAT's target is the active LC (the one `patchover patch` starts from).
    env.store.set_role(active, Role::Active)?;
    Ok(NatSetup {
        service,
        active: active.to_owned(),
        target: ep.address.addr,
    })
}
