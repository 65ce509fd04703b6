//! dpkg's status file, as an LC's disk holds it (`/var/lib/dpkg/status`): which packages are
//! installed at which version, and the conffiles each shipped.
//!
//! The file comes from the LC, so it is untrusted: it is read through [`LcRoot`] (a bounded
//! read of a regular file, no link leaving the root), and it is only ever *given* to apt as
//! its status. A lying status can make apt offer fewer (or other) updates; the bundle's
//! `package_version` post-checks still prove what was installed.

use std::collections::BTreeMap;

use crate::reader::LcReader;

/// The largest dpkg status patchover reads (a big server's is a few MiB).
pub const MAX_STATUS_BYTES: u64 = 64 << 20;

pub const STATUS_PATH: &str = "var/lib/dpkg/status";

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "{lc}'s disk has no dpkg status (/var/lib/dpkg/status): it is not a Debian system, or not its system disk"
    )]
    Missing { lc: String },
    #[error("reading {lc}'s dpkg status")]
    Read {
        lc: String,
        #[source]
        source: patchover_lcroot::RootError,
    },
    #[error("{lc}'s dpkg status is not text")]
    NotText { lc: String },
    #[error("{lc}'s dpkg status has no installed `dpkg` package, so its architecture is unknown")]
    NoArch { lc: String },
    #[error("asking {lc} for {what}")]
    Agent {
        lc: String,
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{lc}'s answer for {what} is refused: {reason}")]
    Refused {
        lc: String,
        what: &'static str,
        reason: String,
    },
}

/// A package dpkg lists as installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub package: String,
    pub version: String,
    pub architecture: String,
    /// Conffile path → the MD5 of the version the package shipped.
    pub conffiles: BTreeMap<String, String>,
}

/// The parsed status: the raw text (what apt is given) and the installed packages.
#[derive(Debug, Clone)]
pub struct DpkgStatus {
    pub text: String,
    pub installed: BTreeMap<String, Installed>,
    /// dpkg's own architecture: the LC's native one.
    pub architecture: String,
}

impl DpkgStatus {
    /// Reads the LC's status (through its root handle, or its agent).
    pub fn read(lc: &dyn LcReader) -> Result<DpkgStatus, StatusError> {
        let name = lc.lc().to_owned();
        let bytes = lc.dpkg_status()?;
        let text =
            String::from_utf8(bytes).map_err(|_| StatusError::NotText { lc: name.clone() })?;
        DpkgStatus::parse(text).ok_or(StatusError::NoArch { lc: name })
    }

    /// Parses status text; `None` when no `dpkg` package is installed.
    pub fn parse(text: String) -> Option<DpkgStatus> {
        let mut installed = BTreeMap::new();
        for p in paragraphs(&text) {
            let get = |k: &str| {
                p.iter()
                    .find(|(key, _)| key.eq_ignore_ascii_case(k))
                    .map(|(_, v)| v.trim().to_owned())
            };
            let (Some(package), Some(version), Some(status)) =
                (get("Package"), get("Version"), get("Status"))
            else {
                continue;
            };
            if !status.ends_with(" installed") {
                continue;
            }
            let conffiles = get("Conffiles")
                .unwrap_or_default()
                .lines()
                .filter_map(|l| {
                    let mut w = l.split_whitespace();
                    Some((w.next()?.to_owned(), w.next()?.to_owned()))
                })
                .collect();
            installed.insert(
                package.clone(),
                Installed {
                    package,
                    version,
                    architecture: get("Architecture").unwrap_or_default(),
                    conffiles,
                },
            );
        }
        let architecture = installed.get("dpkg")?.architecture.clone();
        Some(DpkgStatus {
            text,
            installed,
            architecture,
        })
    }
}

/// Splits deb822 text (dpkg status, apt sources, Release files) into paragraphs of
/// (field, value); continuation lines are joined to the value with `\n`, comments skipped.
pub fn paragraphs(text: &str) -> Vec<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut cur: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
        } else if line.starts_with('#') {
            continue;
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = cur.last_mut() {
                v.push('\n');
                v.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            cur.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installed_packages_with_conffiles_and_the_native_arch() {
        let text = "Package: dpkg\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1.21.22\n\nPackage: nginx-common\nStatus: install ok installed\nArchitecture: all\nVersion: 1.22.1-9\nConffiles:\n /etc/nginx/nginx.conf 0123abcd\n /etc/nginx/mime.types 4567ef01\nDescription: x\n more\n\nPackage: gone\nStatus: deinstall ok config-files\nVersion: 1\n";
        let s = DpkgStatus::parse(text.to_owned()).unwrap();
        assert_eq!(s.architecture, "amd64");
        assert_eq!(s.installed.len(), 2);
        let n = &s.installed["nginx-common"];
        assert_eq!(n.version, "1.22.1-9");
        assert_eq!(n.conffiles["/etc/nginx/nginx.conf"], "0123abcd");
        assert!(
            DpkgStatus::parse("Package: a\nStatus: install ok installed\nVersion: 1\n".into())
                .is_none()
        );
    }

    #[test]
    fn a_root_without_a_status_is_named() {
        let t = tempfile::tempdir().unwrap();
        let root = patchover_lcroot::LcRoot::open(t.path()).unwrap();
        let reader = crate::reader::RootReader::new(&root, "lc1", false);
        let e = DpkgStatus::read(&reader).unwrap_err().to_string();
        assert!(e.contains("lc1's disk has no dpkg status"), "{e}");
    }
}
