//! Where a bundle's symlinks lead once the archive is unpacked.
//!
//! Why not a textual check: a target's `..` is not "one component back" once a link sits on
//! the way. `payload/d1/d2/d3/d4/d5/d6/up -> ../../../../..` leads to `payload/d1`, so
//! `payload/evil -> d1/d2/d3/d4/d5/d6/up/../../../../../../../etc/passwd` cancels textually to
//! `payload/etc/passwd` but climbs seven levels from `payload/d1` once unpacked: out of the
//! extraction directory, to the host's `/etc/passwd` (issue 22). So each link is resolved the
//! way the kernel will resolve it in the unpacked tree, which holds exactly the archive's
//! entries: component by component, a component that is a link of the archive followed to
//! where *it* resolves (at most [`MAX_LINK_HOPS`] links in all, as Linux's `MAXSYMLINKS`), `..`
//! going back from where the walk really is. A link is accepted only if the walk never climbs
//! above `payload/` and ends strictly inside it. Absolute targets are refused, as before.
//!
//! A name the archive does not hold is taken as a directory that may appear later: the walk
//! goes on textually from there, which can only refuse more than the kernel would (the kernel
//! stops at the missing name).

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::archive::{EntryKind, PAYLOAD_DIR};

/// The most links one resolution may go through (Linux's `MAXSYMLINKS`).
pub const MAX_LINK_HOPS: u32 = 40;
/// The longest link target accepted (Linux's `PATH_MAX`).
pub const MAX_TARGET_BYTES: usize = 4096;

/// Why a link is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkProblem {
    /// The target starts with `/`.
    Absolute,
    /// The target is empty, holds a NUL, or is longer than [`MAX_TARGET_BYTES`].
    Malformed,
    /// A `..` climbs above `payload/`; `resolved` is where the walk ends, relative to the
    /// extraction directory (`../../etc/passwd`).
    Above { resolved: String },
    /// The walk ends at `payload/` itself rather than inside it.
    PayloadItself,
    /// A component is a regular file with more components after it.
    ThroughFile { file: String },
    /// The link leads back to itself.
    Loop,
    /// More than [`MAX_LINK_HOPS`] links on the way.
    TooManyHops,
}

impl std::fmt::Display for LinkProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkProblem::Absolute => f.write_str("which is absolute"),
            LinkProblem::Malformed => write!(
                f,
                "which is empty, holds a NUL byte or is longer than {MAX_TARGET_BYTES} bytes"
            ),
            LinkProblem::Above { resolved } => write!(
                f,
                "which climbs above payload/ and resolves to {resolved:?} (relative to the directory the bundle is unpacked into)"
            ),
            LinkProblem::PayloadItself => f.write_str("which resolves to payload/ itself"),
            LinkProblem::ThroughFile { file } => {
                write!(
                    f,
                    "which goes through the file {file:?} as if it were a directory"
                )
            }
            LinkProblem::Loop => f.write_str("which loops back to itself"),
            LinkProblem::TooManyHops => {
                write!(f, "which goes through more than {MAX_LINK_HOPS} links")
            }
        }
    }
}

/// Why a link is refused, and the archive's links followed on the way
/// (`payload/d1/d2/d3/d4/d5/d6/up -> payload/d1`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkWhy {
    pub problem: LinkProblem,
    pub via: Vec<String>,
}

impl std::fmt::Display for LinkWhy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.problem)?;
        if !self.via.is_empty() {
            write!(f, " (following {})", self.via.join(", "))?;
        }
        Ok(())
    }
}

/// A refused link: which entry, its target, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub link: String,
    pub target: String,
    pub why: LinkWhy,
}

/// The checks a target gets on its own, before the whole archive is known.
pub(crate) fn check_target(target: &str) -> Result<(), LinkProblem> {
    if target.starts_with('/') {
        return Err(LinkProblem::Absolute);
    }
    if target.is_empty() || target.contains('\0') || target.len() > MAX_TARGET_BYTES {
        return Err(LinkProblem::Malformed);
    }
    Ok(())
}

/// Resolves every symlink of the archive (`kinds`: every entry by its normalized path) and
/// refuses the first one that does not end strictly inside `payload/`.
pub(crate) fn check_all(kinds: &BTreeMap<String, EntryKind>) -> Result<(), Refusal> {
    let mut r = Resolver {
        kinds,
        memo: HashMap::new(),
        busy: HashSet::new(),
    };
    for (path, kind) in kinds {
        if matches!(kind, EntryKind::Symlink { .. }) {
            r.resolve(path, 0)?;
        }
    }
    Ok(())
}

/// Where a link leads (`["payload", "d1"]`) and how many links that took, itself included.
#[derive(Debug, Clone)]
struct Resolved {
    at: Vec<String>,
    hops: u32,
}

struct Resolver<'a> {
    kinds: &'a BTreeMap<String, EntryKind>,
    /// Each link is resolved once: where it leads does not depend on how it was reached,
    /// since its own path holds no link (the reader refuses entries below a link).
    memo: HashMap<String, Result<Resolved, Refusal>>,
    busy: HashSet<String>,
}

impl Resolver<'_> {
    fn resolve(&mut self, link: &str, depth: u32) -> Result<Resolved, Refusal> {
        if let Some(done) = self.memo.get(link) {
            return done.clone();
        }
        let Some(EntryKind::Symlink { target }) = self.kinds.get(link) else {
            unreachable!("resolve is only called on symlink entries");
        };
        let refuse = |problem| Refusal {
            link: link.to_owned(),
            target: target.clone(),
            why: LinkWhy {
                problem,
                via: Vec::new(),
            },
        };
        if depth > MAX_LINK_HOPS {
            return Err(refuse(LinkProblem::TooManyHops));
        }
        if !self.busy.insert(link.to_owned()) {
            return Err(refuse(LinkProblem::Loop));
        }
        let done = self.walk(link, target, depth);
        self.busy.remove(link);
        self.memo.insert(link.to_owned(), done.clone());
        done
    }

    /// Walks `target` from the directory holding `link`.
    fn walk(&mut self, link: &str, target: &str, depth: u32) -> Result<Resolved, Refusal> {
        let mut via = Vec::new();
        let refuse = |problem, via: &Vec<String>| Refusal {
            link: link.to_owned(),
            target: target.to_owned(),
            why: LinkWhy {
                problem,
                via: via.clone(),
            },
        };
        check_target(target).map_err(|p| refuse(p, &via))?;
        let mut at: Vec<String> = link.split('/').map(str::to_owned).collect();
        at.pop();
        let mut hops = 1;
        let parts: Vec<&str> = target.split('/').collect();
        for (i, part) in parts.iter().enumerate() {
            match *part {
                "" | "." => {}
                ".." if at.len() <= 1 => {
                    let resolved = above(&parts[i..]);
                    return Err(refuse(LinkProblem::Above { resolved }, &via));
                }
                ".." => {
                    at.pop();
                }
                name => {
                    at.push(name.to_owned());
                    let path = at.join("/");
                    match self.kinds.get(&path) {
                        Some(EntryKind::Symlink { .. }) => {
                            let next = self.resolve(&path, depth + 1)?;
                            hops += next.hops;
                            if hops > MAX_LINK_HOPS {
                                return Err(refuse(LinkProblem::TooManyHops, &via));
                            }
                            via.push(format!("{path} -> {}", next.at.join("/")));
                            at = next.at;
                        }
                        Some(EntryKind::File { .. }) if i + 1 < parts.len() => {
                            return Err(refuse(LinkProblem::ThroughFile { file: path }, &via));
                        }
                        _ => {}
                    }
                }
            }
        }
        if at.len() < 2 {
            return Err(refuse(LinkProblem::PayloadItself, &via));
        }
        Ok(Resolved { at, hops })
    }
}

/// Where the rest of a target leads once a `..` leaves `payload/` (links are not followed
/// past that point: there are none outside the archive's tree), relative to the extraction
/// directory: `rest` starts with the `..` that climbs out.
fn above(rest: &[&str]) -> String {
    let mut out: Vec<&str> = vec![PAYLOAD_DIR];
    for part in rest {
        match *part {
            "" | "." => {}
            ".." => match out.last() {
                Some(&last) if last != ".." => {
                    out.pop();
                }
                _ => out.push(".."),
            },
            name => out.push(name),
        }
    }
    if out.is_empty() {
        ".".to_owned()
    } else {
        out.join("/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Archive entries: a path (ending in `/` for a directory) and a link target.
    type Entries<'a> = [(&'a str, Option<&'a str>)];

    fn tree(entries: &Entries<'_>) -> BTreeMap<String, EntryKind> {
        entries
            .iter()
            .map(|(p, link)| {
                let kind = match link {
                    Some(t) => EntryKind::Symlink {
                        target: (*t).to_owned(),
                    },
                    None if p.ends_with('/') => EntryKind::Dir,
                    None => EntryKind::File {
                        size: 0,
                        mode: 0o644,
                    },
                };
                (p.trim_end_matches('/').to_owned(), kind)
            })
            .collect()
    }

    fn problem(entries: &Entries<'_>) -> Option<(String, LinkProblem)> {
        check_all(&tree(entries))
            .err()
            .map(|r| (r.link, r.why.problem))
    }

    /// Issue 22's chain: the textual check cancelled the `..`s; resolved on the tree, `evil`
    /// climbs five levels above the extraction directory.
    #[test]
    fn r22_a_dotdot_after_a_link_is_judged_where_the_link_leads() {
        let r = check_all(&tree(&[
            ("payload/run.sh", None),
            ("payload/d1/d2/d3/d4/d5/d6/up", Some("../../../../..")),
            (
                "payload/evil",
                Some("d1/d2/d3/d4/d5/d6/up/../../../../../../../etc/passwd"),
            ),
        ]))
        .unwrap_err();
        assert_eq!(r.link, "payload/evil");
        assert_eq!(
            r.why.problem,
            LinkProblem::Above {
                resolved: "../../../../../etc/passwd".to_owned()
            }
        );
        assert_eq!(r.why.via, ["payload/d1/d2/d3/d4/d5/d6/up -> payload/d1"]);
    }

    #[test]
    fn links_inside_payload_and_through_other_links_are_fine() {
        assert_eq!(
            problem(&[
                ("payload/run.sh", None),
                ("payload/lib/", None),
                ("payload/lib/a", Some("../run.sh")),
                ("payload/b", Some("lib/a")),
                ("payload/sub/up", Some("../lib")),
                ("payload/c", Some("sub/up/../run.sh")),
                ("payload/sub/dangling", Some("../nothing/here")),
                ("payload/sub/self", Some(".")),
            ]),
            None
        );
    }

    #[test]
    fn escapes_loops_and_files_as_directories_are_refused() {
        let cases: [(&Entries<'_>, LinkProblem); 7] = [
            (&[("payload/l", Some("/etc"))], LinkProblem::Absolute),
            (&[("payload/l", Some(""))], LinkProblem::Malformed),
            (
                &[("payload/l", Some("../manifest.toml"))],
                LinkProblem::Above {
                    resolved: "manifest.toml".to_owned(),
                },
            ),
            (&[("payload/a/l", Some(".."))], LinkProblem::PayloadItself),
            (
                &[("payload/f", None), ("payload/l", Some("f/x"))],
                LinkProblem::ThroughFile {
                    file: "payload/f".to_owned(),
                },
            ),
            (
                &[("payload/a", Some("b")), ("payload/b", Some("a"))],
                LinkProblem::Loop,
            ),
            (&[("payload/l", Some("l/x"))], LinkProblem::Loop),
        ];
        for (entries, want) in cases {
            let (_, got) = problem(entries).unwrap_or_else(|| panic!("{entries:?} accepted"));
            assert_eq!(got, want, "{entries:?}");
        }
    }

    #[test]
    fn a_long_chain_of_links_is_refused_past_the_hop_limit() {
        let chain = |n: usize| -> BTreeMap<String, EntryKind> {
            let mut t = tree(&[("payload/end", None)]);
            for i in 0..n {
                let next = if i + 1 == n {
                    "end".to_owned()
                } else {
                    format!("l{}", i + 1)
                };
                t.insert(format!("payload/l{i}"), EntryKind::Symlink { target: next });
            }
            t
        };
        assert!(check_all(&chain(MAX_LINK_HOPS as usize)).is_ok());
        let r = check_all(&chain(MAX_LINK_HOPS as usize + 1)).unwrap_err();
        assert_eq!(r.why.problem, LinkProblem::TooManyHops);
    }
}
