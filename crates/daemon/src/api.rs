//! The API's vocabulary: the commands a request maps to, the replies, and the errors with
//! their stable codes. HTTP statuses are decided here and nowhere else.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// `POST /v1/runs`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunBody {
    /// The active LC to patch.
    pub lc: String,
    /// Bundle ids (default: every patch marked for the next run).
    #[serde(default)]
    pub bundles: Vec<String>,
    /// `readdress` (default), `swap` or `bridge`.
    #[serde(default)]
    pub mode: Option<String>,
    #[serde(default)]
    pub dry_run: bool,
    /// Seconds the standby may take to apply the patches (default 300).
    #[serde(default)]
    pub report_timeout: Option<u64>,
}

/// `POST /v1/rollback`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RollbackBody {
    /// The LC to hand the service back to (the old LC an earlier run kept).
    pub lc: String,
    #[serde(default)]
    pub mode: Option<String>,
}

/// `POST /v1/lcs/{id}/{action}`: an optional body (an empty one takes the defaults).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LcActionBody {
    /// Boot and reboot: answer as soon as init runs instead of waiting for the LC's agent.
    #[serde(default)]
    pub no_wait: bool,
    /// Boot and reboot: seconds to wait for the agent (default 30).
    #[serde(default)]
    pub timeout: Option<u64>,
}

/// `POST /v1/patches`: import a signed bundle.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImportBody {
    /// The bundle's absolute path on the daemon's host (its signature is `FILE.minisig`).
    pub file: String,
    /// Also mark it for the next run.
    #[serde(default)]
    pub mark: bool,
}

/// `POST /v1/patch-marks`: mark or unmark several patches, all or none.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MarksBody {
    pub ids: Vec<String>,
    pub apply_next: bool,
}

/// How a network switch checks, drains and announces (`net switch|back` options). Every
/// field has the CLI's default.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SwitchOptions {
    /// The service port (checked, drained, held).
    pub port: u16,
    /// The check the standby must pass on the service address.
    pub check_path: String,
    /// Text the standby's answer must contain; empty accepts any 200.
    pub expect: String,
    /// How long the old LC may take to finish its connections.
    pub drain_deadline_ms: u64,
    /// Gratuitous ARP frames per burst (readdress).
    pub garp_count: u32,
    /// Gap between frames of a burst.
    pub garp_interval_ms: u64,
    /// Repeat the burst this long after the switch.
    pub garp_refresh_ms: Vec<u64>,
}

impl Default for SwitchOptions {
    fn default() -> SwitchOptions {
        SwitchOptions {
            port: 8080,
            check_path: "/version".into(),
            expect: String::new(),
            drain_deadline_ms: 5000,
            garp_count: 3,
            garp_interval_ms: 5,
            garp_refresh_ms: vec![1000, 5000],
        }
    }
}

/// `POST /v1/net/switch`: move the service from LC `from` to LC `to`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SwitchBody {
    pub from: String,
    pub to: String,
    /// `path`, `readdress` or `seamless`.
    pub mode: String,
    #[serde(default)]
    pub options: SwitchOptions,
}

/// `POST /v1/net/back`: hand the service back to the LC the last switch moved it from (an
/// optional body).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SwitchBackBody {
    #[serde(default)]
    pub options: SwitchOptions,
}

/// `POST /v1/service/assign`: give LC `lc` the service address and make it the active LC.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AssignBody {
    pub lc: String,
}

/// `POST /v1/lcs/{id}/disks`: mount a host directory into a running LC.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AttachDiskBody {
    /// The host directory (an absolute path on the daemon's host).
    pub source: String,
    /// Where it appears inside the LC.
    pub at: String,
}

/// `POST /v1/lcs/{id}/nics`: plug a new NIC into a running LC and the host bridge.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AttachNicBody {
    /// Its name inside the LC.
    pub name: String,
    /// `a.b.c.d/n`.
    #[serde(default)]
    pub address: Option<String>,
    /// Default: derived from the LC and the name.
    #[serde(default)]
    pub mac: Option<String>,
}

/// The action of `POST /v1/lcs/{id}/{action}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LcAction {
    Boot,
    Stop,
    Reboot,
}

/// Everything the API can be asked. One variant per route; handlers only build these.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Status,
    ListLcs,
    GetLc(String),
    Lc {
        id: String,
        action: LcAction,
        body: LcActionBody,
    },
    ListPatches,
    GetPatch(String),
    ImportPatch(ImportBody),
    MarkPatch {
        id: String,
        apply_next: bool,
    },
    MarkPatches(MarksBody),
    StartRun(RunBody),
    ListRuns,
    GetRun(i64),
    Rollback(RollbackBody),
    MonitorRunOnce,
    MonitorStatus,
    /// The approval link's raw query string.
    Approve {
        query: String,
    },
    NetSwitch(SwitchBody),
    NetBack(SwitchBackBody),
    AssignService(AssignBody),
    RecoverRuns,
    AttachDisk {
        id: String,
        body: AttachDiskBody,
    },
    AttachNic {
        id: String,
        body: AttachNicBody,
    },
    /// `/metrics`: ingest the runs that ended since the last scrape into the hub's metrics
    /// and answer the gauges ([`crate::metrics::Gauges`]) as JSON.
    Scrape,
}

impl Command {
    /// A short name for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Status => "status",
            Command::ListLcs => "list_lcs",
            Command::GetLc(_) => "get_lc",
            Command::Lc { .. } => "lc_action",
            Command::ListPatches => "list_patches",
            Command::GetPatch(_) => "get_patch",
            Command::ImportPatch(_) => "import_patch",
            Command::MarkPatch { .. } => "mark_patch",
            Command::MarkPatches(_) => "mark_patches",
            Command::StartRun(_) => "start_run",
            Command::ListRuns => "list_runs",
            Command::GetRun(_) => "get_run",
            Command::Rollback(_) => "rollback",
            Command::MonitorRunOnce => "monitor_run_once",
            Command::MonitorStatus => "monitor_status",
            Command::Approve { .. } => "approve",
            Command::NetSwitch(_) => "net_switch",
            Command::NetBack(_) => "net_back",
            Command::AssignService(_) => "assign_service",
            Command::RecoverRuns => "recover_runs",
            Command::AttachDisk { .. } => "attach_disk",
            Command::AttachNic { .. } => "attach_nic",
            Command::Scrape => "scrape",
        }
    }
}

/// A successful answer: 200 or 202 and a JSON body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub accepted: bool,
    pub body: serde_json::Value,
}

impl Reply {
    pub fn ok(body: serde_json::Value) -> Reply {
        Reply {
            accepted: false,
            body,
        }
    }
    pub fn accepted(body: serde_json::Value) -> Reply {
        Reply {
            accepted: true,
            body,
        }
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let status = if self.accepted {
            StatusCode::ACCEPTED
        } else {
            StatusCode::OK
        };
        (status, axum::Json(self.body)).into_response()
    }
}

/// The stable error codes of the API (the `code` field of every error body).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body is not JSON, has unknown fields or wrong types.
    InvalidBody,
    /// The body needs `Content-Type: application/json`.
    UnsupportedMediaType,
    /// The body is larger than the daemon accepts.
    BodyTooLarge,
    /// A parameter (path or query) is malformed.
    BadRequest,
    /// No or a wrong bearer token (TCP only).
    Unauthorized,
    /// The LC, patch, run or challenge does not exist.
    NotFound,
    /// Another run holds the LC.
    Conflict,
    /// Well-formed but cannot be done now (LC not running, nothing marked, not configured…).
    Unprocessable,
    /// The approval was refused (wrong code, expired, used).
    Forbidden,
    /// The route exists but not with this method.
    MethodNotAllowed,
    /// The daemon is shutting down.
    Unavailable,
    /// The request took too long.
    Timeout,
    /// The host failed; the message says what.
    Internal,
}

impl ErrorCode {
    /// The one mapping from error codes to HTTP statuses.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::InvalidBody | ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
            ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::Conflict => StatusCode::CONFLICT,
            ErrorCode::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Timeout => StatusCode::REQUEST_TIMEOUT,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidBody => "invalid_body",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Unprocessable => "unprocessable",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Internal => "internal",
        }
    }
}

/// An API error: a stable code and a message that says what to do.
#[derive(Debug, Clone, thiserror::Error, Serialize)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"code": self.code.as_str(), "message": self.message});
        (self.code.status(), axum::Json(body)).into_response()
    }
}

/// What executes commands. The binary implements it with the CLI's own functions; calls are
/// blocking and run on the blocking pool.
pub trait Dispatch: Send + Sync + 'static {
    fn dispatch(&self, cmd: Command) -> Result<Reply, ApiError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_have_distinct_names_and_error_statuses() {
        let all = [
            ErrorCode::InvalidBody,
            ErrorCode::UnsupportedMediaType,
            ErrorCode::BodyTooLarge,
            ErrorCode::BadRequest,
            ErrorCode::Unauthorized,
            ErrorCode::NotFound,
            ErrorCode::Conflict,
            ErrorCode::Unprocessable,
            ErrorCode::Forbidden,
            ErrorCode::MethodNotAllowed,
            ErrorCode::Unavailable,
            ErrorCode::Timeout,
            ErrorCode::Internal,
        ];
        let names: std::collections::HashSet<_> = all.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), all.len());
        for c in all {
            assert!(c.status().as_u16() >= 400, "{c:?}");
            // serde's name is the wire name.
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
    }

    #[test]
    fn run_body_rejects_unknown_fields() {
        let e = serde_json::from_str::<RunBody>(r#"{"lc":"lc1","dryrun":true}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let b: RunBody = serde_json::from_str(r#"{"lc":"lc1"}"#).unwrap();
        assert_eq!(b.bundles, Vec::<String>::new());
        assert!(!b.dry_run);
    }

    #[test]
    fn switch_options_take_the_cli_defaults_and_refuse_unknown_fields() {
        let b: SwitchBody =
            serde_json::from_str(r#"{"from":"a","to":"b","mode":"readdress"}"#).unwrap();
        assert_eq!(b.options, SwitchOptions::default());
        assert_eq!(b.options.port, 8080);
        let o: SwitchBackBody = serde_json::from_str(r#"{"options":{"expect":"1.0.1"}}"#).unwrap();
        assert_eq!(o.options.expect, "1.0.1");
        assert_eq!(o.options.garp_refresh_ms, [1000, 5000]);
        for bad in [
            r#"{"from":"a","to":"b","mode":"readdress","port":1}"#,
            r#"{"from":"a","to":"b","mode":"readdress","options":{"prot":1}}"#,
        ] {
            let e = serde_json::from_str::<SwitchBody>(bad).unwrap_err();
            assert!(e.to_string().contains("unknown field"), "{e}");
        }
        let e = serde_json::from_str::<AttachNicBody>(r#"{"name":"eth1","ip":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }
}
