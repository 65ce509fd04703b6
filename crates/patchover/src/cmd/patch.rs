//! `patchover patch`, `patchover rollback`, `patchover runs …`, `patchover service assign`:
//! the patch execution program (seed fig. 2, 7) and its journal.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use patchover_app::runs::{self, RunDetail};
use patchover_app::service::{self, Assigned};
use patchover_bundle::BundlesConfig;
use patchover_net::Mode;
use patchover_orchestrator::{
    Event, Orchestrator, OrchestratorError, PatchRequest, RunLock, RunReport, Settings,
};
use patchover_store::{Role, RunRow};
use serde_json::json;

use super::runview::RunView;
use super::{BadInput, Ctx, Env};
use patchover_orchestrator::progress::{ProgressSink, no_progress};

#[derive(clap::Args)]
pub struct PatchArgs {
    /// The active LC, the one whose service is patched.
    pub lc: String,
    /// Apply these patches (default: every patch marked for the next run).
    #[arg(long = "bundle")]
    pub bundles: Vec<String>,
    /// How the network moves to the patched LC.
    #[arg(long, default_value = "readdress", value_parser = |s: &str| s.parse::<Mode>())]
    pub mode: Mode,
    /// Stop before the switch, with the patched standby running and a report.
    #[arg(long)]
    pub dry_run: bool,
    /// How long the standby may take to apply the patches, in seconds.
    #[arg(long, default_value_t = 300)]
    pub report_timeout: u64,
}

#[derive(clap::Args)]
pub struct RollbackArgs {
    /// The LC to hand the service back to (the old LC an earlier run kept).
    pub lc: String,
    #[arg(long, default_value = "readdress", value_parser = |s: &str| s.parse::<Mode>())]
    pub mode: Mode,
}

#[derive(Subcommand)]
pub enum RunsCmd {
    /// Every patch run with its outcome.
    List,
    /// One run's timeline: every step with its duration.
    Show {
        run: i64,
        /// Also write the run as one self-contained HTML page to FILE: its steps on a time
        /// line, the switch marked.
        #[arg(long, value_name = "FILE")]
        html: Option<std::path::PathBuf>,
    },
    /// Finish or roll back runs whose patchover died (also done before every patch).
    Recover,
    /// Follow a run's steps live (from the daemon's event stream) until it ends.
    Watch { run: i64 },
}

#[derive(Subcommand)]
pub enum ServiceCmd {
    /// Give LC the service address (the first time; later the switches move it) and make it
    /// the active LC.
    Assign { lc: String },
}

pub fn settings_for(env: &Env, report_timeout: u64) -> anyhow::Result<Settings> {
    let bundles = BundlesConfig::from_section(&env.config.bundles);
    Ok(Settings {
        service: env.config.service.clone(),
        agent_binary: patchover_image::guest_binary("patchover-agent")?,
        trusted_keys: bundles.trusted_keys,
        scoped_keys: bundles.scoped_keys,
        bundle_limits: bundles.limits,
        yara_rules: env.config.yara.as_ref().map(|y| y.rules.clone()),
        report_timeout: Duration::from_secs(report_timeout),
        drain_deadline: Duration::from_secs(10),
        garp: patchover_net::GarpConfig::default(),
        refresher: std::env::current_exe().ok(),
        guard: std::env::current_exe()
            .ok()
            .map(|exe| (exe, env.config.path.clone())),
    })
}

fn print_report(ctx: &Ctx, r: &RunReport) {
    print_report_json(ctx, &serde_json::to_value(r).expect("report serializes"));
}

/// Prints a run report (a `RunReport` as JSON: from this process or from the daemon).
fn print_report_json(ctx: &Ctx, r: &serde_json::Value) {
    if ctx.json {
        println!(
            "{}",
            serde_json::to_string_pretty(r).expect("report serializes")
        );
        return;
    }
    let s = |k: &str| r[k].as_str().unwrap_or("-").to_owned();
    let ms = |k: &str| r[k].as_f64().map_or("-".into(), |v| format!("{v:.1}"));
    println!(
        "run {} on {}: {} (standby {}, mode {})",
        r["run_id"],
        s("lc"),
        s("outcome"),
        s("standby"),
        s("mode")
    );
    for p in r["patches"].as_array().into_iter().flatten() {
        println!(
            "  patch {:<24} {}",
            p["id"].as_str().unwrap_or("?"),
            p["status"].as_str().unwrap_or("?")
        );
    }
    if let (Some(b), Some(a)) = (r["version_before"].as_str(), r["version_after"].as_str()) {
        println!("  version {b} -> {a}");
    }
    println!(
        "  copied {} bytes, replayed {} bytes; freeze {} ms; pause {} ms",
        r["bytes_copied"],
        r["bytes_replayed"],
        ms("freeze_ms"),
        ms("pause_ms")
    );
    if let Ok(sw) = serde_json::from_value::<patchover_net::SwitchReport>(r["switch"].clone())
        && !sw.phases.is_empty()
    {
        println!("  switch phases: {}", sw.phases_line());
    }
    let st = &r["stateless"];
    if st.is_object() {
        let writes = |k: &str| match &st[k] {
            w if w.is_object() => format!("{} {}", w["count"], w["unit"].as_str().unwrap_or("")),
            _ => "no application disk".into(),
        };
        println!(
            "  stateless: old LC served its flows {} ms after the switch, {} connections cut; disk writes before {}, after {}",
            st["old_lc_served_ms"]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:.0}")),
            st["connections_cut"],
            writes("writes_before_switch"),
            writes("writes_after_switch")
        );
    }
    if let Some(e) = r["error"].as_str() {
        println!("  error: {e}");
    }
    if let Some(h) = r["hint"].as_str() {
        println!("  what to do: {h}");
    }
}

use super::remote::client_error;

/// Hands the run to the daemon (`POST path`), follows it, prints its report.
fn via_daemon(
    ctx: &Ctx,
    c: &patchover_daemon::client::Client,
    path: &str,
    body: serde_json::Value,
) -> anyhow::Result<ExitCode> {
    let started = c.call("POST", path, Some(&body)).map_err(client_error)?;
    let run = started["run_id"]
        .as_i64()
        .ok_or_else(|| anyhow::anyhow!("the daemon's answer has no run_id: {started}"))?;
    if !ctx.json {
        eprintln!("run {run} started by the daemon");
    }
    watch(ctx, c, run)?;
    let r = c
        .call("GET", &format!("/v1/runs/{run}"), None)
        .map_err(client_error)?;
    let report = &r["run"]["report"];
    print_report_json(ctx, report);
    Ok(match report["outcome"].as_str() {
        Some("ok") | Some("dry-run") => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    })
}

/// Follows `run` on the event stream until it ends, showing its steps and copies as a run in
/// this process shows them ([`RunView`]).
fn watch(ctx: &Ctx, c: &patchover_daemon::client::Client, run: i64) -> anyhow::Result<()> {
    let view = RunView::new(ctx);
    // Subscribed first, then asked whether the run already ended, so no end is missed.
    let still_going = || {
        c.call("GET", &format!("/v1/runs/{run}"), None)
            .map(|r| !r["run"]["ended_ms"].is_i64())
    };
    let r = c.events(still_going, |kind, e| {
        if e["run_id"].as_i64() != Some(run) {
            return true;
        }
        view.streamed(kind, e);
        kind != "run"
    });
    view.finish();
    r.map_err(client_error)
}

/// Runs the orchestrator for a patch or a rollback, with the run lock and recovery first:
/// the one code path of `patchover patch`, `patchover rollback` and the daemon's runs.
/// `Err` when the request is refused before any run is opened (nothing changed); otherwise
/// the run's report, successful or not.
pub fn execute(
    ctx: &Ctx,
    req: &PatchRequest,
    report_timeout: u64,
    events: &mut dyn FnMut(&Event),
    progress: ProgressSink,
) -> anyhow::Result<Result<RunReport, patchover_orchestrator::RunFailed>> {
    let mut env = ctx.env()?;
    env.lc(&req.lc)?;
    let settings = settings_for(&env, report_timeout)?;
    let _lock =
        RunLock::acquire(&env.config.run_dir, &req.lc).map_err(|e| BadInput(e.to_string()))?;
    let mut o = Orchestrator {
        config: &env.config,
        store: &mut env.store,
        backend: &env.backend,
        settings: &settings,
        events,
        progress,
    };
    // A run this LC's lock covered but whose patchover died is dealt with first.
    drop(_lock);
    for r in patchover_orchestrator::recover(&mut o)? {
        tracing::warn!(
            run = r.run_id,
            outcome = %r.outcome,
            error = r.error.as_deref().unwrap_or(""),
            "recovered an unfinished run"
        );
        if !ctx.quiet {
            eprintln!(
                "recovered run {}: {}",
                r.run_id,
                r.error.as_deref().unwrap_or(&r.outcome)
            );
        }
    }
    let _lock =
        RunLock::acquire(&env.config.run_dir, &req.lc).map_err(|e| BadInput(e.to_string()))?;
    Ok(o.patch(req))
}

fn drive(ctx: &Ctx, req: PatchRequest, report_timeout: u64) -> anyhow::Result<ExitCode> {
    let view = RunView::new(ctx);
    let mut events = |e: &Event| view.step(e);
    let ran = execute(ctx, &req, report_timeout, &mut events, view.sink());
    view.finish();
    match ran? {
        Ok(r) => {
            print_report(ctx, &r);
            Ok(ExitCode::SUCCESS)
        }
        Err(f) => {
            print_report(ctx, &f.report);
            // A run refused as asked (bad input, or another run of the LC still going) is the
            // request's error (exit 2); a run that went and failed reports itself (exit 1),
            // and its report is the one JSON document on stdout.
            if matches!(
                f.error,
                OrchestratorError::BadInput(_) | OrchestratorError::Conflict(_)
            ) {
                return Err(BadInput(patchover_orchestrator::chain(&f.error)).into());
            }
            Ok(ExitCode::from(1))
        }
    }
}

/// The LC a rollback to `to` starts from: the active one.
pub fn rollback_request(ctx: &Ctx, to: &str, mode: Mode) -> anyhow::Result<PatchRequest> {
    let env = ctx.env()?;
    env.lc(to)?;
    let active = env
        .store
        .lcs()?
        .into_iter()
        .find(|r| r.role == Role::Active)
        .ok_or_else(|| BadInput("no LC is active; nothing to roll back".into()))?;
    Ok(PatchRequest {
        lc: active.spec.id.to_string(),
        bundles: Vec::new(),
        mode,
        dry_run: false,
        rollback_to: Some(to.to_owned()),
    })
}

pub fn run_patch(a: PatchArgs, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    if let Some(c) = super::remote::daemon(ctx)? {
        return via_daemon(
            ctx,
            &c,
            "/v1/runs",
            json!({
                "lc": a.lc,
                "bundles": a.bundles,
                "mode": a.mode.to_string(),
                "dry_run": a.dry_run,
                "report_timeout": a.report_timeout,
            }),
        );
    }
    drive(
        ctx,
        PatchRequest {
            lc: a.lc,
            bundles: a.bundles,
            mode: a.mode,
            dry_run: a.dry_run,
            rollback_to: None,
        },
        a.report_timeout,
    )
}

pub fn run_rollback(a: RollbackArgs, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    if let Some(c) = super::remote::daemon(ctx)? {
        return via_daemon(
            ctx,
            &c,
            "/v1/rollback",
            json!({"lc": a.lc, "mode": a.mode.to_string()}),
        );
    }
    let req = rollback_request(ctx, &a.lc, a.mode)?;
    drive(ctx, req, 60)
}

/// A typed value as table text, as its JSON shows it: strings as they are, null as `-`.
fn text<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v).unwrap_or_default() {
        serde_json::Value::Null => "-".to_owned(),
        serde_json::Value::String(s) => s,
        v => v.to_string(),
    }
}

fn print_runs(ctx: &Ctx, runs: &[RunRow]) -> anyhow::Result<()> {
    if ctx.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::to_value(runs)?)?
        );
        return Ok(());
    }
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.lc.clone(),
                text(&r.standby),
                r.mode.clone(),
                if r.dry_run { "yes" } else { "no" }.into(),
                r.state.clone(),
                r.outcome.as_deref().unwrap_or("running").to_owned(),
                match r.ended_ms {
                    Some(e) => format!("{:.1} s", (e - r.started_ms) as f64 / 1000.0),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    print!(
        "{}",
        super::table(
            &[
                "RUN",
                "LC",
                "STANDBY",
                "MODE",
                "DRY RUN",
                "LAST STEP",
                "OUTCOME",
                "TOOK"
            ],
            &rows
        )
    );
    Ok(())
}

fn print_run(ctx: &Ctx, v: &RunDetail) -> anyhow::Result<()> {
    if ctx.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::to_value(v)?)?
        );
        return Ok(());
    }
    let r = &v.run;
    println!(
        "run {} on {} (standby {}, mode {}): {}",
        r.id,
        r.lc,
        text(&r.standby),
        r.mode,
        r.outcome.as_deref().unwrap_or("running")
    );
    let run_start = r.started_ms;
    let mut started = std::collections::HashMap::new();
    let rows: Vec<Vec<String>> = v
        .steps
        .iter()
        .filter_map(|s| {
            let step = s.step.clone();
            let at = s.at_ms;
            if s.state == "started" {
                started.insert(step, at);
                return None;
            }
            let took = started
                .get(&step)
                .map_or("-".into(), |t| format!("{} ms", at - t));
            let error = s
                .detail
                .as_ref()
                .and_then(|d| d.get("error"))
                .and_then(|e| e.as_str())
                .unwrap_or("");
            Some(vec![
                format!("+{} ms", at - run_start),
                step,
                s.state.clone(),
                took,
                error.to_owned(),
            ])
        })
        .collect();
    print!(
        "{}",
        super::table(&["AT", "STEP", "STATE", "TOOK", "ERROR"], &rows)
    );
    // Where each switch's time went (issue 26), as `patch` prints it.
    for s in v.steps.iter().filter(|s| s.state == "done") {
        if let Some(d) = &s.detail
            && let Ok(sw) = serde_json::from_value::<patchover_net::SwitchReport>(d.clone())
            && !sw.phases.is_empty()
        {
            println!(
                "{} phases (pause {:.1} ms): {}",
                s.step,
                sw.pause_ms,
                sw.phases_line()
            );
        }
    }
    Ok(())
}

/// `runs show RUN --html FILE`: the run's page (no load: the time line only).
fn write_html(ctx: &Ctx, v: &RunDetail, path: &std::path::Path) -> anyhow::Result<()> {
    let page = patchover_report::page(v, None)?;
    patchover_report::write(path, &page).with_context(|| {
        format!(
            "writing {}; check the directory exists and is writable",
            path.display()
        )
    })?;
    if ctx.json {
        println!("{}", json!({"run": v.run.id, "html": path}));
    } else if !ctx.quiet {
        println!("run {}: wrote {}", v.run.id, path.display());
    }
    Ok(())
}

pub fn run_runs(cmd: RunsCmd, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    match cmd {
        RunsCmd::List => {
            let v: Vec<RunRow> = super::remote::route_typed(
                ctx,
                |c| super::remote::call(c, "GET", "/v1/runs", None),
                || Ok(runs::list(&ctx.env()?.store)?),
            )?;
            print_runs(ctx, &v)?;
        }
        RunsCmd::Show { run, html } => {
            let v: RunDetail = super::remote::route_typed(
                ctx,
                |c| super::remote::call(c, "GET", &format!("/v1/runs/{run}"), None),
                || Ok(runs::show(&ctx.env()?.store, run)?),
            )?;
            match html {
                Some(path) => write_html(ctx, &v, &path)?,
                None => print_run(ctx, &v)?,
            }
        }
        RunsCmd::Watch { run } => {
            let c = super::remote::daemon(&Ctx {
                direct: false,
                ..ctx.clone()
            })?
            .ok_or_else(|| {
                BadInput(
                    "no daemon is running; `patchover runs show RUN` shows a run's steps".into(),
                )
            })?;
            watch(ctx, &c, run)?;
            let r = c
                .call("GET", &format!("/v1/runs/{run}"), None)
                .map_err(client_error)?;
            if ctx.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "run {run}: {}",
                    r["run"]["outcome"].as_str().unwrap_or("running")
                );
            }
        }
        RunsCmd::Recover => {
            let v = super::remote::route(
                ctx,
                |c| super::remote::call(c, "POST", "/v1/runs/recover", None),
                || {
                    let view = RunView::new(ctx);
                    let recovered = recover_runs(ctx, &mut |e: &Event| view.step(e));
                    view.finish();
                    Ok(serde_json::to_value(recovered?)?)
                },
            )?;
            if ctx.quiet {
            } else if ctx.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if v.as_array().is_none_or(Vec::is_empty) {
                println!("no unfinished run to recover");
            } else {
                for r in v.as_array().map(Vec::as_slice).unwrap_or_default() {
                    let what = r["error"].as_str().or(r["outcome"].as_str());
                    println!("run {}: {}", r["run_id"], what.unwrap_or("-"));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Finishes or rolls back the runs whose patchover died (a run another live patchover holds
/// is left alone): `runs recover` and `POST /v1/runs/recover`. The reports of the runs dealt
/// with (their JSON is the verb's and the route's answer).
pub fn recover_runs(ctx: &Ctx, events: &mut dyn FnMut(&Event)) -> anyhow::Result<Vec<RunReport>> {
    let mut env = ctx.env()?;
    let settings = settings_for(&env, 60)?;
    let mut o = Orchestrator {
        config: &env.config,
        store: &mut env.store,
        backend: &env.backend,
        settings: &settings,
        events,
        progress: no_progress(),
    };
    Ok(patchover_orchestrator::recover(&mut o)?)
}

pub fn run_service(cmd: ServiceCmd, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    match cmd {
        ServiceCmd::Assign { lc } => {
            let v: Assigned = super::remote::route_typed(
                ctx,
                |c| {
                    let body = json!({"lc": lc});
                    super::remote::call(c, "POST", "/v1/service/assign", Some(&body))
                },
                || Ok(service::assign(&mut ctx.env()?, &lc)?),
            )?;
            if ctx.quiet {
            } else if ctx.json {
                println!("{}", serde_json::to_value(&v)?);
            } else {
                println!("{lc} now holds the service address {}", v.service_address);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
