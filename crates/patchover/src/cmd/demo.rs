//! `patchover demo`: the whole story on this host in one command (see
//! `patchover_showcase::demo`): two LCs, the demo service v1.0.0 on one, a signed bundle that
//! upgrades it to v1.0.1, a client that reads and writes all along, the patch cycle in
//! between, and the report. `--service nginx`: Debian's nginx and its real pending updates,
//! patched and rolled back under wrk and the deadline client (`patchover_showcase::nginx`).

use std::path::PathBuf;
use std::process::ExitCode;

use patchover_core::BackendKind;
use patchover_net::Mode;
use patchover_showcase::demo::{DemoOptions, Service, parse_backend, parse_service};

use super::{BadInput, Ctx};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// The service: `demo` (the project's demo service on busybox LCs), `nginx` (Debian's
    /// nginx on Debian LCs, its real pending updates, wrk and the deadline client) or
    /// `postgres` (Debian's PostgreSQL 15 behind PgBouncer, pgbench `-c 8 -j 2 -M simple
    /// -T 60` and the set check; docs/postgres.md).
    #[arg(long, default_value = "demo", value_parser = parse_service)]
    pub service: Service,
    /// Where the demo keeps its config, disks, keys and state (wiped at the start). Default:
    /// /var/tmp/patchover-demo, or /var/tmp/patchover-demo-SERVICE.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The switch mode (default: readdress).
    #[arg(long, value_parser = |s: &str| s.parse::<Mode>())]
    pub mode: Option<Mode>,
    /// Read requests per second of the load (GET /version, new and keep-alive connections).
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Keep the LCs running after the demo (to look around with `patchover lc …`).
    #[arg(long)]
    pub keep: bool,
    /// How long the load runs, in seconds (the patch starts 2 s into it).
    #[arg(long, default_value_t = 30)]
    pub load_seconds: u64,
    /// The kind of LC: `ns` (namespaces) or `qemu` (VMs; TCG where KVM does not work).
    #[arg(long, default_value = "ns", value_parser = parse_backend)]
    pub backend: BackendKind,
    /// A request that takes this long counts as failed (default 2000 ms; 5000 ms on qemu,
    /// whose switch pause under TCG is 1–2 s: requests are held, not dropped).
    #[arg(long)]
    pub deadline_ms: Option<u64>,
    /// nginx: the archive of the updates, as an apt line "deb [signed-by=K] URI SUITE main"
    /// (repeatable). Default: the host's apt sources for the LC's suite, -updates, -security.
    #[arg(long)]
    pub source: Vec<String>,
    /// nginx: bundle every pending update of the LC, not only nginx's packages.
    #[arg(long)]
    pub all_updates: bool,
    /// nginx: patch → rollback cycles under load.
    #[arg(long, default_value_t = 1)]
    pub cycles: u32,
    /// nginx: connections of each wrk run (keep-alive, and Connection: close).
    #[arg(long, default_value_t = 4)]
    pub wrk_connections: u32,
    /// nginx: each wrk connection's pause between an answer and its next request, in ms, so
    /// the load leaves the machine room for the cycle (0: as fast as wrk can).
    #[arg(long, default_value_t = 2)]
    pub wrk_delay_ms: u32,
    /// The demo service: also write the run as one self-contained HTML page to FILE (its steps
    /// on a time line and every read of the load around the switch).
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
}

impl DemoArgs {
    /// The options, checked: what only a real service uses is refused for the demo service,
    /// and the archive lines are parsed, before anything is made.
    fn options(&self) -> Result<DemoOptions, patchover_app::AppError> {
        let real = self.service != Service::Demo;
        let only_real = [
            ("--source", !self.source.is_empty()),
            ("--all-updates", self.all_updates),
            ("--cycles", self.cycles != 1),
        ];
        if real && self.report.is_some() {
            return Err(BadInput(
                "--report is for the demo service (--service demo); nginx and postgres print their figures".into(),
            ));
        }
        if let Some(dir) = self.report.as_deref().and_then(|p| p.parent())
            && !dir.as_os_str().is_empty()
            && !dir.is_dir()
        {
            return Err(BadInput(format!(
                "--report: {} is not a directory; make it first",
                dir.display()
            )));
        }
        if let Some((flag, _)) = only_real.iter().find(|(_, set)| *set && !real) {
            return Err(BadInput(format!(
                "{flag} is for a real service (--service nginx); the demo service patches its own bundle once"
            )));
        }
        if self.service == Service::Postgres {
            let nginx_only = [
                ("--source", !self.source.is_empty()),
                ("--all-updates", self.all_updates),
            ];
            if let Some((flag, _)) = nginx_only.iter().find(|(_, set)| *set) {
                return Err(BadInput(format!(
                    "{flag} is for --service nginx; the postgres demo patches its own bundle"
                )));
            }
            if self.mode.is_some_and(|m| m != Mode::Readdress) {
                return Err(BadInput(
                    "--service postgres switches in readdress mode (its front is paused in a paused switch); leave --mode out".into(),
                ));
            }
        }
        if real && self.backend != BackendKind::Ns {
            return Err(BadInput(
                "--service nginx runs on ns LCs; leave --backend out".into(),
            ));
        }
        if self.cycles == 0 || self.wrk_connections == 0 {
            return Err(BadInput(
                "--cycles and --wrk-connections must be at least 1".into(),
            ));
        }
        let sources = self
            .source
            .iter()
            .map(|l| patchover_debian::sources::Source::parse_line(l))
            .collect::<Result<_, _>>()
            .map_err(|e| BadInput(format!("--source: {e}")))?;
        let dir = self.dir.clone().unwrap_or_else(|| match self.service {
            Service::Demo => PathBuf::from("/var/tmp/patchover-demo"),
            Service::Nginx => PathBuf::from("/var/tmp/patchover-demo-nginx"),
            Service::Postgres => PathBuf::from("/var/tmp/patchover-demo-postgres"),
        });
        Ok(DemoOptions {
            service: self.service,
            dir,
            mode: self.mode,
            rate: self.rate,
            keep: self.keep,
            load_seconds: self.load_seconds,
            backend: self.backend,
            deadline_ms: self.deadline_ms,
            sources,
            all_updates: self.all_updates,
            cycles: self.cycles,
            wrk_connections: self.wrk_connections,
            wrk_delay_ms: self.wrk_delay_ms,
            report: self.report.clone(),
        })
    }
}

pub fn run(a: DemoArgs, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let good = patchover_showcase::demo::run(a.options()?, ctx.json)?;
    Ok(if good {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
