//! `patchover bundle from-apt LC`: the updates the archive offers for an LC's installed
//! packages, as one patch bundle.
//!
//! 1. The LC's dpkg status is read through [`LcRoot`] (never a path the LC controls).
//! 2. The host's apt, with a state directory of its own and that status as dpkg's, fetches the
//!    archive's signed indexes and plans a `dist-upgrade` (or `install --only-upgrade P…`).
//!    A plan that removes a package is refused, naming it: a patch run never removes.
//! 3. Every `.deb` of the plan (upgrades and new dependencies) is downloaded by apt, so it is
//!    checked against the signed index. The bundle carries that index (each `InRelease` and
//!    the package indexes that list its packages), so a host verifying it under a key
//!    trusted only for apt bundles checks each package again (`patchover_bundle::aptindex`).
//! 4. A conffile the LC changed that the update also changes would make dpkg ask; refused,
//!    naming the package and file.
//! 5. Disk space: the standby's disk gets the packages, so the bundle's first step checks the
//!    standby's own free space, before any package is unpacked ([`SPACE_SCRIPT`]). Where the
//!    standby's disk is a block copy of the LC's (a VM's image) the LC's free space is the
//!    standby's, and from-apt refuses already, before the run.
//! 6. The bundle: steps in apt's order (one `dpkg` step per package; packages apt must
//!    configure together go into one `dpkg -i` of them all), a `package_version` check for
//!    each, category `security` when a version comes from a security suite, title and
//!    description from the changelog entries between the installed and the new version,
//!    severity from their highest urgency ([`severity_of_urgency`]).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use patchover_bundle::{aptindex, aptshape};
use patchover_lcroot::LcRoot;
use sha2::{Digest, Sha256};

use crate::apt::{AptEnv, AptError, PlanLine, hex};
use crate::reader::{AgentReader, ExecFn, LcReader, RootReader, md5_hex};
use crate::run::{ToolError, run};
use crate::sources::{Source, SourcesError};
use crate::status::{DpkgStatus, StatusError};

#[derive(Debug, thiserror::Error)]
pub enum FromAptError {
    #[error("reading the LC's packages")]
    Status(#[source] StatusError),
    #[error("{lc} is {lc_arch}; from-apt plans with the host's apt for {host_arch} only")]
    OtherArch {
        lc: String,
        lc_arch: String,
        host_arch: String,
    },
    #[error(
        "{lc} runs Debian {lc_suite}, but the archive source {source_line} is for another suite"
    )]
    OtherSuite {
        lc: String,
        lc_suite: String,
        source_line: String,
    },
    #[error("mounting the image {} read-only", disk.display())]
    Mount {
        disk: PathBuf,
        #[source]
        source: ToolError,
    },
    #[error("{lc}'s /etc/os-release names no VERSION_CODENAME; name the archive with --source")]
    NoSuite { lc: String },
    #[error("the apt sources")]
    Sources(#[source] SourcesError),
    #[error("{package} is not installed on {lc}")]
    NotInstalled { lc: String, package: String },
    #[error("asking the archive")]
    Apt(#[source] AptError),
    #[error(
        "the update would remove {}: a patch run never removes packages; update the others with --packages",
        packages.join(", ")
    )]
    Removal { packages: Vec<String> },
    #[error(
        "updating {package} would ask about its configuration file {path}, which {lc} changed and the update changes too; a patch run never prompts: merge the change into the image or leave {package} out with --packages"
    )]
    ConffilePrompt {
        lc: String,
        package: String,
        path: String,
    },
    #[error(
        "{lc}'s disk has {free_mib} MiB free; the updates need {need_mib} MiB unpacked: free space first"
    )]
    DiskTooSmall {
        lc: String,
        free_mib: u64,
        need_mib: u64,
    },
    #[error("looking into {}", deb.display())]
    Deb {
        deb: PathBuf,
        #[source]
        source: ToolError,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the bundle {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: Box<patchover_bundle::create::CreateError>,
    },
}

impl FromAptError {
    /// Caused by the LC or by what was asked (exit code 2), not by the host.
    pub fn is_bad_input(&self) -> bool {
        !matches!(
            self,
            FromAptError::Apt(_)
                | FromAptError::Status(StatusError::Agent { .. })
                | FromAptError::Mount { .. }
                | FromAptError::Deb { .. }
                | FromAptError::Io { .. }
                | FromAptError::Create { .. }
        )
    }
}

/// What to make.
#[derive(Debug, Clone, Default)]
pub struct FromAptOptions {
    /// The LC's name (messages, the bundle id).
    pub lc: String,
    /// The archive; empty: the host's sources for the LC's suite, with `-updates` and
    /// `-security`.
    pub sources: Vec<Source>,
    /// Only the security suite (leaves `-updates` out).
    pub security_only: bool,
    /// Only these installed packages (and what their updates need); empty: all.
    pub packages: Vec<String>,
    pub output: PathBuf,
    /// The bundle's id; `None`: `debian-<12 hex digits of sha256(package=version…)>`.
    pub id: Option<String>,
    /// Name the LC in the manifest's `[targets] lcs` (the patch monitor's bundles are made
    /// for one LC).
    pub target_lc: bool,
}

/// One package the bundle installs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Update {
    pub package: String,
    /// `None`: a new dependency.
    pub old: Option<String>,
    pub new: String,
    pub security: bool,
    /// Where apt takes the new version from (`Debian-Security:12/stable-security`).
    pub release: String,
    /// The highest changelog urgency of the entries since `old`.
    pub urgency: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    /// Everything installed is at the archive's newest version: no bundle is written.
    NothingToDo {
        installed: usize,
        sources: Vec<String>,
    },
    Written {
        path: PathBuf,
        id: String,
        category: String,
        severity: String,
        title: String,
        updates: Vec<Update>,
        bytes: u64,
    },
}

/// [`from_apt`] on an LC's system disk. A directory disk is opened as the LC's root. An image
/// (a VM's) must not be in use: the caller checks that the LC is stopped; it is loop-mounted
/// read-only (`nosuid,nodev,noexec`) for the time of the read and opened as the root. A
/// running VM is read through its agent instead: [`from_apt_through_agent`].
pub fn from_apt_on_disk(
    disk: &Path,
    image: bool,
    opts: &FromAptOptions,
) -> Result<Outcome, FromAptError> {
    with_disk_reader(disk, image, &opts.lc, |r| from_apt_with(r, opts))?
}

/// Runs `f` with a reader of the LC `lc`'s system disk (as [`from_apt_on_disk`] reads it: a
/// directory through its root handle; an image not in use loop-mounted read-only for the
/// time of `f`, then unmounted). The outer error is the disk's (it cannot be opened or
/// mounted); the inner one is `f`'s.
pub fn with_disk_reader<T, E>(
    disk: &Path,
    image: bool,
    lc: &str,
    f: impl FnOnce(&dyn LcReader) -> Result<T, E>,
) -> Result<Result<T, E>, FromAptError> {
    let root_err = |source| {
        FromAptError::Status(StatusError::Read {
            lc: lc.to_owned(),
            source,
        })
    };
    if !image {
        let root = LcRoot::open(disk).map_err(root_err)?;
        return Ok(f(&RootReader::new(&root, lc, false)));
    }
    // The standby's disk will be a block copy of this image: its free space is this one's.
    let mnt = tempfile::Builder::new()
        .prefix("patchover-from-apt-mnt-")
        .tempdir()
        .map_err(io("creating a mount point"))?;
    let mut c = Command::new("mount");
    c.args(["-o", "loop,ro,nosuid,nodev,noexec", "--no-canonicalize"])
        .arg(disk)
        .arg(mnt.path());
    run(c, "mount").map_err(|source| FromAptError::Mount {
        disk: disk.to_owned(),
        source,
    })?;
    let r = LcRoot::open(mnt.path())
        .map_err(root_err)
        .map(|root| f(&RootReader::new(&root, lc, true)));
    let mut c = Command::new("umount");
    c.arg(mnt.path());
    if let Err(e) = run(c, "mount") {
        tracing::warn!(error = %e, disk = %disk.display(), "unmounting the image");
    }
    r
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::NothingToDo { installed, sources } => write!(
                f,
                "nothing to do: the {installed} installed packages are up to date with {}; no bundle written",
                sources.join(" and ")
            ),
            Outcome::Written {
                path,
                id,
                category,
                severity,
                title,
                updates,
                bytes,
            } => {
                writeln!(f, "wrote {} ({id}, {bytes} bytes): {title}", path.display())?;
                writeln!(f, "  category {category}, severity {severity}")?;
                for u in updates {
                    writeln!(
                        f,
                        "  {} {} -> {}{}",
                        u.package,
                        u.old.as_deref().unwrap_or("(new)"),
                        u.new,
                        if u.security { "  [security]" } else { "" }
                    )?;
                }
                write!(
                    f,
                    "next: patchover bundle sign {} --key SECRET_KEY",
                    path.display()
                )
            }
        }
    }
}

/// [`from_apt_with`] on a directory disk, through its root handle.
pub fn from_apt(root: &LcRoot, opts: &FromAptOptions) -> Result<Outcome, FromAptError> {
    from_apt_with(&RootReader::new(root, &opts.lc, false), opts)
}

/// [`from_apt_with`] on a running VM: its packages, os-release and conffiles are read by its
/// own tools through its agent (`exec`: the backend's exec), never from its image, which the
/// guest is writing. The VM's free space stands for its standby's (a block copy).
pub fn from_apt_through_agent(
    exec: &ExecFn<'_>,
    opts: &FromAptOptions,
) -> Result<Outcome, FromAptError> {
    from_apt_with(&AgentReader::new(&opts.lc, exec), opts)
}

/// Makes the bundle (see the module doc).
pub fn from_apt_with(root: &dyn LcReader, opts: &FromAptOptions) -> Result<Outcome, FromAptError> {
    let planned = plan_with(root, opts)?;
    match planned.nothing_to_do() {
        Some(nothing) => Ok(nothing),
        None => planned.build(opts),
    }
}

/// The updates the archive offers for an LC, planned by apt with the archive's indexes
/// fetched and verified, before any package is downloaded: [`Planned::build`] downloads them
/// and writes the bundle. The patch monitor looks at [`Planned::set_digest`] in between, so
/// a set it has already made a bundle of is never downloaded again.
pub struct Planned<'r> {
    root: &'r dyn LcReader,
    status: DpkgStatus,
    sources: Vec<Source>,
    apt: AptEnv,
    plan: Vec<PlanLine>,
    /// What the bundle would install, in apt's order.
    pub updates: Vec<Update>,
}

impl Planned<'_> {
    /// Everything installed is at the archive's newest version.
    pub fn nothing_to_do(&self) -> Option<Outcome> {
        self.updates.is_empty().then(|| Outcome::NothingToDo {
            installed: self.status.installed.len(),
            sources: self.sources.iter().map(ToString::to_string).collect(),
        })
    }

    /// SHA-256 (hex) of the LC's apt state (its dpkg status as read) and the set of updates
    /// (`package=version` lines in apt's order): the same LC state offered the same versions
    /// always gives the same digest; a new version, a new package or a changed LC another.
    pub fn set_digest(&self) -> String {
        let mut h = Sha256::new();
        h.update(Sha256::digest(self.status.text.as_bytes()));
        for u in &self.updates {
            h.update(format!("{}={}\n", u.package, u.new));
        }
        hex(&h.finalize())
    }
}

/// Reads the LC's packages and suite, checks the sources, and plans with apt (the archive's
/// signed indexes are fetched and verified here; no package yet).
pub fn plan_with<'r>(
    root: &'r dyn LcReader,
    opts: &FromAptOptions,
) -> Result<Planned<'r>, FromAptError> {
    let lc = opts.lc.as_str();
    let status = DpkgStatus::read(root).map_err(FromAptError::Status)?;
    let host_arch = crate::image::host_arch();
    if status.architecture != host_arch {
        return Err(FromAptError::OtherArch {
            lc: lc.into(),
            lc_arch: status.architecture.clone(),
            host_arch,
        });
    }
    for p in &opts.packages {
        if !status.installed.contains_key(p) {
            return Err(FromAptError::NotInstalled {
                lc: lc.into(),
                package: p.clone(),
            });
        }
    }
    let suite = lc_suite(root)
        .map_err(FromAptError::Status)?
        .ok_or(FromAptError::NoSuite { lc: lc.into() })?;
    let mut sources = if opts.sources.is_empty() {
        let etc = Path::new("/etc/apt");
        let all = crate::sources::host_sources(etc).map_err(FromAptError::Sources)?;
        crate::sources::for_suite(&all, &suite, true, etc).map_err(FromAptError::Sources)?
    } else {
        opts.sources.clone()
    };
    if let Some(s) = sources.iter().find(|s| {
        s.suite != suite
            && !s.suite.starts_with(&format!("{suite}-"))
            && !s.suite.starts_with(&format!("{suite}/"))
    }) {
        return Err(FromAptError::OtherSuite {
            lc: lc.into(),
            lc_suite: suite,
            source_line: s.to_string(),
        });
    }
    if opts.security_only {
        sources.retain(|s| !s.suite.ends_with("-updates"));
    }

    let apt =
        AptEnv::new(&sources, &status.architecture, &status.text).map_err(FromAptError::Apt)?;
    apt.update().map_err(FromAptError::Apt)?;
    let plan = apt.plan(&opts.packages).map_err(FromAptError::Apt)?;
    let removed: Vec<String> = plan
        .iter()
        .filter_map(|l| match l {
            PlanLine::Remv { package } => Some(package.clone()),
            _ => None,
        })
        .collect();
    if !removed.is_empty() {
        return Err(FromAptError::Removal { packages: removed });
    }
    let mut updates = Vec::new();
    for l in &plan {
        if let PlanLine::Inst {
            package,
            old,
            new,
            releases,
            ..
        } = l
        {
            let security = releases.to_ascii_lowercase().contains("security")
                || (sources.iter().all(Source::is_security) && !sources.is_empty());
            updates.push(Update {
                package: package.clone(),
                old: old.clone(),
                new: new.clone(),
                security,
                release: releases.clone(),
                urgency: None,
            });
        }
    }
    Ok(Planned {
        root,
        status,
        sources,
        apt,
        plan,
        updates,
    })
}

impl Planned<'_> {
    /// Downloads every package of the plan (checked against the signed index by apt), looks
    /// into each (conffiles, changelog, sizes) and writes the bundle.
    pub fn build(self, opts: &FromAptOptions) -> Result<Outcome, FromAptError> {
        build(self, opts)
    }
}

fn build(planned: Planned<'_>, opts: &FromAptOptions) -> Result<Outcome, FromAptError> {
    let Planned {
        root,
        status,
        apt,
        plan,
        mut updates,
        ..
    } = planned;
    let lc = opts.lc.as_str();
    // Download and look into every package.
    let work = tempfile::Builder::new()
        .prefix("patchover-from-apt-")
        .tempdir()
        .map_err(io("creating a work directory"))?;
    let bundle_dir = work.path().join("bundle");
    fs::create_dir_all(bundle_dir.join("payload")).map_err(io("creating the bundle directory"))?;
    let mut files = BTreeMap::new();
    let mut changelogs = Vec::new();
    let mut need_bytes = 0u64;
    let mut downloaded = Vec::new();
    for u in &mut updates {
        let deb = apt
            .download(&u.package, &u.new)
            .map_err(FromAptError::Apt)?;
        let name = format!("{}_{}.deb", u.package, u.new.replace(':', "_"));
        let dest = bundle_dir.join("payload").join(&name);
        fs::copy(&deb, &dest).map_err(io("copying a package into the bundle"))?;
        downloaded.push(dest.clone());
        let size = fs::metadata(&dest).map(|m| m.len()).unwrap_or(0);
        let unpacked = work.path().join("x").join(&u.package);
        fs::create_dir_all(&unpacked).map_err(io("creating an unpack directory"))?;
        let mut c = Command::new("dpkg-deb");
        c.arg("-x").arg(&dest).arg(&unpacked);
        run(c, "dpkg").map_err(|source| FromAptError::Deb {
            deb: dest.clone(),
            source,
        })?;
        let mut c = Command::new("dpkg-deb");
        c.arg("-f").arg(&dest).arg("Installed-Size");
        let kib: u64 = run(c, "dpkg")
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse()
                    .unwrap_or(0)
            })
            .unwrap_or(0);
        need_bytes += kib * 1024 + 2 * size;
        if let Some(installed) = status.installed.get(&u.package) {
            check_conffiles(root, lc, &u.package, &installed.conffiles, &unpacked)?;
        }
        let (text, urgency) = changelog(&unpacked, &u.package, u.old.as_deref());
        u.urgency = urgency;
        changelogs.push((u.clone(), text));
        files.insert(u.package.clone(), name);
    }
    check_space(root, lc, need_bytes)?;
    // The archive's signed index, so a key trusted only for apt bundles cannot carry a
    // package the archive did not sign (`patchover_bundle::aptindex`).
    let index = apt.index_files(&downloaded).map_err(FromAptError::Apt)?;
    for (n, p) in index.releases.iter().enumerate() {
        fs::copy(
            p,
            bundle_dir
                .join("payload")
                .join(aptindex::release_name(n + 1)),
        )
        .map_err(io("copying a release file into the bundle"))?;
    }
    for (n, p) in index.packages.iter().enumerate() {
        fs::copy(
            p,
            bundle_dir
                .join("payload")
                .join(aptindex::packages_name(n + 1)),
        )
        .map_err(io("copying a package index into the bundle"))?;
    }
    // The standby checks its own disk before anything is unpacked.
    fs::write(bundle_dir.join("payload").join(SPACE_FILE), SPACE_SCRIPT)
        .map_err(io("writing the space check"))?;

    // The manifest.
    let mut hasher = Sha256::new();
    for u in &updates {
        hasher.update(format!("{}={}\n", u.package, u.new));
    }
    let id = opts
        .id
        .clone()
        .unwrap_or_else(|| format!("debian-{}", &hex(&hasher.finalize())[..12]));
    let security = updates.iter().any(|u| u.security);
    let category = if security { "security" } else { "bugfix" };
    let severity = updates
        .iter()
        .map(|u| severity_of_urgency(u.urgency.as_deref()))
        .max_by_key(|s| severity_rank(s))
        .unwrap_or("medium");
    let title = title(&updates, security);
    let mut description = String::new();
    for (i, (u, text)) in changelogs.iter().enumerate() {
        let head = match &u.old {
            Some(o) => format!("{} {} -> {}", u.package, o, u.new),
            None => format!("{} {} (new dependency)", u.package, u.new),
        };
        // Binary packages of one source share its changelog: shown once.
        match changelogs[..i].iter().find(|(_, t)| t == text) {
            Some((first, _)) => {
                description.push_str(&format!(
                    "{head}\n  (the changelog of {} above)\n\n",
                    first.package
                ));
            }
            _ => description.push_str(&format!("{head}\n{text}\n")),
        }
    }
    if description.len() > 15 * 1024 {
        let mut cut = 15 * 1024;
        while !description.is_char_boundary(cut) {
            cut -= 1;
        }
        description.truncate(cut);
        description.push_str("\n[... cut ...]\n");
    }
    let mut steps = vec![space_step(need_bytes)];
    for group in groups(&plan) {
        let names: Vec<&String> = group.iter().filter_map(|p| files.get(p)).collect();
        match names.as_slice() {
            [] => {}
            [one] => {
                let mut t = toml::Table::new();
                t.insert("kind".into(), "dpkg".into());
                t.insert("file".into(), (*one).clone().into());
                steps.push(t);
            }
            many => {
                // Packages apt configures together: one dpkg run unpacks and configures them.
                let script = aptshape::install_script_name(steps.len() + 1);
                let names: Vec<&str> = many.iter().map(|n| n.as_str()).collect();
                fs::write(
                    bundle_dir.join("payload").join(&script),
                    aptshape::install_script(&names),
                )
                .map_err(io("writing an install script"))?;
                let mut t = toml::Table::new();
                t.insert("kind".into(), "script".into());
                t.insert("file".into(), script.into());
                steps.push(t);
            }
        }
    }
    let checks: Vec<toml::Table> = updates
        .iter()
        .map(|u| {
            let mut t = toml::Table::new();
            t.insert("kind".into(), "package_version".into());
            t.insert("package".into(), u.package.clone().into());
            t.insert("version".into(), u.new.clone().into());
            t
        })
        .collect();
    let mut m = toml::Table::new();
    m.insert("format".into(), 1.into());
    m.insert("id".into(), id.clone().into());
    m.insert("title".into(), title.clone().into());
    m.insert("description".into(), description.into());
    m.insert("category".into(), category.into());
    m.insert("severity".into(), severity.into());
    m.insert("published".into(), now_rfc3339().into());
    if opts.target_lc {
        let mut t = toml::Table::new();
        t.insert("lcs".into(), toml::Value::Array(vec![lc.into()]));
        m.insert("targets".into(), t.into());
    }
    m.insert(
        "step".into(),
        toml::Value::Array(steps.into_iter().map(toml::Value::Table).collect()),
    );
    m.insert(
        "check".into(),
        toml::Value::Array(checks.into_iter().map(toml::Value::Table).collect()),
    );
    let text = toml::to_string(&m).map_err(|e| FromAptError::Io {
        what: "writing the manifest".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    fs::write(bundle_dir.join("manifest.toml"), text).map_err(io("writing the manifest"))?;

    // Written beside the output and renamed: a failure leaves nothing at the output.
    let out = &opts.output;
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = parent.join(format!(
        ".{}.partial-{}",
        out.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let made = patchover_bundle::create::create_bundle(&bundle_dir, &tmp).map_err(|source| {
        let _ = fs::remove_file(&tmp);
        FromAptError::Create {
            path: out.clone(),
            source: Box::new(source),
        }
    })?;
    let _ = made;
    fs::rename(&tmp, out).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        FromAptError::Io {
            what: format!("moving the bundle to {}", out.display()),
            source: e,
        }
    })?;
    Ok(Outcome::Written {
        path: out.clone(),
        id,
        category: category.into(),
        severity: severity.into(),
        title,
        bytes: fs::metadata(out).map(|m| m.len()).unwrap_or(0),
        updates,
    })
}

fn io(what: &str) -> impl FnOnce(std::io::Error) -> FromAptError + '_ {
    move |source| FromAptError::Io {
        what: what.to_owned(),
        source,
    }
}

/// The LC's Debian codename, from its `/etc/os-release`.
fn lc_suite(root: &dyn LcReader) -> Result<Option<String>, StatusError> {
    Ok(root.os_release()?.as_deref().and_then(suite_of_os_release))
}

/// `VERSION_CODENAME` of an os-release text: letters and digits only, else none.
pub fn suite_of_os_release(text: &[u8]) -> Option<String> {
    String::from_utf8_lossy(text).lines().find_map(|l| {
        let v = l
            .strip_prefix("VERSION_CODENAME=")?
            .trim()
            .trim_matches('"');
        (!v.is_empty() && v.len() <= 64 && v.chars().all(|c| c.is_ascii_alphanumeric()))
            .then(|| v.to_owned())
    })
}

pub use patchover_bundle::aptshape::{SPACE_FILE, SPACE_SCRIPT};

fn space_step(need_bytes: u64) -> toml::Table {
    let mut t = toml::Table::new();
    t.insert("kind".into(), "script".into());
    t.insert("file".into(), SPACE_FILE.into());
    t.insert(
        "args".into(),
        toml::Value::Array(vec![need_bytes.div_ceil(1024).to_string().into()]),
    );
    t
}

/// Groups apt's plan into sets configured together: a set closes when every package
/// unpacked in it has been configured.
fn groups(plan: &[PlanLine]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut cur: Vec<String> = Vec::new();
    let mut pending = std::collections::BTreeSet::new();
    for l in plan {
        match l {
            PlanLine::Inst { package, .. } => {
                cur.push(package.clone());
                pending.insert(package.clone());
            }
            PlanLine::Conf { package } => {
                pending.remove(package);
                if pending.is_empty() && !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            PlanLine::Remv { .. } => {}
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Refuses an update that would make dpkg ask about a conffile: the LC changed it (its MD5
/// differs from what the installed package shipped) and the update ships another version.
/// The MD5s of the host's files (the new package, unpacked on the host) are computed here;
/// the LC's through the reader (in Rust on a bounded read, or by the LC's own md5sum).
fn check_conffiles(
    root: &dyn LcReader,
    lc: &str,
    package: &str,
    shipped: &BTreeMap<String, String>,
    unpacked: &Path,
) -> Result<(), FromAptError> {
    // The paths come from the LC's dpkg status: they are opened inside the unpacked package
    // only (a `..` or a path to a device cannot reach the host's files), and read bounded.
    let pkg = LcRoot::open(unpacked).map_err(|e| FromAptError::Io {
        what: format!("opening the unpacked {package}"),
        source: std::io::Error::new(e.kind(), e.to_string()),
    })?;
    let mut new = BTreeMap::new();
    for (path, old_md5) in shipped {
        if old_md5 == "newconffile" {
            continue;
        }
        if let Ok(bytes) = pkg.read_file(
            Path::new(path.trim_start_matches('/')),
            crate::reader::MAX_CONFFILE_BYTES,
        ) {
            new.insert(path.as_str(), md5_hex(&bytes));
        }
    }
    if new.is_empty() {
        return Ok(());
    }
    let paths: Vec<&str> = new.keys().copied().collect();
    let current = root.conffile_md5s(&paths).map_err(FromAptError::Status)?;
    for (path, new_md5) in new {
        // Removed by the LC: dpkg keeps it removed without asking.
        let Some(cur_md5) = current.get(path) else {
            continue;
        };
        if conffile_would_prompt(&shipped[path], cur_md5, &new_md5) {
            return Err(FromAptError::ConffilePrompt {
                lc: lc.into(),
                package: package.into(),
                path: path.to_owned(),
            });
        }
    }
    Ok(())
}

/// dpkg asks when the LC changed the file (`current` is not what was shipped) and the update
/// ships another version too, unless the LC's is already the new one.
pub fn conffile_would_prompt(shipped: &str, current: &str, new: &str) -> bool {
    current != shipped && new != shipped && current != new
}

fn check_space(root: &dyn LcReader, lc: &str, need: u64) -> Result<(), FromAptError> {
    let Some(free) = root.free_bytes().map_err(FromAptError::Status)? else {
        return Ok(());
    };
    if free < need {
        return Err(FromAptError::DiskTooSmall {
            lc: lc.into(),
            free_mib: free >> 20,
            need_mib: need.div_ceil(1 << 20),
        });
    }
    Ok(())
}

/// The changelog entries after `old` (all of them for a new package, at most 20), and their
/// highest urgency.
fn changelog(unpacked: &Path, package: &str, old: Option<&str>) -> (String, Option<String>) {
    let gz = unpacked.join(format!("usr/share/doc/{package}/changelog.Debian.gz"));
    let Ok(out) = Command::new("gzip").arg("-dc").arg(&gz).output() else {
        return ("  (no changelog in the package)\n".into(), None);
    };
    if !out.status.success() {
        return ("  (no changelog in the package)\n".into(), None);
    }
    parse_changelog(&String::from_utf8_lossy(&out.stdout), old)
}

/// See [`changelog`].
pub fn parse_changelog(text: &str, old: Option<&str>) -> (String, Option<String>) {
    let mut out = String::new();
    let mut urgency: Option<String> = None;
    let mut entries = 0;
    for line in text.lines() {
        let is_header = !line.starts_with([' ', '\t']) && line.contains(" (") && line.contains(';');
        if is_header {
            let version = line
                .split_once(" (")
                .and_then(|(_, r)| r.split_once(')'))
                .map(|(v, _)| v);
            if version.is_some() && version == old {
                break;
            }
            entries += 1;
            if entries > 20 {
                break;
            }
            if let Some(u) = line.split("urgency=").nth(1).map(|u| {
                u.split([',', ' '])
                    .next()
                    .unwrap_or("")
                    .to_ascii_lowercase()
            }) && severity_rank(severity_of_urgency(Some(&u)))
                >= severity_rank(severity_of_urgency(urgency.as_deref()))
            {
                urgency = Some(u);
            }
        }
        if entries > 0 {
            out.push_str(line);
            out.push('\n');
        }
    }
    (out, urgency)
}

/// The documented mapping from a Debian changelog urgency to a bundle severity
/// (docs/debian.md): low → low, medium → medium, high → high, emergency and critical →
/// critical; none or anything else → medium.
pub fn severity_of_urgency(urgency: Option<&str>) -> &'static str {
    match urgency {
        Some("low") => "low",
        Some("high") => "high",
        Some("emergency") | Some("critical") => "critical",
        _ => "medium",
    }
}

fn severity_rank(s: &str) -> u8 {
    match s {
        "none" => 0,
        "low" => 1,
        "medium" => 2,
        "high" => 3,
        _ => 4,
    }
}

fn title(updates: &[Update], security: bool) -> String {
    let kind = if security {
        "Security update"
    } else {
        "Update"
    };
    let t = match updates {
        [one] => format!("{kind}: {} {}", one.package, one.new),
        many => {
            let names: Vec<&str> = many.iter().map(|u| u.package.as_str()).collect();
            format!(
                "{kind} of {} Debian packages: {}",
                many.len(),
                names.join(", ")
            )
        }
    };
    if t.len() <= 200 {
        return t;
    }
    let mut cut = 190;
    while !t.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &t[..cut])
}

/// Now, as RFC 3339 UTC (whole seconds).
fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CL: &str = "po-hello (1.0-3) bookworm-security; urgency=medium\n\n  * Third.\n\n -- T <t@e>  Mon, 07 Dec 2026 10:00:00 +0000\n\npo-hello (1.0-2) bookworm-security; urgency=high\n\n  * Fix CVE-2026-0001.\n\n -- T <t@e>  Sun, 06 Dec 2026 10:00:00 +0000\n\npo-hello (1.0-1) bookworm; urgency=low\n\n  * First.\n\n -- T <t@e>  Sat, 05 Dec 2026 10:00:00 +0000\n";

    #[test]
    fn changelog_entries_since_the_installed_version_and_their_highest_urgency() {
        let (text, u) = parse_changelog(CL, Some("1.0-1"));
        assert!(
            text.contains("Fix CVE-2026-0001") && text.contains("Third"),
            "{text}"
        );
        assert!(!text.contains("First"));
        assert_eq!(u.as_deref(), Some("high"));
        let (text, u) = parse_changelog(CL, Some("1.0-2"));
        assert!(!text.contains("CVE"));
        assert_eq!(u.as_deref(), Some("medium"));
        let (text, u) = parse_changelog(CL, None);
        assert!(text.contains("First"));
        assert_eq!(u.as_deref(), Some("high"));
    }

    #[test]
    fn urgency_maps_to_severity() {
        assert_eq!(severity_of_urgency(Some("low")), "low");
        assert_eq!(severity_of_urgency(Some("medium")), "medium");
        assert_eq!(severity_of_urgency(Some("high")), "high");
        assert_eq!(severity_of_urgency(Some("emergency")), "critical");
        assert_eq!(severity_of_urgency(Some("critical")), "critical");
        assert_eq!(severity_of_urgency(None), "medium");
        assert_eq!(severity_of_urgency(Some("bogus")), "medium");
    }

    #[test]
    fn packages_configured_together_form_one_group() {
        let plan = crate::apt::parse_plan(
            "Inst a [1] (2 x [all])\nConf a (2 x [all])\nInst b [1] (2 x [all])\nInst c [1] (2 x [all])\nConf c (2 x [all])\nConf b (2 x [all])\nInst d (1 x [all])\nConf d (1 x [all])\n",
        );
        assert_eq!(groups(&plan), [vec!["a"], vec!["b", "c"], vec!["d"]]);
    }

    #[test]
    fn a_conffile_prompts_only_when_both_sides_changed_it() {
        // (shipped, the LC's, the update's)
        assert!(!conffile_would_prompt("a", "a", "b"), "the LC kept it");
        assert!(!conffile_would_prompt("a", "b", "a"), "the update keeps it");
        assert!(
            !conffile_would_prompt("a", "b", "b"),
            "the LC has the new one"
        );
        assert!(conffile_would_prompt("a", "b", "c"));
    }

    /// r19-md5sum: the conffile check hashed with the host's `md5sum` and took a failed run
    /// as the MD5 "", so an LC that had not changed its file was refused when md5sum failed.
    /// The MD5s are now computed in Rust on the bounded read through LcRoot.
    #[test]
    fn r19_md5sum_conffiles_are_hashed_in_rust_on_the_bounded_read() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("etc")).unwrap();
        fs::write(t.path().join("etc/a.conf"), "a\n").unwrap();
        fs::write(t.path().join("etc/big.conf"), vec![b'x'; (16 << 20) + 1]).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", t.path().join("etc/out.conf")).unwrap();
        let root = LcRoot::open(t.path()).unwrap();
        let r = RootReader::new(&root, "lc1", false);
        let m = r
            .conffile_md5s(&[
                "/etc/a.conf",
                "/etc/gone.conf",
                "/etc/big.conf",
                "/etc/out.conf",
            ])
            .unwrap();
        assert_eq!(m.len(), 1, "{m:?}");
        assert_eq!(m["/etc/a.conf"], "60b725f10c9c85c70d97880dfe8191b3");
        // Unchanged by the LC, changed by the update: no prompt, with no md5sum anywhere.
        let new = tempfile::tempdir().unwrap();
        fs::create_dir_all(new.path().join("etc")).unwrap();
        fs::write(new.path().join("etc/a.conf"), "b\n").unwrap();
        let shipped = BTreeMap::from([(
            "/etc/a.conf".to_owned(),
            "60b725f10c9c85c70d97880dfe8191b3".to_owned(),
        )]);
        check_conffiles(&r, "lc1", "po-conf", &shipped, new.path()).unwrap();
        fs::write(t.path().join("etc/a.conf"), "changed\n").unwrap();
        let e = check_conffiles(&r, "lc1", "po-conf", &shipped, new.path()).unwrap_err();
        assert!(matches!(e, FromAptError::ConffilePrompt { .. }), "{e}");
    }

    #[test]
    fn the_suite_is_a_plain_codename() {
        assert_eq!(
            suite_of_os_release(b"NAME=x\nVERSION_CODENAME=bookworm\n").as_deref(),
            Some("bookworm")
        );
        assert_eq!(
            suite_of_os_release(b"VERSION_CODENAME=\"trixie\"\n").as_deref(),
            Some("trixie")
        );
        for bad in [
            &b"VERSION_CODENAME=../x\n"[..],
            b"VERSION_CODENAME=\n",
            b"ID=debian\n",
        ] {
            assert_eq!(suite_of_os_release(bad), None);
        }
    }

    /// The standby's space check, run by the host's sh and df on the host's own disk: a small
    /// need passes, a need no disk has fails with the figures, a bad argument fails.
    #[test]
    fn the_standbys_space_check_compares_its_own_disk() {
        let t = tempfile::tempdir().unwrap();
        let script = t.path().join(SPACE_FILE);
        fs::write(&script, SPACE_SCRIPT).unwrap();
        let run = |need: &str| {
            Command::new("/bin/sh")
                .arg(&script)
                .arg(need)
                .output()
                .unwrap()
        };
        let ok = run("1");
        assert!(ok.status.success(), "{ok:?}");
        let full = run("999999999999");
        assert_eq!(full.status.code(), Some(1), "{full:?}");
        let e = String::from_utf8_lossy(&full.stderr);
        assert!(
            e.contains("KiB free; the updates need 999999999999 KiB"),
            "{e}"
        );
        assert_eq!(run("lots").status.code(), Some(2));
        let step = space_step(5 * 1024 + 1);
        assert_eq!(step["args"].as_array().unwrap()[0].as_str(), Some("6"));
    }

    #[test]
    fn the_date_is_rfc3339() {
        let d = now_rfc3339();
        assert_eq!(d.len(), 20);
        assert!(
            d.parse::<patchover_bundle::manifest::Published>().is_ok(),
            "{d}"
        );
    }
}
