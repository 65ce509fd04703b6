//! `patchover serve`: the daemon. The HTTP side lives in `patchover-daemon`; this file
//! implements its [`Dispatch`] with the operations the CLI calls (`patchover_app::lcs::list`,
//! `patch::execute`, `patches::import`, `monitor::round`…), so the API and the CLI are one
//! implementation. Errors become API statuses by their kind in one place ([`api_code`]).
//!
//! Runs go on their own thread (a run is a long blocking call) and are journaled, so a
//! daemon stopped in the middle of one leaves it to `recover`, which the next start calls
//! before it accepts requests.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use patchover_app::{ErrorKind, patches};
use patchover_daemon::api::{
    AssignBody, AttachDiskBody, AttachNicBody, ImportBody, MarksBody, RollbackBody, RunBody,
    SwitchBackBody, SwitchBody,
};
use patchover_daemon::{ApiError, Command, DaemonConfig, Dispatch, ErrorCode, Hub, Reply};
use patchover_monitor::poll::FeedStatus;
use patchover_net::Mode;
use patchover_orchestrator::progress::{ProgressEvent, ProgressSink};
use patchover_orchestrator::{Event, PatchRequest, RunLock, RunReport};
use serde_json::json;

use super::{BadInput, Ctx, Env};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Print the `[daemon] tokens` entry for the token read from stdin, and exit.
    #[arg(long)]
    pub hash_token: bool,
}

/// The one place an error kind becomes an API status.
fn api_code(kind: ErrorKind) -> ErrorCode {
    match kind {
        ErrorKind::BadInput => ErrorCode::Unprocessable,
        ErrorKind::NotFound => ErrorCode::NotFound,
        ErrorKind::Conflict => ErrorCode::Conflict,
        ErrorKind::Internal => ErrorCode::Internal,
    }
}

/// The binary's errors as API errors.
fn api_error(e: anyhow::Error) -> ApiError {
    let msg = format!("{e:#}");
    let kind = super::error_kind(&e);
    if kind == ErrorKind::Internal {
        tracing::error!(error = %msg, "request failed");
    }
    ApiError::new(api_code(kind), msg)
}

/// A typed result as its JSON, or the API error of its failure.
fn typed<T: serde::Serialize>(
    r: Result<T, patchover_app::AppError>,
) -> Result<serde_json::Value, ApiError> {
    let v = r.map_err(|e| api_error(e.into()))?;
    serde_json::to_value(&v).map_err(|e| api_error(e.into()))
}

/// A typed result as a 200 answer.
fn reply<T: serde::Serialize>(r: Result<T, patchover_app::AppError>) -> Result<Reply, ApiError> {
    typed(r).map(Reply::ok)
}

struct Daemon {
    config_path: PathBuf,
    hub: Arc<Hub>,
}

impl Daemon {
    fn ctx(&self) -> Ctx {
        Ctx {
            config_path: self.config_path.clone(),
            json: true,
            quiet: true,
            // The daemon is what the CLI would call.
            direct: true,
        }
    }

    fn env(&self) -> Result<Env, ApiError> {
        self.ctx().env().map_err(api_error)
    }

    /// The LC named `id` (404 when the config has none).
    fn spec(env: &Env, id: &str) -> Result<patchover_core::LcSpec, ApiError> {
        env.lc(id).cloned().map_err(|e| api_error(e.into()))
    }

    fn mode(m: Option<&str>) -> Result<Mode, ApiError> {
        m.unwrap_or("readdress")
            .parse::<Mode>()
            .map_err(|e| ApiError::new(ErrorCode::InvalidBody, format!("mode: {e}")))
    }

    /// Starts a run on its own thread; answers once the run is journaled (202 with its id) or
    /// refused (nothing opened, nothing changed).
    fn start_run(&self, req: PatchRequest, report_timeout: u64) -> Result<Reply, ApiError> {
        let env = self.env()?;
        Self::spec(&env, &req.lc)?;
        // A run on this LC (ours or another patchover's) holds its lock: 409 at once.
        drop(
            RunLock::acquire(&env.config.run_dir, &req.lc).map_err(|e| {
                ApiError::new(ErrorCode::Conflict, patchover_orchestrator::chain(&e))
            })?,
        );
        let last_run = env
            .store
            .runs()
            .map_err(|e| api_error(e.into()))?
            .iter()
            .map(|r| r.id)
            .max()
            .unwrap_or(0);
        drop(env);
        let (tx, rx) = std::sync::mpsc::channel::<Result<i64, ApiError>>();
        let hub = self.hub.clone();
        let guard = hub.run_guard();
        let ctx = self.ctx();
        let lc = req.lc.clone();
        std::thread::Builder::new()
            .name(format!("run-{}", req.lc))
            .spawn(move || {
                let _guard = guard;
                let mut sent = false;
                let first = tx.clone();
                let h = hub.clone();
                let mut events = move |e: &Event| {
                    // Events of older runs come from the recovery before ours.
                    if !sent && e.run_id > last_run {
                        let _ = first.send(Ok(e.run_id));
                        sent = true;
                    }
                    if e.state == "done" {
                        // The orchestrator logs starts and failures; this is the end.
                        tracing::info!(
                            run = e.run_id,
                            step = %e.step,
                            detail = ?e.detail,
                            "step done"
                        );
                    }
                    h.publish("step", &serde_json::to_value(e).unwrap_or_default());
                };
                let progress: ProgressSink = {
                    let h = hub.clone();
                    Arc::new(move |p: &ProgressEvent| {
                        h.publish("progress", &serde_json::to_value(p).unwrap_or_default())
                    })
                };
                let ran = super::patch::execute(&ctx, &req, report_timeout, &mut events, progress);
                let report = match ran {
                    Err(e) => {
                        hub.metrics.inc("patchover_runs_total", &["refused"]);
                        let _ = tx.send(Err(api_error(e)));
                        return;
                    }
                    Ok(Ok(r)) => r,
                    Ok(Err(f)) if f.report.run_id == 0 => {
                        hub.metrics.inc("patchover_runs_total", &["refused"]);
                        let code = api_code(ErrorKind::of(&f.error));
                        let _ = tx.send(Err(ApiError::new(
                            code,
                            format!(
                                "{}; {}",
                                patchover_orchestrator::chain(&f.error),
                                f.error.hint()
                            ),
                        )));
                        return;
                    }
                    Ok(Err(f)) => *f.report,
                };
                record_run(&hub, &report);
                let _ = tx.send(Ok(report.run_id));
            })
            .map_err(|e| {
                ApiError::new(
                    ErrorCode::Internal,
                    format!("cannot start a run thread: {e}"),
                )
            })?;
        match rx.recv() {
            Ok(Ok(id)) => Ok(Reply::accepted(json!({
                "run_id": id,
                "lc": lc,
                "href": format!("/v1/runs/{id}"),
            }))),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ApiError::new(
                ErrorCode::Internal,
                "the run ended without a report; see the daemon's log",
            )),
        }
    }

    fn monitor_once(&self) -> Result<Reply, ApiError> {
        let report = super::monitor::round(&self.ctx()).map_err(api_error)?;
        record_monitor(&self.hub, &report);
        let v = serde_json::to_value(&report).unwrap_or_default();
        self.hub.publish("monitor", &v);
        Ok(Reply::ok(v))
    }

    fn approve(&self, query: &str) -> Result<Reply, ApiError> {
        let refused = |e: ApiError| {
            self.hub
                .metrics
                .inc("patchover_approvals_total", &["refused"]);
            e
        };
        let (challenge, decision, code) = patchover_monitor::approval::parse_approval_query(query)
            .map_err(|e| {
                refused(ApiError::new(
                    ErrorCode::BadRequest,
                    format!(
                        "{}; use the link from the notice mail as it is",
                        patchover_orchestrator::chain(&e)
                    ),
                ))
            })?;
        let config = self.ctx().config().map_err(|e| refused(api_error(e)))?;
        let (menv, mut store) = patchover_app::monitor::MonitorEnv::open(config)
            .map_err(|e| refused(api_error(e.into())))?;
        let starter = patchover_app::monitor::SpawnStarter::new(&menv.config)
            .map_err(|e| api_error(e.into()))?;
        let out = menv
            .monitor(&starter)
            .decide(&mut store, &challenge, &decision, Some(&code), "link")
            .map_err(|e| {
                let code = match e {
                    patchover_monitor::monitor::DecisionError::Unknown(_) => ErrorCode::NotFound,
                    patchover_monitor::monitor::DecisionError::Store(_)
                    | patchover_monitor::monitor::DecisionError::Secret(_) => ErrorCode::Internal,
                    patchover_monitor::monitor::DecisionError::NoSecret => ErrorCode::Unprocessable,
                    _ => ErrorCode::Forbidden,
                };
                refused(ApiError::new(code, patchover_orchestrator::chain(&e)))
            })?;
        self.hub
            .metrics
            .inc("patchover_approvals_total", &["accepted"]);
        let v = serde_json::to_value(&out).unwrap_or_default();
        self.hub.publish("approval", &v);
        Ok(Reply::ok(v))
    }
}

/// A run's end: logged and published; its figures reach the metrics from the journal at the
/// next scrape (`cmd::scrape`), as a CLI run's do.
fn record_run(hub: &Hub, r: &RunReport) {
    tracing::info!(run = r.run_id, lc = %r.lc, outcome = %r.outcome, "run ended");
    hub.publish(
        "run",
        &json!({"run_id": r.run_id, "lc": r.lc, "outcome": r.outcome, "error": r.error}),
    );
}

fn record_monitor(hub: &Hub, r: &patchover_monitor::monitor::RunReport) {
    for f in &r.feeds {
        let result = match f.status {
            FeedStatus::Backoff => "backoff",
            FeedStatus::NotModified => "not-modified",
            FeedStatus::Fetched => "fetched",
            FeedStatus::Failed => "failed",
        };
        hub.metrics.inc("patchover_feed_polls_total", &[result]);
        if matches!(f.status, FeedStatus::Failed) {
            hub.metrics.inc("patchover_feed_errors_total", &[]);
        }
    }
    for n in &r.notices {
        if n.sent {
            hub.metrics.inc("patchover_mails_sent_total", &[]);
        } else {
            hub.metrics.inc("patchover_mail_errors_total", &[]);
        }
    }
    for o in &r.replies {
        if o.decision.is_some() {
            hub.metrics.inc("patchover_approvals_total", &["accepted"]);
        } else if o.challenge.is_some() {
            hub.metrics.inc("patchover_approvals_total", &["refused"]);
        }
    }
}

impl Dispatch for Daemon {
    fn dispatch(&self, cmd: Command) -> Result<Reply, ApiError> {
        let t = Instant::now();
        let name = cmd.name();
        let r = self.dispatch_inner(cmd);
        tracing::debug!(
            command = name,
            ok = r.is_ok(),
            ms = t.elapsed().as_millis() as u64,
            "command"
        );
        r
    }
}

impl Daemon {
    fn dispatch_inner(&self, cmd: Command) -> Result<Reply, ApiError> {
        match cmd {
            Command::Status => {
                let env = self.env()?;
                let daemon = patchover_app::status::DaemonState {
                    socket: env.config.daemon.socket.clone(),
                    answers: true,
                    pid: Some(std::process::id()),
                    running_runs: Some(self.hub.running()),
                };
                reply(patchover_app::status::status(&env, daemon))
            }
            Command::Scrape => reply(super::scrape::scrape(&self.env()?, &self.hub.metrics)),
            Command::ListLcs => reply(patchover_app::lcs::list(&self.env()?)),
            Command::GetLc(id) => reply(patchover_app::lcs::show(&self.env()?, &id)),
            Command::Lc { id, action, body } => {
                let env = self.env()?;
                let v = typed(super::lc::act(&env, &id, action, &body))?;
                self.hub.publish(
                    "lc",
                    &json!({"lc": id, "action": action, "took_ms": v["took_ms"]}),
                );
                Ok(Reply::ok(v))
            }
            Command::ListPatches => reply(patches::list(&self.env()?.store)),
            Command::GetPatch(id) => reply(patches::show(&self.env()?.store, &id)),
            Command::ImportPatch(ImportBody { file, mark }) => {
                let mut env = self.env()?;
                reply(patches::import(
                    &env.config,
                    &mut env.store,
                    std::path::Path::new(&file),
                    mark,
                ))
            }
            Command::MarkPatch { id, apply_next } => {
                let mut env = self.env()?;
                typed(patches::mark(
                    &mut env.store,
                    std::slice::from_ref(&id),
                    apply_next,
                ))?;
                reply(patches::show(&env.store, &id))
            }
            Command::MarkPatches(MarksBody { ids, apply_next }) => {
                let mut env = self.env()?;
                reply(patches::mark(&mut env.store, &ids, apply_next))
            }
            Command::StartRun(RunBody {
                lc,
                bundles,
                mode,
                dry_run,
                report_timeout,
            }) => {
                let mode = Self::mode(mode.as_deref())?;
                self.start_run(
                    PatchRequest {
                        lc,
                        bundles,
                        mode,
                        dry_run,
                        rollback_to: None,
                    },
                    report_timeout.unwrap_or(300),
                )
            }
            Command::Rollback(RollbackBody { lc, mode }) => {
                let mode = Self::mode(mode.as_deref())?;
                let env = self.env()?;
                Self::spec(&env, &lc)?;
                drop(env);
                let req =
                    super::patch::rollback_request(&self.ctx(), &lc, mode).map_err(api_error)?;
                self.start_run(req, 60)
            }
            Command::ListRuns => reply(patchover_app::runs::list(&self.env()?.store)),
            Command::GetRun(id) => reply(patchover_app::runs::show(&self.env()?.store, id)),
            Command::MonitorRunOnce => self.monitor_once(),
            Command::MonitorStatus => {
                let config = self.ctx().config().map_err(api_error)?;
                reply(patchover_app::monitor::status(config))
            }
            Command::Approve { query } => self.approve(&query),
            Command::NetSwitch(SwitchBody {
                from,
                to,
                mode,
                options,
            }) => {
                let mode = Self::mode(Some(&mode))?;
                let env = self.env()?;
                let settings = super::net::settings(&options);
                // The later gratuitous ARP bursts go on in the daemon after the answer.
                let v = typed(
                    patchover_app::net::switch(&env, &from, &to, mode, &settings).map(|s| s.report),
                )?;
                self.hub.publish("switch", &v);
                Ok(Reply::ok(v))
            }
            Command::NetBack(SwitchBackBody { options }) => {
                let env = self.env()?;
                let settings = super::net::settings(&options);
                let v = typed(patchover_app::net::back(&env, &settings).map(|s| s.report))?;
                self.hub.publish("switch", &v);
                Ok(Reply::ok(v))
            }
            Command::AssignService(AssignBody { lc }) => {
                reply(patchover_app::service::assign(&mut self.env()?, &lc))
            }
            Command::RecoverRuns => {
                let h = self.hub.clone();
                let mut events = move |e: &Event| {
                    h.publish("step", &serde_json::to_value(e).unwrap_or_default())
                };
                let done =
                    super::patch::recover_runs(&self.ctx(), &mut events).map_err(api_error)?;
                for r in &done {
                    record_run(&self.hub, r);
                }
                Ok(Reply::ok(serde_json::to_value(&done).unwrap_or_default()))
            }
            Command::AttachDisk {
                id,
                body: AttachDiskBody { source, at },
            } => reply(patchover_app::lcs::attach_disk(
                &self.env()?,
                &id,
                std::path::Path::new(&source),
                std::path::Path::new(&at),
            )),
            Command::AttachNic {
                id,
                body: AttachNicBody { name, address, mac },
            } => {
                let invalid = |what: &str, e: String| {
                    ApiError::new(ErrorCode::InvalidBody, format!("{what}: {e}"))
                };
                let address = address
                    .map(|a| a.parse::<patchover_core::Ipv4Cidr>())
                    .transpose()
                    .map_err(|e| invalid("address", e.to_string()))?;
                let mac = mac
                    .map(|m| m.parse::<patchover_core::MacAddr>())
                    .transpose()
                    .map_err(|e| invalid("mac", e.to_string()))?;
                reply(patchover_app::lcs::attach_nic(
                    &self.env()?,
                    &id,
                    &name,
                    address,
                    mac,
                ))
            }
        }
    }
}

/// Runs the monitor every `[monitor] interval_secs` until shutdown.
async fn monitor_loop(daemon: Arc<Daemon>, interval: Duration) {
    let hub = daemon.hub.clone();
    loop {
        tokio::select! {
            _ = hub.wait_shutdown() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let d = daemon.clone();
        match tokio::task::spawn_blocking(move || d.monitor_once()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e.message, "monitor round failed"),
            Err(e) => tracing::error!(error = %e, "monitor round panicked"),
        }
    }
}

pub fn run(a: ServeArgs, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    if a.hash_token {
        let mut t = String::new();
        std::io::stdin()
            .read_to_string(&mut t)
            .context("reading the token from stdin")?;
        let t = t.trim();
        if t.len() < 16 {
            return Err(BadInput("the token is shorter than 16 characters; use a long random one (e.g. `openssl rand -hex 32`)".into()).into());
        }
        let h = patchover_daemon::auth::TokenHash::of(t).to_config();
        if ctx.json {
            println!("{}", json!({"token_hash": h}));
        } else {
            println!("{h}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    // The service manager's socket (`Type=notify`), taken out of the environment so that
    // nothing this daemon starts (a detached `patchover patch`, qemu, an LC's helpers)
    // inherits it and speaks for the daemon.
    let notify = patchover_daemon::Notifier::from_env()
        .map_err(|e| BadInput(patchover_orchestrator::chain(&e)))?;
    // SAFETY: nothing else runs yet: `main` only parsed the arguments and set up tracing,
    // which starts no thread, so no other thread reads the environment meanwhile.
    unsafe { std::env::remove_var(patchover_daemon::notify::NOTIFY_SOCKET) };
    let config = ctx.config()?;
    let dcfg = DaemonConfig::from_config(&config);
    // The TLS files are read and checked before recovery touches anything: a bad one is a
    // config error (exit 2).
    let tls = patchover_daemon::tls_config(&dcfg)
        .map_err(|e| BadInput(patchover_orchestrator::chain(&e)))?;
    let hub = Hub::new();
    let daemon = Arc::new(Daemon {
        config_path: ctx.config_path.clone(),
        hub: hub.clone(),
    });
    // Runs a previous daemon left unfinished are finished or rolled back before any request,
    // and before READY: the service manager starts dependents only after this.
    notify.status("recovering unfinished runs");
    {
        let mut env = ctx.env()?;
        let h = hub.clone();
        let mut events =
            move |e: &Event| h.publish("step", &serde_json::to_value(e).unwrap_or_default());
        match super::patch::settings_for(&env, 60) {
            Ok(settings) => {
                let mut o = patchover_orchestrator::Orchestrator {
                    config: &env.config,
                    store: &mut env.store,
                    backend: &env.backend,
                    settings: &settings,
                    events: &mut events,
                    progress: patchover_orchestrator::progress::no_progress(),
                };
                for r in patchover_orchestrator::recover(&mut o)? {
                    tracing::warn!(run = r.run_id, outcome = %r.outcome, "recovered an unfinished run");
                    record_run(&hub, &r);
                }
            }
            Err(e) => tracing::warn!(
                error = %format!("{e:#}"),
                "cannot recover unfinished runs now; each run recovers them before it starts"
            ),
        }
    }
    let monitor_interval = match &config.monitor {
        Some(m) if dcfg.monitor => Some(m.interval),
        _ => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        if let Some(i) = monitor_interval {
            tokio::spawn(monitor_loop(daemon.clone(), i));
        }
        let stop = async {
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
            let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        if !ctx.json {
            eprintln!("patchover daemon on {}", dcfg.socket.display());
        }
        patchover_daemon::serve(&dcfg, tls, daemon, hub.clone(), notify, stop).await
    })?;
    // A run thread still going after the grace period is cut off here; its journal lets the
    // next start finish or roll it back.
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_input_is_unprocessable_and_host_failures_internal() {
        let e = anyhow::Error::from(BadInput("LC a is not running".into())).context("patch");
        let a = api_error(e);
        assert_eq!(a.code, ErrorCode::Unprocessable);
        assert!(a.message.contains("not running"), "{}", a.message);
        let e = anyhow::Error::from(std::io::Error::other("disk on fire"));
        assert_eq!(api_error(e).code, ErrorCode::Internal);
    }
}
