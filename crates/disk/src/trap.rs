//! The write trap: fanotify on the source's filesystem, events named by directory handle + name.
//!
//! Why a filesystem mark and not a mount mark: only filesystem and inode marks report directory
//! entry events (create, delete, rename), and those are writes too. A filesystem mark sees every
//! write on that filesystem, so events are resolved to paths and filtered by the source prefix;
//! the copy's own writes (the destination is outside the source) are dropped the same way. Marking
//! needs no change to the source (no bind mount is made), so nothing is left behind if patchover
//! dies.
//!
//! Each event carries the parent directory's file handle and the entry's name
//! (`FAN_REPORT_DFID_NAME`), and the object's own handle (`FAN_REPORT_FID`). The handle is opened with `open_by_handle_at` and its path read from
//! `/proc/self/fd`, which gives the directory's *current* path: that is what replay wants, as
//! replay copies current state. A handle that no longer opens belongs to a directory that was
//! deleted; its deletion is an event in its own parent. The object's handle then still names a
//! file that lives on under another name (a hard link), so a write through a since-removed name
//! is not lost.
//! The queue is unlimited (`FAN_UNLIMITED_QUEUE`), and an overflow still turns into a full rescan.
//!
//! fanotify does not tell byte ranges of a write; replay finds them by block hashes.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::fsops::cstr;

/// What happened to an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Modify,
    Attrib,
    Create,
    Delete,
    MovedFrom,
    MovedTo,
    /// The queue overflowed: anything may have changed.
    Overflow,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Modify => "modify",
            Op::Attrib => "attrib",
            Op::Create => "create",
            Op::Delete => "delete",
            Op::MovedFrom => "moved_from",
            Op::MovedTo => "moved_to",
            Op::Overflow => "overflow",
        }
    }
}

/// One trapped write, relative to the source root (empty: the root itself).
#[derive(Debug, Clone)]
pub struct Event {
    pub op: Op,
    pub rel: PathBuf,
    /// Set instead of a path when only the inode (dev, ino) is known: the write went through a
    /// name that is gone, and the inode lives on under names the caller knows.
    pub inode: Option<(u64, u64)>,
}

/// An armed fanotify group on the source's filesystem.
pub struct Trap {
    fan: OwnedFd,
    mount_fd: File,
    root: PathBuf,
    root_is_file: bool,
    buf: Vec<u8>,
}

const MASK: u64 = libc::FAN_MODIFY
    | libc::FAN_ATTRIB
    | libc::FAN_CREATE
    | libc::FAN_DELETE
    | libc::FAN_MOVED_FROM
    | libc::FAN_MOVED_TO
    | libc::FAN_ONDIR;

impl Trap {
    /// Arms the trap on the filesystem holding `root` (canonical path). Every write made after this
    /// returns is seen by [`Trap::drain`].
    pub fn start(root: &Path, root_is_file: bool) -> io::Result<Trap> {
        // SAFETY: plain syscall with flag arguments.
        let fd = unsafe {
            libc::fanotify_init(
                libc::FAN_CLASS_NOTIF
                    | libc::FAN_CLOEXEC
                    | libc::FAN_NONBLOCK
                    | libc::FAN_REPORT_DFID_NAME
                    | libc::FAN_REPORT_FID
                    | libc::FAN_UNLIMITED_QUEUE,
                (libc::O_RDONLY | libc::O_LARGEFILE) as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by fanotify_init and is owned by nobody else.
        let fan = unsafe { OwnedFd::from_raw_fd(fd) };
        let c = cstr(root)?;
        // SAFETY: c is a valid path; fan is an open fanotify fd.
        let r = unsafe {
            libc::fanotify_mark(
                fan.as_raw_fd(),
                libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM,
                MASK,
                libc::AT_FDCWD,
                c.as_ptr(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let mount_fd = File::open(if root_is_file {
            root.parent().unwrap_or(Path::new("/"))
        } else {
            root
        })?;
        Ok(Trap {
            fan,
            mount_fd,
            root: root.to_path_buf(),
            root_is_file,
            buf: vec![0u8; 256 * 1024],
        })
    }

    /// Reads every queued event without blocking, resolved and filtered to the source.
    pub fn drain(&mut self) -> io::Result<Vec<Event>> {
        let mut out = Vec::new();
        let mut cache: HashMap<Vec<u8>, Option<PathBuf>> = HashMap::new();
        loop {
            // SAFETY: buf is valid for buf.len() bytes.
            let n = unsafe {
                libc::read(
                    self.fan.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    Some(libc::EINTR) => continue,
                    _ => return Err(e),
                }
            }
            if n == 0 {
                break;
            }
            let n = n as usize;
            let mut off = 0usize;
            while off + std::mem::size_of::<libc::fanotify_event_metadata>() <= n {
                // SAFETY: the kernel wrote a whole metadata struct at off (checked above);
                // read_unaligned copes with any alignment.
                let md: libc::fanotify_event_metadata =
                    unsafe { std::ptr::read_unaligned(self.buf[off..].as_ptr().cast()) };
                let len = md.event_len as usize;
                if len < md.metadata_len as usize || off + len > n {
                    break;
                }
                let ev = &self.buf[off + md.metadata_len as usize..off + len];
                if md.fd >= 0 {
                    // SAFETY: the kernel handed us this fd in the event; we close it once.
                    drop(unsafe { OwnedFd::from_raw_fd(md.fd) });
                }
                if md.mask & libc::FAN_Q_OVERFLOW != 0 {
                    out.push(Event {
                        op: Op::Overflow,
                        rel: PathBuf::new(),
                        inode: None,
                    });
                } else {
                    match self.resolve(ev, &mut cache) {
                        Some(Found::Path(full)) => {
                            if let Some(rel) = self.relative(&full) {
                                for op in ops(md.mask) {
                                    out.push(Event {
                                        op,
                                        rel: rel.clone(),
                                        inode: None,
                                    });
                                }
                            }
                        }
                        Some(Found::Inode(key)) => {
                            for op in ops(md.mask).filter(|o| matches!(o, Op::Modify | Op::Attrib))
                            {
                                out.push(Event {
                                    op,
                                    rel: PathBuf::new(),
                                    inode: Some(key),
                                });
                            }
                        }
                        None => {}
                    }
                }
                off += len;
            }
        }
        Ok(out)
    }

    fn relative(&self, full: &Path) -> Option<PathBuf> {
        if self.root_is_file {
            return (full == self.root).then(PathBuf::new);
        }
        full.strip_prefix(&self.root).ok().map(Path::to_path_buf)
    }

    /// Finds the path an event names: the directory handle + entry name when the directory
    /// still opens, else the object's own handle (a write through a hard link whose directory was
    /// removed since still changed the inode, which lives on under its other names).
    fn resolve(
        &self,
        mut rec: &[u8],
        cache: &mut HashMap<Vec<u8>, Option<PathBuf>>,
    ) -> Option<Found> {
        const HDR: usize = 4;
        const FSID: usize = 8;
        let mut object: Option<&[u8]> = None;
        let mut named: Option<(&[u8], &[u8])> = None;
        while rec.len() >= HDR {
            let kind = rec[0];
            let rlen = u16::from_ne_bytes([rec[2], rec[3]]) as usize;
            if rlen < HDR || rlen > rec.len() {
                break;
            }
            let body = &rec[HDR..rlen];
            rec = &rec[rlen..];
            if body.len() < FSID + 8 {
                continue;
            }
            let fh = &body[FSID..];
            let hbytes = u32::from_ne_bytes([fh[0], fh[1], fh[2], fh[3]]) as usize;
            if fh.len() < 8 + hbytes {
                continue;
            }
            let handle = &fh[..8 + hbytes];
            match kind {
                libc::FAN_EVENT_INFO_TYPE_DFID_NAME | libc::FAN_EVENT_INFO_TYPE_DFID => {
                    let name = fh[8 + hbytes..].split(|b| *b == 0).next().unwrap_or(&[]);
                    named = Some((handle, name));
                }
                libc::FAN_EVENT_INFO_TYPE_FID => object = Some(handle),
                _ => {}
            }
        }
        if let Some((handle, name)) = named {
            let dir = cache
                .entry(handle.to_vec())
                .or_insert_with(|| self.open_handle(handle))
                .clone();
            if let Some(dir) = dir {
                if name.is_empty() || name == b"." {
                    return Some(Found::Path(dir));
                }
                return Some(Found::Path(dir.join(std::ffi::OsStr::from_bytes(name))));
            }
        }
        let fd = self.open_raw(object?)?;
        if let Some(p) = path_of(&fd) {
            return Some(Found::Path(p));
        }
        let md = File::from(fd).metadata().ok()?;
        Some(Found::Inode((md.dev(), md.ino())))
    }

    fn open_handle(&self, handle: &[u8]) -> Option<PathBuf> {
        path_of(&self.open_raw(handle)?)
    }

    fn open_raw(&self, handle: &[u8]) -> Option<OwnedFd> {
        // A file_handle is 8 bytes of header plus the opaque bytes; keep it 8-aligned.
        let mut storage = vec![0u64; handle.len().div_ceil(8) + 1];
        // SAFETY: storage has at least handle.len() bytes; u8 copies need no alignment.
        unsafe {
            std::ptr::copy_nonoverlapping(
                handle.as_ptr(),
                storage.as_mut_ptr().cast::<u8>(),
                handle.len(),
            );
        }
        // SAFETY: storage holds a complete, aligned file_handle as the kernel reported it.
        let fd = unsafe {
            libc::open_by_handle_at(
                self.mount_fd.as_raw_fd(),
                storage.as_mut_ptr().cast(),
                libc::O_PATH | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return None;
        }
        // SAFETY: fd was just opened and is ours.
        Some(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

enum Found {
    Path(PathBuf),
    Inode((u64, u64)),
}

/// The current path of an open file, unless its name was removed.
fn path_of(fd: &OwnedFd) -> Option<PathBuf> {
    let p = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    if p.as_os_str().as_bytes().ends_with(b" (deleted)") {
        return None;
    }
    Some(p)
}

fn ops(mask: u64) -> impl Iterator<Item = Op> {
    [
        (libc::FAN_MOVED_FROM, Op::MovedFrom),
        (libc::FAN_DELETE, Op::Delete),
        (libc::FAN_CREATE, Op::Create),
        (libc::FAN_MOVED_TO, Op::MovedTo),
        (libc::FAN_MODIFY, Op::Modify),
        (libc::FAN_ATTRIB, Op::Attrib),
    ]
    .into_iter()
    .filter(move |(bit, _)| mask & bit != 0)
    .map(|(_, op)| op)
}
