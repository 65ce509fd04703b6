//! `patchover status`: one screen of the host (LCs, service, runs, patches, monitor, daemon).

use std::process::ExitCode;

use patchover_app::status::{DaemonState, Status};

use super::Ctx;

pub fn run(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let v: Status = super::remote::route_typed(
        ctx,
        |c| super::remote::call(c, "GET", "/v1/status", None),
        || {
            let env = ctx.env()?;
            let socket = env.config.daemon.socket.clone();
            let daemon = DaemonState {
                answers: patchover_daemon::client::Client::available(&socket),
                socket,
                pid: None,
                running_runs: None,
            };
            Ok(patchover_app::status::status(&env, daemon)?)
        },
    )?;
    if ctx.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", render(&v));
    }
    Ok(ExitCode::SUCCESS)
}

fn time(ms: i64) -> String {
    patchover_monitor::index::rfc3339(ms.div_euclid(1000))
}

fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// The status as text: a line or a table per part.
pub fn render(s: &Status) -> String {
    let mut out = format!("patchover {}\n\n", s.version);
    let lcs: Vec<Vec<String>> = s
        .lcs
        .iter()
        .map(|l| {
            vec![
                l.id.clone(),
                l.backend.to_string(),
                serde_json::to_value(l.role)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                l.state.map_or_else(
                    || format!("unknown: {}", l.error.as_deref().unwrap_or("")),
                    |st| st.to_string(),
                ),
                or_dash(l.pid),
            ]
        })
        .collect();
    out += &super::table(&["LC", "BACKEND", "ROLE", "STATE", "PID"], &lcs);
    out += &format!("\n{}\n", service_line(s));
    out += &runs(s);
    out += &patches(s);
    out += &monitor(s);
    out += &daemon_line(&s.daemon);
    out
}

fn service_line(s: &Status) -> String {
    let v = &s.service;
    let at = format!(
        "service {} port {}",
        v.address.as_deref().unwrap_or("(no service_address)"),
        v.port
    );
    let on = match (&v.lc, &v.lc_address) {
        (Some(lc), Some(a)) => format!("on LC {lc} ({a})"),
        (Some(lc), None) => format!("on LC {lc}"),
        (None, _) => "on no LC".to_owned(),
    };
    let answers = match v.answers {
        Some(true) => "answers".to_owned(),
        Some(false) => format!("does NOT answer: {}", v.detail.as_deref().unwrap_or("")),
        None => format!("not checked: {}", v.detail.as_deref().unwrap_or("")),
    };
    format!("{at} {on}: {answers}")
}

fn runs(s: &Status) -> String {
    if s.runs.is_empty() {
        return "\nno runs yet\n".to_owned();
    }
    let rows: Vec<Vec<String>> = s
        .runs
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                r.kind.clone(),
                r.lc.clone(),
                r.mode.clone(),
                r.outcome.clone().unwrap_or_else(|| "running".to_owned()),
                r.state.clone(),
                time(r.started_ms),
                r.duration_ms
                    .map_or_else(|| "-".to_owned(), |d| format!("{:.1} s", d as f64 / 1000.0)),
            ]
        })
        .collect();
    let head = [
        "RUN",
        "KIND",
        "LC",
        "MODE",
        "OUTCOME",
        "LAST STEP",
        "STARTED",
        "TOOK",
    ];
    format!("\n{}", super::table(&head, &rows))
}

fn patches(s: &Status) -> String {
    let ids = |v: &[patchover_app::status::PatchLine]| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.iter()
                .map(|p| p.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    format!(
        "\npatches approved for the next run: {}\npatches pending approval: {}\n",
        ids(&s.patches.approved),
        ids(&s.patches.pending)
    )
}

fn monitor(s: &Status) -> String {
    let Some(m) = &s.monitor else {
        return "monitor: not configured\n".to_owned();
    };
    let mut out = format!("monitor: {} open approval challenges\n", m.open_challenges);
    for f in &m.feeds {
        out += &format!(
            "  feed {}: last poll {}, last good {}, {} failures in a row{}\n",
            f.name,
            f.last_poll_ms.map_or_else(|| "never".to_owned(), time),
            f.last_ok_ms.map_or_else(|| "never".to_owned(), time),
            f.failures,
            f.last_error
                .as_ref()
                .map_or_else(String::new, |e| format!(", last error: {e}"))
        );
    }
    out
}

fn daemon_line(d: &DaemonState) -> String {
    let socket = d.socket.display();
    match (d.answers, d.pid) {
        (true, Some(pid)) => format!(
            "daemon: answers on {socket} (pid {pid}, {} runs going)\n",
            d.running_runs.unwrap_or(0)
        ),
        (true, None) => format!("daemon: answers on {socket}\n"),
        (false, _) => format!("daemon: not running (nothing answers on {socket})\n"),
    }
}
