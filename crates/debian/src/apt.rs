//! The host's apt with a state of its own: a temporary directory holds apt's configuration,
//! the sources, the index lists, the package cache and the dpkg status apt is asked about.
//! Nothing of the host's apt state is read or written (`APT_CONFIG` points apt at this
//! directory before it reads anything else), nothing is installed, and the status it is given
//! is a copy, so the LC it came from is not touched either.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use ct_codecs::Encoder;
use sha2::{Digest, Sha256};

use crate::run::{ToolError, run, tail};
use crate::sources::Source;

#[derive(Debug, thiserror::Error)]
pub enum AptError {
    #[error("preparing apt's own state directory")]
    Setup(#[source] std::io::Error),
    #[error("the archive {source_line} cannot be used: {reason}")]
    Archive { source_line: String, reason: String },
    #[error("apt-get update")]
    Update(#[source] ToolError),
    #[error("apt cannot plan the update")]
    Plan(#[source] ToolError),
    #[error("downloading {package} {version}")]
    Download {
        package: String,
        version: String,
        #[source]
        source: ToolError,
    },
    #[error(
        "{} is in no package index apt fetched ({}); an apt bundle must carry the signed index that lists each package",
        deb.display(), lists.display()
    )]
    NotIndexed { deb: PathBuf, lists: PathBuf },
    #[error(
        "apt fetched no InRelease file (lists in {}): an apt bundle carries the archive's clear-signed InRelease, and an archive with only Release and Release.gpg is not supported",
        lists.display()
    )]
    NoInRelease { lists: PathBuf },
    #[error("apt-get download left no .deb for {package} {version} in {}", dir.display())]
    NoDeb {
        package: String,
        version: String,
        dir: PathBuf,
    },
}

/// A private apt.
pub struct AptEnv {
    dir: tempfile::TempDir,
    sources: Vec<Source>,
}

/// One line of apt's plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanLine {
    /// `Inst PKG [OLD] (NEW RELEASES [ARCH])`.
    Inst {
        package: String,
        old: Option<String>,
        new: String,
        releases: String,
        arch: String,
    },
    Conf {
        package: String,
    },
    Remv {
        package: String,
    },
}

impl AptEnv {
    /// A fresh state directory for `arch`, with `status` as dpkg's status.
    pub fn new(sources: &[Source], arch: &str, status: &str) -> Result<AptEnv, AptError> {
        let dir = tempfile::Builder::new()
            .prefix("patchover-apt-")
            .tempdir()
            .map_err(AptError::Setup)?;
        let d = dir.path();
        for sub in [
            "etc/apt.conf.d",
            "etc/preferences.d",
            "etc/trusted.gpg.d",
            "etc/sources.list.d",
            "state/lists/partial",
            "cache/archives/partial",
            "log",
            "debs",
        ] {
            fs::create_dir_all(d.join(sub)).map_err(AptError::Setup)?;
        }
        let list: String = sources.iter().map(|s| format!("{s}\n")).collect();
        fs::write(d.join("etc/sources.list"), list).map_err(AptError::Setup)?;
        fs::write(d.join("status"), status).map_err(AptError::Setup)?;
        let conf = format!(
            "Dir \"/\";\nDir::Etc \"{d}/etc/\";\nDir::Etc::main \"apt.conf\";\nDir::Etc::parts \"apt.conf.d\";\nDir::Etc::sourcelist \"sources.list\";\nDir::Etc::sourceparts \"sources.list.d\";\nDir::Etc::preferences \"preferences\";\nDir::Etc::preferencesparts \"preferences.d\";\nDir::Etc::trusted \"trusted.gpg\";\nDir::Etc::trustedparts \"trusted.gpg.d\";\nDir::State \"{d}/state/\";\nDir::State::status \"{d}/status\";\nDir::Cache \"{d}/cache/\";\nDir::Log \"{d}/log/\";\nAPT::Architecture \"{arch}\";\nAPT::Architectures {{ \"{arch}\"; }};\nAPT::Sandbox::User \"root\";\nAPT::Install-Recommends \"false\";\nAPT::Get::Show-Versions \"true\";\nAcquire::Languages \"none\";\nAcquire::GzipIndexes \"false\";\nAcquire::Retries \"0\";\nAcquire::http::Timeout \"20\";\nAcquire::IndexTargets::deb::Contents-deb::DefaultEnabled \"false\";\nDebug::NoLocking \"true\";\n",
            d = d.display()
        );
        fs::write(d.join("apt.conf"), conf).map_err(AptError::Setup)?;
        Ok(AptEnv {
            dir,
            sources: sources.to_vec(),
        })
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("APT_CONFIG", self.dir.path().join("apt.conf"))
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("LC_ALL", "C.UTF-8");
        c
    }

    /// `apt-get update`: fetches and verifies every source's index. A source that cannot be
    /// reached or whose signature does not verify is an error naming it.
    pub fn update(&self) -> Result<(), AptError> {
        let mut c = self.cmd("apt-get");
        c.args(["-q", "update", "--error-on=any"]);
        let out = c.output().map_err(|source| {
            AptError::Update(ToolError::Spawn {
                program: "apt-get".into(),
                package: "apt",
                source,
            })
        })?;
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        // apt names the failing source by its URI in its error lines.
        for s in &self.sources {
            let uri = s.uri.trim_end_matches('/');
            let bad = text.lines().find(|l| {
                (l.starts_with("E:") || l.starts_with("W:") || l.starts_with("Err:"))
                    && l.contains(uri)
            });
            if let Some(line) = bad.filter(|_| !out.status.success()) {
                let reason = text
                    .lines()
                    .filter(|l| l.starts_with("E:") || l.starts_with("W:") || l.starts_with("  "))
                    .map(str::trim)
                    .collect::<Vec<_>>();
                let reason = if reason.is_empty() {
                    line.to_owned()
                } else {
                    reason.join(" | ")
                };
                return Err(AptError::Archive {
                    source_line: s.to_string(),
                    reason,
                });
            }
        }
        if !out.status.success() {
            return Err(AptError::Update(ToolError::Failed {
                program: "apt-get update".into(),
                status: out.status.to_string(),
                tail: tail(&out),
            }));
        }
        Ok(())
    }

    /// A digest of every index apt fetched (the Release files): the archive's state.
    pub fn archive_state(&self) -> Result<String, AptError> {
        let lists = self.dir.path().join("state/lists");
        let mut names: Vec<PathBuf> = fs::read_dir(&lists)
            .map_err(AptError::Setup)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with("Release"))
            })
            .collect();
        names.sort();
        let mut h = Sha256::new();
        for n in names {
            h.update(n.file_name().unwrap_or_default().as_encoded_bytes());
            h.update(fs::read(&n).map_err(AptError::Setup)?);
        }
        Ok(hex(&h.finalize()))
    }

    /// apt's simulated plan: `dist-upgrade`, or `install --only-upgrade PACKAGES`.
    pub fn plan(&self, packages: &[String]) -> Result<Vec<PlanLine>, AptError> {
        let mut c = self.cmd("apt-get");
        c.args(["-s", "-q", "-y", "-o", "APT::Get::Show-Versions=false"]);
        // Configure each package as early as its dependencies allow: what apt must configure
        // together then shows as one group (see `fromapt::groups`).
        c.args(["-o", "APT::Immediate-Configure-All=true"]);
        if packages.is_empty() {
            c.arg("dist-upgrade");
        } else {
            c.args(["install", "--only-upgrade"]).args(packages);
        }
        let out = run(c, "apt").map_err(AptError::Plan)?;
        Ok(parse_plan(&String::from_utf8_lossy(&out.stdout)))
    }

    /// Downloads `package` at `version` (verified against the signed index) into a
    /// directory of this environment; returns the file.
    pub fn download(&self, package: &str, version: &str) -> Result<PathBuf, AptError> {
        let dir = self.dir.path().join("debs");
        let mut c = self.cmd("apt-get");
        c.current_dir(&dir)
            .args(["-q", "download"])
            .arg(format!("{package}={version}"));
        run(c, "apt").map_err(|source| AptError::Download {
            package: package.into(),
            version: version.into(),
            source,
        })?;
        // apt-get download names it PACKAGE_VERSION_ARCH.deb with the epoch's colon escaped.
        let prefix = format!("{package}_");
        let esc = version.replace(':', "%3a");
        fs::read_dir(&dir)
            .map_err(AptError::Setup)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                    n.starts_with(&prefix) && n[prefix.len()..].starts_with(&format!("{esc}_"))
                })
            })
            .ok_or_else(|| AptError::NoDeb {
                package: package.into(),
                version: version.into(),
                dir,
            })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The signed index an apt bundle carries for `debs` (`patchover_bundle::aptindex`):
    /// every `InRelease` apt fetched, and each package index (uncompressed, as apt keeps it)
    /// that lists one of `debs` by SHA-256. Each deb must be listed by one.
    pub fn index_files(&self, debs: &[PathBuf]) -> Result<IndexFiles, AptError> {
        let lists = self.dir.path().join("state/lists");
        let mut names: Vec<PathBuf> = fs::read_dir(&lists)
            .map_err(AptError::Setup)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        names.sort();
        let ends = |p: &Path, s: &str| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(s))
        };
        let releases: Vec<PathBuf> = names
            .iter()
            .filter(|p| ends(p, "_InRelease"))
            .cloned()
            .collect();
        if releases.is_empty() {
            return Err(AptError::NoInRelease { lists });
        }
        let mut indexes = Vec::new();
        for p in names.iter().filter(|p| ends(p, "_Packages")) {
            indexes.push((p.clone(), fs::read_to_string(p).map_err(AptError::Setup)?));
        }
        let mut packages = Vec::new();
        for deb in debs {
            let sha = hex(&Sha256::digest(fs::read(deb).map_err(AptError::Setup)?));
            let line = format!("\nSHA256: {sha}\n");
            let Some((p, _)) = indexes.iter().find(|(_, text)| text.contains(&line)) else {
                return Err(AptError::NotIndexed {
                    deb: deb.clone(),
                    lists,
                });
            };
            if !packages.contains(p) {
                packages.push(p.clone());
            }
        }
        Ok(IndexFiles { releases, packages })
    }
}

/// The index files of an apt bundle ([`AptEnv::index_files`]).
#[derive(Debug)]
pub struct IndexFiles {
    pub releases: Vec<PathBuf>,
    pub packages: Vec<PathBuf>,
}

/// Parses `apt-get -s` output.
pub fn parse_plan(text: &str) -> Vec<PlanLine> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.splitn(3, ' ');
        let (Some(op), Some(pkg)) = (words.next(), words.next()) else {
            continue;
        };
        let rest = words.next().unwrap_or("");
        let package = pkg.to_owned();
        match op {
            "Inst" => {
                let (old, rest) = match rest.strip_prefix('[') {
                    Some(r) => match r.split_once("] ") {
                        Some((o, r)) => (Some(o.to_owned()), r),
                        None => (None, r),
                    },
                    None => (None, rest),
                };
                let inner = rest
                    .trim()
                    .strip_prefix('(')
                    .and_then(|r| r.split(')').next())
                    .unwrap_or("");
                let (new, rest) = inner.split_once(' ').unwrap_or((inner, ""));
                let (releases, arch) = match rest.rfind(" [") {
                    Some(i) => (&rest[..i], rest[i + 2..].trim_end_matches(']')),
                    None => (rest, ""),
                };
                out.push(PlanLine::Inst {
                    package,
                    old,
                    new: new.to_owned(),
                    releases: releases.to_owned(),
                    arch: arch.to_owned(),
                });
            }
            "Conf" => out.push(PlanLine::Conf { package }),
            "Remv" | "Purg" => out.push(PlanLine::Remv { package }),
            _ => {}
        }
    }
    out
}

/// Lowercase hex (`ct-codecs`), as apt and dpkg write digests.
pub fn hex(bytes: &[u8]) -> String {
    ct_codecs::Hex::encode_to_string(bytes).expect("hex of a digest fits")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apt_simulation_lines() {
        let text = "Reading package lists...\nInst nginx-common [1.22.1-9] (1.22.1-9+deb12u1 Debian-Security:12/stable-security [all])\nInst libnew (2.0-1 Debian:12.10/stable, Debian-Security:12/stable-security [amd64])\nConf nginx-common (1.22.1-9+deb12u1 Debian-Security:12/stable-security [all])\nRemv oldpkg [1.0]\n";
        let p = parse_plan(text);
        assert_eq!(
            p[0],
            PlanLine::Inst {
                package: "nginx-common".into(),
                old: Some("1.22.1-9".into()),
                new: "1.22.1-9+deb12u1".into(),
                releases: "Debian-Security:12/stable-security".into(),
                arch: "all".into()
            }
        );
        match &p[1] {
            PlanLine::Inst {
                old,
                releases,
                arch,
                ..
            } => {
                assert_eq!((old.as_deref(), arch.as_str()), (None, "amd64"));
                assert!(releases.contains("Debian:12.10/stable"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            p[2],
            PlanLine::Conf {
                package: "nginx-common".into()
            }
        );
        assert_eq!(
            p[3],
            PlanLine::Remv {
                package: "oldpkg".into()
            }
        );
    }
}
