//! `patchover approval-code` (the administrator's side: derive the code for a decision) and
//! `patchover approve` (give a decision on the host). Both go through the same code paths as
//! a mailed reply (`patchover_monitor::approval`, `Monitor::decide`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use patchover_monitor::{Decision, Secret};

use super::monitor::chain;
use super::{BadInput, Ctx};
use patchover_app::monitor::{MonitorEnv, SpawnStarter};

#[derive(Args)]
pub struct ApprovalCodeArgs {
    /// The challenge from the notice mail.
    pub challenge: String,
    /// `approve all`, `reject all`, or `approve ID…` / `reject ID…`.
    #[arg(long, default_value = "approve all")]
    pub decision: String,
    /// The shared approval secret (default: [monitor] secret_file of the config).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// Also print an approval link under this base URL (the daemon's approve endpoint).
    #[arg(long)]
    pub link: Option<String>,
}

#[derive(Args)]
pub struct ApproveArgs {
    /// The challenge from the notice mail (see `patchover monitor status`).
    pub challenge: String,
    /// `approve all`, `reject all`, or `approve ID…` / `reject ID…`.
    #[arg(long, default_value = "approve all")]
    pub decision: String,
    /// The approval code; without it the decision is taken as the host's own (root on the
    /// host can read the secret anyway).
    #[arg(long)]
    pub code: Option<String>,
}

fn decision(s: &str) -> anyhow::Result<Decision> {
    Ok(s.parse::<Decision>().map_err(|e| BadInput(chain(&e)))?)
}

pub fn run_code(a: ApprovalCodeArgs, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let d = decision(&a.decision)?;
    if !patchover_monitor::approval::is_challenge(&a.challenge) {
        return Err(BadInput(format!(
            "{:?} is not a challenge (32 letters and digits, as in the notice mail)",
            a.challenge
        ))
        .into());
    }
    let path = match a.secret_file {
        Some(p) => p,
        None => {
            let cfg = ctx.config()?;
            cfg.monitor()?.secret_file.clone().ok_or_else(|| {
                BadInput("no --secret-file and no [monitor] secret_file in the config".into())
            })?
        }
    };
    let secret = Secret::from_file(&path).map_err(|e| BadInput(chain(&e)))?;
    let code = secret.code(&a.challenge, &d);
    let link = a
        .link
        .as_deref()
        .map(|base| patchover_monitor::approval::approval_link(base, &a.challenge, &d, &code))
        .transpose()
        .map_err(|e| BadInput(chain(&e)))?;
    if ctx.json {
        println!(
            "{}",
            serde_json::json!({"challenge": a.challenge, "decision": d.canonical(), "code": code, "link": link})
        );
    } else {
        println!("Decision: {}\nCode: {code}", d.canonical());
        if let Some(l) = link {
            println!("Link: {l}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_approve(a: ApproveArgs, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    let d = decision(&a.decision)?;
    let (env, mut store) = MonitorEnv::open(ctx.config()?)?;
    let starter = SpawnStarter::new(&env.config)?;
    let m = env.monitor(&starter);
    let out = m
        .decide(&mut store, &a.challenge, &d, a.code.as_deref(), "host")
        .map_err(|e| BadInput(chain(&e)))?;
    if ctx.json {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!(
            "challenge {}: {} ({})",
            out.challenge,
            out.decision,
            out.patches.join(", ")
        );
        for h in &out.started {
            println!(
                "started patch cycle on {} for {} (pid {})",
                h.lc,
                h.bundles.join(", "),
                h.pid.map_or("-".to_owned(), |p| p.to_string())
            );
        }
        for e in &out.start_errors {
            eprintln!("warning: {e}");
        }
    }
    Ok(if out.start_errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
