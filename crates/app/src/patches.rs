//! The patch table (seed fig. 6): `patches list|show|mark|unmark|import` and
//! `GET|POST /v1/patches…`.
//!
//! `import` is the only way into the table: the bundle's signature is verified against the
//! config's trusted keys first, the verified file is copied into the state directory under its
//! SHA-256, and only then is the row registered.

use std::fs;
use std::path::{Path, PathBuf};

use patchover_bundle::{BundlesConfig, VerifyError, verify_bundle};
use patchover_core::Config;
use patchover_store::{NewPatch, PatchRow, Store};
use serde::{Deserialize, Serialize};

use crate::AppError;

/// The directory where verified bundles are kept.
pub fn bundle_store_dir(config: &Config) -> PathBuf {
    config.state_dir.join("bundles")
}

/// The patch table: `patches list` and `GET /v1/patches`.
pub fn list(store: &Store) -> Result<Vec<PatchRow>, AppError> {
    Ok(store.patches()?)
}

/// One patch: `patches show` and `GET /v1/patches/{id}`.
pub fn show(store: &Store, id: &str) -> Result<PatchRow, AppError> {
    store
        .patch(id)?
        .ok_or_else(|| AppError::NotFound(format!("no patch {id:?}; see `patchover patches list`")))
}

/// Patches marked or unmarked for the next run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marked {
    pub marked: bool,
    pub ids: Vec<String>,
}

/// Marks (or unmarks) patches for the next run, all or none: `patches mark|unmark` and
/// `POST /v1/patch-marks`.
pub fn mark(store: &mut Store, ids: &[String], on: bool) -> Result<Marked, AppError> {
    if ids.is_empty() {
        return Err(AppError::BadInput("name at least one patch".into()));
    }
    // All or nothing: check every id before changing any (patches are never removed, so one
    // checked stays there).
    for id in ids {
        if store.patch(id)?.is_none() {
            return Err(AppError::NotFound(format!(
                "no patch {id:?}; nothing was changed (see `patchover patches list`)"
            )));
        }
    }
    for id in ids {
        store.mark_patch(id, on)?;
    }
    Ok(Marked {
        marked: on,
        ids: ids.to_vec(),
    })
}

/// A patch just imported: its row and the id of the key that signed it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Imported {
    #[serde(flatten)]
    pub row: PatchRow,
    pub key_id: String,
}

/// Verifies a signed bundle against the config's trusted keys, copies it into the state
/// directory and registers it: `patches import` and `POST /v1/patches`.
pub fn import(
    config: &Config,
    store: &mut Store,
    file: &Path,
    mark: bool,
) -> Result<Imported, AppError> {
    if !file.is_absolute() {
        return Err(AppError::BadInput(format!(
            "{} is not an absolute path; give the bundle's whole path",
            file.display()
        )));
    }
    let bundles = BundlesConfig::from_section(&config.bundles);
    let keys = bundles.load_trusted_keys().map_err(AppError::TrustedKeys)?;
    if keys.is_empty() {
        return Err(AppError::BadInput(format!(
            "no trusted keys: add `trusted_keys = [\"/path/key.pub\"]` to [bundles] in {}",
            config.path.display()
        )));
    }
    let verified =
        verify_bundle(file, &keys, &bundles.limits).map_err(|source| AppError::Bundle {
            file: file.to_owned(),
            bad: is_bad_bundle(&source),
            source: Box::new(source),
        })?;
    let m = verified.manifest();
    if store.patch(m.id.as_str())?.is_some() {
        return Err(AppError::BadInput(format!(
            "patch {} is already in the patch table; bundle ids are unique",
            m.id
        )));
    }
    let dir = bundle_store_dir(config);
    fs::create_dir_all(&dir).map_err(|source| AppError::Io {
        what: format!("creating {}", dir.display()),
        source,
    })?;
    let dest = dir.join(format!("{}.po", verified.sha256()));
    copy_verified(file, &dest)?;
    store.register_patch(&NewPatch {
        id: m.id.as_str(),
        title: &m.title,
        category: m.category,
        severity: m.severity.as_str(),
        published: &m.published.rfc3339,
        sha256: &verified.sha256().to_string(),
        file: &dest.to_string_lossy(),
    })?;
    if mark {
        store.mark_patch(m.id.as_str(), true)?;
    }
    let row = store.patch(m.id.as_str())?.ok_or_else(|| {
        AppError::Conflict(format!(
            "patch {} left the patch table while it was imported",
            m.id
        ))
    })?;
    Ok(Imported {
        row,
        key_id: verified.key_id().to_string(),
    })
}

/// Whether a bundle was refused for what it is (a signature that does not verify or is
/// malformed, a key's scope it is not of, packages not in the archive's signed index, a bad archive, too large, or no such file): bad input, exit code 2 and 422
/// through the API. Only a failure to read an existing file is the host's.
fn is_bad_bundle(e: &VerifyError) -> bool {
    match e {
        VerifyError::Signature { .. }
        | VerifyError::Scope { .. }
        | VerifyError::Archive { .. }
        | VerifyError::TooLarge { .. } => true,
        // Packages not tied to the archive's signed index; gpgv missing is the host's.
        VerifyError::Index { why, .. } => !why.is_host_failure(),
        VerifyError::Read { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
    }
}

/// Copies the bundle and its signature; the copy is what later runs use, so a change to the
/// original after the import changes nothing.
fn copy_verified(src: &Path, dest: &Path) -> Result<(), AppError> {
    let copy = |from: &Path, to: &Path| {
        fs::copy(from, to).map_err(|source| AppError::Io {
            what: format!("copying {} into the store", from.display()),
            source,
        })
    };
    copy(src, dest)?;
    copy(
        &patchover_bundle::keys::signature_path(src),
        &patchover_bundle::keys::signature_path(dest),
    )?;
    Ok(())
}
