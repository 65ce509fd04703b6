//! `patchover monitor run-once | run | status`: the patch monitor (seed fig. 18–20).
//!
//! The logic lives in `patchover-monitor`, its operations in [`patchover_app::monitor`]
//! (config sections, store, round lock, the starter of approved patch cycles).
//!
//! `run-once` and `status` go through the daemon when one runs (see [`super::remote`]): both
//! paths call the same operations and one printer renders them.

use std::process::ExitCode;

use clap::Subcommand;
use patchover_app::monitor::{self, MonitorStatus};
use patchover_monitor::monitor::RunReport;

use super::Ctx;

#[derive(Subcommand)]
pub enum MonitorCmd {
    /// One round: poll the feeds, mail notices, read replies, act on genuine decisions.
    /// Exits 1 when a feed or the mailbox failed (for cron).
    RunOnce,
    /// Run rounds forever, one per [monitor] interval_secs.
    Run,
    /// The feeds' polling state and the approval challenges.
    Status,
}

/// An error with its causes on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    patchover_monitor::poll::chain(e)
}

/// A JSON value as text: strings as they are, null as `-`.
fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

fn items(v: &serde_json::Value) -> &[serde_json::Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// A round's report (the JSON of [`RunReport`]) as text.
fn print_report(r: &serde_json::Value) {
    for f in items(&r["feeds"]) {
        let status = match f["status"].as_str() {
            Some("backoff") => "backing off",
            Some("not-modified") => "not modified",
            Some("fetched") => "fetched",
            _ => "FAILED",
        };
        println!(
            "feed {}: {status}, {} listed, {} new",
            text(&f["feed"]),
            text(&f["listed"]),
            items(&f["registered"]).len()
        );
        for p in items(&f["registered"]) {
            println!(
                "  registered {} ({}, {})",
                text(&p["id"]),
                text(&p["category"]),
                text(&p["severity"])
            );
        }
        for x in items(&f["rejected"]) {
            println!(
                "  rejected {} [{}]: {}",
                text(&x["what"]),
                text(&x["reason"]),
                text(&x["detail"])
            );
        }
    }
    for n in items(&r["notices"]) {
        let patches: Vec<String> = items(&n["patches"]).iter().map(text).collect();
        match n["error"].as_str() {
            None => println!(
                "notice sent: challenge {} ({})",
                text(&n["challenge"]),
                patches.join(", ")
            ),
            Some(e) => println!("notice NOT sent: challenge {}: {e}", text(&n["challenge"])),
        }
    }
    if let Some(e) = r["mailbox_error"].as_str() {
        println!("mailbox FAILED: {e}");
    }
    for o in items(&r["replies"]) {
        let d = &o["decision"];
        if d.is_object() {
            let started: Vec<String> = items(&d["started"])
                .iter()
                .map(|h| text(&h["lc"]))
                .collect();
            println!(
                "reply {} from {}: {} on {} (started {})",
                text(&o["uid"]),
                text(&d["decided_by"]),
                text(&d["decision"]),
                text(&d["challenge"]),
                started.join(", ")
            );
        } else {
            println!(
                "reply {} rejected [{}]: {}",
                text(&o["uid"]),
                o["reason"].as_str().unwrap_or("?"),
                o["detail"].as_str().unwrap_or("")
            );
        }
    }
}

/// Whether a round's report says a feed or the mailbox failed (exit code 1, for cron).
fn round_failed(r: &serde_json::Value) -> bool {
    !r["mailbox_error"].is_null() || items(&r["feeds"]).iter().any(|f| f["status"] == "failed")
}

/// One monitor round: `monitor run-once`, `monitor run`, the daemon's
/// `POST /v1/monitor/run-once` and its interval loop.
pub fn round(ctx: &Ctx) -> anyhow::Result<RunReport> {
    Ok(monitor::round(ctx.config()?)?)
}

fn print_round(ctx: &Ctx, r: &serde_json::Value) {
    if ctx.json {
        println!("{r}");
    } else {
        print_report(r);
    }
}

pub fn run(cmd: MonitorCmd, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    match cmd {
        MonitorCmd::RunOnce => {
            let r = super::remote::route(
                ctx,
                |c| super::remote::call(c, "POST", "/v1/monitor/run-once", None),
                || Ok(serde_json::to_value(round(ctx)?)?),
            )?;
            print_round(ctx, &r);
            Ok(if round_failed(&r) {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        // The rounds of a daemon run in the daemon (`[daemon] monitor`); this loop is for
        // hosts without one.
        MonitorCmd::Run => loop {
            let interval = ctx.config()?.monitor()?.interval;
            print_round(ctx, &serde_json::to_value(round(ctx)?)?);
            std::thread::sleep(interval);
        },
        MonitorCmd::Status => {
            let v: MonitorStatus = super::remote::route_typed(
                ctx,
                |c| super::remote::call(c, "GET", "/v1/monitor", None),
                || Ok(monitor::status(ctx.config()?)?),
            )?;
            if ctx.json {
                println!("{}", serde_json::to_value(&v)?);
                return Ok(ExitCode::SUCCESS);
            }
            let rows: Vec<Vec<String>> = v
                .feeds
                .iter()
                .map(|f| {
                    let time = |t: Option<i64>, none: &str| {
                        t.map_or_else(|| none.to_owned(), patchover_monitor::index::rfc3339)
                    };
                    vec![
                        f.feed.clone(),
                        f.failures.to_string(),
                        time(f.index_generated_s, "-"),
                        match f.index_generated_s {
                            None => "-".to_owned(),
                            Some(_) => time(f.index_expires_s, "never"),
                        },
                        f.etag.clone().unwrap_or_default(),
                        f.last_error.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            print!(
                "{}",
                super::table(
                    &[
                        "feed",
                        "failures",
                        "index generated",
                        "index expires",
                        "etag",
                        "last error"
                    ],
                    &rows
                )
            );
            let rows: Vec<Vec<String>> = v
                .challenges
                .iter()
                .map(|c| {
                    vec![
                        c.id.clone(),
                        c.patches.join(","),
                        c.decision.clone().unwrap_or_else(|| "-".to_owned()),
                        c.failed_attempts.to_string(),
                    ]
                })
                .collect();
            print!(
                "{}",
                super::table(&["challenge", "patches", "decision", "failed"], &rows)
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
