//! A test bed for the steps without root: an LC backend that records what it is asked and
//! copies nothing, a config of two LCs whose disks are temporary directories, a real journal.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use patchover_core::{Config, DiskSpec, HostFacts, LcSpec, NicSpec, Quiesce};
use patchover_lc::{
    Access, Copied, CopyProgress, CutDone, DiskCopyError, ExecOutput, LcBackend, LcError, LcState,
    LcStatus, LiveCopy, Migratable, Pausable, Stdio, WriteWatch, Writes,
};
use patchover_net::{Endpoint, LcAccess, Mode};
use patchover_store::{Role, Store};

use crate::context::{Orchestrator, Run};
use crate::step::Step;
use crate::{OrchestratorError, PatchRequest, RunReport, ServiceSettings, Settings};

#[derive(Default)]
struct State {
    running: HashSet<String>,
    failing: HashSet<String>,
    calls: Vec<String>,
    unreadable_live: bool,
    catch_up: bool,
    exec: Option<(i32, Vec<u8>, Vec<u8>)>,
    /// Answers of commands in one LC, before `exec`.
    exec_in: std::collections::HashMap<String, (i32, Vec<u8>, Vec<u8>)>,
    agent: Option<PathBuf>,
    /// What a write watch reports, read by read (the last one repeats); none: no write.
    watch_reads: Vec<u64>,
}

/// An LC backend that records every call as a line (`boot lc2 app=none nic0=bridge`).
#[derive(Clone, Default)]
pub(crate) struct FakeBackend {
    state: Arc<Mutex<State>>,
    dir: PathBuf,
}

impl FakeBackend {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }

    fn call(&self, what: &str, line: String) -> Result<(), LcError> {
        self.with(|s| {
            s.calls.push(line);
            if s.failing.contains(what) {
                Err(LcError::Unsupported {
                    lc: "lc0".parse().unwrap(),
                    message: format!("{what} fails (fake)"),
                })
            } else {
                Ok(())
            }
        })
    }

    /// These LCs run; every other is stopped.
    pub fn running(&self, ids: &[&str]) {
        self.with(|s| s.running = ids.iter().map(|i| (*i).to_owned()).collect());
    }

    /// Calls of this name fail from now on.
    pub fn fail(&self, what: &str) {
        self.with(|s| s.failing.insert(what.to_owned()));
    }

    pub fn calls(&self) -> Vec<String> {
        self.with(|s| s.calls.clone())
    }

    pub fn set_readable_live(&self, yes: bool) {
        self.with(|s| s.unreadable_live = !yes);
    }

    /// Live copies from now on copy by rounds (they catch up before the cut).
    pub fn copies_catch_up(&self) {
        self.with(|s| s.catch_up = true);
    }

    /// The application disk is written: the watch's reads report these counts in turn (the
    /// last one repeats).
    pub fn disk_writes(&self, reads: &[u64]) {
        self.with(|s| s.watch_reads = reads.to_vec());
    }

    pub fn exec_answers(&self, stdout: &[u8], stderr: &[u8]) {
        self.with(|s| s.exec = Some((0, stdout.to_vec(), stderr.to_vec())));
    }

    /// Commands in `lc` answer this (status, stdout) from now on.
    pub fn exec_in(&self, lc: &str, status: i32, stdout: &[u8]) {
        self.with(|s| {
            s.exec_in
                .insert(lc.to_owned(), (status, stdout.to_vec(), b"(fake)".to_vec()))
        });
    }

    pub fn exec_status(&self, status: i32, stderr: &[u8]) {
        self.with(|s| s.exec = Some((status, Vec::new(), stderr.to_vec())));
    }

    /// The standby's agent answers a report request with `report` (`None`: it does not
    /// answer at all).
    pub fn agent_reports(&self, report: Option<serde_json::Value>) {
        let Some(report) = report else {
            self.with(|s| s.agent = None);
            return;
        };
        let sock = self.dir.join(format!("agent-{}.sock", self.calls().len()));
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut line = String::new();
                let mut r = BufReader::new(conn.try_clone().unwrap());
                while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                    let resp = match serde_json::from_str(&line) {
                        Ok(patchover_agent::Request::Report) => patchover_agent::Response::Report {
                            report: Some(report.clone()),
                        },
                        _ => patchover_agent::Response::Report { report: None },
                    };
                    let mut out = serde_json::to_vec(&resp).unwrap();
                    out.push(b'\n');
                    let _ = conn.write_all(&out);
                    line.clear();
                }
            }
        });
        self.with(|s| s.agent = Some(sock));
    }
}

fn boot_line(verb: &str, spec: &LcSpec) -> String {
    format!(
        "{verb} {} app={} nic0={}",
        spec.id,
        spec.app_disk.as_ref().map_or("none", |_| "yes"),
        match spec.nics.first() {
            Some(n) if n.detached => "detached",
            Some(_) => "bridge",
            None => "none",
        }
    )
}

impl Pausable for FakeBackend {
    fn set_frozen(&self, spec: &LcSpec, frozen: bool) -> Result<(), LcError> {
        let verb = if frozen { "freeze" } else { "thaw" };
        self.call(verb, format!("{verb} {}", spec.id))
    }
}

impl Migratable for FakeBackend {
    fn copy_system_disk(
        &self,
        active: &LcSpec,
        dst: &Path,
        progress: &dyn patchover_lc::Progress,
    ) -> Result<Copied, DiskCopyError> {
        self.call(
            "copy_system",
            format!("copy_system {} {}", active.id, dst.display()),
        )
        .map_err(DiskCopyError::system)?;
        std::fs::create_dir_all(dst).map_err(DiskCopyError::system)?;
        progress.scanned(4096, 1);
        progress.copied(4096, 1);
        Ok(Copied {
            bytes_copied: 4096,
            bytes_replayed: 0,
            detail: serde_json::json!({"fake": "system"}),
        })
    }

    fn live_copy(
        &self,
        active: &LcSpec,
        _src: &DiskSpec,
        dst: &DiskSpec,
        progress: std::sync::Arc<dyn patchover_lc::Progress>,
    ) -> Result<Box<dyn LiveCopy>, DiskCopyError> {
        self.call(
            "live_copy",
            format!("live_copy {} {}", active.id, dst.path.display()),
        )
        .map_err(DiskCopyError::application)?;
        progress.scanned(8192, 2);
        progress.copied(4096, 1);
        progress.copied(8192, 2);
        Ok(Box::new(FakeCopy {
            backend: self.clone(),
            lc: active.id.to_string(),
            rounds: self.with(|s| s.catch_up),
            cut: false,
        }))
    }

    fn end_leftover_copies(&self, active: &LcSpec) -> Vec<String> {
        let _ = self.call("end_copies", format!("end_copies {}", active.id));
        Vec::new()
    }

    fn watch_writes(
        &self,
        active: &LcSpec,
        disk: &DiskSpec,
    ) -> Result<Box<dyn WriteWatch>, DiskCopyError> {
        self.call(
            "watch",
            format!("watch {} {}", active.id, disk.path.display()),
        )
        .map_err(DiskCopyError::application)?;
        Ok(Box::new(FakeWatch {
            backend: self.clone(),
            lc: active.id.to_string(),
            read: 0,
        }))
    }
}

/// A write watch that reports what [`FakeBackend::disk_writes`] says.
struct FakeWatch {
    backend: FakeBackend,
    lc: String,
    read: usize,
}

impl WriteWatch for FakeWatch {
    fn writes(&mut self) -> Result<Writes, DiskCopyError> {
        let _ = self
            .backend
            .call("watch_read", format!("watch_read {}", self.lc));
        let reads = self.backend.with(|s| s.watch_reads.clone());
        let count = reads.get(self.read).or(reads.last()).copied().unwrap_or(0);
        self.read += 1;
        Ok(Writes {
            count,
            unit: "trapped writes",
            paths: if count > 0 {
                vec!["kv.log".into()]
            } else {
                Vec::new()
            },
        })
    }
}

struct FakeCopy {
    backend: FakeBackend,
    lc: String,
    rounds: bool,
    cut: bool,
}

impl LiveCopy for FakeCopy {
    fn catches_up(&self) -> bool {
        self.rounds
    }

    fn progress(&self) -> Option<CopyProgress> {
        Some(CopyProgress {
            bytes_copied: 1234,
            bytes_replayed: 0,
        })
    }

    fn catch_up(&mut self) -> Result<Option<serde_json::Value>, DiskCopyError> {
        self.backend
            .call("catch_up", format!("catch_up {}", self.lc))
            .map_err(DiskCopyError::application)?;
        Ok(Some(serde_json::json!({"rounds": 1})))
    }

    fn cut(mut self: Box<Self>, hold: &mut dyn Quiesce) -> Result<CutDone, DiskCopyError> {
        hold.freeze().map_err(DiskCopyError::application)?;
        let r = self.backend.call("cut", format!("cut {}", self.lc));
        hold.thaw().map_err(DiskCopyError::application)?;
        r.map_err(DiskCopyError::application)?;
        self.cut = true;
        Ok(CutDone {
            bytes_replayed: 7,
            freeze_ms: Some(1.0),
            detail: serde_json::json!({"fake": "cut"}),
            writes: Some(Writes {
                count: 0,
                unit: "trapped writes",
                paths: Vec::new(),
            }),
        })
    }
}

impl Drop for FakeCopy {
    fn drop(&mut self) {
        if !self.cut {
            let _ = self.backend.call("drop", format!("drop copy {}", self.lc));
        }
    }
}

impl LcBackend for FakeBackend {
    fn boot(&self, spec: &LcSpec) -> Result<LcStatus, LcError> {
        self.call("boot", boot_line("boot", spec))?;
        self.with(|s| s.running.insert(spec.id.to_string()));
        self.status(spec)
    }
    fn reboot(&self, spec: &LcSpec) -> Result<LcStatus, LcError> {
        self.call("reboot", boot_line("reboot", spec))?;
        self.with(|s| s.running.insert(spec.id.to_string()));
        self.status(spec)
    }
    fn stop(&self, spec: &LcSpec) -> Result<(), LcError> {
        self.call("stop", format!("stop {}", spec.id))?;
        self.with(|s| s.running.remove(spec.id.as_str()));
        Ok(())
    }
    fn status(&self, spec: &LcSpec) -> Result<LcStatus, LcError> {
        let mut st = LcStatus::stopped(&spec.id);
        if self.with(|s| s.running.contains(spec.id.as_str())) {
            st.state = LcState::Running;
            st.pid = Some(1_000_000);
        }
        Ok(st)
    }
    fn exec(&self, spec: &LcSpec, argv: &[String], _: Stdio) -> Result<ExecOutput, LcError> {
        self.call("exec", format!("exec {} {}", spec.id, argv.join(" ")))?;
        let (status, stdout, stderr) = self
            .with(|s| s.exec_in.get(spec.id.as_str()).cloned().or(s.exec.clone()))
            .unwrap_or_default();
        Ok(ExecOutput {
            status: Some(status),
            stdout,
            stderr,
        })
    }
    fn attach_disk(&self, spec: &LcSpec, source: &Path, at: &Path) -> Result<(), LcError> {
        self.call(
            "attach_disk",
            format!(
                "attach_disk {} {} {}",
                spec.id,
                source.display(),
                at.display()
            ),
        )
    }
    fn attach_nic(&self, spec: &LcSpec, nic: &NicSpec) -> Result<String, LcError> {
        self.call("attach_nic", format!("attach_nic {} {}", spec.id, nic.name))?;
        Ok("fake0".into())
    }
    fn wait_agent(&self, spec: &LcSpec, _: Duration) -> Result<patchover_agent::Response, LcError> {
        self.call("wait_agent", format!("wait_agent {}", spec.id))?;
        Ok(patchover_agent::Response::Pong {
            agent_version: "fake".into(),
            hostname: spec.hostname.clone(),
            uptime_s: 0.0,
            pids: Vec::new(),
        })
    }
    fn agent(&self, spec: &LcSpec) -> Result<patchover_agent::AgentClient, LcError> {
        let sock = self.with(|s| s.agent.clone()).ok_or(LcError::Timeout {
            lc: spec.id.clone(),
            what: "an agent (fake: none)",
            timeout: Duration::ZERO,
        })?;
        patchover_agent::AgentClient::connect(&sock, Duration::from_secs(5)).map_err(|source| {
            LcError::Agent {
                lc: spec.id.clone(),
                source,
            }
        })
    }
    fn console_log(&self, spec: &LcSpec) -> PathBuf {
        self.dir.join(format!("{}.console", spec.id))
    }
    /// The way in is an agent socket that nobody serves: nothing in the LC can be reached.
    fn access(&self, spec: &LcSpec) -> Result<Access, LcError> {
        match self.status(spec)?.state {
            LcState::Running => Ok(Access::Agent(self.dir.join("nobody.sock"))),
            _ => Err(LcError::NotRunning(spec.id.clone())),
        }
    }
    fn system_disk_readable_live(&self, _: &LcSpec) -> bool {
        !self.with(|s| s.unreadable_live)
    }
}

/// Two LCs (`lc1` active, `lc2` unused) with directory disks under a temporary directory, a
/// journal with one open run, and a run of lc1 in `mode`.
pub(crate) struct Bed {
    pub dir: tempfile::TempDir,
    pub config: Config,
    pub store: Store,
    pub backend: FakeBackend,
    pub settings: Settings,
    pub run: Run,
    /// The progress events the steps sent.
    pub progress: std::sync::Arc<Mutex<Vec<crate::progress::ProgressEvent>>>,
}

impl Bed {
    pub fn new() -> Bed {
        Bed::build(Mode::Readdress, None)
    }

    pub fn with_mode(mode: Mode) -> Bed {
        Bed::build(mode, None)
    }

    /// A run that hands the service back to `target`.
    pub fn rollback(target: &str) -> Bed {
        Bed::build(Mode::Readdress, Some(target.to_owned()))
    }

    fn build(mode: Mode, rollback_to: Option<String>) -> Bed {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let lc = |n: u32| {
            format!(
                r#"
[[lc]]
id = "lc{n}"
cpu = 0
cpu_share = 50
memory_mib = 64
system_disk = {{ path = "{d}/lc{n}-sys" }}
app_disk = {{ path = "{d}/lc{n}-app", mount = "/data" }}
nic = [{{ name = "eth0", address = "10.9.0.{n}/24" }}]
"#,
                d = d.display()
            )
        };
        let text = format!(
            "state_dir = \"{d}/state\"\nrun_dir = \"{d}/run\"\n[network]\nbridge = \"pofake0\"\nservice_address = \"10.9.0.100/24\"\n{}{}",
            lc(1),
            lc(2),
            d = d.display()
        );
        let config = Config::parse(
            &d.join("patchover.toml"),
            &text,
            &HostFacts {
                cpus: 2,
                memory_mib: 4096,
            },
        )
        .unwrap();
        for l in &config.lcs {
            for disk in l.disks() {
                std::fs::create_dir_all(&disk.path).unwrap();
            }
        }
        std::fs::create_dir_all(&config.run_dir).unwrap();
        std::fs::create_dir_all(&config.state_dir).unwrap();
        let mut store = Store::open(&config.store_path()).unwrap();
        store.sync_lcs(&config.lcs).unwrap();
        let agent = d.join("agent-binary");
        std::fs::write(&agent, "#!/bin/sh\n").unwrap();
        let settings = Settings {
            service: ServiceSettings {
                health: Some(patchover_core::HealthProbe::Http {
                    path: "/health".into(),
                    status: 200,
                    body: None,
                    patience: Duration::from_secs(2),
                    tls: None,
                }),
                restart: vec!["/etc/init.d/S50demo".into(), "restart".into()],
                ..ServiceSettings::default()
            },
            agent_binary: agent,
            trusted_keys: Vec::new(),
            scoped_keys: Vec::new(),
            bundle_limits: patchover_bundle::Limits::default(),
            yara_rules: None,
            report_timeout: Duration::from_secs(2),
            drain_deadline: Duration::from_secs(1),
            garp: patchover_net::GarpConfig::default(),
            refresher: None,
            guard: None,
        };
        let req = PatchRequest {
            lc: "lc1".into(),
            bundles: Vec::new(),
            mode,
            dry_run: false,
            rollback_to,
        };
        let run_id = store.begin_run("lc1", &mode.to_string(), false).unwrap();
        let active = config.lc("lc1").unwrap().clone();
        let from = Endpoint {
            name: "lc1".into(),
            access: LcAccess::Netns(d.join("no-netns")),
            host_port: "polc1n0".into(),
            iface: "eth0".into(),
            mac: active.nics[0].mac,
            address: active.nics[0].address.unwrap(),
            identity: String::new(),
        };
        let report = RunReport {
            run_id,
            lc: "lc1".into(),
            ..RunReport::default()
        };
        let backend = FakeBackend {
            dir: d.to_owned(),
            ..FakeBackend::default()
        };
        Bed {
            run: Run::new(req, active, from, Vec::new(), report),
            dir,
            config,
            store,
            backend,
            settings,
            progress: Default::default(),
        }
    }

    /// Calls `f` with an orchestrator over the bed, and the bed's run.
    pub fn with<T>(&mut self, f: impl FnOnce(&mut Orchestrator<'_>, &mut Run) -> T) -> T {
        let mut events = |_: &crate::Event| {};
        let mut o = Orchestrator {
            config: &self.config,
            store: &mut self.store,
            backend: &self.backend,
            settings: &self.settings,
            progress: {
                let seen = self.progress.clone();
                std::sync::Arc::new(move |e: &crate::progress::ProgressEvent| {
                    seen.lock().unwrap().push(e.clone())
                })
            },
            events: &mut events,
        };
        f(&mut o, &mut self.run)
    }

    /// Runs `step` as a run does (journaled); returns the detail it journaled with `done`.
    pub fn step(&mut self, step: Step) -> Result<serde_json::Value, OrchestratorError> {
        self.with(|o, run| o.journaled(run, step))?;
        let steps = self.store.steps(self.run.id()).unwrap();
        let last = steps.last().unwrap();
        assert_eq!(
            (last.step.as_str(), last.state.as_str()),
            (step.as_str(), "done")
        );
        Ok(last.detail.clone().unwrap_or_default())
    }

    /// What a failed run does with its standby.
    pub fn release(&mut self) -> serde_json::Value {
        self.with(|o, run| {
            let s = run.standby.clone().unwrap();
            super::release_standby::release(o, &s, run.follow.take())
        })
    }

    /// Runs recovery over the journal as it is.
    pub fn recover(&mut self) -> Result<Vec<RunReport>, OrchestratorError> {
        self.with(|o, _| crate::recover(o))
    }

    /// The journal of the bed's run, as `step:state` lines.
    pub fn journal(&self) -> Vec<String> {
        self.store
            .steps(self.run.id())
            .unwrap()
            .iter()
            .map(|s| format!("{}:{}", s.step, s.state))
            .collect()
    }

    /// The directory of `lc`'s `sys` or `app` disk.
    pub fn disk(&self, lc: &str, which: &str) -> PathBuf {
        self.dir.path().join(format!("{lc}-{which}"))
    }

    /// YARA rules for 702.
    pub fn yara(&mut self, rule: &str) {
        let d = self.dir.path().join("yara");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("r.yar"), rule).unwrap();
        self.settings.yara_rules = Some(d);
    }

    /// A switch plan of the bed's run (lc1 to lc1's own endpoint; only the shape matters), as
    /// the switch step makes it before a stateless service changes it.
    pub fn plan(&self) -> patchover_net::SwitchPlan {
        let mode = self.run.req.mode;
        patchover_net::SwitchPlan {
            host_netns: None,
            bridge: self.config.network.bridge.clone(),
            service: self.config.network.service_address.unwrap(),
            from: self.run.from.clone(),
            to: self.run.from.clone(),
            mode,
            health: patchover_net::HealthCheck::new(80, "/health", ""),
            check_from: None,
            garp: patchover_net::GarpConfig::default(),
            drain_deadline: self.settings.drain_deadline,
            queue: 1,
            lock_path: self.dir.path().join("switch.lock"),
            handoff: mode == Mode::Seamless,
            resume_to: false,
        }
    }

    /// A switch's report with every figure zero.
    pub fn switch_report(&self) -> patchover_net::SwitchReport {
        patchover_net::SwitchReport::new(self.run.req.mode, "lc1", "lc2")
    }

    pub fn role(&self, lc: &str) -> Role {
        self.store.lc(lc).unwrap().unwrap().role
    }
}
