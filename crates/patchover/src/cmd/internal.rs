//! `patchover internal …`: hidden verbs that patchover runs as fresh single-threaded
//! processes to create and enter LC namespaces (see `patchover_lc::ns::launch`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use patchover_lc::ns::launch;

#[derive(Subcommand)]
pub enum InternalCmd {
    /// Create an LC's namespaces and init (protocol on stdin/stdout).
    Launch,
    /// Run a program inside a running LC.
    Exec {
        #[arg(long)]
        pid: i32,
        #[arg(long = "cgroup-procs")]
        cgroup_procs: Vec<PathBuf>,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Configure NICs inside an LC's network namespace.
    Netcfg {
        #[arg(long)]
        pid: i32,
        #[arg(long)]
        nics: String,
    },
    /// Announce an address again later (gratuitous ARP), detached from the run that moved it.
    GarpRefresh {
        /// The LC's network namespace (`ns` LCs).
        #[arg(long, required_unless_present = "agent", conflicts_with = "agent")]
        netns: Option<PathBuf>,
        /// The LC's agent channel (`qemu` LCs).
        #[arg(long)]
        agent: Option<PathBuf>,
        #[arg(long)]
        iface: String,
        #[arg(long)]
        mac: patchover_core::MacAddr,
        #[arg(long)]
        ip: std::net::Ipv4Addr,
        #[arg(long, default_value_t = 3)]
        count: u32,
        /// Milliseconds after the start, comma-separated.
        #[arg(long, value_delimiter = ',')]
        after_ms: Vec<u64>,
    },
    /// Recover the run at once if the patchover that armed this guard dies (`PATCHOVER_CONFIG`
    /// names the config).
    RunGuard,
    /// Thaw a cgroup if patchover dies while it is frozen.
    ThawGuard {
        #[arg(long)]
        file: PathBuf,
        #[arg(long)]
        value: String,
    },
    /// Mount a host directory into a running LC.
    AttachDisk {
        #[arg(long)]
        pid: i32,
        #[arg(long)]
        source: PathBuf,
        #[arg(long)]
        target: PathBuf,
        /// The source is an image: loop-mount it here on the host first, then move that mount.
        #[arg(long)]
        image_staging: Option<PathBuf>,
    },
}

pub fn run(cmd: InternalCmd) -> anyhow::Result<ExitCode> {
    let code = match cmd {
        InternalCmd::Launch => launch::launch_main(),
        InternalCmd::Exec {
            pid,
            cgroup_procs,
            argv,
        } => launch::exec_main(pid, &cgroup_procs, &argv).map_err(anyhow::Error::msg)?,
        InternalCmd::Netcfg { pid, nics } => {
            let nics: Vec<launch::NicSetup> = serde_json::from_str(&nics)?;
            launch::netcfg_main(pid, &nics).map_err(anyhow::Error::msg)?;
            0
        }
        InternalCmd::GarpRefresh {
            netns,
            agent,
            iface,
            mac,
            ip,
            count,
            after_ms,
        } => {
            patchover_net::refresh::Refresh::from_args(
                netns, agent, iface, mac, ip, count, &after_ms,
            )?
            .run()?;
            0
        }
        InternalCmd::RunGuard => {
            use std::io::{BufRead, Write};
            let mut out = std::io::stdout();
            writeln!(out, "armed")?;
            out.flush()?;
            let mut line = String::new();
            let _ = std::io::stdin().lock().read_line(&mut line);
            if line.trim() == "disarm" {
                return Ok(ExitCode::SUCCESS);
            }
            // The run's process died: its run lock is free now; recover.
            tracing::info!("the patch run's process ended without disarming its guard; recovering");
            let config = std::env::var_os("PATCHOVER_CONFIG")
                .map(std::path::PathBuf::from)
                .ok_or_else(|| anyhow::anyhow!("PATCHOVER_CONFIG is not set"))?;
            let ctx = super::Ctx {
                config_path: config,
                json: true,
                quiet: true,
                direct: true,
            };
            super::patch::run_runs(super::patch::RunsCmd::Recover, &ctx)?;
            0
        }
        InternalCmd::ThawGuard { file, value } => launch::thaw_guard_main(&file, &value),
        InternalCmd::AttachDisk {
            pid,
            source,
            target,
            image_staging,
        } => {
            launch::attach_main(pid, &source, &target, image_staging.as_deref())
                .map_err(anyhow::Error::msg)?;
            0
        }
    };
    Ok(ExitCode::from(
        u8::try_from(code.clamp(0, 255)).unwrap_or(1),
    ))
}
