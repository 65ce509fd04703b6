//! Helpers shared by the integration tests: keys, bundle directories, signed bundles.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use patchover_bundle::create::{create_bundle, sign_bundle};
use patchover_bundle::keys::{SigningKey, generate_keypair};
use patchover_bundle::{TrustedKey, TrustedKeys};

pub struct Key {
    pub public: PathBuf,
    pub secret: PathBuf,
    pub signing: SigningKey,
}

impl Key {
    pub fn new(dir: &Path, name: &str) -> Key {
        let public = dir.join(format!("{name}.pub"));
        let secret = dir.join(format!("{name}.key"));
        generate_keypair(&public, &secret, None).unwrap();
        let signing = SigningKey::from_file(&secret, None).unwrap();
        Key {
            public,
            secret,
            signing,
        }
    }

    pub fn trusted(&self) -> TrustedKeys {
        TrustedKeys::new(vec![TrustedKey::from_file(&self.public).unwrap()]).unwrap()
    }
}

pub fn manifest(id: &str, steps: &str, checks: &str) -> String {
    format!(
        r#"format = 1
id = "{id}"
title = "test bundle {id}"
category = "security"
severity = "high"
published = 2026-11-20T10:00:00Z

{steps}
{checks}
"#
    )
}

/// A bundle source directory with `manifest` and payload `files` (path, content, mode).
pub fn source_dir(base: &Path, manifest: &str, files: &[(&str, &[u8], u32)]) -> PathBuf {
    let n = std::fs::read_dir(base).map(|d| d.count()).unwrap_or(0);
    let dir = base.join(format!("src-{n}"));
    std::fs::create_dir_all(dir.join("payload")).unwrap();
    std::fs::write(dir.join("manifest.toml"), manifest).unwrap();
    for (path, data, mode) in files {
        let p = dir.join("payload").join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).unwrap();
    }
    dir
}

/// Creates and signs a bundle at `<base>/<name>`.
pub fn signed_bundle(
    base: &Path,
    name: &str,
    manifest: &str,
    files: &[(&str, &[u8], u32)],
    key: &Key,
) -> PathBuf {
    let src = source_dir(base, manifest, files);
    let out = base.join(name);
    create_bundle(&src, &out).unwrap();
    sign_bundle(&out, &key.signing).unwrap();
    out
}

/// The error and its whole source chain, one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Every path below `dir` with its content hash, to prove nothing changed.
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                todo.push(p.clone());
                out.push((p, Vec::new()));
            } else if md.file_type().is_symlink() {
                out.push((
                    p.clone(),
                    std::fs::read_link(&p)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                ));
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}
