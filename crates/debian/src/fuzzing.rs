//! Fuzz target body for what the host parses of a Debian LC's own words: the answers of a
//! running VM's agent to from-apt's commands ([`AgentReader`]: the packed dpkg status,
//! `/etc/os-release`, `md5sum`, `df -P`) and the status text itself. Called by the libFuzzer
//! target `fuzz/fuzz_targets/debian_reader.rs` (`scripts/fuzz`). Whatever the LC answers, the
//! reader must refuse or return values within its bounds, never panic.

use std::cell::Cell;

use crate::fromapt::suite_of_os_release;
use crate::reader::{AgentReader, ExecOut, LcReader, MAX_OS_RELEASE_BYTES};
use crate::status::{DpkgStatus, MAX_STATUS_BYTES};

/// Separates the answers in a fuzz input.
const SEP: &[u8] = b"\n--8<--\n";

/// `data` as the LC's answers, in the order the reader asks: the packed status, os-release,
/// `md5sum`, `df`; before each, one byte picks its exit status. The status text parser also
/// reads the first answer as it is. Returns whether the status was accepted.
pub fn agent_reader(data: &[u8]) -> bool {
    let mut answers: Vec<ExecOut> = split(data)
        .map(|a| match a.split_first() {
            Some((&s, out)) => ExecOut {
                status: (s != 0xff).then_some(i32::from(s % 4)),
                stdout: out.to_vec(),
            },
            None => ExecOut::default(),
        })
        .collect();
    answers.resize(4, ExecOut::default());
    if let Ok(text) = std::str::from_utf8(&answers[0].stdout) {
        check_status(DpkgStatus::parse(text.to_owned()));
    }
    let next = Cell::new(0usize);
    let exec = |_: &[String]| -> Result<ExecOut, Box<dyn std::error::Error + Send + Sync>> {
        let i = next.get();
        next.set(i + 1);
        Ok(answers.get(i).cloned().unwrap_or_default())
    };
    let reader = AgentReader::new("lc-fuzz", &exec);
    let status = DpkgStatus::read(&reader);
    let accepted = status.is_ok();
    if let Ok(s) = &status {
        assert!(s.text.len() as u64 <= MAX_STATUS_BYTES);
    }
    next.set(1);
    if let Ok(Some(text)) = reader.os_release() {
        assert!(text.len() as u64 <= MAX_OS_RELEASE_BYTES);
        if let Some(suite) = suite_of_os_release(&text) {
            assert!(!suite.is_empty() && suite.bytes().all(|b| b.is_ascii_alphanumeric()));
        }
    }
    let asked = ["/etc/a.conf", "/etc/b b.conf", "/etc/c.conf"];
    if let Ok(md5s) = reader.conffile_md5s(&asked) {
        for (path, md5) in &md5s {
            assert!(asked.contains(&path.as_str()), "{path:?} was not asked");
            assert!(md5.len() == 32 && md5.bytes().all(|b| b.is_ascii_hexdigit()));
        }
    }
    if let Ok(free) = reader.free_bytes() {
        // KiB as bytes; a figure past u64 saturates.
        assert!(free.is_some_and(|b| b % 1024 == 0 || b == u64::MAX));
    }
    accepted
}

fn split(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let r = rest?;
        match r.windows(SEP.len()).position(|w| w == SEP) {
            Some(i) => {
                rest = Some(&r[i + SEP.len()..]);
                Some(&r[..i])
            }
            None => {
                rest = None;
                Some(r)
            }
        }
    })
}

/// A parsed status: every package it lists is one dpkg calls installed, and the
/// architecture is the `dpkg` package's.
fn check_status(s: Option<DpkgStatus>) {
    let Some(s) = s else { return };
    let dpkg = s
        .installed
        .get("dpkg")
        .expect("a status without dpkg was accepted");
    assert_eq!(dpkg.architecture, s.architecture);
    for (name, p) in &s.installed {
        assert_eq!(name, &p.package);
        assert_eq!(p.version, p.version.trim());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(name: &str) -> Vec<u8> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/corpus/debian_reader")
            .join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    /// The committed seed is a whole set of answers the reader takes (so the fuzzer starts
    /// past the base64 and gzip framing); an LC without a status is refused.
    #[test]
    fn the_seed_answers_are_taken_and_a_missing_status_is_not() {
        assert!(agent_reader(&seed("seed-answers")));
        assert!(!agent_reader(&seed("seed-no-status")));
        assert!(!agent_reader(&seed("seed-raw-status")), "not packed");
        assert!(!agent_reader(b""));
    }
}
