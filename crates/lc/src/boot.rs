//! One boot transaction for every backend: what a boot sets up on the host is recorded as it
//! is set up, and a boot that fails part-way takes all of it back, newest first, so a failed
//! boot leaves no trace on the host (the [`crate::LcBackend::boot`] contract).
//!
//! The steps both backends share — the bridge, the LC's cgroups, its NIC ports on the bridge,
//! its run directory — are methods here; a backend's own steps (an image server, a loop
//! device, a VM process) are recorded with [`Undo::Then`].

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use patchover_core::{LcId, LcSpec, NicSpec};

use crate::cgroup::LcGroups;
use crate::host::Host;
use crate::{LcError, host_port_name};

/// Something a boot set up, and how it is taken back.
pub enum Undo<'a> {
    /// A host link (a veth or a tap): deleted.
    Link(String),
    /// The LC's cgroups: every process in them killed, then the groups removed.
    Groups(LcGroups),
    /// A directory: removed with everything in it.
    Dir(PathBuf),
    /// A loop device: detached.
    Loop(PathBuf),
    /// A backend's own step: `what` (for the log) and the code that takes it back.
    Then(&'static str, Box<dyn FnOnce() + 'a>),
}

/// What an LC's NIC is on the host side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortKind {
    /// The host end of a veth pair (`ns`).
    Veth,
    /// A tap device (`qemu`).
    Tap,
}

/// A boot in progress. Dropped before [`BootTxn::commit`], it takes back everything recorded.
pub struct BootTxn<'a, H: Host> {
    host: &'a H,
    lc: LcId,
    undo: Vec<Undo<'a>>,
}

impl<'a, H: Host> BootTxn<'a, H> {
    pub fn new(host: &'a H, lc: &LcId) -> BootTxn<'a, H> {
        BootTxn {
            host,
            lc: lc.clone(),
            undo: Vec::new(),
        }
    }

    /// Records something set up (before or right after it is, so a half-done step goes too).
    pub fn push(&mut self, u: Undo<'a>) {
        self.undo.push(u);
    }

    /// The boot succeeded: nothing is taken back.
    pub fn commit(mut self) {
        self.undo.clear();
    }

    /// A failure of host step `step`.
    fn step(&self, step: &'static str) -> impl Fn(std::io::Error) -> LcError + use<H> {
        let lc = self.lc.clone();
        move |source| LcError::Host {
            lc: lc.clone(),
            step,
            source,
        }
    }

    /// The host bridge the LCs' ports go on (kept: other LCs use it).
    pub fn bridge(&mut self, bridge: &str) -> Result<(), LcError> {
        self.host
            .ensure_bridge(bridge)
            .map(drop)
            .map_err(self.step("creating the bridge"))
    }

    /// The LC's cgroups with its CPU, share and memory limits.
    pub fn groups(
        &mut self,
        groups: &LcGroups,
        cpu: u32,
        share_pct: u32,
        memory_mib: u64,
    ) -> Result<(), LcError> {
        self.push(Undo::Groups(groups.clone()));
        groups
            .create(self.host, cpu, share_pct, memory_mib)
            .map_err(|e| LcError::host_chain(&self.lc, "cgroup setup", &e))
    }

    /// One host port per NIC of `spec`, made by `create(port, index, nic)` (a veth pair, a
    /// tap), on the bridge, or only up for a NIC `detached` from it. Returns the ports.
    pub fn ports(
        &mut self,
        spec: &LcSpec,
        bridge: &str,
        kind: PortKind,
        mut create: impl FnMut(&H, &str, usize, &NicSpec) -> std::io::Result<()>,
    ) -> Result<Vec<String>, LcError> {
        let (creating, up, plugging) = match kind {
            PortKind::Tap => (
                "creating a tap",
                "bringing the tap up",
                "plugging the tap into the bridge",
            ),
            PortKind::Veth => (
                "creating a veth",
                "bringing the veth up",
                "plugging the veth into the bridge",
            ),
        };
        let mut ports = Vec::new();
        for (i, nic) in spec.nics.iter().enumerate() {
            let port = host_port_name(&spec.id, i);
            // A port left by a crashed boot would make creation fail: remove it first.
            let _ = self.host.delete_link(&port);
            create(self.host, &port, i, nic).map_err(self.step(creating))?;
            self.push(Undo::Link(port.clone()));
            if nic.detached {
                self.host.set_link_up(&port).map_err(self.step(up))?;
            } else {
                self.host
                    .attach_to_bridge(&port, bridge)
                    .map_err(self.step(plugging))?;
            }
            ports.push(port);
        }
        Ok(ports)
    }

    /// The LC's run directory (and `more` inside it), removed on failure.
    pub fn run_dir(&mut self, dir: &Path, more: &[&Path]) -> Result<(), LcError> {
        self.push(Undo::Dir(dir.to_owned()));
        for d in std::iter::once(dir).chain(more.iter().copied()) {
            self.host
                .create_dir_all(d)
                .map_err(self.step("creating the run directory"))?;
        }
        Ok(())
    }

    /// The directory of the LC's console log (kept: it outlives a boot).
    pub fn console_dir(&mut self, console: &Path) -> Result<(), LcError> {
        match console.parent() {
            Some(p) => self
                .host
                .create_dir_all(p)
                .map_err(self.step("creating the state directory")),
            None => Ok(()),
        }
    }
}

impl<H: Host> Drop for BootTxn<'_, H> {
    fn drop(&mut self) {
        if !self.undo.is_empty() {
            tracing::debug!(lc = %self.lc, steps = self.undo.len(), "taking back a failed boot");
        }
        while let Some(u) = self.undo.pop() {
            match u {
                Undo::Link(l) => {
                    let _ = self.host.delete_link(&l);
                }
                Undo::Groups(g) => {
                    let _ = g.kill_all(self.host);
                    wait_empty(self.host, &g, Duration::from_secs(5));
                    let _ = g.remove(self.host);
                }
                Undo::Dir(d) => {
                    let _ = self.host.remove_all(&d);
                }
                Undo::Loop(dev) => {
                    let _ = self.host.loop_detach(&dev);
                }
                Undo::Then(what, f) => {
                    tracing::debug!(lc = %self.lc, what, "undoing");
                    f();
                }
            }
        }
    }
}

/// Waits until no process is left in `g`; false if some still are after `timeout`.
pub fn wait_empty(host: &impl Host, g: &LcGroups, timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        if g.pids(host).is_empty() {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        host.sleep(Duration::from_millis(20));
    }
}
