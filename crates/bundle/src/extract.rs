//! Writing a bundle's entries below the extraction directory without following any link.
//!
//! The reader refuses every entry whose path goes through a link of the archive and every link
//! that leaves `payload/` (`links`), but extraction does not rely on that: it works on a
//! descriptor of the extraction directory, opens each directory one component at a time with
//! `O_DIRECTORY|O_NOFOLLOW`, and makes files (`O_CREAT|O_EXCL|O_NOFOLLOW`) and links
//! (`symlinkat`) in their parent's descriptor. A link in the tree — one the archive made, or
//! one planted there by anyone else while the engine works — makes the write fail; it never
//! leads it out of the directory (the guarantee `openat2(RESOLVE_NO_SYMLINKS)` gives, on any
//! kernel).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::archive::ArchiveError;

/// The extraction directory, held open.
pub(crate) struct DestDir {
    fd: OwnedFd,
    path: PathBuf,
}

fn c_name(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte"))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `openat(dir, name, flags, mode)` into an owned descriptor.
fn open_at(dir: BorrowedFd<'_>, name: &str, flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
    let name = c_name(name)?;
    // SAFETY: `dir` is a live descriptor and `name` a NUL-terminated string for the call.
    let fd = check(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    })?;
    // SAFETY: `fd` was just returned by openat and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the directory `name` in `dir`, never through a link.
fn open_dir_at(dir: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
    open_at(
        dir,
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )
}

/// Creates the directory `name` in `dir` (mode 0755), an existing one being fine, and opens it.
fn make_dir_at(dir: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
    let c = c_name(name)?;
    // SAFETY: `dir` is a live descriptor and `c` a NUL-terminated string for the call.
    match check(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), 0o755) }) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    open_dir_at(dir, name)
}

/// Splits `payload/a/b` into `["payload", "a"]` and `"b"`.
fn split(rel: &str) -> (Vec<&str>, &str) {
    let mut parts: Vec<&str> = rel.split('/').collect();
    let last = parts.pop().unwrap_or_default();
    (parts, last)
}

impl DestDir {
    /// Opens the extraction directory `path` (which the caller just created).
    pub(crate) fn open(path: &Path) -> Result<DestDir, ArchiveError> {
        let fd = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(path)
            .map_err(|source| ArchiveError::Write {
                path: path.to_owned(),
                source,
            })?
            .into();
        Ok(DestDir {
            fd,
            path: path.to_owned(),
        })
    }

    pub(crate) fn write_err(&self, rel: &str) -> impl FnOnce(io::Error) -> ArchiveError + use<> {
        let path = self.path.join(rel);
        move |source| ArchiveError::Write { path, source }
    }

    /// Creates the directories `dirs` one below the other and returns the last one opened
    /// (the extraction directory itself for none).
    fn dirs(&self, dirs: &[&str]) -> io::Result<OwnedFd> {
        let mut cur = self.fd.try_clone()?;
        for d in dirs {
            cur = make_dir_at(cur.as_fd(), d)?;
        }
        Ok(cur)
    }

    /// Creates the directory `rel` (a normalized archive path) and its missing parents.
    pub(crate) fn mkdir(&self, rel: &str) -> Result<(), ArchiveError> {
        let (parents, last) = split(rel);
        self.dirs(&parents)
            .and_then(|p| make_dir_at(p.as_fd(), last))
            .map(drop)
            .map_err(self.write_err(rel))
    }

    /// Creates the new file `rel` with `mode` (parents created) and returns it open for writing.
    pub(crate) fn create_file(&self, rel: &str, mode: u32) -> Result<File, ArchiveError> {
        let (parents, last) = split(rel);
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
        self.dirs(&parents)
            .and_then(|p| open_at(p.as_fd(), last, flags, mode))
            .map(File::from)
            .map_err(self.write_err(rel))
    }

    /// Creates the link `rel` to `target` (parents created).
    pub(crate) fn symlink(&self, rel: &str, target: &str) -> Result<(), ArchiveError> {
        let (parents, last) = split(rel);
        let made = self.dirs(&parents).and_then(|p| {
            let (t, n) = (c_name(target)?, c_name(last)?);
            // SAFETY: `p` is a live descriptor; `t` and `n` are NUL-terminated for the call.
            check(unsafe { libc::symlinkat(t.as_ptr(), p.as_raw_fd(), n.as_ptr()) }).map(drop)
        });
        made.map_err(self.write_err(rel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A link planted in the extraction directory (by anyone, at any time) is never written
    /// through: not as a directory on the way, not as the file's own name.
    #[test]
    fn a_link_in_the_destination_is_never_followed() {
        let t = tempfile::tempdir().unwrap();
        let (dest, outside) = (t.path().join("dest"), t.path().join("outside"));
        std::fs::create_dir_all(dest.join("payload")).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, dest.join("payload/lib")).unwrap();
        std::os::unix::fs::symlink(outside.join("f"), dest.join("payload/f")).unwrap();
        let d = DestDir::open(&dest).unwrap();
        assert!(d.create_file("payload/lib/x", 0o644).is_err());
        assert!(d.mkdir("payload/lib/sub").is_err());
        assert!(d.symlink("payload/lib/l", "x").is_err());
        assert!(d.create_file("payload/f", 0o644).is_err());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);

        // What is not a link is made as asked.
        d.create_file("payload/a/b/c", 0o600)
            .unwrap()
            .write_all(b"x")
            .unwrap();
        d.symlink("payload/a/l", "b/c").unwrap();
        assert_eq!(std::fs::read(dest.join("payload/a/l")).unwrap(), b"x");
    }
}
