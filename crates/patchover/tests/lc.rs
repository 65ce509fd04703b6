//! The foundation end to end: real LCs on namespaces and cgroups, booted from the demo image,
//! reached over the bridge from a client namespace, rebooted, stopped, and bad input refused.

mod common;

use std::fs;
use std::path::Path;

use common::{Client, Topo, http, http_ready};

#[test]
fn boot_serve_reboot_keeps_every_write_and_stop_leaves_nothing() {
    let t = Topo::new(&[(0, 50, 128)]);
    t.build_image(0, "1.0.0");
    let id = t.lcs[0].id.clone();
    let addr = t.lcs[0].address.clone();

    let boot = t.po_json(&["lc", "boot", &id]);
    assert_eq!(boot["state"], "running");
    let client = Client::new(&t.bridge, &t.client_addr(0));

    let a = addr.clone();
    let (status, version) = client.run(move || http_ready(&a, "/version"));
    assert_eq!((status, version.as_slice()), (200, b"1.0.0\n".as_slice()));
    let a = addr.clone();
    client.run(move || {
        for k in 0..50 {
            let (s, _) = http(
                &a,
                "PUT",
                &format!("/kv/key{k}"),
                format!("value{k}").as_bytes(),
            )
            .unwrap();
            assert_eq!(s, 201, "write {k} not acknowledged");
        }
    });
    // The writes are on the application disk, as the demo service fsynced them.
    let log = fs::read_to_string(t.lcs[0].app.join("kv.log")).unwrap();
    assert_eq!(log.lines().count(), 50);

    let before = t.pids(&id);
    assert!(before.len() >= 3, "init, agent and service: {before:?}");
    let reboot = t.po_json(&["lc", "reboot", &id]);
    assert_eq!(reboot["state"], "running");
    let after = t.pids(&id);
    assert!(!after.is_empty());
    assert!(
        before.iter().all(|p| !after.contains(p)),
        "every process must be new after a reboot: before {before:?}, after {after:?}"
    );
    let a = addr.clone();
    client.run(move || {
        http_ready(&a, "/health");
        for k in 0..50 {
            let (s, v) = http(&a, "GET", &format!("/kv/key{k}"), b"").unwrap();
            assert_eq!(
                (s, v),
                (200, format!("value{k}").into_bytes()),
                "key{k} lost across the reboot"
            );
        }
    });

    // exec runs inside the LC: its hostname, its PID namespace, its root.
    let out = t.po_json(&["lc", "exec", &id, "--", "cat", "/etc/demo/version"]);
    assert_eq!(out["stdout"], "1.0.0\n");
    let out = t.po_json(&["lc", "exec", &id, "--", "hostname"]);
    assert_eq!(out["stdout"], format!("{id}\n"));
    let out = t.po_json(&[
        "lc",
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo $$; ls /proc | grep -c '^[0-9]'",
    ]);
    let lines: Vec<&str> = out["stdout"].as_str().unwrap().lines().collect();
    assert!(
        lines[0].parse::<u32>().unwrap() < 100,
        "PIDs inside are the LC's own: {lines:?}"
    );

    let stop = t.po_json(&["lc", "stop", &id]);
    assert_eq!(stop["state"], "stopped");
    t.assert_nothing_left(&id);
    let a = addr.clone();
    assert!(
        client
            .run(move || http(&a, "GET", "/version", b""))
            .is_err(),
        "nothing answers after stop"
    );
}

#[test]
fn two_lcs_get_their_own_limits_from_the_kernel() {
    let t = Topo::new(&[(0, 30, 64), (1, 60, 96)]);
    t.build_image(0, "1.0.0");
    t.build_image(1, "1.0.0");
    let (a, b) = (t.lcs[0].id.clone(), t.lcs[1].id.clone());
    t.po_ok(&["lc", "boot", &a]);
    t.po_ok(&["lc", "boot", &b]);

    let read = |ctl: &str, id: &str, file: &str| {
        fs::read_to_string(format!(
            "/sys/fs/cgroup/{ctl}/{}/{id}/{file}",
            t.cgroup_parent
        ))
        .unwrap()
        .trim()
        .to_owned()
    };
    assert_eq!(read("cpu", &a, "cpu.cfs_quota_us"), "30000");
    assert_eq!(read("cpu", &b, "cpu.cfs_quota_us"), "60000");
    assert_eq!(read("cpu", &a, "cpu.cfs_period_us"), "100000");
    assert_eq!(
        read("memory", &a, "memory.limit_in_bytes"),
        (64u64 << 20).to_string()
    );
    assert_eq!(
        read("memory", &b, "memory.limit_in_bytes"),
        (96u64 << 20).to_string()
    );
    assert_eq!(read("cpuset", &a, "cpuset.cpus"), "0");
    assert_eq!(read("cpuset", &b, "cpuset.cpus"), "1");
    // Every process of each LC is in its groups (the service included).
    for id in [&a, &b] {
        let procs = read("memory", id, "cgroup.procs");
        assert!(procs.lines().count() >= 3, "{id}: {procs}");
    }
    // `lc show --json` reports the same kernel values.
    let show = t.po_json(&["lc", "show", &b]);
    assert_eq!(show["limits"]["cpu_quota_us"], 60000);
    assert_eq!(show["limits"]["memory_bytes"], 96u64 << 20);
    let list = t.po_json(&["lc", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|r| r["state"] == "running")
    );

    // The memory limit holds: a shell that buffers 100 MB is killed in LC a (64 MiB) by the
    // kernel's OOM killer, while 20 MB fits.
    let hog = |id: &str, bytes: u64| {
        t.po(&[
            "lc",
            "exec",
            id,
            "--",
            "sh",
            "-c",
            &format!("x=$(head -c {bytes} /dev/zero | tr '\\0' a); echo ${{#x}}"),
        ])
    };
    let out = hog(&a, 100_000_000);
    assert!(!out.status.success(), "100 MB in a 64 MiB LC must not fit");
    let oom = read("memory", &a, "memory.oom_control");
    assert!(
        oom.lines()
            .any(|l| l.starts_with("oom_kill ") && l != "oom_kill 0"),
        "{oom}"
    );
    let out = hog(&a, 20_000_000);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "20000000");

    t.po_ok(&["lc", "stop", &a]);
    t.po_ok(&["lc", "stop", &b]);
    t.assert_nothing_left(&a);
    t.assert_nothing_left(&b);
}

fn assert_bad_input(out: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected exit 2 (bad input): {stderr}"
    );
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let t = Topo::new(&[(0, 20, 64), (1, 20, 64)]);
    t.build_image(0, "1.0.0");
    let (a, b) = (t.lcs[0].id.clone(), t.lcs[1].id.clone());

    assert_bad_input(&t.po(&["lc", "boot", "nosuch"]), "unknown LC \"nosuch\"");
    assert_bad_input(&t.po(&["lc", "stop", &a]), "is not running");

    // LC b's disks do not exist yet.
    assert_bad_input(&t.po(&["lc", "boot", &b]), "does not exist");
    t.assert_nothing_left(&b);
    // A rootfs without an init.
    fs::create_dir_all(&t.lcs[1].sys).unwrap();
    fs::create_dir_all(&t.lcs[1].app).unwrap();
    assert_bad_input(&t.po(&["lc", "boot", &b]), "has no init at /sbin/init");
    t.assert_nothing_left(&b);

    // Booting a running LC leaves it running, with the same init.
    t.po_ok(&["lc", "boot", &a]);
    let pid = t.po_json(&["lc", "status", &a])["pid"].clone();
    assert_bad_input(&t.po(&["lc", "boot", &a]), "is already running");
    assert_eq!(t.po_json(&["lc", "status", &a])["pid"], pid);

    // A second config on the same host that names a's system disk for another LC.
    let other = t.dir.path().join("other.toml");
    fs::write(
        &other,
        format!(
            "state_dir = \"{d}/state2\"\nrun_dir = \"{d}/run\"\ncgroup_parent = \"{cg}\"\n[network]\nbridge = \"{br}\"\n[[lc]]\nid = \"z{s}\"\ncpu_share = 10\nmemory_mib = 32\nsystem_disk = {{ path = \"{sys}\" }}\n",
            d = t.dir.path().display(),
            cg = t.cgroup_parent,
            br = t.bridge,
            s = t.suffix,
            sys = t.lcs[0].sys.display()
        ),
    )
    .unwrap();
    assert_bad_input(
        &common::po(&other, &["lc", "boot", &format!("z{}", t.suffix)]),
        &format!("is in use by LC {a}"),
    );

    // An invalid config: two LCs on one disk, named by file, line and key.
    let bad = t.dir.path().join("bad.toml");
    let text = fs::read_to_string(&t.config).unwrap().replace(
        &t.lcs[1].sys.display().to_string(),
        &t.lcs[0].sys.display().to_string(),
    );
    fs::write(&bad, &text).unwrap();
    let out = common::po(&bad, &["lc", "list"]);
    let line = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(&t.lcs[0].sys.display().to_string()))
        .nth(1)
        .unwrap()
        .0
        + 1;
    assert_bad_input(
        &out,
        &format!("{}:{line}: `lc.{b}.system_disk.path`", bad.display()),
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("two LCs cannot share a disk"));

    t.po_ok(&["lc", "stop", &a]);
    t.assert_nothing_left(&a);
}

/// Issue 18: a typo in any section (`prot`, `intervall`, `rulez`) used to pass `lc list`
/// silently; the whole config is checked at load, and the error names file, line and key.
#[test]
fn config_typo_in_any_section_is_refused_at_load_with_file_and_line() {
    let t = Topo::new(&[(0, 20, 64)]);
    // Without the demo's `[service]`, so that each case can write its own.
    let base = fs::read_to_string(&t.config).unwrap();
    let base = base[..base.find("\n[service]\n").unwrap_or(base.len())]
        .trim_end()
        .to_owned()
        + "\n";
    let base_lines = base.lines().count();
    let cfg = t.dir.path().join("sections.toml");
    let with = |section: &str| {
        fs::write(&cfg, format!("{base}\n{section}")).unwrap();
        common::po(&cfg, &["lc", "list"])
    };
    // The same sections spelled right pass.
    for good in [
        "[service]\nport = 80\nhealth = { kind = \"http\", path = \"/\" }\n",
        "[monitor]\ninterval_secs = 80\n",
        "[yara]\nrules = \"/x\"\n",
    ] {
        let out = with(good);
        assert!(
            out.status.success(),
            "{good:?} refused: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The key is on the second line of the appended text (after the section header).
    let line = base_lines + 3;
    for (bad, key) in [
        ("[service]\nprot = 80\n", "prot"),
        ("[monitor]\nintervall = 80\n", "intervall"),
        ("[yara]\nrulez = \"/x\"\n", "rulez"),
        ("[bundles]\ntrusted_key = []\n", "trusted_key"),
        ("[daemon]\nsokcet = \"/x\"\n", "sokcet"),
    ] {
        let out = with(bad);
        assert_bad_input(&out, &format!("{}:{line}:", cfg.display()));
        assert_bad_input(&out, &format!("unknown field `{key}`"));
    }
    // A value checked beyond its type: at its line, with its key.
    let out = with("[monitor]\ninterval_secs = 0\n");
    assert_bad_input(
        &out,
        &format!("{}:{line}: `monitor.interval_secs`", cfg.display()),
    );
}

#[test]
fn a_running_lc_outlives_patchover_and_is_adopted() {
    let t = Topo::new(&[(0, 20, 64)]);
    t.build_image(0, "1.0.0");
    let id = t.lcs[0].id.clone();
    t.po_ok(&["lc", "boot", &id]);
    let pid = t.po_json(&["lc", "status", &id])["pid"].as_i64().unwrap();
    // Init's parent is not a patchover process: nothing of patchover holds the LC up.
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let ppid: i32 = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let parent = fs::read_to_string(format!("/proc/{ppid}/cmdline")).unwrap_or_default();
    assert!(!parent.contains("patchover"), "init's parent is {parent:?}");
    // A new patchover process finds it, and can stop it.
    let st = t.po_json(&["lc", "status", &id]);
    assert_eq!(st["state"], "running");
    assert_eq!(st["pid"].as_i64(), Some(pid));
    // A command patchover runs in the LC ends with patchover (it must not act after the
    // recovery that follows a crash); what the command started in the background stays.
    let mut exec = std::process::Command::new(common::BIN)
        .env("PATCHOVER_CONFIG", &t.config)
        .args(["lc", "exec", &id, "--", "/bin/sh", "-c"])
        .arg("(sleep 1; echo bg > /tmp/bg) & sleep 1; echo late > /tmp/late")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(400));
    exec.kill().unwrap();
    exec.wait().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let late = t.po(&["lc", "exec", &id, "--", "cat", "/tmp/late"]);
    assert!(
        !late.status.success(),
        "the command outlived the patchover that ran it: {late:?}"
    );
    let bg = t.po_ok(&["lc", "exec", &id, "--", "cat", "/tmp/bg"]);
    assert!(
        bg.contains("bg"),
        "its background job was killed too: {bg:?}"
    );
    // An LC killed behind patchover's back is seen as stopped and boots again cleanly.
    for p in t.pids(&id) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let start = std::time::Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() && start.elapsed().as_secs() < 5 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(t.po_json(&["lc", "status", &id])["state"], "stopped");
    t.po_ok(&["lc", "boot", &id]);
    t.po_ok(&["lc", "stop", &id]);
    t.assert_nothing_left(&id);
}

#[test]
fn disks_and_nics_attach_to_a_running_lc() {
    let t = Topo::new(&[(0, 20, 64)]);
    t.build_image(0, "1.0.0");
    let id = t.lcs[0].id.clone();
    t.po_ok(&["lc", "boot", &id]);
    let extra = t.dir.path().join("extra-disk");
    fs::create_dir_all(&extra).unwrap();
    fs::write(extra.join("hello.txt"), "from the host\n").unwrap();
    t.po_ok(&[
        "lc",
        "attach-disk",
        &id,
        extra.to_str().unwrap(),
        "/mnt/extra",
    ]);
    let out = t.po_json(&["lc", "exec", &id, "--", "cat", "/mnt/extra/hello.txt"]);
    assert_eq!(out["stdout"], "from the host\n");
    // Writes inside land on the host directory.
    t.po_ok(&[
        "lc",
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo back > /mnt/extra/reply.txt",
    ]);
    assert_eq!(
        fs::read_to_string(extra.join("reply.txt")).unwrap(),
        "back\n"
    );

    let port = t.po_json(&["lc", "attach-nic", &id, "eth1", "--address", "10.78.0.5/24"]);
    assert_eq!(port["host_port"], format!("po{id}n1"));
    assert!(
        Path::new(&format!("/sys/class/net/po{id}n1/master")).exists(),
        "on the bridge"
    );
    let out = t.po_json(&[
        "lc", "exec", &id, "--", "ip", "-o", "-4", "addr", "show", "dev", "eth1",
    ]);
    assert!(
        out["stdout"].as_str().unwrap().contains("10.78.0.5/24"),
        "{out}"
    );

    t.po_ok(&["lc", "stop", &id]);
    t.assert_nothing_left(&id);
    assert!(
        !Path::new(&format!("/sys/class/net/po{id}n1")).exists(),
        "second veth left"
    );
}
