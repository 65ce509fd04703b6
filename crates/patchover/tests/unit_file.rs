//! `packaging/patchover.service` against systemd's own checker and against patchover's
//! defaults: PID 1 here is not systemd, so `systemd-analyze verify` (Debian's `systemd`
//! package, installed by `scripts/install-deps`) checks the unit, and this test checks that
//! what the unit lets systemd remove holds nothing that must outlive the daemon.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_patchover");

fn unit_text() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/patchover.service");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `[Service]` keys → values (a key given twice keeps every value).
fn service_keys(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut section = "";
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            section = line;
            continue;
        }
        if section == "[Service]"
            && let Some((k, v)) = line.split_once('=')
        {
            out.entry(k.to_owned()).or_default().push(v.to_owned());
        }
    }
    out
}

fn one<'a>(keys: &'a BTreeMap<String, Vec<String>>, k: &str) -> &'a str {
    match keys.get(k).map(Vec::as_slice) {
        Some([v]) => v,
        other => panic!("{k}= once in the unit, found {other:?}"),
    }
}

#[test]
fn systemd_analyze_verify_finds_nothing_to_say() {
    let dir = tempfile::tempdir().unwrap();
    // The one host-specific line: where the binary is installed.
    let text = unit_text().replace("/usr/bin/patchover", BIN);
    let unit = dir.path().join("patchover.service");
    std::fs::write(&unit, text).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze (Debian's systemd package; scripts/install-deps installs it)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Unknown keys and bad values are warnings with exit 0: any output is a finding.
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify ({}):\n{said}",
        out.status
    );
}

#[test]
fn the_unit_and_the_default_config_agree() {
    let keys = service_keys(&unit_text());
    assert_eq!(one(&keys, "Type"), "notify");
    assert_eq!(one(&keys, "KillMode"), "process");
    assert_eq!(one(&keys, "Delegate"), "yes");
    assert_eq!(one(&keys, "TasksMax"), "infinity");
    assert!(
        !keys.contains_key("RuntimeDirectoryPreserve"),
        "the layout must not depend on systemd keeping the runtime directory"
    );

    // The defaults, as a config without those keys gets them.
    let cfg = patchover_core::Config::parse(
        Path::new("/etc/patchover/patchover.toml"),
        "[network]\nbridge = \"pobr0\"\n",
        &patchover_core::HostFacts {
            cpus: 1,
            memory_mib: 1024,
        },
    )
    .unwrap();
    let daemon = patchover_daemon::DaemonConfig::from_config(&cfg);

    // What systemd removes on stop: the daemon's socket directory and nothing else.
    let runtime = Path::new("/run").join(one(&keys, "RuntimeDirectory"));
    assert_eq!(daemon.socket.parent(), Some(runtime.as_path()));
    assert!(
        !cfg.run_dir.starts_with(&runtime),
        "LC records ({}) inside the RuntimeDirectory {}",
        cfg.run_dir.display(),
        runtime.display()
    );
    // The store (tables, run journal) is the StateDirectory, which systemd never removes.
    let state = Path::new("/var/lib").join(one(&keys, "StateDirectory"));
    assert_eq!(cfg.state_dir, state);
    assert!(cfg.store_path().starts_with(&state));

    // The LCs' cgroups sit in this unit's delegated subtree (no Slice=: system.slice).
    assert!(!keys.contains_key("Slice"));
    assert!(
        cfg.cgroup_parent
            .starts_with("system.slice/patchover.service/"),
        "{}",
        cfg.cgroup_parent
    );

    // ExecStart names the config whose defaults these are.
    assert!(one(&keys, "ExecStart").contains("--config /etc/patchover/patchover.toml serve"));
}

#[test]
fn the_hardening_leaves_what_lcs_need() {
    let keys = service_keys(&unit_text());
    // Kept out (docs/daemon.md, "Under systemd"): each makes a private mount, UTS, network or
    // IPC namespace for the daemon, a device or IP policy on the cgroup subtree the LCs live
    // in, or a seccomp filter the LCs inherit.
    for k in [
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "PrivateNetwork",
        "PrivateIPC",
        "PrivateUsers",
        "PrivateMounts",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectClock",
        "ProtectHostname",
        "ProtectProc",
        "ProcSubset",
        "ReadWritePaths",
        "ReadOnlyPaths",
        "InaccessiblePaths",
        "TemporaryFileSystem",
        "MountFlags",
        "DevicePolicy",
        "DeviceAllow",
        "IPAddressDeny",
        "RestrictNamespaces",
        "RestrictAddressFamilies",
        "SystemCallFilter",
        "SystemCallArchitectures",
        "MemoryDenyWriteExecute",
        "RestrictSUIDSGID",
        "NoNewPrivileges",
        "LockPersonality",
        "RestrictRealtime",
    ] {
        assert!(!keys.contains_key(k), "{k}= would break LCs");
    }
    let dropped = one(&keys, "CapabilityBoundingSet")
        .strip_prefix('~')
        .expect("a drop list (~CAP_…)");
    for needed in [
        "CAP_SYS_ADMIN",
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_SYS_BOOT",
        "CAP_SYS_CHROOT",
        "CAP_SYS_PTRACE",
        "CAP_SYS_RESOURCE",
        "CAP_MKNOD",
        "CAP_DAC_OVERRIDE",
        "CAP_SETUID",
        "CAP_SETGID",
        "CAP_CHOWN",
        "CAP_NET_BIND_SERVICE",
    ] {
        assert!(
            !dropped.split_whitespace().any(|c| c == needed),
            "{needed} is needed by patchover or by an LC"
        );
    }
    // The drop list is what the daemon tests run the daemon under (setpriv), so keep it in
    // names setpriv knows.
    for c in dropped.split_whitespace() {
        assert!(c.starts_with("CAP_"), "{c}");
    }
}
