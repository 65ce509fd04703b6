//! Fuzz target bodies, shared by the cargo-fuzz targets in `fuzz/` (nightly, libFuzzer) and by
//! the stable test `tests/fuzz_smoke.rs`, which runs them over seeds and random mutations so
//! CI exercises the parsers without nightly. Each body asserts the invariants that must hold
//! for any input, not just "does not panic".

use crate::archive::{EntryKind, Limits, read_archive};
use crate::manifest::Manifest;

/// Limits small enough that a fuzz iteration stays fast.
pub fn fuzz_limits() -> Limits {
    Limits {
        max_bundle_bytes: 1 << 20,
        max_unpacked_bytes: 4 << 20,
        max_entries: 256,
    }
}

/// The manifest parser on arbitrary bytes. Returns whether the input was accepted.
pub fn manifest(data: &[u8]) -> bool {
    match Manifest::parse(data) {
        Ok(m) => {
            assert!(!m.steps.is_empty(), "a manifest without steps was accepted");
            assert!(data.len() <= crate::manifest::MAX_MANIFEST_BYTES);
            // Serializing a valid manifest never fails.
            serde_json::to_string(&m).expect("manifest serializes");
            true
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            false
        }
    }
}

/// The archive reader on arbitrary bytes. Returns whether the input was accepted.
pub fn archive(data: &[u8]) -> bool {
    match read_archive(data, &fuzz_limits()) {
        Ok(a) => {
            for e in &a.entries {
                assert!(
                    e.path == "manifest.toml"
                        || e.path == "payload"
                        || e.path.starts_with("payload/"),
                    "entry outside the tree accepted: {:?}",
                    e.path
                );
                assert!(
                    !e.path.split('/').any(|c| c == ".." || c.is_empty()),
                    "{:?}",
                    e.path
                );
                if let EntryKind::Symlink { target } = &e.kind {
                    assert!(!target.starts_with('/'), "absolute symlink accepted");
                }
            }
            for s in &a.manifest.steps {
                let want = s.payload_file().archive_path();
                assert!(
                    a.entries
                        .iter()
                        .any(|e| e.path == want && matches!(e.kind, EntryKind::File { .. })),
                    "step file {want} missing but archive accepted"
                );
            }
            true
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            false
        }
    }
}
