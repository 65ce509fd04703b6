//! `patchover doctor`: the host's kernel features and programs, each with its fix.

use std::process::ExitCode;

use patchover_app::doctor::{self, CheckState, Doctor, Needs};

use super::Ctx;

pub fn run(ctx: &Ctx) -> anyhow::Result<ExitCode> {
    // A config that is there decides what is needed (a bad one is refused); without one,
    // everything is checked and only the base features are needed.
    let config = if ctx.config_path.exists() {
        Some(ctx.config()?)
    } else {
        None
    };
    let d = doctor::run(config.as_ref(), doctor::checks(&Needs::of(config.as_ref())));
    if ctx.json {
        println!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        print!("{}", render(&d));
    }
    Ok(if d.failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn render(d: &Doctor) -> String {
    let rows: Vec<Vec<String>> = d
        .checks
        .iter()
        .map(|c| {
            let state = match c.state {
                CheckState::Ok => "ok",
                CheckState::Missing => "MISSING",
                CheckState::NotNeeded => "missing, not needed by this config",
            };
            vec![c.name.clone(), state.to_owned(), c.detail.clone()]
        })
        .collect();
    let mut out = match &d.config {
        Some(p) => format!("needs of {}\n", p.display()),
        None => "no config: the base features are needed\n".to_owned(),
    };
    out += &super::table(&["CHECK", "STATE", "FOUND"], &rows);
    for c in d.checks.iter().filter(|c| c.state != CheckState::Ok) {
        out += &format!("{}: {}\n", c.name, c.fix.as_deref().unwrap_or(""));
    }
    out
}
