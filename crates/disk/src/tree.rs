//! Confined file operations: the copier touches an LC's disk (and its copy) only through directory
//! file descriptors, never through joined path strings.
//!
//! Why: an LC is untrusted, and root inside it changes its files *while* the live copy runs. A
//! path checked once (`symlink_metadata(src/a/b)` says "a directory") can be a link to a host
//! directory by the time the next call walks it, so a path-based copier can be led to read host
//! files into the standby or to write, remove or chmod host files through a link that it copied
//! into the standby itself. Here:
//!
//! - every directory is reached from the root's fd with `openat2(RESOLVE_BENEATH |
//!   RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)` (per-component `openat(O_DIRECTORY |
//!   O_NOFOLLOW)` on kernels without `openat2`): a link anywhere on the way is refused (`ELOOP`),
//!   never followed, not even to a place inside the root, because a disk is copied verbatim;
//! - the last component is used with `*at` calls that do not follow it (`fstatat`, `mkdirat`,
//!   `mknodat`, `symlinkat`, `readlinkat`, `linkat`, `unlinkat`, `O_CREAT|O_EXCL|O_NOFOLLOW`);
//! - a file is read or written only after an `O_PATH|O_NOFOLLOW` descriptor showed a regular file,
//!   and it is then reopened through that descriptor (`/proc/self/fd/N`), so a FIFO cannot block
//!   the copier, a device node is never opened (opening some has effects: a watchdog, a tape) and
//!   the inode read is the one checked;
//! - metadata goes to a descriptor: `fchown`/`fchmod`/`futimens`/`f*xattr` on an open file or
//!   directory, `fchownat(AT_EMPTY_PATH)`/`utimensat(AT_EMPTY_PATH)` and the `/proc/self/fd/N`
//!   xattr calls on an `O_PATH` descriptor of a link or special file (a link has no mode).
//!
//! [`Dir`] is the only way the engine, replay and `verify` reach a file of either tree.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn errno(n: i32) -> io::Error {
    io::Error::from_raw_os_error(n)
}

/// A name for the `*at` calls (no NUL inside: names come from `readdir` and paths).
pub fn name(n: &std::ffi::OsStr) -> io::Result<CString> {
    CString::new(n.as_bytes()).map_err(|_| errno(libc::EINVAL))
}

/// True when the error says a link (or a non-directory) stood where a directory was walked, or
/// a link where a file was opened: the LC changed the tree under the copier.
pub fn is_link_refusal(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ELOOP | libc::EXDEV))
}

/// The `stat` of one inode, as read by `fstatat(AT_SYMLINK_NOFOLLOW)` or `fstat`.
#[derive(Clone, Copy)]
pub struct Meta(libc::stat);

impl std::fmt::Debug for Meta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Meta {{ mode: {:o}, ino: {}, len: {} }}",
            self.mode(),
            self.ino(),
            self.len()
        )
    }
}

impl Meta {
    pub fn mode(&self) -> u32 {
        self.0.st_mode
    }
    /// `S_IFMT` bits: the kind of inode.
    pub fn kind(&self) -> u32 {
        self.0.st_mode & libc::S_IFMT
    }
    pub fn uid(&self) -> u32 {
        self.0.st_uid
    }
    pub fn gid(&self) -> u32 {
        self.0.st_gid
    }
    pub fn len(&self) -> u64 {
        self.0.st_size as u64
    }
    pub fn dev(&self) -> u64 {
        self.0.st_dev
    }
    pub fn ino(&self) -> u64 {
        self.0.st_ino
    }
    pub fn nlink(&self) -> u64 {
        self.0.st_nlink
    }
    pub fn rdev(&self) -> u64 {
        self.0.st_rdev
    }
    pub fn atime(&self) -> (i64, i64) {
        (self.0.st_atime, self.0.st_atime_nsec)
    }
    pub fn mtime(&self) -> (i64, i64) {
        (self.0.st_mtime, self.0.st_mtime_nsec)
    }
    pub fn is_dir(&self) -> bool {
        self.kind() == libc::S_IFDIR
    }
    pub fn is_file(&self) -> bool {
        self.kind() == libc::S_IFREG
    }
    pub fn is_symlink(&self) -> bool {
        self.kind() == libc::S_IFLNK
    }
    /// Device nodes, FIFOs and sockets: made with `mknod`.
    pub fn is_special(&self) -> bool {
        matches!(
            self.kind(),
            libc::S_IFBLK | libc::S_IFCHR | libc::S_IFIFO | libc::S_IFSOCK
        )
    }
}

fn fstat(fd: BorrowedFd<'_>) -> io::Result<Meta> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fd is open; st is valid for writing one stat.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded and filled st.
    Ok(Meta(unsafe { st.assume_init() }))
}

/// `fstat` of an open file.
pub fn meta_of(f: &impl AsFd) -> io::Result<Meta> {
    fstat(f.as_fd())
}

fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int, mode: u32) -> io::Result<OwnedFd> {
    loop {
        // SAFETY: dir is open and name NUL-terminated; the mode is read only with O_CREAT.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                flags | libc::O_CLOEXEC,
                mode as libc::c_uint,
            )
        };
        if fd >= 0 {
            // SAFETY: the fd was just opened and is ours.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// `/proc/self/fd/N`: reaches exactly the inode an (`O_PATH`) descriptor holds, whatever it is
/// named now; following it does not follow a link the descriptor is on.
fn proc_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

/// A directory of the source tree or of its copy, open as a file descriptor.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

const DIR_FLAGS: libc::c_int = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;

impl Dir {
    /// Opens a host path (a disk root the operator named, already checked): the only call here
    /// that takes a path string. A link as the last component is refused.
    pub fn open(path: &Path) -> io::Result<Dir> {
        let c = name(path.as_os_str())?;
        // SAFETY: AT_FDCWD is always a valid directory argument.
        let cwd = unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) };
        Ok(Dir {
            fd: openat(cwd, &c, DIR_FLAGS, 0)?,
        })
    }

    /// A second descriptor of the same directory.
    pub fn try_clone(&self) -> io::Result<Dir> {
        Ok(Dir {
            fd: self.fd.try_clone()?,
        })
    }

    /// Opens the directory `rel` below this one, following no link on the way (`ELOOP` when
    /// one is met, `ENOTDIR` when something else is). `rel` empty: this directory again.
    pub fn beneath(&self, rel: &Path) -> io::Result<Dir> {
        if rel.as_os_str().is_empty() {
            return self.try_clone();
        }
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(errno(libc::EXDEV));
        }
        let c = name(rel.as_os_str())?;
        // SAFETY: open_how is plain integers; all-zero is its "nothing asked" value.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        // Without O_NOFOLLOW, which would turn a trailing link into ENOTDIR:
        // RESOLVE_NO_SYMLINKS refuses it (ELOOP) like every other link on the way.
        how.flags = (libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64;
        how.resolve =
            libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
        for _ in 0..16 {
            // SAFETY: self.fd is open, c NUL-terminated, how a valid open_how of the given size.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    self.fd.as_raw_fd(),
                    c.as_ptr(),
                    &how as *const libc::open_how,
                    std::mem::size_of::<libc::open_how>(),
                )
            };
            if fd >= 0 {
                // SAFETY: the fd was just opened and is ours.
                return Ok(Dir {
                    fd: unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) },
                });
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // A rename raced the lookup; try again, then walk by hand.
                Some(libc::EAGAIN | libc::EINTR) => continue,
                Some(libc::ENOSYS | libc::EPERM) => break, // no openat2 (or a seccomp filter)
                _ => return Err(e),
            }
        }
        self.walk(rel)
    }

    /// [`Dir::beneath`] one component at a time (`openat(O_DIRECTORY|O_NOFOLLOW)`), for kernels
    /// without `openat2`.
    fn walk(&self, rel: &Path) -> io::Result<Dir> {
        let mut d = self.try_clone()?;
        for comp in rel.components() {
            let Component::Normal(c) = comp else {
                return Err(errno(libc::EXDEV));
            };
            d = d.sub(&name(c)?)?;
        }
        Ok(d)
    }

    /// Opens the subdirectory `name`; a link there is `ELOOP`.
    pub fn sub(&self, name: &CStr) -> io::Result<Dir> {
        match openat(self.as_fd(), name, DIR_FLAGS, 0) {
            Ok(fd) => Ok(Dir { fd }),
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                // O_DIRECTORY|O_NOFOLLOW on a link says ENOTDIR: tell a link apart.
                match self.stat(name) {
                    Ok(m) if m.is_symlink() => Err(errno(libc::ELOOP)),
                    _ => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// This directory's own `stat`.
    pub fn meta(&self) -> io::Result<Meta> {
        fstat(self.as_fd())
    }

    /// `fstatat(AT_SYMLINK_NOFOLLOW)` of the entry `name`.
    pub fn stat(&self, name: &CStr) -> io::Result<Meta> {
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fd open, name NUL-terminated, st valid for one stat.
        cvt(unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                name.as_ptr(),
                st.as_mut_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        // SAFETY: fstatat succeeded and filled st.
        Ok(Meta(unsafe { st.assume_init() }))
    }

    /// The entry names (without `.` and `..`).
    pub fn names(&self) -> io::Result<Vec<CString>> {
        // A fresh open file description, so the listing starts at the beginning.
        let fd = openat(self.as_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        // SAFETY: fdopendir takes over the fd (closed by closedir below).
        let dirp = unsafe { libc::fdopendir(fd.as_raw_fd()) };
        if dirp.is_null() {
            return Err(io::Error::last_os_error());
        }
        std::mem::forget(fd);
        let mut out = Vec::new();
        let r = loop {
            // SAFETY: errno is thread-local; cleared to tell the end from an error.
            unsafe { *libc::__errno_location() = 0 };
            // SAFETY: dirp is an open DIR stream.
            let ent = unsafe { libc::readdir64(dirp) };
            if ent.is_null() {
                let e = io::Error::last_os_error();
                break if e.raw_os_error().unwrap_or(0) == 0 {
                    Ok(())
                } else {
                    Err(e)
                };
            }
            // SAFETY: d_name is NUL-terminated within the entry the kernel returned.
            let n = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
            if n != c"." && n != c".." {
                out.push(n.to_owned());
            }
        };
        // SAFETY: dirp is open; closes the fd too.
        unsafe { libc::closedir(dirp) };
        r.map(|()| out)
    }

    /// An `O_PATH` descriptor of the entry `name` itself (a link is not followed): for metadata
    /// of any kind of inode without opening it.
    pub fn handle(&self, name: &CStr) -> io::Result<Handle> {
        Ok(Handle {
            fd: openat(self.as_fd(), name, libc::O_PATH | libc::O_NOFOLLOW, 0)?,
            opath: true,
        })
    }

    /// Opens the regular file `name` for reading (`write`: reading and writing). A link there is
    /// `ELOOP`, anything else that is not a regular file `ENOENT` (it is gone as a regular file);
    /// neither is ever opened.
    pub fn open_regular(&self, name: &CStr, write: bool) -> io::Result<File> {
        self.open_regular_meta(name, write).map(|(f, _)| f)
    }

    /// [`Dir::open_regular`], with the file's `stat` as it was checked.
    pub fn open_regular_meta(&self, name: &CStr, write: bool) -> io::Result<(File, Meta)> {
        let h = openat(self.as_fd(), name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        let m = fstat(h.as_fd())?;
        if m.is_symlink() {
            return Err(errno(libc::ELOOP));
        }
        if !m.is_file() {
            return Err(errno(libc::ENOENT));
        }
        let p = proc_path(h.as_fd());
        // SAFETY: AT_FDCWD is always a valid directory argument.
        let cwd = unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) };
        let fd = if write {
            openat(cwd, &p, libc::O_RDWR | libc::O_NONBLOCK, 0)?
        } else {
            // O_NOATIME keeps reads from touching the source's atime; it is refused for files
            // we do not own unless we are root, hence the retry without it.
            openat(
                cwd,
                &p,
                libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOATIME,
                0,
            )
            .or_else(|_| openat(cwd, &p, libc::O_RDONLY | libc::O_NONBLOCK, 0))?
        };
        Ok((File::from(fd), m))
    }

    /// Creates the regular file `name` (it must not exist; a link there is not followed).
    pub fn create_file(&self, name: &CStr, mode: u32) -> io::Result<File> {
        let fd = openat(
            self.as_fd(),
            name,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            mode,
        )?;
        Ok(File::from(fd))
    }

    pub fn mkdir(&self, name: &CStr, mode: u32) -> io::Result<()> {
        // SAFETY: fd open, name NUL-terminated.
        cvt(unsafe { libc::mkdirat(self.fd.as_raw_fd(), name.as_ptr(), mode) })?;
        Ok(())
    }

    /// Makes a device node, FIFO or socket.
    pub fn mknod(&self, name: &CStr, mode: u32, dev: u64) -> io::Result<()> {
        // SAFETY: fd open, name NUL-terminated.
        cvt(unsafe { libc::mknodat(self.fd.as_raw_fd(), name.as_ptr(), mode, dev) })?;
        Ok(())
    }

    /// Makes the link `name` with the target bytes `target`, unchanged.
    pub fn symlink(&self, target: &[u8], name: &CStr) -> io::Result<()> {
        let t = CString::new(target).map_err(|_| errno(libc::EINVAL))?;
        // SAFETY: both strings NUL-terminated, fd open.
        cvt(unsafe { libc::symlinkat(t.as_ptr(), self.fd.as_raw_fd(), name.as_ptr()) })?;
        Ok(())
    }

    /// The target of the link `name` (`EINVAL`: not a link).
    pub fn readlink(&self, name: &CStr) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: buf is valid for buf.len() bytes.
            let n = unsafe {
                libc::readlinkat(
                    self.fd.as_raw_fd(),
                    name.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if (n as usize) < buf.len() {
                buf.truncate(n as usize);
                return Ok(buf);
            }
            buf.resize(buf.len() * 4, 0);
        }
    }

    /// Makes `name` here a hard link to `from_name` in `from` (a link there is linked itself,
    /// not followed).
    pub fn link_from(&self, from: &Dir, from_name: &CStr, name: &CStr) -> io::Result<()> {
        // SAFETY: fds open, names NUL-terminated; flags 0: the old name is not followed.
        cvt(unsafe {
            libc::linkat(
                from.fd.as_raw_fd(),
                from_name.as_ptr(),
                self.fd.as_raw_fd(),
                name.as_ptr(),
                0,
            )
        })?;
        Ok(())
    }

    fn unlinkat(&self, name: &CStr, flags: libc::c_int) -> io::Result<()> {
        // SAFETY: fd open, name NUL-terminated.
        match cvt(unsafe { libc::unlinkat(self.fd.as_raw_fd(), name.as_ptr(), flags) }) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// Removes the entry `name` whatever it is, a directory with everything in it, each level
    /// through its own descriptor and no link followed. A missing entry is not an error.
    pub fn remove_all(&self, name: &CStr) -> io::Result<()> {
        let m = match self.stat(name) {
            Ok(m) => m,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(e) => return Err(e),
        };
        if !m.is_dir() {
            return self.unlinkat(name, 0);
        }
        let sub = match self.sub(name) {
            Ok(s) => s,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            // Replaced by something else since the stat: remove that.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
                return self.unlinkat(name, 0);
            }
            Err(e) => return Err(e),
        };
        for n in sub.names()? {
            sub.remove_all(&n)?;
        }
        drop(sub);
        self.unlinkat(name, libc::AT_REMOVEDIR)
    }

    /// Flushes the filesystem holding this directory.
    pub fn syncfs(&self) -> io::Result<()> {
        // SAFETY: syncfs on an open fd.
        cvt(unsafe { libc::syncfs(self.fd.as_raw_fd()) })?;
        Ok(())
    }
}

/// A descriptor to change one inode's metadata through: an open file or directory, or an
/// `O_PATH` descriptor (links, device nodes, FIFOs, sockets: never opened for I/O).
pub struct Handle {
    fd: OwnedFd,
    opath: bool,
}

/// A borrowed [`Handle`]: what [`crate::fsops::apply_meta`] works on.
#[derive(Clone, Copy)]
pub struct HandleRef<'a> {
    fd: BorrowedFd<'a>,
    opath: bool,
}

impl Handle {
    pub fn as_ref(&self) -> HandleRef<'_> {
        HandleRef {
            fd: self.fd.as_fd(),
            opath: self.opath,
        }
    }
}

impl<'a> HandleRef<'a> {
    /// An open regular file or directory.
    pub fn open(f: &'a impl AsFd) -> Self {
        HandleRef {
            fd: f.as_fd(),
            opath: false,
        }
    }

    pub fn meta(&self) -> io::Result<Meta> {
        fstat(self.fd)
    }

    pub fn chown(&self, uid: u32, gid: u32) -> io::Result<()> {
        // SAFETY: fd open; the empty path with AT_EMPTY_PATH names the fd's own inode.
        cvt(unsafe {
            libc::fchownat(
                self.fd.as_raw_fd(),
                c"".as_ptr(),
                uid,
                gid,
                libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        Ok(())
    }

    /// Sets the permission bits (not for links: they have none).
    pub fn chmod(&self, mode: u32) -> io::Result<()> {
        if self.opath {
            let p = proc_path(self.fd);
            // SAFETY: p is NUL-terminated; it reaches exactly our descriptor's inode.
            cvt(unsafe { libc::chmod(p.as_ptr(), mode) })?;
        } else {
            // SAFETY: fd open.
            cvt(unsafe { libc::fchmod(self.fd.as_raw_fd(), mode) })?;
        }
        Ok(())
    }

    pub fn set_times(&self, atime: (i64, i64), mtime: (i64, i64)) -> io::Result<()> {
        let ts = [
            libc::timespec {
                tv_sec: atime.0,
                tv_nsec: atime.1,
            },
            libc::timespec {
                tv_sec: mtime.0,
                tv_nsec: mtime.1,
            },
        ];
        // SAFETY: fd open, ts has two entries; AT_EMPTY_PATH names the fd's own inode (also for
        // an O_PATH descriptor of a link).
        cvt(unsafe {
            libc::utimensat(
                self.fd.as_raw_fd(),
                c"".as_ptr(),
                ts.as_ptr(),
                libc::AT_EMPTY_PATH,
            )
        })?;
        Ok(())
    }

    /// The xattr names.
    pub fn list_xattrs(&self) -> io::Result<Vec<Vec<u8>>> {
        let p = self.opath.then(|| proc_path(self.fd));
        let mut buf = vec![0u8; 1024];
        loop {
            // SAFETY: buf valid for its length; p (if any) NUL-terminated.
            let n = unsafe {
                match &p {
                    Some(p) => libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()),
                    None => {
                        libc::flistxattr(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
                    }
                }
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::ERANGE) => {
                        buf.resize(buf.len() * 4, 0);
                        continue;
                    }
                    Some(libc::ENOTSUP) => return Ok(Vec::new()),
                    _ => return Err(e),
                }
            }
            return Ok(buf[..n as usize]
                .split(|b| *b == 0)
                .filter(|s| !s.is_empty())
                .map(|s| s.to_vec())
                .collect());
        }
    }

    /// One xattr value.
    pub fn get_xattr(&self, name: &[u8]) -> io::Result<Vec<u8>> {
        let n = CString::new(name).map_err(|_| errno(libc::EINVAL))?;
        let p = self.opath.then(|| proc_path(self.fd));
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: buf valid for its length; strings NUL-terminated.
            let r = unsafe {
                match &p {
                    Some(p) => {
                        libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
                    }
                    None => libc::fgetxattr(
                        self.fd.as_raw_fd(),
                        n.as_ptr(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                    ),
                }
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ERANGE) {
                    buf.resize(buf.len() * 4, 0);
                    continue;
                }
                return Err(e);
            }
            buf.truncate(r as usize);
            return Ok(buf);
        }
    }

    pub fn set_xattr(&self, name: &[u8], val: &[u8]) -> io::Result<()> {
        let n = CString::new(name).map_err(|_| errno(libc::EINVAL))?;
        // SAFETY: pointers valid for the given lengths; strings NUL-terminated.
        cvt(unsafe {
            if self.opath {
                let p = proc_path(self.fd);
                libc::setxattr(p.as_ptr(), n.as_ptr(), val.as_ptr().cast(), val.len(), 0)
            } else {
                libc::fsetxattr(
                    self.fd.as_raw_fd(),
                    n.as_ptr(),
                    val.as_ptr().cast(),
                    val.len(),
                    0,
                )
            }
        })?;
        Ok(())
    }

    pub fn remove_xattr(&self, name: &[u8]) -> io::Result<()> {
        let n = CString::new(name).map_err(|_| errno(libc::EINVAL))?;
        // SAFETY: strings NUL-terminated.
        let r = cvt(unsafe {
            if self.opath {
                let p = proc_path(self.fd);
                libc::removexattr(p.as_ptr(), n.as_ptr())
            } else {
                libc::fremovexattr(self.fd.as_raw_fd(), n.as_ptr())
            }
        });
        match r {
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(()),
            r => r.map(|_| ()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    #[test]
    fn beneath_refuses_links_anywhere_on_the_way() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("a/b")).unwrap();
        fs::create_dir_all(outside.path().join("b")).unwrap();
        symlink(outside.path(), d.path().join("l")).unwrap();
        symlink("a", d.path().join("inside")).unwrap();
        let root = Dir::open(d.path()).unwrap();
        assert!(root.beneath(Path::new("a/b")).is_ok());
        assert!(root.walk(Path::new("a/b")).is_ok());
        for rel in ["l", "l/b", "inside/b", "a/b/../../l"] {
            let e = root.beneath(Path::new(rel)).unwrap_err();
            assert!(is_link_refusal(&e), "{rel}: {e}");
            let e = root.walk(Path::new(rel)).unwrap_err();
            assert!(is_link_refusal(&e), "walk {rel}: {e}");
        }
        let e = root.sub(c"l").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
        let e = root.beneath(Path::new("a/../..")).unwrap_err();
        assert!(is_link_refusal(&e), "{e}");
    }

    #[test]
    fn regular_files_only_and_links_are_not_opened() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("f"), b"x").unwrap();
        symlink("f", d.path().join("l")).unwrap();
        let c = CString::new(d.path().join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: valid path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let root = Dir::open(d.path()).unwrap();
        assert!(root.open_regular(c"f", false).is_ok());
        let e = root.open_regular(c"l", false).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
        let e = root.open_regular(c"fifo", false).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        // Creating over a link fails instead of writing where it points.
        assert!(root.create_file(c"l", 0o600).is_err());
        assert_eq!(fs::read(d.path().join("f")).unwrap(), b"x");
    }

    #[test]
    fn metadata_of_a_link_changes_the_link_only() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("f"), b"x").unwrap();
        symlink("f", d.path().join("l")).unwrap();
        let root = Dir::open(d.path()).unwrap();
        let before = root.stat(c"f").unwrap();
        let h = root.handle(c"l").unwrap();
        h.as_ref().chown(7, 8).unwrap();
        h.as_ref().set_times((1, 2), (3, 4)).unwrap();
        h.as_ref().set_xattr(b"trusted.t", b"v").unwrap();
        assert_eq!(h.as_ref().get_xattr(b"trusted.t").unwrap(), b"v");
        assert_eq!(
            h.as_ref().list_xattrs().unwrap(),
            vec![b"trusted.t".to_vec()]
        );
        let l = root.stat(c"l").unwrap();
        assert_eq!((l.uid(), l.gid(), l.mtime()), (7, 8, (3, 4)));
        let after = root.stat(c"f").unwrap();
        assert_eq!((before.uid(), before.mtime()), (after.uid(), after.mtime()));
        assert!(
            root.handle(c"f")
                .unwrap()
                .as_ref()
                .list_xattrs()
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn remove_all_stays_inside() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("keep"), b"k").unwrap();
        fs::create_dir_all(d.path().join("t/u")).unwrap();
        fs::write(d.path().join("t/u/f"), b"x").unwrap();
        symlink(outside.path(), d.path().join("t/l")).unwrap();
        let root = Dir::open(d.path()).unwrap();
        root.remove_all(c"t").unwrap();
        root.remove_all(c"missing").unwrap();
        assert!(!d.path().join("t").exists());
        assert_eq!(fs::read(outside.path().join("keep")).unwrap(), b"k");
        assert_eq!(root.names().unwrap(), Vec::<CString>::new());
    }
}
