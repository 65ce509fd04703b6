//! `patchover demo`: the whole story on this host in one command (see
//! `patchover_showcase::demo`): two LCs, the demo service v1.0.0 on one, a signed bundle that
//! upgrades it to v1.0.1, a client that reads and writes all along, the patch cycle in
//! between, and the report.

use std::path::PathBuf;
use std::process::ExitCode;

use patchover_core::BackendKind;
use patchover_net::Mode;
use patchover_showcase::demo::{DemoOptions, parse_backend};

use super::Ctx;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Where the demo keeps its config, disks, keys and state (wiped at the start).
    #[arg(long, default_value = "/var/tmp/patchover-demo")]
    pub dir: PathBuf,
    #[arg(long, default_value = "readdress", value_parser = |s: &str| s.parse::<Mode>())]
    pub mode: Mode,
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
}

impl DemoArgs {
    fn options(&self) -> DemoOptions {
        DemoOptions {
            dir: self.dir.clone(),
            mode: self.mode,
            rate: self.rate,
            keep: self.keep,
            load_seconds: self.load_seconds,
            backend: self.backend,
            deadline_ms: self.deadline_ms,
        }
    }
}

pub fn run(a: DemoArgs, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let good = patchover_showcase::demo::run(a.options(), ctx.json)?;
    Ok(if good {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
