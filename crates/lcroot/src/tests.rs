//! Each test builds an LC root and, beside it, a host tree with canary files that the root's
//! links point at; every operation must leave the host tree as it was.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use super::*;

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    host: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let host = dir.path().join("host");
        fs::create_dir_all(root.join("etc/init.d")).unwrap();
        fs::create_dir_all(host.join("etc")).unwrap();
        fs::write(host.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        fs::write(host.join("secret"), "host secret\n").unwrap();
        Fixture {
            _dir: dir,
            root,
            host,
        }
    }

    fn lc(&self) -> LcRoot {
        LcRoot::open(&self.root).unwrap()
    }

    /// Every file of the host tree with its content.
    fn host_state(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![self.host.clone()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let md = fs::symlink_metadata(&p).unwrap();
                if md.is_dir() {
                    stack.push(p.clone());
                    out.push((p, Vec::new()));
                } else {
                    out.push((p.clone(), fs::read(&p).unwrap()));
                }
            }
        }
        out.sort();
        out
    }
}

#[test]
fn a_link_at_the_last_component_is_replaced_not_written_through() {
    let fx = Fixture::new();
    let before = fx.host_state();
    symlink(
        fx.host.join("etc/passwd"),
        fx.root.join("etc/init.d/S05patchover"),
    )
    .unwrap();
    fx.lc()
        .write_file(Path::new("/etc/init.d/S05patchover"), b"#!/bin/sh\n", 0o755)
        .unwrap();
    assert_eq!(fx.host_state(), before);
    let md = fs::symlink_metadata(fx.root.join("etc/init.d/S05patchover")).unwrap();
    assert!(md.is_file(), "the link was replaced by the script");
    assert_eq!(md.permissions().mode() & 0o777, 0o755);
    assert_eq!(
        fs::read(fx.root.join("etc/init.d/S05patchover")).unwrap(),
        b"#!/bin/sh\n"
    );
}

#[test]
fn parent_links_resolve_inside_the_root() {
    let fx = Fixture::new();
    let before = fx.host_state();
    // An absolute link to the host's directory and a relative one climbing out of the root.
    fs::create_dir_all(fx.root.join("var")).unwrap();
    symlink(&fx.host, fx.root.join("var/lib")).unwrap();
    symlink("../../../../../../../..", fx.root.join("etc/systemd")).unwrap();
    let lc = fx.lc();
    // The link's target does not exist inside the root: a dangling link is refused.
    let e = lc
        .write_file(
            Path::new("var/lib/patchover-agent/table.json"),
            b"{}",
            0o644,
        )
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::NotADirectory, "{e}");
    // Once it does (as the LC itself would see it), the write lands there.
    let in_root = fx.root.join(fx.host.strip_prefix("/").unwrap());
    fs::create_dir_all(&in_root).unwrap();
    lc.write_file(
        Path::new("var/lib/patchover-agent/table.json"),
        b"{}",
        0o644,
    )
    .unwrap();
    lc.write_file(
        Path::new("etc/systemd/system/x.service"),
        b"[Unit]\n",
        0o644,
    )
    .unwrap();
    assert_eq!(fx.host_state(), before);
    assert!(in_root.join("patchover-agent/table.json").is_file());
    assert!(fx.root.join("system/x.service").is_file());
}

#[test]
fn reads_stay_inside_and_refuse_fifos_without_blocking() {
    let fx = Fixture::new();
    symlink(fx.host.join("secret"), fx.root.join("etc/leak")).unwrap();
    nix::unistd::mkfifo(&fx.root.join("etc/fifo"), Mode::from_bits_truncate(0o644)).unwrap();
    let lc = fx.lc();
    let e = lc.read_file(Path::new("etc/leak"), 1024).unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let e = lc.read_file(Path::new("etc/fifo"), 1024).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
    fs::write(fx.root.join("etc/big"), vec![b'x'; 100]).unwrap();
    assert!(lc.read_file(Path::new("etc/big"), 99).is_err());
    assert_eq!(lc.read_file(Path::new("etc/big"), 100).unwrap().len(), 100);
}

#[test]
fn removal_takes_the_link_not_its_target() {
    let fx = Fixture::new();
    let before = fx.host_state();
    fs::create_dir_all(fx.root.join("var/lib")).unwrap();
    symlink(&fx.host, fx.root.join("var/lib/patchover-agent")).unwrap();
    symlink(
        fx.host.join("secret"),
        fx.root.join("etc/init.d/S05patchover"),
    )
    .unwrap();
    let lc = fx.lc();
    lc.remove_all(Path::new("var/lib/patchover-agent")).unwrap();
    lc.remove_file(Path::new("etc/init.d/S05patchover"))
        .unwrap();
    lc.remove_all(Path::new("not/there")).unwrap();
    assert_eq!(fx.host_state(), before);
    assert!(fs::symlink_metadata(fx.root.join("var/lib/patchover-agent")).is_err());
    assert!(fs::symlink_metadata(fx.root.join("etc/init.d/S05patchover")).is_err());
    // A real tree goes entirely.
    lc.write_file(Path::new("a/b/c/d"), b"x", 0o600).unwrap();
    symlink(&fx.host, fx.root.join("a/b/host")).unwrap();
    lc.remove_all(Path::new("a")).unwrap();
    assert!(!fx.root.join("a").exists());
    assert_eq!(fx.host_state(), before);
    // Clearing the whole root takes links to host trees as links.
    symlink(&fx.host, fx.root.join("hostdir")).unwrap();
    lc.clear().unwrap();
    assert_eq!(fs::read_dir(&fx.root).unwrap().count(), 0);
    assert_eq!(fx.host_state(), before);
}

#[test]
fn the_walk_follows_no_link_and_skips_special_files() {
    let fx = Fixture::new();
    symlink(&fx.host, fx.root.join("etc/hostdir")).unwrap();
    symlink(fx.host.join("secret"), fx.root.join("etc/secret")).unwrap();
    nix::unistd::mkfifo(&fx.root.join("etc/fifo"), Mode::from_bits_truncate(0o644)).unwrap();
    fs::write(fx.root.join("etc/init.d/rcS"), "#!/bin/sh\n").unwrap();
    let mut seen = Vec::new();
    let stats = fx
        .lc()
        .walk_files(|p, f| {
            let mut s = String::new();
            (&f.file).read_to_string(&mut s).unwrap();
            seen.push((p.to_owned(), s));
            Ok::<_, ()>(())
        })
        .unwrap();
    assert_eq!(
        seen,
        [(PathBuf::from("etc/init.d/rcS"), "#!/bin/sh\n".into())]
    );
    assert_eq!((stats.files, stats.links, stats.special), (1, 2, 1));
}

#[test]
fn copies_and_links_land_inside() {
    let fx = Fixture::new();
    let before = fx.host_state();
    symlink(fx.host.join("etc/passwd"), fx.root.join("etc/agent")).unwrap();
    let lc = fx.lc();
    let mut f = lc
        .copy_in(&fx.host.join("secret"), Path::new("etc/agent"), 0o755)
        .unwrap();
    let mut s = String::new();
    f.file_read(&mut s);
    assert_eq!(s, "host secret\n");
    symlink(fx.host.join("etc/passwd"), fx.root.join("etc/wants")).unwrap();
    lc.symlink(Path::new("etc/wants"), Path::new("../x.service"))
        .unwrap();
    assert_eq!(
        fs::read_link(fx.root.join("etc/wants")).unwrap(),
        Path::new("../x.service")
    );
    assert_eq!(fx.host_state(), before);
    assert!(lc.is_executable_file(Path::new("etc/agent")));
    assert!(lc.is_dir(Path::new("/etc/init.d")));
    assert!(!lc.is_dir(Path::new("etc/hostdir")));
}

#[test]
fn a_mount_target_behind_a_link_is_inside_the_root() {
    let fx = Fixture::new();
    symlink(&fx.host, fx.root.join("srv")).unwrap();
    fs::create_dir_all(fx.root.join(fx.host.strip_prefix("/").unwrap())).unwrap();
    let fd = fx.lc().mount_target(Path::new("/srv/app"), 0o755).unwrap();
    let st = fstat(fd.as_fd()).unwrap();
    let inside =
        fs::metadata(fx.root.join(fx.host.strip_prefix("/").unwrap()).join("app")).unwrap();
    assert_eq!((st.st_dev, st.st_ino), (inside.dev(), inside.ino()));
    assert!(!fx.host.join("app").exists());
}

#[test]
fn bad_paths_are_refused_clearly() {
    let fx = Fixture::new();
    let e = fx.lc().write_file(Path::new("/"), b"x", 0o644).unwrap_err();
    assert!(e.to_string().contains("inside the LC root"), "{e}");
    assert!(LcRoot::open(&fx.host.join("secret")).is_err());
    assert!(LcRoot::open(Path::new("/nonexistent/patchover")).is_err());
}

trait ReadAll {
    fn file_read(&mut self, s: &mut String);
}
impl ReadAll for File {
    fn file_read(&mut self, s: &mut String) {
        self.read_to_string(s).unwrap();
    }
}
