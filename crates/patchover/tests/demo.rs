//! The README's first command: `patchover demo` patches the demo service under load and says
//! so in its report.

mod common;

use std::process::Command;

/// With `--report`: the run's page, opened in headless Chromium: a screenshot that is not
/// blank, and in the rendered DOM the time line with a mark per step, the latency plot with a
/// mark per failed read, and the switch marked on both.
#[test]
fn the_demo_patches_under_load_without_a_failed_request_or_a_lost_write() {
    let out = tempfile::tempdir().unwrap();
    let page = out.path().join("demo.html");
    let report = demo(
        &["--load-seconds", "15", "--report", page.to_str().unwrap()],
        1000,
    );
    assert_eq!(report["report_file"], page.to_str().unwrap());
    let r = common::chromium(&page);
    assert!(r.colours > 1, "the screenshot is blank");
    let count = |s: &str| r.dom.matches(s).count();
    assert_eq!(count("<svg id=\"timeline\""), 1, "{}", r.dom);
    assert_eq!(count("<svg id=\"latency\""), 1, "{}", r.dom);
    let steps = report["steps"].as_array().unwrap().len();
    assert_eq!(count("class=\"step\""), steps, "{}", r.dom);
    // `reads.failed` counts failed reads by kind.
    let failed: u64 = report["reads"]["failed"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(count("class=\"failed\"") as u64, failed, "{report:#}");
    assert_eq!(count("id=\"timeline-switch\" class=\"switch\""), 1);
    assert_eq!(count("id=\"latency-switch\" class=\"switch\""), 1);
}

/// `--report` is refused where it has no page to write, before anything is made.
#[test]
fn a_report_is_refused_for_a_real_service_or_a_missing_directory() {
    for (args, says) in [
        (
            &["--service", "nginx", "--report", "/tmp/r.html"][..],
            "--report is for the demo service",
        ),
        (
            &["--report", "/nonexistent-po-dir/r.html"][..],
            "is not a directory",
        ),
    ] {
        let out = Command::new(common::BIN)
            .arg("demo")
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{out:?}"
        );
    }
}

/// The other two modes: one NIC identity whose bridge port moves (`path`), and the hand-off
/// behind the host's NAT (`seamless`, the client routed through the host).
#[test]
fn the_demo_runs_in_path_and_seamless_mode() {
    for mode in ["path", "seamless"] {
        let report = demo(&["--load-seconds", "8", "--mode", mode], 500);
        assert_eq!(report["mode"], mode);
    }
}

/// Issue 15 item 5: the qemu demo passes with the deadline it declares (5 s). It failed one run
/// in two: the standby VM dropped the SYN-ACKs of the longest-held connections while it waited
/// for their client's ARP reply (see docs/network-switch.md, "Holding new connections").
/// Slow tier: two TCG VMs boot and reboot and 30 s of load run (about 90 s on this host).
#[test]
fn qemu_demo_meets_its_deadline() {
    let report = demo(&["--backend", "qemu"], 5000);
    assert_eq!(report["deadline_ms"], 5000, "{report:#}");
    assert!(
        report["reads"]["max_ms"].as_f64().unwrap() < 5000.0,
        "{report:#}"
    );
    // Connections were held in the pause, and the standby was told their client first.
    let sw = &report["switch"];
    assert!(sw["held_syns"].as_u64().unwrap() > 0, "{report:#}");
    assert_eq!(sw["primed_neighbours"], 1, "one client: {report:#}");
}

fn demo(args: &[&str], min_requests: u64) -> serde_json::Value {
    let dir = tempfile::Builder::new()
        .prefix("po-demo-")
        .tempdir()
        .unwrap();
    let out = Command::new(common::BIN)
        .env("PATCHOVER_GUEST_DIR", common::guest_dir())
        .args(["--json", "demo"])
        .args(args)
        .arg("--dir")
        .arg(dir.path())
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(out.status.success(), "{report:#}");
    assert_eq!(report["outcome"], "ok", "{report:#}");
    assert_eq!(report["requests_failed"], 0, "{report:#}");
    assert_eq!(report["writes_lost"], 0, "{report:#}");
    assert!(
        report["requests_total"].as_u64().unwrap() > min_requests,
        "{report:#}"
    );
    assert!(
        report["writes_acknowledged"].as_u64().unwrap() > 100,
        "{report:#}"
    );
    assert_eq!(
        (
            report["version_before"].as_str(),
            report["version_after"].as_str()
        ),
        (Some("1.0.0"), Some("1.0.1"))
    );
    assert!(
        report["pause_ms"].as_f64().is_some() && report["steps"].as_array().unwrap().len() >= 10
    );
    report
}

/// The soak's fast case (the long one, ≥ 50 cycles per mode, is in the slow tier): three
/// patch → rollback cycles under load, nothing failed or lost, and no resource count grows
/// from after the first cycle to after the last. To see that a leak is caught, the census
/// is also checked to count what it claims (the LCs' veths and cgroups are there).
#[test]
fn a_short_soak_leaves_nothing_behind() {
    let dir = tempfile::Builder::new()
        .prefix("po-soak-")
        .tempdir()
        .unwrap();
    let out = Command::new(common::BIN)
        .env("PATCHOVER_GUEST_DIR", common::guest_dir())
        .args(["--json", "bench", "soak", "--cycles", "3", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(out.status.success(), "{r:#}");
    assert_eq!(r["cycles"], 3, "{r:#}");
    assert_eq!(r["requests_failed"], 0, "{r:#}");
    assert_eq!(r["writes_lost"], 0, "{r:#}");
    assert!(r["writes_acknowledged"].as_u64().unwrap() > 100, "{r:#}");
    for (k, v) in r["leaks"].as_object().unwrap() {
        assert!(v.as_i64().unwrap() <= 0, "{k} leaked: {r:#}");
    }
    let census = &r["census_after_last"];
    for (k, at_least) in [
        ("veths", 2),
        ("cgroups", 2),
        ("processes", 1),
        ("open_fds", 3),
    ] {
        assert!(census[k].as_i64().unwrap() >= at_least, "{k}: {r:#}");
    }
    assert!(
        r["history_bytes_per_cycle"].as_f64().unwrap() > 0.0,
        "{r:#}"
    );
}
