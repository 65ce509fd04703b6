//! The bundle file: one zstd-compressed tar holding `manifest.toml` and `payload/…`.
//!
//! Why tar + zstd: every Linux box can inspect one (`tar --zstd -tf`), it streams, and the tar
//! format carries modes and symlinks a payload may need. Why so many checks: the archive is the
//! first thing patchover parses from a file it did not write. Even after the signature
//! verified, the reader rejects anything that could write outside the extraction directory
//! (`..`, absolute paths, links that leave `payload/`, paths through symlinks), anything that
//! is not a file, directory or in-tree symlink (devices, fifos, hard links), and anything over
//! the [`Limits`] (a zstd bomb, millions of entries, a manifest of megabytes). A truncated or
//! corrupted archive is an error, never a shorter bundle.
//!
//! Links are judged where they resolve on the unpacked tree, not by their text (`links`).
//!
//! Reading is done twice when extracting: [`read_archive`] validates the whole archive without
//! writing anything, then [`extract_archive`] writes it into a directory it creates itself,
//! never following a link on the way (`extract`), so a half-valid archive never leaves files
//! behind and a link in the tree never leads a write out of it.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::extract::DestDir;
use crate::links::{self, LinkWhy};
use crate::manifest::{MAX_MANIFEST_BYTES, Manifest, ManifestError};

/// The name of the manifest inside the archive.
pub const MANIFEST_NAME: &str = "manifest.toml";
/// The directory holding the payload inside the archive.
pub const PAYLOAD_DIR: &str = "payload";
/// The zstd magic number every bundle starts with.
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Size limits applied while reading a bundle, so a hostile file cannot exhaust memory or disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// The largest bundle file (compressed).
    pub max_bundle_bytes: u64,
    /// The largest total size of all files once unpacked.
    pub max_unpacked_bytes: u64,
    /// The most entries (files, directories, links) in one archive.
    pub max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bundle_bytes: 256 << 20,
            max_unpacked_bytes: 1 << 30,
            max_entries: 10_000,
        }
    }
}

/// A bundle archive that could not be read or unpacked.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("the bundle is empty (0 bytes): the file was not written completely")]
    Empty,
    #[error("the bundle is {size} bytes, over the limit of {max} bytes")]
    TooLarge { size: u64, max: u64 },
    #[error(
        "not a bundle: it does not start with the zstd magic number (make it with `patchover bundle create`)"
    )]
    NotZstd,
    #[error("the archive is truncated or corrupt: copy the bundle again")]
    Corrupt(#[source] io::Error),
    #[error("the archive unpacks to more than {max} bytes")]
    UnpackedTooLarge { max: u64 },
    #[error("the archive has more than {max} entries")]
    TooManyEntries { max: usize },
    #[error("entry {path:?}: {reason}")]
    UnsafePath { path: String, reason: &'static str },
    #[error(
        "entry {path:?} is a {kind}: bundles may only hold files, directories and symlinks inside payload/"
    )]
    ForbiddenType { path: String, kind: String },
    #[error(
        "entry {path:?} is a symlink to {target:?}, {why}: a bundle's links must resolve inside payload/ once unpacked, never above it; point the link at a path in payload/ or put the file itself there"
    )]
    SymlinkEscapes {
        path: String,
        target: String,
        why: Box<LinkWhy>,
    },
    #[error(
        "entry {path:?} is a hard link: bundles cannot hold hard links (build with `tar --hard-dereference`)"
    )]
    HardLink { path: String },
    #[error("entry {path:?} appears twice or conflicts with an earlier entry")]
    Duplicate { path: String },
    #[error("entry {path:?} is outside manifest.toml and payload/")]
    Outside { path: String },
    #[error("the archive has no manifest.toml")]
    NoManifest,
    #[error("manifest.toml is {size} bytes, over the limit of {max} bytes")]
    ManifestTooLarge { size: u64, max: usize },
    #[error("bad manifest")]
    Manifest(#[source] ManifestError),
    #[error("step {step} needs payload/{file}, which is not a regular file in the archive")]
    MissingPayload { step: usize, file: String },
    #[error("extraction target {path} already exists: remove it or pick a new directory")]
    DestExists { path: PathBuf },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What one archive entry is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EntryKind {
    File { size: u64, mode: u32 },
    Dir,
    Symlink { target: String },
}

/// One entry of a validated archive, with its normalized path (`payload/bin/tool`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntryInfo {
    pub path: String,
    #[serde(flatten)]
    pub kind: EntryKind,
}

/// A validated archive: its manifest and the list of its entries. Holds no file data.
#[derive(Debug, Clone, Serialize)]
pub struct BundleArchive {
    pub manifest: Manifest,
    pub entries: Vec<EntryInfo>,
    /// The total size of all files once unpacked.
    pub unpacked_bytes: u64,
}

/// Validates a whole bundle held in memory without writing anything.
pub fn read_archive(bytes: &[u8], limits: &Limits) -> Result<BundleArchive, ArchiveError> {
    walk(bytes, limits, None)
}

/// Validates the bundle, then unpacks it into `dest`, which must not exist yet (it is created
/// with mode 0755). Files keep their permission bits without setuid/setgid/sticky and without
/// group/other write. On error `dest` may be partly written: remove it.
pub fn extract_archive(
    bytes: &[u8],
    dest: &Path,
    limits: &Limits,
) -> Result<BundleArchive, ArchiveError> {
    read_archive(bytes, limits)?;
    if fs::symlink_metadata(dest).is_ok() {
        return Err(ArchiveError::DestExists {
            path: dest.to_owned(),
        });
    }
    fs::DirBuilder::new()
        .mode(0o755)
        .create(dest)
        .map_err(|source| ArchiveError::Write {
            path: dest.to_owned(),
            source,
        })?;
    walk(bytes, limits, Some(&DestDir::open(dest)?))
}

/// A reader that fails once more than `left` bytes were read, so a zstd bomb stops early.
struct Capped<R> {
    inner: R,
    left: u64,
}

#[derive(Debug)]
struct CapHit;
impl std::fmt::Display for CapHit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("decompressed size limit")
    }
}
impl std::error::Error for CapHit {}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            // Probe one byte: at the exact end of the stream that is fine.
            let mut one = [0u8; 1];
            return match self.inner.read(&mut one)? {
                0 => Ok(0),
                _ => Err(io::Error::other(CapHit)),
            };
        }
        let max = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
        self.left -= n as u64;
        Ok(n)
    }
}

fn is_cap_hit(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<CapHit>())
}

/// A read error of the archive stream: the decompression cap, or a corrupt archive.
fn io_err(e: io::Error, limits: &Limits) -> ArchiveError {
    if is_cap_hit(&e) {
        ArchiveError::UnpackedTooLarge {
            max: limits.max_unpacked_bytes,
        }
    } else {
        ArchiveError::Corrupt(e)
    }
}

/// Normalizes an entry path: strips leading `./` and a trailing `/`, and rejects anything
/// that is not a plain relative path. Returns `None` for the archive root (`.` or `./`).
fn normalize(raw: &[u8]) -> Result<Option<String>, ArchiveError> {
    let shown = String::from_utf8_lossy(raw).into_owned();
    let unsafe_path = |reason| ArchiveError::UnsafePath {
        path: shown.clone(),
        reason,
    };
    let s = std::str::from_utf8(raw).map_err(|_| unsafe_path("the path is not UTF-8"))?;
    if s.contains('\0') {
        return Err(unsafe_path("the path has a NUL byte"));
    }
    if s.starts_with('/') {
        return Err(unsafe_path("the path is absolute"));
    }
    if s.len() > 4096 {
        return Err(unsafe_path("the path is longer than 4096 bytes"));
    }
    let mut s = s;
    while let Some(rest) = s.strip_prefix("./") {
        s = rest;
    }
    let s = s.trim_end_matches('/');
    if s.is_empty() || s == "." {
        return Ok(None);
    }
    let mut depth = 0;
    for part in s.split('/') {
        match part {
            ".." => return Err(unsafe_path("the path has a `..` component")),
            "" | "." => return Err(unsafe_path("the path has an empty or `.` component")),
            _ => depth += 1,
        }
    }
    if depth > 64 {
        return Err(unsafe_path("the path is deeper than 64 directories"));
    }
    if s != MANIFEST_NAME && s != PAYLOAD_DIR && !s.starts_with("payload/") {
        return Err(ArchiveError::Outside { path: s.to_owned() });
    }
    Ok(Some(s.to_owned()))
}

fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/').map(move |(i, _)| &path[..i])
}

fn walk(
    bytes: &[u8],
    limits: &Limits,
    dest: Option<&DestDir>,
) -> Result<BundleArchive, ArchiveError> {
    if bytes.is_empty() {
        return Err(ArchiveError::Empty);
    }
    if bytes.len() as u64 > limits.max_bundle_bytes {
        return Err(ArchiveError::TooLarge {
            size: bytes.len() as u64,
            max: limits.max_bundle_bytes,
        });
    }
    if bytes.len() < 4 || bytes[..4] != ZSTD_MAGIC {
        return Err(ArchiveError::NotZstd);
    }
    let decoder = zstd::stream::read::Decoder::with_buffer(bytes).map_err(ArchiveError::Corrupt)?;
    // Headers take 512 bytes each, long names a few more blocks: allow for them on top of the
    // file data before calling the stream a bomb.
    let cap = limits
        .max_unpacked_bytes
        .saturating_add((limits.max_entries as u64 + 2).saturating_mul(4 * 512))
        .saturating_add(1 << 20);
    let mut archive = tar::Archive::new(Capped {
        inner: decoder,
        left: cap,
    });
    let mut kinds: BTreeMap<String, EntryKind> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut manifest_bytes: Option<Vec<u8>> = None;
    let mut unpacked: u64 = 0;

    let entries = archive.entries().map_err(|e| io_err(e, limits))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| io_err(e, limits))?;
        let etype = entry.header().entry_type();
        if etype == tar::EntryType::XGlobalHeader {
            // `git archive` writes one with the commit id; it carries no file.
            continue;
        }
        if order.len() >= limits.max_entries {
            return Err(ArchiveError::TooManyEntries {
                max: limits.max_entries,
            });
        }
        let Some(path) = normalize(&entry.path_bytes())? else {
            if etype.is_dir() {
                continue;
            }
            return Err(ArchiveError::UnsafePath {
                path: String::from_utf8_lossy(&entry.path_bytes()).into_owned(),
                reason: "a non-directory entry names the archive root",
            });
        };
        if kinds.contains_key(&path) {
            return Err(ArchiveError::Duplicate { path });
        }
        let blocked = ancestors(&path).find_map(|anc| match kinds.get(anc) {
            Some(EntryKind::Symlink { .. }) => Some(true),
            Some(EntryKind::File { .. }) => Some(false),
            _ => None,
        });
        match blocked {
            Some(true) => {
                return Err(ArchiveError::UnsafePath {
                    path,
                    reason: "the path goes through a symlink in the archive",
                });
            }
            Some(false) => return Err(ArchiveError::Duplicate { path }),
            None => {}
        }
        let kind = entry_kind(&entry, path.clone(), limits)?;
        if let EntryKind::File { size, .. } = kind {
            unpacked = unpacked.saturating_add(size);
            if unpacked > limits.max_unpacked_bytes {
                return Err(ArchiveError::UnpackedTooLarge {
                    max: limits.max_unpacked_bytes,
                });
            }
        }
        if path == MANIFEST_NAME {
            let EntryKind::File { size, .. } = kind else {
                return Err(ArchiveError::ForbiddenType {
                    path,
                    kind: "non-file manifest".to_owned(),
                });
            };
            if size > MAX_MANIFEST_BYTES as u64 {
                return Err(ArchiveError::ManifestTooLarge {
                    size,
                    max: MAX_MANIFEST_BYTES,
                });
            }
            let mut buf = Vec::with_capacity(size as usize);
            entry.read_to_end(&mut buf).map_err(|e| io_err(e, limits))?;
            if let Some(dest) = dest {
                dest.create_file(MANIFEST_NAME, 0o644)?
                    .write_all(&buf)
                    .map_err(dest.write_err(MANIFEST_NAME))?;
            }
            manifest_bytes = Some(buf);
        } else if path == PAYLOAD_DIR {
            if kind != EntryKind::Dir {
                return Err(ArchiveError::ForbiddenType {
                    path,
                    kind: "non-directory payload".to_owned(),
                });
            }
            if let Some(dest) = dest {
                dest.mkdir(PAYLOAD_DIR)?;
            }
        } else if let Some(dest) = dest {
            write_entry(dest, &path, &kind, &mut entry, limits)?;
        } else if matches!(kind, EntryKind::File { .. }) {
            io::copy(&mut entry, &mut io::sink()).map_err(|e| io_err(e, limits))?;
        }
        order.push(path.clone());
        kinds.insert(path, kind);
    }
    // Drain the rest of the stream: a zstd frame cut short after the tar's end shows up here.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| io_err(e, limits))?;

    check_tree(&kinds)?;

    let manifest_bytes = manifest_bytes.ok_or(ArchiveError::NoManifest)?;
    let manifest = Manifest::parse(&manifest_bytes).map_err(ArchiveError::Manifest)?;
    for (i, step) in manifest.steps.iter().enumerate() {
        let want = step.payload_file().archive_path();
        if !matches!(kinds.get(&want), Some(EntryKind::File { .. })) {
            return Err(ArchiveError::MissingPayload {
                step: i,
                file: step.payload_file().to_string(),
            });
        }
    }
    let entries = order
        .into_iter()
        .map(|p| {
            let kind = kinds.remove(&p).unwrap_or(EntryKind::Dir);
            EntryInfo { path: p, kind }
        })
        .collect();
    Ok(BundleArchive {
        manifest,
        entries,
        unpacked_bytes: unpacked,
    })
}

/// The checks of the whole archive: nothing may sit below a file or a link, and every link
/// must resolve inside payload/ on the tree as unpacked (links followed, `..` from where the
/// walk really is: `links`).
fn check_tree(kinds: &BTreeMap<String, EntryKind>) -> Result<(), ArchiveError> {
    for path in kinds.keys() {
        for anc in ancestors(path) {
            if matches!(
                kinds.get(anc),
                Some(EntryKind::File { .. } | EntryKind::Symlink { .. })
            ) {
                return Err(ArchiveError::Duplicate { path: path.clone() });
            }
        }
    }
    links::check_all(kinds).map_err(|r| ArchiveError::SymlinkEscapes {
        path: r.link,
        target: r.target,
        why: Box::new(r.why),
    })
}

/// What the entry at `path` is; anything but a file, a directory or a link with a plain
/// relative target is refused.
fn entry_kind<R: Read>(
    entry: &tar::Entry<'_, R>,
    path: String,
    limits: &Limits,
) -> Result<EntryKind, ArchiveError> {
    let kind = match entry.header().entry_type() {
        tar::EntryType::Regular | tar::EntryType::Continuous => {
            let mode = entry.header().mode().map_err(|e| io_err(e, limits))? & 0o7777;
            EntryKind::File {
                size: entry.size(),
                mode,
            }
        }
        tar::EntryType::Directory => EntryKind::Dir,
        tar::EntryType::Symlink => {
            let target = entry
                .link_name_bytes()
                .map(|t| String::from_utf8_lossy(&t).into_owned())
                .unwrap_or_default();
            if let Err(problem) = links::check_target(&target) {
                return Err(ArchiveError::SymlinkEscapes {
                    path,
                    target,
                    why: Box::new(LinkWhy {
                        problem,
                        via: Vec::new(),
                    }),
                });
            }
            EntryKind::Symlink { target }
        }
        tar::EntryType::Link => return Err(ArchiveError::HardLink { path }),
        other => {
            let kind = match other {
                tar::EntryType::Char => "character device".to_owned(),
                tar::EntryType::Block => "block device".to_owned(),
                tar::EntryType::Fifo => "fifo".to_owned(),
                tar::EntryType::GNUSparse => "sparse file".to_owned(),
                o => format!("tar entry of type {:?}", o.as_byte() as char),
            };
            return Err(ArchiveError::ForbiddenType { path, kind });
        }
    };
    Ok(kind)
}

/// Writes one payload entry below the extraction directory (never through a link: `extract`).
fn write_entry(
    dest: &DestDir,
    path: &str,
    kind: &EntryKind,
    data: &mut impl Read,
    limits: &Limits,
) -> Result<(), ArchiveError> {
    match kind {
        EntryKind::Dir => dest.mkdir(path),
        EntryKind::Symlink { target } => dest.symlink(path, target),
        EntryKind::File { mode, .. } => {
            let mut f = dest.create_file(path, mode & 0o755 | 0o600)?;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = data.read(&mut buf).map_err(|e| io_err(e, limits))?;
                if n == 0 {
                    return Ok(());
                }
                f.write_all(&buf[..n]).map_err(dest.write_err(path))?;
            }
        }
    }
}

/// Writes a bundle archive: `manifest` as `manifest.toml`, then every entry below
/// `payload_dir` (sorted, so the same tree gives the same bytes), as zstd-compressed tar.
/// Owners are root, times are 0: the archive carries only names, modes and contents.
pub fn write_archive(
    manifest: &[u8],
    payload_dir: Option<&Path>,
    out: impl Write,
) -> io::Result<()> {
    let mut enc = zstd::stream::write::Encoder::new(out, 10)?;
    enc.include_checksum(true)?;
    let mut b = tar::Builder::new(enc);
    append(
        &mut b,
        MANIFEST_NAME,
        tar::EntryType::Regular,
        0o644,
        manifest,
        None,
    )?;
    append(
        &mut b,
        PAYLOAD_DIR,
        tar::EntryType::Directory,
        0o755,
        &[],
        None,
    )?;
    if let Some(dir) = payload_dir {
        let mut seen = HashSet::new();
        add_dir(&mut b, dir, PAYLOAD_DIR, &mut seen)?;
    }
    let enc = b.into_inner()?;
    enc.finish()?.flush()
}

fn append<W: Write>(
    b: &mut tar::Builder<W>,
    path: &str,
    kind: tar::EntryType,
    mode: u32,
    data: &[u8],
    link: Option<&Path>,
) -> io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(data.len() as u64);
    if let Some(l) = link {
        b.append_link(&mut h, path, l)
    } else {
        b.append_data(&mut h, path, data)
    }
}

fn add_dir<W: Write>(
    b: &mut tar::Builder<W>,
    dir: &Path,
    prefix: &str,
    seen: &mut HashSet<(u64, u64)>,
) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut names: Vec<_> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        let full = dir.join(&name);
        let name = name.to_str().ok_or_else(|| {
            io::Error::other(format!("{}: file names must be UTF-8", full.display()))
        })?;
        let rel = format!("{prefix}/{name}");
        let md = fs::symlink_metadata(&full)?;
        let ft = md.file_type();
        if ft.is_dir() {
            if !seen.insert((md.dev(), md.ino())) {
                continue;
            }
            append(b, &rel, tar::EntryType::Directory, 0o755, &[], None)?;
            add_dir(b, &full, &rel, seen)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&full)?;
            append(b, &rel, tar::EntryType::Symlink, 0o777, &[], Some(&target))?;
        } else if ft.is_file() {
            let data = fs::read(&full)?;
            append(
                b,
                &rel,
                tar::EntryType::Regular,
                md.mode() & 0o7777,
                &data,
                None,
            )?;
        } else {
            return Err(io::Error::other(format!(
                "{}: only files, directories and symlinks can go into a bundle",
                full.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const MANIFEST: &str = r#"
format = 1
id = "t-1"
title = "test"
category = "bugfix"
severity = "low"
published = 2026-11-20T10:00:00Z

[[step]]
kind = "script"
file = "run.sh"
"#;

    /// A raw tar entry with any name, type and link, written past the builder's own checks.
    pub(crate) struct Raw<'a> {
        pub path: &'a [u8],
        pub kind: tar::EntryType,
        pub data: &'a [u8],
        pub link: &'a [u8],
    }

    pub(crate) fn raw(path: &'static str, data: &'static [u8]) -> Raw<'static> {
        Raw {
            path: path.as_bytes(),
            kind: tar::EntryType::Regular,
            data,
            link: b"",
        }
    }

    pub(crate) fn tar_of(entries: &[Raw<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_old();
            {
                let old = h.as_old_mut();
                old.name[..e.path.len()].copy_from_slice(e.path);
                old.linkname[..e.link.len()].copy_from_slice(e.link);
            }
            h.set_entry_type(e.kind);
            h.set_mode(0o644);
            h.set_size(e.data.len() as u64);
            h.set_cksum();
            b.append(&h, e.data).unwrap();
        }
        b.into_inner().unwrap()
    }

    pub(crate) fn zst(tar: &[u8]) -> Vec<u8> {
        zstd::encode_all(tar, 3).unwrap()
    }

    fn good_entries() -> Vec<Raw<'static>> {
        vec![
            raw("manifest.toml", MANIFEST.as_bytes()),
            raw("payload/run.sh", b"echo hi\n"),
        ]
    }

    fn read(entries: &[Raw<'_>]) -> Result<BundleArchive, ArchiveError> {
        read_archive(&zst(&tar_of(entries)), &Limits::default())
    }

    #[test]
    fn good_archive_reads_and_extracts() {
        let mut es = good_entries();
        es.push(Raw {
            path: b"payload/lib/link",
            kind: tar::EntryType::Symlink,
            data: b"",
            link: b"../run.sh",
        });
        let a = read(&es).unwrap();
        assert_eq!(a.manifest.id.as_str(), "t-1");
        assert_eq!(a.entries.len(), 3);
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x");
        extract_archive(&zst(&tar_of(&es)), &dest, &Limits::default()).unwrap();
        assert_eq!(fs::read(dest.join("payload/run.sh")).unwrap(), b"echo hi\n");
        assert_eq!(
            fs::read(dest.join("payload/lib/link")).unwrap(),
            b"echo hi\n"
        );
        // A second extraction into the same place is refused.
        assert!(matches!(
            extract_archive(&zst(&tar_of(&es)), &dest, &Limits::default()),
            Err(ArchiveError::DestExists { .. })
        ));
    }

    /// The kernel as the oracle for the link check: random trees of directories, files and
    /// links whose targets mix names, links, `.` and `..`; whenever the reader accepts one, it
    /// is unpacked (three levels below a scratch directory, so an escape has somewhere to go)
    /// and every link, resolved by the kernel (`canonicalize`), lands inside `payload/` or
    /// nowhere (a dangling name), and never loops.
    #[test]
    fn every_accepted_link_resolves_inside_payload_when_the_kernel_follows_it() {
        const NAMES: [&str; 8] = ["a", "b", "f", "l0", "l1", "l2", "..", "."];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let scratch = tempfile::tempdir().unwrap();
        let (mut accepted, mut links_checked) = (0, 0);
        for round in 0..600 {
            let mut targets = Vec::new();
            for _ in 0..3 {
                let len = 1 + next(6);
                let t: Vec<&str> = (0..len).map(|_| NAMES[next(NAMES.len())]).collect();
                targets.push(t.join("/"));
            }
            let homes = ["payload", "payload/a", "payload/a/b"];
            let links: Vec<String> = (0..3)
                .map(|i| format!("{}/l{i}", homes[next(homes.len())]))
                .collect();
            let mut es = good_entries();
            es.push(raw("payload/f", b"f"));
            es.push(raw("payload/a/b/f", b"f"));
            for (l, t) in links.iter().zip(&targets) {
                es.push(Raw {
                    path: l.as_bytes(),
                    kind: tar::EntryType::Symlink,
                    data: b"",
                    link: t.as_bytes(),
                });
            }
            let bytes = zst(&tar_of(&es));
            if read_archive(&bytes, &Limits::default()).is_err() {
                continue;
            }
            accepted += 1;
            let dest = scratch.path().join(format!("{round}/x/y"));
            fs::create_dir_all(dest.parent().unwrap()).unwrap();
            extract_archive(&bytes, &dest, &Limits::default()).unwrap();
            let payload = dest.join(PAYLOAD_DIR).canonicalize().unwrap();
            for (l, t) in links.iter().zip(&targets) {
                match dest.join(l).canonicalize() {
                    Ok(p) => assert!(
                        p.starts_with(&payload),
                        "{l} -> {t} accepted, but resolves to {} ({links:?} -> {targets:?})",
                        p.display()
                    ),
                    Err(e) => assert_ne!(
                        e.raw_os_error(),
                        Some(libc::ELOOP),
                        "{l} -> {t} accepted, but loops ({links:?} -> {targets:?})"
                    ),
                }
                links_checked += 1;
            }
        }
        eprintln!("{accepted} accepted, {links_checked} links checked");
        // The generator reaches both sides of the check.
        assert!(
            accepted > 50 && accepted < 550,
            "{accepted} of 600 accepted"
        );
        assert!(links_checked >= 3 * 50);
    }

    #[test]
    fn dotdot_and_absolute_rejected() {
        for p in [
            "payload/../../etc/passwd",
            "/etc/passwd",
            "payload/a/../../x",
        ] {
            let mut es = good_entries();
            es.push(Raw {
                path: p.as_bytes(),
                ..raw("", b"x")
            });
            assert!(
                matches!(read(&es), Err(ArchiveError::UnsafePath { .. })),
                "{p}: {:?}",
                read(&es).err()
            );
        }
        let mut es = good_entries();
        es.push(raw("etc/passwd", b"x"));
        assert!(matches!(read(&es), Err(ArchiveError::Outside { .. })));
    }

    #[test]
    fn escaping_symlinks_and_links_through_symlinks_rejected() {
        for target in ["/etc", "../../etc", "..", "../manifest.toml"] {
            let mut es = good_entries();
            es.push(Raw {
                path: b"payload/l",
                kind: tar::EntryType::Symlink,
                data: b"",
                link: target.as_bytes(),
            });
            assert!(
                matches!(read(&es), Err(ArchiveError::SymlinkEscapes { .. })),
                "{target}"
            );
        }
        // A symlink that stays inside, then a file written through it.
        let mut es = good_entries();
        es.push(Raw {
            path: b"payload/d",
            kind: tar::EntryType::Symlink,
            data: b"",
            link: b"sub",
        });
        es.push(raw("payload/d/evil", b"x"));
        assert!(matches!(read(&es), Err(ArchiveError::UnsafePath { .. })));
        let mut es = good_entries();
        es.push(Raw {
            path: b"payload/h",
            kind: tar::EntryType::Link,
            data: b"",
            link: b"payload/run.sh",
        });
        assert!(matches!(read(&es), Err(ArchiveError::HardLink { .. })));
    }

    #[test]
    fn devices_and_fifos_rejected() {
        for kind in [
            tar::EntryType::Char,
            tar::EntryType::Block,
            tar::EntryType::Fifo,
        ] {
            let mut es = good_entries();
            es.push(Raw {
                path: b"payload/dev",
                kind,
                data: b"",
                link: b"",
            });
            let e = read(&es).unwrap_err();
            assert!(matches!(e, ArchiveError::ForbiddenType { .. }), "{e}");
        }
    }

    #[test]
    fn huge_manifest_rejected_before_reading() {
        let big = vec![b'#'; 3 << 20];
        let es = [Raw {
            data: &big,
            ..raw("manifest.toml", b"")
        }];
        assert!(matches!(
            read(&es),
            Err(ArchiveError::ManifestTooLarge { .. })
        ));
    }

    #[test]
    fn empty_truncated_and_garbage_rejected() {
        assert!(matches!(
            read_archive(b"", &Limits::default()),
            Err(ArchiveError::Empty)
        ));
        assert!(matches!(
            read_archive(&tar_of(&good_entries()), &Limits::default()),
            Err(ArchiveError::NotZstd)
        ));
        let full = zst(&tar_of(&good_entries()));
        for cut in [5, full.len() / 2, full.len() - 1] {
            let e = read_archive(&full[..cut], &Limits::default()).unwrap_err();
            assert!(matches!(e, ArchiveError::Corrupt(_)), "cut {cut}: {e}");
        }
        // A valid zstd stream of an empty archive: no manifest.
        assert!(matches!(
            read_archive(&zst(&[0u8; 1024]), &Limits::default()),
            Err(ArchiveError::NoManifest)
        ));
        assert!(matches!(
            read_archive(&zst(b""), &Limits::default()),
            Err(ArchiveError::NoManifest)
        ));
    }

    #[test]
    fn limits_enforced() {
        let big = vec![0u8; 64 << 10];
        let mut es = good_entries();
        es.push(Raw {
            data: &big,
            ..raw("payload/big", b"")
        });
        let small = Limits {
            max_unpacked_bytes: 32 << 10,
            ..Limits::default()
        };
        let bytes = zst(&tar_of(&es));
        assert!(matches!(
            read_archive(&bytes, &small),
            Err(ArchiveError::UnpackedTooLarge { .. })
        ));
        let few = Limits {
            max_entries: 2,
            ..Limits::default()
        };
        assert!(matches!(
            read_archive(&bytes, &few),
            Err(ArchiveError::TooManyEntries { .. })
        ));
        let tiny = Limits {
            max_bundle_bytes: 10,
            ..Limits::default()
        };
        assert!(matches!(
            read_archive(&bytes, &tiny),
            Err(ArchiveError::TooLarge { .. })
        ));
    }

    #[test]
    fn missing_payload_and_duplicates_rejected() {
        let es = [raw("manifest.toml", MANIFEST.as_bytes())];
        assert!(matches!(
            read(&es),
            Err(ArchiveError::MissingPayload { step: 0, .. })
        ));
        let mut es = good_entries();
        es.push(raw("payload/run.sh", b"again"));
        assert!(matches!(read(&es), Err(ArchiveError::Duplicate { .. })));
        let mut es = good_entries();
        es.push(raw("payload/run.sh/x", b"below a file"));
        assert!(matches!(read(&es), Err(ArchiveError::Duplicate { .. })));
    }

    #[test]
    fn write_then_read_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("payload");
        fs::create_dir_all(p.join("sub")).unwrap();
        fs::write(p.join("run.sh"), "echo ok\n").unwrap();
        fs::write(p.join("sub/data"), "d").unwrap();
        std::os::unix::fs::symlink("sub/data", p.join("ln")).unwrap();
        let mut out = Vec::new();
        write_archive(MANIFEST.as_bytes(), Some(&p), &mut out).unwrap();
        let a = read_archive(&out, &Limits::default()).unwrap();
        let paths: Vec<_> = a.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "manifest.toml",
                "payload",
                "payload/ln",
                "payload/run.sh",
                "payload/sub",
                "payload/sub/data"
            ]
        );
        let mut again = Vec::new();
        write_archive(MANIFEST.as_bytes(), Some(&p), &mut again).unwrap();
        assert_eq!(out, again, "same tree, same bytes");
    }
}
