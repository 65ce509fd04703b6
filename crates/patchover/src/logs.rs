//! Where the log goes, and how it looks.
//!
//! - Under systemd (`JOURNAL_STREAM` set, which systemd sets for a service whose stderr is the
//!   journal) and with journald's socket answering: native journal entries
//!   (`tracing-journald`), each with its priority (error 3, warning 4, info 6, debug and trace
//!   7), `MESSAGE`, `TARGET`, `CODE_FILE`/`CODE_LINE` and each field as `F_<NAME>`
//!   (`run = 3` → `F_RUN=3`), instead of text lines the journal would keep at one priority.
//! - Otherwise on stderr, as text (or JSON with `PATCHOVER_LOG_FORMAT=json`), coloured only
//!   when stderr is a terminal and `NO_COLOR` is unset or empty (<https://no-color.org>).
//!
//! `PATCHOVER_LOG` filters both (default `warn`). `tracing-journald` always sends to
//! `/run/systemd/journal/socket` (it has no setting for another path): the tests give the
//! process its own `/run` in a mount namespace, with a socket of theirs there.

use std::ffi::OsString;
use std::io::IsTerminal;

use tracing_journald::{Priority, PriorityMappings};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Where the log goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSink {
    Journald,
    Stderr { ansi: bool, json: bool },
}

impl LogSink {
    /// The choice, from what the environment says.
    pub fn choose(
        journal_stream: Option<OsString>,
        journald_answers: impl FnOnce() -> bool,
        stderr_is_terminal: bool,
        no_color: Option<OsString>,
        json: bool,
    ) -> LogSink {
        if journal_stream.is_some_and(|v| !v.is_empty()) && journald_answers() {
            return LogSink::Journald;
        }
        LogSink::Stderr {
            ansi: stderr_is_terminal && no_color.is_none_or(|v| v.is_empty()),
            json,
        }
    }
}

/// The journal's priority of each level.
pub fn priorities() -> PriorityMappings {
    PriorityMappings {
        error: Priority::Error,
        warn: Priority::Warning,
        info: Priority::Informational,
        debug: Priority::Debug,
        trace: Priority::Debug,
    }
}

/// Sets up the log for this process; returns where it goes.
pub fn init() -> LogSink {
    let filter = || {
        EnvFilter::try_from_env("PATCHOVER_LOG")
            .unwrap_or_else(|_| EnvFilter::new("warn,netlink_packet_route=error"))
    };
    let mut journald = None;
    let sink = LogSink::choose(
        std::env::var_os("JOURNAL_STREAM"),
        || {
            journald = tracing_journald::layer().ok();
            journald.is_some()
        },
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR"),
        std::env::var("PATCHOVER_LOG_FORMAT").is_ok_and(|v| v == "json"),
    );
    if let (LogSink::Journald, Some(layer)) = (sink, journald) {
        tracing_subscriber::registry()
            .with(filter())
            .with(layer.with_priority_mappings(priorities()))
            .init();
        return sink;
    }
    let (ansi, json) = match sink {
        LogSink::Stderr { ansi, json } => (ansi, json),
        LogSink::Journald => (false, false),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
    sink
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> Option<OsString> {
        Some(s.into())
    }

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        let stderr = |tty, nc| LogSink::choose(None, || true, tty, nc, false);
        assert_eq!(
            stderr(true, None),
            LogSink::Stderr {
                ansi: true,
                json: false
            }
        );
        assert_eq!(
            stderr(false, None),
            LogSink::Stderr {
                ansi: false,
                json: false
            }
        );
        assert_eq!(
            stderr(true, os("1")),
            LogSink::Stderr {
                ansi: false,
                json: false
            }
        );
        // An empty NO_COLOR is unset (no-color.org).
        assert_eq!(
            stderr(true, os("")),
            LogSink::Stderr {
                ansi: true,
                json: false
            }
        );
    }

    #[test]
    fn the_journal_only_under_systemd_and_when_journald_answers() {
        let c = |stream, answers| LogSink::choose(stream, || answers, false, None, true);
        assert_eq!(c(os("8:1234"), true), LogSink::Journald);
        assert_eq!(
            c(os("8:1234"), false),
            LogSink::Stderr {
                ansi: false,
                json: true
            }
        );
        assert_eq!(
            c(None, true),
            LogSink::Stderr {
                ansi: false,
                json: true
            }
        );
        assert_eq!(
            c(os(""), true),
            LogSink::Stderr {
                ansi: false,
                json: true
            }
        );
    }

    #[test]
    fn levels_map_to_the_journals_priorities() {
        let p = priorities();
        let n = [p.error, p.warn, p.info, p.debug, p.trace].map(|p| p as u8 - b'0');
        assert_eq!(n, [3, 4, 6, 7, 7]);
    }
}
