//! A local signed apt archive for tests (feature `fixture`): `.deb` files built with
//! `dpkg-deb`, indexed with `apt-ftparchive`, the Release file signed with a throwaway gpg key,
//! served over HTTP on a loopback port by a thread of the test. Nothing depends on what the
//! real Debian archive holds today.
//!
//! Dropping it stops the server and ends the key's gpg-agent.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::sources::Source;

/// A package to build.
#[derive(Debug, Clone, Default)]
pub struct Pkg {
    pub name: String,
    pub version: String,
    pub depends: Option<String>,
    pub conflicts: Option<String>,
    /// (absolute path, content): the package's files.
    pub files: Vec<(String, String)>,
    /// Paths among `files` that are conffiles.
    pub conffiles: Vec<String>,
    /// (version, urgency, text) newest first: usr/share/doc/NAME/changelog.Debian.gz.
    pub changelog: Vec<(String, String, String)>,
}

impl Pkg {
    pub fn new(name: &str, version: &str) -> Pkg {
        Pkg {
            name: name.into(),
            version: version.into(),
            files: vec![(
                format!("/usr/share/{name}/version"),
                format!("{name} {version}\n"),
            )],
            ..Pkg::default()
        }
    }
}

fn sh(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Builds `p` into `out_dir`; returns the `.deb`.
pub fn build_deb(p: &Pkg, out_dir: &Path) -> PathBuf {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    fs::create_dir_all(root.join("DEBIAN")).unwrap();
    let mut control = format!(
        "Package: {}\nVersion: {}\nArchitecture: all\nMaintainer: patchover tests <tests@example.invalid>\nSection: misc\nPriority: optional\nDescription: patchover test package\n",
        p.name, p.version
    );
    if let Some(d) = &p.depends {
        control.push_str(&format!("Depends: {d}\n"));
    }
    if let Some(c) = &p.conflicts {
        control.push_str(&format!("Conflicts: {c}\n"));
    }
    fs::write(root.join("DEBIAN/control"), control).unwrap();
    if !p.conffiles.is_empty() {
        fs::write(
            root.join("DEBIAN/conffiles"),
            p.conffiles
                .iter()
                .map(|c| format!("{c}\n"))
                .collect::<String>(),
        )
        .unwrap();
    }
    for (path, content) in &p.files {
        let f = root.join(path.trim_start_matches('/'));
        fs::create_dir_all(f.parent().unwrap()).unwrap();
        fs::write(f, content).unwrap();
    }
    if !p.changelog.is_empty() {
        let doc = root.join(format!("usr/share/doc/{}", p.name));
        fs::create_dir_all(&doc).unwrap();
        let text: String = p
            .changelog
            .iter()
            .map(|(v, u, t)| {
                format!(
                    "{} ({v}) bookworm-security; urgency={u}\n\n  * {t}\n\n -- patchover tests <tests@example.invalid>  Mon, 07 Dec 2026 10:00:00 +0000\n\n",
                    p.name
                )
            })
            .collect();
        fs::write(doc.join("changelog.Debian"), text).unwrap();
        sh(Command::new("gzip")
            .args(["-9n"])
            .arg(doc.join("changelog.Debian")));
    }
    fs::create_dir_all(out_dir).unwrap();
    let deb = out_dir.join(format!("{}_{}_all.deb", p.name, p.version));
    sh(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zgzip", "-b"])
        .arg(&root)
        .arg(&deb));
    deb
}

/// A rebuild of `package` as installed in the Debian tree `root` (`dpkg-repack`: the same
/// files, control fields and maintainer scripts) at `version`, with a changelog entry of
/// `urgency` on top: an update of a real package (a local security rebuild, say) that
/// changes nothing but its version. Written into `out_dir`; returns the `.deb`.
pub fn repack(root: &Path, package: &str, version: &str, urgency: &str, out_dir: &Path) -> PathBuf {
    let t = tempfile::tempdir().unwrap();
    sh(Command::new("dpkg-repack")
        .current_dir(t.path())
        .arg("--generate")
        .arg(format!("--root={}", root.display()))
        .arg(package));
    let tree = fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("DEBIAN/control").is_file())
        .expect("dpkg-repack made no tree");
    let control = fs::read_to_string(tree.join("DEBIAN/control")).unwrap();
    let mut arch = String::new();
    let control: String = control
        .lines()
        .map(|l| {
            if let Some(a) = l.strip_prefix("Architecture: ") {
                arch = a.trim().to_owned();
            }
            match l.starts_with("Version: ") {
                true => format!("Version: {version}\n"),
                false => format!("{l}\n"),
            }
        })
        .collect();
    fs::write(tree.join("DEBIAN/control"), control).unwrap();
    // The changed changelog would not match the old sums; the file is optional.
    let _ = fs::remove_file(tree.join("DEBIAN/md5sums"));
    let doc = tree.join(format!("usr/share/doc/{package}"));
    let log = doc.join("changelog.Debian.gz");
    let old = match log.is_file() {
        true => sh(Command::new("gzip").arg("-dc").arg(&log)),
        false => Vec::new(),
    };
    fs::create_dir_all(&doc).unwrap();
    let mut text = format!(
        "{package} ({version}) bookworm-security; urgency={urgency}\n\n  * Rebuilt for patchover's tests.\n\n -- patchover tests <tests@example.invalid>  Mon, 07 Dec 2026 10:00:00 +0000\n\n"
    )
    .into_bytes();
    text.extend_from_slice(&old);
    let _ = fs::remove_file(&log);
    fs::write(doc.join("changelog.Debian"), text).unwrap();
    sh(Command::new("gzip")
        .args(["-9n"])
        .arg(doc.join("changelog.Debian")));
    fs::create_dir_all(out_dir).unwrap();
    let deb = out_dir.join(format!("{package}_{version}_{arch}.deb"));
    sh(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zgzip", "-b"])
        .arg(&tree)
        .arg(&deb));
    deb
}

/// The archive: `pool/`, `dists/SUITE/`, a key, and the HTTP server.
pub struct TestArchive {
    pub dir: tempfile::TempDir,
    pub suite: String,
    pub port: u16,
    /// The public key apt is told to trust (`signed-by`).
    pub keyring: PathBuf,
    stop: Arc<AtomicBool>,
    server: Option<JoinHandle<()>>,
    /// Every request's path, in order (the tests count what was downloaded).
    requests: Arc<Mutex<Vec<String>>>,
}

impl TestArchive {
    /// An archive for `suite` with `packages`, signed and served.
    pub fn new(suite: &str, packages: &[Pkg]) -> TestArchive {
        TestArchive::with_pool(suite, |pool| {
            for p in packages {
                build_deb(p, pool);
            }
        })
    }

    /// An archive for `suite` serving `debs` built elsewhere (e.g. by [`repack`]).
    pub fn of_debs(suite: &str, debs: &[PathBuf]) -> TestArchive {
        TestArchive::with_pool(suite, |pool| {
            fs::create_dir_all(pool).unwrap();
            for d in debs {
                fs::copy(d, pool.join(d.file_name().unwrap())).unwrap();
            }
        })
    }

    fn with_pool(suite: &str, fill: impl FnOnce(&Path)) -> TestArchive {
        let dir = tempfile::Builder::new()
            .prefix("po-apt-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        fill(&d.join("www/pool/main"));
        let keyring = d.join("archive-key.gpg");
        make_key(&d.join("gnupg"), &keyring);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let server = {
            let (stop, www, log) = (stop.clone(), d.join("www"), requests.clone());
            std::thread::spawn(move || serve(listener, &www, &stop, &log))
        };
        let a = TestArchive {
            dir,
            suite: suite.into(),
            port,
            keyring,
            stop,
            server: Some(server),
            requests,
        };
        a.publish(&a.dir.path().join("gnupg"));
        a
    }

    /// The apt source line for this archive.
    pub fn source(&self) -> Source {
        Source {
            uri: format!("http://127.0.0.1:{}/", self.port),
            suite: self.suite.clone(),
            components: vec!["main".into()],
            signed_by: Some(self.keyring.display().to_string()),
        }
    }

    /// Indexes the pool and signs the Release file with the key in `gnupg`.
    fn publish(&self, gnupg: &Path) {
        let www = self.dir.path().join("www");
        let dist = www.join("dists").join(&self.suite);
        let bin = dist.join("main/binary-amd64");
        fs::create_dir_all(&bin).unwrap();
        let packages = sh(Command::new("apt-ftparchive")
            .current_dir(&www)
            .args(["packages", "pool"]));
        fs::write(bin.join("Packages"), &packages).unwrap();
        sh(Command::new("gzip")
            .args(["-9nkf"])
            .arg(bin.join("Packages")));
        let release = sh(Command::new("apt-ftparchive")
            .current_dir(&dist)
            .args([
                "-o",
                "APT::FTPArchive::Release::Origin=patchover-test",
                "-o",
                "APT::FTPArchive::Release::Label=patchover-test-security",
                "-o",
            ])
            .arg(format!("APT::FTPArchive::Release::Suite={}", self.suite))
            .arg("-o")
            .arg(format!("APT::FTPArchive::Release::Codename={}", self.suite))
            .args([
                "-o",
                "APT::FTPArchive::Release::Architectures=amd64",
                "-o",
                "APT::FTPArchive::Release::Components=main",
                "release",
                ".",
            ]));
        fs::write(dist.join("Release"), release).unwrap();
        self.sign(gnupg);
    }

    fn sign(&self, gnupg: &Path) {
        let dist = self.dir.path().join("www/dists").join(&self.suite);
        for (args, out) in [
            (&["--clearsign"][..], "InRelease"),
            (&["--detach-sign", "--armor"][..], "Release.gpg"),
        ] {
            sh(Command::new("gpg")
                .arg("--homedir")
                .arg(gnupg)
                .args([
                    "--batch",
                    "--yes",
                    "--pinentry-mode",
                    "loopback",
                    "--passphrase",
                    "",
                ])
                .args(args)
                .arg("-o")
                .arg(dist.join(out))
                .arg(dist.join("Release")));
        }
    }

    /// Every request's path so far.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// How many packages (`.deb` files under `pool/`) were requested so far.
    pub fn package_downloads(&self) -> usize {
        self.requests()
            .iter()
            .filter(|p| p.contains("/pool/") && p.ends_with(".deb"))
            .count()
    }

    /// Adds `packages` to the pool and publishes the archive again (signed with its key): a
    /// new version appears in the archive.
    pub fn add(&self, packages: &[Pkg]) {
        let pool = self.dir.path().join("www/pool/main");
        for p in packages {
            build_deb(p, &pool);
        }
        self.publish(&self.dir.path().join("gnupg"));
    }

    /// Signs the Release file again with a key apt does not trust.
    pub fn resign_with_another_key(&self) {
        let other = self.dir.path().join("gnupg-other");
        make_key(&other, &self.dir.path().join("other-key.gpg"));
        self.sign(&other);
    }
}

impl Drop for TestArchive {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(h) = self.server.take() {
            let _ = h.join();
        }
        for g in ["gnupg", "gnupg-other"] {
            let home = self.dir.path().join(g);
            if home.exists() {
                let _ = Command::new("gpgconf")
                    .arg("--homedir")
                    .arg(&home)
                    .args(["--kill", "all"])
                    .output();
            }
        }
    }
}

fn make_key(home: &Path, public: &Path) {
    fs::create_dir_all(home).unwrap();
    fs::set_permissions(home, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let gpg = || {
        let mut c = Command::new("gpg");
        c.arg("--homedir").arg(home).args([
            "--batch",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
        ]);
        c
    };
    sh(gpg().args([
        "--quick-gen-key",
        "patchover test archive <archive@example.invalid>",
        "ed25519",
        "sign",
        "never",
    ]));
    let key = sh(gpg().arg("--export"));
    fs::write(public, key).unwrap();
}

/// A minimal HTTP/1.1 file server: GET of files under `www`, one request per connection.
/// `%XX` escapes decoded (apt escapes the `+` of a version such as `1.0+po1` as `%2b`); a
/// malformed escape is kept as it is.
fn percent_decoded(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn serve(listener: TcpListener, www: &Path, stop: &AtomicBool, log: &Mutex<Vec<String>>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(mut conn) = conn else { continue };
        let mut reader = BufReader::new(match conn.try_clone() {
            Ok(c) => c,
            Err(_) => continue,
        });
        let mut request = String::new();
        if reader.read_line(&mut request).is_err() {
            continue;
        }
        loop {
            let mut h = String::new();
            match reader.read_line(&mut h) {
                Ok(0) | Err(_) => break,
                Ok(_) if h.trim().is_empty() => break,
                Ok(_) => {}
            }
        }
        let mut words = request.split_whitespace();
        let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or("/"));
        let rel = percent_decoded(path.split('?').next().unwrap_or(""));
        log.lock().unwrap().push(rel.clone());
        let rel = rel.trim_start_matches('/');
        let file = (!rel.split('/').any(|c| c == ".."))
            .then(|| www.join(rel))
            .filter(|f| f.is_file())
            .and_then(|f| fs::read(f).ok());
        let _ = match file {
            Some(body) => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                conn.write_all(head.as_bytes()).and_then(|_| {
                    if method == "HEAD" {
                        Ok(())
                    } else {
                        conn.write_all(&body)
                    }
                })
            }
            None => conn.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            ),
        };
    }
}

/// A directory that looks like a Debian LC's disk to from-apt: `/etc/os-release` of `suite`,
/// a dpkg database with `dpkg` itself (amd64), and `installed` installed by the host's dpkg
/// (`--root`; the test packages have no maintainer scripts).
pub fn fake_root(dir: &Path, suite: &str, installed: &[PathBuf]) {
    for d in [
        "etc",
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
    ] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    fs::write(
        dir.join("etc/os-release"),
        format!("PRETTY_NAME=\"Debian GNU/Linux\"\nID=debian\nVERSION_CODENAME={suite}\n"),
    )
    .unwrap();
    fs::write(
        dir.join("var/lib/dpkg/status"),
        "Package: dpkg\nStatus: install ok installed\nPriority: required\nSection: admin\nMaintainer: x <x@example.invalid>\nArchitecture: amd64\nVersion: 1.21.22\nDescription: Debian package management system\n\n",
    )
    .unwrap();
    fs::write(dir.join("var/lib/dpkg/available"), "").unwrap();
    if !installed.is_empty() {
        sh(Command::new("dpkg")
            .arg(format!("--root={}", dir.display()))
            .args(["--force-not-root", "--force-script-chrootless", "-i"])
            .args(installed));
    }
}
