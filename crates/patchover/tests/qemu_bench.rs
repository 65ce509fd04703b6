//! `patchover bench copy --backend qemu`: a small real run (TCG VM, guest writer, QEMU mirror
//! jobs) gives a point-in-time copy identical to the source at every cut, and every figure
//! the report promises is there and positive. No timing thresholds: those are the benchmark's
//! job, not a test's.

mod common;

#[test]
fn qemu_bench_copy_is_identical_at_every_cut_and_reports_every_figure() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("unused.toml");
    let work = dir.path().join("work");
    let out = common::po(
        &config,
        &[
            "bench",
            "copy",
            "--backend",
            "qemu",
            "--cuts",
            "3",
            "--json",
            "--file-mib",
            "128",
            "--rate-mib",
            "4",
            "--baseline-secs",
            "4",
            "--hold-ms",
            "300",
            "--work-dir",
            work.to_str().unwrap(),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed ({}):\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    eprintln!("{r:#}");
    assert_eq!(r["backend"], "qemu");
    assert_eq!(r["identical"]["cuts"], 3, "{r:#}");
    assert_eq!(r["identical"]["identical"], 3, "{r:#}");
    assert!(r["identical"]["first_difference"].is_null(), "{r:#}");
    assert_eq!(r["goals"]["identical_at_every_cut"], true);
    assert_eq!(r["disk_bytes"], (128 + 256) << 20);
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
        &["freeze", "max_ms"],
        &["freeze", "compare_p50_ms"],
        &["freeze", "cut_p50_ms"],
        &["freeze", "pause_resume_only_p50_ms"],
        &["writer", "baseline_mib_s"],
        &["writer", "control_mib_s"],
        &["writer", "during_copy_mib_s"],
        &["writer", "with_freeze_mib_s"],
        &["writer", "churn_files_per_s"],
        &["bulk", "mirror_secs"],
        &["bulk", "mirror_bytes_per_s"],
        &["bulk", "cp_secs"],
        &["bulk", "cp_bytes_per_s"],
        &["bulk", "ratio"],
    ] {
        positive(p);
    }
    assert_eq!(r["freeze"]["windows_ms"].as_array().unwrap().len(), 3);
    let (p50, p99, max) = (
        r["freeze"]["p50_ms"].as_f64().unwrap(),
        r["freeze"]["p99_ms"].as_f64().unwrap(),
        r["freeze"]["max_ms"].as_f64().unwrap(),
    );
    assert!(p50 <= p99 && p99 <= max, "{r:#}");
    let modes = &r["copy_modes"];
    assert_eq!(
        modes["background"].as_u64().unwrap() + modes["write_blocking"].as_u64().unwrap(),
        3,
        "{r:#}"
    );
    // The writer ran in the guest at a measurable rate (loss is a figure, not a pass mark).
    let loss = r["writer"]["loss"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&loss), "{r:#}");
    // The run cleaned up after itself: no VM, no target image left in the work dir.
    assert!(!work.join("copy.img").exists());
    let pid_file = std::fs::read_dir(work.join("run/lc"))
        .unwrap()
        .flatten()
        .map(|e| e.path().join("qemu.pid"))
        .find(|p| p.exists());
    if let Some(p) = pid_file {
        let pid = std::fs::read_to_string(&p).unwrap();
        assert!(
            !std::path::Path::new(&format!("/proc/{}", pid.trim())).exists(),
            "QEMU {pid} still runs"
        );
    }
}
