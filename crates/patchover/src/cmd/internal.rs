//! `patchover internal …`: hidden verbs that patchover runs as fresh processes of its own
//! binary, to create and enter LC namespaces (see `patchover_lc::ns::launch`), to announce an
//! address later, and to guard a run or a frozen LC against this process's death; and the
//! two build steps of the package (`scripts/deb`): `gen-man DIR`, `gen-completions DIR`
//! ([`super::docgen`]).
//!
//! Each helper is a typed call in the crate that owns it, which writes its own arguments
//! ([`HelperCall`]) and reads them back; this dispatcher only hands the words over and runs
//! what they parse to.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Subcommand;
use patchover_core::helper::HelperArgsError;
use patchover_lc::helper::LcHelper;
use patchover_net::refresh::Refresh;
use patchover_orchestrator::RunGuardHelper;

#[derive(Subcommand)]
#[command(disable_help_subcommand = true)]
pub enum InternalCmd {
    /// Write the man pages (`patchover.1`, one per verb) into DIR.
    GenMan { dir: std::path::PathBuf },
    /// Write the bash, zsh and fish completions into DIR.
    GenCompletions { dir: std::path::PathBuf },
    /// `<verb> <args…>` of one helper, read by that helper's own type.
    #[command(external_subcommand)]
    Call(Vec<OsString>),
}

/// A helper call, parsed.
#[derive(Debug, PartialEq, Eq)]
enum Helper {
    Lc(LcHelper),
    GarpRefresh(Refresh),
    RunGuard(RunGuardHelper),
}

impl Helper {
    /// `words` is the verb, then its arguments.
    fn parse(words: &[OsString]) -> Result<Helper, HelperArgsError> {
        let (verb, args) = words.split_first().unzip();
        let verb = verb.map(|v| v.to_string_lossy()).unwrap_or_default();
        let args = args.unwrap_or_default();
        match &*verb {
            Refresh::VERB => Refresh::parse(args).map(Helper::GarpRefresh),
            RunGuardHelper::VERB => RunGuardHelper::parse(args).map(Helper::RunGuard),
            v if LcHelper::VERBS.contains(&v) => LcHelper::parse(v, args).map(Helper::Lc),
            _ => Err(HelperArgsError::UnknownVerb {
                verb: verb.into_owned(),
                known: LcHelper::VERBS
                    .into_iter()
                    .chain([Refresh::VERB, RunGuardHelper::VERB])
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }
}

pub fn run(cmd: InternalCmd) -> anyhow::Result<ExitCode> {
    let words = match cmd {
        InternalCmd::GenMan { dir } => {
            super::docgen::man_pages(&dir)?;
            return Ok(ExitCode::SUCCESS);
        }
        InternalCmd::GenCompletions { dir } => {
            super::docgen::completions(&dir)?;
            return Ok(ExitCode::SUCCESS);
        }
        InternalCmd::Call(words) => words,
    };
    let code = match Helper::parse(&words)? {
        Helper::Lc(call) => call.run().map_err(anyhow::Error::msg)?,
        Helper::GarpRefresh(refresh) => {
            refresh.run()?;
            0
        }
        Helper::RunGuard(RunGuardHelper) => return run_guard(),
    };
    Ok(ExitCode::from(
        u8::try_from(code.clamp(0, 255)).unwrap_or(1),
    ))
}

/// Says `armed`, waits on stdin, and recovers the run at once unless told `disarm` (the run's
/// process died: its run lock is free now).
fn run_guard() -> anyhow::Result<ExitCode> {
    use std::io::{BufRead, Write};
    let mut out = std::io::stdout();
    writeln!(out, "armed")?;
    out.flush()?;
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    if line.trim() == "disarm" {
        return Ok(ExitCode::SUCCESS);
    }
    tracing::info!("the patch run's process ended without disarming its guard; recovering");
    let config = std::env::var_os("PATCHOVER_CONFIG")
        .map(std::path::PathBuf::from)
        .ok_or_else(|| anyhow::anyhow!("PATCHOVER_CONFIG is not set"))?;
    let ctx = super::Ctx {
        config_path: config,
        json: true,
        quiet: true,
        direct: true,
    };
    super::patch::run_runs(super::patch::RunsCmd::Recover, &ctx)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::Parser;
    use patchover_core::helper::HelperCall;

    use super::*;

    /// The words after `internal` of a command that a helper type built.
    fn words(cmd: &std::process::Command) -> Vec<OsString> {
        let all: Vec<OsString> = cmd.get_args().map(OsString::from).collect();
        assert_eq!(all[0], "internal");
        all[1..].to_vec()
    }

    #[test]
    fn the_command_line_hands_every_helper_its_words_untouched() {
        let exe = Path::new("/usr/bin/patchover");
        let exec = LcHelper::Exec(patchover_lc::helper::Exec {
            pid: 4,
            cgroup_procs: vec!["/c/cgroup.procs".into()],
            argv: vec!["sh".into(), "-c".into(), "x -- --help".into()],
        });
        let cmds = [
            exec.command(exe),
            LcHelper::Launch.command(exe),
            RunGuardHelper.command(exe),
        ];
        for cmd in &cmds {
            let argv: Vec<OsString> = std::iter::once(OsString::from("patchover"))
                .chain(cmd.get_args().map(OsString::from))
                .collect();
            let cli = crate::Cli::try_parse_from(&argv).unwrap();
            let crate::Command::Internal(InternalCmd::Call(got)) = cli.command else {
                panic!("not internal: {argv:?}");
            };
            assert_eq!(got, words(cmd));
        }
        let back = Helper::parse(&words(&cmds[0])).unwrap();
        assert_eq!(back, Helper::Lc(exec));
        assert_eq!(
            Helper::parse(&words(&cmds[2])).unwrap(),
            Helper::RunGuard(RunGuardHelper)
        );
    }

    #[test]
    fn an_unknown_helper_is_refused_naming_the_known_ones() {
        let e = Helper::parse(&["garp".into()]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "internal: unknown helper \"garp\"; one of: launch, exec, netcfg, attach-disk, \
             thaw-guard, garp-refresh, run-guard"
        );
        assert!(Helper::parse(&[]).is_err());
    }
}
