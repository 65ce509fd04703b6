//! The README's first command: `patchover demo` patches the demo service under load and says
//! so in its report.

mod common;

use std::process::Command;

#[test]
fn the_demo_patches_under_load_without_a_failed_request_or_a_lost_write() {
    demo(&["--load-seconds", "15"], 1000);
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
