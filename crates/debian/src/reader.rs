//! What `from-apt` reads of an LC, and the two ways it reads it.
//!
//! - [`RootReader`]: the LC's system disk as the host sees it (a directory disk, or a stopped
//!   VM's image mounted read-only), through [`LcRoot`]: bounded reads of regular files, links
//!   resolved inside the root. The conffiles' MD5s are computed here, in Rust, on those reads.
//! - [`AgentReader`]: a *running* VM, through its agent's exec. A VM's image is being written
//!   by its guest while it runs, so the host never mounts it then; the guest's own tools read
//!   its files instead (`gzip`, `base64`, `cat`, `md5sum`, `df`, all in every Debian system:
//!   `gzip` and `coreutils` are Essential).
//!
//! Everything an LC says is untrusted (docs/lc-untrusted.md): the answers are bounded
//! ([`MAX_STATUS_BYTES`] unpacked, the agent's 1 MiB of output), parsed strictly (an answer
//! that is not exactly the expected shape is refused, never guessed at), and only used as
//! apt's status, for the conffile check and for the free-space figure. A lie can only make
//! from-apt offer fewer updates or refuse (docs/debian.md, "Threat model").

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use base64::Engine;
use md5::{Digest, Md5};
use patchover_lcroot::LcRoot;

use crate::status::{MAX_STATUS_BYTES, STATUS_PATH, StatusError};

/// The largest `/etc/os-release` read.
pub const MAX_OS_RELEASE_BYTES: u64 = 64 * 1024;
/// The largest conffile hashed from the host (a conffile is a configuration file: small).
pub const MAX_CONFFILE_BYTES: u64 = 16 << 20;
/// The most conffiles asked about in one exec (a package ships a handful).
pub const MAX_CONFFILES_PER_CALL: usize = 512;
/// The most exec output taken from the agent (the agent itself sends at most 1 MiB).
pub const MAX_EXEC_OUTPUT: usize = 2 << 20;

/// What an exec inside the LC gave back.
#[derive(Debug, Clone, Default)]
pub struct ExecOut {
    /// Exit status; `None` when killed.
    pub status: Option<i32>,
    pub stdout: Vec<u8>,
}

/// Runs a program inside the running LC (the backend's exec, through the agent).
pub type ExecFn<'a> =
    dyn Fn(&[String]) -> Result<ExecOut, Box<dyn std::error::Error + Send + Sync>> + 'a;

/// What from-apt needs of an LC.
pub trait LcReader {
    /// The LC's name, for messages.
    fn lc(&self) -> &str;
    /// The dpkg status, at most [`MAX_STATUS_BYTES`].
    fn dpkg_status(&self) -> Result<Vec<u8>, StatusError>;
    /// `/etc/os-release`, at most [`MAX_OS_RELEASE_BYTES`]; `None` when it has none.
    fn os_release(&self) -> Result<Option<Vec<u8>>, StatusError>;
    /// The MD5 (lowercase hex) of each of `paths` that is a regular file; a path the LC does
    /// not have is left out.
    fn conffile_md5s(&self, paths: &[&str]) -> Result<BTreeMap<String, String>, StatusError>;
    /// The free bytes of the filesystem the packages would land on, when that figure holds
    /// for the standby too; `None` when it does not (the bundle's first step checks the
    /// standby's own disk in any case, see [`crate::fromapt`]).
    fn free_bytes(&self) -> Result<Option<u64>, StatusError>;
}

/// The LC's disk through its confined root.
pub struct RootReader<'a> {
    root: &'a LcRoot,
    lc: String,
    block_copy: bool,
}

impl<'a> RootReader<'a> {
    /// `block_copy`: the standby's system disk is a block copy of this one (a VM's image), so
    /// its filesystem has the same free space when the copy is made.
    pub fn new(root: &'a LcRoot, lc: &str, block_copy: bool) -> RootReader<'a> {
        RootReader {
            root,
            lc: lc.to_owned(),
            block_copy,
        }
    }

    fn read_err(&self, source: patchover_lcroot::RootError) -> StatusError {
        StatusError::Read {
            lc: self.lc.clone(),
            source,
        }
    }
}

impl LcReader for RootReader<'_> {
    fn lc(&self) -> &str {
        &self.lc
    }

    fn dpkg_status(&self) -> Result<Vec<u8>, StatusError> {
        match self
            .root
            .read_file(Path::new(STATUS_PATH), MAX_STATUS_BYTES)
        {
            Ok(b) => Ok(b),
            Err(e) if e.is_not_found() => Err(StatusError::Missing {
                lc: self.lc.clone(),
            }),
            Err(e) => Err(self.read_err(e)),
        }
    }

    fn os_release(&self) -> Result<Option<Vec<u8>>, StatusError> {
        match self
            .root
            .read_file(Path::new("etc/os-release"), MAX_OS_RELEASE_BYTES)
        {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(self.read_err(e)),
        }
    }

    fn conffile_md5s(&self, paths: &[&str]) -> Result<BTreeMap<String, String>, StatusError> {
        let mut out = BTreeMap::new();
        for p in paths {
            // Not there, not a regular file, a link out of the root, too big: dpkg would not
            // ask about it as a changed file the host can vouch for; skipped.
            if let Ok(bytes) = self
                .root
                .read_file(Path::new(p.trim_start_matches('/')), MAX_CONFFILE_BYTES)
            {
                out.insert((*p).to_owned(), md5_hex(&bytes));
            }
        }
        Ok(out)
    }

    fn free_bytes(&self) -> Result<Option<u64>, StatusError> {
        if !self.block_copy {
            return Ok(None);
        }
        let st =
            nix::sys::statvfs::statvfs(self.root.host_path()).map_err(|e| StatusError::Agent {
                lc: self.lc.clone(),
                what: "the free space of its disk",
                source: Box::new(std::io::Error::from(e)),
            })?;
        Ok(Some(st.blocks_available() * st.fragment_size()))
    }
}

/// MD5 as dpkg records it for conffiles: 32 lowercase hex digits.
pub fn md5_hex(data: &[u8]) -> String {
    crate::apt::hex(&Md5::digest(data))
}

/// A running LC, through its agent's exec.
pub struct AgentReader<'a> {
    lc: String,
    exec: &'a ExecFn<'a>,
}

/// Exit status of the status script when the LC has no dpkg status file.
const NO_STATUS: i32 = 3;

/// Packs the status in the LC: gzip keeps a big server's few MiB within the agent's 1 MiB of
/// output; base64 keeps it text. One `gzip` read of the file: dpkg replaces its status by
/// rename, so the read is of one version of it.
const STATUS_SCRIPT: &str =
    "test -f /var/lib/dpkg/status || exit 3; gzip -9 -c /var/lib/dpkg/status | base64 -w 0";

impl<'a> AgentReader<'a> {
    pub fn new(lc: &str, exec: &'a ExecFn<'a>) -> AgentReader<'a> {
        AgentReader {
            lc: lc.to_owned(),
            exec,
        }
    }

    fn run(&self, what: &'static str, argv: &[&str]) -> Result<ExecOut, StatusError> {
        let argv: Vec<String> = argv.iter().map(|s| (*s).to_owned()).collect();
        let out = (self.exec)(&argv).map_err(|source| StatusError::Agent {
            lc: self.lc.clone(),
            what,
            source,
        })?;
        if out.stdout.len() > MAX_EXEC_OUTPUT {
            return Err(self.refused(what, format!("over {MAX_EXEC_OUTPUT} bytes")));
        }
        Ok(out)
    }

    fn refused(&self, what: &'static str, reason: String) -> StatusError {
        StatusError::Refused {
            lc: self.lc.clone(),
            what,
            reason,
        }
    }
}

impl LcReader for AgentReader<'_> {
    fn lc(&self) -> &str {
        &self.lc
    }

    fn dpkg_status(&self) -> Result<Vec<u8>, StatusError> {
        const WHAT: &str = "its dpkg status";
        let out = self.run(WHAT, &["/bin/sh", "-c", STATUS_SCRIPT])?;
        match out.status {
            Some(0) => {}
            Some(NO_STATUS) => {
                return Err(StatusError::Missing {
                    lc: self.lc.clone(),
                });
            }
            s => return Err(self.refused(WHAT, format!("the read ended with {s:?}"))),
        }
        let packed = base64::engine::general_purpose::STANDARD
            .decode(&out.stdout)
            .map_err(|e| self.refused(WHAT, format!("not base64: {e}")))?;
        let mut text = Vec::new();
        flate2::read::GzDecoder::new(packed.as_slice())
            .take(MAX_STATUS_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(|e| {
                self.refused(
                    WHAT,
                    format!("not a whole gzip stream (cut at the agent's 1 MiB of output?): {e}"),
                )
            })?;
        if text.len() as u64 > MAX_STATUS_BYTES {
            return Err(self.refused(WHAT, format!("over {MAX_STATUS_BYTES} bytes unpacked")));
        }
        Ok(text)
    }

    fn os_release(&self) -> Result<Option<Vec<u8>>, StatusError> {
        const WHAT: &str = "its /etc/os-release";
        let out = self.run(WHAT, &["cat", "/etc/os-release"])?;
        if out.status != Some(0) {
            return Ok(None);
        }
        if out.stdout.len() as u64 > MAX_OS_RELEASE_BYTES {
            return Err(self.refused(WHAT, format!("over {MAX_OS_RELEASE_BYTES} bytes")));
        }
        Ok(Some(out.stdout))
    }

    fn conffile_md5s(&self, paths: &[&str]) -> Result<BTreeMap<String, String>, StatusError> {
        const WHAT: &str = "the MD5s of its conffiles";
        let mut out = BTreeMap::new();
        for chunk in paths.chunks(MAX_CONFFILES_PER_CALL) {
            // md5sum escapes a name with a backslash or newline in its output; such a name
            // (no package ships one) is not asked about.
            let asked: Vec<&str> = chunk
                .iter()
                .copied()
                .filter(|p| p.starts_with('/') && !p.contains(['\\', '\n', '\r']))
                .collect();
            if asked.is_empty() {
                continue;
            }
            let mut argv = vec!["md5sum", "--"];
            argv.extend(&asked);
            // Exit 1 when some file is missing: those simply have no line.
            let r = self.run(WHAT, &argv)?;
            if !matches!(r.status, Some(0 | 1)) {
                return Err(self.refused(WHAT, format!("md5sum ended with {:?}", r.status)));
            }
            let text = std::str::from_utf8(&r.stdout)
                .map_err(|_| self.refused(WHAT, "not UTF-8".into()))?;
            for line in text.lines() {
                let (md5, path) = parse_md5sum_line(line)
                    .ok_or_else(|| self.refused(WHAT, format!("a line not md5sum's: {line:?}")))?;
                if !asked.contains(&path) {
                    return Err(self.refused(WHAT, format!("a file not asked about: {path:?}")));
                }
                if out.insert(path.to_owned(), md5.to_owned()).is_some() {
                    return Err(self.refused(WHAT, format!("{path:?} twice")));
                }
            }
        }
        Ok(out)
    }

    /// A VM's standby disk is a block copy of this one: the same filesystem, the same free
    /// space when the copy is made.
    fn free_bytes(&self) -> Result<Option<u64>, StatusError> {
        const WHAT: &str = "the free space of its disk";
        let out = self.run(WHAT, &["df", "-P", "-k", "/", "/usr", "/var"])?;
        if out.status != Some(0) {
            return Err(self.refused(WHAT, format!("df ended with {:?}", out.status)));
        }
        let text =
            std::str::from_utf8(&out.stdout).map_err(|_| self.refused(WHAT, "not UTF-8".into()))?;
        parse_df_available_kib(text)
            .map(|kib| Some(kib.saturating_mul(1024)))
            .ok_or_else(|| self.refused(WHAT, format!("not `df -P` output: {text:?}")))
    }
}

/// `HEX32  PATH` (or `HEX32 *PATH`, binary mode): the MD5 and the path.
pub fn parse_md5sum_line(line: &str) -> Option<(&str, &str)> {
    let (md5, rest) = line.split_at_checked(32)?;
    if !md5.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let path = rest
        .strip_prefix("  ")
        .or_else(|| rest.strip_prefix(" *"))?;
    (!path.is_empty()).then_some((md5, path))
}

/// The least `Available` (KiB) of the filesystems `df -P -k` lists: its header, then one
/// line of six fields per filesystem (a device name with a space is not accepted).
pub fn parse_df_available_kib(text: &str) -> Option<u64> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next()?.split_whitespace().collect();
    if header.first() != Some(&"Filesystem") || header.len() != 7 {
        return None;
    }
    let mut least: Option<u64> = None;
    for line in lines {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() != 6 || !f[5].starts_with('/') {
            return None;
        }
        let avail: u64 = f[3].parse().ok()?;
        least = Some(least.map_or(avail, |l| l.min(avail)));
    }
    least
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn packed(text: &[u8]) -> Vec<u8> {
        let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(text).unwrap();
        base64::engine::general_purpose::STANDARD
            .encode(z.finish().unwrap())
            .into_bytes()
    }

    fn answering(
        status: Option<i32>,
        stdout: Vec<u8>,
    ) -> impl Fn(&[String]) -> Result<ExecOut, Box<dyn std::error::Error + Send + Sync>> {
        move |_| {
            Ok(ExecOut {
                status,
                stdout: stdout.clone(),
            })
        }
    }

    #[test]
    fn the_status_comes_packed_and_is_unpacked() {
        let f = answering(Some(0), packed(b"Package: dpkg\n"));
        assert_eq!(
            AgentReader::new("vm1", &f).dpkg_status().unwrap(),
            b"Package: dpkg\n"
        );
        let f = answering(Some(NO_STATUS), Vec::new());
        let e = AgentReader::new("vm1", &f).dpkg_status().unwrap_err();
        assert!(matches!(e, StatusError::Missing { .. }), "{e}");
    }

    #[test]
    fn a_status_answer_not_exactly_packed_is_refused() {
        let whole = packed(&vec![b'x'; 100_000]);
        let cut = whole[..whole.len() / 2].to_vec();
        for (why, status, stdout) in [
            ("cut short (the agent's 1 MiB cap)", Some(0), cut),
            ("not base64", Some(0), b"Package: dpkg\n".to_vec()),
            (
                "base64 of no gzip",
                Some(0),
                b"UGFja2FnZTogZHBrZwo=".to_vec(),
            ),
            ("killed", None, whole.clone()),
            ("failed", Some(1), whole.clone()),
            (
                "over the output bound",
                Some(0),
                vec![b'A'; MAX_EXEC_OUTPUT + 4],
            ),
        ] {
            let f = answering(status, stdout);
            let e = AgentReader::new("vm1", &f).dpkg_status().unwrap_err();
            assert!(matches!(e, StatusError::Refused { .. }), "{why}: {e}");
        }
    }

    #[test]
    fn a_status_over_the_bound_unpacked_is_refused() {
        // 64 MiB + 1 of one byte packs small: a zip bomb the agent's 1 MiB does not stop.
        let f = answering(Some(0), packed(&vec![b'\n'; MAX_STATUS_BYTES as usize + 1]));
        let e = AgentReader::new("vm1", &f)
            .dpkg_status()
            .unwrap_err()
            .to_string();
        assert!(e.contains("over"), "{e}");
    }

    #[test]
    fn md5sum_lines_are_parsed_strictly() {
        let h = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            parse_md5sum_line(&format!("{h}  /etc/a b")),
            Some((h, "/etc/a b"))
        );
        assert_eq!(
            parse_md5sum_line(&format!("{h} */etc/a")),
            Some((h, "/etc/a"))
        );
        for bad in [
            format!("{}  /etc/a", h.to_uppercase()),
            format!("{h} /etc/a"),
            format!("{h}  "),
            format!("\\{h}  /etc/a\\nb"),
            "short  /etc/a".to_owned(),
            String::new(),
        ] {
            assert_eq!(parse_md5sum_line(&bad), None, "{bad:?}");
        }
    }

    #[test]
    fn conffile_md5s_take_only_what_was_asked_once() {
        let h = "0123456789abcdef0123456789abcdef";
        let f = answering(Some(1), format!("{h}  /etc/a\n").into_bytes());
        let m = AgentReader::new("vm1", &f)
            .conffile_md5s(&["/etc/a", "/etc/gone"])
            .unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m["/etc/a"], h);
        for answer in [
            format!("{h}  /etc/shadow\n"),
            format!("{h}  /etc/a\n{h}  /etc/a\n"),
            "md5sum: /etc/a: Is a directory\n".to_owned(),
        ] {
            let f = answering(Some(0), answer.clone().into_bytes());
            let e = AgentReader::new("vm1", &f)
                .conffile_md5s(&["/etc/a"])
                .unwrap_err();
            assert!(matches!(e, StatusError::Refused { .. }), "{answer:?}: {e}");
        }
    }

    #[test]
    fn df_output_gives_the_least_available() {
        let text = "Filesystem     1024-blocks    Used Available Capacity Mounted on\n/dev/vda          300000  200000     90000      69% /\n/dev/vdb          100000   10000      5000      67% /var\n";
        assert_eq!(parse_df_available_kib(text), Some(5000));
        for bad in [
            "",
            "Filesystem 1024-blocks Used Available Capacity Mounted on\n",
            "Filesystem 1024-blocks Used Available Capacity Mounted on\n/dev/vda 1 1 lots 1% /\n",
            "Filesystem 1024-blocks Used Available Capacity Mounted on\nmy disk 1 1 1 1% /\n",
            "Size Used\n/dev/vda 1 1 1 1% /\n",
        ] {
            assert_eq!(parse_df_available_kib(bad), None, "{bad:?}");
        }
    }

    /// The agent's commands run by the host's own tools (sh, gzip, base64, cat, md5sum, df: a
    /// Debian system's), with the agent's 1 MiB cap on the output: the host's own dpkg status,
    /// os-release and a file's MD5 come back exactly.
    #[test]
    fn the_agents_commands_read_a_debian_system_exactly() {
        let exec = |argv: &[String]| -> Result<ExecOut, Box<dyn std::error::Error + Send + Sync>> {
            let o = std::process::Command::new(&argv[0])
                .args(&argv[1..])
                .output()?;
            let mut stdout = o.stdout;
            stdout.truncate(1024 * 1024);
            Ok(ExecOut {
                status: o.status.code(),
                stdout,
            })
        };
        let r = AgentReader::new("host", &exec);
        assert_eq!(
            r.dpkg_status().unwrap(),
            std::fs::read("/var/lib/dpkg/status").unwrap()
        );
        assert_eq!(
            r.os_release().unwrap().unwrap(),
            std::fs::read("/etc/os-release").unwrap()
        );
        let m = r
            .conffile_md5s(&["/etc/debian_version", "/etc/patchover-none"])
            .unwrap();
        assert_eq!(
            m.into_iter().collect::<Vec<_>>(),
            [(
                "/etc/debian_version".to_owned(),
                md5_hex(&std::fs::read("/etc/debian_version").unwrap())
            )]
        );
        assert!(r.free_bytes().unwrap().unwrap() > 0);
    }

    #[test]
    fn md5_is_dpkgs() {
        assert_eq!(md5_hex(b""), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(md5_hex(b"a\n"), "60b725f10c9c85c70d97880dfe8191b3");
    }
}
