//! Ties every `.deb` of an apt bundle to the Debian archive's signed index (issue 24).
//!
//! The shape check ([`crate::aptshape`]) stops a key trusted only for apt bundles from signing
//! a script of its own. A `.deb` is a script too: its maintainer scripts run as root on the
//! standby. So a bundle signed by such a key must also show where each package comes from,
//! the way apt itself checks a download:
//!
//! 1. The bundle carries the archive's `InRelease` files (`payload/apt-index-N.InRelease`, as
//!    apt fetched them) and the package indexes that list its packages
//!    (`payload/apt-index-N.Packages`, uncompressed, as apt keeps them).
//! 2. Each `InRelease` must carry a good signature by a key of the keyrings the host trusts
//!    for the scoped key (`archive_keyrings`), checked by `gpgv` (the verifier apt uses).
//!    Only the text `gpgv` says is signed is read, never the clear-signed file around it.
//!    A `Valid-Until` in the past refuses it (a replayed old index).
//! 3. Each carried `Packages` file must have a SHA-256 and size that a verified release lists
//!    for a `…/Packages` path.
//! 4. Each `.deb` the steps install must have a SHA-256 and size that such an index lists.
//!
//! Anything else refuses the bundle, naming the file. The scoped key can then only choose
//! among packages the archive signed, which is what apt would install from it.
//!
//! What this does not stop: a choice of an *older* package the same index still lists (apt
//! would not downgrade; `dpkg -i` does), within the index's validity. The monitor builds
//! every set from apt's plan, and the `package_version` checks name the versions it chose.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::hash::Sha256;

/// The payload name of the `n`th release file an apt bundle carries.
pub fn release_name(n: usize) -> String {
    format!("apt-index-{n}.InRelease")
}

/// The payload name of the `n`th package index an apt bundle carries.
pub fn packages_name(n: usize) -> String {
    format!("apt-index-{n}.Packages")
}

/// Whether `file` (a payload name) is one of the index files [`release_name`] and
/// [`packages_name`] make.
pub fn is_index_name(file: &str) -> bool {
    let Some(rest) = file.strip_prefix("apt-index-") else {
        return false;
    };
    let Some((n, kind)) = rest.split_once('.') else {
        return false;
    };
    !n.is_empty()
        && n.len() <= 4
        && n.bytes().all(|b| b.is_ascii_digit())
        && matches!(kind, "InRelease" | "Packages")
}

/// A release file larger than this is not one (Debian's main InRelease is ~150 KiB).
const MAX_RELEASE_BYTES: u64 = 8 << 20;

/// Why an apt bundle's packages are not tied to a signed index.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    #[error(
        "it carries no signed archive index (payload/apt-index-N.InRelease and .Packages): make it again with this patchover's `bundle from-apt`"
    )]
    NoIndex,
    #[error("reading it: {0}")]
    Read(String),
    #[error("{file} is over {MAX_RELEASE_BYTES} bytes; no release file is")]
    ReleaseTooLarge { file: String },
    #[error("gpgv cannot run ({0}); install the gpgv package")]
    Gpgv(String),
    #[error("{file} is not signed by a key of the archive keyrings {keyrings}: {why}")]
    Signature {
        file: String,
        keyrings: String,
        why: String,
    },
    #[error("{file} expired at its Valid-Until {until}: the index is stale or replayed")]
    Expired { file: String, until: String },
    #[error("{file} has a Valid-Until patchover cannot read: {value:?}")]
    BadDate { file: String, value: String },
    #[error("{file} is not listed by any verified release file (its SHA-256 is {sha256})")]
    UnlistedIndex { file: String, sha256: Sha256 },
    #[error(
        "{file} is not in the archive's signed index (SHA-256 {sha256}, {size} bytes): only packages the archive signed may be in an apt bundle"
    )]
    UnlistedDeb {
        file: String,
        sha256: Sha256,
        size: u64,
    },
}

impl IndexError {
    /// The host could not check (gpgv cannot run), rather than the bundle failing the check.
    pub fn is_host_failure(&self) -> bool {
        matches!(self, IndexError::Gpgv(_))
    }
}

/// What a package index entry or a release file names: a file's SHA-256 and size.
type Sum = (Sha256, u64);

/// Checks that each of `debs` (archive paths, `payload/x.deb`) in the archive `bytes` is
/// listed by a carried package index that a carried release file, signed by a key of
/// `keyrings`, lists. `now` is the time `Valid-Until` is compared to (Unix seconds).
pub fn check(
    bytes: &[u8],
    debs: &BTreeSet<String>,
    keyrings: &[PathBuf],
    now: i64,
) -> Result<(), IndexError> {
    let files = read(bytes, debs).map_err(|e| IndexError::Read(e.to_string()))?;
    if files.releases.is_empty() || files.packages.is_empty() {
        return Err(IndexError::NoIndex);
    }
    let mut listed: BTreeSet<Sum> = BTreeSet::new();
    for (file, text) in &files.releases {
        let signed = gpgv(file, text, keyrings)?;
        listed.extend(release_sums(file, &String::from_utf8_lossy(&signed), now)?);
    }
    let mut debs_listed: BTreeSet<Sum> = BTreeSet::new();
    for (file, text) in &files.packages {
        let sum = (Sha256::of(text), text.len() as u64);
        if !listed.contains(&sum) {
            return Err(IndexError::UnlistedIndex {
                file: file.clone(),
                sha256: sum.0,
            });
        }
        debs_listed.extend(package_sums(&String::from_utf8_lossy(text)));
    }
    for (file, (sha256, size)) in &files.debs {
        if !debs_listed.contains(&(*sha256, *size)) {
            return Err(IndexError::UnlistedDeb {
                file: file.clone(),
                sha256: *sha256,
                size: *size,
            });
        }
    }
    Ok(())
}

/// The carried index files (whole) and the SHA-256 and size of each of the `debs`.
struct Files {
    releases: BTreeMap<String, Vec<u8>>,
    packages: BTreeMap<String, Vec<u8>>,
    debs: BTreeMap<String, Sum>,
}

/// One pass over the (already validated) archive: the index files read, the debs hashed.
fn read(bytes: &[u8], debs: &BTreeSet<String>) -> std::io::Result<Files> {
    let decoder = zstd::stream::read::Decoder::with_buffer(bytes)?;
    let mut tar = tar::Archive::new(decoder);
    let mut files = Files {
        releases: BTreeMap::new(),
        packages: BTreeMap::new(),
        debs: BTreeMap::new(),
    };
    for entry in tar.entries()? {
        let mut entry = entry?;
        let path = String::from_utf8_lossy(&entry.path_bytes())
            .trim_start_matches("./")
            .to_owned();
        let name = path.strip_prefix("payload/").unwrap_or_default();
        if debs.contains(&path) {
            let mut counted = CountingReader {
                inner: &mut entry,
                n: 0,
            };
            let sha = Sha256::of_reader(&mut counted)?;
            files.debs.insert(path, (sha, counted.n));
        } else if is_index_name(name) {
            let mut buf = Vec::new();
            if name.ends_with(".InRelease") {
                entry.take(MAX_RELEASE_BYTES + 1).read_to_end(&mut buf)?;
                if buf.len() as u64 > MAX_RELEASE_BYTES {
                    return Err(std::io::Error::other(
                        IndexError::ReleaseTooLarge { file: path }.to_string(),
                    ));
                }
                files.releases.insert(path, buf);
            } else {
                // Bounded by the archive's unpacked-size limit, checked when it was read.
                entry.read_to_end(&mut buf)?;
                files.packages.insert(path, buf);
            }
        }
    }
    Ok(files)
}

struct CountingReader<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n += k as u64;
        Ok(k)
    }
}

/// The text of the clear-signed `text` that `gpgv` verified against `keyrings`.
fn gpgv(file: &str, text: &[u8], keyrings: &[PathBuf]) -> Result<Vec<u8>, IndexError> {
    let list = || {
        keyrings
            .iter()
            .map(|k| k.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let refuse = |why: String| IndexError::Signature {
        file: file.to_owned(),
        keyrings: list(),
        why,
    };
    if keyrings.is_empty() {
        return Err(refuse("no archive keyring is configured".into()));
    }
    if let Some(k) = keyrings.iter().find(|k| !k.is_file()) {
        return Err(refuse(format!("the keyring {} is not a file", k.display())));
    }
    let mut c = Command::new("gpgv");
    // A home of its own (none): nothing of root's GnuPG state is read; only these keyrings.
    c.args([
        "--homedir",
        "/nonexistent",
        "--status-fd",
        "2",
        "--output",
        "-",
    ]);
    for k in keyrings {
        c.arg("--keyring").arg(k);
    }
    c.arg("-")
        .env("LC_ALL", "C")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().map_err(|e| IndexError::Gpgv(e.to_string()))?;
    let mut stdin = child.stdin.take().expect("piped");
    let input = text.to_vec();
    // Written from a thread so a large output cannot block against a full input pipe.
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child
        .wait_with_output()
        .map_err(|e| IndexError::Gpgv(e.to_string()))?;
    let _ = writer.join();
    let status = String::from_utf8_lossy(&out.stderr);
    signature_verdict(&status, out.status.success()).map_err(refuse)?;
    Ok(out.stdout)
}

/// Whether gpgv's status lines (`--status-fd`) say the text carries a good signature by a
/// keyring key and nothing bad. `Err` names what gpgv reported.
fn signature_verdict(status: &str, exit_ok: bool) -> Result<(), String> {
    let lines: Vec<&str> = status
        .lines()
        .filter_map(|l| l.strip_prefix("[GNUPG:] "))
        .collect();
    const BAD: [&str; 7] = [
        "BADSIG",
        "ERRSIG",
        "EXPSIG",
        "EXPKEYSIG",
        "REVKEYSIG",
        "NO_PUBKEY",
        "NODATA",
    ];
    if let Some(bad) = lines
        .iter()
        .find(|l| BAD.iter().any(|b| l.split(' ').next() == Some(b)))
    {
        return Err(format!("gpgv reports {bad}"));
    }
    let has = |kw: &str| lines.iter().any(|l| l.split(' ').next() == Some(kw));
    if !exit_ok || !has("GOODSIG") || !has("VALIDSIG") {
        let said: Vec<&str> = status.lines().filter(|l| l.starts_with("gpgv:")).collect();
        return Err(if said.is_empty() {
            "gpgv found no good signature".to_owned()
        } else {
            said.join(" | ")
        });
    }
    Ok(())
}

/// The `SHA256` sums a verified release lists for package indexes (`…/Packages`), after its
/// `Valid-Until` (when it has one) is checked against `now`.
fn release_sums(file: &str, text: &str, now: i64) -> Result<Vec<Sum>, IndexError> {
    let mut out = Vec::new();
    let mut in_sha256 = false;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Valid-Until:") {
            let value = rest.trim();
            let until = parse_date(value).ok_or_else(|| IndexError::BadDate {
                file: file.to_owned(),
                value: value.to_owned(),
            })?;
            if until < now {
                return Err(IndexError::Expired {
                    file: file.to_owned(),
                    until: value.to_owned(),
                });
            }
        }
        if line.starts_with(' ') {
            if in_sha256 {
                let parts: Vec<&str> = line.split_whitespace().collect();
                if let [sha, size, path] = parts[..]
                    && (path == "Packages" || path.ends_with("/Packages"))
                    && let (Ok(sha), Ok(size)) = (sha.parse::<Sha256>(), size.parse::<u64>())
                {
                    out.push((sha, size));
                }
            }
        } else {
            in_sha256 = line.trim_end() == "SHA256:";
        }
    }
    Ok(out)
}

/// A release file's date (`Sat, 05 Dec 2026 10:00:00 UTC`, RFC 2822 as apt writes and reads
/// it) in Unix seconds.
fn parse_date(value: &str) -> Option<i64> {
    let v = value
        .strip_suffix(" UTC")
        .map(|d| format!("{d} +0000"))
        .unwrap_or_else(|| value.to_owned());
    jiff::fmt::rfc2822::parse(&v)
        .ok()
        .map(|z| z.timestamp().as_second())
}

/// The `SHA256` and `Size` of every stanza of a package index.
fn package_sums(text: &str) -> Vec<Sum> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        if let (Some(Ok(sha)), Some(Ok(size))) = (
            field("SHA256").map(str::parse::<Sha256>),
            field("Size").map(str::parse::<u64>),
        ) {
            out.push((sha, size));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_names_are_numbered_release_and_packages_files() {
        assert!(is_index_name(&release_name(1)));
        assert!(is_index_name(&packages_name(12)));
        for bad in [
            "apt-index-.InRelease",
            "apt-index-1.Release",
            "apt-index-1.InRelease.sh",
            "apt-index-a.Packages",
            "apt-index-12345.Packages",
            "x.deb",
        ] {
            assert!(!is_index_name(bad), "{bad}");
        }
    }

    #[test]
    fn a_good_signature_needs_goodsig_and_validsig_and_nothing_bad() {
        let good =
            "[GNUPG:] NEWSIG\n[GNUPG:] GOODSIG 1234 test\n[GNUPG:] VALIDSIG ABCD 2026-12-08\n";
        assert_eq!(signature_verdict(good, true), Ok(()));
        assert!(signature_verdict(good, false).is_err());
        let expired = format!("{good}[GNUPG:] EXPKEYSIG 1234 test\n");
        assert!(
            signature_verdict(&expired, true)
                .unwrap_err()
                .contains("EXPKEYSIG")
        );
        let unknown = "gpgv: Can't check signature: No public key\n[GNUPG:] ERRSIG 1234 1 8 01 1 9\n[GNUPG:] NO_PUBKEY 1234\n";
        assert!(
            signature_verdict(unknown, false)
                .unwrap_err()
                .contains("ERRSIG")
        );
        assert!(signature_verdict("", true).is_err());
    }

    #[test]
    fn release_sums_are_the_sha256_of_package_indexes_and_valid_until_is_checked() {
        let sha = "a".repeat(64);
        let other = "b".repeat(64);
        let text = format!(
            "Origin: test\nDate: Sat, 05 Dec 2026 10:00:00 UTC\nValid-Until: Sat, 12 Dec 2026 10:00:00 UTC\nMD5Sum:\n {} 10 main/binary-amd64/Packages\nSHA256:\n {sha} 120 main/binary-amd64/Packages\n {other} 50 main/binary-amd64/Packages.gz\n {other} 7 main/binary-amd64/Release\n",
            "c".repeat(32)
        );
        let dec_8 = 1_796_724_000; // 2026-12-08T10:00:00Z
        let sums = release_sums("f", &text, dec_8).unwrap();
        assert_eq!(sums, [(sha.parse().unwrap(), 120)]);
        let dec_13 = dec_8 + 5 * 86_400;
        assert!(matches!(
            release_sums("f", &text, dec_13),
            Err(IndexError::Expired { .. })
        ));
        let bad = text.replace("Sat, 12 Dec 2026 10:00:00 UTC", "soon");
        assert!(matches!(
            release_sums("f", &bad, dec_8),
            Err(IndexError::BadDate { .. })
        ));
    }

    #[test]
    fn package_sums_read_each_stanza() {
        let a = "d".repeat(64);
        let b = "e".repeat(64);
        let text = format!(
            "Package: a\nVersion: 1\nSize: 100\nSHA256: {a}\n\nPackage: b\nSHA256: {b}\nSize: 7\nDescription: x\n more\n\nPackage: broken\nSize: x\nSHA256: {a}\n"
        );
        assert_eq!(
            package_sums(&text),
            [(a.parse().unwrap(), 100), (b.parse().unwrap(), 7)]
        );
    }
}
