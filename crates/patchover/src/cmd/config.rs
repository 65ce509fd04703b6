//! `patchover config check [FILE]`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use super::Ctx;

#[derive(Subcommand)]
pub enum ConfigCmd {
    /// Load a config file with every section checked and say whether it is good: `FILE: ok`
    /// and what it sets up, or each error as `file:line: key: message` (exit code 2).
    Check {
        /// The file to check (default: the `--config` file).
        file: Option<PathBuf>,
    },
}

pub fn run(c: ConfigCmd, ctx: &Ctx) -> anyhow::Result<ExitCode> {
    match c {
        ConfigCmd::Check { file } => {
            let file = file.unwrap_or_else(|| ctx.config_path.clone());
            let checked = patchover_app::config_check::check(&file);
            if ctx.json {
                println!("{}", serde_json::to_string_pretty(&checked)?);
            } else if checked.ok() {
                checked.lines().iter().for_each(|l| println!("{l}"));
            } else {
                checked.lines().iter().for_each(|l| eprintln!("{l}"));
            }
            Ok(if checked.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
    }
}
