//! `patchover net`: move the service between LCs (`switch`), hand it back (`back`), and set up
//! the service NAT of `seamless` mode (`setup`): the operations of [`patchover_app::net`] and
//! [`patchover_app::service`].
//!
//! `switch` and `back` go through the daemon when one runs (see [`remote`]); one printer
//! renders the typed report either way.

use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use patchover_app::net::{self, SwitchSettings, Switched};
use patchover_app::{AppError, service};
use patchover_daemon::api::{SwitchBackBody, SwitchBody, SwitchOptions};
use patchover_load::parse_duration;
use patchover_net::{Mode, SwitchReport};

use super::{Ctx, remote};

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

/// The API's switch options as the application's settings.
pub fn settings(o: &SwitchOptions) -> SwitchSettings {
    let ms = Duration::from_millis;
    SwitchSettings {
        port: o.port,
        check_path: o.check_path.clone(),
        expect: o.expect.clone(),
        drain_deadline: ms(o.drain_deadline_ms),
        garp_count: o.garp_count,
        garp_interval: ms(o.garp_interval_ms),
        garp_refresh: o.garp_refresh_ms.iter().map(|&m| ms(m)).collect(),
    }
}

/// A switch done here: waits for the later ARP bursts, so neighbours that missed the first
/// hear it.
fn direct(r: Result<Switched, AppError>) -> anyhow::Result<SwitchReport> {
    let sw = r?;
    if let Some(h) = sw.refresh {
        let _ = h.join();
    }
    Ok(sw.report)
}

fn print_switch(ctx: &Ctx, r: &SwitchReport) -> anyhow::Result<()> {
    if ctx.quiet {
    } else if ctx.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::to_value(r)?)?
        );
    } else {
        println!(
            "switched {} -> {} ({}): pause {:.1} ms, drain {:.1} ms, first request after {:.1} ms, {} held connection(s) released",
            r.from,
            r.to,
            serde_json::to_value(r.mode)?.as_str().unwrap_or("?"),
            r.pause_ms,
            r.drain_ms,
            r.first_request_ms,
            r.held_syns
        );
        println!("phases: {}", r.phases_line());
        let left = r.leftover_connections;
        if left > 0 {
            println!(
                "{left} connection(s) still open on {} at the drain deadline",
                r.from
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
            let v: SwitchReport = remote::route_typed(
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
                || direct(net::switch(&ctx.env()?, &from, &to, mode, &settings(&o))),
            )?;
            print_switch(ctx, &v)?;
            Ok(ExitCode::SUCCESS)
        }
        NetCmd::Back { opts } => {
            let o = opts.options();
            let v: SwitchReport = remote::route_typed(
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
                || direct(net::back(&ctx.env()?, &settings(&o))),
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
