//! `patchover lc …`: the resource table and the LC lifecycle.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Subcommand;
use patchover_core::{DiskSpec, LcSpec};
use patchover_lc::{LcBackend, LcStatus, Stdio};
use serde_json::json;

use super::{Ctx, Env};

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
    let env = Env::open(ctx)?;
    match cmd {
        LcCmd::List => list(&env, ctx),
        LcCmd::Show { lc } | LcCmd::Status { lc } => {
            let spec = env.lc(&lc)?;
            let st = env.backend.status(spec)?;
            print_status(ctx, &env, spec, &st);
            Ok(ExitCode::SUCCESS)
        }
        LcCmd::Boot {
            lc,
            no_wait,
            timeout,
        } => {
            let spec = env.lc(&lc)?;
            let start = Instant::now();
            let st = env.backend.boot(spec)?;
            let agent_ms = wait_agent(&env, spec, no_wait, timeout)?;
            report_boot(ctx, "booted", &st, start, agent_ms);
            Ok(ExitCode::SUCCESS)
        }
        LcCmd::Reboot { lc, timeout } => {
            let spec = env.lc(&lc)?;
            let start = Instant::now();
            let st = env.backend.reboot(spec)?;
            let agent_ms = wait_agent(&env, spec, false, timeout)?;
            report_boot(ctx, "rebooted", &st, start, agent_ms);
            Ok(ExitCode::SUCCESS)
        }
        LcCmd::Stop { lc } => {
            let spec = env.lc(&lc)?;
            let start = Instant::now();
            env.backend.stop(spec)?;
            let ms = start.elapsed().as_millis();
            if ctx.json {
                println!("{}", json!({"lc": lc, "state": "stopped", "took_ms": ms}));
            } else {
                println!("{lc} stopped in {ms} ms");
            }
            Ok(ExitCode::SUCCESS)
        }
        LcCmd::AttachDisk { lc, source, at } => {
            let spec = env.lc(&lc)?;
            env.backend.attach_disk(spec, &source, &at)?;
            if ctx.json {
                println!("{}", json!({"lc": lc, "source": source, "at": at}));
            } else {
                println!("{} attached to {lc} at {}", source.display(), at.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        LcCmd::AttachNic {
            lc,
            name,
            address,
            mac,
        } => {
            let spec = env.lc(&lc)?;
            if spec.nics.iter().any(|n| n.name == name) {
                return Err(
                    super::BadInput(format!("LC {lc} already has a NIC named {name}")).into(),
                );
            }
            let nic = patchover_core::NicSpec {
                mac: mac
                    .unwrap_or_else(|| patchover_core::MacAddr::derive(&format!("{lc}/{name}"))),
                name,
                address,
                gateway: None,
                detached: false,
            };
            let port = env.backend.attach_nic(spec, &nic)?;
            if ctx.json {
                println!("{}", json!({"lc": lc, "nic": nic, "host_port": port}));
            } else {
                println!(
                    "{} plugged into {lc} as {} (host port {port})",
                    nic.mac, nic.name
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        LcCmd::Exec { lc, argv } => {
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

/// Waits for the agent when the image has one; returns how long that took.
fn wait_agent(
    env: &Env,
    spec: &LcSpec,
    no_wait: bool,
    timeout: u64,
) -> anyhow::Result<Option<u128>> {
    let has_agent = spec
        .system_disk
        .path
        .join("usr/sbin/patchover-agent")
        .exists();
    if no_wait || !has_agent {
        return Ok(None);
    }
    let start = Instant::now();
    env.backend
        .wait_agent(spec, Duration::from_secs(timeout))
        .with_context(|| {
            format!(
                "the LC runs but its agent did not answer; see its console log {}",
                env.backend.console_log(&spec.id).display()
            )
        })?;
    Ok(Some(start.elapsed().as_millis()))
}

fn report_boot(ctx: &Ctx, verb: &str, st: &LcStatus, start: Instant, agent_ms: Option<u128>) {
    let ms = start.elapsed().as_millis();
    if ctx.json {
        println!(
            "{}",
            json!({"lc": st.id, "state": st.state, "pid": st.pid, "took_ms": ms, "agent_ms": agent_ms, "host_ports": st.host_ports})
        );
    } else {
        let agent = agent_ms.map_or(String::new(), |a| format!(", agent up after {a} ms"));
        println!(
            "{} {verb}: init pid {}{agent} ({ms} ms in all)",
            st.id,
            st.pid.unwrap_or_default()
        );
    }
}

fn disk_text(d: Option<&DiskSpec>) -> String {
    d.map_or("-".to_owned(), |d| d.path.display().to_string())
}

/// One LC of the resource table with its state, as `lc list --json` and the API show it.
pub fn row_json(row: &patchover_store::LcRow, st: &LcStatus) -> serde_json::Value {
    json!({
        "id": row.spec.id,
        "backend": row.spec.backend,
        "cpu": row.spec.cpu.cpu,
        "cpu_share": row.spec.cpu.share_pct,
        "memory_mib": row.spec.memory_mib,
        "system_disk": row.spec.system_disk.path,
        "app_disk": row.spec.app_disk.as_ref().map(|d| &d.path),
        "nics": row.spec.nics,
        "role": row.role,
        "state": st.state,
        "pid": st.pid,
    })
}

fn list(env: &Env, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let rows = env.store.lcs()?;
    let mut out = Vec::new();
    for row in &rows {
        let st = env.backend.status(&row.spec)?;
        out.push((row, st));
    }
    if ctx.json {
        let v: Vec<_> = out.iter().map(|(row, st)| row_json(row, st)).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
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
    let table: Vec<Vec<String>> = out
        .iter()
        .map(|(row, st)| {
            let s = &row.spec;
            vec![
                s.id.to_string(),
                s.backend.to_string(),
                s.cpu.cpu.to_string(),
                format!("{}%", s.cpu.share_pct),
                format!("{} MiB", s.memory_mib),
                disk_text(Some(&s.system_disk)),
                disk_text(s.app_disk.as_ref()),
                s.nics
                    .iter()
                    .map(|n| match n.address {
                        Some(a) => format!("{} {a}", n.name),
                        None => n.name.clone(),
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                format!("{:?}", row.role).to_lowercase(),
                st.state.to_string(),
            ]
        })
        .collect();
    print!("{}", super::table(&header, &table));
    Ok(ExitCode::SUCCESS)
}

fn print_status(ctx: &Ctx, env: &Env, spec: &LcSpec, st: &LcStatus) {
    if ctx.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"spec": spec, "status": st})).expect("serializes")
        );
        return;
    }
    let mut lines = vec![
        ("id", spec.id.to_string()),
        ("backend", spec.backend.to_string()),
        ("state", st.state.to_string()),
        (
            "cpu",
            format!("CPU {} at {}%", spec.cpu.cpu, spec.cpu.share_pct),
        ),
        ("memory", format!("{} MiB", spec.memory_mib)),
        ("system disk", disk_text(Some(&spec.system_disk))),
    ];
    if let Some(d) = &spec.app_disk {
        lines.push((
            "app disk",
            format!("{} at {}", d.path.display(), d.mount.display()),
        ));
    }
    for n in &spec.nics {
        lines.push((
            "nic",
            format!(
                "{} {} {}",
                n.name,
                n.mac,
                n.address.map_or("-".to_owned(), |a| a.to_string())
            ),
        ));
    }
    if let Some(pid) = st.pid {
        lines.push(("init pid", pid.to_string()));
        lines.push(("processes", st.processes.to_string()));
        if let Some(u) = st.uptime_s {
            lines.push(("uptime", format!("{u:.1} s")));
        }
        if let Some(l) = &st.limits {
            lines.push((
                "kernel limits",
                format!(
                    "cpu quota {} / {} us, cpus {}, memory {}",
                    l.cpu_quota_us.map_or("max".to_owned(), |q| q.to_string()),
                    l.cpu_period_us,
                    l.cpus.as_deref().unwrap_or("-"),
                    l.memory_bytes
                        .map_or("max".to_owned(), |m| format!("{} MiB", m >> 20))
                ),
            ));
        }
        lines.push(("host ports", st.host_ports.join(", ")));
        lines.push((
            "console log",
            env.backend.console_log(&spec.id).display().to_string(),
        ));
    }
    for (k, v) in lines {
        println!("{k:>14}  {v}");
    }
}
