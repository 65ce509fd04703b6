//! `patchover feed publish`, `monitor run-once`, `monitor status`, `approval-code` and
//! `approve` through the real binary, with the feed served by Python's stock static web
//! server (`python3 -m http.server` on loopback): anyone's static server is a patch server.

use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use patchover_bundle::create::{create_bundle, sign_bundle};
use patchover_bundle::keys::{SigningKey, generate_keypair};

const BIN: &str = env!("CARGO_BIN_EXE_patchover");

fn po(config: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn static_server(dir: &Path) -> (Server, u16) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("/usr/bin/python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "http.server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (Server(child), port)
}

fn bundle(d: &Path, out_dir: &Path, id: &str, key: &SigningKey) {
    let src = d.join(format!("src-{id}"));
    std::fs::create_dir_all(src.join("payload")).unwrap();
    std::fs::write(
        src.join("manifest.toml"),
        format!(
            "format = 1\nid = \"{id}\"\ntitle = \"patch {id}\"\ncategory = \"security\"\nseverity = \"critical\"\npublished = 2026-11-20T10:00:00Z\n\n[[step]]\nkind = \"script\"\nfile = \"run.sh\"\n"
        ),
    )
    .unwrap();
    std::fs::write(src.join("payload/run.sh"), "#!/bin/sh\ntrue\n").unwrap();
    let out = out_dir.join(format!("{id}.tar.zst"));
    create_bundle(&src, &out).unwrap();
    sign_bundle(&out, key).unwrap();
}

#[test]
fn publish_poll_and_decide_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = |p: &str| d.join(p).to_str().unwrap().to_owned();
    generate_keypair(&d.join("feed.pub"), &d.join("feed.key"), None).unwrap();
    let key = SigningKey::from_file(&d.join("feed.key"), None).unwrap();
    let feed = d.join("www/feed");
    std::fs::create_dir_all(&feed).unwrap();
    bundle(d, &feed, "cve-1", &key);
    let config = d.join("patchover.toml");

    // feed publish
    let out = json(&po(
        &config,
        &[
            "--json",
            "feed",
            "publish",
            feed.to_str().unwrap(),
            "--key",
            &s("feed.key"),
        ],
    ));
    assert_eq!(out["bundles"], 1);
    assert!(feed.join("index.json.minisig").is_file());

    let (_server, port) = static_server(&d.join("www"));
    std::fs::write(d.join("secret"), "an approval secret for the test\n").unwrap();
    std::fs::set_permissions(d.join("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(
        &config,
        format!(
            r#"state_dir = "{state}"
run_dir = "{run}"

[network]
bridge = "pomon0"

[[lc]]
id = "lc1"
cpu = 0
cpu_share = 50
memory_mib = 64
system_disk = {{ path = "{sys}" }}

[monitor]
secret_file = "{secret}"

[[monitor.feeds]]
name = "local"
url = "http://127.0.0.1:{port}/feed/index.json"
trusted_keys = ["{key}"]
"#,
            state = s("state"),
            run = s("run"),
            sys = s("sys"),
            secret = s("secret"),
            key = s("feed.pub"),
        ),
    )
    .unwrap();

    // run-once: registered, a challenge made (no SMTP configured: not sent).
    let r = json(&po(&config, &["--json", "monitor", "run-once"]));
    assert_eq!(r["feeds"][0]["status"], "fetched", "{r}");
    assert_eq!(r["feeds"][0]["registered"][0]["id"], "cve-1");
    assert_eq!(r["notices"][0]["sent"], false);
    let challenge = r["notices"][0]["challenge"].as_str().unwrap().to_owned();

    // Again: Python's server answers If-Modified-Since with 304.
    let r = json(&po(&config, &["--json", "monitor", "run-once"]));
    assert_eq!(r["feeds"][0]["status"], "not-modified", "{r}");
    assert!(r["notices"].as_array().unwrap().is_empty());

    let st = json(&po(&config, &["--json", "monitor", "status"]));
    assert_eq!(st["challenges"][0]["id"], challenge.as_str());

    // A wrong code is refused with exit code 2; the right one (from approval-code) is taken.
    let bad = po(
        &config,
        &[
            "approve",
            &challenge,
            "--decision",
            "reject all",
            "--code",
            "AAAA-AAAA-AAAA-AAAA-AAAA-AAAA",
        ],
    );
    assert_eq!(
        bad.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let code = json(&po(
        &config,
        &[
            "--json",
            "approval-code",
            &challenge,
            "--decision",
            "reject all",
        ],
    ));
    let code = code["code"].as_str().unwrap().to_owned();
    let d = json(&po(
        &config,
        &[
            "--json",
            "approve",
            &challenge,
            "--decision",
            "reject all",
            "--code",
            &code,
        ],
    ));
    assert_eq!(d["decision"], "reject all");
    assert_eq!(d["patches"][0], "cve-1");
    // Single use.
    let again = po(
        &config,
        &[
            "approve",
            &challenge,
            "--decision",
            "reject all",
            "--code",
            &code,
        ],
    );
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already used"));
}

/// `feed publish --expires` signs the expiry into the index (format 2, issue 22); a value
/// that is neither a duration nor a time, or a time already past, is refused with exit 2 and
/// nothing is written.
#[test]
fn feed_publish_expires_signs_the_expiry_into_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    generate_keypair(&d.join("feed.pub"), &d.join("feed.key"), None).unwrap();
    let key = SigningKey::from_file(&d.join("feed.key"), None).unwrap();
    let feed = d.join("feed");
    std::fs::create_dir_all(&feed).unwrap();
    bundle(d, &feed, "cve-2", &key);
    let config = d.join("none.toml");
    let publish = |expires: &str| {
        po(
            &config,
            &[
                "--json",
                "feed",
                "publish",
                feed.to_str().unwrap(),
                "--key",
                d.join("feed.key").to_str().unwrap(),
                "--expires",
                expires,
            ],
        )
    };
    for (bad, says) in [
        ("tomorrow", "write a duration"),
        ("2020-01-01T00:00:00Z", "is not after the publication time"),
    ] {
        let o = publish(bad);
        assert_eq!(o.status.code(), Some(2), "{o:?}");
        // With --json the error is printed as JSON on stdout.
        let err = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(err.contains(says), "{bad}: {err}");
        assert!(
            !feed.join("index.json").exists(),
            "{bad}: an index was written"
        );
    }
    let out = json(&publish("7d"));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(feed.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["format"], 2);
    assert_eq!(index["expires"], out["expires"]);
    assert_eq!(index["generated"], out["generated"]);
    assert!(out["expires"].as_str().unwrap() > out["generated"].as_str().unwrap());
}

/// Issue 24: an apt feed whose signing key is missing, or not trusted for apt bundles only, is
/// refused when the monitor loads: exit 2, the message names the key and what to do, and
/// nothing ran (no state written).
#[test]
fn an_apt_feeds_key_not_trusted_for_apt_bundles_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = |p: &str| d.join(p).to_str().unwrap().to_owned();
    generate_keypair(&d.join("apt.pub"), &d.join("apt.key"), None).unwrap();
    let config = d.join("patchover.toml");
    let write = |bundles: &str, key: &str| {
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{state}\"\nrun_dir = \"{run}\"\n\n{bundles}\n[monitor]\n\n[[monitor.feeds]]\nname = \"debian\"\nkind = \"apt\"\nsigning_key = \"{key}\"\n",
                state = s("state"),
                run = s("run"),
            ),
        )
        .unwrap();
    };
    let scoped = format!(
        "[[bundles.scoped_keys]]\npath = \"{}\"\nscope = \"apt\"\narchive_keyrings = [\"/usr/share/keyrings/debian-archive-keyring.gpg\"]\n",
        s("apt.pub")
    );
    for (bundles, key, want) in [
        (
            String::new(),
            s("apt.key"),
            "is not trusted for apt bundles",
        ),
        (
            format!("[bundles]\ntrusted_keys = [\"{}\"]\n", s("apt.pub")),
            s("apt.key"),
            "is trusted for every bundle",
        ),
        (
            scoped.clone(),
            s("gone.key"),
            "cannot be used; make a key pair",
        ),
    ] {
        write(&bundles, &key);
        let o = po(&config, &["monitor", "run-once"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(want) && err.contains(&key), "{err}");
        assert!(err.contains("[[bundles.scoped_keys]]"), "{err}");
        assert!(!d.join("state").exists(), "the monitor ran: {err}");
    }
    // Trusted for apt bundles only: the monitor runs (no active LC: nothing to watch).
    write(&scoped, &s("apt.key"));
    let out = json(&po(&config, &["--json", "monitor", "run-once"]));
    assert_eq!(out["feeds"].as_array().map(Vec::len), Some(0), "{out}");
}
