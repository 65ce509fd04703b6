//! patchover's network switcher (seed fig. 13–17 and 21–26, claims 4 and 5).
//!
//! The service moves from the active LC to the standby while clients keep sending requests, and
//! none of them may fail. Three modes do it in three ways (see `docs/network-switch.md`):
//! `path` swaps the bridge port of one NIC identity, `readdress` moves the service address to
//! another NIC and announces it, `seamless` re-points a NAT on the host so there is no pause.
//! `path` and `readdress` hold new connection attempts in a queue during their short pause
//! instead of dropping them.
//!
//! The crate knows endpoints, not LCs: the orchestrator maps LCs onto [`Endpoint`]s and passes
//! the service-specific parts in as [`Hooks`]. An endpoint is reached through its network
//! namespace (`ns` LCs) or its agent channel (`qemu` LCs); see [`lc`].

mod diag;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
pub mod garp;
pub mod health;
pub mod hold;
pub mod lc;
pub mod live;
pub mod netns;
pub mod network;
pub mod nft;
pub mod probe;
pub mod refresh;
/// Links, addresses and neighbours over rtnetlink (owned by `patchover-netlink`, which the LC
/// backends use too).
pub use patchover_netlink::rtnl;
pub mod switch;
pub mod tls;

pub use garp::GarpConfig;
pub use health::{HealthCheck, Probe};
pub use lc::{InLc, InLcError, LcAccess};
pub use live::LiveNetwork;
pub use network::{Network, NftChange, ServiceAddress};
pub use switch::{
    BoxError, Endpoint, Hooks, Mode, NoControl, ServiceControl, SwitchError, SwitchLock,
    SwitchPlan, SwitchReport, Switched, lock, seamless_setup, switch, switch_back, switch_with,
    teardown, validate,
};
