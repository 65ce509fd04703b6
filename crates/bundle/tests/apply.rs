//! The apply engine on a real directory tree with the real `patch`, `/bin/sh` and `dpkg`:
//! bundles applied in order, a failing bundle reported with its output and stopping the ones
//! after it, nothing changed by a step that fails its pre-check, and post-checks.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Key, manifest, signed_bundle, snapshot};
use patchover_bundle::apply::{ApplyOptions, BundleStatus, apply_bundles, run_post_checks};
use patchover_bundle::table::{
    read_table, stage, verification_failure_results, verify_marked, write_table,
};
use patchover_bundle::{Limits, Sha256, TrustedKeys, VerifiedBundle, verify_bundle};

struct Lab {
    _dir: tempfile::TempDir,
    base: PathBuf,
    root: PathBuf,
    key: Key,
}

impl Lab {
    fn new() -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_path_buf();
        let root = base.join("root");
        std::fs::create_dir_all(root.join("srv/app")).unwrap();
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("srv/app/greeting.txt"), "hello\n").unwrap();
        std::fs::write(root.join("srv/app/other.txt"), "one\ntwo\n").unwrap();
        std::fs::write(root.join("usr/bin/tool"), "#!/bin/sh\necho tool v1\n").unwrap();
        std::fs::set_permissions(
            root.join("usr/bin/tool"),
            std::fs::Permissions::from_mode(0o750),
        )
        .unwrap();
        let keys = base.join("keys");
        std::fs::create_dir_all(&keys).unwrap();
        let key = Key::new(&keys, "k");
        Lab {
            _dir: dir,
            base,
            root,
            key,
        }
    }

    fn bundle(
        &self,
        id: &str,
        steps: &str,
        checks: &str,
        files: &[(&str, &[u8], u32)],
    ) -> VerifiedBundle {
        let out_dir = self.base.join("bundles");
        std::fs::create_dir_all(&out_dir).unwrap();
        let path = signed_bundle(
            &out_dir,
            &format!("{id}.tar.zst"),
            &manifest(id, steps, checks),
            files,
            &self.key,
        );
        verify_bundle(&path, &self.key.trusted(), &Limits::default()).unwrap()
    }

    fn opts(&self) -> ApplyOptions {
        ApplyOptions::new(&self.root, self.base.join("work"))
    }

    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.root.join(rel)).unwrap_or_default()
    }
}

const GREETING_DIFF: &[u8] =
    b"--- a/greeting.txt\n+++ b/greeting.txt\n@@ -1 +1 @@\n-hello\n+hello, patched\n";
const TOOL_V2: &[u8] = b"#!/bin/sh\necho tool v2\n";

fn script(file: &str) -> String {
    format!("[[step]]\nkind = \"script\"\nfile = \"{file}\"\n")
}

#[test]
fn two_bundles_apply_in_order_and_post_checks_pass() {
    let lab = Lab::new();
    let old_tool = Sha256::of(b"#!/bin/sh\necho tool v1\n");
    let first = lab.bundle(
        "first",
        &format!(
            "[[step]]\nkind = \"patch\"\nfile = \"app.diff\"\ndir = \"/srv/app\"\n\n\
             [[step]]\nkind = \"replace\"\npath = \"/usr/bin/tool\"\nfile = \"tool\"\nold_sha256 = \"{old_tool}\"\n\n{}",
            script("log.sh")
        ),
        &format!(
            "[[check]]\nkind = \"file_hash\"\npath = \"/usr/bin/tool\"\nsha256 = \"{}\"\n\n\
             [[check]]\nkind = \"command_output\"\ncommand = [\"/bin/sh\", \"-c\", \"cat srv/app/greeting.txt\"]\ncontains = \"patched\"\n",
            Sha256::of(TOOL_V2)
        ),
        &[
            ("app.diff", GREETING_DIFF, 0o644),
            ("tool", TOOL_V2, 0o644),
            ("log.sh", b"echo first >> \"$PATCHOVER_ROOT/etc/patch.log\"\necho first ran\n", 0o755),
        ],
    );
    let second = lab.bundle(
        "second",
        &script("log.sh"),
        "[[check]]\nkind = \"command_output\"\ncommand = [\"/bin/cat\", \"etc/patch.log\"]\ncontains = \"second\"\n",
        &[(
            "log.sh",
            b"test -f \"$PATCHOVER_ROOT/etc/patch.log\" || { echo first did not run >&2; exit 9; }\n\
              echo second >> \"$PATCHOVER_ROOT/etc/patch.log\"\necho second ran in $PWD\n",
            0o755,
        )],
    );
    let mut seen = Vec::new();
    let report = apply_bundles(&lab.opts(), &[first.clone(), second.clone()], &mut |r| {
        seen.push(r.id.clone())
    });
    assert!(report.all_ok(), "{report:#?}");
    assert_eq!(seen, ["first", "second"]);
    assert_eq!(lab.read("srv/app/greeting.txt"), "hello, patched\n");
    assert_eq!(lab.read("usr/bin/tool"), "#!/bin/sh\necho tool v2\n");
    // The replaced file kept its mode.
    let mode = std::fs::metadata(lab.root.join("usr/bin/tool"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o750);
    assert_eq!(lab.read("etc/patch.log"), "first\nsecond\n");
    let r1 = &report.bundles[0];
    assert_eq!(r1.status, BundleStatus::Ok);
    assert!(r1.output.contains("first ran"), "{}", r1.output);
    assert!(r1.output.contains("replaced usr/bin/tool"), "{}", r1.output);
    assert_eq!(r1.step, None);
    assert_eq!(r1.exit_code, Some(0));
    assert!(
        report.bundles[1].output.contains("second ran in"),
        "{}",
        report.bundles[1].output
    );
    // Work dirs of successful bundles are removed.
    assert!(!lab.base.join("work/first").exists());

    let checks = run_post_checks(&lab.root, [first.manifest(), second.manifest()]);
    assert!(checks.passed, "{checks:#?}");
    assert_eq!(checks.checks.len(), 3);

    // The report is JSON-serializable and reads back (it crosses the agent channel).
    let json = serde_json::to_string(&report).unwrap();
    let back: patchover_bundle::ApplyReport = serde_json::from_str(&json).unwrap();
    assert_eq!(back, report);
}

#[test]
fn failing_second_bundle_is_reported_and_stops_the_third() {
    let lab = Lab::new();
    let ok = lab.bundle(
        "ok-1",
        &script("a.sh"),
        "",
        &[("a.sh", b"echo one > \"$PATCHOVER_ROOT/etc/one\"\n", 0o755)],
    );
    let bad = lab.bundle(
        "bad-2",
        &format!("{}\n{}", script("fine.sh"), script("fail.sh")),
        "",
        &[
            ("fine.sh", b"echo step zero fine\n", 0o755),
            (
                "fail.sh",
                b"echo about to fail\necho 'boom: disk on fire' >&2\nexit 7\n",
                0o755,
            ),
        ],
    );
    let third = lab.bundle(
        "third-3",
        &script("c.sh"),
        "",
        &[(
            "c.sh",
            b"echo three > \"$PATCHOVER_ROOT/etc/three\"\n",
            0o755,
        )],
    );
    let mut calls = 0;
    let report = apply_bundles(&lab.opts(), &[ok, bad, third], &mut |_| calls += 1);
    assert_eq!(calls, 3);
    let [a, b, c] = &report.bundles[..] else {
        panic!("{report:#?}")
    };
    assert_eq!(a.status, BundleStatus::Ok);
    assert_eq!(b.status, BundleStatus::Failed);
    assert_eq!(b.step, Some(1));
    assert_eq!(b.exit_code, Some(7));
    assert!(b.output.contains("step zero fine"), "{}", b.output);
    assert!(
        b.output.contains("about to fail") && b.output.contains("boom: disk on fire"),
        "{}",
        b.output
    );
    let err = b.error.as_deref().unwrap();
    assert!(
        err.contains("step 1") && err.contains("exited with status 7"),
        "{err}"
    );
    assert_eq!(c.status, BundleStatus::Skipped);
    assert!(c.error.as_deref().unwrap().contains("bad-2"), "{c:?}");
    assert_eq!(report.failed().unwrap().id, "bad-2");
    assert!(!report.all_ok());
    assert_eq!(lab.read("etc/one"), "one\n");
    assert!(!lab.root.join("etc/three").exists(), "the third bundle ran");
    // The failed bundle stays unpacked for a look.
    assert!(lab.base.join("work/bad-2/payload/fail.sh").exists());
}

#[test]
fn diff_that_does_not_apply_changes_nothing() {
    let lab = Lab::new();
    // Two files: the first hunk would apply, the second does not.
    let diff = b"--- a/greeting.txt\n+++ b/greeting.txt\n@@ -1 +1 @@\n-hello\n+hello, patched\n\
                 --- a/other.txt\n+++ b/other.txt\n@@ -1,2 +1,2 @@\n-uno\n+eins\n two\n";
    let b = lab.bundle(
        "bad-diff",
        "[[step]]\nkind = \"patch\"\nfile = \"x.diff\"\ndir = \"/srv/app\"\n",
        "",
        &[("x.diff", diff, 0o644)],
    );
    let before = snapshot(&lab.root);
    let report = apply_bundles(&lab.opts(), &[b], &mut |_| {});
    let r = &report.bundles[0];
    assert_eq!(r.status, BundleStatus::Failed);
    assert!(r.error.as_deref().unwrap().contains("dry run"), "{r:?}");
    assert!(r.exit_code.is_some_and(|c| c != 0));
    assert_eq!(
        snapshot(&lab.root),
        before,
        "a failed dry run changed the tree"
    );
}

/// The LCs run busybox: its `patch` applet must accept the same flags as GNU patch.
#[test]
fn patch_step_works_with_busybox_patch() {
    let lab = Lab::new();
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox installed (apt-get install busybox-static)");
    let bin = lab.base.join("bb-bin");
    std::fs::create_dir_all(&bin).unwrap();
    for applet in ["patch", "sh", "cat"] {
        std::os::unix::fs::symlink(busybox, bin.join(applet)).unwrap();
    }
    let ok = lab.bundle(
        "bb-ok",
        "[[step]]\nkind = \"patch\"\nfile = \"g.diff\"\ndir = \"/srv/app\"\n",
        "",
        &[("g.diff", GREETING_DIFF, 0o644)],
    );
    let again = lab.bundle(
        "bb-again",
        "[[step]]\nkind = \"patch\"\nfile = \"g.diff\"\ndir = \"/srv/app\"\n",
        "",
        &[("g.diff", GREETING_DIFF, 0o644)],
    );
    let mut opts = lab.opts();
    opts.path_env = Some(bin.clone().into_os_string());
    let report = apply_bundles(&opts, &[ok], &mut |_| {});
    assert!(report.all_ok(), "{report:#?}");
    assert_eq!(lab.read("srv/app/greeting.txt"), "hello, patched\n");
    // The same diff a second time does not apply cleanly and changes nothing.
    let report = apply_bundles(&opts, &[again], &mut |_| {});
    assert_eq!(
        report.bundles[0].status,
        BundleStatus::Failed,
        "{report:#?}"
    );
    assert_eq!(lab.read("srv/app/greeting.txt"), "hello, patched\n");
}

#[test]
fn replace_with_wrong_old_hash_changes_nothing() {
    let lab = Lab::new();
    let wrong = Sha256::of(b"some other version");
    let b = lab.bundle(
        "wrong-old",
        &format!("[[step]]\nkind = \"replace\"\npath = \"/usr/bin/tool\"\nfile = \"tool\"\nold_sha256 = \"{wrong}\"\n"),
        "",
        &[("tool", TOOL_V2, 0o755)],
    );
    let before = snapshot(&lab.root);
    let r = apply_bundles(&lab.opts(), &[b], &mut |_| {})
        .bundles
        .remove(0);
    assert_eq!(r.status, BundleStatus::Failed);
    assert!(
        r.error
            .as_deref()
            .unwrap()
            .contains("not the version this patch is for"),
        "{r:?}"
    );
    assert_eq!(snapshot(&lab.root), before);
}

#[test]
fn replace_never_leaves_the_root() {
    let lab = Lab::new();
    // An absolute symlink inside the root must resolve inside the root, not on the host.
    std::fs::create_dir_all(lab.root.join("real")).unwrap();
    std::os::unix::fs::symlink("/real", lab.root.join("link")).unwrap();
    let b = lab.bundle(
        "via-link",
        "[[step]]\nkind = \"replace\"\npath = \"/link/new.conf\"\nfile = \"new.conf\"\nold_sha256 = \"absent\"\nmode = \"0640\"\n",
        "",
        &[("new.conf", b"x=1\n", 0o644)],
    );
    let r = apply_bundles(&lab.opts(), &[b], &mut |_| {})
        .bundles
        .remove(0);
    assert_eq!(r.status, BundleStatus::Ok, "{r:?}");
    assert_eq!(lab.read("real/new.conf"), "x=1\n");
    let mode = std::fs::metadata(lab.root.join("real/new.conf"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o640);
    assert!(!Path::new("/real/new.conf").exists());
}

#[test]
fn bundle_swapped_after_verification_is_not_applied() {
    let lab = Lab::new();
    let b = lab.bundle(
        "swap",
        &script("a.sh"),
        "",
        &[("a.sh", b"echo a > \"$PATCHOVER_ROOT/etc/a\"\n", 0o755)],
    );
    let other = lab.bundle(
        "other",
        &script("a.sh"),
        "",
        &[("a.sh", b"echo evil > \"$PATCHOVER_ROOT/etc/a\"\n", 0o755)],
    );
    std::fs::copy(other.path(), b.path()).unwrap();
    let r = apply_bundles(&lab.opts(), &[b], &mut |_| {})
        .bundles
        .remove(0);
    assert_eq!(r.status, BundleStatus::Failed);
    assert!(
        r.error
            .as_deref()
            .unwrap()
            .contains("changed since it was verified"),
        "{r:?}"
    );
    assert!(!lab.root.join("etc/a").exists());
}

#[test]
fn step_timeout_fails_the_bundle() {
    let lab = Lab::new();
    let b = lab.bundle(
        "slow",
        "[[step]]\nkind = \"script\"\nfile = \"s.sh\"\ntimeout_secs = 1\n",
        "",
        &[("s.sh", b"echo going to sleep\nsleep 60\n", 0o755)],
    );
    let t = std::time::Instant::now();
    let r = apply_bundles(&lab.opts(), &[b], &mut |_| {})
        .bundles
        .remove(0);
    assert!(t.elapsed().as_secs() < 10);
    assert_eq!(r.status, BundleStatus::Failed);
    assert!(r.error.as_deref().unwrap().contains("timed out"), "{r:?}");
    assert!(r.output.contains("going to sleep"), "{}", r.output);
}

#[test]
fn duplicate_ids_apply_nothing() {
    let lab = Lab::new();
    let b = lab.bundle(
        "dup",
        &script("a.sh"),
        "",
        &[("a.sh", b"echo a > \"$PATCHOVER_ROOT/etc/a\"\n", 0o755)],
    );
    let report = apply_bundles(&lab.opts(), &[b.clone(), b], &mut |_| {});
    assert!(
        report
            .bundles
            .iter()
            .all(|r| r.status == BundleStatus::Failed)
    );
    assert!(
        report.bundles[0]
            .error
            .as_deref()
            .unwrap()
            .contains("listed twice")
    );
    assert!(!lab.root.join("etc/a").exists());
}

#[test]
fn post_checks_report_failures() {
    let lab = Lab::new();
    let b = lab.bundle(
        "checks",
        &script("a.sh"),
        &format!(
            "[[check]]\nkind = \"file_hash\"\npath = \"/srv/app/greeting.txt\"\nsha256 = \"{}\"\n\n\
             [[check]]\nkind = \"file_hash\"\npath = \"/srv/app/greeting.txt\"\nsha256 = \"{}\"\n\n\
             [[check]]\nkind = \"command_output\"\ncommand = [\"/bin/echo\", \"version 1.0\"]\ncontains = \"version 2\"\n\n\
             [[check]]\nkind = \"command_output\"\ncommand = [\"/bin/false\"]\ncontains = \"\"\n\n\
             [[check]]\nkind = \"command_output\"\ncommand = [\"/nonexistent/prog\"]\ncontains = \"\"\n\n\
             [[check]]\nkind = \"package_version\"\npackage = \"no-such-package\"\nversion = \"1.0\"\n",
            Sha256::of(b"hello\n"),
            Sha256::of(b"something else")
        ),
        &[("a.sh", b"true\n", 0o755)],
    );
    let r = run_post_checks(&lab.root, [b.manifest()]);
    assert!(!r.passed);
    let passed: Vec<bool> = r.checks.iter().map(|c| c.passed).collect();
    assert_eq!(passed, [true, false, false, false, false, false], "{r:#?}");
    assert!(
        r.checks[1].detail.contains("expected"),
        "{}",
        r.checks[1].detail
    );
    assert!(
        r.checks[2].detail.contains("version 1.0"),
        "{}",
        r.checks[2].detail
    );
    assert!(
        r.checks[3].detail.contains("exit status"),
        "{}",
        r.checks[3].detail
    );
}

/// Builds a tiny .deb with dpkg-deb that installs /usr/share/patchover-demo/version.
fn build_deb(dir: &Path, version: &str) -> Vec<u8> {
    let pkg = dir.join(format!("pkg-{version}"));
    std::fs::create_dir_all(pkg.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(pkg.join("usr/share/patchover-demo")).unwrap();
    std::fs::write(
        pkg.join("DEBIAN/control"),
        format!(
            "Package: patchover-demo\nVersion: {version}\nArchitecture: all\nMaintainer: test <t@example.invalid>\nDescription: demo\n"
        ),
    )
    .unwrap();
    std::fs::write(
        pkg.join("usr/share/patchover-demo/version"),
        format!("{version}\n"),
    )
    .unwrap();
    let deb = dir.join(format!("demo_{version}.deb"));
    let out = Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&pkg)
        .arg(&deb)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(deb).unwrap()
}

#[test]
fn dpkg_step_installs_into_the_root_and_version_check_sees_it() {
    let lab = Lab::new();
    // A minimal dpkg database in the root, as an LC's rootfs has.
    let admin = lab.root.join("var/lib/dpkg");
    for d in ["info", "updates", "triggers"] {
        std::fs::create_dir_all(admin.join(d)).unwrap();
    }
    std::fs::write(admin.join("status"), "").unwrap();
    std::fs::write(admin.join("available"), "").unwrap();
    let deb = build_deb(&lab.base, "1.2-3");
    let b = lab.bundle(
        "deb-1",
        "[[step]]\nkind = \"dpkg\"\nfile = \"demo.deb\"\n",
        "[[check]]\nkind = \"package_version\"\npackage = \"patchover-demo\"\nversion = \"1.2-3\"\n",
        &[("demo.deb", &deb, 0o644)],
    );
    let before = run_post_checks(&lab.root, [b.manifest()]);
    assert!(!before.passed, "{before:#?}");
    let r = apply_bundles(&lab.opts(), std::slice::from_ref(&b), &mut |_| {})
        .bundles
        .remove(0);
    assert_eq!(r.status, BundleStatus::Ok, "{r:#?}");
    assert_eq!(lab.read("usr/share/patchover-demo/version"), "1.2-3\n");
    let after = run_post_checks(&lab.root, [b.manifest()]);
    assert!(after.passed, "{after:#?}");
}

#[test]
fn table_copy_drives_a_run_and_records_results() {
    let lab = Lab::new();
    let agent = lab.base.join("agent");
    let mut verified = Vec::new();
    for (id, body) in [
        ("t-a", "echo a >> \"$PATCHOVER_ROOT/etc/t.log\"\n"),
        ("t-unmarked", "echo NO >> \"$PATCHOVER_ROOT/etc/t.log\"\n"),
        ("t-b", "echo b >> \"$PATCHOVER_ROOT/etc/t.log\"; exit 3\n"),
        ("t-c", "echo c >> \"$PATCHOVER_ROOT/etc/t.log\"\n"),
    ] {
        verified.push(lab.bundle(id, &script("s.sh"), "", &[("s.sh", body.as_bytes(), 0o755)]));
    }
    // The host stages the run onto the standby's disk (705/706), then unmarks one entry.
    std::fs::create_dir_all(&agent).unwrap();
    let root = patchover_lcroot::LcRoot::open(&lab.base).unwrap();
    let mut table = stage(
        &root,
        std::path::Path::new("agent"),
        "lc2",
        "run-7",
        &verified,
        std::slice::from_ref(&lab.key.public),
        &[],
    )
    .unwrap();
    assert!(agent.join("bundles/t-a.tar.zst.minisig").exists());
    assert!(agent.join("keys/key-0.pub").exists());
    table.entries[1].apply_next = false;
    let table_path = agent.join("table.json");
    write_table(&table_path, &table).unwrap();
    let bundles_dir = agent.join("bundles");
    let keys = TrustedKeys::from_dir(&agent.join("keys")).unwrap();

    // What the agent does at boot: read (1201), pick and verify (1202), apply (1203-1204),
    // record each result (1205).
    let mut t = read_table(&table_path).unwrap();
    let verified = verify_marked(&t, &bundles_dir, &keys, &Limits::default()).unwrap();
    assert_eq!(
        verified.iter().map(|v| v.id()).collect::<Vec<_>>(),
        ["t-a", "t-b", "t-c"]
    );
    let report = apply_bundles(&lab.opts(), &verified, &mut |r| {
        assert!(t.record(r));
        write_table(&table_path, &t).unwrap();
    });
    let back = read_table(&table_path).unwrap();
    let status = |id: &str| {
        back.entries
            .iter()
            .find(|e| e.id.as_str() == id)
            .unwrap()
            .result
            .as_ref()
            .map(|r| r.status)
    };
    assert_eq!(status("t-a"), Some(BundleStatus::Ok));
    assert_eq!(status("t-b"), Some(BundleStatus::Failed));
    assert_eq!(status("t-c"), Some(BundleStatus::Skipped));
    assert_eq!(status("t-unmarked"), None);
    assert_eq!(report.bundles.len(), 3);
    assert_eq!(lab.read("etc/t.log"), "a\nb\n");

    // A table whose recorded hash does not match a bundle: nothing verifies, nothing runs.
    let mut bad = back.clone();
    bad.entries[2].sha256 = Sha256::of(b"not it");
    let e = verify_marked(&bad, &bundles_dir, &keys, &Limits::default()).unwrap_err();
    assert!(e.to_string().contains("t-b"), "{e}");
    let results = verification_failure_results(&bad, &e);
    let st: Vec<_> = results.iter().map(|r| (r.id.as_str(), r.status)).collect();
    assert_eq!(
        st,
        [
            ("t-a", BundleStatus::Skipped),
            ("t-b", BundleStatus::Failed),
            ("t-c", BundleStatus::Skipped)
        ]
    );
}

/// Issue 22, item 1, where it matters (the agent at boot, 1202): a bundle holding the link
/// chain that reached `/etc/passwd` once unpacked, signed with the trusted key before the fix
/// and staged in the table with its right hash, is refused by `verify_marked`, naming the
/// entry and where it resolves; nothing is unpacked, nothing runs.
#[test]
fn r22_a_staged_bundle_whose_link_climbs_out_is_refused_before_anything_is_unpacked() {
    use patchover_bundle::archive::write_archive;
    use patchover_bundle::keys::signature_path;
    let lab = Lab::new();
    let good = lab.bundle("t-a", &script("s.sh"), "", &[("s.sh", b"true\n", 0o755)]);
    let agent = lab.base.join("agent");
    std::fs::create_dir_all(&agent).unwrap();
    let root = patchover_lcroot::LcRoot::open(&lab.base).unwrap();
    let keys = std::slice::from_ref(&lab.key.public);
    let mut table = stage(
        &root,
        Path::new("agent"),
        "lc2",
        "run-7",
        &[good],
        keys,
        &[],
    )
    .unwrap();

    let payload = lab.base.join("chain/payload");
    let six = payload.join("d1/d2/d3/d4/d5/d6");
    std::fs::create_dir_all(&six).unwrap();
    std::fs::write(payload.join("s.sh"), "true\n").unwrap();
    std::os::unix::fs::symlink("../../../../..", six.join("up")).unwrap();
    let evil = "d1/d2/d3/d4/d5/d6/up/../../../../../../../etc/passwd";
    std::os::unix::fs::symlink(evil, payload.join("evil")).unwrap();
    let mut bytes = Vec::new();
    let m = manifest("t-a", &script("s.sh"), "");
    write_archive(m.as_bytes(), Some(&payload), &mut bytes).unwrap();
    let file = agent.join("bundles").join(&table.entries[0].file);
    std::fs::write(&file, &bytes).unwrap();
    let sig = lab
        .key
        .signing
        .sign(&bytes, "signed before the fix")
        .unwrap();
    std::fs::write(signature_path(&file), sig).unwrap();
    table.entries[0].sha256 = Sha256::of(&bytes);
    write_table(&agent.join("table.json"), &table).unwrap();

    let t = read_table(&agent.join("table.json")).unwrap();
    let keys = TrustedKeys::from_dir(&agent.join("keys")).unwrap();
    let e = verify_marked(&t, &agent.join("bundles"), &keys, &Limits::default()).unwrap_err();
    let msg = common::chain(&e);
    assert!(
        msg.contains("entry \"payload/evil\"") && msg.contains("\"../../../../../etc/passwd\""),
        "{msg}"
    );
    let results = verification_failure_results(&t, &e);
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].status, BundleStatus::Failed);
    assert!(!lab.base.join("work").exists(), "something was unpacked");
}
