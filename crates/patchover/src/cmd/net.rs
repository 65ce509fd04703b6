//! `patchover net`: move the service between LCs (`switch`), hand it back (`back`), and set up
//! the service NAT of `seamless` mode (`setup`). The switching itself lives in `patchover-net`;
//! this file maps LCs of the config onto its endpoints.
//!
//! `switch` and `back` go through the daemon when one runs (see [`remote`]): [`switch_json`]
//! and [`back_json`] are called here or by the daemon, and one printer prints their JSON.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use patchover_app::service;
use patchover_daemon::api::{SwitchBackBody, SwitchBody, SwitchOptions};
use patchover_load::parse_duration;
use patchover_net::{GarpConfig, HealthCheck, Hooks, Mode, SwitchError, SwitchPlan};
use serde::{Deserialize, Serialize};

use super::{BadInput, Ctx, Env, remote};

#[derive(Subcommand)]
pub enum NetCmd {
    /// Move the service from LC FROM to LC TO.
    Switch {
        from: String,
        to: String,
        /// path (one NIC identity, bridge port swap), readdress (two NICs, address move +
        /// gratuitous ARP) or seamless (host NAT, no pause).
        #[arg(long, value_parser = |s: &str| s.parse::<Mode>())]
        mode: Mode,
        #[command(flatten)]
        opts: SwitchOpts,
    },
    /// Hand the service back to the LC the last switch moved it from.
    Back {
        #[command(flatten)]
        opts: SwitchOpts,
    },
    /// seamless mode: point the service NAT at ACTIVE (once, before the first switch).
    Setup { active: String },
}

#[derive(clap::Args, Clone)]
pub struct SwitchOpts {
    /// The service port (checked, drained, held).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// The check the standby must pass on the service address.
    #[arg(long, default_value = "/version")]
    pub check_path: String,
    /// Text the standby's answer must contain (its version or id); empty accepts any 200.
    #[arg(long, default_value = "")]
    pub expect: String,
    /// How long the old LC may take to finish its connections.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub drain_deadline: Duration,
    /// Gratuitous ARP frames per burst (readdress).
    #[arg(long, default_value_t = 3)]
    pub garp_count: u32,
    /// Gap between frames of a burst.
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    pub garp_interval: Duration,
    /// Repeat the burst this long after the switch (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1s,5s", value_parser = parse_duration)]
    pub garp_refresh: Vec<Duration>,
}

impl SwitchOpts {
    /// The API's form of the options (what both paths hand to [`switch_json`]).
    pub fn options(&self) -> SwitchOptions {
        let ms = |d: &Duration| d.as_millis() as u64;
        SwitchOptions {
            port: self.port,
            check_path: self.check_path.clone(),
            expect: self.expect.clone(),
            drain_deadline_ms: ms(&self.drain_deadline),
            garp_count: self.garp_count,
            garp_interval_ms: ms(&self.garp_interval),
            garp_refresh_ms: self.garp_refresh.iter().map(ms).collect(),
        }
    }
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
    o: &SwitchOptions,
) -> anyhow::Result<SwitchPlan> {
    let net = &env.config.network;
    let service = env.config.service_address()?;
    if mode != Mode::Seamless && net.bridge_address.is_none() {
        return Err(BadInput(
            "path and readdress modes check the service from the host: set network.bridge_address"
                .into(),
        )
        .into());
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
            interval: Duration::from_millis(o.garp_interval_ms),
            refresh_after: o
                .garp_refresh_ms
                .iter()
                .map(|&m| Duration::from_millis(m))
                .collect(),
        },
        drain_deadline: Duration::from_millis(o.drain_deadline_ms),
        queue: 4242,
        lock_path: env.config.run_dir.join("net-switch.lock"),
        // The hand-off moves a writing service's data too: only the patch cycle does it.
        handoff: false,
    })
}

fn is_bad_input(e: &SwitchError) -> bool {
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

/// Moves the service from `from` to `to` and records the switch for `back`: `net switch` and
/// `POST /v1/net/switch`. The switch report, and the thread sending the later gratuitous ARP
/// bursts (the CLI waits for it before it exits; the daemon lets it run).
pub fn switch_json(
    env: &Env,
    from: &str,
    to: &str,
    mode: Mode,
    o: &SwitchOptions,
) -> anyhow::Result<(serde_json::Value, Option<std::thread::JoinHandle<()>>)> {
    let plan = plan(env, from, to, mode, o)?;
    // The service is told to drain by the commands of `[service]` (the demo's defaults:
    // SIGUSR1/SIGUSR2 to patchover-demo), run in the LCs through their backend, as the patch
    // cycle does.
    let settings = &env.config.service;
    let mut svc = patchover_orchestrator::service::LcServiceControl {
        backend: &env.backend,
        lcs: &env.config.lcs,
        settings,
    };
    let mut window = |_: &SwitchPlan| -> Result<(), patchover_net::BoxError> { Ok(()) };
    let mut hooks = Hooks {
        service: &mut svc,
        in_window: &mut window,
    };
    let sw = match patchover_net::switch(&plan, &mut hooks) {
        Ok(sw) => sw,
        Err(e) if is_bad_input(&e) => {
            return Err(BadInput(format!("{:#}", anyhow::Error::from(e))).into());
        }
        Err(e) => return Err(e.into()),
    };
    let last = LastSwitch {
        from: from.to_string(),
        to: to.to_string(),
        mode,
    };
    std::fs::create_dir_all(&env.config.state_dir).ok();
    std::fs::write(last_path(env), serde_json::to_vec(&last)?)
        .with_context(|| format!("cannot record the switch in {}", last_path(env).display()))?;
    Ok((serde_json::to_value(&sw.report)?, sw.refresh))
}

/// Hands the service back to the LC the last switch moved it from: `net back` and
/// `POST /v1/net/back`. As [`switch_json`].
pub fn back_json(
    env: &Env,
    o: &SwitchOptions,
) -> anyhow::Result<(serde_json::Value, Option<std::thread::JoinHandle<()>>)> {
    let path = last_path(env);
    let text = std::fs::read(&path).map_err(|_| {
        BadInput(format!(
            "no switch recorded in {}; nothing to hand back",
            path.display()
        ))
    })?;
    let last: LastSwitch =
        serde_json::from_slice(&text).with_context(|| format!("reading {}", path.display()))?;
    switch_json(env, &last.to, &last.from, last.mode, o)
}

/// Runs the switch here (waiting for the later ARP bursts) or through the daemon.
fn direct(
    r: anyhow::Result<(serde_json::Value, Option<std::thread::JoinHandle<()>>)>,
) -> anyhow::Result<serde_json::Value> {
    let (v, refresh) = r?;
    if let Some(h) = refresh {
        // Later gratuitous ARP bursts: wait for them so neighbours that missed the first hear it.
        let _ = h.join();
    }
    Ok(v)
}

fn print_switch(ctx: &Ctx, r: &serde_json::Value) -> anyhow::Result<()> {
    if ctx.quiet {
    } else if ctx.json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        let ms = |k: &str| r[k].as_f64().unwrap_or_default();
        let s = |k: &str| r[k].as_str().unwrap_or("?").to_owned();
        println!(
            "switched {} -> {} ({}): pause {:.1} ms, drain {:.1} ms, first request after {:.1} ms, {} held connection(s) released",
            s("from"),
            s("to"),
            s("mode"),
            ms("pause_ms"),
            ms("drain_ms"),
            ms("first_request_ms"),
            r["held_syns"]
        );
        let left = r["leftover_connections"].as_u64().unwrap_or_default();
        if left > 0 {
            println!(
                "{left} connection(s) still open on {} at the drain deadline",
                s("from")
            );
        }
    }
    Ok(())
}

pub fn run(cmd: NetCmd, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    match cmd {
        NetCmd::Switch {
            from,
            to,
            mode,
            opts,
        } => {
            let o = opts.options();
            let v = remote::route(
                ctx,
                |c| {
                    let body = SwitchBody {
                        from: from.clone(),
                        to: to.clone(),
                        mode: mode.to_string(),
                        options: o.clone(),
                    };
                    remote::call(
                        c,
                        "POST",
                        "/v1/net/switch",
                        Some(&serde_json::to_value(body)?),
                    )
                },
                || direct(switch_json(&ctx.env()?, &from, &to, mode, &o)),
            )?;
            print_switch(ctx, &v)?;
            Ok(ExitCode::SUCCESS)
        }
        NetCmd::Back { opts } => {
            let o = opts.options();
            let v = remote::route(
                ctx,
                |c| {
                    let body = SwitchBackBody { options: o.clone() };
                    remote::call(
                        c,
                        "POST",
                        "/v1/net/back",
                        Some(&serde_json::to_value(body)?),
                    )
                },
                || direct(back_json(&ctx.env()?, &o)),
            )?;
            print_switch(ctx, &v)?;
            Ok(ExitCode::SUCCESS)
        }
        NetCmd::Setup { active } => {
            let nat = service::seamless_setup(&mut ctx.env()?, &active)?;
            if ctx.quiet {
            } else if ctx.json {
                println!(
                    "{}",
                    serde_json::json!({"service": nat.service.to_string(), "active": nat.active})
                );
            } else {
                println!(
                    "service NAT: {} -> {} ({active})",
                    nat.service.addr, nat.target
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
