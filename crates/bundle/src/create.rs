//! Making and signing bundle files (host side: `patchover bundle create` and `sign`).
//!
//! `create` validates the manifest first and the finished archive again with the same reader
//! that verification uses, so it never writes a bundle that `verify` would reject; the file
//! appears atomically (temp file + rename), so a crash leaves no half bundle under the name.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::archive::{
    ArchiveError, Limits, MANIFEST_NAME, PAYLOAD_DIR, read_archive, write_archive,
};
use crate::hash::Sha256;
use crate::manifest::{MAX_MANIFEST_BYTES, Manifest, ManifestError};

/// A bundle that could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("cannot read {path}: a bundle directory holds manifest.toml and payload/")]
    ReadManifest {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is over {MAX_MANIFEST_BYTES} bytes")]
    ManifestTooLarge { path: PathBuf },
    #[error("{path}")]
    Manifest {
        path: PathBuf,
        #[source]
        source: ManifestError,
    },
    #[error("cannot pack {dir}")]
    Pack {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the packed bundle does not validate")]
    Invalid(#[source] ArchiveError),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What `create` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct CreatedBundle {
    pub path: PathBuf,
    pub id: String,
    pub sha256: Sha256,
    pub size: u64,
    pub entries: usize,
    pub unpacked_bytes: u64,
}

/// Writes `bytes` to `path` atomically: a temp file beside it, fsync, rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Packs `dir` (holding `manifest.toml` and `payload/`) into the bundle file `out`.
pub fn create_bundle(dir: &Path, out: &Path) -> Result<CreatedBundle, CreateError> {
    let mpath = dir.join(MANIFEST_NAME);
    let md = std::fs::metadata(&mpath).map_err(|source| CreateError::ReadManifest {
        path: mpath.clone(),
        source,
    })?;
    if md.len() > MAX_MANIFEST_BYTES as u64 {
        return Err(CreateError::ManifestTooLarge { path: mpath });
    }
    let text = std::fs::read(&mpath).map_err(|source| CreateError::ReadManifest {
        path: mpath.clone(),
        source,
    })?;
    Manifest::parse(&text).map_err(|source| CreateError::Manifest {
        path: mpath.clone(),
        source,
    })?;
    let payload = dir.join(PAYLOAD_DIR);
    let payload = payload.is_dir().then_some(payload.as_path());
    let mut bytes = Vec::new();
    write_archive(&text, payload, &mut bytes).map_err(|source| CreateError::Pack {
        dir: dir.to_owned(),
        source,
    })?;
    let archive = read_archive(&bytes, &Limits::default()).map_err(CreateError::Invalid)?;
    write_atomic(out, &bytes).map_err(|source| CreateError::Write {
        path: out.to_owned(),
        source,
    })?;
    tracing::info!(bundle = %archive.manifest.id, path = %out.display(), "bundle created");
    Ok(CreatedBundle {
        path: out.to_owned(),
        id: archive.manifest.id.to_string(),
        sha256: Sha256::of(&bytes),
        size: bytes.len() as u64,
        entries: archive.entries.len(),
        unpacked_bytes: archive.unpacked_bytes,
    })
}

#[cfg(feature = "sign")]
pub use signing::{SignBundleError, SignedBundle, sign_bundle};

#[cfg(feature = "sign")]
mod signing {
    use std::path::{Path, PathBuf};

    use serde::Serialize;

    use super::write_atomic;
    use crate::archive::{ArchiveError, Limits, read_archive};
    use crate::hash::Sha256;
    use crate::keys::{KeyError, KeyId, SigningKey, signature_path};
    use crate::verify::{VerifyError, read_bundle_file};

    /// A bundle that could not be signed.
    #[derive(Debug, thiserror::Error)]
    pub enum SignBundleError {
        #[error("cannot read the bundle")]
        Read(#[source] VerifyError),
        #[error("{path} is not a valid bundle: refusing to sign it")]
        Invalid {
            path: PathBuf,
            #[source]
            source: ArchiveError,
        },
        #[error("cannot sign")]
        Sign(#[source] KeyError),
        #[error("cannot write {path}")]
        Write {
            path: PathBuf,
            #[source]
            source: std::io::Error,
        },
    }

    /// What `sign` wrote.
    #[derive(Debug, Clone, Serialize)]
    pub struct SignedBundle {
        pub path: PathBuf,
        pub signature: PathBuf,
        pub key_id: KeyId,
        pub sha256: Sha256,
        pub trusted_comment: String,
    }

    /// Signs the bundle at `path`, writing `<path>.minisig` (replacing an older one). The
    /// bundle is validated first; the trusted comment names the file and its SHA-256.
    pub fn sign_bundle(path: &Path, key: &SigningKey) -> Result<SignedBundle, SignBundleError> {
        let limits = Limits::default();
        let bytes = read_bundle_file(path, &limits).map_err(SignBundleError::Read)?;
        read_archive(&bytes, &limits).map_err(|source| SignBundleError::Invalid {
            path: path.to_owned(),
            source,
        })?;
        let sha256 = Sha256::of(&bytes);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let comment = format!("timestamp:{now}\tfile:{name}\tsha256:{sha256}");
        let text = key.sign(&bytes, &comment).map_err(SignBundleError::Sign)?;
        let sig = signature_path(path);
        write_atomic(&sig, text.as_bytes()).map_err(|source| SignBundleError::Write {
            path: sig.clone(),
            source,
        })?;
        Ok(SignedBundle {
            path: path.to_owned(),
            signature: sig,
            key_id: key.id(),
            sha256,
            trusted_comment: comment,
        })
    }
}
