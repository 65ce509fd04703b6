//! Bundles end to end: created, signed (by patchover and by Debian's `minisign`), verified,
//! tampered with, and every bad input of issue 5 rejected with nothing changed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Key, chain, manifest, signed_bundle, snapshot, source_dir};
use patchover_bundle::archive::ArchiveError;
use patchover_bundle::create::{CreateError, create_bundle, sign_bundle};
use patchover_bundle::keys::{SignatureError, SigningKey, signature_path};
use patchover_bundle::verify::{inspect_bundle, verify_bundle};
use patchover_bundle::{Limits, Sha256, TrustedKey, TrustedKeys, VerifyError};

const SCRIPT_STEP: &str = "[[step]]\nkind = \"script\"\nfile = \"run.sh\"\n";

fn good(dir: &Path, key: &Key) -> PathBuf {
    signed_bundle(
        dir,
        "good.tar.zst",
        &manifest("good-1", SCRIPT_STEP, ""),
        &[
            ("run.sh", b"echo hello\n", 0o755),
            ("data/blob", &[7u8; 5000], 0o644),
        ],
        key,
    )
}

fn minisign_available() -> bool {
    Command::new("minisign")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn created_signed_bundle_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let key = Key::new(dir.path(), "k");
    let path = good(dir.path(), &key);
    let v = verify_bundle(&path, &key.trusted(), &Limits::default()).unwrap();
    assert_eq!(v.id(), "good-1");
    assert_eq!(v.sha256(), Sha256::of(&std::fs::read(&path).unwrap()));
    assert_eq!(v.key_id(), key.signing.id());
    assert!(v.signature().trusted_comment.contains("file:good.tar.zst"));
    assert!(
        v.signature()
            .trusted_comment
            .contains(&v.sha256().to_string())
    );
    let i = inspect_bundle(&path, &Limits::default()).unwrap();
    assert_eq!(i.signed_by, Some(key.signing.id()));
    let manifest_len = manifest("good-1", SCRIPT_STEP, "").len() as u64;
    assert_eq!(i.archive.unpacked_bytes, manifest_len + 11 + 5000);
    // The archive is a plain tar.zst an operator can list with standard tools.
    let out = Command::new("tar")
        .arg("--zstd")
        .arg("-tf")
        .arg(&path)
        .output();
    if let Ok(out) = out
        && out.status.success()
    {
        let list = String::from_utf8_lossy(&out.stdout);
        assert!(
            list.contains("manifest.toml") && list.contains("payload/run.sh"),
            "{list}"
        );
    }
}

#[test]
fn tampered_payload_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let key = Key::new(dir.path(), "k");
    let path = good(dir.path(), &key);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let e = verify_bundle(&path, &key.trusted(), &Limits::default()).unwrap_err();
    assert!(
        matches!(
            &e,
            VerifyError::Signature {
                source: SignatureError::Mismatch { .. },
                ..
            }
        ),
        "{}",
        chain(&e)
    );
    assert!(
        chain(&e).contains("changed after it was signed"),
        "{}",
        chain(&e)
    );
}

#[test]
fn wrong_unknown_and_missing_keys_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let key = Key::new(dir.path(), "k");
    let other = Key::new(dir.path(), "other");
    let path = good(dir.path(), &key);

    // Signed by a key that is not trusted.
    let e = verify_bundle(&path, &other.trusted(), &Limits::default()).unwrap_err();
    let msg = chain(&e);
    assert!(
        matches!(
            &e,
            VerifyError::Signature {
                source: SignatureError::UnknownKey { .. },
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains(&key.signing.id().to_string()) && msg.contains("trusted_keys"),
        "{msg}"
    );

    // No trusted keys at all.
    let e = verify_bundle(&path, &TrustedKeys::default(), &Limits::default()).unwrap_err();
    assert!(matches!(
        &e,
        VerifyError::Signature {
            source: SignatureError::NoTrustedKeys,
            ..
        }
    ));

    // A valid signature of another bundle, placed next to this one.
    let second = signed_bundle(
        dir.path(),
        "second.tar.zst",
        &manifest("second", SCRIPT_STEP, ""),
        &[("run.sh", b"echo 2\n", 0o755)],
        &key,
    );
    std::fs::copy(signature_path(&second), signature_path(&path)).unwrap();
    let e = verify_bundle(&path, &key.trusted(), &Limits::default()).unwrap_err();
    assert!(matches!(
        &e,
        VerifyError::Signature {
            source: SignatureError::Mismatch { .. },
            ..
        }
    ));

    // No signature file.
    std::fs::remove_file(signature_path(&path)).unwrap();
    let e = verify_bundle(&path, &key.trusted(), &Limits::default()).unwrap_err();
    assert!(
        matches!(
            &e,
            VerifyError::Signature {
                source: SignatureError::Missing { .. },
                ..
            }
        ),
        "{}",
        chain(&e)
    );

    // A signature file that is garbage.
    std::fs::write(signature_path(&path), "untrusted comment: x\nnot base64!\n").unwrap();
    let e = verify_bundle(&path, &key.trusted(), &Limits::default()).unwrap_err();
    assert!(matches!(
        &e,
        VerifyError::Signature {
            source: SignatureError::Unreadable(_),
            ..
        }
    ));
}

#[test]
fn minisign_tool_signature_verifies_and_ours_verify_with_minisign() {
    assert!(
        minisign_available(),
        "install Debian's minisign (apt-get install minisign)"
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A key made by the minisign tool (-W: no password, so no terminal is needed).
    let st = Command::new("minisign")
        .args(["-G", "-W", "-p"])
        .arg(d.join("tool.pub"))
        .arg("-s")
        .arg(d.join("tool.key"))
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let src = source_dir(
        d,
        &manifest("tool-signed", SCRIPT_STEP, ""),
        &[("run.sh", b"true\n", 0o755)],
    );
    let bundle = d.join("b.tar.zst");
    create_bundle(&src, &bundle).unwrap();
    let st = Command::new("minisign")
        .arg("-S")
        .arg("-s")
        .arg(d.join("tool.key"))
        .arg("-m")
        .arg(&bundle)
        .arg("-t")
        .arg("signed by the minisign tool")
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let trusted =
        TrustedKeys::new(vec![TrustedKey::from_file(&d.join("tool.pub")).unwrap()]).unwrap();
    let v = verify_bundle(&bundle, &trusted, &Limits::default()).unwrap();
    assert_eq!(v.signature().trusted_comment, "signed by the minisign tool");

    // The tool's unencrypted secret key also loads in patchover, and patchover's signature
    // verifies with the tool.
    let tool_key = SigningKey::from_file(&d.join("tool.key"), None).unwrap();
    assert_eq!(tool_key.id(), v.key_id());
    sign_bundle(&bundle, &tool_key).unwrap();
    let st = Command::new("minisign")
        .arg("-V")
        .arg("-p")
        .arg(d.join("tool.pub"))
        .arg("-m")
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );

    // A key pair made by patchover: the tool verifies its signature too.
    let ours = Key::new(d, "ours");
    sign_bundle(&bundle, &ours.signing).unwrap();
    let st = Command::new("minisign")
        .arg("-V")
        .arg("-p")
        .arg(&ours.public)
        .arg("-m")
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    // …and rejects a tampered file.
    let mut bytes = std::fs::read(&bundle).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&bundle, &bytes).unwrap();
    let st = Command::new("minisign")
        .arg("-V")
        .arg("-p")
        .arg(&ours.public)
        .arg("-m")
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(!st.status.success());
}

/// Each scrypt derivation (keygen, load) takes a few seconds in a debug build.
#[test]
fn encrypted_secret_key_needs_its_password() {
    let dir = tempfile::tempdir().unwrap();
    let (p, s) = (dir.path().join("e.pub"), dir.path().join("e.key"));
    let id = patchover_bundle::keys::generate_keypair(&p, &s, Some("hunter2")).unwrap();
    assert!(matches!(
        SigningKey::from_file(&s, None),
        Err(patchover_bundle::KeyError::NeedPassword { .. })
    ));
    // (A wrong password is rejected by the same scrypt + checksum path; not run here because
    // each scrypt takes seconds in an unoptimized test build.)
    assert_eq!(SigningKey::from_file(&s, Some("hunter2")).unwrap().id(), id);
}

// ---- bad archives, signed by a trusted key so that only the archive checks stand between
// ---- them and the LC.

struct Raw<'a> {
    path: &'a [u8],
    kind: tar::EntryType,
    data: &'a [u8],
    link: &'a [u8],
}

fn file<'a>(path: &'a str, data: &'a [u8]) -> Raw<'a> {
    Raw {
        path: path.as_bytes(),
        kind: tar::EntryType::Regular,
        data,
        link: b"",
    }
}

fn tar_zst(entries: &[Raw<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..e.path.len()].copy_from_slice(e.path);
        h.as_old_mut().linkname[..e.link.len()].copy_from_slice(e.link);
        h.set_entry_type(e.kind);
        h.set_mode(0o644);
        h.set_size(e.data.len() as u64);
        h.set_cksum();
        b.append(&h, e.data).unwrap();
    }
    zstd::encode_all(&b.into_inner().unwrap()[..], 3).unwrap()
}

/// Writes `bytes` as a bundle signed by `key` (bypassing `sign_bundle`'s own validation) and
/// verifies it; returns the error.
fn verify_signed_bytes(dir: &Path, key: &Key, name: &str, bytes: &[u8]) -> VerifyError {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    std::fs::write(
        signature_path(&path),
        key.signing.sign(bytes, "test").unwrap(),
    )
    .unwrap();
    let before = snapshot(dir);
    let e = verify_bundle(&path, &key.trusted(), &Limits::default()).unwrap_err();
    assert_eq!(snapshot(dir), before, "{name}: verification changed files");
    e
}

fn archive_err(e: &VerifyError) -> &ArchiveError {
    match e {
        VerifyError::Archive { source, .. } => source,
        other => panic!("expected an archive error, got {}", chain(other)),
    }
}

#[test]
fn hostile_archives_are_rejected_even_when_signed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = Key::new(d, "k");
    let m = manifest("evil", SCRIPT_STEP, "");
    let base = |extra: Raw<'static>| -> Vec<u8> {
        let m: &'static str = Box::leak(m.clone().into_boxed_str());
        tar_zst(&[
            file("manifest.toml", m.as_bytes()),
            file("payload/run.sh", b"true\n"),
            extra,
        ])
    };
    let sym = |path: &'static str, target: &'static str| Raw {
        path: path.as_bytes(),
        kind: tar::EntryType::Symlink,
        data: b"",
        link: target.as_bytes(),
    };
    let special = |kind| Raw {
        path: b"payload/dev",
        kind,
        data: b"",
        link: b"",
    };

    type Case = (&'static str, Vec<u8>, fn(&ArchiveError) -> bool);
    let cases: Vec<Case> = vec![
        (
            "dotdot",
            base(file("payload/../../../tmp/pwned", b"x")),
            |e| matches!(e, ArchiveError::UnsafePath { .. }),
        ),
        ("absolute", base(file("/tmp/pwned", b"x")), |e| {
            matches!(e, ArchiveError::UnsafePath { .. })
        }),
        ("symlink-abs", base(sym("payload/etc", "/etc")), |e| {
            matches!(e, ArchiveError::SymlinkEscapes { .. })
        }),
        ("symlink-up", base(sym("payload/up", "../../..")), |e| {
            matches!(e, ArchiveError::SymlinkEscapes { .. })
        }),
        (
            "hardlink",
            base(Raw {
                kind: tar::EntryType::Link,
                link: b"/etc/shadow",
                ..file("payload/h", b"")
            }),
            |e| matches!(e, ArchiveError::HardLink { .. }),
        ),
        ("chardev", base(special(tar::EntryType::Char)), |e| {
            matches!(e, ArchiveError::ForbiddenType { .. })
        }),
        ("blockdev", base(special(tar::EntryType::Block)), |e| {
            matches!(e, ArchiveError::ForbiddenType { .. })
        }),
        ("fifo", base(special(tar::EntryType::Fifo)), |e| {
            matches!(e, ArchiveError::ForbiddenType { .. })
        }),
        (
            "huge-manifest",
            tar_zst(&[file(
                "manifest.toml",
                Box::leak(vec![b'#'; 4 << 20].into_boxed_slice()),
            )]),
            |e| matches!(e, ArchiveError::ManifestTooLarge { .. }),
        ),
        (
            "unknown-category",
            tar_zst(&[
                file(
                    "manifest.toml",
                    Box::leak(
                        m.replace("\"security\"", "\"cosmetic\"")
                            .into_bytes()
                            .into_boxed_slice(),
                    ),
                ),
                file("payload/run.sh", b"true\n"),
            ]),
            |e| matches!(e, ArchiveError::Manifest(_)),
        ),
        (
            "unknown-step",
            tar_zst(&[
                file(
                    "manifest.toml",
                    Box::leak(
                        m.replace("\"script\"", "\"rpm\"")
                            .into_bytes()
                            .into_boxed_slice(),
                    ),
                ),
                file("payload/run.sh", b"true\n"),
            ]),
            |e| matches!(e, ArchiveError::Manifest(_)),
        ),
        (
            "no-manifest",
            tar_zst(&[file("payload/run.sh", b"true\n")]),
            |e| matches!(e, ArchiveError::NoManifest),
        ),
        ("empty", Vec::new(), |e| matches!(e, ArchiveError::Empty)),
        ("plain-tar", b"manifest.toml\0\0\0 not zstd".to_vec(), |e| {
            matches!(e, ArchiveError::NotZstd)
        }),
    ];
    for (name, bytes, want) in cases {
        let e = verify_signed_bytes(d, &key, name, &bytes);
        let a = archive_err(&e);
        assert!(want(a), "{name}: unexpected error {}", chain(&e));
        assert!(!chain(&e).is_empty());
    }

    // A truncated bundle whose truncated bytes were signed (so only the reader catches it).
    let full = std::fs::read(good(d, &key)).unwrap();
    for cut in [full.len() / 3, full.len() - 3] {
        let e = verify_signed_bytes(d, &key, &format!("cut-{cut}"), &full[..cut]);
        assert!(
            matches!(archive_err(&e), ArchiveError::Corrupt(_)),
            "{}",
            chain(&e)
        );
    }
}

#[test]
fn create_refuses_bad_sources_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A step naming a payload file that is not there.
    let src = source_dir(d, &manifest("m", SCRIPT_STEP, ""), &[]);
    let out = d.join("out.tar.zst");
    let e = create_bundle(&src, &out).unwrap_err();
    assert!(
        matches!(
            e,
            CreateError::Invalid(ArchiveError::MissingPayload { step: 0, .. })
        ),
        "{}",
        chain(&e)
    );
    assert!(!out.exists());
    // A bad manifest is reported with its field.
    let src = source_dir(
        d,
        &manifest("m", "[[step]]\nkind = \"script\"\nfile = \"../x\"\n", ""),
        &[],
    );
    let e = create_bundle(&src, &out).unwrap_err();
    assert!(chain(&e).contains("step[0].file"), "{}", chain(&e));
    assert!(!out.exists());
    // A fifo in the payload cannot be packed.
    let src = source_dir(
        d,
        &manifest("m", SCRIPT_STEP, ""),
        &[("run.sh", b"true\n", 0o755)],
    );
    let fifo = src.join("payload/fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let e = create_bundle(&src, &out).unwrap_err();
    assert!(matches!(e, CreateError::Pack { .. }), "{}", chain(&e));
    assert!(!out.exists());
}

#[test]
fn duplicate_trusted_key_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let key = Key::new(dir.path(), "k");
    let copy = dir.path().join("copy.pub");
    std::fs::copy(&key.public, &copy).unwrap();
    let e = TrustedKeys::from_files(&[key.public.clone(), copy]).unwrap_err();
    assert!(e.to_string().contains("listed twice"), "{e}");
}

/// The link whose `..`s cancel textually in issue 22's chain.
const R22_EVIL: &str = "d1/d2/d3/d4/d5/d6/up/../../../../../../../etc/passwd";

/// A source directory holding issue 22's chain: `payload/d1/…/d6/up -> ../../../../..`
/// (which leads to `payload/d1`) and `payload/evil -> R22_EVIL`.
fn r22_source(d: &Path, m: &str) -> PathBuf {
    let src = source_dir(d, m, &[("run.sh", b"true\n", 0o755)]);
    let six = src.join("payload/d1/d2/d3/d4/d5/d6");
    std::fs::create_dir_all(&six).unwrap();
    std::os::unix::fs::symlink("../../../../..", six.join("up")).unwrap();
    std::os::unix::fs::symlink(R22_EVIL, src.join("payload/evil")).unwrap();
    src
}

/// The refusal names the entry, where it resolves and through which link.
fn assert_r22_refusal(e: &ArchiveError) {
    let ArchiveError::SymlinkEscapes { path, target, .. } = e else {
        panic!("expected the chain to be refused, got {e}");
    };
    assert_eq!((path.as_str(), target.as_str()), ("payload/evil", R22_EVIL));
    let msg = e.to_string();
    for want in [
        "climbs above payload/",
        "\"../../../../../etc/passwd\"",
        "following payload/d1/d2/d3/d4/d5/d6/up -> payload/d1",
        "point the link at a path in payload/",
    ] {
        assert!(msg.contains(want), "{want:?} not in: {msg}");
    }
}

/// Issue 22, item 1 (r22): a signed bundle whose `evil` link reached `/etc/passwd` once
/// unpacked passed `create`, `sign` and `verify` (the check cancelled `..` textually). The
/// chain is now judged where it resolves: `create` writes nothing, a bundle holding it that
/// was signed before the fix (by hand here, with the trusted key) fails `sign` and `verify`,
/// and extraction refuses it before making its directory.
#[test]
fn r22_a_link_chain_out_of_payload_is_refused_by_create_sign_verify_and_extraction() {
    use patchover_bundle::archive::{extract_archive, write_archive};
    use patchover_bundle::create::SignBundleError;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = Key::new(d, "k");
    let m = manifest("chain", SCRIPT_STEP, "");
    let src = r22_source(d, &m);

    let out = d.join("made.tar.zst");
    match create_bundle(&src, &out) {
        Err(CreateError::Invalid(e)) => assert_r22_refusal(&e),
        other => panic!("create: {other:?}"),
    }
    assert!(!out.exists(), "create wrote the bundle");

    // The same tree packed without any check, then signed: what an older patchover made.
    let mut bytes = Vec::new();
    write_archive(m.as_bytes(), Some(&src.join("payload")), &mut bytes).unwrap();
    assert_r22_refusal(archive_err(&verify_signed_bytes(
        d,
        &key,
        "old.tar.zst",
        &bytes,
    )));
    let before = snapshot(d);
    match sign_bundle(&d.join("old.tar.zst"), &key.signing) {
        Err(SignBundleError::Invalid { source, .. }) => assert_r22_refusal(&source),
        other => panic!("sign: {other:?}"),
    }
    assert_eq!(snapshot(d), before, "sign changed files");

    let dest = d.join("unpacked");
    assert_r22_refusal(&extract_archive(&bytes, &dest, &Limits::default()).unwrap_err());
    assert!(!dest.exists(), "extraction made its directory");
}

/// Links that stay inside payload/ still work end to end, also through other links and with
/// `..` after a link; a loop of links is refused.
#[test]
fn relative_links_inside_payload_still_work_and_loops_are_refused() {
    use patchover_bundle::archive::extract_archive;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = Key::new(d, "k");
    let m = manifest("links", SCRIPT_STEP, "");
    let src = source_dir(
        d,
        &m,
        &[("run.sh", b"true\n", 0o755), ("lib/data", b"data\n", 0o644)],
    );
    let p = src.join("payload");
    for (link, target) in [
        ("lib/run", "../run.sh"),
        ("via-link", "lib/run"),
        ("sub/up", "../lib"),
        ("after-dotdot", "sub/up/../lib/data"),
        ("sub/dir", "../lib"),
    ] {
        std::fs::create_dir_all(p.join(link).parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, p.join(link)).unwrap();
    }
    let out = d.join("links.tar.zst");
    create_bundle(&src, &out).unwrap();
    sign_bundle(&out, &key.signing).unwrap();
    verify_bundle(&out, &key.trusted(), &Limits::default()).unwrap();
    let dest = d.join("unpacked");
    extract_archive(&std::fs::read(&out).unwrap(), &dest, &Limits::default()).unwrap();
    let read = |rel: &str| std::fs::read(dest.join("payload").join(rel)).unwrap();
    assert_eq!(read("via-link"), b"true\n");
    assert_eq!(read("after-dotdot"), b"data\n");
    assert_eq!(read("sub/dir/data"), b"data\n");

    let src = source_dir(d, &m, &[("run.sh", b"true\n", 0o755)]);
    std::os::unix::fs::symlink("b", src.join("payload/a")).unwrap();
    std::os::unix::fs::symlink("a/x", src.join("payload/b")).unwrap();
    let e = create_bundle(&src, &d.join("loop.tar.zst")).unwrap_err();
    assert!(
        matches!(
            &e,
            CreateError::Invalid(ArchiveError::SymlinkEscapes { .. })
        ) && chain(&e).contains("loops back to itself"),
        "{}",
        chain(&e)
    );
}
