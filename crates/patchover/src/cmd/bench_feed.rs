//! `patchover bench feed`: the feed index goal of issue 7 (a 10,000-entry index verified,
//! parsed and compared with the patch table in < 100 ms), against a bare JSON parse of the
//! same bytes measured in the same run. The work is `patchover_monitor::bench::feed_index`.

use std::process::ExitCode;

use clap::Args;

use super::Ctx;

#[derive(Args)]
pub struct BenchArgs {
    /// Entries in the index.
    #[arg(long, default_value_t = 10_000)]
    entries: usize,
    /// How many of them the patch table already has.
    #[arg(long, default_value_t = 5_000)]
    known: usize,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 7)]
    runs: usize,
}

pub fn run(a: BenchArgs, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let b = patchover_monitor::bench::feed_index(a.entries, a.known, a.runs)?;
    if ctx.json {
        println!("{}", serde_json::to_string(&b)?);
    } else {
        println!(
            "feed index: {} entries ({} KiB), {} in the patch table, {} new",
            b.entries,
            b.index_bytes / 1024,
            b.known,
            b.new
        );
        println!(
            "  verify signature + parse + validate + diff with the table: {:.1} ms (goal < {} ms: {})",
            b.verify_parse_diff_ms,
            b.goal_ms,
            if b.met { "met" } else { "MISSED" }
        );
        println!(
            "  baseline, bare JSON parse of the same bytes:               {:.1} ms",
            b.baseline_bare_json_ms
        );
        if cfg!(debug_assertions) {
            println!("  (a debug build: measure with a release build)");
        }
    }
    Ok(if b.met {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
