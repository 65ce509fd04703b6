//! Issue 25 item 5: how the log looks. Under systemd (`JOURNAL_STREAM`) the entries go to
//! journald natively, with priorities and fields; on stderr, colours only on a terminal and
//! never with `NO_COLOR`. These machines run no systemd: journald is a datagram socket the test
//! binds, put where `tracing-journald` sends (`/run/systemd/journal/socket`, a path the crate
//! does not let one change) in a `/run` of the process's own (a mount namespace).

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_patchover");

/// One journal entry in journald's native format: `NAME=value\n`, or `NAME\n`, a 64-bit
/// little-endian length, the value and `\n`.
fn entry(mut d: &[u8]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    while !d.is_empty() {
        let end = d
            .iter()
            .position(|&b| b == b'\n' || b == b'=')
            .expect("a name");
        let name = String::from_utf8_lossy(&d[..end]).into_owned();
        let (value, rest) = if d[end] == b'=' {
            let nl = end
                + d[end..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .expect("a line end");
            (&d[end + 1..nl], &d[nl + 1..])
        } else {
            let len = u64::from_le_bytes(d[end + 1..end + 9].try_into().unwrap()) as usize;
            let v = &d[end + 9..end + 9 + len];
            assert_eq!(
                d[end + 9 + len],
                b'\n',
                "{name}: no newline after the value"
            );
            (v, &d[end + 10 + len..])
        };
        out.insert(name, String::from_utf8_lossy(value).into_owned());
        d = rest;
    }
    out
}

/// Runs patchover with `args` under "systemd": `JOURNAL_STREAM` set, and journald's socket
/// path, in the process's own `/run`, leading to `sock`.
fn under_systemd(sock: &Path, args: &[&str]) -> Output {
    let script = format!(
        "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal \
         && ln -s {} /run/systemd/journal/socket && exec \"$0\" \"$@\"",
        sock.display()
    );
    Command::new("unshare")
        .args(["-m", "sh", "-c", &script, BIN])
        .args(args)
        .env("JOURNAL_STREAM", "8:4242")
        .env_remove("PATCHOVER_LOG")
        .env_remove("PATCHOVER_CONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A command that fails, under systemd: its failure is an entry of its own at priority err (3),
/// with the message, the target and the fields (`F_` and the name in capitals); stderr still
/// says it once, as text.
#[test]
fn under_systemd_a_failure_is_a_native_journal_entry_at_priority_err() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("journal.sock");
    let journal = UnixDatagram::bind(&sock).unwrap();
    journal
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let missing = d.path().join("no-such-config.toml");
    let out = under_systemd(
        &sock,
        &["--config", missing.to_str().unwrap(), "runs", "list"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(stderr.starts_with("error: config"), "{stderr}");
    let mut buf = vec![0u8; 65536];
    let e = loop {
        // The layer's first datagram is empty: it asks whether journald is there.
        let n = journal.recv(&mut buf).expect("a journal entry");
        if n > 0 {
            break entry(&buf[..n]);
        }
    };
    assert_eq!(e["PRIORITY"], "3", "{e:?}");
    assert_eq!(e["MESSAGE"], "patchover failed", "{e:?}");
    assert_eq!(e["TARGET"], "patchover", "{e:?}");
    assert_eq!(
        e["F_EXIT_CODE"],
        out.status.code().unwrap().to_string(),
        "{e:?}"
    );
    assert!(e["F_ERROR"].contains("no-such-config.toml"), "{e:?}");
    assert!(e["CODE_FILE"].ends_with("main.rs"), "{e:?}");
    assert_eq!(e["SYSLOG_IDENTIFIER"], "patchover", "{e:?}");
}

/// `disk copy` of a small tree with info logs on (`--json`: no progress bar), stderr being
/// what `wrap` makes of the command. Returns its stdout and stderr (or the terminal's output).
fn logged_copy(d: &Path, name: &str, wrap: impl FnOnce(&[&str]) -> Command) -> String {
    let src = d.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), "x").unwrap();
    let dst = d.join(name);
    let args = [
        "--json",
        "disk",
        "copy",
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
    ];
    let out = wrap(&args)
        .env("PATCHOVER_LOG", "info")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("disk copy complete"), "{text}");
    text
}

/// `patchover args` on a terminal (a pty made by `script`), `NO_COLOR` set to `no_color`.
fn on_a_terminal(args: &[&str], no_color: Option<&str>) -> Command {
    let line = std::iter::once(BIN)
        .chain(args.iter().copied())
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let mut c = Command::new("script");
    c.args(["-q", "-e", "-c", &line, "/dev/null"]);
    match no_color {
        Some(v) => c.env("NO_COLOR", v),
        None => c.env_remove("NO_COLOR"),
    };
    c
}

#[test]
fn log_colours_only_on_a_terminal_and_never_with_no_color() {
    let d = tempfile::tempdir().unwrap();
    let piped = logged_copy(d.path(), "piped", |a| {
        let mut c = Command::new(BIN);
        c.args(a).env_remove("NO_COLOR");
        c
    });
    assert!(!piped.contains('\x1b'), "{piped:?}");
    let tty = logged_copy(d.path(), "tty", |a| on_a_terminal(a, None));
    assert!(tty.contains("\x1b["), "{tty:?}");
    let no_color = logged_copy(d.path(), "no-color", |a| on_a_terminal(a, Some("1")));
    assert!(!no_color.contains('\x1b'), "{no_color:?}");
}
