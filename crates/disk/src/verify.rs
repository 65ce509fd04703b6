//! Full comparison of a source and its copy, used at a cut when asked (`CutOptions::verify`) and by
//! the benchmark: content, sizes, types, modes, owners, modification times, symlink targets,
//! device numbers, xattrs, and hard-link structure (two names share an inode on one side exactly
//! when they do on the other).

use std::collections::HashMap;
use std::fs::{self, File, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::fsops;
use crate::marker::MARKER;

/// Compares `src` and `dst` (directories or files). `Err` names the first difference.
pub fn compare(src: &Path, dst: &Path) -> Result<(), String> {
    let mut links = Links::default();
    let smd = fs::symlink_metadata(src).map_err(|e| format!("{}: {e}", src.display()))?;
    if smd.is_dir() {
        compare_dir(src, dst, Path::new(""), &mut links)
    } else {
        compare_entry(src, dst, Path::new(""), &mut links)
    }
}

#[derive(Default)]
struct Links {
    s2d: HashMap<u64, u64>,
    d2s: HashMap<u64, u64>,
}

fn compare_dir(src: &Path, dst: &Path, rel: &Path, links: &mut Links) -> Result<(), String> {
    compare_entry(src, dst, rel, links)?;
    let names = |p: &Path, skip_marker: bool| -> Result<Vec<std::ffi::OsString>, String> {
        let mut v: Vec<_> = fs::read_dir(p.join(rel))
            .map_err(|e| format!("{}: {e}", p.join(rel).display()))?
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .filter(|n| !(skip_marker && rel.as_os_str().is_empty() && n == MARKER))
            .collect();
        v.sort();
        Ok(v)
    };
    let sn = names(src, false)?;
    let dn = names(dst, true)?;
    if sn != dn {
        let missing: Vec<_> = sn.iter().filter(|n| !dn.contains(n)).collect();
        let extra: Vec<_> = dn.iter().filter(|n| !sn.contains(n)).collect();
        return Err(format!(
            "{}: entries differ (missing on copy: {missing:?}, extra on copy: {extra:?})",
            show(rel)
        ));
    }
    for n in sn {
        let r = rel.join(&n);
        let md = fs::symlink_metadata(src.join(&r)).map_err(|e| format!("{}: {e}", show(&r)))?;
        if md.is_dir() {
            compare_dir(src, dst, &r, links)?;
        } else {
            compare_entry(src, dst, &r, links)?;
        }
    }
    Ok(())
}

fn join(root: &Path, rel: &Path) -> PathBuf {
    if rel.as_os_str().is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    }
}

fn show(rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        ".".into()
    } else {
        rel.display().to_string()
    }
}

fn compare_entry(src: &Path, dst: &Path, rel: &Path, links: &mut Links) -> Result<(), String> {
    let (s, d) = (join(src, rel), join(dst, rel));
    let sm = fs::symlink_metadata(&s).map_err(|e| format!("{}: source: {e}", show(rel)))?;
    let dm = fs::symlink_metadata(&d).map_err(|e| format!("{}: copy: {e}", show(rel)))?;
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
    if (sm.mtime(), sm.mtime_nsec()) != (dm.mtime(), dm.mtime_nsec()) {
        return what(
            "mtime",
            format!("{}.{:09}", sm.mtime(), sm.mtime_nsec()),
            format!("{}.{:09}", dm.mtime(), dm.mtime_nsec()),
        );
    }
    let ft = sm.file_type();
    if ft.is_symlink() {
        let (a, b) = (fs::read_link(&s), fs::read_link(&d));
        if a.as_ref().ok() != b.as_ref().ok() {
            return what("symlink target", format!("{a:?}"), format!("{b:?}"));
        }
    }
    if (ft.is_block_device() || ft.is_char_device()) && sm.rdev() != dm.rdev() {
        return what(
            "device number",
            sm.rdev().to_string(),
            dm.rdev().to_string(),
        );
    }
    if !sm.is_dir() {
        check_links(&sm, &dm, rel, links)?;
    }
    if ft.is_file() && !same_content(&s, &d)? {
        return Err(format!("{}: content differs", show(rel)));
    }
    let xa = xattrs(&s)?;
    let xb = xattrs(&d)?;
    if xa != xb {
        return what("xattrs", format!("{xa:?}"), format!("{xb:?}"));
    }
    Ok(())
}

fn check_links(sm: &Metadata, dm: &Metadata, rel: &Path, links: &mut Links) -> Result<(), String> {
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

fn xattrs(p: &Path) -> Result<Xattrs, String> {
    let mut names = fsops::list_xattrs(p).map_err(|e| format!("{}: xattrs: {e}", p.display()))?;
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let v = fsops::get_xattr(p, &n).map_err(|e| format!("{}: xattr: {e}", p.display()))?;
            Ok((n, v))
        })
        .collect()
}

fn same_content(a: &Path, b: &Path) -> Result<bool, String> {
    let mut fa = File::open(a).map_err(|e| format!("{}: {e}", a.display()))?;
    let mut fb = File::open(b).map_err(|e| format!("{}: {e}", b.display()))?;
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    loop {
        let na = read_fill(&mut fa, &mut ba).map_err(|e| format!("{}: {e}", a.display()))?;
        let nb = read_fill(&mut fb, &mut bb).map_err(|e| format!("{}: {e}", b.display()))?;
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
