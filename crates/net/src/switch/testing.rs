//! Fixtures for the root-free tests of the switch modes (against `fake::FakeNetwork`).

use std::path::PathBuf;
use std::time::Duration;

use patchover_core::MacAddr;

use crate::fake::FakeNetwork;
use crate::garp::GarpConfig;
use crate::health::HealthCheck;
use crate::lc::LcAccess;

use super::{Endpoint, Hooks, Mode, SwitchError, SwitchPlan, Switched, switch_with};

/// A plan, the fake network it runs on, and a directory for its lock.
pub(super) struct Bed {
    pub net: FakeNetwork,
    pub plan: SwitchPlan,
    _dir: tempfile::TempDir,
}

fn ep(name: &str, addr: &str, mac: u8) -> Endpoint {
    Endpoint {
        name: name.into(),
        access: LcAccess::Netns(PathBuf::from(format!("/fake/{name}"))),
        host_port: format!("po{name}"),
        iface: "eth0".into(),
        mac: MacAddr([2, 0, 0, 0, 0, mac]),
        address: addr.parse().unwrap(),
        identity: format!("lc-{name}"),
    }
}

/// `a` serves 10.0.0.10:8080 and `b` is the standby: in `path` both have the service address
/// and one MAC, otherwise 10.0.0.2 and 10.0.0.3. One gratuitous ARP, no refresh thread.
pub(super) fn bed(mode: Mode) -> Bed {
    let (a, b) = match mode {
        Mode::Path => (ep("a", "10.0.0.10/24", 1), ep("b", "10.0.0.10/24", 1)),
        _ => (ep("a", "10.0.0.2/24", 1), ep("b", "10.0.0.3/24", 2)),
    };
    let dir = tempfile::tempdir().unwrap();
    let mut health = HealthCheck::new(8080, "/version", "");
    health.patience = Duration::ZERO;
    let plan = SwitchPlan {
        host_netns: None,
        bridge: "br".into(),
        service: "10.0.0.10/24".parse().unwrap(),
        from: a,
        to: b,
        mode,
        health,
        check_from: None,
        garp: GarpConfig {
            count: 1,
            interval: Duration::ZERO,
            refresh_after: Vec::new(),
        },
        drain_deadline: Duration::from_millis(20),
        queue: 7,
        lock_path: dir.path().join("switch.lock"),
        handoff: false,
        resume_to: false,
    };
    Bed {
        net: FakeNetwork::for_plan(&plan),
        plan,
        _dir: dir,
    }
}

impl Bed {
    /// Runs the switch with the fake's service control and an `in_window` hook that logs
    /// `window` (and fails when the fake is told to fail `window`).
    pub fn switch(&self) -> Result<Switched, SwitchError> {
        self.switch_by(&self.plan)
    }

    /// [`Bed::switch`] by another plan on the same network.
    pub fn switch_by(&self, plan: &SwitchPlan) -> Result<Switched, SwitchError> {
        let mut ctl = self.net.control();
        let net = self.net.clone();
        let mut window = move |_: &SwitchPlan| net.call("window");
        let mut hooks = Hooks {
            service: &mut ctl,
            in_window: &mut window,
        };
        switch_with(&self.net, plan, &mut hooks)
    }

    /// The log, without the checks every switch starts with (up to the standby's own GET).
    pub fn ops_after_checks(&self) -> Vec<String> {
        let ops = self.net.ops();
        match ops.iter().position(|o| o.starts_with("b: get")) {
            Some(i) => ops[i + 1..].to_vec(),
            None => ops,
        }
    }
}

/// Whether the error is a rollback that succeeded, with a cause that `pred` accepts.
pub(super) fn rolled_back_because(e: &SwitchError, pred: impl Fn(&SwitchError) -> bool) -> bool {
    matches!(e, SwitchError::RolledBack { cause, .. } if pred(cause))
}
