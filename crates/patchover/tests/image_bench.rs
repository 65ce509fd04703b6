//! `patchover bench copy --disk image`: a small real run (qemu-storage-daemon serving an ext4
//! image, loop-mounted, the writer in its own cgroup, three cuts) gives a copy identical to
//! the frozen source at every cut, and reports every figure. No timing thresholds: those are
//! the benchmark's job, not a test's.

use std::process::Command;

#[test]
fn image_bench_copy_is_identical_at_every_cut_and_reports_every_figure() {
    let out = Command::new(env!("CARGO_BIN_EXE_patchover"))
        .args([
            "bench", "copy", "--disk", "image", "--quick", "--cuts", "3", "--json",
        ])
        .output()
        .expect("run patchover");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    eprintln!("{r:#}");
    assert_eq!(r["disk"], "image");
    assert_eq!(r["identical"]["cuts"], 3, "{r:#}");
    assert_eq!(r["identical"]["identical"], 3, "{r:#}");
    assert!(r["identical"]["first_difference"].is_null(), "{r:#}");
    assert_eq!(r["goals"]["identical_at_every_cut"], true);
    assert_eq!(r["freeze"]["cuts"], 3);
    assert_eq!(r["freeze"]["windows_ms"].as_array().unwrap().len(), 3);
    assert_eq!(r["disk_bytes"], (64 + 256) << 20);
    let positive = |path: &[&str]| {
        let mut v = &r;
        for p in path {
            v = &v[p];
        }
        let x = v
            .as_f64()
            .unwrap_or_else(|| panic!("{path:?} missing: {r:#}"));
        assert!(x > 0.0, "{path:?} = {x}: {r:#}");
    };
    for p in [
        &["freeze", "p50_ms"][..],
        &["freeze", "p99_ms"],
        &["freeze", "syncfs_p50_ms"],
        &["freeze", "job_start_p50_ms"],
        &["freeze", "reference_p50_ms"],
        &["freeze", "complete_after_thaw_p50_ms"],
        &["writer", "alone_mb_s"],
        &["writer", "during_copy_mb_s"],
        &["writer", "during_cuts_mb_s"],
        &["bulk", "copy_secs"],
        &["bulk", "cp_secs"],
    ] {
        positive(p);
    }
    // The quick run ships writes by rounds every 100 ms while it follows.
    assert_eq!(r["writer"]["round_every_ms"], 100.0, "{r:#}");
    assert!(r["writer"]["follow_rounds"].as_u64() >= Some(1), "{r:#}");
    positive(&["writer", "follow_shipped_mib"]);
}

#[test]
fn round_every_is_refused_for_the_file_copier() {
    let out = Command::new(env!("CARGO_BIN_EXE_patchover"))
        .args(["bench", "copy", "--round-every", "500", "--json"])
        .output()
        .expect("run patchover");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    // With --json the error is the JSON on stdout.
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON error");
    assert!(
        err["error"]
            .as_str()
            .is_some_and(|e| e.contains("--round-every is for --disk image")),
        "{err}"
    );
}
