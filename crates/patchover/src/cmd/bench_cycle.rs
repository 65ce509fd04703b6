//! `patchover bench cycle`: how long a patch cycle takes, step by step, and how much of it is
//! patchover's own doing, against stop-patch-restart (see `patchover_showcase::cycle`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use patchover_net::Mode;
use patchover_showcase::cycle::CycleOptions;

use super::Ctx;

#[derive(Args)]
pub struct BenchArgs {
    /// Patch cycles to run (they alternate between the two LCs).
    #[arg(long, default_value_t = 3)]
    pub cycles: u32,
    /// Stop-patch-restart baseline runs.
    #[arg(long, default_value_t = 3)]
    pub baseline_runs: u32,
    #[arg(long, default_value = "/var/tmp/patchover-bench-cycle")]
    pub dir: PathBuf,
    /// The kind of LC: `ns` or `qemu`.
    #[arg(long, default_value = "ns", value_parser = patchover_showcase::demo::parse_backend)]
    pub backend: patchover_core::BackendKind,
    /// The switch mode of the cycles: path, readdress or seamless (a hand-off).
    #[arg(long, default_value = "readdress", value_parser = |s: &str| s.parse::<Mode>())]
    pub mode: Mode,
}

impl BenchArgs {
    fn options(&self) -> CycleOptions {
        CycleOptions {
            cycles: self.cycles,
            baseline_runs: self.baseline_runs,
            dir: self.dir.clone(),
            backend: self.backend,
            mode: self.mode,
        }
    }
}

pub fn run(a: BenchArgs, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let good = patchover_showcase::cycle::run(a.options(), ctx.json)?;
    Ok(if good {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
