//! The one way the host touches an LC's files.
//!
//! An LC is untrusted: root inside it may have replaced any file or directory of its disks with
//! a link to a host path, a FIFO, or a device node, and may keep changing them while the host
//! works. [`LcRoot`] owns a directory file descriptor of an LC's root (its system disk, or an
//! application disk, as the host sees it) and offers only operations that stay inside it:
//!
//! - every path is resolved *within* the root, as the LC itself would resolve it: an absolute
//!   link `/etc -> /host/etc` or a relative `../../..` stops at the root (`openat2`
//!   `RESOLVE_IN_ROOT` through libpathrs, as runc does). Debian roots are full of absolute links,
//!   so refusing them is not an option;
//! - the *last* component is never followed when it is written, replaced or removed: a file is
//!   written to a fresh name (`O_CREAT|O_EXCL|O_NOFOLLOW`) in its parent's directory fd and
//!   renamed over the last component, so a link planted there is replaced, not written through;
//! - files are read only when the opened descriptor is a regular file (`O_NOFOLLOW|O_NONBLOCK`,
//!   then `fstat` on that descriptor), so a FIFO cannot block the host and a link cannot
//!   carry a host file out;
//! - [`LcRoot::walk_files`] walks the tree by directory descriptors without following any link
//!   and without leaving the root's filesystem.
//!
//! Paths in errors are the LC's own (`/etc/init.d/S05patchover`), with the host root beside.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{AtFlags, FcntlArg, OFlag, fcntl, openat, renameat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat};
use nix::unistd::{UnlinkatFlags, unlinkat};
use pathrs::flags::OpenFlags;

/// What went wrong, where in the LC, and in which root.
#[derive(Debug, thiserror::Error)]
#[error("{op} {} inside the LC root {}", lc_path(.path), .root.display())]
pub struct RootError {
    pub op: &'static str,
    /// The path as the LC sees it, relative to its root.
    pub path: PathBuf,
    pub root: PathBuf,
    #[source]
    pub source: io::Error,
}

impl RootError {
    pub fn kind(&self) -> io::ErrorKind {
        self.source.kind()
    }
    pub fn is_not_found(&self) -> bool {
        self.kind() == io::ErrorKind::NotFound
    }
}

fn lc_path(p: &Path) -> String {
    format!("/{}", p.display())
}

fn pathrs_io(e: pathrs::error::Error) -> io::Error {
    match e.kind() {
        pathrs::error::ErrorKind::OsError(Some(n)) => io::Error::from_raw_os_error(n),
        _ => io::Error::other(e.to_string()),
    }
}

fn nix_io(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// A regular file opened inside an LC root, with its size at open.
pub struct LcFile {
    pub file: File,
    pub len: u64,
    pub mode: u32,
}

/// A handle on an LC's root directory; see the module docs.
pub struct LcRoot {
    root: pathrs::Root,
    path: PathBuf,
    dev: u64,
}

impl std::fmt::Debug for LcRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LcRoot").field("path", &self.path).finish()
    }
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl LcRoot {
    /// Opens the LC root at `path` (a host path patchover chose: the disk directory or the
    /// mount point of an image, which the LC does not control).
    pub fn open(path: &Path) -> Result<LcRoot, RootError> {
        let root = pathrs::Root::open(path).map_err(|e| RootError {
            op: "opening",
            path: PathBuf::new(),
            root: path.to_owned(),
            source: pathrs_io(e),
        })?;
        let st = fstat(root.as_fd()).map_err(|e| RootError {
            op: "inspecting",
            path: PathBuf::new(),
            root: path.to_owned(),
            source: nix_io(e),
        })?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFDIR {
            return Err(RootError {
                op: "opening",
                path: PathBuf::new(),
                root: path.to_owned(),
                source: io::Error::from_raw_os_error(libc::ENOTDIR),
            });
        }
        Ok(LcRoot {
            root,
            path: path.to_owned(),
            dev: st.st_dev,
        })
    }

    /// The host path of the root (for messages and for handing to programs that run *inside*
    /// the LC; never join it with a path and open the result on the host).
    pub fn host_path(&self) -> &Path {
        &self.path
    }

    fn err(&self, op: &'static str, rel: &Path) -> impl FnOnce(io::Error) -> RootError + '_ {
        let path = clean(rel);
        move |source| RootError {
            op,
            path,
            root: self.path.clone(),
            source,
        }
    }

    /// Splits `rel` into its parent and last component; the last component must be a name.
    fn split<'p>(
        &self,
        op: &'static str,
        rel: &'p Path,
    ) -> Result<(PathBuf, &'p OsStr), RootError> {
        match rel.components().next_back() {
            Some(Component::Normal(name)) => {
                Ok((clean(rel.parent().unwrap_or(Path::new(""))), name))
            }
            _ => Err(self.err(op, rel)(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the path must end in a name",
            ))),
        }
    }

    /// Opens the directory `rel` (links resolved within the root) for `*at` calls.
    fn dir(&self, op: &'static str, rel: &Path) -> Result<File, RootError> {
        let rel = clean(rel);
        if rel.as_os_str().is_empty() {
            // The root handle is `O_PATH`: open it again as a directory that can be listed.
            return openat(
                self.root.as_fd(),
                ".",
                OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map(File::from)
            .map_err(|e| self.err(op, &rel)(nix_io(e)));
        }
        self.root
            .open_subpath(
                &rel,
                OpenFlags::O_DIRECTORY | OpenFlags::O_RDONLY | OpenFlags::O_CLOEXEC,
            )
            .map_err(|e| self.err(op, &rel)(pathrs_io(e)))
    }

    /// Creates the directory `rel` and its missing parents (mode `mode`, links resolved within
    /// the root) and returns it opened.
    pub fn mkdir_all(&self, rel: &Path, mode: u32) -> Result<File, RootError> {
        let rel = clean(rel);
        if rel.as_os_str().is_empty() {
            return self.dir("opening", &rel);
        }
        let h = self
            .root
            .mkdir_all(&rel, &std::fs::Permissions::from_mode(mode))
            .map_err(|e| self.err("creating the directory", &rel)(pathrs_io(e)))?;
        h.reopen(OpenFlags::O_DIRECTORY | OpenFlags::O_RDONLY | OpenFlags::O_CLOEXEC)
            .map_err(|e| self.err("opening", &rel)(pathrs_io(e)))
    }

    /// An `O_PATH` descriptor of the directory `rel`, created with its parents if missing: a
    /// mount target that cannot be swapped for a link between the check and the mount (mount
    /// onto `/proc/self/fd/N`, as runc does).
    pub fn mount_target(&self, rel: &Path, mode: u32) -> Result<OwnedFd, RootError> {
        let rel = clean(rel);
        let h = self
            .root
            .mkdir_all(&rel, &std::fs::Permissions::from_mode(mode))
            .map_err(|e| self.err("creating the mount point", &rel)(pathrs_io(e)))?;
        Ok(OwnedFd::from(h))
    }

    /// Runs `f` on a fresh file in the parent of `rel` and renames it over `rel`'s last
    /// component; whatever was there (a file, a link, a FIFO) is replaced, never followed.
    fn replace(
        &self,
        op: &'static str,
        rel: &Path,
        mode: u32,
        f: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> Result<File, RootError> {
        let (parent, name) = self.split(op, rel)?;
        let dir = self.mkdir_all(&parent, 0o755)?;
        let tmp = tmp_name(name);
        let fd = openat(
            dir.as_fd(),
            tmp.as_os_str(),
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| self.err(op, rel)(nix_io(e)))?;
        let mut file = File::from(fd);
        let res = f(&mut file)
            .and_then(|()| file.set_permissions(std::fs::Permissions::from_mode(mode)))
            .and_then(|()| file.sync_all())
            .and_then(|()| {
                renameat(dir.as_fd(), tmp.as_os_str(), dir.as_fd(), name).map_err(nix_io)
            });
        if let Err(e) = res {
            let _ = unlinkat(dir.as_fd(), tmp.as_os_str(), UnlinkatFlags::NoRemoveDir);
            return Err(self.err(op, rel)(e));
        }
        file.rewind().map_err(self.err(op, rel))?;
        Ok(file)
    }

    /// Writes `data` to `rel` (parents created), replacing whatever was there.
    pub fn write_file(&self, rel: &Path, data: &[u8], mode: u32) -> Result<(), RootError> {
        self.replace("writing", rel, mode, |f| f.write_all(data))
            .map(drop)
    }

    /// Copies the host file `from` to `rel` (parents created), replacing whatever was there,
    /// and returns the written file, open for reading from its start (to check what was
    /// written without looking the path up again).
    pub fn copy_in(&self, from: &Path, rel: &Path, mode: u32) -> Result<File, RootError> {
        let mut src = File::open(from).map_err(|source| RootError {
            op: "reading the host file",
            path: clean(rel),
            root: from.to_owned(),
            source,
        })?;
        self.replace("writing", rel, mode, |f| io::copy(&mut src, f).map(drop))
    }

    /// Makes `rel` a link to `target` (parents created), replacing whatever was there.
    pub fn symlink(&self, rel: &Path, target: &Path) -> Result<(), RootError> {
        let (parent, name) = self.split("linking", rel)?;
        let dir = self.mkdir_all(&parent, 0o755)?;
        let tmp = tmp_name(name);
        nix::unistd::symlinkat(target, dir.as_fd(), tmp.as_os_str())
            .and_then(|()| renameat(dir.as_fd(), tmp.as_os_str(), dir.as_fd(), name))
            .map_err(|e| {
                let _ = unlinkat(dir.as_fd(), tmp.as_os_str(), UnlinkatFlags::NoRemoveDir);
                self.err("linking", rel)(nix_io(e))
            })
    }

    /// Removes the file or link `rel` (never what a link points to); absent is fine.
    pub fn remove_file(&self, rel: &Path) -> Result<(), RootError> {
        let (parent, name) = self.split("removing", rel)?;
        let dir = match self.dir("removing", &parent) {
            Err(e) if e.is_not_found() => return Ok(()),
            r => r?,
        };
        match unlinkat(dir.as_fd(), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(nix::Error::ENOENT) => Ok(()),
            Err(e) => Err(self.err("removing", rel)(nix_io(e))),
        }
    }

    /// Removes `rel` and everything under it (a link is removed, not followed); absent is fine.
    pub fn remove_all(&self, rel: &Path) -> Result<(), RootError> {
        let (parent, name) = self.split("removing", rel)?;
        let dir = match self.dir("removing", &parent) {
            Err(e) if e.is_not_found() => return Ok(()),
            r => r?,
        };
        remove_at(&dir, name).map_err(self.err("removing", rel))
    }

    /// Removes everything in the root (the root directory itself stays); nothing is followed.
    pub fn clear(&self) -> Result<(), RootError> {
        let top = self.dir("clearing", Path::new(""))?;
        for n in list(&top).map_err(self.err("clearing", Path::new("")))? {
            remove_at(&top, &n).map_err(self.err("clearing", Path::new(&n)))?;
        }
        Ok(())
    }

    /// What `rel` is, links resolved within the root (`None`: absent).
    pub fn stat(&self, rel: &Path) -> Result<Option<FileStat>, RootError> {
        let rel = clean(rel);
        if rel.as_os_str().is_empty() {
            return fstat(self.root.as_fd())
                .map(Some)
                .map_err(|e| self.err("inspecting", &rel)(nix_io(e)));
        }
        match self.root.resolve(&rel) {
            Ok(h) => fstat(h.as_fd())
                .map(Some)
                .map_err(|e| self.err("inspecting", &rel)(nix_io(e))),
            Err(e) => match pathrs_io(e) {
                e if e.kind() == io::ErrorKind::NotFound => Ok(None),
                e if e.raw_os_error() == Some(libc::ENOTDIR) => Ok(None),
                e => Err(self.err("inspecting", &rel)(e)),
            },
        }
    }

    /// Is `rel` a directory (links resolved within the root)?
    pub fn is_dir(&self, rel: &Path) -> bool {
        matches!(self.stat(rel), Ok(Some(st)) if is_type(&st, SFlag::S_IFDIR))
    }

    /// Is `rel` an executable regular file (links resolved within the root)?
    pub fn is_executable_file(&self, rel: &Path) -> bool {
        matches!(self.stat(rel), Ok(Some(st)) if is_type(&st, SFlag::S_IFREG) && st.st_mode & 0o111 != 0)
    }

    /// Opens the regular file `rel` for reading (links resolved within the root); anything
    /// else there (a FIFO, a device, a directory) is refused without blocking.
    pub fn open_file(&self, rel: &Path) -> Result<LcFile, RootError> {
        let rel = clean(rel);
        let file = self
            .root
            .open_subpath(
                &rel,
                OpenFlags::O_RDONLY
                    | OpenFlags::O_NONBLOCK
                    | OpenFlags::O_NOCTTY
                    | OpenFlags::O_CLOEXEC,
            )
            .map_err(|e| self.err("opening", &rel)(pathrs_io(e)))?;
        regular(file).map_err(self.err("opening", &rel))
    }

    /// Reads the regular file `rel`, at most `limit` bytes (more is an error).
    pub fn read_file(&self, rel: &Path, limit: u64) -> Result<Vec<u8>, RootError> {
        let f = self.open_file(rel)?;
        let mut out = Vec::new();
        (&f.file)
            .take(limit + 1)
            .read_to_end(&mut out)
            .map_err(self.err("reading", rel))?;
        if out.len() as u64 > limit {
            return Err(self.err("reading", rel)(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("larger than {limit} bytes"),
            )));
        }
        Ok(out)
    }

    /// Walks the whole tree by directory descriptors, following no link and staying on the
    /// root's filesystem, and calls `visit` with each regular file's path (relative to the
    /// root) and the file opened for reading. Entries that change under the walk are skipped;
    /// `visit` returning an error ends the walk with it.
    pub fn walk_files<E>(
        &self,
        mut visit: impl FnMut(&Path, LcFile) -> Result<(), E>,
    ) -> Result<WalkStats, E> {
        let mut stats = WalkStats::default();
        let Ok(top) = self.dir("walking", Path::new("")) else {
            return Ok(stats);
        };
        let mut stack: Vec<(PathBuf, File)> = vec![(PathBuf::new(), top)];
        while let Some((rel, dir)) = stack.pop() {
            let names = match list(&dir) {
                Ok(n) => n,
                Err(_) => {
                    stats.skipped += 1;
                    continue;
                }
            };
            for name in names {
                let child = rel.join(&name);
                let Ok(st) = fstatat(dir.as_fd(), name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                else {
                    stats.skipped += 1;
                    continue;
                };
                if is_type(&st, SFlag::S_IFDIR) {
                    if st.st_dev != self.dev {
                        stats.other_mounts += 1;
                        continue;
                    }
                    match openat(
                        dir.as_fd(),
                        name.as_os_str(),
                        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    ) {
                        Ok(fd) => stack.push((child, File::from(fd))),
                        Err(_) => stats.skipped += 1,
                    }
                    continue;
                }
                if !is_type(&st, SFlag::S_IFREG) {
                    if is_type(&st, SFlag::S_IFLNK) {
                        stats.links += 1;
                    } else {
                        stats.special += 1;
                    }
                    continue;
                }
                let opened = openat(
                    dir.as_fd(),
                    name.as_os_str(),
                    OFlag::O_RDONLY
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_NONBLOCK
                        | OFlag::O_NOCTTY
                        | OFlag::O_CLOEXEC,
                    Mode::empty(),
                );
                match opened
                    .map_err(nix_io)
                    .and_then(|fd| regular(File::from(fd)))
                {
                    Ok(f) => {
                        stats.files += 1;
                        visit(&child, f)?;
                    }
                    Err(_) => stats.skipped += 1,
                }
            }
        }
        Ok(stats)
    }
}

/// What [`LcRoot::walk_files`] passed over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalkStats {
    pub files: u64,
    pub links: u64,
    pub special: u64,
    pub other_mounts: u64,
    /// Entries that vanished or changed type under the walk.
    pub skipped: u64,
}

fn is_type(st: &FileStat, t: SFlag) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == t
}

/// `file` if it is a regular file (checked on the descriptor, not the path).
fn regular(file: File) -> io::Result<LcFile> {
    let md = file.metadata()?;
    if !md.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    // Reads must block normally from here on.
    let flags = fcntl(&file, FcntlArg::F_GETFL).map_err(nix_io)?;
    let flags = OFlag::from_bits_truncate(flags) & !OFlag::O_NONBLOCK;
    fcntl(&file, FcntlArg::F_SETFL(flags)).map_err(nix_io)?;
    Ok(LcFile {
        len: md.len(),
        mode: md.mode(),
        file,
    })
}

/// The names in the directory `dir` (without `.` and `..`).
fn list(dir: &File) -> io::Result<Vec<OsString>> {
    let fd = dir.as_fd().try_clone_to_owned()?;
    let mut d = nix::dir::Dir::from_fd(fd).map_err(nix_io)?;
    let mut names = Vec::new();
    for e in d.iter() {
        let e = e.map_err(nix_io)?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(OsStr::from_bytes(n).to_owned());
        }
    }
    Ok(names)
}

/// Removes `name` in `dir`: a directory with everything under it, anything else itself.
fn remove_at(dir: &File, name: &OsStr) -> io::Result<()> {
    let st = match fstatat(dir.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(nix::Error::ENOENT) => return Ok(()),
        Err(e) => return Err(nix_io(e)),
    };
    if !is_type(&st, SFlag::S_IFDIR) {
        return match unlinkat(dir.as_fd(), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(nix::Error::ENOENT) => Ok(()),
            Err(e) => Err(nix_io(e)),
        };
    }
    let sub = openat(
        dir.as_fd(),
        name,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(nix_io)?;
    let sub = File::from(sub);
    for n in list(&sub)? {
        remove_at(&sub, &n)?;
    }
    match unlinkat(dir.as_fd(), name, UnlinkatFlags::RemoveDir) {
        Ok(()) | Err(nix::Error::ENOENT) => Ok(()),
        Err(e) => Err(nix_io(e)),
    }
}

/// `rel` without a leading `/` or `.` components (a path as the LC writes it, made relative to
/// its root). `..` stays: the resolver keeps it inside the root.
fn clean(rel: &Path) -> PathBuf {
    rel.components()
        .filter(|c| {
            !matches!(
                c,
                Component::RootDir | Component::CurDir | Component::Prefix(_)
            )
        })
        .collect()
}

fn tmp_name(name: &OsStr) -> OsString {
    let mut t = OsString::from(".");
    t.push(name);
    t.push(format!(
        ".patchover-{}-{}",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    t
}

#[cfg(test)]
mod tests;

/// Whether this kernel resolves paths inside a root (`openat2` with `RESOLVE_IN_ROOT`, what
/// [`LcRoot`] relies on before any fallback): `/..` opened under `root` must be `root` itself
/// (`patchover doctor`).
pub fn probe_openat2(root: &Path) -> io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let dir = File::open(root)?;
    let path = c"/..";
    // SAFETY: open_how is plain data; zero is its neutral value for every field.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC | libc::O_DIRECTORY) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT;
    // SAFETY: valid fd, NUL-terminated path and a how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd and nobody else owns it.
    let got = File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    let (a, b) = (dir.metadata()?, got.metadata()?);
    if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
        return Err(io::Error::other(
            "openat2 RESOLVE_IN_ROOT let `/..` leave the root",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod probe_tests {
    #[test]
    fn the_openat2_probe_fails_without_a_root() {
        let e = super::probe_openat2(std::path::Path::new("/nonexistent/root")).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }
}
