//! `from_apt` against a local signed archive on loopback and LC-like roots installed by the
//! host's real dpkg: the bundle it makes, and every refusal (nothing is written then).

use std::fs;
use std::path::Path;

use patchover_debian::fixture::{Pkg, TestArchive, build_deb, fake_root};
use patchover_debian::fromapt::{FromAptError, FromAptOptions, Outcome, from_apt};
use patchover_lcroot::LcRoot;

fn v1(name: &str) -> Pkg {
    let mut p = Pkg::new(name, "1.0-1");
    p.changelog = vec![("1.0-1".into(), "low".into(), "First release.".into())];
    p
}

fn v2(name: &str) -> Pkg {
    let mut p = Pkg::new(name, "1.0-2");
    p.changelog = vec![
        (
            "1.0-2".into(),
            "high".into(),
            format!("Fix CVE-2026-4242 in {name}."),
        ),
        ("1.0-1".into(), "low".into(), "First release.".into()),
    ];
    p
}

/// po-hello 1.0-2 needs the new po-hello-data; po-conf changes its conffile; po-rm's update
/// conflicts with po-old.
fn packages() -> Vec<Pkg> {
    let mut hello = v2("po-hello");
    hello.depends = Some("po-hello-data (>= 1.0-2)".into());
    let data = v2("po-hello-data");
    let mut conf = v2("po-conf");
    conf.files
        .push(("/etc/po-conf.conf".into(), "setting = 2\n".into()));
    conf.conffiles = vec!["/etc/po-conf.conf".into()];
    let mut rm = v2("po-rm");
    rm.conflicts = Some("po-old".into());
    vec![hello, data, conf, rm]
}

fn opts(lc: &str, a: &TestArchive, out: &Path) -> FromAptOptions {
    FromAptOptions {
        lc: lc.into(),
        sources: vec![a.source()],
        output: out.to_owned(),
        ..FromAptOptions::default()
    }
}

/// What from-apt writes is of the shape a key trusted only for apt bundles may sign
/// (`patchover_bundle::aptshape`): signed by such a key, it verifies.
fn assert_verifies_with_an_apt_scoped_key(bundle: &Path, archive: &TestArchive) {
    use patchover_bundle::{KeyScope, ScopedKey, TrustedKeys};
    let k = tempfile::tempdir().unwrap();
    let (public, secret) = (k.path().join("apt.pub"), k.path().join("apt.key"));
    patchover_bundle::keys::generate_keypair(&public, &secret, None).unwrap();
    let signing = patchover_bundle::keys::SigningKey::from_file(&secret, None).unwrap();
    patchover_bundle::create::sign_bundle(bundle, &signing).unwrap();
    let scoped = ScopedKey {
        path: public,
        scope: KeyScope::Apt,
        archive_keyrings: vec![archive.keyring.clone()],
    };
    let keys = TrustedKeys::from_config(&[], &[scoped]).unwrap();
    let v = patchover_bundle::verify_bundle(bundle, &keys, &patchover_bundle::Limits::default())
        .unwrap_or_else(|e| panic!("{}", patchover_core::error_chain(&e)));
    assert_eq!(v.signature().scope, Some(KeyScope::Apt));
    let _ = std::fs::remove_file(patchover_bundle::keys::signature_path(bundle));
}

#[test]
fn a_bundle_of_the_updates_and_every_refusal() {
    let archive = TestArchive::new("bookworm-security", &packages());
    let t = tempfile::tempdir().unwrap();
    let debs = t.path().join("debs");
    let hello1 = build_deb(&v1("po-hello"), &debs);

    // The update: po-hello-data (new dependency) before po-hello, both checked.
    let r1 = t.path().join("r1");
    fake_root(&r1, "bookworm", std::slice::from_ref(&hello1));
    let out = t.path().join("out/apt.tar.zst");
    fs::create_dir_all(out.parent().unwrap()).unwrap();
    let status_before = fs::read(r1.join("var/lib/dpkg/status")).unwrap();
    let o = from_apt(&LcRoot::open(&r1).unwrap(), &opts("lc1", &archive, &out)).unwrap();
    let Outcome::Written {
        category,
        severity,
        updates,
        title,
        ..
    } = o
    else {
        panic!("{o:?}")
    };
    assert_eq!((category.as_str(), severity.as_str()), ("security", "high"));
    let names: Vec<(&str, Option<&str>, &str)> = updates
        .iter()
        .map(|u| (u.package.as_str(), u.old.as_deref(), u.new.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("po-hello-data", None, "1.0-2"),
            ("po-hello", Some("1.0-1"), "1.0-2")
        ]
    );
    assert!(title.contains("po-hello"), "{title}");
    // Nothing changed in the LC's disk.
    assert_eq!(
        fs::read(r1.join("var/lib/dpkg/status")).unwrap(),
        status_before
    );
    let b = patchover_bundle::archive::read_archive(
        &fs::read(&out).unwrap(),
        &patchover_bundle::Limits::default(),
    )
    .unwrap();
    let m = &b.manifest;
    assert_verifies_with_an_apt_scoped_key(&out, &archive);
    let steps: Vec<String> = m.steps.iter().map(|s| s.describe()).collect();
    assert_eq!(
        steps,
        [
            "script check-space.sh",
            "dpkg -i po-hello-data_1.0-2.deb",
            "dpkg -i po-hello_1.0-2.deb"
        ]
    );
    // The standby checks its own disk first (docs/debian.md, "Disk space").
    let patchover_bundle::manifest::Step::Script { args, .. } = &m.steps[0] else {
        panic!("{:?}", m.steps[0])
    };
    let kib: u64 = args[0].parse().unwrap();
    assert!(kib > 0, "{args:?}");
    assert_eq!(m.checks.len(), 2);
    assert!(
        m.description
            .as_deref()
            .unwrap_or("")
            .contains("CVE-2026-4242")
    );
    // The payload holds real packages dpkg can install: into the root, as the LC's would.
    let unpacked = t.path().join("unpacked");
    let st = std::process::Command::new("tar")
        .args(["--zstd", "-xf"])
        .arg(&out)
        .arg("-C")
        .arg({
            fs::create_dir_all(&unpacked).unwrap();
            &unpacked
        })
        .status()
        .unwrap();
    assert!(st.success());
    let st = std::process::Command::new("dpkg")
        .arg(format!("--root={}", r1.display()))
        .args(["--force-not-root", "--force-script-chrootless", "-i"])
        .arg(unpacked.join("payload/po-hello-data_1.0-2.deb"))
        .arg(unpacked.join("payload/po-hello_1.0-2.deb"))
        .status()
        .unwrap();
    assert!(st.success());
    // Now up to date: nothing to do, and no bundle.
    let out2 = t.path().join("out/none.tar.zst");
    let o = from_apt(&LcRoot::open(&r1).unwrap(), &opts("lc1", &archive, &out2)).unwrap();
    assert!(matches!(o, Outcome::NothingToDo { .. }), "{o:?}");
    assert!(!out2.exists());

    // A conffile the LC changed, which the update changes too.
    let mut conf1 = v1("po-conf");
    conf1
        .files
        .push(("/etc/po-conf.conf".into(), "setting = 1\n".into()));
    conf1.conffiles = vec!["/etc/po-conf.conf".into()];
    let r2 = t.path().join("r2");
    fake_root(&r2, "bookworm", &[build_deb(&conf1, &debs)]);
    fs::write(r2.join("etc/po-conf.conf"), "setting = mine\n").unwrap();
    let e = from_apt(&LcRoot::open(&r2).unwrap(), &opts("lc2", &archive, &out2)).unwrap_err();
    assert!(
        matches!(&e, FromAptError::ConffilePrompt { package, path, .. } if package == "po-conf" && path == "/etc/po-conf.conf"),
        "{e}"
    );
    assert!(!out2.exists());

    // An update that needs a removal.
    let r3 = t.path().join("r3");
    fake_root(
        &r3,
        "bookworm",
        &[
            build_deb(&v1("po-rm"), &debs),
            build_deb(&Pkg::new("po-old", "1.0"), &debs),
        ],
    );
    let mut o3 = opts("lc3", &archive, &out2);
    o3.packages = vec!["po-rm".into()];
    let e = from_apt(&LcRoot::open(&r3).unwrap(), &o3).unwrap_err();
    assert!(
        matches!(&e, FromAptError::Removal { packages } if packages == &["po-old"]),
        "{e}"
    );
    assert!(e.is_bad_input());
    o3.packages = vec!["po-absent".into()];
    let e = from_apt(&LcRoot::open(&r3).unwrap(), &o3).unwrap_err();
    assert!(
        e.to_string().contains("po-absent is not installed on lc3"),
        "{e}"
    );

    // Another suite; no dpkg status.
    let r4 = t.path().join("r4");
    fake_root(&r4, "trixie", &[]);
    let e = from_apt(&LcRoot::open(&r4).unwrap(), &opts("lc4", &archive, &out2)).unwrap_err();
    assert!(matches!(e, FromAptError::OtherSuite { .. }), "{e}");
    fs::remove_file(r4.join("var/lib/dpkg/status")).unwrap();
    let e = from_apt(&LcRoot::open(&r4).unwrap(), &opts("lc4", &archive, &out2)).unwrap_err();
    assert!(format!("{:?}", e).contains("Missing"), "{e:?}");

    // The archive unreachable, then signed by a key apt does not trust: the error names the
    // source; nothing is written.
    let mut dead = archive.source();
    dead.uri = "http://127.0.0.1:9/".into();
    let mut od = opts("lc1", &archive, &out2);
    od.sources = vec![dead];
    let r5 = t.path().join("r5");
    fake_root(&r5, "bookworm", &[hello1]);
    let e = from_apt(&LcRoot::open(&r5).unwrap(), &od).unwrap_err();
    let chain = format!(
        "{e}: {}",
        std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(chain.contains("http://127.0.0.1:9/"), "{chain}");
    archive.resign_with_another_key();
    let e = from_apt(&LcRoot::open(&r5).unwrap(), &opts("lc1", &archive, &out2)).unwrap_err();
    let chain = format!(
        "{e}: {}",
        std::error::Error::source(&e)
            .map(|s| s.to_string())
            .unwrap_or_default()
    );
    assert!(
        chain.contains(&format!("127.0.0.1:{}", archive.port)),
        "{chain}"
    );
    assert!(
        chain.contains("NO_PUBKEY") || chain.contains("not signed") || chain.contains("signature"),
        "{chain}"
    );
    assert!(!out2.exists());
    let leftovers: Vec<_> = fs::read_dir(t.path().join("out"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
}
