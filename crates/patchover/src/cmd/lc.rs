//! `patchover lc …`: the resource table and the LC lifecycle.
//!
//! Every verb but `exec` goes through the daemon when one runs (see [`remote`]); each has one
//! function that does it ([`list_json`], [`show_json`], [`act`], [`attach_disk`],
//! [`attach_nic`]), called here or by the daemon, and one printer for its JSON.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Subcommand;
use patchover_core::LcSpec;
use patchover_daemon::api::{LcAction, LcActionBody};
use patchover_lc::{LcBackend, LcStatus, Stdio};
use patchover_store::LcRow;
use serde_json::json;

use super::{Ctx, Env, NotFound, remote};

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
            let v = remote::route(
                ctx,
                |c| remote::call(c, "GET", "/v1/lcs", None),
                || list_json(&Env::open(ctx)?),
            )?;
            print_list(ctx, &v)?;
            Ok(ExitCode::SUCCESS)
        }
        LcCmd::Show { lc } | LcCmd::Status { lc } => {
            let v = remote::route(
                ctx,
                |c| remote::call(c, "GET", &format!("/v1/lcs/{}", remote::segment(&lc)), None),
                || show_json(&Env::open(ctx)?, &lc),
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
            let v = remote::route(
                ctx,
                |c| {
                    let path = format!("/v1/lcs/{}/disks", remote::segment(&lc));
                    let body = json!({"source": source, "at": at});
                    remote::call(c, "POST", &path, Some(&body))
                },
                || attach_disk(&Env::open(ctx)?, &lc, &source, &at),
            )?;
            if ctx.quiet {
            } else if ctx.json {
                println!("{v}");
            } else {
                println!(
                    "{} attached to {lc} at {}",
                    text(&v["source"]),
                    text(&v["at"])
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
            let v = remote::route(
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
                || attach_nic(&Env::open(ctx)?, &lc, &name, address, mac),
            )?;
            if ctx.quiet {
            } else if ctx.json {
                println!("{v}");
            } else {
                println!(
                    "{} plugged into {lc} as {} (host port {})",
                    text(&v["nic"]["mac"]),
                    text(&v["nic"]["name"]),
                    text(&v["host_port"])
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        // exec acts here: it runs the program with this terminal's stdin, stdout and stderr,
        // which a JSON request cannot carry.
        LcCmd::Exec { lc, argv } => {
            let env = Env::open(ctx)?;
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
    let v = remote::route(
        ctx,
        |c| {
            let path = format!(
                "/v1/lcs/{}/{}",
                remote::segment(lc),
                serde_json::to_value(action)?.as_str().unwrap_or_default()
            );
            remote::call(c, "POST", &path, Some(&serde_json::to_value(body)?))
        },
        || act(&Env::open(ctx)?, lc, action, body),
    )?;
    if ctx.quiet {
    } else if ctx.json {
        println!("{v}");
    } else {
        let ms = &v["took_ms"];
        match action {
            LcAction::Stop => println!("{lc} stopped in {ms} ms"),
            LcAction::Boot | LcAction::Reboot => {
                let verb = if action == LcAction::Boot {
                    "booted"
                } else {
                    "rebooted"
                };
                let agent = v["agent_ms"]
                    .as_u64()
                    .map_or(String::new(), |a| format!(", agent up after {a} ms"));
                println!(
                    "{lc} {verb}: init pid {}{agent} ({ms} ms in all)",
                    v["pid"].as_i64().unwrap_or_default()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Boots, reboots or stops LC `id` (waiting for its agent after a boot unless `no_wait`); the
/// LC afterwards as [`lc_json`] shows it, with `took_ms` and `agent_ms`. The one
/// implementation of `lc boot|reboot|stop` and `POST /v1/lcs/{id}/{action}`.
pub fn act(
    env: &Env,
    id: &str,
    action: LcAction,
    body: &LcActionBody,
) -> anyhow::Result<serde_json::Value> {
    let spec = env.lc(id)?;
    let timeout = body.timeout.unwrap_or(30);
    let start = Instant::now();
    let agent_ms = match action {
        LcAction::Boot => {
            env.backend.boot(spec)?;
            wait_agent(env, spec, body.no_wait, timeout)?
        }
        LcAction::Reboot => {
            env.backend.reboot(spec)?;
            wait_agent(env, spec, body.no_wait, timeout)?
        }
        LcAction::Stop => {
            env.backend.stop(spec)?;
            None
        }
    };
    let took_ms = start.elapsed().as_millis() as u64;
    let mut v = show_json(env, id)?;
    v["took_ms"] = json!(took_ms);
    v["agent_ms"] = json!(agent_ms);
    Ok(v)
}

/// Mounts host directory `source` into the running LC `id` at `at`: `lc attach-disk` and
/// `POST /v1/lcs/{id}/disks`.
pub fn attach_disk(
    env: &Env,
    id: &str,
    source: &std::path::Path,
    at: &std::path::Path,
) -> anyhow::Result<serde_json::Value> {
    if !source.is_absolute() {
        return Err(super::BadInput(format!(
            "{} is not an absolute path; give the directory's whole path",
            source.display()
        ))
        .into());
    }
    let spec = env.lc(id)?;
    env.backend.attach_disk(spec, source, at)?;
    Ok(json!({"lc": id, "source": source, "at": at}))
}

/// Plugs NIC `name` into the running LC `id` and the host bridge (its MAC derived from the LC
/// and the name unless given): `lc attach-nic` and `POST /v1/lcs/{id}/nics`.
pub fn attach_nic(
    env: &Env,
    id: &str,
    name: &str,
    address: Option<patchover_core::Ipv4Cidr>,
    mac: Option<patchover_core::MacAddr>,
) -> anyhow::Result<serde_json::Value> {
    let spec = env.lc(id)?;
    if spec.nics.iter().any(|n| n.name == name) {
        return Err(super::BadInput(format!("LC {id} already has a NIC named {name}")).into());
    }
    let nic = patchover_core::NicSpec {
        mac: mac.unwrap_or_else(|| patchover_core::MacAddr::derive(&format!("{id}/{name}"))),
        name: name.to_owned(),
        address,
        gateway: None,
        detached: false,
    };
    let port = env.backend.attach_nic(spec, &nic)?;
    Ok(json!({"lc": id, "nic": nic, "host_port": port}))
}

/// Waits for the agent when the image has one; returns how long that took.
fn wait_agent(
    env: &Env,
    spec: &LcSpec,
    no_wait: bool,
    timeout: u64,
) -> anyhow::Result<Option<u64>> {
    if no_wait || !env.backend.has_agent(spec) {
        return Ok(None);
    }
    let start = Instant::now();
    env.backend
        .wait_agent(spec, Duration::from_secs(timeout))
        .with_context(|| {
            format!(
                "the LC runs but its agent did not answer; see its console log {}",
                env.backend.console_log(spec).display()
            )
        })?;
    Ok(Some(start.elapsed().as_millis() as u64))
}

/// One LC as `lc list`, `lc show` and the API (`GET /v1/lcs`, `GET /v1/lcs/{id}`) show it:
/// its resource-table row (id, backend, cpu, cpu_share, memory_mib, system_disk, app_disk,
/// nics, role), what the backend reports now (state, pid, uptime_s, processes, limits as the
/// kernel has them, host_ports, agent_socket), its console log, and its whole config entry
/// (`spec`).
pub fn lc_json(env: &Env, row: &LcRow, st: &LcStatus) -> serde_json::Value {
    let mut v = json!({
        "id": row.spec.id,
        "backend": row.spec.backend,
        "cpu": row.spec.cpu.cpu,
        "cpu_share": row.spec.cpu.share_pct,
        "memory_mib": row.spec.memory_mib,
        "system_disk": row.spec.system_disk.path,
        "app_disk": row.spec.app_disk.as_ref().map(|d| &d.path),
        "nics": row.spec.nics,
        "role": row.role,
        "console_log": env.backend.console_log(&row.spec),
        "spec": row.spec,
    });
    if let (Ok(serde_json::Value::Object(status)), Some(out)) =
        (serde_json::to_value(st), v.as_object_mut())
    {
        for (k, x) in status {
            if k != "id" {
                out.insert(k, x);
            }
        }
    }
    v
}

/// The resource table with each LC's state: `lc list` and `GET /v1/lcs`.
pub fn list_json(env: &Env) -> anyhow::Result<serde_json::Value> {
    let mut out = Vec::new();
    for row in env.store.lcs()? {
        let st = env.backend.status(&row.spec)?;
        out.push(lc_json(env, &row, &st));
    }
    Ok(serde_json::Value::Array(out))
}

/// One LC: `lc show`, `lc status` and `GET /v1/lcs/{id}`.
pub fn show_json(env: &Env, id: &str) -> anyhow::Result<serde_json::Value> {
    env.lc(id)?;
    let row = env.store.lc(id)?.ok_or_else(|| {
        NotFound(format!(
            "LC {id} is in the config but not in the resource table; run the command again"
        ))
    })?;
    let st = env.backend.status(&row.spec)?;
    Ok(lc_json(env, &row, &st))
}

/// A JSON value as table text: strings as they are, null as `-`.
fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

fn print_list(ctx: &Ctx, v: &serde_json::Value) -> anyhow::Result<()> {
    if ctx.json {
        println!("{}", serde_json::to_string_pretty(v)?);
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
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|l| {
            let nics: Vec<String> = l["nics"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|n| match n["address"].as_str() {
                    Some(a) => format!("{} {a}", text(&n["name"])),
                    None => text(&n["name"]),
                })
                .collect();
            vec![
                text(&l["id"]),
                text(&l["backend"]),
                text(&l["cpu"]),
                format!("{}%", text(&l["cpu_share"])),
                format!("{} MiB", text(&l["memory_mib"])),
                text(&l["system_disk"]),
                text(&l["app_disk"]),
                nics.join(", "),
                text(&l["role"]),
                text(&l["state"]),
            ]
        })
        .collect();
    print!("{}", super::table(&header, &rows));
    Ok(())
}

fn print_show(ctx: &Ctx, v: &serde_json::Value) -> anyhow::Result<()> {
    if ctx.json {
        println!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    let mut lines = vec![
        ("id", text(&v["id"])),
        ("backend", text(&v["backend"])),
        ("state", text(&v["state"])),
        (
            "cpu",
            format!("CPU {} at {}%", text(&v["cpu"]), text(&v["cpu_share"])),
        ),
        ("memory", format!("{} MiB", text(&v["memory_mib"]))),
        ("system disk", text(&v["system_disk"])),
    ];
    let app = &v["spec"]["app_disk"];
    if !app.is_null() {
        lines.push((
            "app disk",
            format!("{} at {}", text(&app["path"]), text(&app["mount"])),
        ));
    }
    for n in v["spec"]["nics"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        lines.push((
            "nic",
            format!(
                "{} {} {}",
                text(&n["name"]),
                text(&n["mac"]),
                text(&n["address"])
            ),
        ));
    }
    if let Some(pid) = v["pid"].as_i64() {
        lines.push(("init pid", pid.to_string()));
        lines.push(("processes", text(&v["processes"])));
        if let Some(u) = v["uptime_s"].as_f64() {
            lines.push(("uptime", format!("{u:.1} s")));
        }
        let l = &v["limits"];
        if l.is_object() {
            lines.push((
                "kernel limits",
                format!(
                    "cpu quota {} / {} us, cpus {}, memory {}",
                    l["cpu_quota_us"]
                        .as_u64()
                        .map_or("max".to_owned(), |q| q.to_string()),
                    text(&l["cpu_period_us"]),
                    text(&l["cpus"]),
                    l["memory_bytes"]
                        .as_u64()
                        .map_or("max".to_owned(), |m| format!("{} MiB", m >> 20))
                ),
            ));
        }
        let ports: Vec<String> = v["host_ports"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(text)
            .collect();
        lines.push(("host ports", ports.join(", ")));
        lines.push(("console log", text(&v["console_log"])));
    }
    for (k, v) in lines {
        println!("{k:>14}  {v}");
    }
    Ok(())
}
