//! `patchover bench …`: each benchmark in its own file.

use std::process::ExitCode;

use clap::Subcommand;

use super::{Ctx, bench_copy, bench_cycle, bench_feed, bench_soak, bench_switch};

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Disk copy throughput, reflink, freeze windows (against `cp -a`).
    Copy(bench_copy::BenchArgs),
    /// Switchover under load in every mode (against stop-and-restart and a VRRP-style move).
    Switch(bench_switch::BenchArgs),
    /// The patch cycle split by step, and the orchestration overhead (goal < 1 s), against
    /// stop-patch-restart on one LC.
    Cycle(bench_cycle::BenchArgs),
    /// patch → rollback cycles under load, counting what each leaves on the host (fds, rules,
    /// conntrack, mounts, loops, cgroups, namespaces, veths, processes, files): every leak 0.
    Soak(bench_soak::BenchArgs),
    /// A 10,000-entry feed index verified, parsed and diffed with the patch table (goal < 100 ms).
    Feed(bench_feed::BenchArgs),
}

pub fn run(cmd: BenchCmd, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCmd::Copy(a) => bench_copy::run(a, ctx),
        BenchCmd::Switch(a) => bench_switch::run(a, ctx),
        BenchCmd::Feed(a) => bench_feed::run(a, ctx),
        BenchCmd::Cycle(a) => bench_cycle::run(a, ctx),
        BenchCmd::Soak(a) => bench_soak::run(a, ctx),
    }
}
