//! Running the host's Debian tools (mmdebstrap, apt-get, dpkg-deb): one error type that names
//! the program and keeps the end of what it said.

use std::process::{Command, Output, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("cannot run {program} (apt-get install {package})")]
    Spawn {
        program: String,
        package: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {tail}")]
    Failed {
        program: String,
        status: String,
        tail: String,
    },
}

/// Runs `cmd` (stdin empty) and returns its output if it exits with 0.
pub fn run(mut cmd: Command, package: &'static str) -> Result<Output, ToolError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ToolError::Spawn {
            program: program.clone(),
            package,
            source,
        })?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(ToolError::Failed {
            program,
            status: out.status.to_string(),
            tail: tail(&out),
        })
    }
}

/// The last lines of stderr (else stdout), for an error message.
pub fn tail(out: &Output) -> String {
    let text = if out.stderr.iter().any(|b| !b.is_ascii_whitespace()) {
        &out.stderr
    } else {
        &out.stdout
    };
    let text = String::from_utf8_lossy(text);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(8)..].join(" | ")
}
