//! The table copy: the part of the patch table (fig. 6) the orchestrator puts on the standby's
//! disk next to the marked bundles, and that the agent reads at boot (1201), fills in with each
//! result (1205) and sends back with its report (1207).
//!
//! It is JSON, not SQLite, because the agent is a small static binary inside a minimal LC and
//! the file is tiny. Layout on the standby (see [`AGENT_DIR`]):
//!
//! ```text
//! /var/lib/patchover-agent/table.json      this file
//! /var/lib/patchover-agent/bundles/<file>  each entry's bundle (+ <file>.minisig)
//! /var/lib/patchover-agent/keys/*.pub      the trusted public keys
//! ```
//!
//! Writes are atomic (temp file + fsync + rename), so a crash or power loss during boot leaves
//! either the old table or the new one, never a torn file.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use patchover_core::Category;
use serde::{Deserialize, Serialize};

use crate::apply::{BundleResult, BundleStatus};
use crate::archive::Limits;
use crate::create::write_atomic;
use crate::hash::Sha256;
use crate::keys::TrustedKeys;
#[cfg(feature = "stage")]
use crate::keys::signature_path;
use crate::manifest::BundleId;
use crate::verify::{VerifiedBundle, VerifyError, verify_bundle};

/// The agent's directory on the standby's system disk.
pub const AGENT_DIR: &str = "/var/lib/patchover-agent";
/// The table copy's file name in [`AGENT_DIR`].
pub const TABLE_FILE: &str = "table.json";
/// The bundles' directory name in [`AGENT_DIR`].
pub const BUNDLES_DIR: &str = "bundles";
/// The trusted keys' directory name in [`AGENT_DIR`].
pub const KEYS_DIR: &str = "keys";
/// The table copy format written by this crate.
pub const TABLE_FORMAT: u32 = 1;
/// The largest table copy read.
const MAX_TABLE_BYTES: u64 = 16 << 20;

/// A table copy that could not be read, written or used.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("cannot read the table copy {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the table copy {path} is over {MAX_TABLE_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("the table copy {path} is not valid JSON of format {TABLE_FORMAT}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the table copy is not valid: {0}")]
    Invalid(String),
    #[error("cannot write the table copy {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("table entry {id}: bundle rejected")]
    Bundle {
        id: String,
        #[source]
        source: Box<VerifyError>,
    },
    #[error(
        "table entry {id}: the bundle's sha256 is {have}, the table says {want}: copy it again"
    )]
    HashMismatch {
        id: String,
        have: Sha256,
        want: Sha256,
    },
    #[error("table entry {id}: the bundle's manifest says id {manifest_id}")]
    IdMismatch { id: String, manifest_id: String },
}

/// One patch in the table copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableEntry {
    pub id: BundleId,
    pub category: Category,
    /// The apply-at-next-run flag (fig. 6): only marked entries are applied.
    pub apply_next: bool,
    /// The bundle's file name in the bundles directory (a plain name, no `/`).
    pub file: String,
    /// The SHA-256 the host recorded when it verified the bundle.
    pub sha256: Sha256,
    /// The result of this run, filled in by the agent.
    #[serde(default)]
    pub result: Option<BundleResult>,
}

impl TableEntry {
    /// An entry for a verified bundle, marked for the next run, its file named `<id>.tar.zst`
    /// (the name [`stage`] copies it to).
    pub fn for_bundle(b: &VerifiedBundle) -> TableEntry {
        TableEntry {
            id: b.manifest().id.clone(),
            category: b.manifest().category,
            apply_next: true,
            file: bundle_file_name(b),
            sha256: b.sha256(),
            result: None,
        }
    }
}

/// The file name a staged bundle gets: `<id>.tar.zst`.
pub fn bundle_file_name(b: &VerifiedBundle) -> String {
    format!("{}.tar.zst", b.id())
}

/// The table copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableCopy {
    pub format: u32,
    /// The LC the run is for (the standby), for the report.
    pub lc: String,
    /// An id of the patch run, chosen by the host, echoed back in the report.
    pub run_id: String,
    /// Entries in apply order.
    pub entries: Vec<TableEntry>,
}

impl TableCopy {
    pub fn new(lc: impl Into<String>, run_id: impl Into<String>) -> TableCopy {
        TableCopy {
            format: TABLE_FORMAT,
            lc: lc.into(),
            run_id: run_id.into(),
            entries: Vec::new(),
        }
    }

    /// Checks what serde cannot: the format, unique ids, plain file names.
    pub fn validate(&self) -> Result<(), TableError> {
        if self.format != TABLE_FORMAT {
            return Err(TableError::Invalid(format!(
                "format {} is not supported (this agent reads {TABLE_FORMAT})",
                self.format
            )));
        }
        let mut ids = HashSet::new();
        let mut files = HashSet::new();
        for e in &self.entries {
            if !ids.insert(e.id.as_str()) {
                return Err(TableError::Invalid(format!(
                    "bundle id {} is listed twice",
                    e.id
                )));
            }
            let plain = !e.file.is_empty()
                && e.file.len() <= 255
                && !e.file.contains('/')
                && !e.file.contains('\0')
                && e.file != "."
                && e.file != "..";
            if !plain {
                return Err(TableError::Invalid(format!(
                    "entry {}: file {:?} must be a plain file name",
                    e.id, e.file
                )));
            }
            if !files.insert(e.file.as_str()) {
                return Err(TableError::Invalid(format!(
                    "file {} is listed twice",
                    e.file
                )));
            }
        }
        Ok(())
    }

    /// The entries marked for this run, in order (1202).
    pub fn marked(&self) -> impl Iterator<Item = &TableEntry> {
        self.entries.iter().filter(|e| e.apply_next)
    }

    /// Records a result in its entry (1205); returns false if no entry has that id.
    pub fn record(&mut self, r: &BundleResult) -> bool {
        match self.entries.iter_mut().find(|e| e.id.as_str() == r.id) {
            Some(e) => {
                e.result = Some(r.clone());
                true
            }
            None => false,
        }
    }
}

/// Reads and validates a table copy.
pub fn read_table(path: &Path) -> Result<TableCopy, TableError> {
    let read_err = |source| TableError::Read {
        path: path.to_owned(),
        source,
    };
    let md = std::fs::metadata(path).map_err(read_err)?;
    if md.len() > MAX_TABLE_BYTES {
        return Err(TableError::TooLarge {
            path: path.to_owned(),
        });
    }
    let bytes = std::fs::read(path).map_err(read_err)?;
    let t: TableCopy = serde_json::from_slice(&bytes).map_err(|source| TableError::Parse {
        path: path.to_owned(),
        source,
    })?;
    t.validate()?;
    Ok(t)
}

/// Validates and writes a table copy atomically.
pub fn write_table(path: &Path, table: &TableCopy) -> Result<(), TableError> {
    table.validate()?;
    let mut bytes = serde_json::to_vec_pretty(table).map_err(|source| TableError::Parse {
        path: path.to_owned(),
        source,
    })?;
    bytes.push(b'\n');
    write_atomic(path, &bytes).map_err(|source| TableError::Write {
        path: path.to_owned(),
        source,
    })
}

/// Puts a patch run onto a standby's disk (seed 705/706): under `agent_dir` (the standby's
/// `/var/lib/patchover-agent`, a path inside `root`) it writes `bundles/<id>.tar.zst` with its
/// `.minisig` for each of `bundles` (in apply order, all marked), `keys/key-<n>.pub` for each
/// of `key_files` (`key-s<n>.apt.pub` for each of `scoped_keys`), and `table.json` last, so an agent that finds a table finds everything it
/// names. Each copied bundle is hashed again, through the descriptor it was written by, and
/// must equal what was verified. Files left from an earlier run in `bundles/` and `keys/` are
/// removed first. Every write goes through `root`: a link the LC planted anywhere on the way
/// resolves inside the LC, never on the host.
#[cfg(feature = "stage")]
pub fn stage(
    root: &patchover_lcroot::LcRoot,
    agent_dir: &Path,
    lc: &str,
    run_id: &str,
    bundles: &[VerifiedBundle],
    key_files: &[PathBuf],
    scoped_keys: &[crate::keys::ScopedKey],
) -> Result<TableCopy, TableError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |e: patchover_lcroot::RootError| TableError::Write {
            path,
            source: std::io::Error::other(e),
        }
    };
    let mut table = TableCopy::new(lc, run_id);
    table.entries = bundles.iter().map(TableEntry::for_bundle).collect();
    table.validate()?;
    let bdir = agent_dir.join(BUNDLES_DIR);
    let kdir = agent_dir.join(KEYS_DIR);
    let tpath = agent_dir.join(TABLE_FILE);
    root.remove_file(&tpath).map_err(io(&tpath))?;
    for d in [&bdir, &kdir] {
        root.remove_all(d).map_err(io(d))?;
        root.mkdir_all(d, 0o755).map_err(io(d))?;
    }
    for b in bundles {
        let dest = bdir.join(bundle_file_name(b));
        let written = root.copy_in(b.path(), &dest, 0o644).map_err(io(&dest))?;
        let copied = Sha256::of_reader(written).map_err(|source| TableError::Write {
            path: dest.clone(),
            source,
        })?;
        if copied != b.sha256() {
            return Err(TableError::HashMismatch {
                id: b.id().to_owned(),
                have: copied,
                want: b.sha256(),
            });
        }
        let sig = signature_path(&dest);
        root.copy_in(&signature_path(b.path()), &sig, 0o644)
            .map_err(io(&sig))?;
    }
    for (n, k) in key_files.iter().enumerate() {
        let dest = kdir.join(format!("key-{n}.pub"));
        root.copy_in(k, &dest, 0o644).map_err(io(&dest))?;
    }
    // A scoped key keeps its scope in the LC: the agent reads it from the name.
    for (n, k) in scoped_keys.iter().enumerate() {
        let crate::keys::KeyScope::Apt = k.scope;
        let dest = kdir.join(format!("key-s{n}{}", crate::keys::SCOPED_KEY_SUFFIX));
        root.copy_in(&k.path, &dest, 0o644).map_err(io(&dest))?;
    }
    table.validate()?;
    let mut bytes = serde_json::to_vec_pretty(&table).map_err(|source| TableError::Parse {
        path: tpath.clone(),
        source,
    })?;
    bytes.push(b'\n');
    root.write_file(&tpath, &bytes, 0o644).map_err(io(&tpath))?;
    Ok(table)
}

/// Verifies every marked entry's bundle in `bundles_dir` (signature with `keys`, archive, and
/// the SHA-256 the table recorded) and returns them in order. The first failure is an error:
/// the caller must then apply none of them (a bundle that does not verify must not run, and
/// the ones after it must not run without it).
pub fn verify_marked(
    table: &TableCopy,
    bundles_dir: &Path,
    keys: &TrustedKeys,
    limits: &Limits,
) -> Result<Vec<VerifiedBundle>, TableError> {
    table.validate()?;
    let mut out = Vec::new();
    for e in table.marked() {
        let b = verify_bundle(&bundles_dir.join(&e.file), keys, limits).map_err(|source| {
            TableError::Bundle {
                id: e.id.to_string(),
                source: Box::new(source),
            }
        })?;
        if b.sha256() != e.sha256 {
            return Err(TableError::HashMismatch {
                id: e.id.to_string(),
                have: b.sha256(),
                want: e.sha256,
            });
        }
        if b.id() != e.id.as_str() {
            return Err(TableError::IdMismatch {
                id: e.id.to_string(),
                manifest_id: b.id().to_owned(),
            });
        }
        out.push(b);
    }
    Ok(out)
}

/// The report for a run where [`verify_marked`] failed: the failing entry `failed` with the
/// error, all other marked entries `skipped`. Nothing was applied.
pub fn verification_failure_results(table: &TableCopy, err: &TableError) -> Vec<BundleResult> {
    let bad = match err {
        TableError::Bundle { id, .. }
        | TableError::HashMismatch { id, .. }
        | TableError::IdMismatch { id, .. } => Some(id.as_str()),
        _ => None,
    };
    let mut msg = err.to_string();
    let mut src = std::error::Error::source(err);
    while let Some(c) = src {
        msg.push_str(": ");
        msg.push_str(&c.to_string());
        src = c.source();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    table
        .marked()
        .map(|e| {
            let is_bad = bad.is_none_or(|b| b == e.id.as_str());
            BundleResult {
                id: e.id.to_string(),
                status: if is_bad {
                    BundleStatus::Failed
                } else {
                    BundleStatus::Skipped
                },
                exit_code: None,
                output: String::new(),
                output_truncated: false,
                duration_ms: 0,
                step: None,
                error: Some(if is_bad {
                    msg.clone()
                } else {
                    format!(
                        "not run: verification of {} failed, nothing was applied",
                        bad.unwrap_or("?")
                    )
                }),
                finished_unix: now,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, file: &str) -> TableEntry {
        TableEntry {
            id: id.parse().unwrap(),
            category: Category::Security,
            apply_next: true,
            file: file.to_owned(),
            sha256: Sha256::of(id.as_bytes()),
            result: None,
        }
    }

    #[test]
    fn round_trip_and_validation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(TABLE_FILE);
        let mut t = TableCopy::new("lc2", "run-1");
        t.entries.push(entry("a", "a.tar.zst"));
        t.entries.push(TableEntry {
            apply_next: false,
            ..entry("b", "b.tar.zst")
        });
        write_table(&p, &t).unwrap();
        let back = read_table(&p).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.marked().count(), 1);

        let mut dup = t.clone();
        dup.entries.push(entry("a", "c.tar.zst"));
        assert!(matches!(write_table(&p, &dup), Err(TableError::Invalid(_))));
        let mut bad = t.clone();
        bad.entries[0].file = "../../etc/passwd".into();
        assert!(matches!(write_table(&p, &bad), Err(TableError::Invalid(_))));
        // The failed writes left the good table in place.
        assert_eq!(read_table(&p).unwrap(), t);

        std::fs::write(
            &p,
            r#"{"format":1,"lc":"x","run_id":"r","entries":[],"extra":1}"#,
        )
        .unwrap();
        assert!(matches!(read_table(&p), Err(TableError::Parse { .. })));
    }
}
