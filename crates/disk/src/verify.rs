//! Full comparison of a source and its copy, used at a cut when asked (`CutOptions::verify`) and by
//! the benchmark: content, sizes, types, modes, owners, modification times, symlink targets,
//! device numbers, xattrs, and hard-link structure (two names share an inode on one side exactly
//! when they do on the other).
//!
//! Like the copier, it walks both trees through directory descriptors and follows no link (see
//! [`crate::tree`]): the source is still the LC's, frozen or not.

use std::collections::HashMap;
use std::ffi::{CStr, OsStr};
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::marker::MARKER;
use crate::tree::{self, Dir, Meta};

/// Compares `src` and `dst` (directories or files). `Err` names the first difference.
pub fn compare(src: &Path, dst: &Path) -> Result<(), String> {
    let mut links = Links::default();
    let open = |p: &Path| Dir::open(p).map_err(|e| format!("{}: {e}", p.display()));
    let smd = std::fs::symlink_metadata(src).map_err(|e| format!("{}: {e}", src.display()))?;
    if smd.is_dir() {
        let (s, d) = (open(src)?, open(dst)?);
        compare_entry((&s, c"."), (&d, c"."), Path::new(""), &mut links)?;
        compare_dir(&s, &d, Path::new(""), &mut links)
    } else {
        let parent = |p: &Path| p.parent().unwrap_or(Path::new("/")).to_path_buf();
        let (s, d) = (open(&parent(src))?, open(&parent(dst))?);
        let name =
            |p: &Path| tree::name(p.file_name().unwrap_or_default()).map_err(|e| format!("{e}"));
        let (sn, dn) = (name(src)?, name(dst)?);
        compare_entry((&s, &sn), (&d, &dn), Path::new(""), &mut links).map(|_| ())
    }
}

#[derive(Default)]
struct Links {
    s2d: HashMap<u64, u64>,
    d2s: HashMap<u64, u64>,
}

fn show(rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        ".".into()
    } else {
        rel.display().to_string()
    }
}

/// Compares everything in directory `rel`, open on both sides.
fn compare_dir(s: &Dir, d: &Dir, rel: &Path, links: &mut Links) -> Result<(), String> {
    let names = |dir: &Dir, skip_marker: bool| -> Result<Vec<_>, String> {
        let mut v: Vec<_> = dir
            .names()
            .map_err(|e| format!("{}: {e}", show(rel)))?
            .into_iter()
            .filter(|n| {
                !(skip_marker && rel.as_os_str().is_empty() && n.as_bytes() == MARKER.as_bytes())
            })
            .collect();
        v.sort();
        Ok(v)
    };
    let sn = names(s, false)?;
    let dn = names(d, true)?;
    if sn != dn {
        let missing: Vec<_> = sn.iter().filter(|n| !dn.contains(n)).collect();
        let extra: Vec<_> = dn.iter().filter(|n| !sn.contains(n)).collect();
        return Err(format!(
            "{}: entries differ (missing on copy: {missing:?}, extra on copy: {extra:?})",
            show(rel)
        ));
    }
    for n in sn {
        let r = rel.join(OsStr::from_bytes(n.to_bytes()));
        let md = compare_entry((s, &n), (d, &n), &r, links)?;
        if md.is_dir() {
            let sub = |dir: &Dir| dir.sub(&n).map_err(|e| format!("{}: {e}", show(&r)));
            compare_dir(&sub(s)?, &sub(d)?, &r, links)?;
        }
    }
    Ok(())
}

/// Compares the entry `sn` in `s` with `dn` in `d` (not their children); returns the source's
/// `stat`.
fn compare_entry(
    (s, sn): (&Dir, &CStr),
    (d, dn): (&Dir, &CStr),
    rel: &Path,
    links: &mut Links,
) -> Result<Meta, String> {
    let sm = s
        .stat(sn)
        .map_err(|e| format!("{}: source: {e}", show(rel)))?;
    let dm = d
        .stat(dn)
        .map_err(|e| format!("{}: copy: {e}", show(rel)))?;
    let what = |w: &str, a: String, b: String| {
        Err(format!("{}: {w} differs: source {a}, copy {b}", show(rel)))
    };
    if sm.mode() != dm.mode() {
        return what(
            "mode",
            format!("{:o}", sm.mode()),
            format!("{:o}", dm.mode()),
        );
    }
    if (sm.uid(), sm.gid()) != (dm.uid(), dm.gid()) {
        return what(
            "owner",
            format!("{}:{}", sm.uid(), sm.gid()),
            format!("{}:{}", dm.uid(), dm.gid()),
        );
    }
    if !sm.is_dir() && sm.len() != dm.len() {
        return what("size", sm.len().to_string(), dm.len().to_string());
    }
    if sm.mtime() != dm.mtime() {
        let t = |m: &Meta| format!("{}.{:09}", m.mtime().0, m.mtime().1);
        return what("mtime", t(&sm), t(&dm));
    }
    if sm.is_symlink() {
        let (a, b) = (s.readlink(sn), d.readlink(dn));
        if a.as_ref().ok() != b.as_ref().ok() {
            return what("symlink target", format!("{a:?}"), format!("{b:?}"));
        }
    }
    if matches!(sm.kind(), libc::S_IFBLK | libc::S_IFCHR) && sm.rdev() != dm.rdev() {
        return what(
            "device number",
            sm.rdev().to_string(),
            dm.rdev().to_string(),
        );
    }
    if !sm.is_dir() {
        check_links(&sm, &dm, rel, links)?;
    }
    if sm.is_file() {
        let open = |dir: &Dir, n: &CStr| {
            dir.open_regular(n, false)
                .map_err(|e| format!("{}: {e}", show(rel)))
        };
        if !same_content(open(s, sn)?, open(d, dn)?).map_err(|e| format!("{}: {e}", show(rel)))? {
            return Err(format!("{}: content differs", show(rel)));
        }
    }
    let xa = xattrs(s, sn, rel)?;
    let xb = xattrs(d, dn, rel)?;
    if xa != xb {
        return what("xattrs", format!("{xa:?}"), format!("{xb:?}"));
    }
    Ok(sm)
}

fn check_links(sm: &Meta, dm: &Meta, rel: &Path, links: &mut Links) -> Result<(), String> {
    let a = *links.s2d.entry(sm.ino()).or_insert(dm.ino());
    let b = *links.d2s.entry(dm.ino()).or_insert(sm.ino());
    if a != dm.ino() || b != sm.ino() || sm.nlink() != dm.nlink() {
        return Err(format!(
            "{}: hard links differ (source has {} names, copy {})",
            show(rel),
            sm.nlink(),
            dm.nlink()
        ));
    }
    Ok(())
}

type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

fn xattrs(dir: &Dir, n: &CStr, rel: &Path) -> Result<Xattrs, String> {
    let err = |e: std::io::Error| format!("{}: xattrs: {e}", show(rel));
    let h = dir.handle(n).map_err(err)?;
    let mut names = h.as_ref().list_xattrs().map_err(err)?;
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let v = h.as_ref().get_xattr(&name).map_err(err)?;
            Ok((name, v))
        })
        .collect()
}

fn same_content(mut fa: File, mut fb: File) -> std::io::Result<bool> {
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    loop {
        let na = read_fill(&mut fa, &mut ba)?;
        let nb = read_fill(&mut fb, &mut bb)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok(false);
        }
        if na == 0 {
            return Ok(true);
        }
    }
}

fn read_fill(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = f.read(&mut buf[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}
