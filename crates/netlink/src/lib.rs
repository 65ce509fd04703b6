//! The one owner of rtnetlink in patchover.
//!
//! The network switcher (`patchover-net`) moves ports and addresses; the LC backends
//! (`patchover-lc`, `patchover-qemu` through its host seam) create and remove the bridge, the
//! veth pairs and the taps an LC's NICs are. Both go through [`rtnl::Rtnl`]: one netlink
//! client, no `ip` output parsed, and errors that name the link a request was about. It is a
//! crate of its own so the LC backends need not depend on the switcher to reach it.

pub mod netns;
pub mod rtnl;
pub mod tap;
pub mod tcptable;
