//! The CLI as the daemon's client.
//!
//! The rule, for every verb the daemon serves: without `--direct`, when a daemon answers on
//! its socket (`[daemon] socket`, default `<run_dir>/daemon/patchover.sock`) the verb is sent there;
//! when none answers (or with `--direct`) it acts in this process. Both paths call the same
//! function (the daemon's `Dispatch` calls it on its side) and print its JSON with the same
//! printer, so the output, the exit code and the error message do not depend on the path.
//!
//! An API error becomes the same error the direct path raises: a refusal (not found,
//! unprocessable, conflict, invalid body…) is bad input, exit code 2; `internal` is a host
//! failure, exit code 1; both carry the daemon's message, which is the direct path's.

use anyhow::Context;
use patchover_daemon::ErrorCode;
use patchover_daemon::client::{Client, ClientError};

use super::{BadInput, Ctx};

/// The daemon to send a verb to: `None` with `--direct`, or when no daemon answers.
pub fn daemon(ctx: &Ctx) -> anyhow::Result<Option<Client>> {
    if ctx.direct {
        return Ok(None);
    }
    let config = ctx.config()?;
    let socket = &config.daemon.socket;
    Ok(Client::available(socket).then(|| Client::new(socket)))
}

/// An API error as the error the direct path gives.
pub fn client_error(e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Api(a) if a.code == ErrorCode::Internal => anyhow::Error::msg(a.message),
        ClientError::Api(a) if !matches!(a.code, ErrorCode::Timeout | ErrorCode::Unavailable) => {
            BadInput(a.message).into()
        }
        e => e.into(),
    }
}

/// One request to the daemon; its JSON answer, or the direct path's error.
pub fn call(
    c: &Client,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    c.call(method, path, body).map_err(client_error)
}

/// `s` as one URL path segment (ids are ASCII names, but a stray `/` or `?` must not change
/// the route).
pub fn segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Runs `direct` here, or `remote` against the daemon when one answers; either way the
/// verb's JSON.
pub fn route(
    ctx: &Ctx,
    remote: impl FnOnce(&Client) -> anyhow::Result<serde_json::Value>,
    direct: impl FnOnce() -> anyhow::Result<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    match daemon(ctx)? {
        Some(c) => remote(&c),
        None => direct(),
    }
}

/// [`route`] for a typed result: the daemon's JSON answer is read back into the type the
/// direct path returns, so one printer renders both.
pub fn route_typed<T: serde::de::DeserializeOwned>(
    ctx: &Ctx,
    remote: impl FnOnce(&Client) -> anyhow::Result<serde_json::Value>,
    direct: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    match daemon(ctx)? {
        Some(c) => {
            let v = remote(&c)?;
            serde_json::from_value(v)
                .context("the daemon's answer does not have the expected shape")
        }
        None => direct(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchover_daemon::ApiError;

    #[test]
    fn api_refusals_are_bad_input_and_internal_errors_host_failures() {
        let e = client_error(ClientError::Api(ApiError::new(
            ErrorCode::NotFound,
            "no patch \"x\"",
        )));
        assert_eq!(
            crate::cmd::error_kind(&e),
            patchover_app::ErrorKind::BadInput
        );
        assert_eq!(format!("{e:#}"), "no patch \"x\"");
        let e = client_error(ClientError::Api(ApiError::new(
            ErrorCode::Internal,
            "disk on fire",
        )));
        assert_eq!(
            crate::cmd::error_kind(&e),
            patchover_app::ErrorKind::Internal
        );
        assert_eq!(format!("{e:#}"), "disk on fire");
    }

    #[test]
    fn segments_are_escaped() {
        assert_eq!(segment("lc-1.a"), "lc-1.a");
        assert_eq!(segment("a/b?c"), "a%2Fb%3Fc");
    }
}
