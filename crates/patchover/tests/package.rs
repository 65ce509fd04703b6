//! The Debian package (`scripts/deb`, `[package.metadata.deb]` in this crate's Cargo.toml).
//!
//! Default tier: the man pages and completions this binary generates cover every visible
//! verb and pass their tools' checks, and the package's asset list puts the binary where the
//! unit's `ExecStart` runs it and the guest binaries where the lookup finds them.
//! Slow tier (the release build): the .deb unpacked into a scratch root (`dpkg -x`, never
//! onto this host) and run from there (`--version`, `doctor`, `image build-demo`, `config
//! check`) in a private mount namespace whose `/usr` is an overlay of the scratch root's `usr`
//! over the host's, so `/usr/bin/patchover` and `/usr/lib/patchover` are the package's and
//! nothing outside the namespace changes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_patchover");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn generate(verb: &str, dir: &Path) {
    run(Command::new(BIN).args(["internal", verb]).arg(dir));
}

/// The verbs `patchover --help` lists (without `help`).
fn verbs() -> Vec<String> {
    let help = String::from_utf8(run(Command::new(BIN).arg("--help")).stdout).unwrap();
    let list = help.split("Commands:").nth(1).expect("a Commands: section");
    let list = list.split("Options:").next().unwrap();
    let words = list.lines().filter_map(|l| l.split_whitespace().next());
    let verbs: Vec<String> = words.filter(|w| *w != "help").map(str::to_owned).collect();
    assert!(verbs.len() > 10, "{help}");
    verbs
}

#[test]
fn man_pages_cover_every_visible_verb_and_man_finds_nothing_to_say() {
    let dir = tempfile::tempdir().unwrap();
    generate("gen-man", dir.path());
    let mut pages: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    for verb in verbs() {
        assert!(
            pages.contains(&format!("patchover-{verb}.1")),
            "{verb}: {pages:?}"
        );
    }
    for page in [
        "patchover.1",
        "patchover-lc-boot.1",
        "patchover-runs-recover.1",
    ] {
        assert!(pages.iter().any(|p| p == page), "{page}: {pages:?}");
    }
    assert!(!pages.iter().any(|p| p.contains("internal")), "{pages:?}");
    for page in &pages {
        let out = run(Command::new("man")
            .args(["--warnings", "-l", "-E", "UTF-8"])
            .arg(dir.path().join(page))
            .env("MANWIDTH", "80"));
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.trim().is_empty(), "man --warnings on {page}:\n{said}");
    }
    let main = run(Command::new("man")
        .arg("-l")
        .arg(dir.path().join("patchover.1")));
    let text = String::from_utf8_lossy(&main.stdout);
    assert!(
        text.contains("Patch a running service without stopping it"),
        "{text}"
    );
}

#[test]
fn completions_complete_verbs_in_bash_and_exist_for_zsh_and_fish() {
    let dir = tempfile::tempdir().unwrap();
    generate("gen-completions", dir.path());
    let bash = dir.path().join("patchover.bash");
    run(Command::new("bash").arg("-n").arg(&bash));
    // What bash offers after `patchover lc b` and `patchover l`.
    let complete = |words: &str, cur: &str, prev: &str| {
        let script = format!(
            "source {}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
             _patchover patchover {cur} {prev}; echo \"${{COMPREPLY[@]}}\"",
            bash.display()
        );
        let out = run(Command::new("bash").args(["-c", &script]));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    assert_eq!(complete("patchover lc b", "b", "lc"), "boot");
    assert_eq!(complete("patchover l", "l", "patchover"), "lc load");
    // Hidden verbs are not offered.
    assert_eq!(complete("patchover i", "i", "patchover"), "image");
    let zsh = std::fs::read_to_string(dir.path().join("_patchover")).unwrap();
    assert!(zsh.starts_with("#compdef patchover"), "{zsh:.200}");
    let fish = std::fs::read_to_string(dir.path().join("patchover.fish")).unwrap();
    assert!(fish.contains("complete -c patchover"), "{fish:.400}");
    for text in [&zsh, &fish] {
        // Every visible verb, and not the hidden `internal` (its help names what it is for).
        assert!(text.contains("rollback") && !text.contains("start and enter LCs"));
    }
}

/// `[package.metadata.deb]` of this crate.
fn deb_metadata() -> toml::Table {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let manifest: toml::Table = std::fs::read_to_string(&p).unwrap().parse().unwrap();
    manifest["package"]["metadata"]["deb"]
        .as_table()
        .expect("[package.metadata.deb]")
        .clone()
}

/// The assets as (source, where it lands in the package).
fn assets(deb: &toml::Table) -> Vec<(String, String)> {
    let list = deb["assets"].as_array().expect("assets");
    list.iter()
        .map(|a| {
            let a = a.as_array().expect("[source, dest, mode]");
            let source = a[0].as_str().unwrap().to_owned();
            let dest = a[1].as_str().unwrap();
            let name = Path::new(&source).file_name().unwrap().to_string_lossy();
            let dest = match dest.strip_suffix('/') {
                Some(dir) => format!("/{dir}/{name}"),
                None => format!("/{dest}"),
            };
            (source, dest)
        })
        .collect()
}

#[test]
fn the_package_puts_each_part_where_the_unit_the_lookup_and_the_shells_look() {
    let deb = deb_metadata();
    let assets = assets(&deb);
    let landing = |source: &str| {
        let found = assets.iter().find(|(s, _)| s.ends_with(source));
        found
            .unwrap_or_else(|| panic!("{source} not in {assets:?}"))
            .1
            .clone()
    };
    // The unit runs the binary where the package puts it.
    let unit = std::fs::read_to_string(repo().join("packaging/patchover.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    assert_eq!(
        exec.split_whitespace().next(),
        Some(&*landing("target/release/patchover"))
    );
    let units = deb["systemd-units"].as_table().expect("systemd-units");
    let unit_dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(units["unit-scripts"].as_str().unwrap());
    assert!(unit_dir.join("patchover.service").is_file());
    // The guest binaries where the lookup looks after an explicit setting.
    for guest in ["patchover-agent", "patchover-demo"] {
        let at = PathBuf::from(landing(&format!("/{guest}")));
        assert_eq!(
            at.parent().unwrap(),
            Path::new(patchover_image::PACKAGE_GUEST_DIR)
        );
    }
    // Every completion file the package takes is one the binary writes, where each shell
    // looks for it.
    let dir = tempfile::tempdir().unwrap();
    generate("gen-completions", dir.path());
    for (name, dest) in [
        (
            "patchover.bash",
            "/usr/share/bash-completion/completions/patchover",
        ),
        ("_patchover", "/usr/share/zsh/vendor-completions/_patchover"),
        (
            "patchover.fish",
            "/usr/share/fish/vendor_completions.d/patchover.fish",
        ),
    ] {
        assert!(dir.path().join(name).is_file(), "{name} not generated");
        assert_eq!(landing(&format!("/{name}")), dest);
    }
    assert_eq!(landing("/*.1"), "/usr/share/man/man1/*.1");
    // The docs where the unit's Documentation= points.
    assert!(unit.contains("Documentation=file:///usr/share/doc/patchover/daemon.md"));
    assert_eq!(landing("docs/*"), "/usr/share/doc/patchover/*");
    // The licence file is the one the workspace's Cargo.toml names.
    let ws: toml::Table = std::fs::read_to_string(repo().join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        ws["workspace"]["package"]["license"].as_str(),
        Some("Apache-2.0")
    );
    let license = std::fs::read_to_string(repo().join("LICENSE")).unwrap();
    assert!(license.contains("Apache License") && license.contains("Version 2.0"));
    assert_eq!(deb["license-file"][0].as_str(), Some("../../LICENSE"));
}

/// The .deb under test: `$PATCHOVER_DEB` when set (a package built already), otherwise the
/// one `scripts/deb` builds now (a release build: the slow tier).
fn the_deb() -> PathBuf {
    if let Some(deb) = std::env::var_os("PATCHOVER_DEB") {
        return PathBuf::from(deb);
    }
    let mut deb = Command::new(repo().join("scripts/deb"));
    // As from a shell: what the test harness adds (the debug tree's library path, this test's
    // own CARGO_* variables) makes cargo rebuild the whole release tree every time.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        let kept = ["CARGO_HOME", "CARGO_TARGET_DIR"].contains(&&*k);
        if k == "LD_LIBRARY_PATH" || (k.starts_with("CARGO") && !kept) {
            deb.env_remove(&*k);
        }
    }
    let out = run(deb.current_dir(repo()));
    let said = String::from_utf8(out.stdout).unwrap();
    let last = said
        .lines()
        .last()
        .expect("scripts/deb prints the .deb's path");
    repo().join("crates/patchover").join(last.trim())
}

/// `argv` run in a private mount namespace whose `/usr` is the scratch root's `usr` laid
/// over the host's (a read-only overlay): the package's files are where it installs them,
/// the host's C library and tools are still there, and nothing outside changes.
fn in_scratch_usr(root: &Path, argv: &[&str]) -> Output {
    let script =
        r#"mount -t overlay patchover-deb -o "lowerdir=$1/usr:/usr" /usr && shift && exec "$@""#;
    Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(root)
        .args(argv)
        .env_remove("PATCHOVER_GUEST_DIR")
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_deb_unpacked_into_a_scratch_root_runs_from_there_with_its_guest_binaries() {
    let deb = the_deb();
    let fields = run(Command::new("dpkg-deb")
        .arg("-f")
        .arg(&deb)
        .args(["Depends", "Recommends"]));
    let fields = String::from_utf8(fields.stdout).unwrap();
    for pkg in [
        "nftables",
        "iproute2",
        "conntrack",
        "busybox-static",
        "qemu-system-x86",
        "mmdebstrap",
    ] {
        assert!(fields.contains(pkg), "{pkg} not in {fields}");
    }
    let root = tempfile::tempdir().unwrap();
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(root.path()));
    let root = root.path();

    let version = in_scratch_usr(root, &["/usr/bin/patchover", "--version"]);
    assert!(version.status.success(), "{}", text(&version));
    let want = format!("patchover {}", env!("CARGO_PKG_VERSION"));
    assert_eq!(String::from_utf8_lossy(&version.stdout).trim(), want);
    let page = in_scratch_usr(root, &["man", "-w", "patchover-lc-boot"]);
    assert!(
        text(&page).contains("/usr/share/man/man1/patchover-lc-boot.1.gz"),
        "{}",
        text(&page)
    );

    // With $PATCHOVER_GUEST_DIR unset and no build tree near /usr/bin, the package's
    // /usr/lib/patchover is the one place the agent can come from.
    let work = tempfile::tempdir().unwrap();
    let image = work.path().join("sys");
    let built = in_scratch_usr(
        root,
        &[
            "/usr/bin/patchover",
            "image",
            "build-demo",
            image.to_str().unwrap(),
        ],
    );
    assert!(built.status.success(), "{}", text(&built));
    let agent = std::fs::read(image.join(patchover_lc::AGENT_PATH_IN_LC)).unwrap();
    let packaged = std::fs::read(root.join("usr/lib/patchover/patchover-agent")).unwrap();
    assert!(agent == packaged, "the image's agent is not the package's");

    // The same binary outside the namespace, on a host without the package: refused, naming
    // the three places.
    if !Path::new(patchover_image::PACKAGE_GUEST_DIR).exists() {
        let out = Command::new(root.join("usr/bin/patchover"))
            .args(["image", "build-demo"])
            .arg(work.path().join("sys2"))
            .env_remove("PATCHOVER_GUEST_DIR")
            .output()
            .unwrap();
        let said = text(&out);
        assert_eq!(out.status.code(), Some(2), "{said}");
        for part in [
            "cannot find the static guest binary",
            "PATCHOVER_GUEST_DIR",
            "/usr/lib/patchover",
        ] {
            assert!(said.contains(part), "{part}: {said}");
        }
    }

    // doctor, as an operator runs it once the package is in: every check passes on this host,
    // and the agent it finds is the package's.
    let doc = in_scratch_usr(
        root,
        &[
            "/usr/bin/patchover",
            "--json",
            "--config",
            "/nonexistent/po.toml",
            "doctor",
        ],
    );
    assert_eq!(doc.status.code(), Some(0), "{}", text(&doc));
    let v: serde_json::Value = serde_json::from_slice(&doc.stdout).unwrap();
    let checks = v["checks"].as_array().unwrap();
    let agent = checks.iter().find(|c| c["name"] == "patchover-agent");
    let agent = agent.unwrap_or_else(|| panic!("no patchover-agent check: {v:#}"));
    assert_eq!(agent["state"], "ok", "{agent}");
    assert_eq!(
        agent["detail"], "/usr/lib/patchover/patchover-agent",
        "{agent}"
    );

    // The packaged binary checks a config as the installed one would.
    let cfg = work.path().join("patchover.toml");
    std::fs::write(&cfg, "[network]\nbridge = \"pobr0\"\n").unwrap();
    let check = in_scratch_usr(
        root,
        &[
            "/usr/bin/patchover",
            "config",
            "check",
            cfg.to_str().unwrap(),
        ],
    );
    assert!(check.status.success(), "{}", text(&check));
}
