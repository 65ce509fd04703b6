//! `patchover bundle …` through the real binary: keygen, create, sign, verify (with --pubkey
//! and with the config's `[bundles] trusted_keys`), inspect, all with --json; a tampered
//! bundle and an untrusted key exit with code 2; Debian's `minisign` verifies our signature.

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_patchover");

fn po(config: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("PATCHOVER_KEY_PASSWORD")
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

#[test]
fn bundle_verbs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = |p: &str| d.join(p).to_str().unwrap().to_owned();
    let config = d.join("patchover.toml");
    std::fs::write(
        &config,
        format!(
            r#"state_dir = "{state}"
run_dir = "{run}"

[network]
bridge = "pobr0"

[[lc]]
id = "lc1"
cpu = 0
cpu_share = 50
memory_mib = 64
system_disk = {{ path = "{sys}" }}

[bundles]
trusted_keys = ["{key}"]
"#,
            state = s("state"),
            run = s("run"),
            sys = s("sys"),
            key = s("release.pub"),
        ),
    )
    .unwrap();

    let k = json(&po(
        &config,
        &[
            "--json",
            "bundle",
            "keygen",
            "--public",
            &s("release.pub"),
            "--secret",
            &s("release.key"),
        ],
    ));
    let key_id = k["key_id"].as_str().unwrap().to_owned();
    assert_eq!(key_id.len(), 16);
    assert_eq!(k["encrypted"], false);

    std::fs::create_dir_all(d.join("src/payload")).unwrap();
    std::fs::write(
        d.join("src/manifest.toml"),
        "format = 1\nid = \"cli-1\"\ntitle = \"CLI test\"\ncategory = \"bugfix\"\nseverity = \"low\"\n\
         published = 2026-11-20T10:00:00Z\n\n[[step]]\nkind = \"script\"\nfile = \"fix.sh\"\n",
    )
    .unwrap();
    std::fs::write(d.join("src/payload/fix.sh"), "echo fixed\n").unwrap();
    let c = json(&po(
        &config,
        &[
            "--json",
            "bundle",
            "create",
            &s("src"),
            "-o",
            &s("b.tar.zst"),
        ],
    ));
    assert_eq!(c["id"], "cli-1");
    let sha = c["sha256"].as_str().unwrap().to_owned();

    // Unsigned: verify refuses with exit code 2 and says how to fix it.
    let o = po(&config, &["bundle", "verify", &s("b.tar.zst")]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no signature"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    let signed = json(&po(
        &config,
        &[
            "--json",
            "bundle",
            "sign",
            &s("b.tar.zst"),
            "--key",
            &s("release.key"),
        ],
    ));
    assert_eq!(signed["key_id"], key_id.as_str());

    // Trusted keys from the config.
    let v = json(&po(
        &config,
        &["--json", "bundle", "verify", &s("b.tar.zst")],
    ));
    assert_eq!(v["verified"], true);
    assert_eq!(v["sha256"], sha.as_str());
    assert_eq!(v["manifest"]["category"], "bugfix");
    // And from --pubkey.
    let v = json(&po(
        &config,
        &[
            "--json",
            "bundle",
            "verify",
            &s("b.tar.zst"),
            "--pubkey",
            &s("release.pub"),
        ],
    ));
    assert_eq!(v["signature"]["key_id"], key_id.as_str());

    let i = json(&po(
        &config,
        &["--json", "bundle", "inspect", &s("b.tar.zst")],
    ));
    assert_eq!(i["manifest"]["id"], "cli-1");
    assert_eq!(i["signed_by"], key_id.as_str());
    assert!(
        i["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["path"] == "payload/fix.sh")
    );
    let text = po(&config, &["bundle", "inspect", &s("b.tar.zst")]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("0. script fix.sh"));

    // Debian's minisign accepts our signature.
    let m = Command::new("minisign")
        .arg("-V")
        .arg("-p")
        .arg(d.join("release.pub"))
        .arg("-m")
        .arg(d.join("b.tar.zst"))
        .output()
        .expect("minisign installed (apt-get install minisign)");
    assert!(m.status.success(), "{}", String::from_utf8_lossy(&m.stderr));

    // A key the config does not trust.
    json(&po(
        &config,
        &[
            "--json",
            "bundle",
            "keygen",
            "--public",
            &s("other.pub"),
            "--secret",
            &s("other.key"),
        ],
    ));
    let o = po(
        &config,
        &[
            "--json",
            "bundle",
            "verify",
            &s("b.tar.zst"),
            "--pubkey",
            &s("other.pub"),
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    let e: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(e["error"].as_str().unwrap().contains("unknown key"), "{e}");

    // Tampered: one byte flipped.
    let mut bytes = std::fs::read(d.join("b.tar.zst")).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(d.join("b.tar.zst"), &bytes).unwrap();
    let o = po(&config, &["bundle", "verify", &s("b.tar.zst")]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("changed after it was signed"));

    // keygen never overwrites a key.
    let o = po(
        &config,
        &[
            "bundle",
            "keygen",
            "--public",
            &s("release.pub"),
            "--secret",
            &s("new.key"),
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(!d.join("new.key").exists());
}
