//! `patchover lc …`: the resource table and the LC lifecycle.
//!
//! Every verb but `exec` goes through the daemon when one runs (see [`remote`]); each is one
//! typed operation of [`patchover_app::lcs`], called here or by the daemon, and one printer
//! for its typed result.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use patchover_app::lcs::{self, Acted, DiskAttached, LcView, NicAttached};
use patchover_daemon::api::{LcAction, LcActionBody};
use patchover_lc::{LcBackend, Stdio};
use serde_json::json;

use super::{Ctx, remote};

#[derive(Subcommand)]
pub enum LcCmd {
    /// The resource table: every LC with its resources, role and state.
    List,
    /// One LC in detail, with the limits as the kernel reports them.
    Show { lc: String },
    /// Boot an LC from its system disk.
    Boot {
        lc: String,
        /// Return as soon as init runs instead of waiting for the agent.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for the agent, in seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// End every process of an LC and boot it again from its disk.
    Reboot {
        lc: String,
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Shut an LC down, leaving nothing behind.
    Stop { lc: String },
    /// Running or not, its PID, processes and limits.
    Status { lc: String },
    /// Mount a host directory into a running LC.
    AttachDisk {
        lc: String,
        source: std::path::PathBuf,
        /// Where it appears inside the LC.
        at: std::path::PathBuf,
    },
    /// Plug a new NIC into a running LC and the host bridge.
    AttachNic {
        lc: String,
        /// Its name inside the LC.
        name: String,
        #[arg(long)]
        address: Option<patchover_core::Ipv4Cidr>,
        #[arg(long)]
        mac: Option<patchover_core::MacAddr>,
    },
    /// Run a program inside an LC: `patchover lc exec lc1 -- cat /etc/demo/version`.
    Exec {
        lc: String,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
}

pub fn run(cmd: LcCmd, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    match cmd {
        LcCmd::List => {
            let v = remote::route_typed(
                ctx,
                |c| remote::call(c, "GET", "/v1/lcs", None),
                || Ok(lcs::list(&ctx.env()?)?),
            )?;
            print_list(ctx, &v)?;
            Ok(ExitCode::SUCCESS)
        }
        LcCmd::Show { lc } | LcCmd::Status { lc } => {
            let v = remote::route_typed(
                ctx,
                |c| remote::call(c, "GET", &format!("/v1/lcs/{}", remote::segment(&lc)), None),
                || Ok(lcs::show(&ctx.env()?, &lc)?),
            )?;
            print_show(ctx, &v)?;
            Ok(ExitCode::SUCCESS)
        }
        LcCmd::Boot {
            lc,
            no_wait,
            timeout,
        } => {
            let body = LcActionBody {
                no_wait,
                timeout: Some(timeout),
            };
            action(ctx, &lc, LcAction::Boot, &body)
        }
        LcCmd::Reboot { lc, timeout } => {
            let body = LcActionBody {
                no_wait: false,
                timeout: Some(timeout),
            };
            action(ctx, &lc, LcAction::Reboot, &body)
        }
        LcCmd::Stop { lc } => action(ctx, &lc, LcAction::Stop, &LcActionBody::default()),
        LcCmd::AttachDisk { lc, source, at } => {
            // The daemon reads the path itself: it gets it as this process sees it.
            let source = std::path::absolute(&source)
                .with_context(|| format!("cannot resolve {}", source.display()))?;
            let v: DiskAttached = remote::route_typed(
                ctx,
                |c| {
                    let path = format!("/v1/lcs/{}/disks", remote::segment(&lc));
                    let body = json!({"source": source, "at": at});
                    remote::call(c, "POST", &path, Some(&body))
                },
                || Ok(lcs::attach_disk(&ctx.env()?, &lc, &source, &at)?),
            )?;
            if ctx.quiet {
            } else if ctx.json {
                println!("{}", serde_json::to_value(&v)?);
            } else {
                println!(
                    "{} attached to {lc} at {}",
                    v.source.display(),
                    v.at.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        LcCmd::AttachNic {
            lc,
            name,
            address,
            mac,
        } => {
            let v: NicAttached = remote::route_typed(
                ctx,
                |c| {
                    let path = format!("/v1/lcs/{}/nics", remote::segment(&lc));
                    let body = json!({
                        "name": name,
                        "address": address.map(|a| a.to_string()),
                        "mac": mac.map(|m| m.to_string()),
                    });
                    remote::call(c, "POST", &path, Some(&body))
                },
                || Ok(lcs::attach_nic(&ctx.env()?, &lc, &name, address, mac)?),
            )?;
            if ctx.quiet {
            } else if ctx.json {
                println!("{}", serde_json::to_value(&v)?);
            } else {
                println!(
                    "{} plugged into {lc} as {} (host port {})",
                    text(&v.nic.mac),
                    v.nic.name,
                    v.host_port
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        // exec acts here: it runs the program with this terminal's stdin, stdout and stderr,
        // which a JSON request cannot carry.
        LcCmd::Exec { lc, argv } => {
            let env = ctx.env()?;
            let spec = env.lc(&lc)?;
            let stdio = if ctx.json {
                Stdio::Capture
            } else {
                Stdio::Inherit
            };
            let out = env.backend.exec(spec, &argv, stdio)?;
            if ctx.json {
                println!(
                    "{}",
                    json!({
                        "lc": lc,
                        "status": out.status,
                        "stdout": String::from_utf8_lossy(&out.stdout),
                        "stderr": String::from_utf8_lossy(&out.stderr),
                    })
                );
            }
            Ok(ExitCode::from(
                out.status.and_then(|s| u8::try_from(s).ok()).unwrap_or(1),
            ))
        }
    }
}

/// Boots, reboots or stops an LC, here or through the daemon, and prints what it did.
fn action(ctx: &Ctx, lc: &str, action: LcAction, body: &LcActionBody) -> anyhow::Result<ExitCode> {
    let v: Acted = remote::route_typed(
        ctx,
        |c| {
            let path = format!(
                "/v1/lcs/{}/{}",
                remote::segment(lc),
                serde_json::to_value(action)?.as_str().unwrap_or_default()
            );
            remote::call(c, "POST", &path, Some(&serde_json::to_value(body)?))
        },
        || Ok(act(&ctx.env()?, lc, action, body)?),
    )?;
    if ctx.quiet {
    } else if ctx.json {
        println!("{}", serde_json::to_value(&v)?);
    } else {
        let ms = v.took_ms;
        match action {
            LcAction::Stop => println!("{lc} stopped in {ms} ms"),
            LcAction::Boot | LcAction::Reboot => {
                let verb = if action == LcAction::Boot {
                    "booted"
                } else {
                    "rebooted"
                };
                let agent = v
                    .agent_ms
                    .map_or(String::new(), |a| format!(", agent up after {a} ms"));
                println!(
                    "{lc} {verb}: init pid {}{agent} ({ms} ms in all)",
                    v.lc.pid.unwrap_or_default()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `POST /v1/lcs/{id}/{action}` and `lc boot|reboot|stop`: the API's action as the
/// application's.
pub fn act(
    env: &patchover_app::Env,
    id: &str,
    action: LcAction,
    body: &LcActionBody,
) -> Result<Acted, patchover_app::AppError> {
    let action = match action {
        LcAction::Boot => lcs::LcAction::Boot,
        LcAction::Reboot => lcs::LcAction::Reboot,
        LcAction::Stop => lcs::LcAction::Stop,
    };
    let timeout = Duration::from_secs(body.timeout.unwrap_or(30));
    lcs::act(env, id, action, body.no_wait, timeout)
}

/// A typed value as table text, as its JSON shows it: strings as they are, null as `-`.
fn text<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v).unwrap_or_default() {
        serde_json::Value::Null => "-".to_owned(),
        serde_json::Value::String(s) => s,
        v => v.to_string(),
    }
}

fn print_list(ctx: &Ctx, v: &[LcView]) -> anyhow::Result<()> {
    if ctx.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::to_value(v)?)?
        );
        return Ok(());
    }
    let header = [
        "ID",
        "BACKEND",
        "CPU",
        "SHARE",
        "MEMORY",
        "SYSTEM DISK",
        "APP DISK",
        "NICS",
        "ROLE",
        "STATE",
    ];
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|l| {
            let nics: Vec<String> = l
                .nics
                .iter()
                .map(|n| match &n.address {
                    Some(a) => format!("{} {}", n.name, text(a)),
                    None => n.name.clone(),
                })
                .collect();
            vec![
                text(&l.id),
                text(&l.backend),
                l.cpu.to_string(),
                format!("{}%", l.cpu_share),
                format!("{} MiB", l.memory_mib),
                text(&l.system_disk),
                text(&l.app_disk),
                nics.join(", "),
                text(&l.role),
                text(&l.state),
            ]
        })
        .collect();
    print!("{}", super::table(&header, &rows));
    Ok(())
}

fn print_show(ctx: &Ctx, v: &LcView) -> anyhow::Result<()> {
    if ctx.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::to_value(v)?)?
        );
        return Ok(());
    }
    let mut lines = vec![
        ("id", text(&v.id)),
        ("backend", text(&v.backend)),
        ("state", text(&v.state)),
        ("cpu", format!("CPU {} at {}%", v.cpu, v.cpu_share)),
        ("memory", format!("{} MiB", v.memory_mib)),
        ("system disk", text(&v.system_disk)),
    ];
    if let Some(app) = &v.spec.app_disk {
        lines.push((
            "app disk",
            format!("{} at {}", text(&app.path), text(&app.mount)),
        ));
    }
    for n in &v.spec.nics {
        lines.push((
            "nic",
            format!("{} {} {}", n.name, text(&n.mac), text(&n.address)),
        ));
    }
    if let Some(pid) = v.pid {
        lines.push(("init pid", pid.to_string()));
        lines.push(("processes", v.processes.to_string()));
        if let Some(u) = v.uptime_s {
            lines.push(("uptime", format!("{u:.1} s")));
        }
        if let Some(l) = &v.limits {
            lines.push((
                "kernel limits",
                format!(
                    "cpu quota {} / {} us, cpus {}, memory {}",
                    l.cpu_quota_us.map_or("max".to_owned(), |q| q.to_string()),
                    l.cpu_period_us,
                    text(&l.cpus),
                    l.memory_bytes
                        .map_or("max".to_owned(), |m| format!("{} MiB", m >> 20))
                ),
            ));
        }
        lines.push(("host ports", v.host_ports.join(", ")));
        lines.push(("console log", text(&v.console_log)));
    }
    for (k, v) in lines {
        println!("{k:>14}  {v}");
    }
    Ok(())
}
