//! The HTTP server: the router (requests → [`Command`]s), the event stream, `/metrics`, the
//! Unix-socket and TCP listeners, and the graceful shutdown.
//!
//! The Unix socket is the root-only door (mode 0600, no token); TCP is opt-in, every request
//! on it needs a bearer token, and with `tls_cert`/`tls_key` it speaks TLS ([`crate::tls`]).
//! Shutdown stops accepting, ends the event streams so open connections can close, then waits
//! up to the grace period for running patch runs; a run cut off after that is finished or
//! rolled back from its journal by the next start.

use std::convert::Infallible;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{
    ConnectInfo, DefaultBodyLimit, FromRequest, MatchedPath, Path as UrlPath, RawQuery, Request,
    State,
};
use axum::http::HeaderMap;
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use serde::de::DeserializeOwned;
use tokio::sync::{broadcast, watch};

use crate::api::{
    ApiError, AssignBody, AttachDiskBody, AttachNicBody, Command, Dispatch, ErrorCode, ImportBody,
    LcAction, LcActionBody, MarksBody, Reply, RollbackBody, RunBody, SwitchBackBody, SwitchBody,
};
use crate::auth::{TokenHash, authorized};
use crate::config::DaemonConfig;
use crate::metrics::{Gauges, Metrics};
use crate::slow::{Capped, Guarded};

/// What the handlers, the run driver and the monitor loop share: metrics, the event stream,
/// the count of running runs and the shutdown flag.
pub struct Hub {
    pub metrics: Metrics,
    events: broadcast::Sender<(String, String)>,
    running: AtomicUsize,
    shutdown: watch::Sender<bool>,
}

impl Hub {
    pub fn new() -> Arc<Hub> {
        Arc::new(Hub {
            metrics: Metrics::new(),
            events: broadcast::channel(1024).0,
            running: AtomicUsize::new(0),
            shutdown: watch::channel(false).0,
        })
    }

    /// Publishes an event of `kind` (`step`, `run`, `monitor`…) on `/v1/events`.
    pub fn publish(&self, kind: &str, data: &serde_json::Value) {
        self.metrics.inc("patchover_events_total", &[]);
        let _ = self.events.send((kind.to_owned(), data.to_string()));
    }

    /// Counts a run as running until the guard drops.
    pub fn run_guard(self: &Arc<Hub>) -> RunGuard {
        self.running.fetch_add(1, Ordering::SeqCst);
        RunGuard(self.clone())
    }

    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    pub fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Starts the shutdown: listeners stop accepting and event streams end.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Waits until shutdown begins.
    pub async fn wait_shutdown(&self) {
        let mut rx = self.shutdown.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }
}

/// A running run; see [`Hub::run_guard`].
pub struct RunGuard(Arc<Hub>);

impl Drop for RunGuard {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Clone)]
struct AppState {
    dispatch: Arc<dyn Dispatch>,
    hub: Arc<Hub>,
    timeout: Duration,
}

/// A JSON body whose rejections are API errors (400 / 413 / 415 with the error body).
struct ApiJson<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rej) => {
                let code = match rej.status().as_u16() {
                    413 => ErrorCode::BodyTooLarge,
                    415 => ErrorCode::UnsupportedMediaType,
                    _ => ErrorCode::InvalidBody,
                };
                let what = match code {
                    ErrorCode::BodyTooLarge => "the body is too large; send less".to_owned(),
                    ErrorCode::UnsupportedMediaType => {
                        "send the body with `Content-Type: application/json`".to_owned()
                    }
                    _ => format!("{}; see docs/openapi.yaml for the fields", rej.body_text()),
                };
                Err(ApiError::new(code, what))
            }
        }
    }
}

/// A JSON body that may be left out: a request without one (no or a zero `Content-Length`)
/// takes `T::default()`; one with a body is parsed as [`ApiJson`] (unknown fields refused).
struct OptJson<T>(T);

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let h = req.headers();
        let empty = match h.get(axum::http::header::CONTENT_LENGTH) {
            Some(n) => n.to_str().is_ok_and(|n| n.trim() == "0"),
            None => !h.contains_key(axum::http::header::TRANSFER_ENCODING),
        };
        if empty {
            return Ok(OptJson(T::default()));
        }
        ApiJson::<T>::from_request(req, state)
            .await
            .map(|ApiJson(v)| OptJson(v))
    }
}

async fn run(s: &AppState, cmd: Command) -> Result<Reply, ApiError> {
    if matches!(cmd, Command::StartRun(_) | Command::Rollback(_)) && s.hub.shutting_down() {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            "the daemon is shutting down; start the run after it is back",
        ));
    }
    let name = cmd.name();
    let d = s.dispatch.clone();
    let task = tokio::task::spawn_blocking(move || d.dispatch(cmd));
    match tokio::time::timeout(s.timeout, task).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::error!(command = name, error = %e, "handler panicked");
            Err(ApiError::new(
                ErrorCode::Internal,
                format!("the {name} handler failed; see the daemon's log"),
            ))
        }
        Err(_) => Err(ApiError::new(
            ErrorCode::Timeout,
            format!(
                "{name} took longer than {:?}; it may still finish, check its state",
                s.timeout
            ),
        )),
    }
}

type Id = UrlPath<String>;

type Body = OptJson<LcActionBody>;

async fn lc(
    s: State<AppState>,
    UrlPath(id): Id,
    action: LcAction,
    OptJson(body): Body,
) -> Result<Reply, ApiError> {
    run(&s.0, Command::Lc { id, action, body }).await
}
async fn lc_boot(s: State<AppState>, id: Id, b: Body) -> Result<Reply, ApiError> {
    lc(s, id, LcAction::Boot, b).await
}
async fn lc_stop(s: State<AppState>, id: Id, b: Body) -> Result<Reply, ApiError> {
    lc(s, id, LcAction::Stop, b).await
}
async fn lc_reboot(s: State<AppState>, id: Id, b: Body) -> Result<Reply, ApiError> {
    lc(s, id, LcAction::Reboot, b).await
}
async fn mark(s: State<AppState>, UrlPath(id): Id) -> Result<Reply, ApiError> {
    run(
        &s.0,
        Command::MarkPatch {
            id,
            apply_next: true,
        },
    )
    .await
}
async fn unmark(s: State<AppState>, UrlPath(id): Id) -> Result<Reply, ApiError> {
    run(
        &s.0,
        Command::MarkPatch {
            id,
            apply_next: false,
        },
    )
    .await
}

async fn get_run(
    State(s): State<AppState>,
    UrlPath(id): UrlPath<String>,
) -> Result<Reply, ApiError> {
    let id: i64 = id.parse().map_err(|_| {
        ApiError::new(
            ErrorCode::BadRequest,
            format!("run id {id:?} is not a number; see GET /v1/runs"),
        )
    })?;
    run(&s, Command::GetRun(id)).await
}

async fn events(
    State(s): State<AppState>,
) -> Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>> {
    let rx = s.hub.events.subscribe();
    let sd = s.hub.shutdown.subscribe();
    let stream = futures::stream::unfold((rx, sd), |(mut rx, mut sd)| async move {
        let r = tokio::select! {
            _ = sd.wait_for(|v| *v) => return None,
            r = rx.recv() => r,
        };
        let ev = match r {
            Ok((kind, data)) => SseEvent::default().event(kind).data(data),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                SseEvent::default().event("lagged").data(n.to_string())
            }
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(ev), (rx, sd)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// `/metrics`: the dispatcher ingests new runs and reads the gauges; OpenMetrics to a client
/// that asks for it (Prometheus does), the classic text format 0.0.4 to others.
async fn metrics(State(s): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let reply = run(&s, Command::Scrape).await?;
    let gauges: Gauges = serde_json::from_value(reply.body).map_err(|e| {
        ApiError::new(
            ErrorCode::Internal,
            format!("the scrape's gauges are not readable ({e}); see the daemon's log"),
        )
    })?;
    let text = s.hub.metrics.render(&gauges);
    let openmetrics = headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let (kind, body) = if openmetrics {
        (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            text,
        )
    } else {
        (
            "text/plain; version=0.0.4; charset=utf-8",
            crate::metrics::to_text_004(&text),
        )
    };
    Ok(([(axum::http::header::CONTENT_TYPE, kind)], body).into_response())
}

/// Counts every request by its route template and status.
async fn count(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = req.method().clone();
    let t = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    tracing::debug!(%method, route, status, ms = t.elapsed().as_millis() as u64, "request");
    s.hub
        .metrics
        .inc("patchover_http_requests_total", &[&route, &status]);
    resp
}

async fn require_token(
    State(tokens): State<Arc<Vec<TokenHash>>>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let h = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !authorized(h, &tokens) {
        // The connection closes after the answer: a peer without a token gets no second try
        // on it (each guess costs a new connection, under the cap).
        let mut resp = ApiError::new(
            ErrorCode::Unauthorized,
            "send `Authorization: Bearer <token>` with a token whose hash is in [daemon] tokens",
        )
        .into_response();
        resp.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
        return resp;
    }
    next.run(req).await
}

/// The outermost layer: the connection is [answering](crate::slow::Track::begin) from the
/// request until its response body is done, so its idle and head deadlines do not run
/// meanwhile (an event stream is never cut for being quiet).
async fn answering(req: Request, next: Next) -> Response {
    let answering = req
        .extensions()
        .get::<ConnectInfo<crate::slow::Track>>()
        .map(|c| c.0.begin());
    let resp = next.run(req).await;
    match answering {
        Some(answering) => {
            resp.map(|inner| axum::body::Body::new(crate::slow::Tracked { inner, answering }))
        }
        None => resp,
    }
}

type Route = (&'static str, &'static str, MethodRouter<AppState>);

/// A handler for a route that takes nothing but the command.
fn simple(
    c: Command,
) -> impl Fn(State<AppState>) -> futures::future::BoxFuture<'static, Result<Reply, ApiError>>
+ Clone
+ Send
+ Sync
+ 'static {
    move |State(s): State<AppState>| {
        let c = c.clone();
        Box::pin(async move { run(&s, c).await })
    }
}

/// Every route: method, path template, handler. The router and [`routes`] (which the
/// OpenAPI test compares with `docs/openapi.yaml`) are both built from this one table.
fn table() -> Vec<Route> {
    vec![
        ("GET", "/v1/status", get(simple(Command::Status))),
        ("GET", "/v1/lcs", get(simple(Command::ListLcs))),
        (
            "GET",
            "/v1/lcs/{id}",
            get(async |State(s): State<AppState>, UrlPath(id): Id| {
                run(&s, Command::GetLc(id)).await
            }),
        ),
        ("POST", "/v1/lcs/{id}/boot", post(lc_boot)),
        ("POST", "/v1/lcs/{id}/stop", post(lc_stop)),
        ("POST", "/v1/lcs/{id}/reboot", post(lc_reboot)),
        ("GET", "/v1/patches", get(simple(Command::ListPatches))),
        (
            "POST",
            "/v1/patches",
            post(
                async |State(s): State<AppState>, ApiJson(b): ApiJson<ImportBody>| {
                    run(&s, Command::ImportPatch(b)).await
                },
            ),
        ),
        (
            "GET",
            "/v1/patches/{id}",
            get(async |State(s): State<AppState>, UrlPath(id): Id| {
                run(&s, Command::GetPatch(id)).await
            }),
        ),
        ("POST", "/v1/patches/{id}/mark", post(mark)),
        ("POST", "/v1/patches/{id}/unmark", post(unmark)),
        (
            "POST",
            "/v1/patch-marks",
            post(
                async |State(s): State<AppState>, ApiJson(b): ApiJson<MarksBody>| {
                    run(&s, Command::MarkPatches(b)).await
                },
            ),
        ),
        ("GET", "/v1/runs", get(simple(Command::ListRuns))),
        (
            "POST",
            "/v1/runs",
            post(
                async |State(s): State<AppState>, ApiJson(b): ApiJson<RunBody>| {
                    run(&s, Command::StartRun(b)).await
                },
            ),
        ),
        ("GET", "/v1/runs/{id}", get(get_run)),
        (
            "POST",
            "/v1/rollback",
            post(
                async |State(s): State<AppState>, ApiJson(b): ApiJson<RollbackBody>| {
                    run(&s, Command::Rollback(b)).await
                },
            ),
        ),
        (
            "POST",
            "/v1/monitor/run-once",
            post(simple(Command::MonitorRunOnce)),
        ),
        ("GET", "/v1/monitor", get(simple(Command::MonitorStatus))),
        (
            "GET",
            "/v1/approve",
            get(async |State(s): State<AppState>, RawQuery(q): RawQuery| {
                run(
                    &s,
                    Command::Approve {
                        query: q.unwrap_or_default(),
                    },
                )
                .await
            }),
        ),
        (
            "POST",
            "/v1/lcs/{id}/disks",
            post(
                async |State(s): State<AppState>,
                       UrlPath(id): Id,
                       ApiJson(body): ApiJson<AttachDiskBody>| {
                    run(&s, Command::AttachDisk { id, body }).await
                },
            ),
        ),
        (
            "POST",
            "/v1/lcs/{id}/nics",
            post(
                async |State(s): State<AppState>,
                       UrlPath(id): Id,
                       ApiJson(body): ApiJson<AttachNicBody>| {
                    run(&s, Command::AttachNic { id, body }).await
                },
            ),
        ),
        (
            "POST",
            "/v1/net/switch",
            post(
                async |State(s): State<AppState>, ApiJson(b): ApiJson<SwitchBody>| {
                    run(&s, Command::NetSwitch(b)).await
                },
            ),
        ),
        (
            "POST",
            "/v1/net/back",
            post(
                async |State(s): State<AppState>, OptJson(b): OptJson<SwitchBackBody>| {
                    run(&s, Command::NetBack(b)).await
                },
            ),
        ),
        (
            "POST",
            "/v1/service/assign",
            post(
                async |State(s): State<AppState>, ApiJson(b): ApiJson<AssignBody>| {
                    run(&s, Command::AssignService(b)).await
                },
            ),
        ),
        (
            "POST",
            "/v1/runs/recover",
            post(simple(Command::RecoverRuns)),
        ),
        ("GET", "/v1/events", get(events)),
        ("GET", "/metrics", get(metrics)),
    ]
}

/// Every `(method, path template)` the server answers.
pub fn routes() -> Vec<(&'static str, &'static str)> {
    table().into_iter().map(|(m, p, _)| (m, p)).collect()
}

/// The API's routes. `tokens`: `Some` for the TCP listener (every request needs one).
pub fn router(
    dispatch: Arc<dyn Dispatch>,
    hub: Arc<Hub>,
    cfg: &DaemonConfig,
    tokens: Option<Vec<TokenHash>>,
) -> Router {
    let s = AppState {
        dispatch,
        hub,
        timeout: cfg.request_timeout,
    };
    let r = table()
        .into_iter()
        .fold(Router::new(), |r, (_, path, mr)| r.route(path, mr));
    let r = r
        .fallback(async |State(s): State<AppState>| {
            // Outside the route layer: counted here.
            s.hub
                .metrics
                .inc("patchover_http_requests_total", &["unmatched", "404"]);
            ApiError::new(
                ErrorCode::NotFound,
                "no such route; see docs/openapi.yaml for the API",
            )
        })
        .method_not_allowed_fallback(async || {
            ApiError::new(
                ErrorCode::MethodNotAllowed,
                "this route does not take that method; see docs/openapi.yaml",
            )
        })
        .layer(DefaultBodyLimit::max(cfg.max_body_bytes))
        .route_layer(middleware::from_fn_with_state(s.clone(), count))
        .with_state(s);
    let r = match tokens {
        Some(t) => r.layer(middleware::from_fn_with_state(Arc::new(t), require_token)),
        None => r,
    };
    r.layer(middleware::from_fn(answering))
}

/// Errors of the listeners.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("another daemon answers on {0}; stop it first (`systemctl stop patchover`)")]
    InUse(PathBuf),
    #[error("cannot listen on {what}")]
    Listen {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("serving {what}")]
    Serve {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// The TCP listener, plain or TLS; both under the connection cap.
enum Tcp {
    Plain(Capped<tokio::net::TcpListener>),
    Tls(crate::tls::TlsListener<Capped<tokio::net::TcpListener>>),
}

fn bind_unix(path: &Path) -> Result<tokio::net::UnixListener, ServeError> {
    let listen = |source| ServeError::Listen {
        what: path.display().to_string(),
        source,
    };
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServeError::InUse(path.to_owned()));
        }
        // A socket left by a daemon that died.
        std::fs::remove_file(path).map_err(listen)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(listen)?;
    }
    // The socket is created with the process umask; tighten it to root-only before anyone
    // can be told it exists (we have not started accepting yet).
    let l = tokio::net::UnixListener::bind(path).map_err(listen)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(listen)?;
    Ok(l)
}

/// The TLS setup of the TCP listener: the files `cfg.tls` names, read and checked (a bad one is
/// an error: call this before acting on anything, so it refuses the start); `None` without TLS
/// or without a TCP listener.
pub fn tls_config(
    cfg: &DaemonConfig,
) -> Result<Option<Arc<rustls::ServerConfig>>, crate::tls::TlsError> {
    match (&cfg.tls, cfg.listen) {
        (Some(files), Some(_)) => files.load().map(Some),
        (Some(_), None) => {
            tracing::warn!(
                "[daemon] tls_cert and tls_key are set without `listen`: no TCP to use them"
            );
            Ok(None)
        }
        (None, _) => Ok(None),
    }
}

/// Serves `app` on `l` until shutdown, each connection under the head and idle deadlines
/// ([`Guarded`]) and told when it is answering ([`crate::slow::Track`]).
fn spawn_serve<L>(
    l: L,
    app: Router,
    cfg: &DaemonConfig,
    hub: &Arc<Hub>,
) -> tokio::task::JoinHandle<std::io::Result<()>>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let l = Guarded {
        inner: l,
        head_timeout: cfg.head_timeout,
        idle_timeout: cfg.idle_timeout,
        hub: hub.clone(),
    };
    let hub = hub.clone();
    let app = app.into_make_service_with_connect_info::<crate::slow::Track>();
    tokio::spawn(async move {
        axum::serve(l, app)
            .with_graceful_shutdown(async move { hub.wait_shutdown().await })
            .await
    })
}

/// Serves the API on the Unix socket (and TCP when configured, over TLS with `tls`, from
/// [`tls_config`]) until `stop` resolves, then shuts down gracefully: no new connections, event
/// streams end, running runs get up to `cfg.shutdown_grace` to finish.
pub async fn serve(
    cfg: &DaemonConfig,
    tls: Option<Arc<rustls::ServerConfig>>,
    dispatch: Arc<dyn Dispatch>,
    hub: Arc<Hub>,
    notify: crate::Notifier,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let unix = Capped::new(
        bind_unix(&cfg.socket)?,
        cfg.max_connections,
        true,
        hub.clone(),
    );
    let tcp = match cfg.listen {
        None => None,
        Some(addr) => {
            let listen = |source| ServeError::Listen {
                what: addr.to_string(),
                source,
            };
            let l = tokio::net::TcpListener::bind(addr).await.map_err(listen)?;
            Some(match tls.clone() {
                // Refused before the handshake; the handshake gets the head deadline too
                // (the head's starts after it).
                Some(tls) => {
                    let l = Capped::new(l, cfg.max_connections, false, hub.clone());
                    Tcp::Tls(
                        crate::tls::TlsListener::new(l, tls, cfg.head_timeout).map_err(listen)?,
                    )
                }
                None => Tcp::Plain(Capped::new(l, cfg.max_connections, true, hub.clone())),
            })
        }
    };
    tracing::info!(
        socket = %cfg.socket.display(),
        tcp = ?cfg.listen,
        tls = tls.is_some(),
        "daemon listening"
    );
    // Every listener is bound (connections queue from here on) and the caller recovered the
    // unfinished runs before calling us: ready for the service manager.
    notify.ready(&format!("serving on {}", cfg.socket.display()));
    {
        let hub = hub.clone();
        let notify = notify.clone();
        let grace = cfg.shutdown_grace.as_secs();
        tokio::spawn(async move {
            stop.await;
            tracing::info!("shutting down: no new connections");
            notify.stopping(&format!(
                "stopping: {} run(s) going, grace {} s",
                hub.running(),
                grace
            ));
            hub.begin_shutdown();
        });
    }
    let unix_app = router(dispatch.clone(), hub.clone(), cfg, None);
    let unix_srv = spawn_serve(unix, unix_app, cfg, &hub);
    let tcp_srv = tcp.map(|l| {
        let app = router(dispatch, hub.clone(), cfg, Some(cfg.tokens.clone()));
        match l {
            Tcp::Plain(l) => spawn_serve(l, app, cfg, &hub),
            Tcp::Tls(l) => spawn_serve(l, app, cfg, &hub),
        }
    });
    let joined = |r: Result<std::io::Result<()>, tokio::task::JoinError>, what: String| match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(ServeError::Serve { what, source }),
        Err(e) => Err(ServeError::Serve {
            what,
            source: std::io::Error::other(e.to_string()),
        }),
    };
    let r1 = joined(unix_srv.await, cfg.socket.display().to_string());
    let r2 = match tcp_srv {
        Some(t) => joined(t.await, format!("{:?}", cfg.listen)),
        None => Ok(()),
    };
    let _ = std::fs::remove_file(&cfg.socket);
    let deadline = Instant::now() + cfg.shutdown_grace;
    while hub.running() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if hub.running() > 0 {
        tracing::warn!(
            running = hub.running(),
            "runs still going at the end of the grace period; the next start recovers them from the journal"
        );
    }
    r1.and(r2)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use serde_json::json;

    use super::*;
    use crate::client::{Client, ClientError};

    /// Records the commands; a run holds a [`RunGuard`] for `run_ms` on its own thread.
    struct Fake {
        seen: Mutex<Vec<Command>>,
        hub: Arc<Hub>,
        run_ms: u64,
    }

    impl Dispatch for Fake {
        fn dispatch(&self, cmd: Command) -> Result<Reply, ApiError> {
            self.seen.lock().unwrap().push(cmd.clone());
            match cmd {
                Command::StartRun(_) => {
                    let g = self.hub.run_guard();
                    let ms = self.run_ms;
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_millis(ms));
                        drop(g);
                    });
                    Ok(Reply::accepted(json!({"run_id": 1})))
                }
                Command::GetRun(7) => Err(ApiError::new(ErrorCode::NotFound, "no run 7 here")),
                c => Ok(Reply::ok(json!({"cmd": c.name()}))),
            }
        }
    }

    fn config(dir: &Path) -> DaemonConfig {
        let mut c = DaemonConfig::from_section(&crate::config::DaemonSection::defaults(dir));
        c.shutdown_grace = Duration::from_secs(10);
        c
    }

    #[test]
    fn routes_map_to_commands_and_shutdown_waits_for_runs() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let hub = Hub::new();
        let fake = Arc::new(Fake {
            seen: Mutex::new(Vec::new()),
            hub: hub.clone(),
            run_ms: 700,
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        // The service manager's side of `Type=notify`.
        let manager =
            std::os::unix::net::UnixDatagram::bind(dir.path().join("notify.sock")).unwrap();
        manager
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let notified = |m: &std::os::unix::net::UnixDatagram| {
            let mut buf = [0u8; 512];
            let n = m.recv(&mut buf).expect("a notification");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };
        let notify =
            crate::Notifier::from_value(dir.path().join("notify.sock").to_str().unwrap()).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let server = {
            let (cfg, hub, fake) = (cfg.clone(), hub.clone(), fake.clone());
            rt.spawn(async move {
                serve(&cfg, None, fake, hub, notify, async move {
                    let _ = stop_rx.await;
                })
                .await
            })
        };
        // READY comes once the socket is bound: it takes connections at once.
        let ready = notified(&manager);
        assert!(ready.starts_with("READY=1\nSTATUS=serving on "), "{ready}");
        assert!(std::os::unix::net::UnixStream::connect(&cfg.socket).is_ok());
        let c = Client::new(&cfg.socket);
        let body = json!({"lc": "lc1", "dry_run": true});
        let cases: Vec<(&str, &str, Option<serde_json::Value>, Command)> = vec![
            ("GET", "/v1/status", None, Command::Status),
            ("GET", "/v1/lcs", None, Command::ListLcs),
            ("GET", "/v1/lcs/lc1", None, Command::GetLc("lc1".into())),
            (
                "POST",
                "/v1/lcs/lc1/reboot",
                None,
                Command::Lc {
                    id: "lc1".into(),
                    action: LcAction::Reboot,
                    body: LcActionBody::default(),
                },
            ),
            (
                "POST",
                "/v1/lcs/lc1/boot",
                Some(json!({"no_wait": true})),
                Command::Lc {
                    id: "lc1".into(),
                    action: LcAction::Boot,
                    body: LcActionBody {
                        no_wait: true,
                        timeout: None,
                    },
                },
            ),
            (
                "GET",
                "/v1/patches/p1",
                None,
                Command::GetPatch("p1".into()),
            ),
            (
                "POST",
                "/v1/patches",
                Some(json!({"file": "/b.po", "mark": true})),
                Command::ImportPatch(ImportBody {
                    file: "/b.po".into(),
                    mark: true,
                }),
            ),
            (
                "POST",
                "/v1/patch-marks",
                Some(json!({"ids": ["a", "b"], "apply_next": false})),
                Command::MarkPatches(MarksBody {
                    ids: vec!["a".into(), "b".into()],
                    apply_next: false,
                }),
            ),
            ("GET", "/v1/monitor", None, Command::MonitorStatus),
            (
                "POST",
                "/v1/patches/p%2D1/unmark",
                None,
                Command::MarkPatch {
                    id: "p-1".into(),
                    apply_next: false,
                },
            ),
            ("GET", "/v1/runs/12", None, Command::GetRun(12)),
            (
                "POST",
                "/v1/rollback",
                Some(json!({"lc": "lc2"})),
                Command::Rollback(RollbackBody {
                    lc: "lc2".into(),
                    mode: None,
                }),
            ),
            (
                "GET",
                "/v1/approve?challenge=A&code=B",
                None,
                Command::Approve {
                    query: "challenge=A&code=B".into(),
                },
            ),
            (
                "POST",
                "/v1/monitor/run-once",
                None,
                Command::MonitorRunOnce,
            ),
            (
                "POST",
                "/v1/net/switch",
                Some(json!({"from": "a", "to": "b", "mode": "path", "options": {"port": 81}})),
                Command::NetSwitch(SwitchBody {
                    from: "a".into(),
                    to: "b".into(),
                    mode: "path".into(),
                    options: crate::api::SwitchOptions {
                        port: 81,
                        ..Default::default()
                    },
                }),
            ),
            (
                "POST",
                "/v1/net/back",
                None,
                Command::NetBack(SwitchBackBody::default()),
            ),
            (
                "POST",
                "/v1/service/assign",
                Some(json!({"lc": "lc1"})),
                Command::AssignService(AssignBody { lc: "lc1".into() }),
            ),
            ("POST", "/v1/runs/recover", None, Command::RecoverRuns),
            // A static segment next to /v1/runs/{id}: both answer.
            ("GET", "/v1/runs/3", None, Command::GetRun(3)),
            (
                "POST",
                "/v1/lcs/lc1/disks",
                Some(json!({"source": "/srv/x", "at": "/mnt/x"})),
                Command::AttachDisk {
                    id: "lc1".into(),
                    body: AttachDiskBody {
                        source: "/srv/x".into(),
                        at: "/mnt/x".into(),
                    },
                },
            ),
            (
                "POST",
                "/v1/lcs/lc1/nics",
                Some(json!({"name": "eth1"})),
                Command::AttachNic {
                    id: "lc1".into(),
                    body: AttachNicBody {
                        name: "eth1".into(),
                        address: None,
                        mac: None,
                    },
                },
            ),
        ];
        for (m, p, b, want) in &cases {
            c.call(m, p, b.as_ref()).unwrap();
            assert_eq!(fake.seen.lock().unwrap().last().unwrap(), want, "{m} {p}");
        }
        // An LC action's optional body refuses unknown fields.
        match c.call("POST", "/v1/lcs/lc1/stop", Some(&json!({"nowait": true}))) {
            Err(ClientError::Api(e)) => {
                assert_eq!(e.code, ErrorCode::InvalidBody);
                assert!(e.message.contains("unknown field"), "{}", e.message);
            }
            r => panic!("{r:?}"),
        }
        // The dispatcher's error comes back as the API error.
        match c.call("GET", "/v1/runs/7", None) {
            Err(ClientError::Api(e)) => assert_eq!(e.code, ErrorCode::NotFound),
            r => panic!("{r:?}"),
        }

        // The event stream delivers what the hub publishes.
        let (ev_tx, ev_rx) = std::sync::mpsc::channel();
        let (open_tx, open_rx) = std::sync::mpsc::channel();
        let sock = cfg.socket.clone();
        let stream = std::thread::spawn(move || {
            Client::new(&sock).events(
                || {
                    open_tx.send(()).unwrap();
                    Ok(true)
                },
                |kind, data| {
                    ev_tx.send((kind.to_owned(), data.clone())).unwrap();
                    true
                },
            )
        });
        open_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        hub.publish("step", &json!({"run_id": 3, "step": "copy"}));
        let (kind, data) = ev_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(kind, "step");
        assert_eq!(data["step"], "copy");

        // A run holds the daemon at shutdown until it ends; the stream ends at once.
        let r = c.call("POST", "/v1/runs", Some(&body)).unwrap();
        assert_eq!(r["run_id"], 1);
        assert_eq!(hub.running(), 1);
        let t = Instant::now();
        stop_tx.send(()).unwrap();
        let stopping = notified(&manager);
        assert!(
            stopping.starts_with("STOPPING=1\nSTATUS=stopping: 1 run(s) going"),
            "{stopping}"
        );
        stream.join().unwrap().unwrap();
        rt.block_on(server).unwrap().unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(500),
            "shutdown did not wait for the run: {:?}",
            t.elapsed()
        );
        assert_eq!(hub.running(), 0);
        assert!(!cfg.socket.exists());
        assert_eq!(hub.metrics.get("patchover_events_total", &[]), 1.0);
        assert_eq!(
            hub.metrics
                .get("patchover_http_requests_total", &["/v1/runs", "202"]),
            1.0
        );
    }

    #[test]
    fn a_live_socket_is_not_taken_over_and_a_stale_one_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(matches!(bind_unix(&path), Err(ServeError::InUse(_))));
        drop(live); // the file stays: stale
        assert!(path.exists());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let _l = bind_unix(&path).unwrap();
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        });
    }
}
