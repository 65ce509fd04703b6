//! `patchover bench soak`: patch → rollback cycles under load, and after each cycle a census of
//! what patchover leaves on the host (see `patchover_showcase::soak`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use patchover_core::BackendKind;
use patchover_net::Mode;
use patchover_showcase::soak::SoakOptions;

use super::Ctx;

#[derive(Args)]
pub struct BenchArgs {
    /// patch → rollback cycles.
    #[arg(long, default_value_t = 50)]
    pub cycles: u32,
    /// The switch mode of every patch and rollback.
    #[arg(long, default_value = "readdress", value_parser = |s: &str| s.parse::<Mode>())]
    pub mode: Mode,
    /// The kind of LC: `ns` or `qemu`.
    #[arg(long, default_value = "ns", value_parser = patchover_showcase::demo::parse_backend)]
    pub backend: BackendKind,
    #[arg(long, default_value = "/var/tmp/patchover-bench-soak")]
    pub dir: PathBuf,
    /// A request slower than this fails (default 2000 ms on ns, 5000 ms on qemu).
    #[arg(long)]
    pub deadline_ms: Option<u64>,
}

impl BenchArgs {
    fn options(&self) -> SoakOptions {
        SoakOptions {
            cycles: self.cycles,
            mode: self.mode,
            backend: self.backend,
            dir: self.dir.clone(),
            deadline_ms: self.deadline_ms,
        }
    }
}

pub fn run(a: BenchArgs, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let good = patchover_showcase::soak::run(a.options(), ctx.json)?;
    Ok(if good {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
