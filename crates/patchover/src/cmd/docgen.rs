//! `patchover internal gen-man DIR` and `gen-completions DIR`: the man pages (`clap_mangen`)
//! and the bash, zsh and fish completions (`clap_complete`) of this very binary's argument
//! parser, so what the package installs (`scripts/deb`) can never drift from the verbs.
//! Hidden verbs (`internal`) get no page and are not completed.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;

/// The binary's name: the pages' and the completions' command.
const BIN_NAME: &str = "patchover";

/// The shells completions are written for, and the file each gets in `DIR`.
pub const SHELLS: [(Shell, &str); 3] = [
    (Shell::Bash, "patchover.bash"),
    (Shell::Zsh, "_patchover"),
    (Shell::Fish, "patchover.fish"),
];

/// The parser without its hidden verbs: `clap_complete` would offer them (clap has no way to
/// drop a subcommand, so the root is built again from the parser's own parts).
fn command() -> clap::Command {
    let full = crate::Cli::command();
    debug_assert_eq!(full.get_name(), BIN_NAME);
    let mut root = clap::Command::new(BIN_NAME)
        .version(env!("CARGO_PKG_VERSION"))
        .disable_help_subcommand(true);
    if let Some(about) = full.get_about() {
        root = root.about(about.clone());
    }
    for arg in full.get_arguments() {
        root = root.arg(arg.clone());
    }
    for verb in full.get_subcommands().filter(|s| !s.is_hide_set()) {
        root = root.subcommand(verb.clone());
    }
    root
}

fn create(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// Writes `patchover.1` and one page per visible verb (`patchover-lc-boot.1`, …) into `dir`.
pub fn man_pages(dir: &Path) -> anyhow::Result<()> {
    create(dir)?;
    clap_mangen::generate_to(command(), dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))
}

/// Writes the completion scripts of [`SHELLS`] into `dir`; returns their paths.
pub fn completions(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    create(dir)?;
    SHELLS
        .iter()
        .map(|(shell, _)| {
            clap_complete::generate_to(*shell, &mut command(), BIN_NAME, dir)
                .with_context(|| format!("writing {shell} completions into {}", dir.display()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shell_gets_the_file_name_the_package_installs() {
        let t = tempfile::tempdir().unwrap();
        let written = completions(t.path()).unwrap();
        let names: Vec<_> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, SHELLS.map(|(_, n)| n.to_owned()));
    }
}
