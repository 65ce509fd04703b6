//! Turning a bundle file into a [`VerifiedBundle`]: the only way to get one.
//!
//! The order matters: the signature is checked over the raw file bytes *before* the archive
//! is parsed, so a file from an unknown source never reaches the tar and TOML parsers on the
//! host; then the archive is read in full (a signed archive can still be malformed). The
//! SHA-256 of exactly the verified bytes is kept, and the apply engine re-reads the file and
//! compares it, so a file swapped after verification is refused rather than applied.
//!
//! [`VerifiedBundle`] has private fields and no constructor besides [`verify_bundle`] and
//! [`verify_bundle_with`], and does not implement `Deserialize`: code that only accepts
//! `VerifiedBundle` cannot be handed an unverified bundle.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::archive::{ArchiveError, BundleArchive, Limits, read_archive};
use crate::hash::Sha256;
use crate::keys::{
    IndexTrust, KeyId, KeyScope, SignatureError, SignatureFile, SignatureInfo, TrustedKeys,
    signature_path,
};
use crate::manifest::Manifest;

/// A bundle that could not be verified; nothing was changed anywhere.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read bundle {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bundle {path} is over the size limit of {max} bytes")]
    TooLarge { path: PathBuf, max: u64 },
    #[error("bundle {path}: signature rejected")]
    Signature {
        path: PathBuf,
        #[source]
        source: SignatureError,
    },
    #[error(
        "bundle {path} is signed by key {key_id} ({key_source}), which is trusted only for {scope} bundles (scope = \"{scope}\" in [[bundles.scoped_keys]]), and it is not one: {why}; such a bundle must be signed by a key in [bundles] trusted_keys"
    )]
    Scope {
        path: PathBuf,
        key_id: KeyId,
        key_source: String,
        scope: KeyScope,
        why: crate::aptshape::ShapeError,
    },
    #[error(
        "bundle {path} is signed by key {key_id} ({key_source}), which is trusted only for apt bundles, and its packages are not the archive's: {why}"
    )]
    Index {
        path: PathBuf,
        key_id: KeyId,
        key_source: String,
        #[source]
        why: Box<crate::aptindex::IndexError>,
    },
    #[error("bundle {path}: archive rejected")]
    Archive {
        path: PathBuf,
        #[source]
        source: ArchiveError,
    },
}

/// A bundle whose signature verified against a trusted key and whose archive is valid.
#[derive(Debug, Clone, Serialize)]
pub struct VerifiedBundle {
    manifest: Manifest,
    path: PathBuf,
    sha256: Sha256,
    size: u64,
    signature: SignatureInfo,
}

impl VerifiedBundle {
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    /// The bundle id (from the manifest).
    pub fn id(&self) -> &str {
        self.manifest.id.as_str()
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The SHA-256 of the file bytes the signature was checked over.
    pub fn sha256(&self) -> Sha256 {
        self.sha256
    }
    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn signature(&self) -> &SignatureInfo {
        &self.signature
    }
    pub fn key_id(&self) -> KeyId {
        self.signature.key_id
    }
}

/// Reads a whole bundle file, refusing one over `limits.max_bundle_bytes`.
pub fn read_bundle_file(path: &Path, limits: &Limits) -> Result<Vec<u8>, VerifyError> {
    let read_err = |source| VerifyError::Read {
        path: path.to_owned(),
        source,
    };
    let f = std::fs::File::open(path).map_err(read_err)?;
    let mut buf = Vec::new();
    f.take(limits.max_bundle_bytes + 1)
        .read_to_end(&mut buf)
        .map_err(read_err)?;
    if buf.len() as u64 > limits.max_bundle_bytes {
        return Err(VerifyError::TooLarge {
            path: path.to_owned(),
            max: limits.max_bundle_bytes,
        });
    }
    Ok(buf)
}

/// Verifies the bundle at `path` with its signature at `<path>.minisig`.
pub fn verify_bundle(
    path: &Path,
    keys: &TrustedKeys,
    limits: &Limits,
) -> Result<VerifiedBundle, VerifyError> {
    verify_bundle_with(path, &signature_path(path), keys, limits)
}

/// Verifies the bundle at `path` with the signature at `sig_path`.
pub fn verify_bundle_with(
    path: &Path,
    sig_path: &Path,
    keys: &TrustedKeys,
    limits: &Limits,
) -> Result<VerifiedBundle, VerifyError> {
    let sig_err = |source| VerifyError::Signature {
        path: path.to_owned(),
        source,
    };
    // Cheap checks first: a missing signature or an empty key set needs no bundle read.
    let sig = SignatureFile::from_file(sig_path).map_err(sig_err)?;
    if keys.is_empty() {
        return Err(sig_err(SignatureError::NoTrustedKeys));
    }
    let bytes = read_bundle_file(path, limits)?;
    let signature = keys.verify(&bytes, &sig).map_err(sig_err)?;
    let archive = read_archive(&bytes, limits).map_err(|source| VerifyError::Archive {
        path: path.to_owned(),
        source,
    })?;
    if let Some(scope @ KeyScope::Apt) = signature.scope {
        let debs = crate::aptshape::check(&bytes, &archive).map_err(|why| VerifyError::Scope {
            path: path.to_owned(),
            key_id: signature.key_id,
            key_source: signature.key_source.clone(),
            scope,
            why,
        })?;
        match &signature.index {
            Some(IndexTrust::Keyrings(keyrings)) => {
                let now = jiff::Timestamp::now().as_second();
                crate::aptindex::check(&bytes, &debs, keyrings, now).map_err(|why| {
                    VerifyError::Index {
                        path: path.to_owned(),
                        key_id: signature.key_id,
                        key_source: signature.key_source.clone(),
                        why: Box::new(why),
                    }
                })?;
            }
            // An agent's copy: the host checked it before staging (`IndexTrust`).
            Some(IndexTrust::CheckedByHost) => {}
            None => unreachable!("a scoped key always has its IndexTrust (TrustedKey::scoped)"),
        }
    }
    tracing::debug!(bundle = %archive.manifest.id, key = %signature.key_id, "bundle verified");
    Ok(VerifiedBundle {
        manifest: archive.manifest,
        path: path.to_owned(),
        sha256: Sha256::of(&bytes),
        size: bytes.len() as u64,
        signature,
    })
}

/// What `patchover bundle inspect` shows: the archive's contents and the signature's key id,
/// WITHOUT any trust decision. Never use it to decide whether to apply a bundle.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub path: PathBuf,
    pub sha256: Sha256,
    pub size: u64,
    /// The key id named by `<path>.minisig`, if that file exists and parses (not verified).
    pub signed_by: Option<KeyId>,
    #[serde(flatten)]
    pub archive: BundleArchive,
}

/// Reads and validates a bundle without checking its signature (for display only).
pub fn inspect_bundle(path: &Path, limits: &Limits) -> Result<Inspection, VerifyError> {
    let bytes = read_bundle_file(path, limits)?;
    let archive = read_archive(&bytes, limits).map_err(|source| VerifyError::Archive {
        path: path.to_owned(),
        source,
    })?;
    let signed_by = SignatureFile::from_file(&signature_path(path))
        .ok()
        .map(|s| s.key_id());
    Ok(Inspection {
        path: path.to_owned(),
        sha256: Sha256::of(&bytes),
        size: bytes.len() as u64,
        signed_by,
        archive,
    })
}
