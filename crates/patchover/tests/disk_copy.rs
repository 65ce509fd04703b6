//! `patchover disk copy` driven through the real binary: a tree copy with `--json`, bad input
//! (exit code 2, nothing changed), and a follow copy cut while a real writer process in its own
//! cgroup v2 keeps appending (needs root).

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_patchover");

fn unique() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{:x}{:x}", std::process::id(), t)
}

fn patchover(args: &[&str]) -> (i32, serde_json::Value, String) {
    let out = Command::new(BIN)
        .arg("--json")
        .args(args)
        .env("PATCHOVER_CONFIG", "/nonexistent/patchover.toml")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let v = serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null);
    (
        out.status.code().unwrap_or(-1),
        v,
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Content, mode, owner, size, mtime, symlink target and link count of every entry.
fn snapshot(root: &Path) -> Vec<String> {
    fn rec(root: &Path, rel: &Path, out: &mut Vec<String>) {
        let p = root.join(rel);
        let md = fs::symlink_metadata(&p).unwrap();
        let extra = if md.file_type().is_symlink() {
            fs::read_link(&p).unwrap().display().to_string()
        } else if md.is_file() {
            format!("{:x}", md5ish(&fs::read(&p).unwrap()))
        } else {
            String::new()
        };
        let mtime = if md.is_dir() { 0 } else { md.mtime_nsec() };
        out.push(format!(
            "{} {:o} {}:{} {} {} {} {extra}",
            rel.display(),
            md.mode(),
            md.uid(),
            md.gid(),
            if md.is_dir() { 0 } else { md.len() },
            mtime,
            if md.is_dir() { 0 } else { md.nlink() },
        ));
        if md.is_dir() {
            let mut names: Vec<_> = fs::read_dir(&p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            for n in names {
                rec(root, &rel.join(n), out);
            }
        }
    }
    let mut v = Vec::new();
    rec(root, Path::new(""), &mut v);
    v
}

fn md5ish(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, x| {
        (h ^ *x as u64).wrapping_mul(0x100000001b3)
    })
}

fn tree(root: &Path) {
    fs::create_dir_all(root.join("etc/init.d")).unwrap();
    fs::write(root.join("etc/hostname"), b"lc1\n").unwrap();
    fs::write(root.join("etc/init.d/rcS"), b"#!/bin/sh\necho boot\n").unwrap();
    fs::set_permissions(
        root.join("etc/init.d/rcS"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    fs::hard_link(root.join("etc/hostname"), root.join("etc/hostname.bak")).unwrap();
    std::os::unix::fs::symlink("init.d/rcS", root.join("etc/rc")).unwrap();
    std::os::unix::fs::chown(root.join("etc/hostname"), Some(100), Some(101)).unwrap();
    let f = fs::File::create(root.join("var.img")).unwrap();
    f.set_len(32 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"data", 1 << 20).unwrap();
}

#[test]
fn disk_copy_json_summary_and_identical_tree() {
    let d = tempfile::tempdir().unwrap();
    let (src, dst) = (d.path().join("src"), d.path().join("dst"));
    tree(&src);
    let hist = d.path().join("history.log");
    let (code, v, err) = patchover(&[
        "disk",
        "copy",
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
        "--keep-history",
        hist.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(v["kind"], "directory");
    assert_eq!(v["files"], 3, "{v}");
    assert_eq!(v["hardlinks"], 1);
    assert_eq!(v["caught_up"], true);
    assert!(v["duration"].as_f64().unwrap() > 0.0);
    assert_eq!(snapshot(&src), snapshot(&dst));
    assert!(!dst.join(".patchover-incomplete").exists());
    let h = fs::read_to_string(&hist).unwrap();
    assert!(
        h.lines().any(|l| l.contains(" start ")) && h.lines().any(|l| l.contains(" done ")),
        "{h}"
    );
}

#[test]
fn disk_copy_bad_input_exits_2_and_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    tree(&src);
    let before = snapshot(&src);
    let busy = d.path().join("busy");
    fs::create_dir(&busy).unwrap();
    fs::write(busy.join("mine"), b"keep").unwrap();
    let s = src.to_str().unwrap();
    for (dst, want) in [
        (busy.to_str().unwrap().to_string(), "not empty"),
        (format!("{s}/etc/copy"), "inside the source"),
        (s.to_string(), "same"),
    ] {
        let (code, v, _) = patchover(&["disk", "copy", s, &dst]);
        assert_eq!(code, 2, "{dst}: {v}");
        assert!(v["error"].as_str().unwrap().contains(want), "{v}");
    }
    let (code, v, _) = patchover(&[
        "disk",
        "copy",
        "/nonexistent/src",
        d.path().join("x").to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(
        v["error"].as_str().unwrap().contains("does not exist"),
        "{v}"
    );
    assert_eq!(snapshot(&src), before);
    assert_eq!(fs::read(busy.join("mine")).unwrap(), b"keep");
    assert_eq!(fs::read_dir(&busy).unwrap().count(), 1);
    assert!(!src.join("etc/copy").exists() && !d.path().join("x").exists());
}

/// A cgroup v2 directory of the test's own, with everything in it killed and removed on drop.
struct Cgroup(PathBuf);

impl Cgroup {
    fn new() -> Cgroup {
        let p = PathBuf::from(format!("/sys/fs/cgroup/unified/po-disk-test-{}", unique()));
        fs::create_dir(&p).unwrap();
        Cgroup(p)
    }
    fn add(&self, pid: u32) {
        fs::write(self.0.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = fs::write(self.0.join("cgroup.kill"), "1");
        let _ = fs::write(self.0.join("cgroup.freeze"), "0");
        for _ in 0..100 {
            if fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A shell appends numbered lines to a log as fast as it can, frozen at the cut by its cgroup;
/// the cut is asked for on stdin. Every line on the copy must be a line the source has (the
/// copy is a prefix of the source), and `--verify` finds copy and frozen source identical.
#[test]
fn disk_copy_follow_cuts_a_live_writer_frozen_by_its_cgroup() {
    let d = tempfile::tempdir().unwrap();
    let (src, dst) = (d.path().join("app"), d.path().join("copy"));
    tree(&src);
    let cg = Cgroup::new();
    let writer = Command::new("sh")
        .arg("-c")
        .arg("i=0; while :; do echo line-$i >> log; i=$((i+1)); if [ $((i % 50)) = 0 ]; then echo x > f$((i % 7)); rm -f f$(((i + 3) % 7)); fi; done")
        .current_dir(&src)
        .spawn()
        .unwrap();
    let writer = Kill(writer);
    cg.add(writer.0.id());
    std::thread::sleep(Duration::from_millis(300));

    let mut po = Command::new(BIN)
        .args([
            "--json",
            "disk",
            "copy",
            "--follow",
            "--verify",
            "--freeze-cgroup",
        ])
        .arg(&cg.0)
        .arg(&src)
        .arg(&dst)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Marked incomplete while following (poll: the machine may be busy).
    let t = std::time::Instant::now();
    while !dst.join(".patchover-incomplete").exists() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        dst.join(".patchover-incomplete").exists(),
        "marked incomplete while following"
    );
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        po.try_wait().unwrap().is_none(),
        "follow mode must wait for the cut"
    );
    po.stdin.take().unwrap().write_all(b"\n").unwrap();
    let out = po.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let cut = &v["cut"];
    assert_eq!(cut["verified"], true, "{v}");
    assert!(cut["freeze_window"].as_f64().unwrap() > 0.0);
    assert!(
        v["history_entries"].as_u64().unwrap() > 0,
        "the writer's appends are in the history: {v}"
    );
    assert!(!dst.join(".patchover-incomplete").exists());

    // The writer runs on after the cut: the copy holds a prefix of what it wrote.
    std::thread::sleep(Duration::from_millis(200));
    let mut copy = String::new();
    fs::File::open(dst.join("log"))
        .unwrap()
        .read_to_string(&mut copy)
        .unwrap();
    let source = fs::read_to_string(src.join("log")).unwrap();
    assert!(
        copy.lines().count() > 10,
        "copy has {} lines",
        copy.lines().count()
    );
    assert!(
        source.starts_with(&copy),
        "copy is not a prefix of the source log"
    );
    assert!(
        source.len() > copy.len(),
        "the writer was thawed after the cut"
    );
}

#[test]
fn disk_copy_follow_refuses_a_non_cgroup_freezer() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    tree(&src);
    let (code, v, _) = patchover(&[
        "disk",
        "copy",
        "--follow",
        "--cut-after",
        "0",
        "--freeze-cgroup",
        d.path().to_str().unwrap(),
        src.to_str().unwrap(),
        d.path().join("dst").to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{v}");
    assert!(v["error"].as_str().unwrap().contains("cgroup"), "{v}");
    assert!(!d.path().join("dst").exists());
}
