//! `patchover load URL --rate R --duration D`: open-model constant-rate HTTP load with a deadline
//! on every request; exits 1 if any request failed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use patchover_load::{ConnMode, LoadConfig, parse_duration};

use super::{BadInput, Ctx};

#[derive(Args)]
pub struct LoadArgs {
    /// `http://host:port/path`.
    pub url: String,
    /// Requests per second, sent on schedule whatever the answers do.
    #[arg(long)]
    pub rate: f64,
    /// How long to send, e.g. `10s`, `500ms`, `2m`.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Duration,
    /// `new` (a connection per request), `keepalive` or `mixed`.
    #[arg(long, default_value = "new", value_parser = |s: &str| s.parse::<ConnMode>())]
    pub connections: ConnMode,
    /// A request without a complete answer this long after it was due counts as a timeout.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub deadline: Duration,
    /// Run the clients inside this network namespace (e.g. /run/netns/client).
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// Print the per-second timeline too (always in --json).
    #[arg(long)]
    pub timeline: bool,
}

pub fn run(args: LoadArgs, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let mut cfg = LoadConfig::for_url(&args.url, args.rate, args.duration, args.connections)
        .map_err(|e| BadInput(e.to_string()))?;
    cfg.deadline = args.deadline;
    cfg.netns = args.netns;
    let report = patchover_load::run(&cfg).map_err(|e| match e {
        patchover_load::LoadError::Setting(_) | patchover_load::LoadError::Url { .. } => {
            anyhow::Error::from(BadInput(e.to_string()))
        }
        e => e.into(),
    })?;
    let s = &report.summary;
    if ctx.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} requests at {:.0}/s for {:.1} s ({:?}): {} ok, {} failed (refused {}, reset {}, timeout {}, 5xx {}, other {}), {} retried on a new connection",
            s.total,
            report.rate,
            report.duration_s,
            args.connections,
            s.ok,
            s.failed_total,
            s.failed.refused,
            s.failed.reset,
            s.failed.timeout,
            s.failed.status_5xx,
            s.failed.other,
            s.retried
        );
        println!(
            "latency p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms  (generator lag max {:.2} ms)",
            s.latency.p50_ms,
            s.latency.p99_ms,
            s.latency.p999_ms,
            s.latency.max_ms,
            report.max_send_lag_ms
        );
        if args.timeline {
            let rows: Vec<Vec<String>> = report
                .timeline
                .iter()
                .map(|t| {
                    vec![
                        t.second.to_string(),
                        t.sent.to_string(),
                        t.ok.to_string(),
                        t.failed.to_string(),
                        format!("{:.2}", t.p99_ms),
                        format!("{:.2}", t.max_ms),
                    ]
                })
                .collect();
            print!(
                "{}",
                super::table(
                    &["second", "sent", "ok", "failed", "p99 ms", "max ms"],
                    &rows
                )
            );
        }
    }
    Ok(if s.failed_total == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
