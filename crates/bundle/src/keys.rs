//! minisign keys and signatures.
//!
//! Bundles are signed with minisign (Ed25519, prehashed with BLAKE2b: the `ED` algorithm the
//! `minisign` tool uses by default), so operators can sign with Debian's `minisign` or with
//! `patchover bundle sign`, and verify either way. Verification uses `minisign-verify`, a small
//! pure-Rust crate with no dependencies, so the in-LC agent can verify without carrying the
//! signing code; signing and key generation (feature `sign`) use the `minisign` crate.
//!
//! Legacy (non-prehashed `Ed`) signatures are refused: minisign has not made them by default
//! since 0.8 and they hash nothing, so they would make us read the whole file into a verifier.

use std::fmt;
use std::path::{Path, PathBuf};

use ct_codecs::{Base64, Decoder};
pub use patchover_core::config::{KeyScope, ScopedKey};
use serde::Serialize;

/// The file name suffix of a detached signature (`bundle.tar.zst.minisig`).
pub const SIGNATURE_SUFFIX: &str = ".minisig";
/// The largest signature or key file read.
const MAX_KEY_FILE_BYTES: u64 = 16 * 1024;

/// A minisign key id: 8 random bytes chosen at key generation, shown like minisign shows it
/// (16 uppercase hex digits of the little-endian number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(into = "String")]
pub struct KeyId([u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", u64::from_le_bytes(self.0))
    }
}

impl From<KeyId> for String {
    fn from(k: KeyId) -> String {
        k.to_string()
    }
}

/// A key or signature file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is over {MAX_KEY_FILE_BYTES} bytes: not a minisign key or signature")]
    TooLarge { path: PathBuf },
    #[error("{what} is not a minisign {kind}: {why}")]
    Malformed {
        what: String,
        kind: &'static str,
        why: &'static str,
    },
    #[error("{what} is not a minisign {kind}")]
    Decode {
        what: String,
        kind: &'static str,
        #[source]
        source: minisign_verify::Error,
    },
    #[error("public key {id} is listed twice ({first} and {second})")]
    DuplicateKey {
        id: KeyId,
        first: String,
        second: String,
    },
    #[cfg(feature = "sign")]
    #[error(
        "the secret key {path} is encrypted: give its password (--password-file or PATCHOVER_KEY_PASSWORD)"
    )]
    NeedPassword { path: PathBuf },
    #[cfg(feature = "sign")]
    #[error("cannot use the secret key {path} (wrong password or damaged key)")]
    SecretKey {
        path: PathBuf,
        #[source]
        source: minisign::PError,
    },
    #[cfg(feature = "sign")]
    #[error("cannot generate or sign")]
    Minisign(#[source] minisign::PError),
    #[cfg(feature = "sign")]
    #[error("{path} already exists: refusing to overwrite a key")]
    Exists { path: PathBuf },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A signature that does not prove the bundle came from a trusted key.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error(
        "no signature: {path} is missing (sign the bundle with `patchover bundle sign` or `minisign -S`)"
    )]
    Missing { path: PathBuf },
    #[error("unreadable signature")]
    Unreadable(#[source] KeyError),
    #[error(
        "no trusted public keys: list them under [bundles] trusted_keys in the config, or pass --pubkey"
    )]
    NoTrustedKeys,
    #[error(
        "signed by unknown key {key_id}: trusted keys are {trusted}; add the signer's public key to [bundles] trusted_keys if you trust it"
    )]
    UnknownKey { key_id: KeyId, trusted: String },
    #[error("legacy (non-prehashed) minisign signature: sign again with minisign 0.8 or later")]
    Legacy,
    #[error("signature by key {key_id} does not match: the bundle was changed after it was signed")]
    Mismatch {
        key_id: KeyId,
        #[source]
        source: minisign_verify::Error,
    },
}

fn read_small(path: &Path) -> Result<String, KeyError> {
    let md = std::fs::metadata(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })?;
    if md.len() > MAX_KEY_FILE_BYTES {
        return Err(KeyError::TooLarge {
            path: path.to_owned(),
        });
    }
    std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The base64 line of a minisign file: the line after the `untrusted comment:` line, or the
/// only line when the file is just the key (`minisign -P` style).
fn b64_line<'a>(text: &'a str, what: &str, kind: &'static str) -> Result<&'a str, KeyError> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().ok_or_else(|| KeyError::Malformed {
        what: what.to_owned(),
        kind,
        why: "it is empty",
    })?;
    if first.starts_with("untrusted comment:") {
        lines.next().ok_or_else(|| KeyError::Malformed {
            what: what.to_owned(),
            kind,
            why: "nothing follows the comment line",
        })
    } else {
        Ok(first)
    }
}

fn decode_b64(s: &str, what: &str, kind: &'static str) -> Result<Vec<u8>, KeyError> {
    Base64::decode_to_vec(s, None).map_err(|_| KeyError::Malformed {
        what: what.to_owned(),
        kind,
        why: "its key line is not base64",
    })
}

/// A public key trusted to sign bundles.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    id: KeyId,
    key: minisign_verify::PublicKey,
    source: String,
    /// `None`: trusted for every bundle; else only for bundles of that scope's shape, whose
    /// packages the [`IndexTrust`] ties to the archive (one field: never one without the other).
    scoped: Option<(KeyScope, IndexTrust)>,
}

/// How the `.deb` files of a bundle signed by an apt-scoped key are tied to the archive they
/// claim to come from (`crate::aptindex`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexTrust {
    /// On the host: each `.deb` must be listed in a package index whose hash a release file
    /// signed by one of these OpenPGP keyrings lists (`archive_keyrings` of the key's
    /// `[[bundles.scoped_keys]]` entry).
    Keyrings(Vec<PathBuf>),
    /// In an agent's `keys/` directory: the host checked the packages against the archive's
    /// signed index before it staged the bundle, and the agent checks that the bundle is the
    /// one the host verified (its SHA-256 in the table). The agent runs on the standby, which
    /// is no more trusted than the bundle; it keeps the shape check.
    CheckedByHost,
}

impl TrustedKey {
    /// Parses a minisign public key (the two-line `.pub` file, or its base64 line alone).
    /// `source` names where it came from, for messages.
    pub fn parse(text: &str, source: &str) -> Result<TrustedKey, KeyError> {
        let line = b64_line(text, source, "public key")?;
        let bin = decode_b64(line, source, "public key")?;
        if bin.len() != 42 || &bin[..2] != b"Ed" {
            return Err(KeyError::Malformed {
                what: source.to_owned(),
                kind: "public key",
                why: "it is not an Ed25519 key of 42 bytes",
            });
        }
        let key = minisign_verify::PublicKey::from_base64(line).map_err(|source_err| {
            KeyError::Decode {
                what: source.to_owned(),
                kind: "public key",
                source: source_err,
            }
        })?;
        let mut id = [0u8; 8];
        id.copy_from_slice(&bin[2..10]);
        Ok(TrustedKey {
            id: KeyId(id),
            key,
            source: source.to_owned(),
            scoped: None,
        })
    }

    pub fn from_file(path: &Path) -> Result<TrustedKey, KeyError> {
        TrustedKey::parse(&read_small(path)?, &path.display().to_string())
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    /// Where the key came from (a path, usually).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The same key, trusted only for bundles of `scope`'s shape whose packages `index`
    /// ties to the archive.
    pub fn scoped(mut self, scope: KeyScope, index: IndexTrust) -> TrustedKey {
        self.scoped = Some((scope, index));
        self
    }

    pub fn scope(&self) -> Option<KeyScope> {
        self.scoped.as_ref().map(|(s, _)| *s)
    }

    /// For a scoped key: how its bundles' packages are tied to the archive.
    pub fn index(&self) -> Option<&IndexTrust> {
        self.scoped.as_ref().map(|(_, i)| i)
    }
}

/// The set of public keys whose signatures are accepted.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: Vec<TrustedKey>,
}

/// What a verified signature says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SignatureInfo {
    pub key_id: KeyId,
    /// Where the trusted key came from.
    pub key_source: String,
    /// The signed comment (minisign's "trusted comment": timestamp, file name…).
    pub trusted_comment: String,
    /// The key's scope (`None`: trusted for every bundle).
    pub scope: Option<KeyScope>,
    /// For a scoped key: how the bundle's packages are tied to the archive.
    #[serde(skip)]
    pub index: Option<IndexTrust>,
}

/// A parsed signature file, not yet checked against anything.
#[derive(Clone)]
pub struct SignatureFile {
    key_id: KeyId,
    prehashed: bool,
    sig: minisign_verify::Signature,
}

impl fmt::Debug for SignatureFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignatureFile")
            .field("key_id", &self.key_id)
            .field("prehashed", &self.prehashed)
            .finish_non_exhaustive()
    }
}

impl SignatureFile {
    pub fn parse(text: &str, source: &str) -> Result<SignatureFile, KeyError> {
        let line = b64_line(text, source, "signature")?;
        let bin = decode_b64(line, source, "signature")?;
        if bin.len() != 74 || bin[0] != b'E' {
            return Err(KeyError::Malformed {
                what: source.to_owned(),
                kind: "signature",
                why: "its signature line is not 74 bytes of Ed25519 signature",
            });
        }
        let sig = minisign_verify::Signature::decode(text).map_err(|e| KeyError::Decode {
            what: source.to_owned(),
            kind: "signature",
            source: e,
        })?;
        let mut id = [0u8; 8];
        id.copy_from_slice(&bin[2..10]);
        Ok(SignatureFile {
            key_id: KeyId(id),
            prehashed: bin[1] == b'D',
            sig,
        })
    }

    /// Reads the signature at `path`; a missing file is [`SignatureError::Missing`].
    pub fn from_file(path: &Path) -> Result<SignatureFile, SignatureError> {
        if std::fs::symlink_metadata(path).is_err() {
            return Err(SignatureError::Missing {
                path: path.to_owned(),
            });
        }
        let text = read_small(path).map_err(SignatureError::Unreadable)?;
        SignatureFile::parse(&text, &path.display().to_string()).map_err(SignatureError::Unreadable)
    }

    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    pub fn trusted_comment(&self) -> &str {
        self.sig.trusted_comment()
    }
}

impl TrustedKeys {
    /// A key set; the same key listed twice is an error (usually a config mistake).
    pub fn new(keys: Vec<TrustedKey>) -> Result<TrustedKeys, KeyError> {
        for (i, k) in keys.iter().enumerate() {
            if let Some(first) = keys[..i].iter().find(|o| o.id == k.id) {
                return Err(KeyError::DuplicateKey {
                    id: k.id,
                    first: first.source.clone(),
                    second: k.source.clone(),
                });
            }
        }
        Ok(TrustedKeys { keys })
    }

    /// Loads every public key file in `paths`.
    pub fn from_files(paths: &[PathBuf]) -> Result<TrustedKeys, KeyError> {
        TrustedKeys::new(
            paths
                .iter()
                .map(|p| TrustedKey::from_file(p))
                .collect::<Result<_, _>>()?,
        )
    }

    /// Loads `[bundles]`' keys: `trusted` for every bundle, `scoped` each for its scope only.
    pub fn from_config(trusted: &[PathBuf], scoped: &[ScopedKey]) -> Result<TrustedKeys, KeyError> {
        let mut keys: Vec<TrustedKey> = trusted
            .iter()
            .map(|p| TrustedKey::from_file(p))
            .collect::<Result<_, _>>()?;
        for k in scoped {
            let index = IndexTrust::Keyrings(k.archive_keyrings.clone());
            keys.push(TrustedKey::from_file(&k.path)?.scoped(k.scope, index));
        }
        TrustedKeys::new(keys)
    }

    /// Loads every `*.pub` file in `dir` (sorted by name), e.g. the agent's `keys/` directory.
    /// A `*.apt.pub` file is trusted only for apt bundles ([`SCOPED_KEY_SUFFIX`]).
    pub fn from_dir(dir: &Path) -> Result<TrustedKeys, KeyError> {
        let read_err = |source| KeyError::Read {
            path: dir.to_owned(),
            source,
        };
        let mut paths = Vec::new();
        for e in std::fs::read_dir(dir).map_err(read_err)? {
            let p = e.map_err(read_err)?.path();
            if p.extension().is_some_and(|x| x == "pub") {
                paths.push(p);
            }
        }
        paths.sort();
        let keys = paths
            .iter()
            .map(|p| {
                let k = TrustedKey::from_file(p)?;
                let scoped = p.to_string_lossy().ends_with(SCOPED_KEY_SUFFIX);
                Ok(if scoped {
                    k.scoped(KeyScope::Apt, IndexTrust::CheckedByHost)
                } else {
                    k
                })
            })
            .collect::<Result<_, KeyError>>()?;
        TrustedKeys::new(keys)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn keys(&self) -> &[TrustedKey] {
        &self.keys
    }

    /// Checks `sig` over `data` against the trusted key with the signature's key id.
    pub fn verify(
        &self,
        data: &[u8],
        sig: &SignatureFile,
    ) -> Result<SignatureInfo, SignatureError> {
        if self.keys.is_empty() {
            return Err(SignatureError::NoTrustedKeys);
        }
        let Some(key) = self.keys.iter().find(|k| k.id == sig.key_id) else {
            return Err(SignatureError::UnknownKey {
                key_id: sig.key_id,
                trusted: self
                    .keys
                    .iter()
                    .map(|k| format!("{} ({})", k.id, k.source))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        if !sig.prehashed {
            return Err(SignatureError::Legacy);
        }
        key.key
            .verify(data, &sig.sig, false)
            .map_err(|source| SignatureError::Mismatch {
                key_id: sig.key_id,
                source,
            })?;
        Ok(SignatureInfo {
            key_id: sig.key_id,
            key_source: key.source.clone(),
            trusted_comment: sig.sig.trusted_comment().to_owned(),
            scope: key.scope(),
            index: key.index().cloned(),
        })
    }
}

/// The file name ending of a public key trusted only for apt bundles in a key directory
/// (the agent's `keys/`, where `stage` writes `key-<n>.apt.pub`).
pub const SCOPED_KEY_SUFFIX: &str = ".apt.pub";

/// The signature path of a bundle: `<bundle>.minisig`.
pub fn signature_path(bundle: &Path) -> PathBuf {
    let mut s = bundle.as_os_str().to_owned();
    s.push(SIGNATURE_SUFFIX);
    PathBuf::from(s)
}

#[cfg(feature = "sign")]
pub use signing::{SigningKey, generate_keypair};

#[cfg(feature = "sign")]
mod signing {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::Path;

    use super::{KeyError, KeyId, b64_line, decode_b64, read_small};

    /// A secret key loaded for signing.
    pub struct SigningKey {
        sk: minisign::SecretKey,
        pk: minisign::PublicKey,
        id: KeyId,
    }

    impl std::fmt::Debug for SigningKey {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("SigningKey")
                .field("id", &self.id)
                .finish_non_exhaustive()
        }
    }

    impl SigningKey {
        /// Loads a minisign secret key file (as written by `minisign -G`, `minisign -G -W` or
        /// [`generate_keypair`]). An encrypted key needs its password; none is ever prompted.
        pub fn from_file(path: &Path, password: Option<&str>) -> Result<SigningKey, KeyError> {
            let text = read_small(path)?;
            let what = path.display().to_string();
            let bin = decode_b64(b64_line(&text, &what, "secret key")?, &what, "secret key")?;
            if bin.len() < 4 {
                return Err(KeyError::Malformed {
                    what,
                    kind: "secret key",
                    why: "it is too short",
                });
            }
            let encrypted = bin[2..4] != [0, 0];
            let sk_err = |source| KeyError::SecretKey {
                path: path.to_owned(),
                source,
            };
            let sk = match (encrypted, password) {
                // minisign 0.11 (Debian 12) writes unencrypted keys (`-W`) with an all-zero
                // checksum, which the minisign crate rejects as corrupted; read the raw key
                // and check it below by signing with it instead.
                (false, _) => minisign::SecretKey::from_bytes(&bin).map_err(sk_err)?,
                (true, Some(pw)) => minisign::SecretKeyBox::from_string(&text)
                    .and_then(|b| b.into_secret_key(Some(pw.to_owned())))
                    .map_err(sk_err)?,
                (true, None) => {
                    return Err(KeyError::NeedPassword {
                        path: path.to_owned(),
                    });
                }
            };
            let pk = minisign::PublicKey::from_secret_key(&sk).map_err(KeyError::Minisign)?;
            // The secret half must produce signatures its public half verifies.
            minisign::sign(Some(&pk), &sk, &b"patchover key check"[..], None, None)
                .map_err(sk_err)?;
            let mut id = [0u8; 8];
            id.copy_from_slice(sk.keynum());
            Ok(SigningKey {
                sk,
                pk,
                id: KeyId(id),
            })
        }

        pub fn id(&self) -> KeyId {
            self.id
        }

        /// The public key, as a minisign `.pub` file's text.
        pub fn public_key_text(&self) -> Result<String, KeyError> {
            Ok(self.pk.to_box().map_err(KeyError::Minisign)?.into_string())
        }

        /// Signs `data`; returns the `.minisig` file's text. `trusted_comment` is signed too.
        pub fn sign(&self, data: &[u8], trusted_comment: &str) -> Result<String, KeyError> {
            let untrusted = format!("signature from patchover secret key {}", self.id);
            let sig = minisign::sign(
                Some(&self.pk),
                &self.sk,
                data,
                Some(trusted_comment),
                Some(&untrusted),
            )
            .map_err(KeyError::Minisign)?;
            Ok(sig.into_string())
        }
    }

    fn create(path: &Path, mode: u32, data: &[u8]) -> Result<(), KeyError> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(|source| {
                if source.kind() == std::io::ErrorKind::AlreadyExists {
                    KeyError::Exists {
                        path: path.to_owned(),
                    }
                } else {
                    KeyError::Write {
                        path: path.to_owned(),
                        source,
                    }
                }
            })?;
        f.write_all(data)
            .and_then(|()| f.sync_all())
            .map_err(|source| KeyError::Write {
                path: path.to_owned(),
                source,
            })
    }

    /// Makes a new key pair: the public key at `public` (mode 0644) and the secret key at
    /// `secret` (mode 0600), both in minisign's format. With a password the secret key is
    /// encrypted (scrypt), as `minisign -G` does; without, it is stored plain, as
    /// `minisign -G -W` does. Existing files are never overwritten.
    pub fn generate_keypair(
        public: &Path,
        secret: &Path,
        password: Option<&str>,
    ) -> Result<KeyId, KeyError> {
        for p in [public, secret] {
            if std::fs::symlink_metadata(p).is_ok() {
                return Err(KeyError::Exists { path: p.to_owned() });
            }
        }
        let kp = match password {
            Some(pw) => minisign::KeyPair::generate_encrypted_keypair(Some(pw.to_owned())),
            None => minisign::KeyPair::generate_unencrypted_keypair(),
        }
        .map_err(KeyError::Minisign)?;
        let mut id = [0u8; 8];
        id.copy_from_slice(kp.pk.keynum());
        let id = KeyId(id);
        let comment = if password.is_some() {
            "patchover encrypted secret key"
        } else {
            "patchover unencrypted secret key"
        };
        let sk_text = kp
            .sk
            .to_box(Some(comment))
            .map_err(KeyError::Minisign)?
            .into_string();
        let pk_text = kp.pk.to_box().map_err(KeyError::Minisign)?.into_string();
        create(secret, 0o600, sk_text.as_bytes())?;
        create(public, 0o644, pk_text.as_bytes())?;
        Ok(id)
    }
}

#[cfg(all(test, feature = "sign"))]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (p, s) = (dir.path().join("k.pub"), dir.path().join("k.key"));
        let id = generate_keypair(&p, &s, None).unwrap();
        assert!(matches!(
            generate_keypair(&p, &s, None),
            Err(KeyError::Exists { .. })
        ));
        let key = SigningKey::from_file(&s, None).unwrap();
        assert_eq!(key.id(), id);
        let sig = SignatureFile::parse(&key.sign(b"hello", "file:x").unwrap(), "sig").unwrap();
        assert_eq!(sig.key_id(), id);
        let trusted = TrustedKeys::new(vec![TrustedKey::from_file(&p).unwrap()]).unwrap();
        let info = trusted.verify(b"hello", &sig).unwrap();
        assert_eq!(info.trusted_comment, "file:x");
        assert!(matches!(
            trusted.verify(b"hellO", &sig),
            Err(SignatureError::Mismatch { .. })
        ));
        assert!(matches!(
            TrustedKeys::default().verify(b"hello", &sig),
            Err(SignatureError::NoTrustedKeys)
        ));
        let dup = TrustedKeys::new(vec![
            TrustedKey::from_file(&p).unwrap(),
            TrustedKey::from_file(&p).unwrap(),
        ]);
        assert!(matches!(dup, Err(KeyError::DuplicateKey { .. })));
    }

    #[test]
    fn malformed_keys_rejected() {
        assert!(TrustedKey::parse("", "x").is_err());
        assert!(TrustedKey::parse("untrusted comment: x\n!!!!\n", "x").is_err());
        assert!(TrustedKey::parse("untrusted comment: x\nRWQ=\n", "x").is_err());
        assert!(SignatureFile::parse("untrusted comment: x\nRWQ=\n", "x").is_err());
    }
}
