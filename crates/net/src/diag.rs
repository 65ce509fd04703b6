//! Bounded snapshots of network state, for the message of a check that failed: what the
//! checker's namespace and the standby saw (routes, neighbour entries, addresses, listening
//! sockets) when the answer did not come. Best effort: a part that cannot be read says why.

use std::path::Path;

use crate::netns::command_in;

/// At most this many characters of one part.
pub(crate) const PART_MAX: usize = 300;

/// `text` on one line (lines joined with ` | `), at most [`PART_MAX`] characters; `(none)`
/// when empty.
pub(crate) fn one_line(text: &str) -> String {
    let joined = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ");
    if joined.is_empty() {
        return "(none)".into();
    }
    match joined.char_indices().nth(PART_MAX) {
        Some((at, _)) => format!("{}…", &joined[..at]),
        None => joined,
    }
}

/// `program args` run in `netns`, as `label: output` on one line (see [`one_line`]).
pub(crate) fn run_in(netns: Option<&Path>, label: &str, program: &str, args: &[&str]) -> String {
    let out = command_in(netns, program)
        .map_err(|e| e.to_string())
        .and_then(|mut c| {
            c.args(args)
                .stdin(std::process::Stdio::null())
                .output()
                .map_err(|e| format!("cannot run {program}: {e}"))
        });
    let text = match out {
        Ok(o) if o.status.success() => one_line(&String::from_utf8_lossy(&o.stdout)),
        Ok(o) => format!(
            "{program} failed ({}): {}",
            o.status,
            one_line(&String::from_utf8_lossy(&o.stderr))
        ),
        Err(e) => e,
    };
    format!("{label}: {text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_one_bounded_line() {
        assert_eq!(one_line("a\n\n  b  \n"), "a | b");
        assert_eq!(one_line(" \n"), "(none)");
        let long = "é".repeat(PART_MAX + 50);
        let l = one_line(&long);
        assert_eq!(l.chars().count(), PART_MAX + 1);
        assert!(l.ends_with('…'));
    }

    #[test]
    fn a_command_that_fails_says_so() {
        let s = run_in(None, "route", "ip", &["route", "get", "not-an-address"]);
        assert!(s.starts_with("route: ip failed (exit status: "), "{s}");
        let s = run_in(None, "x", "po-no-such-program", &[]);
        assert!(s.starts_with("x: cannot run po-no-such-program: "), "{s}");
        let s = run_in(None, "lo", "ip", &["-o", "addr", "show", "dev", "lo"]);
        assert!(s.starts_with("lo: ") && s.contains("127.0.0.1/8"), "{s}");
    }
}
