//! The Debian verbs' bad input, through the real binary and without the network (fast, default
//! tier): `bundle from-apt` on an LC that is not Debian, `image build-debian` with a bad package
//! name or onto a non-empty directory. Each exits with 2, says what is wrong and writes nothing.

mod common;

use std::fs;

use common::{Topo, po};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn from_apt_on_an_lc_without_dpkg_is_bad_input_and_writes_nothing() {
    let t = Topo::new(&[(0, 40, 96)]);
    t.build_image(0, "1.0.0");
    let a = &t.lcs[0].id;
    let out = t.dir.path().join("b.tar.zst");
    let o = t.po(&["bundle", "from-apt", a, "-o", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("{a}'s disk has no dpkg status")),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
    let o = t.po(&[
        "bundle",
        "from-apt",
        "nosuchlc",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = t.po(&[
        "bundle",
        "from-apt",
        a,
        "-o",
        out.to_str().unwrap(),
        "--source",
        "deb-src http://x/ bookworm main",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("invalid --source"), "{}", stderr(&o));
}

#[test]
fn build_debian_refuses_bad_names_and_a_non_empty_directory_before_any_work() {
    let t = tempfile::tempdir().unwrap();
    let cfg = t.path().join("none.toml");
    let dir = t.path().join("sys");
    let o = po(
        &cfg,
        &[
            "image",
            "build-debian",
            dir.to_str().unwrap(),
            "--packages",
            "nginx;rm",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("invalid package name"),
        "{}",
        stderr(&o)
    );
    let o = po(
        &cfg,
        &[
            "image",
            "build-debian",
            dir.to_str().unwrap(),
            "--packages",
            "nginx",
            "--suite",
            "../x",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(!dir.exists());
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("keep"), "x").unwrap();
    let o = po(
        &cfg,
        &[
            "image",
            "build-debian",
            dir.to_str().unwrap(),
            "--packages",
            "nginx",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    assert_eq!(fs::read_to_string(dir.join("keep")).unwrap(), "x");
}
