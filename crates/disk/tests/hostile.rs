//! A hostile LC against the live copier: root inside the LC swaps directories for links to host
//! directories while the copy runs (bulk copy and replay rounds), on the names the copier reads
//! (a link must not carry host files into the standby) and on names it has already copied as
//! links into the copy (a link in the copy must not lead a write, a removal or a metadata change
//! onto the host). The test counts the swaps made while the copier ran and the swaps the copier
//! ran into, and fails unless both happened: a run that never hit the window proves nothing.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Gate, GateQ, LoopFs, diff_trees};
use patchover_disk::{CopyOptions, FollowCopy, NoProgress, is_incomplete};

/// Swaps two names atomically (`renameat2(RENAME_EXCHANGE)`): a directory and a link trade places
/// with no moment where neither exists.
fn exchange(a: &Path, b: &Path) {
    let ca = std::ffi::CString::new(a.as_os_str().as_bytes()).unwrap();
    let cb = std::ffi::CString::new(b.as_os_str().as_bytes()).unwrap();
    // SAFETY: two valid NUL-terminated paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(r, 0, "exchange: {}", std::io::Error::last_os_error());
}

/// Everything about a host directory that a copier could change: names, kinds, modes, owners,
/// sizes, times and content.
fn state(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    fn rec(p: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let md = fs::symlink_metadata(p).unwrap();
        let data = if md.is_file() {
            fs::read(p).unwrap()
        } else {
            Vec::new()
        };
        out.insert(
            rel.to_path_buf(),
            format!(
                "{:o} {}:{} {} {}.{} {:?}",
                md.mode(),
                md.uid(),
                md.gid(),
                md.len(),
                md.mtime(),
                md.mtime_nsec(),
                data
            ),
        );
        if md.is_dir() {
            for e in fs::read_dir(p).unwrap() {
                let n = e.unwrap().file_name();
                rec(&p.join(&n), &rel.join(&n), out);
            }
        }
    }
    rec(root, Path::new(""), &mut out);
    out
}

/// Regular files under `root` (not following links) whose content holds `needle`.
fn files_holding(root: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(md) = fs::symlink_metadata(&p) else {
            continue;
        };
        if md.is_dir() {
            for e in fs::read_dir(&p).unwrap().flatten() {
                stack.push(e.path());
            }
        } else if md.is_file() {
            let data = fs::read(&p).unwrap_or_default();
            if data.windows(needle.len()).any(|w| w == needle) {
                hits.push(p);
            }
        }
    }
    hits
}

/// Watches host directories for any access at all (open, read, write, metadata, entries): the
/// LC never touches them, so every event is the copier going through a link. Catches what a
/// later replay round would have repaired in the copy (a host file read and copied, then
/// overwritten).
struct Watch {
    fd: std::os::fd::OwnedFd,
    dirs: BTreeMap<i32, PathBuf>,
}

impl Watch {
    fn new(dirs: &[PathBuf]) -> Watch {
        use std::os::fd::FromRawFd;
        // SAFETY: plain syscall with flags.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0, "inotify: {}", std::io::Error::last_os_error());
        // SAFETY: fd was just returned to us.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let mut w = Watch {
            fd,
            dirs: BTreeMap::new(),
        };
        for d in dirs {
            let c = std::ffi::CString::new(d.as_os_str().as_bytes()).unwrap();
            // SAFETY: valid fd and path.
            let wd = unsafe {
                libc::inotify_add_watch(
                    std::os::fd::AsRawFd::as_raw_fd(&w.fd),
                    c.as_ptr(),
                    libc::IN_ALL_EVENTS | libc::IN_DONT_FOLLOW,
                )
            };
            assert!(wd >= 0, "watch {}", d.display());
            w.dirs.insert(wd, d.clone());
        }
        w
    }

    /// Every event so far, as `dir/name: mask`.
    fn events(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: buf is valid for its length.
            let n = unsafe {
                libc::read(
                    std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if n <= 0 {
                return out;
            }
            let mut off = 0usize;
            let hdr = std::mem::size_of::<libc::inotify_event>();
            while off + hdr <= n as usize {
                // SAFETY: the kernel wrote a whole event header at off.
                let ev: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buf[off..].as_ptr().cast()) };
                let name = &buf[off + hdr..off + hdr + ev.len as usize];
                let name = String::from_utf8_lossy(name.split(|b| *b == 0).next().unwrap_or(&[]));
                let dir = self.dirs.get(&ev.wd).map(|d| d.display().to_string());
                out.push(format!(
                    "{}/{name}: {:#x}",
                    dir.unwrap_or_default(),
                    ev.mask
                ));
                off += hdr + ev.len as usize;
            }
        }
    }
}

/// A directory inside the LC and the link it trades places with: `name` is the one the copier
/// sees, `stash` holds the other one; the LC writes into whichever of the two is the directory.
struct Flip {
    name: PathBuf,
    stash: PathBuf,
    dir_at_name: bool,
}

impl Flip {
    fn new(src: &Path, name: &str, host: &Path, files: &[&str]) -> Flip {
        let dir = src.join(name);
        fs::create_dir_all(dir.join("sub")).unwrap();
        for f in files {
            fs::write(dir.join(f), format!("lc data {name}/{f}\n")).unwrap();
            fs::write(dir.join("sub").join(f), format!("lc data {name}/sub/{f}\n")).unwrap();
        }
        let stash = src.join(format!(".{name}-stash"));
        std::os::unix::fs::symlink(host, &stash).unwrap();
        Flip {
            name: dir,
            stash,
            dir_at_name: true,
        }
    }

    fn swap(&mut self) {
        exchange(&self.name, &self.stash);
        self.dir_at_name = !self.dir_at_name;
    }

    /// The LC's own writes into the real directory: the trap reports them under whichever name
    /// the directory has when the copier reads the event.
    fn write(&self, i: u64, files: &[&str]) {
        let dir = if self.dir_at_name {
            &self.name
        } else {
            &self.stash
        };
        let f = files[(i % files.len() as u64) as usize];
        let sub = if i.is_multiple_of(2) {
            dir.join(f)
        } else {
            dir.join("sub").join(f)
        };
        if let Ok(mut fh) = OpenOptions::new().append(true).open(&sub) {
            let _ = writeln!(fh, "write {i}");
        }
        let _ = fs::set_permissions(&sub, fs::Permissions::from_mode(0o600 | (i as u32 & 0o44)));
        let fresh = dir.join(format!("new{}", i % 4));
        if i % 8 < 4 {
            let _ = fs::write(&fresh, format!("fresh {i}\n"));
        } else {
            let _ = fs::remove_file(&fresh);
        }
    }
}

/// Issue 16 item 2: during a follow copy (bulk and rounds), the LC flips `d` between a real
/// directory and a link to host secrets (read side), and `t` between a real directory and the
/// relative link `../../host-target`, which dangles from the source but, copied verbatim, points
/// from the copy at a host directory (write side: replaying writes made under the real `t` must not
/// go through the copy's link). Neither host directory may see any access, no host byte may reach
/// the copy, the copy must complete and equal the frozen source, and both the swaps during the
/// copy and the swaps the copier refused must be counted.
#[test]
fn r16_swapping_a_directory_for_a_host_link_during_the_copy_leads_nowhere() {
    let lfs = LoopFs::new("ext4", 256);
    let host = tempfile::Builder::new()
        .prefix("pod-host-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let secret = format!("SECRET-{}", std::process::id());
    let secrets = host.path().join("host-secrets");
    let target = host.path().join("host-target");
    let files = ["a", "b", "c", "passwd", "shadow"];
    for h in [&secrets, &target] {
        fs::create_dir_all(h.join("sub")).unwrap();
        for f in files {
            fs::write(h.join(f), format!("{secret} host {f}\n")).unwrap();
            fs::write(h.join("sub").join(f), format!("{secret} host sub/{f}\n")).unwrap();
        }
    }
    let before = (state(&secrets), state(&target));

    let src = lfs.mnt.join("src");
    // The standby's disk lives on the host beside the host directories: `dst/t -> ../../host-target`
    // is `host-target`.
    fs::create_dir(host.path().join("standby")).unwrap();
    let dst = host.path().join("standby/dst");
    // Enough of a tree that the bulk copy takes a while.
    for i in 0..10 {
        let d = src.join(format!("fill{i:02}"));
        fs::create_dir_all(&d).unwrap();
        for j in 0..40 {
            fs::write(d.join(format!("f{j}")), vec![b'x'; 1000 + j * 10]).unwrap();
        }
    }
    let mut flips = vec![
        Flip::new(&src, "d", &secrets, &files),
        Flip::new(&src, "t", Path::new("../../host-target"), &files),
    ];
    assert!(
        !src.join(".t-stash").exists(),
        "the source's t link must dangle"
    );
    let watch = Watch::new(&[
        secrets.clone(),
        secrets.join("sub"),
        target.clone(),
        target.join("sub"),
    ]);

    let gate = Arc::new(Gate::default());
    let stop = Arc::new(AtomicBool::new(false));
    let copying = Arc::new(AtomicBool::new(false));
    let swaps_during_copy = Arc::new(AtomicU64::new(0));
    let writer = {
        let (gate, stop, copying, swaps) = (
            gate.clone(),
            stop.clone(),
            copying.clone(),
            swaps_during_copy.clone(),
        );
        let (fake_marker, target) = (src.join(".patchover-incomplete"), target.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                gate.run(|| {
                    // The LC also plants the copy's marker name, as a link to the host directory
                    // (the copy refuses a source holding it before it starts).
                    if copying.load(Ordering::SeqCst) && i.is_multiple_of(32) {
                        let _ = fs::remove_file(&fake_marker);
                    } else if copying.load(Ordering::SeqCst) && i % 32 == 16 {
                        let _ = std::os::unix::fs::symlink(&target, &fake_marker);
                    }
                    for f in &mut flips {
                        f.write(i, &files);
                        f.swap();
                        if copying.load(Ordering::SeqCst) {
                            swaps.fetch_add(1, Ordering::SeqCst);
                        }
                        f.write(i + 1, &files);
                    }
                });
                i += 2;
                std::thread::sleep(Duration::from_micros(100));
            }
        })
    };

    let kept = host.path().join("kept-history");
    let opts = CopyOptions {
        sync: false,
        round_interval: Duration::from_millis(2),
        keep_history: Some(kept.clone()),
        ..CopyOptions::default()
    };
    copying.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    let result = FollowCopy::start(&src, &dst, &opts, Arc::new(NoProgress)).and_then(|mut c| {
        // Let the LC swap through the bulk copy and at least three background replay rounds.
        let mut seen = u64::MAX;
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let st = c.stats().unwrap_or_default();
            if st.rounds != seen {
                seen = st.rounds;
                eprintln!(
                    "{:?}: {} rounds, {} links refused so far",
                    t0.elapsed(),
                    st.rounds,
                    st.refused_links
                );
            }
            if st.rounds >= 3 || c.is_failed() || t0.elapsed() > Duration::from_secs(120) {
                break;
            }
        }
        gate.hold(); // keep the LC frozen after the cut
        c.cut_with(&mut GateQ(gate.clone()), false)
    });
    copying.store(false, Ordering::SeqCst);
    let took = t0.elapsed();
    let accesses = watch.events();
    let diffs = result.as_ref().ok().map(|_| diff_trees(&src, &dst));
    gate.release();
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();

    let swaps = swaps_during_copy.load(Ordering::SeqCst);
    eprintln!(
        "copy {took:?} ({}): {swaps} swaps while copying, {} refused by the copier, {} rounds, \
         {} history entries, {} accesses to the host directories",
        if result.is_ok() {
            "completed"
        } else {
            "failed"
        },
        result.as_ref().map_or(0, |r| r.stats.refused_links),
        result.as_ref().map_or(0, |r| r.stats.rounds),
        result.as_ref().map_or(0, |r| r.stats.history_entries),
        accesses.len(),
    );
    let after = (state(&secrets), state(&target));
    assert!(
        before.0 == after.0,
        "the host directory behind the read-side link changed"
    );
    assert!(
        before.1 == after.1,
        "the host directory behind the copy's link changed: before {:#?} after {:#?}",
        before.1,
        after.1
    );
    assert!(
        accesses.is_empty(),
        "the copier went through a link into the host: {} accesses, first {:?}",
        accesses.len(),
        &accesses[..accesses.len().min(10)]
    );
    let leaked = files_holding(&dst, secret.as_bytes());
    assert!(
        leaked.is_empty(),
        "host files were copied into the standby's disk: {leaked:?}"
    );
    let rep = result.expect("the copy must complete under a hostile LC");
    assert_eq!(
        diffs.unwrap(),
        Vec::<String>::new(),
        "copy differs from the frozen source at the cut"
    );
    assert!(!is_incomplete(&dst));
    let history = fs::read_to_string(&kept).unwrap();
    assert!(
        history.ends_with("done - - .\n"),
        "{}",
        &history[history.len().saturating_sub(200)..]
    );
    assert!(swaps > 0, "the LC never swapped while the copy ran");
    assert!(
        rep.stats.refused_links > 0,
        "the copier never ran into a swapped link: the window was not hit"
    );
}
