//! The apt sources the host is configured for: the only archives patchover asks.
//!
//! Both formats are read: deb822 `*.sources` and one-line `*.list` (and `sources.list`). Only
//! `deb` entries count; `deb-src` and disabled entries (`Enabled: no`, files with other
//! endings) are left out. An entry is turned into one-line form with its `signed-by` kept, so
//! an archive is trusted exactly as the host trusts it.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SourcesError {
    #[error("reading the host's apt sources {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the host's apt sources ({dir}) have no entry for suite {suite:?} (they have: {have}); add one, or name the archive with --source"
    )]
    NoSuite {
        dir: String,
        suite: String,
        have: String,
    },
    #[error("invalid --source {0:?}: expected \"deb [signed-by=KEYRING] URI SUITE COMPONENT...\"")]
    BadLine(String),
}

/// One archive: a URI, one suite, its components and the keyring it must be signed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub uri: String,
    pub suite: String,
    pub components: Vec<String>,
    pub signed_by: Option<String>,
}

impl Source {
    /// Parses one one-line entry (`deb [opts] URI SUITE COMP...`).
    pub fn parse_line(line: &str) -> Result<Source, SourcesError> {
        let bad = || SourcesError::BadLine(line.to_owned());
        let line = line.split('#').next().unwrap_or("").trim();
        let rest = line.strip_prefix("deb ").ok_or_else(bad)?.trim_start();
        let (opts, rest) = match rest.strip_prefix('[') {
            Some(r) => {
                let end = r.find(']').ok_or_else(bad)?;
                (&r[..end], &r[end + 1..])
            }
            None => ("", rest),
        };
        let mut words = rest.split_whitespace();
        let uri = words.next().ok_or_else(bad)?.to_owned();
        let suite = words.next().ok_or_else(bad)?.to_owned();
        let components: Vec<String> = words.map(str::to_owned).collect();
        if components.is_empty() {
            return Err(bad());
        }
        let signed_by = opts
            .split_whitespace()
            .find_map(|o| o.strip_prefix("signed-by="))
            .map(str::to_owned);
        Ok(Source {
            uri,
            suite,
            components,
            signed_by,
        })
    }

    /// Does this source serve the security suite (`bookworm-security`, `…/updates`)?
    pub fn is_security(&self) -> bool {
        self.suite.ends_with("-security") || self.suite.ends_with("/updates")
    }
}

/// The one-line form, as apt and mmdebstrap read it.
impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("deb ")?;
        if let Some(k) = &self.signed_by {
            write!(f, "[signed-by={k}] ")?;
        }
        write!(
            f,
            "{} {} {}",
            self.uri,
            self.suite,
            self.components.join(" ")
        )
    }
}

/// Every `deb` source of the host's apt configuration under `etc_apt` (`/etc/apt`).
pub fn host_sources(etc_apt: &Path) -> Result<Vec<Source>, SourcesError> {
    let mut out = Vec::new();
    let read = |p: &Path| {
        fs::read_to_string(p).map_err(|source| SourcesError::Read {
            path: p.to_owned(),
            source,
        })
    };
    let main = etc_apt.join("sources.list");
    if main.is_file() {
        out.extend(parse_list(&read(&main)?));
    }
    let parts = etc_apt.join("sources.list.d");
    if parts.is_dir() {
        let mut names: Vec<PathBuf> = fs::read_dir(&parts)
            .map_err(|source| SourcesError::Read {
                path: parts.clone(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        names.sort();
        for p in names {
            match p.extension().and_then(|e| e.to_str()) {
                Some("list") => out.extend(parse_list(&read(&p)?)),
                Some("sources") => out.extend(parse_deb822(&read(&p)?)),
                _ => {}
            }
        }
    }
    Ok(out)
}

/// One-line entries; lines that are not `deb` entries are skipped.
pub fn parse_list(text: &str) -> Vec<Source> {
    text.lines()
        .filter_map(|l| Source::parse_line(l.trim()).ok())
        .collect()
}

/// deb822 stanzas: one [`Source`] per suite of each enabled `deb` stanza.
pub fn parse_deb822(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for stanza in crate::status::paragraphs(text) {
        let get = |k: &str| {
            stanza
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.trim().to_owned())
        };
        let types = get("Types").unwrap_or_default();
        if !types.split_whitespace().any(|t| t == "deb")
            || get("Enabled").is_some_and(|e| e.eq_ignore_ascii_case("no"))
        {
            continue;
        }
        let comps: Vec<String> = get("Components")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let signed_by = get("Signed-By").filter(|s| !s.contains('\n') && !s.is_empty());
        for uri in get("URIs").unwrap_or_default().split_whitespace() {
            for suite in get("Suites").unwrap_or_default().split_whitespace() {
                out.push(Source {
                    uri: uri.to_owned(),
                    suite: suite.to_owned(),
                    components: comps.clone(),
                    signed_by: signed_by.clone(),
                });
            }
        }
    }
    out
}

/// The sources for `suite` as released (and with `updates`, its `-updates` and `-security`
/// suites too), restricted to the `main` component.
pub fn for_suite(
    all: &[Source],
    suite: &str,
    updates: bool,
    dir: &Path,
) -> Result<Vec<Source>, SourcesError> {
    let wanted = |s: &str| {
        s == suite
            || (updates && (s == format!("{suite}-updates") || s == format!("{suite}-security")))
    };
    let picked: Vec<Source> = all
        .iter()
        .filter(|s| wanted(&s.suite) && s.components.iter().any(|c| c == "main"))
        .map(|s| Source {
            components: vec!["main".to_owned()],
            ..s.clone()
        })
        .collect();
    if !picked.iter().any(|s| s.suite == suite) {
        let mut have: Vec<&str> = all.iter().map(|s| s.suite.as_str()).collect();
        have.dedup();
        return Err(SourcesError::NoSuite {
            dir: dir.display().to_string(),
            suite: suite.to_owned(),
            have: if have.is_empty() {
                "none".to_owned()
            } else {
                have.join(", ")
            },
        });
    }
    Ok(picked)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB822: &str = "Types: deb\n# a comment\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\nComponents: main contrib\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\n\nTypes: deb\nEnabled: no\nURIs: http://example.org/\nSuites: bookworm\nComponents: main\n";

    #[test]
    fn deb822_gives_one_source_per_suite_and_skips_src_and_disabled() {
        let s = parse_deb822(DEB822);
        let names: Vec<&str> = s.iter().map(|s| s.suite.as_str()).collect();
        assert_eq!(names, ["bookworm", "bookworm-updates", "bookworm-security"]);
        assert_eq!(
            s[0].to_string(),
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main"
        );
    }

    #[test]
    fn the_released_suite_leaves_out_updates_and_security_unless_asked() {
        let all = parse_deb822(DEB822);
        let d = Path::new("/etc/apt");
        let plain = for_suite(&all, "bookworm", false, d).unwrap();
        assert_eq!(plain.len(), 1);
        let full = for_suite(&all, "bookworm", true, d).unwrap();
        assert_eq!(full.len(), 3);
        assert!(full[2].is_security());
        assert_eq!(full[2].components, ["main"]);
        let e = for_suite(&all, "trixie", false, d).unwrap_err().to_string();
        assert!(
            e.contains("\"trixie\"") && e.contains("bookworm-security"),
            "{e}"
        );
    }

    #[test]
    fn one_line_entries_with_and_without_options() {
        let s = Source::parse_line(
            "deb [arch=amd64 signed-by=/k.gpg] http://127.0.0.1:8080/ bookworm-security main # x",
        )
        .unwrap();
        assert_eq!(s.signed_by.as_deref(), Some("/k.gpg"));
        assert_eq!(s.suite, "bookworm-security");
        assert!(s.is_security());
        let s = Source::parse_line("deb http://x/ bookworm main contrib").unwrap();
        assert_eq!((s.signed_by, s.components.len()), (None, 2));
        for bad in [
            "deb-src http://x/ a main",
            "deb http://x/ bookworm",
            "deb [x http://x/ a main",
        ] {
            assert!(Source::parse_line(bad).is_err(), "{bad}");
        }
    }
}
