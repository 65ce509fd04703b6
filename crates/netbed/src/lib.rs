//! A test bed for the network switcher, and the benchmark that runs on it.
//!
//! Neither is part of the switcher: [`testbed`] builds a throw-away topology of network
//! namespaces (a host with a bridge, two LCs, a client) for the root tests of `patchover-net`
//! (`tests/switch.rs` here) and for `patchover bench switch`; [`bench`] drives load through
//! switchovers on it and compares them with what people do today. They live in their own crate
//! so the switcher does not depend on the load generator.

pub mod bench;
pub mod testbed;
