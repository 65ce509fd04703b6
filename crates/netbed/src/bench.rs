//! `patchover bench switch`: switchovers under load in every mode, against what people do today.
//!
//! Each case builds a fresh [`Testbed`], runs the reference service in both LCs, drives
//! open-model load from the client namespace and switches back and forth every `gap`. Requests
//! whose due time falls into a switch window (decision to done, plus a tail) are compared with
//! the rest (steady state). Two baselines run in the same way: **stop-restart** (the service on
//! one LC is stopped, "patched" for `patch_time` and started again: what patching means today)
//! and **address-move** (a VRRP-style move of the service address with gratuitous ARP, without
//! drain and without holding SYNs; keepalived itself is not driven, see docs/network-switch.md).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use patchover_load::server::{RefServer, ServerError};
use patchover_load::{ConnMode, Latency, LoadConfig, LoadError, Sample, Summary};
use serde::{Deserialize, Serialize};

use crate::testbed::{PORT, Testbed, TestbedError};
use patchover_net::garp;
use patchover_net::rtnl::Rtnl;
use patchover_net::switch::{
    BoxError, Endpoint, Hooks, Mode, Phase, ServiceControl, SwitchPlan, switch,
};

/// The benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("bench: topology")]
    Testbed(#[from] TestbedError),
    #[error("bench: service")]
    Server(#[from] ServerError),
    #[error("bench: load")]
    Load(#[from] LoadError),
    #[error("bench: switch {index} of {case}")]
    Switch {
        case: String,
        index: usize,
        #[source]
        source: Box<patchover_net::SwitchError>,
    },
    #[error("bench: baseline step of {case}: {what}")]
    Baseline { case: String, what: String },
    #[error("bench: the load thread panicked")]
    Panicked,
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchConfig {
    pub rate: f64,
    pub switches: usize,
    /// Time between switches (and before the first / after the last).
    pub gap: Duration,
    pub modes: Vec<Mode>,
    pub connections: Vec<ConnMode>,
    pub baselines: bool,
    /// How long the stop-restart baseline keeps the service down ("patching").
    pub patch_time: Duration,
    /// Switches of each baseline.
    pub baseline_switches: usize,
    pub deadline: Duration,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig {
            rate: 5000.0,
            switches: 20,
            gap: Duration::from_secs(1),
            modes: vec![Mode::Path, Mode::Readdress, Mode::Seamless],
            connections: vec![ConnMode::New, ConnMode::Keepalive, ConnMode::Mixed],
            baselines: true,
            patch_time: Duration::from_secs(1),
            baseline_switches: 5,
            deadline: Duration::from_secs(1),
        }
    }
}

/// Min, median, 99th percentile and max of a per-switch figure in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub min: f64,
    pub p50: f64,
    /// Nearest rank: below 100 switches this is the largest but one only from 100 on.
    #[serde(default)]
    pub p99: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(mut v: Vec<f64>) -> Spread {
        if v.is_empty() {
            return Spread::default();
        }
        v.sort_by(f64::total_cmp);
        let rank = |q: f64| ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
        Spread {
            min: v[0],
            p50: v[v.len() / 2],
            p99: v[rank(0.99)],
            max: v[v.len() - 1],
        }
    }
}

/// One phase of the switches of a case ([`patchover_net::switch::phase`]), over its switches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseSpread {
    pub name: String,
    pub ms: Spread,
}

/// Each phase's spread over the switches, in the order the phases ran.
fn phase_spreads(switches: &[Vec<Phase>]) -> Vec<PhaseSpread> {
    let mut names: Vec<&str> = Vec::new();
    for p in switches.iter().flatten() {
        if !names.contains(&p.name.as_str()) {
            names.push(&p.name);
        }
    }
    names
        .into_iter()
        .map(|name| PhaseSpread {
            name: name.to_owned(),
            ms: Spread::of(
                switches
                    .iter()
                    .map(|ps| ps.iter().filter(|p| p.name == name).map(|p| p.ms).sum())
                    .collect(),
            ),
        })
        .collect()
}

/// The goal of issue 26 for the paused modes: pause p99 at most this, nothing failed.
pub const PAUSE_P99_GOAL_MS: f64 = 10.0;

impl CaseResult {
    /// Whether a paused mode's case met its goal ([`PAUSE_P99_GOAL_MS`], 0 failed); `None` for
    /// cases without a pause goal.
    pub fn pause_goal_met(&self) -> Option<bool> {
        matches!(self.case.as_str(), "path" | "readdress")
            .then(|| self.failed == 0 && self.pause_ms.p99 <= PAUSE_P99_GOAL_MS)
    }
}

/// One line of the result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseResult {
    /// `path`, `readdress`, `seamless`, `stop-restart`, `address-move`.
    pub case: String,
    pub connections: ConnMode,
    pub switches: usize,
    pub total: u64,
    pub failed: u64,
    pub failed_by_kind: patchover_load::Failed,
    /// Requests retried on a new connection after their reused one was closed (not failures).
    pub retried: u64,
    pub steady: Latency,
    /// Requests due inside a switch window.
    pub window: Latency,
    pub window_requests: u64,
    /// Longest time without any successful answer, per switch.
    pub outage_ms: Spread,
    /// Pause reported by the switcher (held connections), per switch.
    pub pause_ms: Spread,
    /// Where each switch's time went, phase by phase (the switcher's report), over the
    /// switches: in `path`/`readdress` the pause is the phases from `drain` to `release`.
    #[serde(default)]
    pub phases: Vec<PhaseSpread>,
    pub drain_ms: Spread,
    /// The drain's first look at the old LC's connections, per switch (one walk of the
    /// kernel's TCP table on a namespace LC).
    #[serde(default)]
    pub drain_first_look_ms: Spread,
    pub first_request_ms: Spread,
    pub achieved_rate: f64,
    /// Latency by when a request was due, relative to the decision of its switch (all
    /// switches of the case together), in [`PROFILE_BIN_MS`] bins: where in a switch the
    /// slow requests are.
    pub profile: Vec<ProfileBin>,
}

/// Width of a [`ProfileBin`].
pub const PROFILE_BIN_MS: i64 = 10;

/// Requests due in `[from_ms, from_ms + PROFILE_BIN_MS)` after their switch's decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileBin {
    pub from_ms: i64,
    pub requests: usize,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Bins the requests due from 50 ms before to 300 ms after each window's start.
fn profile(samples: &[Sample], starts: &[u64]) -> Vec<ProfileBin> {
    let mut bins: std::collections::BTreeMap<i64, Vec<u64>> = std::collections::BTreeMap::new();
    for s in samples {
        for &st in starts {
            let rel_ms = (s.due_us as i64 - st as i64).div_euclid(1000);
            if (-50..300).contains(&rel_ms) {
                bins.entry(rel_ms.div_euclid(PROFILE_BIN_MS) * PROFILE_BIN_MS)
                    .or_default()
                    .push(s.latency_us);
            }
        }
    }
    bins.into_iter()
        .map(|(from_ms, mut v)| {
            v.sort_unstable();
            let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)] as f64 / 1000.0;
            ProfileBin {
                from_ms,
                requests: v.len(),
                p99_ms: at(0.99),
                max_ms: at(1.0),
            }
        })
        .collect()
}

struct Both {
    a: Option<RefServer>,
    b: Option<RefServer>,
}

impl Both {
    fn get(&self, ep: &Endpoint) -> Option<&RefServer> {
        if ep.name == "a" {
            self.a.as_ref()
        } else {
            self.b.as_ref()
        }
    }
}

impl ServiceControl for Both {
    fn drain(&mut self, ep: &Endpoint) -> Result<(), BoxError> {
        self.get(ep).ok_or("service not running")?.drain();
        Ok(())
    }
    fn resume(&mut self, ep: &Endpoint) -> Result<(), BoxError> {
        if let Some(s) = self.get(ep) {
            s.resume();
        }
        Ok(())
    }
}

fn serve(ep: &Endpoint) -> Result<RefServer, ServerError> {
    RefServer::start(
        ep.netns(),
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT)),
        &ep.identity,
    )
}

/// A switch (or baseline step) as seen from the load's clock.
struct Window {
    start_us: u64,
    end_us: u64,
    pause_ms: Option<f64>,
    drain_ms: Option<f64>,
    first_look_ms: Option<f64>,
    first_ms: Option<f64>,
    phases: Vec<Phase>,
}

#[derive(Clone, Copy)]
enum Case {
    Mode(Mode),
    StopRestart,
    AddressMove,
    Keepalived,
}

impl Case {
    fn name(self) -> String {
        match self {
            Case::Mode(m) => m.to_string(),
            Case::StopRestart => "stop-restart".into(),
            Case::AddressMove => "address-move".into(),
            Case::Keepalived => "keepalived".into(),
        }
    }
}

/// Runs every case of `cfg`; `progress` is told about each finished case.
pub fn run(
    cfg: &BenchConfig,
    progress: &mut dyn FnMut(&CaseResult),
) -> Result<Vec<CaseResult>, BenchError> {
    let mut cases: Vec<Case> = cfg.modes.iter().map(|m| Case::Mode(*m)).collect();
    if cfg.baselines {
        cases.push(Case::StopRestart);
        cases.push(Case::AddressMove);
        if keepalived_available() {
            cases.push(Case::Keepalived);
        } else {
            tracing::warn!("keepalived is not installed: its baseline is skipped");
        }
    }
    let mut out = Vec::new();
    for case in cases {
        for conns in &cfg.connections {
            let r = run_case(cfg, case, *conns)?;
            progress(&r);
            out.push(r);
        }
    }
    Ok(out)
}

fn run_case(cfg: &BenchConfig, case: Case, conns: ConnMode) -> Result<CaseResult, BenchError> {
    let mode = match case {
        Case::Mode(m) => m,
        Case::StopRestart => Mode::Path,
        Case::AddressMove | Case::Keepalived => Mode::Readdress,
    };
    let switches = match case {
        Case::Mode(_) => cfg.switches,
        _ => cfg.baseline_switches,
    };
    let tb = Testbed::new(mode)?;
    let mut svc = Both {
        a: Some(serve(&tb.a)?),
        b: if matches!(case, Case::StopRestart) {
            None
        } else {
            Some(serve(&tb.b)?)
        },
    };
    let mut gap = cfg.gap;
    if matches!(case, Case::StopRestart) {
        gap = gap.max(cfg.patch_time + Duration::from_millis(500));
    }
    let mut vrrp = match case {
        Case::Keepalived => {
            gap = gap.max(Duration::from_secs(3));
            Some(Vrrp::start(&tb).map_err(|what| BenchError::Baseline {
                case: case.name(),
                what,
            })?)
        }
        _ => None,
    };
    let duration = gap * (switches as u32 + 1);
    let mut lc = LoadConfig::for_url(&tb.url("/"), cfg.rate, duration, conns)?;
    lc.netns = Some(tb.client_netns.clone());
    lc.deadline = cfg.deadline;
    let started = Instant::now();
    let load = std::thread::spawn(move || patchover_load::run(&lc));
    let mut windows = Vec::new();
    let name = case.name();
    for i in 0..switches {
        let due = started + gap * (i as u32 + 1);
        if let Some(w) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(w);
        }
        let t_start = Instant::now();
        let mut phases = Vec::new();
        let mut first_look = None;
        let (pause, drain, first) = match case {
            Case::Mode(_) => {
                let plan = tb.plan(i % 2 == 0);
                let mut window = |_: &SwitchPlan| -> Result<(), BoxError> { Ok(()) };
                let mut hooks = Hooks {
                    service: &mut svc,
                    in_window: &mut window,
                };
                let sw = switch(&plan, &mut hooks).map_err(|source| BenchError::Switch {
                    case: name.clone(),
                    index: i,
                    source: Box::new(source),
                })?;
                if let Some(h) = sw.refresh {
                    // Detach: the refresh skips itself when a later switch moved the address.
                    drop(h);
                }
                phases = sw.report.phases.clone();
                first_look = Some(sw.report.drain_first_look_ms);
                (
                    Some(sw.report.pause_ms),
                    Some(sw.report.drain_ms),
                    Some(sw.report.first_request_ms),
                )
            }
            Case::StopRestart => {
                if let Some(s) = svc.a.take() {
                    s.stop();
                }
                std::thread::sleep(cfg.patch_time);
                svc.a = Some(serve(&tb.a)?);
                (None, None, None)
            }
            Case::Keepalived => {
                let (from, to) = if i % 2 == 0 {
                    (&tb.a, &tb.b)
                } else {
                    (&tb.b, &tb.a)
                };
                let vrrp = vrrp.as_mut().ok_or_else(|| BenchError::Baseline {
                    case: name.clone(),
                    what: "keepalived not started".into(),
                })?;
                let took = vrrp
                    .hand_over(&tb, from, to)
                    .map_err(|what| BenchError::Baseline {
                        case: name.clone(),
                        what,
                    })?;
                (None, None, Some(took))
            }
            Case::AddressMove => {
                let (from, to) = if i % 2 == 0 {
                    (&tb.a, &tb.b)
                } else {
                    (&tb.b, &tb.a)
                };
                plain_move(&tb, from, to).map_err(|what| BenchError::Baseline {
                    case: name.clone(),
                    what,
                })?;
                (None, None, None)
            }
        };
        let t_end = Instant::now();
        windows.push(Window {
            start_us: t_start.saturating_duration_since(started).as_micros() as u64,
            // Requests due shortly after the switch still feel it (queued behind held ones).
            end_us: (t_end + Duration::from_millis(100))
                .saturating_duration_since(started)
                .as_micros() as u64,
            pause_ms: pause,
            drain_ms: drain,
            first_look_ms: first_look,
            first_ms: first,
            phases,
        });
    }
    let report = load.join().map_err(|_| BenchError::Panicked)??;
    // The load's clock started a moment after `started`; shift windows onto it.
    let skew = report.started.map_or(0, |s| {
        s.saturating_duration_since(started).as_micros() as u64
    });
    for w in &mut windows {
        w.start_us = w.start_us.saturating_sub(skew);
        w.end_us = w.end_us.saturating_sub(skew);
    }
    let in_window = |s: &Sample| {
        windows
            .iter()
            .any(|w| s.due_us >= w.start_us && s.due_us < w.end_us)
    };
    let warm = 200_000;
    let steady = Summary::of(
        report
            .samples
            .iter()
            .filter(|s| s.due_us > warm && !in_window(s)),
    );
    let win = Summary::of(report.samples.iter().filter(|s| in_window(s)));
    let outage: Vec<f64> = windows
        .iter()
        .map(|w| {
            longest_gap_ms(
                &report.samples,
                w.start_us.saturating_sub(100_000),
                w.end_us + 1_000_000,
            )
        })
        .collect();
    Ok(CaseResult {
        case: name,
        connections: conns,
        switches,
        total: report.summary.total,
        failed: report.summary.failed_total,
        failed_by_kind: report.summary.failed,
        retried: report.summary.retried,
        steady: steady.latency,
        window: win.latency,
        window_requests: win.total,
        outage_ms: Spread::of(outage),
        pause_ms: Spread::of(windows.iter().filter_map(|w| w.pause_ms).collect()),
        drain_ms: Spread::of(windows.iter().filter_map(|w| w.drain_ms).collect()),
        drain_first_look_ms: Spread::of(windows.iter().filter_map(|w| w.first_look_ms).collect()),
        first_request_ms: Spread::of(windows.iter().filter_map(|w| w.first_ms).collect()),
        phases: phase_spreads(&windows.iter().map(|w| w.phases.clone()).collect::<Vec<_>>()),
        achieved_rate: report.achieved_rate,
        profile: profile(
            &report.samples,
            &windows.iter().map(|w| w.start_us).collect::<Vec<_>>(),
        ),
    })
}

/// Longest stretch between two successful answers completing inside `[from, to)` µs.
fn longest_gap_ms(samples: &[Sample], from: u64, to: u64) -> f64 {
    let mut done: Vec<u64> = samples
        .iter()
        .filter(|s| s.outcome == patchover_load::Outcome::Ok)
        .map(|s| s.due_us + s.latency_us)
        .filter(|t| *t >= from && *t < to)
        .collect();
    done.sort_unstable();
    done.windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(to - from) as f64
        / 1000.0
}

fn keepalived_available() -> bool {
    std::process::Command::new("keepalived")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// keepalived (VRRP) in both LC namespaces: what people use today to move a service address.
/// A hand-over is a graceful stop of the master's keepalived (it sends a priority-0 advert and
/// drops the address); the backup takes over and announces it; the old one restarts as backup.
struct Vrrp {
    dir: std::path::PathBuf,
    a: Option<std::process::Child>,
    b: Option<std::process::Child>,
}

impl Vrrp {
    fn start(tb: &Testbed) -> Result<Vrrp, String> {
        let dir = std::env::temp_dir().join(format!("patchover-vrrp-{}", tb.id));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        // keepalived adds the address itself: start from a clean slate.
        let ra = Rtnl::open(tb.a.netns()).map_err(|e| e.to_string())?;
        let ia = ra.need_link(&tb.a.iface).map_err(|e| e.to_string())?.index;
        ra.del_address(ia, tb.service.addr)
            .map_err(|e| e.to_string())?;
        let mut v = Vrrp {
            dir,
            a: None,
            b: None,
        };
        v.a = Some(v.spawn(&tb.a, tb)?);
        wait_holds(&tb.a, tb.service.addr, Duration::from_secs(10))?;
        v.b = Some(v.spawn(&tb.b, tb)?);
        std::thread::sleep(Duration::from_secs(1));
        Ok(v)
    }

    fn spawn(&self, ep: &Endpoint, tb: &Testbed) -> Result<std::process::Child, String> {
        let conf = self.dir.join(format!("{}.conf", ep.name));
        std::fs::write(
            &conf,
            format!(
                "vrrp_instance VI {{\n  state BACKUP\n  interface {}\n  virtual_router_id 51\n  priority 100\n  advert_int 1\n  nopreempt\n  virtual_ipaddress {{ {} }}\n}}\n",
                ep.iface, tb.service
            ),
        )
        .map_err(|e| e.to_string())?;
        let mut cmd = patchover_net::netns::command_in(ep.netns(), "keepalived")
            .map_err(|e| e.to_string())?;
        cmd.arg("-n")
            .arg("-f")
            .arg(&conf)
            .arg("-p")
            .arg(self.dir.join(format!("{}.pid", ep.name)))
            .arg("-r")
            .arg(self.dir.join(format!("{}-vrrp.pid", ep.name)))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        cmd.spawn()
            .map_err(|e| format!("cannot start keepalived: {e}"))
    }

    /// Hands the address from `from` to `to`; returns ms until `to` holds it.
    fn hand_over(&mut self, tb: &Testbed, from: &Endpoint, to: &Endpoint) -> Result<f64, String> {
        let t = Instant::now();
        let old = if from.name == "a" {
            self.a.take()
        } else {
            self.b.take()
        };
        if let Some(c) = old {
            stop(c);
        }
        wait_holds(to, tb.service.addr, Duration::from_secs(10))?;
        let took = t.elapsed().as_secs_f64() * 1000.0;
        let child = Some(self.spawn(from, tb)?);
        if from.name == "a" {
            self.a = child;
        } else {
            self.b = child;
        }
        Ok(took)
    }
}

fn stop(mut c: std::process::Child) {
    if let Ok(pid) = i32::try_from(c.id()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let _ = c.wait();
}

impl Drop for Vrrp {
    fn drop(&mut self) {
        for c in [self.a.take(), self.b.take()].into_iter().flatten() {
            stop(c);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_holds(ep: &Endpoint, addr: Ipv4Addr, limit: Duration) -> Result<(), String> {
    let r = Rtnl::open(ep.netns()).map_err(|e| e.to_string())?;
    let i = r.need_link(&ep.iface).map_err(|e| e.to_string())?.index;
    let start = Instant::now();
    while start.elapsed() < limit {
        if r.addresses(i)
            .map_err(|e| e.to_string())?
            .iter()
            .any(|c| c.addr == addr)
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(format!("{} did not take {addr} within {limit:?}", ep.name))
}

/// The VRRP-style baseline: the address moves and is announced; no drain, no held SYNs.
fn plain_move(tb: &Testbed, from: &Endpoint, to: &Endpoint) -> Result<(), String> {
    let s = tb.service;
    let rf = Rtnl::open(from.netns()).map_err(|e| e.to_string())?;
    let rt = Rtnl::open(to.netns()).map_err(|e| e.to_string())?;
    let fi = rf.need_link(&from.iface).map_err(|e| e.to_string())?.index;
    let ti = rt.need_link(&to.iface).map_err(|e| e.to_string())?.index;
    rf.del_address(fi, s.addr).map_err(|e| e.to_string())?;
    rt.add_address(ti, s).map_err(|e| e.to_string())?;
    garp::announce(
        to.netns(),
        &to.iface,
        to.mac,
        s.addr,
        3,
        Duration::from_millis(2),
    )
    .map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchover_load::Outcome;

    #[test]
    fn longest_gap_between_successes() {
        let s = |due, lat, outcome| Sample {
            due_us: due,
            latency_us: lat,
            outcome,
            retried: false,
        };
        let v = [
            s(0, 1000, Outcome::Ok),
            s(1000, 1000, Outcome::Ok),
            s(2000, 500, Outcome::Refused),
            s(3000, 50_000, Outcome::Ok),
        ];
        assert!((longest_gap_ms(&v, 0, 100_000) - 51.0).abs() < 1e-9);
    }

    #[test]
    fn profile_bins_by_time_since_each_decision() {
        let at = |due_ms: u64, lat_ms: u64| Sample {
            due_us: due_ms * 1000,
            latency_us: lat_ms * 1000,
            outcome: patchover_load::Outcome::Ok,
            retried: false,
        };
        // Two switches at 1000 and 2000 ms; slow requests 25 ms after each decision.
        let samples = [
            at(990, 1),
            at(1025, 40),
            at(1026, 2),
            at(2025, 60),
            at(2400, 1),
        ];
        let p = profile(&samples, &[1_000_000, 2_000_000]);
        let bin = |from: i64| p.iter().find(|b| b.from_ms == from).cloned();
        assert_eq!(bin(-10).unwrap().requests, 1);
        let b20 = bin(20).unwrap();
        assert_eq!((b20.requests, b20.max_ms), (3, 60.0));
        assert!(bin(390).is_none(), "outside the profile's span");
    }

    #[test]
    fn spread_sorts() {
        let s = Spread::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((s.min, s.p50, s.p99, s.max), (1.0, 2.0, 3.0, 3.0));
        // Nearest rank: of 200 switches, the 198th.
        let s = Spread::of((1..=200).map(f64::from).collect());
        assert_eq!((s.p50, s.p99, s.max), (101.0, 198.0, 200.0));
    }

    #[test]
    fn phases_spread_by_name_in_the_order_they_ran() {
        let ph = |n: &str, ms: f64| Phase { name: n.into(), ms };
        let s = phase_spreads(&[
            vec![ph("drain", 1.0), ph("move", 4.0)],
            vec![ph("drain", 3.0), ph("window", 2.0), ph("move", 2.0)],
        ]);
        let names: Vec<&str> = s.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["drain", "move", "window"]);
        assert_eq!((s[0].ms.min, s[0].ms.max), (1.0, 3.0));
        // A switch without the phase counts 0 for it.
        assert_eq!((s[2].ms.min, s[2].ms.max), (0.0, 2.0));
    }
}
