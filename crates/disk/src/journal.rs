//! The write history on disk (seed fig. 10), one line per entry, appended and flushed per round.
//!
//! ```text
//! <unix-time-ns> <op> <offset> <length> <path>
//! ```
//!
//! `op` is a trapped write (`modify`, `attrib`, `create`, `delete`, `moved_from`, `moved_to`,
//! `overflow`), a range replay found by block hashes and shipped (`ship`), or a marker (`start`,
//! `round`, `cut`, `done`). `offset`/`length` are decimal bytes, or `-` where the trap cannot see
//! them. `path` is relative to the disk root (`.` is the root), with every byte outside `!`..`~`
//! and every `%` written as `%XX`, so a line is always one line. The journal lives in the
//! destination's incomplete marker (`<dst>/.patchover-incomplete/history`, or
//! `<dst>.patchover-incomplete/history` for an image file) and goes with it when the copy completes;
//! [`crate::CopyOptions::keep_history`] keeps a copy next to the destination.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// An append-only history file.
pub struct Journal {
    path: PathBuf,
    out: BufWriter<File>,
    pub entries: u64,
}

impl Journal {
    pub fn create(path: &Path) -> io::Result<Journal> {
        let f = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Journal {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(64 * 1024, f),
            entries: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one entry; `range` is `(offset, length)` where known.
    pub fn append(&mut self, op: &str, range: Option<(u64, u64)>, rel: &Path) -> io::Result<()> {
        let ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let (o, l) = match range {
            Some((o, l)) => (o.to_string(), l.to_string()),
            None => ("-".into(), "-".into()),
        };
        writeln!(self.out, "{ns} {op} {o} {l} {}", escape(rel))?;
        self.entries += 1;
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Escapes a relative path for one journal field.
pub fn escape(rel: &Path) -> String {
    let b = rel.as_os_str().as_bytes();
    if b.is_empty() {
        return ".".into();
    }
    let mut s = String::with_capacity(b.len());
    for &c in b {
        if (b'!'..=b'~').contains(&c) && c != b'%' {
            s.push(c as char);
        } else {
            s.push_str(&format!("%{c:02X}"));
        }
    }
    s
}

/// Reverses [`escape`].
pub fn unescape(s: &str) -> Option<PathBuf> {
    if s == "." {
        return Some(PathBuf::new());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(&out)))
}

/// One parsed journal line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub time_ns: u128,
    pub op: String,
    pub range: Option<(u64, u64)>,
    pub path: PathBuf,
}

/// Parses a journal's text; malformed lines (a torn last line after a crash) are skipped.
pub fn parse(text: &str) -> Vec<Entry> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split(' ');
            let time_ns = it.next()?.parse().ok()?;
            let op = it.next()?.to_string();
            let o = it.next()?;
            let len = it.next()?;
            let path = unescape(it.next()?)?;
            if it.next().is_some() {
                return None;
            }
            let range = match (o, len) {
                ("-", "-") => None,
                (o, l) => Some((o.parse().ok()?, l.parse().ok()?)),
            };
            Some(Entry {
                time_ns,
                op,
                range,
                path,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_round_trips_odd_names() {
        for p in ["", "a/b", "with space", "new\nline", "100%", "ü/ß"] {
            let e = escape(Path::new(p));
            assert!(!e.contains(' ') && !e.contains('\n'), "{e}");
            assert_eq!(unescape(&e).unwrap(), PathBuf::from(p));
        }
    }

    #[test]
    fn journal_lines_parse_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("history");
        let mut j = Journal::create(&p).unwrap();
        j.append("modify", None, Path::new("etc/passwd")).unwrap();
        j.append("ship", Some((4096, 8192)), Path::new("big img"))
            .unwrap();
        j.flush().unwrap();
        let mut text = std::fs::read_to_string(&p).unwrap();
        text.push_str("123 torn"); // a crash mid-line
        let e = parse(&text);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].op, "modify");
        assert_eq!(e[0].range, None);
        assert_eq!(e[1].range, Some((4096, 8192)));
        assert_eq!(e[1].path, PathBuf::from("big img"));
        assert_eq!(j.entries, 2);
    }
}
