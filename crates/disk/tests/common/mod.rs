//! Helpers shared by the disk integration tests: scratch filesystems on loop devices, a tree
//! builder, and a comparator written independently of the crate's own `verify`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A filesystem on a loop device, mounted on a temp dir; unmounted and removed on drop.
pub struct LoopFs {
    pub mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopFs {
    /// `fstype` is `ext4`, `xfs` or `tmpfs`; `mib` the size.
    pub fn new(fstype: &str, mib: u64) -> LoopFs {
        let dir = tempfile::Builder::new()
            .prefix("pod-fs-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        if fstype == "tmpfs" {
            run(Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
                .arg(&mnt));
        } else {
            let img = dir.path().join("img");
            let f = fs::File::create(&img).unwrap();
            f.set_len(mib << 20).unwrap();
            drop(f);
            match fstype {
                "xfs" => run(Command::new("mkfs.xfs")
                    .args(["-q", "-f", "-m", "reflink=1"])
                    .arg(&img)),
                _ => run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img)),
            }
            run(Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&mnt));
        }
        LoopFs { mnt, _dir: dir }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

pub fn run(c: &mut Command) {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn setxattr(p: &Path, name: &str, val: &[u8]) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: valid pointers and lengths.
    let r = unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), val.as_ptr().cast(), val.len(), 0) };
    assert_eq!(
        r,
        0,
        "setxattr {name} on {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

pub fn mknod(p: &Path, mode: u32, dev: u64) {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid path.
    let r = unsafe { libc::mknod(c.as_ptr(), mode, dev) };
    assert_eq!(r, 0, "mknod {}", p.display());
}

pub fn lchown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
}

/// A tree with every kind of entry a rootfs has.
pub fn rich_tree(root: &Path) {
    fs::create_dir_all(root.join("etc/sub dir")).unwrap();
    fs::create_dir_all(root.join("dev")).unwrap();
    fs::create_dir_all(root.join("ro")).unwrap();
    fs::write(root.join("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n").unwrap();
    fs::write(root.join("etc/sub dir/name with\nnewline"), b"odd").unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    let big: Vec<u8> = (0..3 * 1024 * 1024 + 123)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    fs::write(root.join("big.bin"), &big).unwrap();
    // Sparse: 256 MiB apparent, two small data islands.
    let f = fs::File::create(root.join("sparse.img")).unwrap();
    f.set_len(256 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"head", 0).unwrap();
    f.write_all_at(&[9u8; 8192], 100 << 20).unwrap();
    drop(f);
    // Hard links: three names for one inode, one in another directory.
    fs::write(root.join("etc/linked"), b"shared inode").unwrap();
    fs::hard_link(root.join("etc/linked"), root.join("etc/linked2")).unwrap();
    fs::hard_link(root.join("etc/linked"), root.join("ro/linked3")).unwrap();
    std::os::unix::fs::symlink("../etc/passwd", root.join("dev/pw")).unwrap();
    std::os::unix::fs::symlink("/nowhere/dangling", root.join("dangling")).unwrap();
    mknod(
        &root.join("dev/null"),
        libc::S_IFCHR | 0o666,
        libc::makedev(1, 3),
    );
    mknod(&root.join("dev/fifo"), libc::S_IFIFO | 0o640, 0);
    fs::write(root.join("suid"), b"#!/bin/sh\n").unwrap();
    lchown(&root.join("suid"), 1234, 5678);
    fs::set_permissions(root.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    lchown(&root.join("dev/pw"), 42, 43);
    setxattr(&root.join("etc/passwd"), "user.tag", b"hello");
    setxattr(&root.join("big.bin"), "trusted.big", &[1, 2, 3]);
    fs::set_permissions(root.join("ro"), fs::Permissions::from_mode(0o555)).unwrap();
    // An old timestamp on a file.
    let c = CString::new(root.join("etc/passwd").as_os_str().as_bytes()).unwrap();
    let ts = [libc::timespec {
        tv_sec: 1_000_000_000,
        tv_nsec: 5,
    }; 2];
    // SAFETY: valid path and two timespecs.
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), 0) },
        0
    );
}

/// Compares two trees; returns the differences found (empty: identical). Checks kind, mode,
/// owner, size, mtime, content, symlink target, rdev, xattrs and hard-link grouping.
pub fn diff_trees(a: &Path, b: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut ino_map: HashMap<u64, u64> = HashMap::new();
    walk(a, b, Path::new(""), &mut out, &mut ino_map);
    out
}

fn list(p: &Path, top: bool) -> Vec<std::ffi::OsString> {
    let mut v: Vec<_> = fs::read_dir(p)
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    if top {
        v.retain(|n| n != ".patchover-incomplete");
    }
    v.sort();
    v
}

fn xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: buf valid for its length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n <= 0 {
        return Vec::new();
    }
    let mut v: Vec<_> = buf[..n as usize]
        .split(|x| *x == 0)
        .filter(|s| !s.is_empty())
        .map(|name| {
            let cn = CString::new(name).unwrap();
            let mut val = vec![0u8; 65536];
            // SAFETY: val valid for its length.
            let m = unsafe {
                libc::lgetxattr(c.as_ptr(), cn.as_ptr(), val.as_mut_ptr().cast(), val.len())
            };
            val.truncate(m.max(0) as usize);
            (name.to_vec(), val)
        })
        .collect();
    v.sort();
    v
}

fn content(p: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    fs::File::open(p).unwrap().read_to_end(&mut v).unwrap();
    v
}

fn walk(a: &Path, b: &Path, rel: &Path, out: &mut Vec<String>, inos: &mut HashMap<u64, u64>) {
    let (pa, pb) = (a.join(rel), b.join(rel));
    let (ma, mb) = match (fs::symlink_metadata(&pa), fs::symlink_metadata(&pb)) {
        (Ok(x), Ok(y)) => (x, y),
        (x, y) => {
            out.push(format!(
                "{}: exists {} / {}",
                rel.display(),
                x.is_ok(),
                y.is_ok()
            ));
            return;
        }
    };
    let r = rel.display();
    if ma.mode() != mb.mode() {
        out.push(format!("{r}: mode {:o} vs {:o}", ma.mode(), mb.mode()));
    }
    if (ma.uid(), ma.gid()) != (mb.uid(), mb.gid()) {
        out.push(format!("{r}: owner"));
    }
    if (ma.mtime(), ma.mtime_nsec()) != (mb.mtime(), mb.mtime_nsec()) {
        out.push(format!(
            "{r}: mtime {}.{} vs {}.{}",
            ma.mtime(),
            ma.mtime_nsec(),
            mb.mtime(),
            mb.mtime_nsec()
        ));
    }
    if xattrs(&pa) != xattrs(&pb) {
        out.push(format!("{r}: xattrs"));
    }
    if ma.is_dir() {
        let (la, lb) = (
            list(&pa, rel.as_os_str().is_empty()),
            list(&pb, rel.as_os_str().is_empty()),
        );
        if la != lb {
            out.push(format!("{r}: entries {la:?} vs {lb:?}"));
            return;
        }
        for n in la {
            walk(a, b, &rel.join(n), out, inos);
        }
        return;
    }
    if ma.nlink() != mb.nlink() {
        out.push(format!("{r}: nlink {} vs {}", ma.nlink(), mb.nlink()));
    }
    let m = *inos.entry(ma.ino()).or_insert(mb.ino());
    if m != mb.ino() {
        out.push(format!("{r}: hard link grouping"));
    }
    if ma.rdev() != mb.rdev() {
        out.push(format!("{r}: rdev"));
    }
    if ma.file_type().is_symlink() {
        if fs::read_link(&pa).unwrap() != fs::read_link(&pb).unwrap() {
            out.push(format!("{r}: symlink target"));
        }
    } else if ma.is_file() {
        if ma.len() != mb.len() {
            out.push(format!("{r}: size {} vs {}", ma.len(), mb.len()));
        } else if content(&pa) != content(&pb) {
            out.push(format!("{r}: content"));
        }
    }
}

/// Hash of a whole tree's content and metadata, to show a source was left untouched.
pub fn fingerprint(root: &Path) -> Vec<String> {
    let mut v = Vec::new();
    fn rec(p: &Path, rel: &Path, v: &mut Vec<String>) {
        let md = fs::symlink_metadata(p.join(rel)).unwrap();
        let data = if md.is_file() {
            xxh(&content(&p.join(rel)))
        } else {
            0
        };
        v.push(format!(
            "{} {:o} {} {} {}",
            rel.display(),
            md.mode(),
            md.len(),
            md.mtime_nsec(),
            data
        ));
        if md.is_dir() {
            for n in list(&p.join(rel), false) {
                rec(p, &rel.join(n), v);
            }
        }
    }
    rec(root, Path::new(""), &mut v);
    v
}

fn xxh(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, x| {
        (h ^ *x as u64).wrapping_mul(0x100000001b3)
    })
}

/// Freezes a test's writer thread: the writer runs each operation through [`Gate::run`], so
/// `freeze` returns only between operations. [`Gate::hold`] keeps the writer frozen through
/// `thaw` so the test can compare the trees at the cut.
#[derive(Default)]
pub struct Gate {
    state: std::sync::Mutex<(bool, bool)>, // (paused, hold)
    cv: std::sync::Condvar,
}

/// The [`patchover_core::Quiesce`] side of a [`Gate`].
#[derive(Clone)]
pub struct GateQ(pub std::sync::Arc<Gate>);

impl patchover_core::Quiesce for GateQ {
    fn freeze(&mut self) -> std::io::Result<()> {
        self.0.state.lock().unwrap().0 = true;
        Ok(())
    }
    fn thaw(&mut self) -> std::io::Result<()> {
        let mut s = self.0.state.lock().unwrap();
        if !s.1 {
            s.0 = false;
            self.0.cv.notify_all();
        }
        Ok(())
    }
}

impl Gate {
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        let mut s = self.state.lock().unwrap();
        while s.0 {
            s = self.cv.wait(s).unwrap();
        }
        let r = f();
        drop(s);
        r
    }
    /// The next freeze lasts through its thaw.
    pub fn hold(&self) {
        self.state.lock().unwrap().1 = true;
    }
    pub fn release(&self) {
        *self.state.lock().unwrap() = (false, false);
        self.cv.notify_all();
    }
}
