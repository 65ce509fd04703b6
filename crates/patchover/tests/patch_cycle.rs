//! The whole patch cycle (seed fig. 2, 7) on real LCs under load: the demo service v1.0.0 is
//! patched to v1.0.1 while a client writes, with no failed request and no acknowledged write
//! lost; failures before the switch leave the service where it was; a rollback hands it back.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Client, Topo, http, http_ready};

fn sha256_hex(data: &[u8]) -> String {
    // sha256 via the system tool keeps the test free of extra crates.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("x");
    fs::write(&f, data).unwrap();
    let out = std::process::Command::new("sha256sum").arg(&f).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_owned()
}

/// A topology of two LCs, a signing key, and the config that trusts it.
struct Cycle {
    t: Topo,
    key: PathBuf,
}

impl Cycle {
    fn new(n_lcs: usize, extra: &str) -> Cycle {
        let lcs: Vec<(u32, u32, u64)> = (0..n_lcs).map(|i| (i as u32 % 2, 40, 96)).collect();
        let t = Topo::new(&lcs);
        let key = t.dir.path().join("release.key");
        let pubkey = t.dir.path().join("release.pub");
        t.po_ok(&["bundle", "keygen", "--public", pubkey.to_str().unwrap(), "--secret", key.to_str().unwrap()]);
        t.write_config(&format!("\n[bundles]\ntrusted_keys = [\"{}\"]\n{extra}", pubkey.display()));
        t.build_image(0, "1.0.0");
        // The standby's disks exist (any content): the run replaces them with the copy.
        for l in &t.lcs[1..] {
            fs::create_dir_all(&l.sys).unwrap();
            fs::create_dir_all(&l.app).unwrap();
        }
        Cycle { t, key }
    }

    /// Makes, signs and imports a bundle; `steps` is the manifest's step/check part.
    fn bundle(&self, id: &str, steps: &str, payload: &[(&str, &[u8])]) {
        let dir = self.t.dir.path().join(format!("b-{id}"));
        fs::create_dir_all(dir.join("payload")).unwrap();
        for (name, data) in payload {
            fs::write(dir.join("payload").join(name), data).unwrap();
        }
        fs::write(
            dir.join("manifest.toml"),
            format!(
                "format = 1\nid = \"{id}\"\ntitle = \"test bundle {id}\"\ncategory = \"security\"\nseverity = \"high\"\npublished = 2026-11-25T00:00:00Z\n{steps}"
            ),
        )
        .unwrap();
        let file = self.t.dir.path().join(format!("{id}.po"));
        self.t.po_ok(&["bundle", "create", dir.to_str().unwrap(), "-o", file.to_str().unwrap()]);
        self.t.po_ok(&["bundle", "sign", file.to_str().unwrap(), "--key", self.key.to_str().unwrap()]);
        self.t.po_ok(&["patches", "import", file.to_str().unwrap(), "--mark"]);
    }

    /// The bundle that upgrades the demo service from 1.0.0 to 1.0.1.
    fn upgrade_bundle(&self) {
        let steps = format!(
            "[[step]]\nkind = \"replace\"\npath = \"/etc/demo/version\"\nfile = \"version\"\nold_sha256 = \"{}\"\n\n[[check]]\nkind = \"file_hash\"\npath = \"/etc/demo/version\"\nsha256 = \"{}\"\n\n[[check]]\nkind = \"command_output\"\ncommand = [\"/bin/cat\", \"/etc/demo/version\"]\ncontains = \"1.0.1\"\n",
            sha256_hex(b"1.0.0\n"),
            sha256_hex(b"1.0.1\n")
        );
        self.bundle("demo-1.0.1", &steps, &[("version", b"1.0.1\n")]);
    }

    fn start_service(&self) {
        let a = &self.t.lcs[0].id;
        self.t.po_ok(&["lc", "boot", a]);
        self.t.po_ok(&["service", "assign", a]);
    }
}

/// A client that writes (and reads back) without pause until stopped; every request has a
/// deadline, so a hung request counts as failed.
struct Load {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<(u64, Vec<String>, BTreeMap<String, String>)>>,
}

impl Load {
    fn start(client: &Client, service: String) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let ns = format!("/run/netns/{}", client.name);
        let handle = std::thread::spawn(move || {
            let f = fs::File::open(&ns).unwrap();
            nix::sched::setns(std::os::fd::AsFd::as_fd(&f), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let mut ok = 0u64;
            let mut failures = Vec::new();
            let mut acked = BTreeMap::new();
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                let key = format!("k{n}");
                let val = format!("v{n}");
                let t = Instant::now();
                match http(&service, "PUT", &format!("/kv/{key}"), val.as_bytes()) {
                    Ok((201, _)) if t.elapsed() < Duration::from_secs(2) => {
                        ok += 1;
                        acked.insert(key.clone(), val);
                    }
                    Ok((status, body)) => failures.push(format!("PUT {key}: {status} {}", String::from_utf8_lossy(&body))),
                    Err(e) => failures.push(format!("PUT {key}: {e} after {:?}", t.elapsed())),
                }
                if n % 5 == 0 {
                    match http(&service, "GET", "/version", b"") {
                        Ok((200, _)) => ok += 1,
                        Ok((status, _)) => failures.push(format!("GET /version: {status}")),
                        Err(e) => failures.push(format!("GET /version: {e}")),
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (ok, failures, acked)
        });
        Load {
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> (u64, Vec<String>, BTreeMap<String, String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

fn assert_all_there(client: &Client, service: &str, acked: &BTreeMap<String, String>) {
    let service = service.to_owned();
    let acked = acked.clone();
    let lost = client.run(move || {
        acked
            .iter()
            .filter(|(k, v)| !matches!(http(&service, "GET", &format!("/kv/{k}"), b""), Ok((200, b)) if b == v.as_bytes()))
            .map(|(k, _)| k.clone())
            .collect::<Vec<_>>()
    });
    assert!(lost.is_empty(), "{} acknowledged writes lost, e.g. {:?}", lost.len(), &lost[..lost.len().min(5)]);
}

fn version(client: &Client, service: &str) -> String {
    let s = service.to_owned();
    let (st, body) = client.run(move || http_ready(&s, "/version"));
    assert_eq!(st, 200);
    String::from_utf8(body).unwrap().trim().to_owned()
}

#[test]
fn patch_under_load_then_roll_back() {
    let c = Cycle::new(2, "");
    c.upgrade_bundle();
    c.start_service();
    let (a, b) = (c.t.lcs[0].id.clone(), c.t.lcs[1].id.clone());
    let client = Client::new(&c.t.bridge, &c.t.client_addr(0));
    let svc = c.t.service();
    assert_eq!(version(&client, &svc), "1.0.0");

    let load = Load::start(&client, svc.clone());
    std::thread::sleep(Duration::from_millis(300));
    let report = c.t.po_json(&["patch", &a, "--mode", "readdress"]);
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failures, acked) = load.finish();
    assert_eq!(report["outcome"], "ok", "{report:#}");
    assert_eq!(report["standby"], b.as_str());
    assert!(failures.is_empty(), "{} failed requests of {}: {:?}", failures.len(), ok + failures.len() as u64, &failures[..failures.len().min(10)]);
    assert!(ok > 50, "the load ran: {ok}");
    assert_eq!(report["version_before"], "1.0.0");
    assert_eq!(report["version_after"], "1.0.1");
    assert_eq!(report["patches"][0]["status"], "ok");
    assert_eq!(version(&client, &svc), "1.0.1");
    assert_all_there(&client, &svc, &acked);
    // The old LC is stopped and intact; the patch table shows the result on the new LC.
    let list = c.t.po_json(&["lc", "list"]);
    let row = |id: &str| list.as_array().unwrap().iter().find(|r| r["id"] == id).unwrap().clone();
    assert_eq!((row(&a)["state"].clone(), row(&a)["role"].clone()), ("stopped".into(), "standby".into()));
    assert_eq!((row(&b)["state"].clone(), row(&b)["role"].clone()), ("running".into(), "active".into()));
    assert_eq!(fs::read_to_string(c.t.lcs[0].sys.join("etc/demo/version")).unwrap(), "1.0.0\n");
    let p = c.t.po_json(&["patches", "show", "demo-1.0.1"]);
    assert_eq!((p["last_result"].clone(), p["applied_lc"].clone(), p["apply_next"].clone()), ("ok".into(), b.as_str().into(), false.into()));
    let runs = c.t.po_json(&["runs", "show", &report["run_id"].to_string()]);
    let steps: Vec<String> = runs["steps"].as_array().unwrap().iter().filter(|s| s["state"] == "done").map(|s| s["step"].as_str().unwrap().to_owned()).collect();
    assert_eq!(
        steps,
        ["standby_search", "malware_check", "copy_system_disk", "copy_app_disk", "install_patches", "boot_standby", "patch_report", "reboot_standby", "post_checks", "standby_health", "switch", "stop_old"]
    );

    // Hours later: hand the service back, under load, with the writes made since.
    let load = Load::start(&client, svc.clone());
    std::thread::sleep(Duration::from_millis(300));
    let back = c.t.po_json(&["rollback", &a]);
    std::thread::sleep(Duration::from_millis(300));
    let (ok2, failures, acked2) = load.finish();
    assert_eq!(back["outcome"], "ok", "{back:#}");
    assert!(failures.is_empty(), "rollback: {} failed of {}: {:?}", failures.len(), ok2, &failures[..failures.len().min(10)]);
    assert_eq!(version(&client, &svc), "1.0.0");
    assert_all_there(&client, &svc, &acked);
    assert_all_there(&client, &svc, &acked2);
}

#[test]
fn failures_before_the_switch_leave_the_service_where_it_is() {
    let rules = tempfile::tempdir().unwrap();
    let c = Cycle::new(2, "");
    let (a, b) = (c.t.lcs[0].id.clone(), c.t.lcs[1].id.clone());
    // A bundle whose second step fails.
    c.bundle(
        "broken-1",
        "[[step]]\nkind = \"script\"\nfile = \"ok.sh\"\n\n[[step]]\nkind = \"script\"\nfile = \"fail.sh\"\n",
        &[("ok.sh", b"echo first step ran\n"), ("fail.sh", b"echo about to fail; exit 7\n")],
    );
    c.start_service();
    let client = Client::new(&c.t.bridge, &c.t.client_addr(0));
    let svc = c.t.service();
    let load = Load::start(&client, svc.clone());
    let out = c.t.po(&["--json", "patch", &a]);
    let (ok, failures, acked) = load.finish();
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["outcome"], "failed", "{report:#}");
    assert!(report["error"].as_str().unwrap().contains("patch broken-1 failed"), "{report:#}");
    assert!(failures.is_empty() && ok > 0, "{failures:?}");
    assert_all_there(&client, &svc, &acked);
    let p = c.t.po_json(&["patches", "show", "broken-1"]);
    assert_eq!(p["last_result"], "failed");
    assert!(p["last_output"].as_str().unwrap().contains("about to fail"), "{p}");
    // The standby was released: stopped, and its disk carries no patch script.
    assert_eq!(c.t.po_json(&["lc", "status", &b])["status"]["state"], "stopped");
    assert!(!c.t.lcs[1].sys.join("etc/init.d/S05patchover").exists());
    assert_eq!(c.t.po_json(&["lc", "status", &a])["status"]["state"], "running");

    // No marked patch → refused with exit 2, no run.
    c.t.po_ok(&["patches", "unmark", "broken-1"]);
    let out = c.t.po(&["patch", &a]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no patch is marked"));

    // A YARA hit on the active system disk stops the run before any copy.
    c.upgrade_bundle();
    fs::write(rules.path().join("t.yar"), "rule planted_backdoor { strings: $a = \"PLANTED-BACKDOOR-TEST\" condition: $a }").unwrap();
    let extra = format!("\n[yara]\nrules = \"{}\"\n", rules.path().display());
    let cfg = fs::read_to_string(&c.t.config).unwrap();
    fs::write(&c.t.config, format!("{cfg}{extra}")).unwrap();
    fs::write(c.t.lcs[0].sys.join("usr/bin/backdoor"), "xx PLANTED-BACKDOOR-TEST").unwrap();
    let out = c.t.po(&["--json", "patch", &a]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let err = report["error"].as_str().unwrap();
    assert!(err.contains("planted_backdoor") && err.contains("usr/bin/backdoor"), "{err}");
    assert!(!report["steps"].as_array().unwrap().iter().any(|s| s["step"] == "copy_system_disk"));
    assert_eq!(version(&client, &svc), "1.0.0");
}

#[test]
fn no_standby_is_bad_input_naming_what_each_lacks() {
    let t = Topo::new(&[(0, 40, 96), (1, 40, 32)]);
    t.build_image(0, "1.0.0");
    let (a, b) = (t.lcs[0].id.clone(), t.lcs[1].id.clone());
    t.po_ok(&["lc", "boot", &a]);
    t.po_ok(&["service", "assign", &a]);
    let key = t.dir.path().join("k.key");
    let pubkey = t.dir.path().join("k.pub");
    t.po_ok(&["bundle", "keygen", "--public", pubkey.to_str().unwrap(), "--secret", key.to_str().unwrap()]);
    t.write_config(&format!("\n[bundles]\ntrusted_keys = [\"{}\"]\n", pubkey.display()));
    let c = Cycle { t, key };
    c.upgrade_bundle();
    let out = c.t.po(&["--json", "patch", &a]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let err = report["error"].as_str().unwrap();
    assert!(err.contains(&format!("{b}: needs 96 MiB memory, has 32 MiB")), "{err}");
    assert!(Path::new(&c.t.lcs[0].sys).exists());
}
