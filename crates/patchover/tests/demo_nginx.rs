//! `patchover demo --service nginx` (issue 20, items 3-5): Debian's nginx, unmodified, on a
//! Debian LC, its pending updates bundled by from-apt, patched and rolled back under `wrk`
//! (keep-alive, and `Connection: close`) and the deadline client, the package versions read
//! from the LCs' dpkg status.
//!
//! The default-tier test needs no archive but the image cache's: its update is a rebuild of the
//! LC's own nginx at a higher version (`fixture::repack`), served by a local signed archive
//! (`--source`). The real archive's updates and the ten-cycle goal are in the slow tier.

mod common;

use std::path::Path;
use std::process::Command;

use patchover_debian::fixture::{TestArchive, repack};

fn cache() -> String {
    std::env::var("PATCHOVER_DEBIAN_CACHE")
        .unwrap_or_else(|_| "/var/tmp/patchover-test-debian".into())
}

/// `patchover --json demo --service nginx ARGS` in a directory of the test's own: the report
/// and whether the command exited 0.
fn nginx_demo(args: &[&str]) -> (serde_json::Value, bool) {
    let dir = tempfile::Builder::new()
        .prefix("po-nxdemo-")
        .tempdir()
        .unwrap();
    let out = Command::new(common::BIN)
        .env("PATCHOVER_GUEST_DIR", common::guest_dir())
        .env("PATCHOVER_DEBIAN_CACHE", cache())
        .args(["--json", "demo", "--service", "nginx", "--dir"])
        .arg(dir.path())
        .args(args)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    eprintln!("report: {}", serde_json::to_string_pretty(&report).unwrap());
    (report, out.status.success())
}

/// The image the demo builds (from the cache), and the version of `package` in it.
fn image_and_version(dir: &Path, package: &str) -> (std::path::PathBuf, String) {
    let sys = dir.join("sys");
    let out = Command::new(common::BIN)
        .env("PATCHOVER_GUEST_DIR", common::guest_dir())
        .env("PATCHOVER_DEBIAN_CACHE", cache())
        .args(["image", "build-debian"])
        .arg(&sys)
        .args(["--packages", "nginx-light"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = Command::new("dpkg-query")
        .arg(format!("--admindir={}", sys.join("var/lib/dpkg").display()))
        .args(["-W", "-f=${Version}", package])
        .output()
        .unwrap();
    assert!(v.status.success());
    (sys, String::from_utf8(v.stdout).unwrap())
}

/// A local archive offering nginx rebuilt at `<installed>+po1`, urgency high; the installed
/// version.
fn nginx_update() -> (TestArchive, String, String) {
    let t = tempfile::tempdir().unwrap();
    let (sys, v) = image_and_version(t.path(), "nginx");
    let new = format!("{v}+po1");
    let deb = repack(&sys, "nginx", &new, "high", &t.path().join("debs"));
    (TestArchive::of_debs("bookworm-security", &[deb]), v, new)
}

/// What every run of the nginx demo must show: its counts add up, both wrk runs and the
/// deadline client ran and are in the sums, and the exit code is the guarantee.
fn check_counts(r: &serde_json::Value, ok: bool) {
    let n = |v: &serde_json::Value| v.as_u64().unwrap();
    let (ka, close, dl) = (
        &r["wrk"]["keepalive"],
        &r["wrk"]["close"],
        &r["deadline_client"],
    );
    for (name, c, at_least) in [("keep-alive", ka, 200), ("close", close, 50)] {
        assert!(n(&c["requests"]) > at_least, "wrk {name}: {r:#}");
        let out = c["output"][0].as_str().unwrap();
        assert!(out.contains(" requests in "), "wrk {name} verbatim: {out}");
        let errors = n(&c["connect"]) + n(&c["read"]) + n(&c["write"]) + n(&c["timeout"]);
        assert_eq!(n(&c["failed"]), errors + n(&c["non_2xx_3xx"]), "{r:#}");
    }
    assert!(n(&dl["total"]) > 100, "{r:#}");
    assert_eq!(
        n(&r["requests_failed"]),
        n(&ka["failed"]) + n(&close["failed"]) + n(&dl["failed"]),
        "{r:#}"
    );
    assert!(n(&r["requests_total"]) > n(&ka["requests"]) + n(&close["requests"]));
    assert_eq!(
        ok,
        r["good"] == true,
        "the exit code is the report's verdict: {r:#}"
    );
}

/// The default tier's nginx demo: one patch → rollback cycle of a local rebuild of the LC's
/// own nginx, stateless (`seamless`, the default); the new version on the new LC, the old one
/// back after the rollback, and no failed request of any client. (In `readdress` mode each
/// keep-alive connection is cut once at most per switch, when the drain closes it, and counted:
/// the demo then exits 1.)
#[test]
fn the_nginx_demo_patches_and_rolls_back_under_wrk_and_the_deadline_client() {
    let (archive, old, new) = nginx_update();
    let (r, ok) = nginx_demo(&["--source", &archive.source().to_string()]);
    check_counts(&r, ok);
    assert_eq!(r["outcome"], "ok", "{r:#}");
    assert_eq!(r["cycles"], 1);
    assert_eq!(r["packages_before"]["nginx"], old.as_str(), "{r:#}");
    assert_eq!(r["packages_after"]["nginx"], new.as_str(), "{r:#}");
    assert_eq!(r["packages_after_rollback"]["nginx"], old.as_str(), "{r:#}");
    assert_eq!(r["versions_ok"], true);
    assert_eq!(
        (
            r["bundle"]["category"].as_str(),
            r["bundle"]["severity"].as_str()
        ),
        (Some("security"), Some("high"))
    );
    // New connections never fail: wrk's Connection: close run and the deadline client.
    assert_eq!(r["wrk"]["close"]["failed"], 0, "{r:#}");
    assert_eq!(r["deadline_client"]["failed"], 0, "{r:#}");
    let cuts = r["wrk"]["keepalive"]["failed"].as_u64().unwrap();
    match r["mode"].as_str() {
        // Stateless nginx: the guarantee, 0 failed of every client, and exit 0.
        Some("seamless") => {
            assert_eq!(cuts, 0, "{r:#}");
            assert_eq!(r["requests_failed"], 0, "{r:#}");
            assert!(ok, "{r:#}");
        }
        // Two switches (the patch's and the rollback's), 4 wrk connections.
        _ => assert!(
            cuts <= 8,
            "at most one cut per keep-alive connection and switch: {r:#}"
        ),
    }
    drop(archive);
}

/// The busybox demo's options that a real service alone has are refused before anything is
/// made, and so is a bad archive line.
#[test]
fn the_demos_options_are_checked_before_anything_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("demo");
    common::refused_before_anything_is_made(
        &[
            (
                &["demo", "--cycles", "3"][..],
                "--cycles is for a real service",
            ),
            (
                &["demo", "--source", "deb http://x bookworm main"][..],
                "--source is for a real service",
            ),
            (
                &["demo", "--service", "nginx", "--backend", "qemu"][..],
                "runs on ns LCs",
            ),
            (
                &["demo", "--service", "nginx", "--source", "http://x"][..],
                "--source",
            ),
            (
                &["demo", "--service", "nginx", "--cycles", "0"][..],
                "at least 1",
            ),
            (&["demo", "--service", "apache"][..], "unknown service"),
        ],
        &d,
    );
}

/// Slow tier: the real archive the host's apt uses. The image is the suite as released, so
/// the security suite has nginx updates pending: they go through the cycle under load and
/// back.
#[test]
fn real_archive_nginx_updates_patched_and_rolled_back() {
    let (r, ok) = nginx_demo(&[]);
    check_counts(&r, ok);
    assert_eq!(r["outcome"], "ok", "{r:#}");
    assert_ne!(
        r["packages_before"]["nginx"], r["packages_after"]["nginx"],
        "{r:#}"
    );
    assert_eq!(r["packages_before"], r["packages_after_rollback"], "{r:#}");
    assert_eq!(r["wrk"]["close"]["failed"], 0, "{r:#}");
    assert_eq!(r["deadline_client"]["failed"], 0, "{r:#}");
}

/// Slow tier, issue 20's goal: ten full patch → rollback cycles under wrk keep-alive, wrk
/// `Connection: close` and the deadline client, stateless (`seamless`): 0 failed. Prints the
/// figures (the report); with `--mode readdress` new connections never fail and keep-alive
/// cuts are reported per cycle.
#[test]
fn ten_cycles_of_nginx_under_wrk_and_the_deadline_client() {
    let (archive, _, _) = nginx_update();
    let (r, ok) = nginx_demo(&["--cycles", "10", "--source", &archive.source().to_string()]);
    check_counts(&r, ok);
    assert_eq!(
        (r["outcome"].as_str(), r["cycles"].as_u64()),
        (Some("ok"), Some(10)),
        "{r:#}"
    );
    assert_eq!(r["wrk"]["close"]["failed"], 0, "{r:#}");
    assert_eq!(r["deadline_client"]["failed"], 0, "{r:#}");
    if r["mode"] == "seamless" {
        assert_eq!(r["requests_failed"], 0, "{r:#}");
        assert!(ok, "{r:#}");
    }
    eprintln!(
        "10 cycles ({} mode): {} requests, {} failed; keep-alive cuts per cycle {}",
        r["mode"], r["requests_total"], r["requests_failed"], r["keepalive_cuts_per_cycle"]
    );
    drop(archive);
}
