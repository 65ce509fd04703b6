//! The `ns` backend: an LC is a set of namespaces (mount, PID, network, UTS, IPC) with cgroup
//! limits, booted from its system disk by the disk's own init and boot scripts.
//!
//! Lifecycle and where each step lives:
//! - boot: check disks → cgroups → veths on the bridge → launcher (namespaces + init-to-be)
//!   → NICs moved in and configured → release (mounts, pivot_root, exec init) → runtime state.
//!   Any failure undoes what was done, in reverse, so a failed boot leaves nothing behind.
//! - stop: the init's own shutdown (SIGUSR2 = busybox poweroff, which runs the shutdown
//!   scripts), then `cgroup.kill` after a deadline; then links, cgroups and runtime files go.
//! - crash safety: init is not a child of patchover, and the runtime state (init's PID and
//!   start time) is a file under the run directory; a new patchover adopts a running LC by
//!   checking that PID still has that start time.

mod copy;
pub mod launch;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use patchover_agent::{AgentClient, Request, Response, SOCKET_NAME};
use patchover_core::{DiskKind, DiskSpec, LcId, LcSpec, NicSpec};
use serde::{Deserialize, Serialize};

use crate::boot::{BootTxn, PortKind, Undo};
use crate::cgroup::{Layout, LcGroups};
use crate::helper::{self, LcHelper};
use crate::host::Host;
use crate::images::ImageServer;
use crate::{
    ExecOutput, LcBackend, LcError, LcState, LcStatus, Pausable, Stdio, host_port_name,
    peer_port_name,
};
use launch::{LaunchSpec, MountSpec, NicSetup};

pub use patchover_core::INCOMPLETE_MARKER;

/// Where the backend keeps things, and its knobs.
#[derive(Debug, Clone)]
pub struct NsConfig {
    /// Runtime files (state, agent sockets); gone with a host reboot, as the LCs are.
    pub run_dir: PathBuf,
    /// Persistent files (console logs).
    pub state_dir: PathBuf,
    pub cgroup_parent: String,
    pub bridge: String,
    /// How long init gets to shut down by itself before every process is killed.
    pub stop_timeout: Duration,
    /// The signal that asks init to shut down (busybox: SIGUSR2 = poweroff; systemd:
    /// SIGRTMIN+4).
    pub stop_signal: Signal,
}

impl NsConfig {
    pub fn from_config(c: &patchover_core::Config) -> NsConfig {
        NsConfig {
            run_dir: c.run_dir.clone(),
            state_dir: c.state_dir.clone(),
            cgroup_parent: c.cgroup_parent.clone(),
            bridge: c.network.bridge.clone(),
            stop_timeout: Duration::from_secs(10),
            stop_signal: Signal::SIGUSR2,
        }
    }
}

/// What the backend remembers of a running LC, in `<run_dir>/lc/<id>/state.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RuntimeState {
    pub pid: i32,
    /// Init's start time in clock ticks after boot; with the PID it names the process.
    pub start_time: u64,
    pub booted_unix_ms: u64,
    pub groups: LcGroups,
    pub host_ports: Vec<String>,
    pub disks: Vec<PathBuf>,
}

pub struct NsBackend<H: Host> {
    host: H,
    cfg: NsConfig,
    /// Serves application image disks with a write history (see [`crate::images`]); `None`:
    /// images are loop-mounted directly.
    images: Option<std::sync::Arc<dyn ImageServer>>,
    /// Thaw guards of the LCs this process holds frozen.
    guards: std::sync::Mutex<std::collections::HashMap<String, Box<dyn std::any::Any + Send>>>,
}

impl<H: Host> NsBackend<H> {
    pub fn new(host: H, cfg: NsConfig) -> NsBackend<H> {
        NsBackend {
            host,
            cfg,
            images: None,
            guards: Default::default(),
        }
    }

    /// Serves the LCs' application image disks through `server` (booted from now on).
    pub fn with_images(mut self, server: std::sync::Arc<dyn ImageServer>) -> NsBackend<H> {
        self.images = Some(server);
        self
    }

    /// Stops `lc`'s image server once the LC's loop mounts are gone (they go with its mount
    /// namespace, a moment after its last process).
    fn stop_images(&self, lc: &LcId) -> std::io::Result<()> {
        let Some(server) = &self.images else {
            return Ok(());
        };
        let start = Instant::now();
        loop {
            match server.stop(lc) {
                Ok(()) => return Ok(()),
                Err(_) if start.elapsed() < Duration::from_secs(10) => {
                    self.host.sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub fn host(&self) -> &H {
        &self.host
    }

    fn lc_dir(&self, id: &LcId) -> PathBuf {
        self.cfg.run_dir.join("lc").join(id.as_str())
    }

    fn state_path(&self, id: &LcId) -> PathBuf {
        self.lc_dir(id).join("state.json")
    }

    pub fn agent_socket(&self, id: &LcId) -> PathBuf {
        self.lc_dir(id).join("agent").join(SOCKET_NAME)
    }

    fn console_log_of(&self, id: &LcId) -> PathBuf {
        self.cfg
            .state_dir
            .join("lc")
            .join(id.as_str())
            .join("console.log")
    }

    fn owners(&self) -> crate::disks::DiskOwners<'_> {
        crate::disks::DiskOwners {
            host: &self.host,
            run_dir: &self.cfg.run_dir,
        }
    }

    /// The runtime state of `id` if its init is alive (the same process that was booted).
    pub fn running(&self, id: &LcId) -> Option<RuntimeState> {
        let text = self.host.read_file(&self.state_path(id)).ok()?;
        let st: RuntimeState = serde_json::from_str(&text).ok()?;
        (self.host.process_start_time(st.pid) == Some(st.start_time)).then_some(st)
    }

    fn check_disks(&self, spec: &LcSpec) -> Result<(), LcError> {
        self.owners().check(spec)?;
        if spec.system_disk.kind == DiskKind::Dir
            && !self
                .host
                .is_executable_in(&spec.system_disk.path, &spec.init)
        {
            return Err(LcError::NoInit {
                lc: spec.id.clone(),
                path: spec.system_disk.path.clone(),
                init: spec.init.clone(),
            });
        }
        Ok(())
    }

    fn groups(&self, spec: &LcSpec) -> Result<LcGroups, LcError> {
        let host_err = |e: crate::cgroup::CgroupError| LcError::Host {
            lc: spec.id.clone(),
            step: "cgroup setup",
            source: std::io::Error::other(format_chain(&e)),
        };
        Layout::detect(&self.host)
            .and_then(|l| l.groups(&self.cfg.cgroup_parent, spec.id.as_str()))
            .map_err(host_err)
    }

    fn wait_empty(&self, g: &LcGroups, timeout: Duration) -> bool {
        crate::boot::wait_empty(&self.host, g, timeout)
    }

    fn boot_steps<'a>(
        &'a self,
        spec: &LcSpec,
        txn: &mut BootTxn<'a, H>,
    ) -> Result<RuntimeState, LcError> {
        let id = &spec.id;
        let step = |step: &'static str| {
            move |source: std::io::Error| LcError::Host {
                lc: id.clone(),
                step,
                source,
            }
        };
        txn.bridge(&self.cfg.bridge)?;
        let groups = self.groups(spec)?;
        txn.groups(&groups, spec.cpu.cpu, spec.cpu.share_pct, spec.memory_mib)?;
        let mut nic_setup = Vec::new();
        let host_ports = txn.ports(
            spec,
            &self.cfg.bridge,
            PortKind::Veth,
            |host, port, i, nic| {
                let peer = peer_port_name(id, i);
                host.create_veth(port, &peer, nic.mac)?;
                nic_setup.push(nic_setup_for(nic, peer));
                Ok(())
            },
        )?;
        let lc_dir = self.lc_dir(id);
        let agent_dir = lc_dir.join("agent");
        let staging = lc_dir.join("root");
        txn.run_dir(&lc_dir, &[&agent_dir, &staging])?;
        let console = self.console_log_of(id);
        txn.console_dir(&console)?;
        // Application image disks through the image server: a loop device over its export,
        // attached here on the host (so the host sees what backs it), mounted by the LC.
        let mut mounts: Vec<MountSpec> = spec.app_disk.iter().map(mount_spec).collect();
        let mut loops = Vec::new();
        if let Some(server) = &self.images {
            for m in mounts.iter_mut().filter(|m| m.kind == DiskKind::Image) {
                let lc = id.clone();
                txn.push(Undo::Then(
                    "stopping the image server",
                    Box::new(move || {
                        if let Err(e) = self.stop_images(&lc) {
                            tracing::warn!(%lc, error = %e, "could not stop the LC's image server");
                        }
                    }),
                ));
                let export = server
                    .serve(id, crate::images::APP_NODE, &m.source)
                    .map_err(step("serving the application image"))?;
                let dev = self
                    .host
                    .loop_attach(&export)
                    .map_err(step("attaching a loop device to the image's export"))?;
                txn.push(Undo::Loop(dev.clone()));
                loops.push(dev.clone());
                m.source = dev;
            }
        }
        let launch_spec = LaunchSpec {
            lc: id.to_string(),
            hostname: spec.hostname.clone(),
            system_disk: mount_spec(&spec.system_disk),
            staging,
            init: spec.init.clone(),
            mounts,
            agent_dir: Some(agent_dir),
            cgroup_procs: groups.procs_files(),
            console,
        };
        let launch = self
            .host
            .spawn_launcher(&launch_spec)
            .map_err(step("starting the launcher"))?;
        let pid = launch.pid();
        for n in &nic_setup {
            self.host
                .move_to_netns(&n.temp_name, pid)
                .map_err(step("moving a NIC into the LC"))?;
        }
        self.host
            .configure_nics(pid, &nic_setup)
            .map_err(step("configuring the LC's NICs"))?;
        launch
            .release()
            .map_err(|message| match message.strip_prefix(launch::NO_INIT) {
                Some(_) => LcError::NoInit {
                    lc: id.clone(),
                    path: spec.system_disk.path.clone(),
                    init: spec.init.clone(),
                },
                None => LcError::Launch {
                    lc: id.clone(),
                    message,
                },
            })?;
        // Mounted now: each loop device goes with the LC's mount of it.
        for dev in &loops {
            self.host
                .loop_detach(dev)
                .map_err(step("handing the loop device to the LC's mount"))?;
        }
        let start_time = self
            .host
            .process_start_time(pid)
            .ok_or_else(|| LcError::Launch {
                lc: id.clone(),
                message: format!(
                    "init exited right after it started; see its console log {}",
                    self.console_log_of(id).display()
                ),
            })?;
        let st = RuntimeState {
            pid,
            start_time,
            booted_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            groups,
            host_ports,
            disks: spec.disks().map(|d| d.path.clone()).collect(),
        };
        self.host
            .write_file(
                &self.state_path(id),
                &serde_json::to_string(&st).expect("state serializes"),
            )
            .map_err(step("writing the runtime state"))?;
        self.owners()
            .claim(id, pid, start_time, &st.disks)
            .map_err(step("writing the disk owners"))?;
        Ok(st)
    }

    /// Removes what a stopped LC may have left (a crash between steps): links, cgroups,
    /// runtime files. Never touches a running LC.
    fn clean_leftovers(&self, spec: &LcSpec) {
        for i in 0..spec.nics.len() {
            let _ = self.host.delete_link(&host_port_name(&spec.id, i));
            let _ = self.host.delete_link(&peer_port_name(&spec.id, i));
        }
        if let Ok(g) = self.groups(spec) {
            if !g.pids(&self.host).is_empty() {
                let _ = g.kill_all(&self.host);
                self.wait_empty(&g, Duration::from_secs(5));
            }
            let _ = g.remove(&self.host);
        }
        if let Err(e) = self.stop_images(&spec.id) {
            tracing::warn!(lc = %spec.id, error = %e, "could not stop the LC's image server");
        }
        self.owners()
            .release(&spec.id, spec.disks().map(|d| d.path.clone()));
        let _ = self.host.remove_all(&self.lc_dir(&spec.id));
    }
}

use patchover_core::error_chain as format_chain;

fn mount_spec(d: &DiskSpec) -> MountSpec {
    MountSpec {
        source: d.path.clone(),
        kind: d.kind,
        target: d.mount.clone(),
    }
}

fn nic_setup_for(nic: &NicSpec, temp_name: String) -> NicSetup {
    NicSetup {
        temp_name,
        name: nic.name.clone(),
        address: nic.address.map(|a| a.to_string()),
        gateway: nic.gateway.map(|g| g.to_string()),
    }
}

impl<H: Host> Pausable for NsBackend<H> {
    fn set_frozen(&self, spec: &LcSpec, frozen: bool) -> Result<(), LcError> {
        let st = self
            .running(&spec.id)
            .ok_or_else(|| LcError::NotRunning(spec.id.clone()))?;
        if frozen {
            // Armed before the freeze: if this process dies while the LC is frozen, the guard
            // thaws it, so a crash of patchover never leaves the service stopped.
            let (file, value) = st.groups.thaw_file();
            let guard =
                self.host
                    .spawn_thaw_guard(&file, value)
                    .map_err(|source| LcError::Host {
                        lc: spec.id.clone(),
                        step: "arming the thaw guard",
                        source,
                    })?;
            self.guards
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(spec.id.to_string(), guard);
        }
        let res = st
            .groups
            .set_frozen(&self.host, frozen)
            .map_err(|e| LcError::Host {
                lc: spec.id.clone(),
                step: if frozen { "freezing" } else { "thawing" },
                source: std::io::Error::other(format_chain(&e)),
            });
        if !frozen || res.is_err() {
            self.guards
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(spec.id.as_str());
        }
        res?;
        let start = Instant::now();
        while st.groups.is_frozen(&self.host) != frozen {
            if start.elapsed() > Duration::from_secs(5) {
                return Err(LcError::Timeout {
                    lc: spec.id.clone(),
                    what: if frozen { "freezing" } else { "thawing" },
                    timeout: Duration::from_secs(5),
                });
            }
            self.host.sleep(Duration::from_millis(1));
        }
        Ok(())
    }
}

impl<H: Host> LcBackend for NsBackend<H> {
    fn console_log(&self, spec: &LcSpec) -> PathBuf {
        self.console_log_of(&spec.id)
    }

    /// Looks for the agent in the running LC's root (a directory or a mounted image), else in
    /// the system disk's directory.
    fn has_agent(&self, spec: &LcSpec) -> bool {
        let root = match self.running(&spec.id) {
            Some(st) => PathBuf::from(format!("/proc/{}/root", st.pid)),
            None => spec.system_disk.path.clone(),
        };
        root.join(crate::AGENT_PATH_IN_LC).exists()
    }

    fn boot(&self, spec: &LcSpec) -> Result<LcStatus, LcError> {
        if self.running(&spec.id).is_some() {
            return Err(LcError::AlreadyRunning(spec.id.clone()));
        }
        self.check_disks(spec)?;
        self.clean_leftovers(spec);
        let mut txn = BootTxn::new(&self.host, &spec.id);
        if let Err(e) = self.boot_steps(spec, &mut txn) {
            tracing::warn!(lc = %spec.id, error = %e, "boot failed; undoing");
            return Err(e);
        }
        txn.commit();
        tracing::info!(lc = %spec.id, "booted");
        self.status(spec)
    }

    fn stop(&self, spec: &LcSpec) -> Result<(), LcError> {
        let st = self
            .running(&spec.id)
            .ok_or_else(|| LcError::NotRunning(spec.id.clone()))?;
        let host_err = |step: &'static str| {
            move |source: std::io::Error| LcError::Host {
                lc: spec.id.clone(),
                step,
                source,
            }
        };
        // A frozen LC cannot run its shutdown scripts.
        let _ = st.groups.set_frozen(&self.host, false);
        let signal = sysvinit_stop_signal(&spec.system_disk).unwrap_or(self.cfg.stop_signal);
        self.host
            .signal(st.pid, signal)
            .map_err(host_err("asking init to shut down"))?;
        let start = Instant::now();
        while self.host.process_start_time(st.pid) == Some(st.start_time)
            && start.elapsed() < self.cfg.stop_timeout
        {
            self.host.sleep(Duration::from_millis(20));
        }
        if !st.groups.pids(&self.host).is_empty() {
            tracing::info!(lc = %spec.id, "init did not end every process in time; killing");
            st.groups.kill_all(&self.host).map_err(|e| LcError::Host {
                lc: spec.id.clone(),
                step: "killing the LC's processes",
                source: std::io::Error::other(format_chain(&e)),
            })?;
            if !self.wait_empty(&st.groups, Duration::from_secs(10)) {
                return Err(LcError::Timeout {
                    lc: spec.id.clone(),
                    what: "the end of every process",
                    timeout: Duration::from_secs(10),
                });
            }
        }
        for port in &st.host_ports {
            self.host
                .delete_link(port)
                .map_err(host_err("removing a veth"))?;
        }
        // Nothing of it answers any more: its flows' entries go too (`crate::flows`).
        for a in spec.nics.iter().filter_map(|n| n.address) {
            self.host.forget_flows(a.addr);
        }
        // rmdir of a cgroup fails while the last tasks are still being torn down.
        let start = Instant::now();
        loop {
            match st.groups.remove(&self.host) {
                Ok(()) => break,
                Err(_) if start.elapsed() < Duration::from_secs(5) => {
                    self.host.sleep(Duration::from_millis(20))
                }
                Err(e) => {
                    return Err(LcError::Host {
                        lc: spec.id.clone(),
                        step: "removing the cgroups",
                        source: std::io::Error::other(format_chain(&e)),
                    });
                }
            }
        }
        self.stop_images(&spec.id)
            .map_err(host_err("stopping the image server"))?;
        self.clean_leftovers(spec);
        tracing::info!(lc = %spec.id, "stopped");
        Ok(())
    }

    fn status(&self, spec: &LcSpec) -> Result<LcStatus, LcError> {
        let Some(st) = self.running(&spec.id) else {
            return Ok(LcStatus::stopped(&spec.id));
        };
        Ok(LcStatus {
            id: spec.id.clone(),
            state: if st.groups.is_frozen(&self.host) {
                LcState::Frozen
            } else {
                LcState::Running
            },
            pid: Some(st.pid),
            uptime_s: crate::host::uptime_since(&self.host, st.start_time),
            processes: st.groups.pids(&self.host).len(),
            limits: Some(st.groups.read_limits(&self.host)),
            host_ports: st.host_ports.clone(),
            agent_socket: Some(self.agent_socket(&spec.id)),
        })
    }

    fn exec(&self, spec: &LcSpec, argv: &[String], stdio: Stdio) -> Result<ExecOutput, LcError> {
        let st = self
            .running(&spec.id)
            .ok_or_else(|| LcError::NotRunning(spec.id.clone()))?;
        if argv.is_empty() {
            return Err(LcError::Unsupported {
                lc: spec.id.clone(),
                message: "nothing to run: give a command after --".to_owned(),
            });
        }
        let call = LcHelper::Exec(helper::Exec {
            pid: st.pid,
            cgroup_procs: st.groups.procs_files(),
            argv: argv.to_vec(),
        });
        self.host
            .run_helper(&call, stdio)
            .map_err(|source| LcError::Host {
                lc: spec.id.clone(),
                step: "entering the LC",
                source,
            })
    }

    fn attach_disk(&self, spec: &LcSpec, source: &Path, at: &Path) -> Result<(), LcError> {
        let st = self
            .running(&spec.id)
            .ok_or_else(|| LcError::NotRunning(spec.id.clone()))?;
        if !self.host.exists(source) {
            return Err(LcError::DiskMissing {
                lc: spec.id.clone(),
                what: "disk",
                path: source.to_owned(),
            });
        }
        if !at.is_absolute() {
            return Err(LcError::Unsupported {
                lc: spec.id.clone(),
                message: format!("mount point {} must be absolute", at.display()),
            });
        }
        let kind = spec
            .disks()
            .find(|d| d.path == source)
            .map_or_else(|| DiskKind::of_path(source), |d| d.kind);
        // An image is loop-mounted on the host (through the image server's export when there
        // is one) and that mount moved into the LC.
        let mut served = None;
        let mounted = match (kind, &self.images) {
            (DiskKind::Dir, _) => source.to_owned(),
            (DiskKind::Image, None) => source.to_owned(),
            (DiskKind::Image, Some(server)) => {
                let taken = server.served(&spec.id);
                let node = std::iter::once(crate::images::APP_NODE.to_owned())
                    .chain((1..=8).map(|i| format!("disk{i}")))
                    .find(|n| !taken.contains(n))
                    .ok_or_else(|| LcError::Unsupported {
                        lc: spec.id.clone(),
                        message: "too many image disks attached (9); detach one first".to_owned(),
                    })?;
                let export =
                    server
                        .serve(&spec.id, &node, source)
                        .map_err(|source| LcError::Host {
                            lc: spec.id.clone(),
                            step: "serving the image",
                            source,
                        })?;
                served = Some(node);
                export
            }
        };
        let call = LcHelper::AttachDisk(helper::AttachDisk {
            pid: st.pid,
            source: mounted,
            target: at.to_owned(),
            image_staging: (kind == DiskKind::Image).then(|| self.lc_dir(&spec.id).join("attach")),
        });
        let out = self
            .host
            .run_helper(&call, Stdio::Capture)
            .and_then(|out| match out.status {
                Some(0) => Ok(()),
                _ => Err(std::io::Error::other(
                    String::from_utf8_lossy(&out.stderr).trim().to_owned(),
                )),
            });
        if let Err(source) = out {
            if let (Some(node), Some(server)) = (served, &self.images)
                && let Err(e) = server.unserve(&spec.id, &node)
            {
                tracing::warn!(lc = %spec.id, node, error = %e, "could not stop serving an image");
            }
            return Err(LcError::Host {
                lc: spec.id.clone(),
                step: "attaching a disk",
                source,
            });
        }
        Ok(())
    }

    fn attach_nic(&self, spec: &LcSpec, nic: &NicSpec) -> Result<String, LcError> {
        let mut st = self
            .running(&spec.id)
            .ok_or_else(|| LcError::NotRunning(spec.id.clone()))?;
        let (i, port) = crate::next_nic(&spec.id, st.host_ports.len())?;
        let step = |step: &'static str| {
            move |source: std::io::Error| LcError::Host {
                lc: spec.id.clone(),
                step,
                source,
            }
        };
        let peer = peer_port_name(&spec.id, i);
        self.host
            .create_veth(&port, &peer, nic.mac)
            .map_err(step("creating a veth"))?;
        let done = (|| {
            self.host
                .attach_to_bridge(&port, &self.cfg.bridge)
                .map_err(step("plugging the veth into the bridge"))?;
            self.host
                .move_to_netns(&peer, st.pid)
                .map_err(step("moving a NIC into the LC"))?;
            self.host
                .configure_nics(st.pid, &[nic_setup_for(nic, peer.clone())])
                .map_err(step("configuring the NIC"))
        })();
        if let Err(e) = done {
            let _ = self.host.delete_link(&port);
            return Err(e);
        }
        st.host_ports.push(port.clone());
        self.host
            .write_file(
                &self.state_path(&spec.id),
                &serde_json::to_string(&st).expect("state serializes"),
            )
            .map_err(step("writing the runtime state"))?;
        Ok(port)
    }

    fn wait_agent(&self, spec: &LcSpec, timeout: Duration) -> Result<Response, LcError> {
        let start = Instant::now();
        loop {
            if self.running(&spec.id).is_none() {
                return Err(LcError::NotRunning(spec.id.clone()));
            }
            let attempt =
                AgentClient::connect(&self.agent_socket(&spec.id), Duration::from_secs(2))
                    .and_then(|mut c| c.call(&Request::Ping));
            match attempt {
                Ok(r) => return Ok(r),
                // Not a socket that is not there yet: one the LC replaced. Waiting cannot help.
                Err(source @ patchover_agent::AgentError::Replaced { .. }) => {
                    return Err(LcError::Agent {
                        lc: spec.id.clone(),
                        source,
                    });
                }
                Err(source) if start.elapsed() >= timeout => {
                    return Err(LcError::Agent {
                        lc: spec.id.clone(),
                        source,
                    });
                }
                Err(_) => self.host.sleep(Duration::from_millis(20)),
            }
        }
    }

    fn agent(&self, spec: &LcSpec) -> Result<AgentClient, LcError> {
        if self.running(&spec.id).is_none() {
            return Err(LcError::NotRunning(spec.id.clone()));
        }
        AgentClient::connect(&self.agent_socket(&spec.id), Duration::from_secs(30)).map_err(
            |source| LcError::Agent {
                lc: spec.id.clone(),
                source,
            },
        )
    }
}

/// Debian's sysvinit ignores busybox's poweroff signal (SIGUSR2) but runs its inittab's
/// `ctrlaltdel` entry on SIGINT (a shutdown; in a PID namespace init then ends): the signal
/// for an LC whose directory system disk has a sysvinit (an `/sbin/init` that is not busybox,
/// an inittab with `ctrlaltdel`). Looked up inside the LC's root. See docs/debian.md.
pub fn sysvinit_stop_signal(disk: &DiskSpec) -> Option<Signal> {
    if disk.kind != DiskKind::Dir {
        return None;
    }
    let root = patchover_lcroot::LcRoot::open(&disk.path).ok()?;
    let id = |p: &str| {
        root.stat(Path::new(p))
            .ok()
            .flatten()
            .map(|s| (s.st_dev, s.st_ino))
    };
    let init = id("sbin/init")?;
    if Some(init) == id("bin/busybox") {
        return None;
    }
    let inittab = root.read_file(Path::new("etc/inittab"), 64 * 1024).ok()?;
    String::from_utf8_lossy(&inittab)
        .lines()
        .any(|l| !l.trim_start().starts_with('#') && l.contains(":ctrlaltdel:"))
        .then_some(Signal::SIGINT)
}

#[cfg(test)]
mod tests;
