//! Moving the service between LCs by hand: `net switch|back` and `POST /v1/net/switch|back`.
//! The switching itself lives in `patchover-net`; this maps LCs of the config onto its
//! endpoints and records the last switch for `back`.

use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Duration;

use patchover_net::{GarpConfig, HealthCheck, Hooks, Mode, SwitchError, SwitchPlan, SwitchReport};
use serde::{Deserialize, Serialize};

use crate::{AppError, Env, service};

/// How to check, drain and announce a switch (the CLI's flags, the API's body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwitchSettings {
    /// The service port (checked, drained, held).
    pub port: u16,
    /// The check the standby must pass on the service address.
    pub check_path: String,
    /// Text the standby's answer must contain; empty accepts any 200.
    pub expect: String,
    /// How long the old LC may take to finish its connections.
    pub drain_deadline: Duration,
    /// Gratuitous ARP frames per burst (readdress).
    pub garp_count: u32,
    /// Gap between frames of a burst.
    pub garp_interval: Duration,
    /// Repeat the burst this long after the switch.
    pub garp_refresh: Vec<Duration>,
}

/// What `back` needs to know about the last switch.
#[derive(Serialize, Deserialize)]
struct LastSwitch {
    from: String,
    to: String,
    mode: Mode,
}

fn last_path(env: &Env) -> PathBuf {
    env.config.state_dir.join("net-last-switch.json")
}

fn plan(
    env: &Env,
    from: &str,
    to: &str,
    mode: Mode,
    o: &SwitchSettings,
) -> Result<SwitchPlan, AppError> {
    let net = &env.config.network;
    let service = env.config.service_address()?;
    if mode != Mode::Seamless && net.bridge_address.is_none() {
        return Err(AppError::BadInput(
            "path and readdress modes check the service from the host: set network.bridge_address"
                .into(),
        ));
    }
    // Unknown LCs first, then their state.
    let (from_spec, to_spec) = (env.lc(from)?, env.lc(to)?);
    let from_ep = service::endpoint(env, from_spec)?;
    let mut to_ep = service::endpoint(env, to_spec)?;
    to_ep.identity = o.expect.clone();
    Ok(SwitchPlan {
        host_netns: None,
        bridge: net.bridge.clone(),
        service,
        from: from_ep,
        to: to_ep,
        mode,
        health: HealthCheck::new(o.port, &o.check_path, &o.expect),
        check_from: None,
        garp: GarpConfig {
            count: o.garp_count,
            interval: o.garp_interval,
            refresh_after: o.garp_refresh.clone(),
        },
        drain_deadline: o.drain_deadline,
        queue: 4242,
        lock_path: env.config.run_dir.join("net-switch.lock"),
        // The hand-off moves a writing service's data too: only the patch cycle does it.
        handoff: false,
        // Resumed only if the last switch drained it (moved the service away from it).
        resume_to: last_switch(env)?.is_some_and(|last| last.from == to),
    })
}

/// Whether a switch was refused or called off for what was asked (the service stays).
pub(crate) fn switch_is_bad_input(e: &SwitchError) -> bool {
    matches!(
        e,
        SwitchError::Plan(_)
            | SwitchError::Busy { .. }
            | SwitchError::NoBridge { .. }
            | SwitchError::State(_)
            | SwitchError::StandbyNotReady { .. }
            | SwitchError::DrainTimeout { .. }
            | SwitchError::AddressTaken { .. }
    )
}

/// A switch done, and the thread sending the later gratuitous ARP bursts (the CLI waits for
/// it before it exits; the daemon lets it run).
pub struct Switched {
    pub report: SwitchReport,
    pub refresh: Option<JoinHandle<()>>,
}

/// Moves the service from `from` to `to` and records the switch for `back`: `net switch` and
/// `POST /v1/net/switch`.
pub fn switch(
    env: &Env,
    from: &str,
    to: &str,
    mode: Mode,
    o: &SwitchSettings,
) -> Result<Switched, AppError> {
    let plan = plan(env, from, to, mode, o)?;
    // The service is told to drain by the commands of `[service]` (none configured: none run;
    // the demo's config sends SIGUSR1/SIGUSR2 to patchover-demo), run in the LCs through their
    // backend, as the patch cycle does.
    let mut svc = patchover_orchestrator::service::LcServiceControl {
        backend: &env.backend,
        lcs: &env.config.lcs,
        settings: &env.config.service,
        // A bare network switch moves no data disk: the front is the patch cycle's.
        front: None,
    };
    let mut window = |_: &SwitchPlan| -> Result<(), patchover_net::BoxError> { Ok(()) };
    let mut hooks = Hooks {
        service: &mut svc,
        in_window: &mut window,
    };
    let sw = patchover_net::switch(&plan, &mut hooks).map_err(|e| AppError::Switch(Box::new(e)))?;
    let last = LastSwitch {
        from: from.to_string(),
        to: to.to_string(),
        mode,
    };
    let path = last_path(env);
    std::fs::create_dir_all(&env.config.state_dir).ok();
    let record = serde_json::to_vec(&last).map_err(std::io::Error::other);
    record
        .and_then(|bytes| std::fs::write(&path, bytes))
        .map_err(|source| AppError::Io {
            what: format!("cannot record the switch in {}", path.display()),
            source,
        })?;
    Ok(Switched {
        report: sw.report,
        refresh: sw.refresh,
    })
}

/// The last switch recorded, `None` before the first.
fn last_switch(env: &Env) -> Result<Option<LastSwitch>, AppError> {
    let path = last_path(env);
    let Ok(text) = std::fs::read(&path) else {
        return Ok(None);
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| AppError::Io {
            what: format!("reading {}", path.display()),
            source: std::io::Error::other(e),
        })
}

/// Hands the service back to the LC the last switch moved it from: `net back` and
/// `POST /v1/net/back`. As [`switch`]; the LC it goes back to was drained, so it is resumed
/// first.
pub fn back(env: &Env, o: &SwitchSettings) -> Result<Switched, AppError> {
    let Some(last) = last_switch(env)? else {
        return Err(AppError::BadInput(format!(
            "no switch recorded in {}; nothing to hand back",
            last_path(env).display()
        )));
    };
    switch(env, &last.to, &last.from, last.mode, o)
}
