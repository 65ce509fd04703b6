//! The way into a running LC and its switch endpoint, as the backend says (the orchestrator
//! does not know what kind of LC it talks to).

use patchover_core::LcSpec;
use patchover_lc::{Access, LcBackend};
use patchover_net::{Endpoint, LcAccess};

use crate::OrchestratorError;

/// The way into a running LC: its network namespace for an `ns` LC, the agent channel of a
/// `qemu` LC (a VM has no namespace on the host).
pub fn lc_access(backend: &dyn LcBackend, spec: &LcSpec) -> Result<LcAccess, OrchestratorError> {
    Ok(match backend.access(spec)? {
        Access::Netns(path) => LcAccess::Netns(path),
        Access::Agent(socket) => LcAccess::Agent { socket },
    })
}

/// The LC's switch endpoint: its first NIC.
pub fn endpoint(backend: &dyn LcBackend, spec: &LcSpec) -> Result<Endpoint, OrchestratorError> {
    let nic = spec.nics.first().ok_or_else(|| {
        OrchestratorError::BadInput(format!(
            "LC {} has no NIC; give it one in the config",
            spec.id
        ))
    })?;
    let address = nic.address.ok_or_else(|| {
        OrchestratorError::BadInput(format!(
            "LC {}'s {} has no address; give it its own address in the config",
            spec.id, nic.name
        ))
    })?;
    Ok(Endpoint {
        name: spec.id.to_string(),
        access: lc_access(backend, spec)?,
        host_port: patchover_lc::host_port_name(&spec.id, 0),
        iface: nic.name.clone(),
        mac: nic.mac,
        address,
        // Which LC answers is proven by the check itself (made inside the LC, to its own
        // address: `patchover_net::health::check_own`), not by text the service prints.
        identity: String::new(),
    })
}
