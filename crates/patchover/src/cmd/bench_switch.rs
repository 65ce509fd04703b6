//! `patchover bench switch`: every switch mode under load, against stop-and-restart and a
//! VRRP-style address move, in namespaces it creates and removes itself.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use patchover_load::{ConnMode, parse_duration};
use patchover_net::Mode;
use patchover_netbed::bench::{BenchConfig, CaseResult, PAUSE_P99_GOAL_MS};

use super::Ctx;

#[derive(Args)]
pub struct BenchArgs {
    /// Requests per second.
    #[arg(long, default_value_t = 5000.0)]
    pub rate: f64,
    /// Switchovers per mode and connection kind.
    #[arg(long, default_value_t = 20)]
    pub switches: usize,
    /// Time between switchovers.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub gap: Duration,
    /// Modes to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "path,readdress,seamless", value_parser = |s: &str| s.parse::<Mode>())]
    pub modes: Vec<Mode>,
    /// Client kinds, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "new,keepalive,mixed", value_parser = |s: &str| s.parse::<ConnMode>())]
    pub connections: Vec<ConnMode>,
    /// Skip the stop-restart and address-move baselines.
    #[arg(long)]
    pub no_baselines: bool,
    /// Downtime of the stop-restart baseline ("patching").
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub patch_time: Duration,
    /// Switches of each baseline.
    #[arg(long, default_value_t = 5)]
    pub baseline_switches: usize,
}

fn row(r: &CaseResult) -> Vec<String> {
    vec![
        r.case.clone(),
        format!("{:?}", r.connections).to_lowercase(),
        r.switches.to_string(),
        format!("{}/{}", r.failed, r.total),
        r.retried.to_string(),
        format!(
            "{:.2}/{:.2}/{:.2}",
            r.steady.p50_ms, r.steady.p99_ms, r.steady.p999_ms
        ),
        format!(
            "{:.2}/{:.2}/{:.2}",
            r.window.p50_ms, r.window.p99_ms, r.window.p999_ms
        ),
        format!(
            "{:.1}/{:.1}/{:.1}",
            r.pause_ms.p50, r.pause_ms.p99, r.pause_ms.max
        ),
        format!(
            "{:.1}/{:.1}",
            r.first_request_ms.p50, r.first_request_ms.max
        ),
        format!("{:.1}/{:.1}", r.outage_ms.p50, r.outage_ms.max),
    ]
}

/// One line per phase of a case's switches (empty for the baselines, which have none).
fn phase_rows(r: &CaseResult) -> Vec<Vec<String>> {
    r.phases
        .iter()
        .map(|p| {
            vec![
                r.case.clone(),
                format!("{:?}", r.connections).to_lowercase(),
                p.name.clone(),
                format!("{:.2}/{:.2}/{:.2}", p.ms.p50, p.ms.p99, p.ms.max),
            ]
        })
        .collect()
}

const PHASE_HEADER: [&str; 4] = ["case", "clients", "phase", "p50/p99/max ms"];

/// The goal line of a paused mode's case: its pause p99 against the goal, met or missed.
fn goal_line(r: &CaseResult) -> Option<String> {
    let met = r.pause_goal_met()?;
    Some(format!(
        "{} {}: pause p99 {:.1} ms over {} switches, {} failed (goal: p99 <= {} ms, 0 failed): {}",
        r.case,
        format!("{:?}", r.connections).to_lowercase(),
        r.pause_ms.p99,
        r.switches,
        r.failed,
        PAUSE_P99_GOAL_MS,
        if met { "met" } else { "MISSED" }
    ))
}

const HEADER: [&str; 10] = [
    "case",
    "clients",
    "switches",
    "failed/total",
    "retried",
    "steady p50/p99/p99.9 ms",
    "window p50/p99/p99.9 ms",
    "pause p50/p99/max ms",
    "first req p50/max ms",
    "no-answer gap p50/max ms",
];

pub fn run(args: BenchArgs, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let cfg = BenchConfig {
        rate: args.rate,
        switches: args.switches,
        gap: args.gap,
        modes: args.modes,
        connections: args.connections,
        baselines: !args.no_baselines,
        patch_time: args.patch_time,
        baseline_switches: args.baseline_switches,
        ..BenchConfig::default()
    };
    let json = ctx.json;
    let mut progress = |r: &CaseResult| {
        if !json {
            eprint!("{}", super::table(&HEADER, &[row(r)]));
        }
    };
    let results = patchover_netbed::bench::run(&cfg, &mut progress)?;
    let goals: Vec<serde_json::Value> = results
        .iter()
        .filter_map(|r| {
            Some(serde_json::json!({
                "case": r.case, "connections": r.connections, "pause_p99_ms": r.pause_ms.p99,
                "goal_ms": PAUSE_P99_GOAL_MS, "failed": r.failed, "met": r.pause_goal_met()?,
            }))
        })
        .collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"config": cfg, "results": results, "goals": goals})
            )?
        );
    } else {
        let rows: Vec<Vec<String>> = results.iter().map(row).collect();
        print!("{}", super::table(&HEADER, &rows));
        let phases: Vec<Vec<String>> = results.iter().flat_map(phase_rows).collect();
        print!("{}", super::table(&PHASE_HEADER, &phases));
        for line in results.iter().filter_map(goal_line) {
            println!("{line}");
        }
    }
    let modes_failed = results
        .iter()
        .any(|r| r.failed > 0 && r.case.parse::<Mode>().is_ok());
    Ok(if modes_failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
