//! The operator's verbs: `config check` (the typed loader over a whole file), `status` (one
//! screen of a real world) and `doctor` (the host's features, probed for real).

mod common;

use std::fs;
use std::process::{Command, Output};

use common::BIN;

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run patchover")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const GOOD: &str = "state_dir = \"/tmp/po-operator/state\"
run_dir = \"/tmp/po-operator/run\"

[network]
bridge = \"pobop0\"
service_address = \"10.77.0.10/24\"

[[lc]]
id = \"lc1\"
cpu = 0
cpu_share = 50
memory_mib = 64
system_disk = { path = \"/srv/lc1/sys\" }

[service]
port = 8080
health = { kind = \"http\", path = \"/health\" }
";

#[test]
fn config_check_says_ok_with_a_summary_or_each_error_at_file_line_key() {
    let d = tempfile::tempdir().unwrap();
    let good = d.path().join("good.toml");
    fs::write(&good, GOOD).unwrap();
    // FILE defaults to --config.
    let out = run(&["--config", good.to_str().unwrap(), "config", "check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!(
            "{}: ok: 1 LCs (lc1 (ns)); service 10.77.0.10/24 port 8080, check http /health; no monitor; 0 trusted bundle keys; daemon socket /tmp/po-operator/run/daemon/patchover.sock\n",
            good.display()
        )
    );
    let json = run(&["--json", "config", "check", good.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["summary"]["lcs"][0], "lc1 (ns)");
    assert_eq!(v["errors"].as_array().unwrap().len(), 0);

    // Each bad file: exit 2 and exactly `file:line: key: message`.
    let cases: &[(&str, &str, &str)] = &[
        // An unknown key, at its line.
        (
            "bridge = \"pobop0\"",
            "bridge = \"pobop0\"\nbridg = \"x\"",
            "6: network.bridg: unknown field `bridg`, expected one of `bridge`, `bridge_address`, `service_address`",
        ),
        // A value that does not parse as its type.
        (
            "memory_mib = 64",
            "memory_mib = \"lots\"",
            "12: lc.memory_mib: invalid type: string \"lots\", expected u64",
        ),
        // A value checked beyond its type.
        (
            "cpu_share = 50",
            "cpu_share = 0",
            "11: lc.lc1.cpu_share: a percentage of one CPU, 1-100",
        ),
        // An unknown key in another section.
        (
            "port = 8080",
            "port = 8080\nprot = 80",
            "17: service.prot: unknown field `prot`",
        ),
    ];
    for (from, to, want) in cases {
        let bad = d.path().join("bad.toml");
        fs::write(&bad, GOOD.replace(from, to)).unwrap();
        let out = run(&["config", "check", bad.to_str().unwrap()]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{to}: {err}");
        let want = format!("{}:{want}", bad.display());
        assert!(err.starts_with(&want), "{to}:\n got: {err}\nwant: {want}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(out.stdout.is_empty());
    }
    // A file that cannot be read is said so, exit 2.
    let out = run(&["config", "check", "/nonexistent/po.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cannot read config /nonexistent/po.toml"));
}

/// `status` of a real world: an active LC whose service answers (asked with the configured
/// check inside it), a stopped standby, an approved patch, no daemon; then the service
/// stopped (it does not answer) and the LC stopped (the check cannot be made): states shown,
/// exit 0 every time.
#[test]
fn status_shows_roles_states_the_service_patches_and_the_daemon() {
    let c = common::cycle::Cycle::new(2, "");
    c.start_service();
    c.upgrade_bundle();
    let (a, b) = (c.t.lcs[0].id.clone(), c.t.lcs[1].id.clone());
    let s = c.t.po_json(&["status"]);
    let lc = |s: &serde_json::Value, id: &str| {
        s["lcs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} not in {s:#}"))
    };
    assert_eq!(lc(&s, &a)["role"], "active", "{s:#}");
    assert_eq!(lc(&s, &a)["state"], "running", "{s:#}");
    assert!(lc(&s, &a)["pid"].as_i64().is_some(), "{s:#}");
    assert_eq!(lc(&s, &b)["role"], "unused", "{s:#}");
    assert_eq!(lc(&s, &b)["state"], "stopped", "{s:#}");
    assert_eq!(s["active_lc"], a.as_str());
    assert_eq!(s["service"]["lc"], a.as_str());
    assert_eq!(s["service"]["address"], format!("{}/24", c.t.service()));
    assert_eq!(s["service"]["lc_address"], c.t.lcs[0].address.as_str());
    assert_eq!(s["service"]["answers"], true, "{s:#}");
    assert_eq!(s["patches"]["approved"][0]["id"], "demo-1.0.1", "{s:#}");
    assert_eq!(s["patches"]["pending"].as_array().unwrap().len(), 0);
    assert_eq!(s["runs"].as_array().unwrap().len(), 0);
    assert_eq!(s["monitor"], serde_json::Value::Null);
    assert_eq!(s["daemon"]["answers"], false, "{s:#}");
    let screen = c.t.po_ok(&["status"]);
    for want in [
        format!("on LC {a} ({}): answers", c.t.lcs[0].address),
        "patches approved for the next run: demo-1.0.1".to_owned(),
        "daemon: not running".to_owned(),
    ] {
        assert!(screen.contains(&want), "{want:?} not in:\n{screen}");
    }

    // The service stopped inside the LC: the same check fails, and says why.
    c.t.po_ok(&["lc", "exec", &a, "--", "/etc/init.d/S50demo", "stop"]);
    let s = c.t.po_json(&["status"]);
    assert_eq!(s["service"]["answers"], false, "{s:#}");
    assert!(
        s["service"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("service check")),
        "{s:#}"
    );
    assert!(c.t.po_ok(&["status"]).contains("does NOT answer"));

    // The LC stopped: the check cannot be made; still a status, exit 0.
    c.t.po_ok(&["lc", "stop", &a]);
    let s = c.t.po_json(&["status"]);
    assert_eq!(lc(&s, &a)["state"], "stopped", "{s:#}");
    assert_eq!(s["service"]["answers"], serde_json::Value::Null, "{s:#}");
    assert!(
        s["service"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("stopped")),
        "{s:#}"
    );
}

fn doctor(args: &[&str], path: Option<&str>) -> (Option<i32>, serde_json::Value, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).args(["--json", "doctor"]);
    if let Some(p) = path {
        cmd.env("PATH", p);
    }
    cmd.env_remove("PATCHOVER_QEMU");
    let out = cmd.output().expect("run patchover doctor");
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", text(&out.stdout), text(&out.stderr)));
    (out.status.code(), v, text(&out.stderr))
}

fn check<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name:?} in {v:#}"))
}

/// On this host (every feature and program there), with no config: every check is ok, exit 0.
#[test]
fn doctor_finds_every_feature_of_this_host() {
    let (code, v, err) = doctor(&["--config", "/nonexistent/po.toml"], None);
    assert_eq!(code, Some(0), "{v:#}\n{err}");
    assert_eq!(v["config"], serde_json::Value::Null);
    let checks = v["checks"].as_array().unwrap();
    assert!(checks.len() >= 15, "{v:#}");
    for c in checks {
        assert_eq!(c["state"], "ok", "{c}");
        assert_eq!(c["fix"], serde_json::Value::Null, "{c}");
    }
    for name in [
        "network namespace",
        "cgroup freezer",
        "fanotify (FAN_MARK_FILESYSTEM)",
        "openat2 (RESOLVE_IN_ROOT)",
        "xtables NFQUEUE (SYN hold)",
        "nftables (nft)",
        "conntrack",
        "KVM or TCG",
        "qemu-system-x86_64",
    ] {
        check(&v, name);
    }
}

/// A PATH without `nft` and `qemu-system-x86_64`, and a config naming a qemu LC: both are
/// missing and needed, each with its fix, exit 1; without the qemu LC, a missing QEMU is
/// not needed (but `nft` still is).
#[test]
fn doctor_names_what_the_config_needs_and_is_missing_with_its_fix() {
    let d = tempfile::tempdir().unwrap();
    let bin = d.path().join("bin");
    fs::create_dir(&bin).unwrap();
    for p in [
        "iptables-nft",
        "conntrack",
        "busybox",
        "mmdebstrap",
        "qemu-storage-daemon",
    ] {
        let real = std::env::var("PATH")
            .unwrap()
            .split(':')
            .map(|dir| std::path::Path::new(dir).join(p))
            .find(|c| c.exists())
            .unwrap_or_else(|| panic!("{p} is not on this host's PATH"));
        std::os::unix::fs::symlink(real, bin.join(p)).unwrap();
    }
    let kernel = d.path().join("vmlinuz");
    fs::write(&kernel, b"").unwrap();
    let sys = d.path().join("lc1.img");
    fs::write(&sys, b"").unwrap();
    let config = d.path().join("po.toml");
    let qemu_lc = format!(
        "state_dir = \"{0}/state\"\nrun_dir = \"{0}/run\"\n[network]\nbridge = \"pobdoc0\"\n[[lc]]\nid = \"lc1\"\nbackend = \"qemu\"\nkernel = \"{1}\"\ncpu = 0\ncpu_share = 50\nmemory_mib = 128\nsystem_disk = {{ path = \"{2}\" }}\n",
        d.path().display(),
        kernel.display(),
        sys.display()
    );
    fs::write(&config, &qemu_lc).unwrap();
    let path = bin.to_str().unwrap();
    let (code, v, err) = doctor(&["--config", config.to_str().unwrap()], Some(path));
    assert_eq!(code, Some(1), "{v:#}\n{err}");
    assert_eq!(v["config"], config.to_str().unwrap());
    let nft = check(&v, "nftables (nft)");
    assert_eq!(nft["state"], "missing", "{nft}");
    assert_eq!(nft["fix"], "apt install nftables; modprobe nf_tables");
    let qemu = check(&v, "qemu-system-x86_64");
    assert_eq!(qemu["state"], "missing", "{qemu}");
    assert_eq!(qemu["needed"], true);
    assert!(
        qemu["fix"]
            .as_str()
            .unwrap()
            .starts_with("apt install qemu-system-x86"),
        "{qemu}"
    );
    // Without QEMU there is no TCG either (and no KVM guest can be booted).
    assert_eq!(check(&v, "KVM or TCG")["state"], "missing", "{v:#}");
    assert_eq!(check(&v, "conntrack")["state"], "ok");
    assert_eq!(check(&v, "xtables NFQUEUE (SYN hold)")["state"], "ok");
    // The text names each missing item with its fix.
    let out = Command::new(BIN)
        .args(["--config", config.to_str().unwrap(), "doctor"])
        .env("PATH", path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let screen = text(&out.stdout);
    assert!(
        screen.contains("nftables (nft): apt install nftables; modprobe nf_tables"),
        "{screen}"
    );
    assert!(
        screen.contains("qemu-system-x86_64: apt install qemu-system-x86"),
        "{screen}"
    );

    // No qemu LC: QEMU is missing but not needed; nft still fails the run.
    fs::write(
        &config,
        qemu_lc
            .replace("backend = \"qemu\"\n", "")
            .replace(&format!("kernel = \"{}\"\n", kernel.display()), "")
            .replace(sys.to_str().unwrap(), d.path().to_str().unwrap()),
    )
    .unwrap();
    let (code, v, err) = doctor(&["--config", config.to_str().unwrap()], Some(path));
    assert_eq!(code, Some(1), "{v:#}\n{err}");
    assert_eq!(check(&v, "qemu-system-x86_64")["state"], "not_needed");
    assert_eq!(check(&v, "nftables (nft)")["state"], "missing");
}
