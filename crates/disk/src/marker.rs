//! The incomplete marker: a copy that has not finished must never be used as a disk.
//!
//! A directory disk carries `<dst>/.patchover-incomplete/`; an image file carries the sidecar
//! directory `<dst>.patchover-incomplete/`. The marker is created before the first byte is copied
//! and removed only after the copy is complete (after the last replay, or the cut), so a crash,
//! an error or a kill at any moment leaves it in place. It also holds the history journal and a
//! `state.json` naming the source, so a rerun recognises its own leftovers and starts over.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Name of the marker inside a directory disk.
pub const MARKER: &str = patchover_core::INCOMPLETE_MARKER;

/// Where the marker of the disk at `dst` lives (whether or not it exists).
pub fn marker_path(dst: &Path, is_file: bool) -> PathBuf {
    patchover_core::incomplete_marker(dst, is_file)
}

/// True when `path` (a directory or an image file) is an unfinished copy. An LC backend must
/// refuse such a disk.
pub fn is_incomplete(path: &Path) -> bool {
    marker_path(path, false).exists() || marker_path(path, true).exists()
}

/// Creates the marker with its state file.
pub fn create(marker: &Path, src: &Path) -> io::Result<()> {
    fs::create_dir(marker)?;
    let state = serde_json::json!({ "source": src.to_string_lossy(), "pid": std::process::id() });
    fs::write(marker.join("state.json"), state.to_string())?;
    Ok(())
}

/// Removes the marker: the copy is complete. `keep_history` moves the journal to `keep_history`.
pub fn finish(marker: &Path, keep_history: Option<&Path>) -> io::Result<()> {
    if let Some(to) = keep_history {
        fs::rename(marker.join("history"), to)?;
    }
    fs::remove_dir_all(marker)
}

/// Marks image `dst`, about to be written by a block-level copier (QEMU's jobs), as an
/// unfinished copy of `src`; [`mark_complete`] when the copy is whole.
pub fn mark_incomplete(dst: &Path, src: &Path) -> io::Result<()> {
    let m = marker_path(dst, true);
    match create(&m, src) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_dir_all(&m)?;
            create(&m, src)
        }
        r => r,
    }
}

/// Removes the marker of a finished block-level copy of image `dst`.
pub fn mark_complete(dst: &Path) -> io::Result<()> {
    finish(&marker_path(dst, true), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_is_seen_for_trees_and_images() {
        let d = tempfile::tempdir().unwrap();
        let tree = d.path().join("tree");
        fs::create_dir(&tree).unwrap();
        assert!(!is_incomplete(&tree));
        create(&marker_path(&tree, false), Path::new("/src")).unwrap();
        assert!(is_incomplete(&tree));
        finish(&marker_path(&tree, false), None).unwrap();
        assert!(!is_incomplete(&tree));

        let img = d.path().join("disk.img");
        fs::write(&img, b"x").unwrap();
        create(&marker_path(&img, true), Path::new("/src.img")).unwrap();
        assert!(is_incomplete(&img));
        assert!(marker_path(&img, true).ends_with("disk.img.patchover-incomplete"));
    }
}
