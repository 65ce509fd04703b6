//! The `qemu` backend: each LC is a QEMU VM (the seed's hardware partitioning).
//!
//! Lifecycle and where each step lives:
//! - boot: QEMU present → disks checked (images, complete, not in use) → accelerator (probe) →
//!   cgroup (CPU share, cpuset, memory) → taps on the bridge → QEMU started daemonized (it
//!   reports a failed start before it detaches) → moved into the cgroup → runtime state.
//!   Any failure undoes what was done, in reverse.
//! - the guest: kernel + initramfs from the image directory, root on the system disk; the
//!   kernel command line carries the hostname, the NICs and the application disk
//!   ([`kernel_cmdline`]); the agent answers over virtio-serial.
//! - stop: the guest's own shutdown (`poweroff` through the agent, so its shutdown scripts
//!   run), then QMP `quit`, then SIGKILL; taps, cgroup and runtime files go.
//! - freeze: QMP `stop`/`cont` (the vCPUs stop; QEMU's block layer, and so a mirror job, go
//!   on — which the cut of the application disk needs).
//! - crash safety: QEMU is not a child of patchover; the runtime state names its PID and start
//!   time, and a new patchover adopts a running VM by checking both.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use patchover_agent::{AgentClient, Request, Response};
use patchover_core::{DiskKind, LcId, LcSpec, NicSpec};
use patchover_lc::boot::{BootTxn, PortKind, Undo};
use patchover_lc::cgroup::{Layout, LcGroups};
use patchover_lc::disks::DiskOwners;
use patchover_lc::host::Host;
use patchover_lc::{
    ExecOutput, LcBackend, LcError, LcState, LcStatus, Pausable, Stdio, host_port_name,
};
use serde::{Deserialize, Serialize};

use crate::accel::{self, Accel};
use crate::qmp::{Qmp, RunState};

/// The virtio-serial port name the guest agent looks for.
pub const AGENT_PORT: &str = "org.patchover.agent";

/// Memory QEMU itself needs beside the guest's (TCG's translation cache is bounded to 64 MiB).
const QEMU_OVERHEAD_MIB: u64 = 256;

#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub run_dir: PathBuf,
    pub state_dir: PathBuf,
    pub cgroup_parent: String,
    pub bridge: String,
    pub qemu: PathBuf,
    /// How long the guest gets to shut down by itself.
    pub stop_timeout: Duration,
    /// How long the accelerator probe waits for a KVM guest.
    pub probe_deadline: Duration,
}

impl QemuConfig {
    pub fn from_config(c: &patchover_core::Config) -> QemuConfig {
        QemuConfig {
            run_dir: c.run_dir.clone(),
            state_dir: c.state_dir.clone(),
            cgroup_parent: c.cgroup_parent.clone(),
            bridge: c.network.bridge.clone(),
            qemu: PathBuf::from(
                std::env::var_os("PATCHOVER_QEMU").unwrap_or_else(|| "qemu-system-x86_64".into()),
            ),
            stop_timeout: Duration::from_secs(15),
            probe_deadline: Duration::from_secs(8),
        }
    }
}

/// What the backend remembers of a running VM, in `<run_dir>/lc/<id>/state.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RuntimeState {
    pub pid: i32,
    pub start_time: u64,
    pub booted_unix_ms: u64,
    pub accel: Accel,
    pub groups: LcGroups,
    pub host_ports: Vec<String>,
    pub disks: Vec<PathBuf>,
    /// Disks attached after boot (`disk<N>` nodes).
    #[serde(default)]
    pub attached: Vec<PathBuf>,
}

pub struct QemuBackend<H: Host> {
    host: H,
    pub(crate) cfg: QemuConfig,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How many times longer than asked the backend waits for a TCG guest's agent. Callers ask
/// for what a booted system needs (the cycle: 30 s); a guest whose CPU is emulated boots a
/// Debian system in 16-24 s on a quiet 2-core host and slower on a busy one (docs/debian.md),
/// so the caller's deadline alone left no margin.
pub const TCG_AGENT_WAIT_FACTOR: u32 = 4;

/// The wait for a VM's agent under `accel`, for a caller that asked for `asked`.
pub fn agent_wait_for(accel: Accel, asked: Duration) -> Duration {
    match accel {
        Accel::Kvm => asked,
        Accel::Tcg => asked.saturating_mul(TCG_AGENT_WAIT_FACTOR),
    }
}

/// The QMP monitor a VM keeps for block jobs (see [`qemu_args`]).
pub fn jobs_socket(run_dir: &Path, id: &LcId) -> PathBuf {
    run_dir.join("lc").join(id.as_str()).join("qmp-jobs.sock")
}

/// The block driver of an image file, by its name (`.qcow2` or raw).
pub fn image_format(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("qcow2") => "qcow2",
        _ => "raw",
    }
}

/// The kernel command line of an LC (see docs/lc-qemu.md for what the guest does with it).
pub fn kernel_cmdline(spec: &LcSpec) -> String {
    let mut c = vec![
        "console=ttyS0".to_owned(),
        "panic=-1".to_owned(),
        "quiet".to_owned(),
        "root=/dev/vda".to_owned(),
        "rw".to_owned(),
        format!("patchover.hostname={}", spec.hostname),
    ];
    for n in &spec.nics {
        let addr = n.address.map_or("-".to_owned(), |a| a.to_string());
        match n.gateway {
            Some(g) => c.push(format!("patchover.nic={},{},{addr},{g}", n.name, n.mac)),
            None => c.push(format!("patchover.nic={},{},{addr}", n.name, n.mac)),
        }
    }
    if let Some(app) = &spec.app_disk {
        c.push(format!("patchover.app=/dev/vdb,{}", app.mount.display()));
    }
    if let Some(q) = &spec.qemu
        && !q.append.trim().is_empty()
    {
        c.push(q.append.trim().to_owned());
    }
    c.join(" ")
}

/// A `-blockdev` argument: a format node `node` over a file node `<node>-file`.
pub fn blockdev_json(node: &str, path: &Path) -> serde_json::Value {
    serde_json::json!({
        "driver": image_format(path),
        "node-name": node,
        "file": {"driver": "file", "filename": path, "node-name": format!("{node}-file")},
    })
}

/// QEMU's command line for `spec` (everything but the program name).
pub fn qemu_args(spec: &LcSpec, lc_dir: &Path, console: &Path, accel: Accel) -> Vec<String> {
    let p = |x: &Path| x.display().to_string();
    let mut a: Vec<String> = vec![
        "-name".into(),
        format!("patchover-{},process=po-{}", spec.id, spec.id),
        "-machine".into(),
        "pc".into(),
        "-accel".into(),
        accel.arg().into(),
        "-smp".into(),
        "1".into(),
        "-m".into(),
        spec.memory_mib.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-chardev".into(),
        format!("file,id=console,path={},append=on", p(console)),
        "-serial".into(),
        "chardev:console".into(),
        "-chardev".into(),
        format!(
            "socket,id=qmp,path={},server=on,wait=off",
            p(&lc_dir.join("qmp.sock"))
        ),
        "-mon".into(),
        "chardev=qmp,mode=control".into(),
        // A second monitor for long block jobs (a mirror runs for minutes), so that status,
        // freeze and hot-plug calls never wait behind it: QEMU serves one client per monitor.
        "-chardev".into(),
        format!(
            "socket,id=qmpjobs,path={},server=on,wait=off",
            p(&lc_dir.join("qmp-jobs.sock"))
        ),
        "-mon".into(),
        "chardev=qmpjobs,mode=control".into(),
        "-device".into(),
        "virtio-serial-pci,id=vser".into(),
        "-chardev".into(),
        format!(
            "socket,id=agent,path={},server=on,wait=off",
            p(&lc_dir.join("agent.sock"))
        ),
        "-device".into(),
        format!("virtserialport,chardev=agent,name={AGENT_PORT}"),
    ];
    if let Some(q) = &spec.qemu {
        a.push("-kernel".into());
        a.push(p(&q.kernel));
        if let Some(i) = &q.initrd {
            a.push("-initrd".into());
            a.push(p(i));
        }
    }
    a.push("-append".into());
    a.push(kernel_cmdline(spec));
    for (node, d) in
        std::iter::once(("sys", &spec.system_disk)).chain(spec.app_disk.iter().map(|d| ("app", d)))
    {
        a.push("-blockdev".into());
        a.push(blockdev_json(node, &d.path).to_string());
        a.push("-device".into());
        a.push(format!(
            "virtio-blk-pci,drive={node},id={node}-dev,serial={node}"
        ));
    }
    for (i, n) in spec.nics.iter().enumerate() {
        a.push("-netdev".into());
        a.push(format!(
            "tap,id=n{i},ifname={},script=no,downscript=no",
            host_port_name(&spec.id, i)
        ));
        a.push("-device".into());
        a.push(format!(
            "virtio-net-pci,netdev=n{i},mac={},id=n{i}-dev",
            n.mac
        ));
    }
    a.push("-daemonize".into());
    a.push("-pidfile".into());
    a.push(p(&lc_dir.join("qemu.pid")));
    a
}

impl<H: Host> QemuBackend<H> {
    pub fn new(host: H, cfg: QemuConfig) -> QemuBackend<H> {
        QemuBackend { host, cfg }
    }

    fn lc_dir(&self, id: &LcId) -> PathBuf {
        self.cfg.run_dir.join("lc").join(id.as_str())
    }

    fn state_path(&self, id: &LcId) -> PathBuf {
        self.lc_dir(id).join("state.json")
    }

    pub fn agent_socket(&self, id: &LcId) -> PathBuf {
        self.lc_dir(id).join("agent.sock")
    }

    pub fn qmp_socket(&self, id: &LcId) -> PathBuf {
        self.lc_dir(id).join("qmp.sock")
    }

    /// The monitor kept for block jobs (see [`qemu_args`]).
    pub fn qmp_jobs_socket(&self, id: &LcId) -> PathBuf {
        jobs_socket(&self.cfg.run_dir, id)
    }

    fn console_log_of(&self, id: &LcId) -> PathBuf {
        self.cfg
            .state_dir
            .join("lc")
            .join(id.as_str())
            .join("console.log")
    }

    fn owners(&self) -> DiskOwners<'_> {
        DiskOwners {
            host: &self.host,
            run_dir: &self.cfg.run_dir,
        }
    }

    /// The runtime state of `id` if its QEMU is alive (the same process that was started).
    pub fn running(&self, id: &LcId) -> Option<RuntimeState> {
        self.recorded(id)
            .filter(|st| self.host.process_start_time(st.pid) == Some(st.start_time))
    }

    /// The runtime state file as written, whether or not its QEMU still runs.
    fn recorded(&self, id: &LcId) -> Option<RuntimeState> {
        let text = self.host.read_file(&self.state_path(id)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Cleans up after a VM that ended by itself (guest power-off, panic, QEMU crash).
    fn reap_ended(&self, spec: &LcSpec) -> bool {
        match self.recorded(&spec.id) {
            Some(st) if self.host.process_start_time(st.pid) != Some(st.start_time) => {
                self.leave_groups(&st.groups, st.pid);
                self.clean_leftovers(spec, Some(&st));
                true
            }
            _ => false,
        }
    }

    /// Opens QMP on a running VM.
    pub fn qmp(&self, id: &LcId) -> Result<Qmp, LcError> {
        Qmp::connect(&self.qmp_socket(id), Duration::from_secs(5))
            .map_err(|e| LcError::host_chain(id, "talking to QEMU over QMP", &e))
    }

    /// The last lines of the VM's console, for errors about a guest that did not come up.
    pub fn console_tail(&self, id: &LcId, lines: usize) -> String {
        let text = std::fs::read(self.console_log_of(id)).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn check(&self, spec: &LcSpec) -> Result<(), LcError> {
        let unsupported = |message: String| LcError::Unsupported {
            lc: spec.id.clone(),
            message,
        };
        if which(&self.cfg.qemu).is_none() {
            return Err(unsupported(format!(
                "QEMU ({}) is not installed; install it with `apt-get install qemu-system-x86` (or set PATCHOVER_QEMU)",
                self.cfg.qemu.display()
            )));
        }
        let q = spec.qemu.as_ref().ok_or_else(|| {
            unsupported("no kernel configured; set kernel (and initrd) for this LC".to_owned())
        })?;
        for (what, path) in
            std::iter::once(("kernel", &q.kernel)).chain(q.initrd.iter().map(|i| ("initrd", i)))
        {
            if !self.host.exists(path) {
                return Err(LcError::DiskMissing {
                    lc: spec.id.clone(),
                    what,
                    path: path.clone(),
                });
            }
        }
        if let Some(d) = spec.disks().find(|d| d.kind != DiskKind::Image) {
            return Err(unsupported(format!(
                "{} is a directory; a VM's disks are image files",
                d.path.display()
            )));
        }
        self.owners().check(spec)
    }

    fn groups(&self, spec: &LcSpec) -> Result<LcGroups, LcError> {
        Layout::detect(&self.host)
            .and_then(|l| l.groups(&self.cfg.cgroup_parent, spec.id.as_str()))
            .map_err(|e| LcError::host_chain(&spec.id, "cgroup setup", &e))
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
        let q = spec.qemu.as_ref().ok_or_else(|| LcError::Unsupported {
            lc: id.clone(),
            message: "a VM needs a kernel; set `kernel` in the config".to_owned(),
        })?;
        let probe = accel::choose(
            &self.cfg.qemu,
            &q.kernel,
            q.initrd.as_deref(),
            &self.cfg.run_dir.join("qemu-accel.json"),
            self.cfg.probe_deadline,
        )
        .map_err(|m| LcError::Unsupported {
            lc: id.clone(),
            message: m,
        })?;
        txn.bridge(&self.cfg.bridge)?;
        let groups = self.groups(spec)?;
        txn.groups(
            &groups,
            spec.cpu.cpu,
            spec.cpu.share_pct,
            spec.memory_mib + QEMU_OVERHEAD_MIB,
        )?;
        let host_ports = txn.ports(spec, &self.cfg.bridge, PortKind::Tap, |host, port, _, _| {
            host.create_tap(port)
        })?;
        let lc_dir = self.lc_dir(id);
        txn.run_dir(&lc_dir, &[])?;
        let console = self.console_log_of(id);
        txn.console_dir(&console)?;
        // A marker line, so the console tail of a failed boot shows this boot only.
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&console)
        {
            let _ = writeln!(f, "\n--- patchover: booting {id} ({}) ---", probe.accel);
        }
        let args = qemu_args(spec, &lc_dir, &console, probe.accel);
        tracing::debug!(lc = %id, ?args, "starting QEMU");
        // With -daemonize QEMU reports a failed start (bad disk, tap busy) before it detaches.
        let out = Command::new(&self.cfg.qemu)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(step("starting QEMU"))?;
        let pid_text = self.host.read_file(&lc_dir.join("qemu.pid")).ok();
        let pid: Option<i32> = pid_text.as_deref().and_then(|t| t.trim().parse().ok());
        if let Some(pid) = pid {
            let groups = groups.clone();
            txn.push(Undo::Then(
                "ending QEMU",
                Box::new(move || self.kill(&groups, pid)),
            ));
        }
        if !out.status.success() {
            return Err(LcError::Launch {
                lc: id.clone(),
                message: format!(
                    "QEMU did not start: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        let pid = pid.ok_or_else(|| LcError::Launch {
            lc: id.clone(),
            message: "QEMU started but wrote no PID file".to_owned(),
        })?;
        for f in groups.procs_files() {
            self.host
                .write_file(&f, &pid.to_string())
                .map_err(step("moving QEMU into the LC's cgroup"))?;
        }
        let start_time = self
            .host
            .process_start_time(pid)
            .ok_or_else(|| LcError::Launch {
                lc: id.clone(),
                message: format!(
                    "QEMU exited right after it started; console:\n{}",
                    self.console_tail(id, 30)
                ),
            })?;
        let st = RuntimeState {
            pid,
            start_time,
            booted_unix_ms: now_ms(),
            accel: probe.accel,
            groups,
            host_ports,
            disks: spec.disks().map(|d| d.path.clone()).collect(),
            attached: Vec::new(),
        };
        self.save(id, &st)
            .map_err(step("writing the runtime state"))?;
        self.owners()
            .claim(id, pid, start_time, &st.disks)
            .map_err(step("writing the disk owners"))?;
        Ok(st)
    }

    fn save(&self, id: &LcId, st: &RuntimeState) -> std::io::Result<()> {
        self.host.write_file(
            &self.state_path(id),
            &serde_json::to_string(st).expect("state serializes"),
        )
    }

    fn clean_leftovers(&self, spec: &LcSpec, st: Option<&RuntimeState>) {
        for i in 0..spec.nics.len().max(st.map_or(0, |s| s.host_ports.len())) {
            let _ = self.host.delete_link(&host_port_name(&spec.id, i));
        }
        if let Ok(g) = self.groups(spec) {
            let _ = g.kill_all(&self.host);
            let start = Instant::now();
            while g.remove(&self.host).is_err() && start.elapsed() < Duration::from_secs(5) {
                self.host.sleep(Duration::from_millis(20));
            }
        }
        let mut disks: Vec<PathBuf> = spec.disks().map(|d| d.path.clone()).collect();
        if let Some(st) = st {
            disks.extend(st.disks.iter().chain(&st.attached).cloned());
        }
        self.owners().release(&spec.id, disks);
        let _ = self.host.remove_all(&self.lc_dir(&spec.id));
    }

    /// Moves QEMU to the root of each cgroup hierarchy before it ends: an exited QEMU stays a
    /// zombie (in its cgroup) until whatever adopted it reaps it, which would keep the LC's
    /// cgroups from being removed.
    /// Ends a QEMU process a failed boot started.
    fn kill(&self, groups: &LcGroups, pid: i32) {
        self.leave_groups(groups, pid);
        let _ = self.host.signal(pid, nix::sys::signal::Signal::SIGKILL);
        let start = Instant::now();
        while self.host.process_start_time(pid).is_some()
            && start.elapsed() < Duration::from_secs(5)
        {
            self.host.sleep(Duration::from_millis(20));
        }
    }

    fn leave_groups(&self, groups: &LcGroups, pid: i32) {
        for f in groups.procs_files() {
            // <root>/<parent>/<lc>/cgroup.procs → <root>/cgroup.procs
            if let Some(root) = f.parent().and_then(Path::parent).and_then(Path::parent) {
                let _ = self
                    .host
                    .write_file(&root.join("cgroup.procs"), &pid.to_string());
            }
        }
    }

    fn gone(&self, st: &RuntimeState, within: Duration) -> bool {
        let start = Instant::now();
        loop {
            if self.host.process_start_time(st.pid) != Some(st.start_time) {
                return true;
            }
            if start.elapsed() >= within {
                return false;
            }
            self.host.sleep(Duration::from_millis(50));
        }
    }

    fn agent_call(&self, id: &LcId, req: &Request, timeout: Duration) -> Result<Response, LcError> {
        let mut c =
            AgentClient::connect_virtio(&self.agent_socket(id), timeout).map_err(|source| {
                LcError::Agent {
                    lc: id.clone(),
                    source,
                }
            })?;
        match c.call(req) {
            Ok(Response::Error { message }) => Err(LcError::Agent {
                lc: id.clone(),
                source: patchover_agent::AgentError::Remote(message),
            }),
            Ok(r) => Ok(r),
            Err(source) => Err(LcError::Agent {
                lc: id.clone(),
                source,
            }),
        }
    }

    /// Runs one of the guest scripts with `args`; a non-zero exit is the error of `step`.
    fn guest_sh(
        &self,
        spec: &LcSpec,
        step: &'static str,
        script: &'static str,
        args: &[String],
    ) -> Result<(), LcError> {
        let out = self.exec(spec, &guest_sh_argv(script, args), Stdio::Capture)?;
        if out.status == Some(0) {
            return Ok(());
        }
        Err(LcError::Host {
            lc: spec.id.clone(),
            step,
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
        })
    }
}

/// Finds the disk with serial `$1` and mounts it on `$2`. The script is a constant: the node
/// and the mount point reach it as positional parameters, never pasted into its text.
const MOUNT_DISK_SCRIPT: &str = r#"node=$1 at=$2 d=
for i in $(seq 100); do
    for b in /sys/block/vd*; do
        [ "$(cat "$b/serial" 2>/dev/null)" = "$node" ] && d=/dev/${b##*/} && break 2
    done
    sleep 0.05
done
[ -n "$d" ] || { echo 'the disk did not appear in the guest' >&2; exit 1; }
mkdir -p "$at" && mount "$d" "$at""#;

/// Finds the interface with MAC `$1`, names it `$2`, gives it the address `$3` (none if
/// empty) and brings it up. A constant script: the values are positional parameters.
const NIC_SCRIPT: &str = r#"mac=$1 name=$2 addr=$3 f=
for i in $(seq 100); do
    for n in /sys/class/net/*; do
        [ "$(cat "$n/address")" = "$mac" ] && f=${n##*/} && break 2
    done
    sleep 0.05
done
[ -n "$f" ] || { echo 'the NIC did not appear in the guest' >&2; exit 1; }
[ "$f" = "$name" ] || ip link set dev "$f" name "$name"
[ -z "$addr" ] || ip addr add "$addr" dev "$name"
ip link set dev "$name" up"#;

/// The positional parameters of [`NIC_SCRIPT`] for `nic`.
fn nic_script_args(nic: &NicSpec) -> Vec<String> {
    vec![
        nic.mac.to_string(),
        nic.name.clone(),
        nic.address.map(|a| a.to_string()).unwrap_or_default(),
    ]
}

/// The argv that runs `script` in the guest's shell with `args` as `$1`, `$2`, …: data never
/// becomes part of the script's text.
fn guest_sh_argv(script: &'static str, args: &[String]) -> Vec<String> {
    ["/bin/sh", "-c", script, "sh"]
        .into_iter()
        .map(str::to_owned)
        .chain(args.iter().cloned())
        .collect()
}

/// `p` itself when it has a directory part, else the first `PATH` entry that has it.
pub fn which(p: &Path) -> Option<PathBuf> {
    if p.components().count() > 1 {
        return p.exists().then(|| p.to_owned());
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(p))
        .find(|c| c.exists())
}

impl<H: Host> Pausable for QemuBackend<H> {
    fn set_frozen(&self, spec: &LcSpec, frozen: bool) -> Result<(), LcError> {
        self.running(&spec.id)
            .ok_or_else(|| LcError::NotRunning(spec.id.clone()))?;
        let mut q = self.qmp(&spec.id)?;
        let r = if frozen { q.stop() } else { q.cont() };
        let step = if frozen {
            "pausing the VM"
        } else {
            "resuming the VM"
        };
        r.map_err(|e| LcError::host_chain(&spec.id, step, &e))
    }
}

impl<H: Host> LcBackend for QemuBackend<H> {
    fn console_log(&self, spec: &LcSpec) -> PathBuf {
        self.console_log_of(&spec.id)
    }

    fn boot(&self, spec: &LcSpec) -> Result<LcStatus, LcError> {
        if self.running(&spec.id).is_some() {
            return Err(LcError::AlreadyRunning(spec.id.clone()));
        }
        self.check(spec)?;
        if !self.reap_ended(spec) {
            self.clean_leftovers(spec, None);
        }
        let mut txn = BootTxn::new(&self.host, &spec.id);
        // Taken back last: the disks this boot may have claimed.
        txn.push(Undo::Then(
            "releasing the disks",
            Box::new(|| {
                self.owners()
                    .release(&spec.id, spec.disks().map(|d| d.path.clone()))
            }),
        ));
        let st = match self.boot_steps(spec, &mut txn) {
            Ok(st) => st,
            Err(e) => {
                tracing::warn!(lc = %spec.id, error = %e, "boot failed; undoing");
                return Err(e);
            }
        };
        txn.commit();
        tracing::info!(lc = %spec.id, pid = st.pid, accel = %st.accel, "booted");
        self.status(spec)
    }

    fn stop(&self, spec: &LcSpec) -> Result<(), LcError> {
        let Some(st) = self.running(&spec.id) else {
            // A VM that ended by itself left its taps and cgroup: stopping it means removing
            // those.
            if self.reap_ended(spec) {
                tracing::info!(lc = %spec.id, "the VM had ended by itself; cleaned up after it");
                return Ok(());
            }
            return Err(LcError::NotRunning(spec.id.clone()));
        };
        // A paused guest cannot run its shutdown scripts.
        if let Ok(mut q) = self.qmp(&spec.id)
            && matches!(q.query_status(), Ok(RunState::Paused))
        {
            let _ = q.cont();
        }
        self.leave_groups(&st.groups, st.pid);
        // The guest's own shutdown first: busybox init runs the shutdown scripts, then powers
        // off, and QEMU (-no-reboot) exits.
        let asked = self
            .agent_call(
                &spec.id,
                &Request::Exec {
                    argv: vec!["poweroff".to_owned()],
                    timeout_ms: 5_000,
                },
                Duration::from_secs(3),
            )
            .is_ok();
        if !asked || !self.gone(&st, self.cfg.stop_timeout) {
            tracing::info!(lc = %spec.id, "the guest did not power off by itself; quitting QEMU");
            if let Ok(mut q) = self.qmp(&spec.id) {
                let _ = q.quit();
            }
            if !self.gone(&st, Duration::from_secs(5)) {
                let _ = self.host.signal(st.pid, nix::sys::signal::Signal::SIGKILL);
                if !self.gone(&st, Duration::from_secs(10)) {
                    return Err(LcError::Timeout {
                        lc: spec.id.clone(),
                        what: "the end of QEMU",
                        timeout: Duration::from_secs(10),
                    });
                }
            }
        }
        self.clean_leftovers(spec, Some(&st));
        // Nothing of it answers any more: its flows' entries go too (`patchover_lc::flows`).
        for a in spec.nics.iter().filter_map(|n| n.address) {
            self.host.forget_flows(a.addr);
        }
        tracing::info!(lc = %spec.id, "stopped");
        Ok(())
    }

    fn status(&self, spec: &LcSpec) -> Result<LcStatus, LcError> {
        let Some(st) = self.running(&spec.id) else {
            return Ok(LcStatus::stopped(&spec.id));
        };
        // A monitor that does not answer reads as running: the process is alive.
        let paused = self
            .qmp(&spec.id)
            .ok()
            .and_then(|mut q| q.query_status().ok())
            == Some(RunState::Paused);
        Ok(LcStatus {
            id: spec.id.clone(),
            state: if paused {
                LcState::Frozen
            } else {
                LcState::Running
            },
            pid: Some(st.pid),
            uptime_s: patchover_lc::host::uptime_since(&self.host, st.start_time),
            // The guest's processes are the guest's business; QEMU is one process here.
            processes: 1,
            limits: Some(st.groups.read_limits(&self.host)),
            host_ports: st.host_ports.clone(),
            agent_socket: Some(self.agent_socket(&spec.id)),
        })
    }

    /// A VM has no namespace on the host: the way in is its agent channel.
    fn access(&self, spec: &LcSpec) -> Result<patchover_lc::Access, LcError> {
        let st = self.status(spec)?;
        match (st.state, st.agent_socket) {
            (LcState::Running, Some(socket)) => Ok(patchover_lc::Access::Agent(socket)),
            _ => Err(LcError::NotRunning(spec.id.clone())),
        }
    }

    /// The guest has its system image mounted: the host reads only the copy.
    fn system_disk_readable_live(&self, _spec: &LcSpec) -> bool {
        false
    }

    fn exec(&self, spec: &LcSpec, argv: &[String], stdio: Stdio) -> Result<ExecOutput, LcError> {
        self.running(&spec.id)
            .ok_or_else(|| LcError::NotRunning(spec.id.clone()))?;
        if argv.is_empty() {
            return Err(LcError::Unsupported {
                lc: spec.id.clone(),
                message: "nothing to run: give a command after --".to_owned(),
            });
        }
        let limit = match stdio {
            Stdio::CaptureFor(limit) => limit,
            Stdio::Inherit | Stdio::Capture => Duration::from_secs(600),
        };
        let r = self.agent_call(
            &spec.id,
            &Request::Exec {
                argv: argv.to_vec(),
                timeout_ms: limit.as_millis().max(1) as u64,
            },
            Duration::from_secs(10),
        )?;
        let Response::Exec {
            status,
            stdout,
            stderr,
            timed_out,
        } = r
        else {
            return Err(LcError::Agent {
                lc: spec.id.clone(),
                source: patchover_agent::AgentError::Protocol(format!(
                    "expected an exec answer, got {r:?}"
                )),
            });
        };
        let mut stderr = stderr;
        if timed_out {
            stderr.push_str(&patchover_lc::killed_after(limit));
        }
        if stdio == Stdio::Inherit {
            let _ = std::io::stdout().write_all(stdout.as_bytes());
            let _ = std::io::stderr().write_all(stderr.as_bytes());
        }
        Ok(ExecOutput {
            status,
            stdout: stdout.into_bytes(),
            stderr: stderr.into_bytes(),
        })
    }

    fn attach_disk(&self, spec: &LcSpec, source: &Path, at: &Path) -> Result<(), LcError> {
        let mut st = self
            .running(&spec.id)
            .ok_or_else(|| LcError::NotRunning(spec.id.clone()))?;
        if !self.host.exists(source) || source.is_dir() {
            return Err(LcError::DiskMissing {
                lc: spec.id.clone(),
                what: "disk image",
                path: source.to_owned(),
            });
        }
        if !at.is_absolute() || at.to_str().is_none_or(|s| s.contains(['\'', ' ', '\n'])) {
            return Err(LcError::Unsupported {
                lc: spec.id.clone(),
                message: format!(
                    "mount point {} must be an absolute path without quotes or spaces",
                    at.display()
                ),
            });
        }
        // The LC's own application disk is always node `app` (a mirror finds it by that name),
        // whether it was there at boot or attached later (the standby of a patch run).
        let node = match &spec.app_disk {
            Some(d) if d.path == source => "app".to_owned(),
            _ => format!("disk{}", st.attached.len()),
        };
        let host_err = |step: &'static str| {
            move |e: crate::qmp::QmpError| LcError::host_chain(&spec.id, step, &e)
        };
        let mut q = self.qmp(&spec.id)?;
        q.execute("blockdev-add", blockdev_json(&node, source))
            .map_err(host_err("adding the disk to QEMU"))?;
        if let Err(e) = q.execute(
            "device_add",
            serde_json::json!({"driver": "virtio-blk-pci", "drive": node, "id": format!("{node}-dev"), "serial": node}),
        ) {
            let _ = q.execute("blockdev-del", serde_json::json!({"node-name": node}));
            return Err(host_err("plugging the disk into the VM")(e));
        }
        st.attached.push(source.to_owned());
        self.save(&spec.id, &st).map_err(|source| LcError::Host {
            lc: spec.id.clone(),
            step: "writing the runtime state",
            source,
        })?;
        // The guest finds the disk by its serial and mounts it.
        self.guest_sh(
            spec,
            "mounting the disk in the guest",
            MOUNT_DISK_SCRIPT,
            &[node, at.display().to_string()],
        )
    }

    fn attach_nic(&self, spec: &LcSpec, nic: &NicSpec) -> Result<String, LcError> {
        let mut st = self
            .running(&spec.id)
            .ok_or_else(|| LcError::NotRunning(spec.id.clone()))?;
        let (i, port) = patchover_lc::next_nic(&spec.id, st.host_ports.len())?;
        let io_err = |step: &'static str| {
            move |source: std::io::Error| LcError::Host {
                lc: spec.id.clone(),
                step,
                source,
            }
        };
        self.host
            .create_tap(&port)
            .map_err(io_err("creating a tap"))?;
        let done = (|| {
            if nic.detached {
                self.host
                    .set_link_up(&port)
                    .map_err(io_err("bringing the tap up"))?;
            } else {
                self.host
                    .attach_to_bridge(&port, &self.cfg.bridge)
                    .map_err(io_err("plugging the tap into the bridge"))?;
            }
            let mut q = self.qmp(&spec.id)?;
            let qerr = |e: crate::qmp::QmpError| {
                LcError::host_chain(&spec.id, "adding the NIC to QEMU", &e)
            };
            q.execute(
                "netdev_add",
                serde_json::json!({"type": "tap", "id": format!("n{i}"), "ifname": port, "script": "no", "downscript": "no"}),
            )
            .map_err(qerr)?;
            q.execute(
                "device_add",
                serde_json::json!({"driver": "virtio-net-pci", "netdev": format!("n{i}"), "mac": nic.mac.to_string(), "id": format!("n{i}-dev")}),
            )
            .map_err(qerr)?;
            // The guest names and addresses the new interface (found by its MAC).
            self.guest_sh(
                spec,
                "configuring the NIC in the guest",
                NIC_SCRIPT,
                &nic_script_args(nic),
            )
        })();
        if let Err(e) = done {
            let _ = self.host.delete_link(&port);
            return Err(e);
        }
        st.host_ports.push(port.clone());
        self.save(&spec.id, &st)
            .map_err(io_err("writing the runtime state"))?;
        Ok(port)
    }

    fn wait_agent(
        &self,
        spec: &LcSpec,
        timeout: Duration,
    ) -> Result<patchover_agent::Response, LcError> {
        let start = Instant::now();
        let timeout = self
            .recorded(&spec.id)
            .map_or(timeout, |st| agent_wait_for(st.accel, timeout));
        loop {
            let Some(_) = self.running(&spec.id) else {
                let console = self.console_tail(&spec.id, 30);
                self.reap_ended(spec);
                return Err(LcError::Launch {
                    lc: spec.id.clone(),
                    message: format!("the VM ended before its agent answered; console:\n{console}"),
                });
            };
            let left = timeout.saturating_sub(start.elapsed());
            match self.agent_call(&spec.id, &Request::Ping, left.min(Duration::from_secs(2))) {
                Ok(r) => return Ok(r),
                Err(e) if start.elapsed() >= timeout => {
                    return Err(LcError::Launch {
                        lc: spec.id.clone(),
                        message: format!(
                            "the agent did not answer within {timeout:?} ({}); console:\n{}",
                            patchover_core::error_chain(&e),
                            self.console_tail(&spec.id, 30)
                        ),
                    });
                }
                Err(_) => self.host.sleep(Duration::from_millis(100)),
            }
        }
    }

    fn agent(&self, spec: &LcSpec) -> Result<AgentClient, LcError> {
        self.running(&spec.id)
            .ok_or_else(|| LcError::NotRunning(spec.id.clone()))?;
        AgentClient::connect_virtio(&self.agent_socket(&spec.id), Duration::from_secs(5)).map_err(
            |source| LcError::Agent {
                lc: spec.id.clone(),
                source,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchover_core::{Config, HostFacts};

    /// Issue 22, item 5: the NIC name was pasted into the guest's `sh -c` text. The script is
    /// now a constant and the values are its positional parameters: run by a real `/bin/sh`
    /// (the host's `lo`, MAC 00:00:00:00:00:00, standing in for the new NIC, a fake `ip`
    /// recording its argv), hostile names (which the loader and `attach-nic` refuse before
    /// they get here) reach `ip` as one argument each, and nothing they say is run.
    #[test]
    fn r22_the_guest_nic_script_takes_the_name_as_an_argument_not_as_script_text() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let (log, pwned) = (t.path().join("ip.log"), t.path().join("pwned"));
        let fake = t.path().join("ip");
        let quoted_log = patchover_core::shell::quote(log.to_str().unwrap());
        std::fs::write(
            &fake,
            format!("#!/bin/sh\nprintf '%s\\0' \"$@\" >> {quoted_log}\n"),
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let p = pwned.display();
        for name in [
            format!("$(touch {p})"),
            format!("`touch {p}`"),
            format!("x; touch {p}"),
            format!("x'; touch {p}; '"),
        ] {
            let nic = NicSpec {
                name: name.clone(),
                mac: "00:00:00:00:00:00".parse().unwrap(),
                address: Some("10.9.9.9/24".parse().unwrap()),
                gateway: None,
                detached: false,
            };
            let argv = guest_sh_argv(NIC_SCRIPT, &nic_script_args(&nic));
            assert_eq!(argv[..4], ["/bin/sh", "-c", NIC_SCRIPT, "sh"]);
            let _ = std::fs::remove_file(&log);
            let out = Command::new(&argv[0])
                .args(&argv[1..])
                .env("PATH", format!("{}:/usr/bin:/bin", t.path().display()))
                .output()
                .unwrap();
            assert!(out.status.success(), "{name:?}: {out:?}");
            let calls = std::fs::read(&log).unwrap();
            let args: Vec<&[u8]> = calls.split(|b| *b == 0).collect();
            let named = args.iter().filter(|a| **a == name.as_bytes()).count();
            assert_eq!(
                named,
                3,
                "{name:?}: ip got {:?}",
                String::from_utf8_lossy(&calls)
            );
            assert!(!pwned.exists(), "{name:?} ran a command");
        }
    }

    fn spec() -> LcSpec {
        let text = r#"
[network]
bridge = "pobr0"
[[lc]]
id = "vm1"
backend = "qemu"
kernel = "/img/vmlinuz"
initrd = "/img/initrd.img"
append = "loglevel=3"
cpu_share = 50
memory_mib = 256
system_disk = { path = "/img/system.img" }
app_disk = { path = "/img/app.qcow2", mount = "/srv/data" }
nic = [{ name = "eth0", mac = "52:54:00:12:34:56", address = "10.77.0.11/24" }]
"#;
        Config::parse(
            Path::new("/t.toml"),
            text,
            &HostFacts {
                cpus: 2,
                memory_mib: 4096,
            },
        )
        .unwrap()
        .lcs
        .remove(0)
    }

    /// r19-tcg-boot: a Debian VM's standby took 16-24 s to boot under TCG against the cycle's
    /// 30 s agent deadline, and one run failed at boot_standby on a busy host.
    #[test]
    fn r19_tcg_boot_a_tcg_guest_gets_longer_to_answer_than_asked() {
        let asked = Duration::from_secs(30);
        assert_eq!(agent_wait_for(Accel::Kvm, asked), asked);
        assert_eq!(agent_wait_for(Accel::Tcg, asked), Duration::from_secs(120));
    }

    #[test]
    fn the_kernel_is_told_hostname_nics_and_app_disk() {
        assert_eq!(
            kernel_cmdline(&spec()),
            "console=ttyS0 panic=-1 quiet root=/dev/vda rw patchover.hostname=vm1 \
             patchover.nic=eth0,52:54:00:12:34:56,10.77.0.11/24 patchover.app=/dev/vdb,/srv/data loglevel=3"
        );
        // A gateway (clients routed through the host, `seamless`) rides on the NIC's entry.
        let mut s = spec();
        s.nics[0].gateway = Some("10.77.0.1".parse().unwrap());
        assert!(
            kernel_cmdline(&s)
                .contains(" patchover.nic=eth0,52:54:00:12:34:56,10.77.0.11/24,10.77.0.1 "),
            "{}",
            kernel_cmdline(&s)
        );
    }

    #[test]
    fn qemu_gets_disks_nics_agent_and_qmp_by_the_conventions() {
        let a = qemu_args(
            &spec(),
            Path::new("/run/po/lc/vm1"),
            Path::new("/c.log"),
            Accel::Tcg,
        );
        let joined = a.join(" ");
        for want in [
            "-accel tcg,tb-size=64",
            "-m 256",
            "-no-reboot",
            "socket,id=qmp,path=/run/po/lc/vm1/qmp.sock,server=on,wait=off",
            "socket,id=agent,path=/run/po/lc/vm1/agent.sock,server=on,wait=off",
            "socket,id=qmpjobs,path=/run/po/lc/vm1/qmp-jobs.sock,server=on,wait=off",
            "virtserialport,chardev=agent,name=org.patchover.agent",
            "-kernel /img/vmlinuz -initrd /img/initrd.img",
            "virtio-blk-pci,drive=sys,id=sys-dev,serial=sys",
            "virtio-blk-pci,drive=app,id=app-dev,serial=app",
            "tap,id=n0,ifname=povm1n0,script=no,downscript=no",
            "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,id=n0-dev",
            "-daemonize -pidfile /run/po/lc/vm1/qemu.pid",
        ] {
            assert!(joined.contains(want), "missing {want:?} in {joined}");
        }
        let bd: Vec<serde_json::Value> = a
            .windows(2)
            .filter(|w| w[0] == "-blockdev")
            .map(|w| serde_json::from_str(&w[1]).unwrap())
            .collect();
        assert_eq!(bd[0]["driver"], "raw");
        assert_eq!(bd[0]["file"]["filename"], "/img/system.img");
        assert_eq!(bd[1]["driver"], "qcow2");
        assert_eq!(bd[1]["node-name"], "app");
        // The system disk comes first, so the guest sees it as /dev/vda.
        let first = a.iter().position(|x| x.contains("drive=sys")).unwrap();
        let second = a.iter().position(|x| x.contains("drive=app")).unwrap();
        assert!(first < second);
    }
}
