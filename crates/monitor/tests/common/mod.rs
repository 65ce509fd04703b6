//! Real servers on loopback for the monitor's tests: a small HTTP(S) server (std, one thread
//! per connection, with misbehaving routes; HTTPS through rustls), aiosmtpd delivering to a Maildir, and dovecot
//! serving IMAP from a passwd file. Each picks a free port, runs in its own temp dir, and is
//! stopped when dropped.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use patchover_bundle::create::{create_bundle, sign_bundle};
use patchover_bundle::keys::{SigningKey, generate_keypair};
use patchover_monitor::monitor::{PatchStarter, RunHandle, StartError};

// ---------------------------------------------------------------- keys and bundles

pub struct Key {
    pub public: PathBuf,
    pub secret: PathBuf,
    pub signing: SigningKey,
}

impl Key {
    pub fn new(dir: &Path, name: &str) -> Key {
        let public = dir.join(format!("{name}.pub"));
        let secret = dir.join(format!("{name}.key"));
        generate_keypair(&public, &secret, None).unwrap();
        let signing = SigningKey::from_file(&secret, None).unwrap();
        Key {
            public,
            secret,
            signing,
        }
    }
}

/// Makes and signs `<out_dir>/<id>.tar.zst`.
pub fn bundle(
    work: &Path,
    out_dir: &Path,
    id: &str,
    category: &str,
    lcs: &[&str],
    key: &Key,
) -> PathBuf {
    let src = work.join(format!("src-{id}"));
    std::fs::create_dir_all(src.join("payload")).unwrap();
    let targets = if lcs.is_empty() {
        String::new()
    } else {
        format!(
            "[targets]\nlcs = [{}]\n",
            lcs.iter()
                .map(|l| format!("\"{l}\""))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    std::fs::write(
        src.join("manifest.toml"),
        format!(
            "format = 1\nid = \"{id}\"\ntitle = \"test patch {id}\"\ncategory = \"{category}\"\nseverity = \"high\"\npublished = 2026-11-20T10:00:00Z\n{targets}\n[[step]]\nkind = \"script\"\nfile = \"run.sh\"\n"
        ),
    )
    .unwrap();
    let script = src.join("payload/run.sh");
    std::fs::write(&script, "#!/bin/sh\necho patched\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(out_dir).unwrap();
    let out = out_dir.join(format!("{id}.tar.zst"));
    create_bundle(&src, &out).unwrap();
    sign_bundle(&out, &key.signing).unwrap();
    out
}

// ---------------------------------------------------------------- HTTP

#[derive(Clone)]
pub enum Route {
    /// A file with an ETag; `If-None-Match` with it gets 304.
    File {
        body: Vec<u8>,
        etag: String,
    },
    Redirect(String),
    /// Headers at once, then one body byte per `delay`.
    Slow {
        body: Vec<u8>,
        delay: Duration,
    },
}

pub struct HttpServer {
    pub port: u16,
    /// `https` when the server speaks TLS.
    scheme: &'static str,
    routes: Arc<Mutex<HashMap<String, Route>>>,
    /// (path, status) of every request served.
    pub log: Arc<Mutex<Vec<(String, u16)>>>,
    stop: Arc<AtomicBool>,
}

impl HttpServer {
    pub fn start() -> HttpServer {
        HttpServer::start_with(None)
    }

    /// An HTTPS server with `certs`' server certificate (rustls).
    pub fn start_tls(certs: &Certs) -> HttpServer {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&certs.cert)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(&certs.key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        HttpServer::start_with(Some(Arc::new(cfg)))
    }

    fn start_with(tls: Option<Arc<rustls::ServerConfig>>) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let routes: Arc<Mutex<HashMap<String, Route>>> = Arc::default();
        let log: Arc<Mutex<Vec<(String, u16)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (r, l, s) = (routes.clone(), log.clone(), stop.clone());
        let scheme = if tls.is_some() { "https" } else { "http" };
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let (r, l, s, tls) = (r.clone(), l.clone(), s.clone(), tls.clone());
                std::thread::spawn(move || match tls {
                    None => serve(conn, &r, &l, &s),
                    Some(cfg) => {
                        let Ok(session) = rustls::ServerConnection::new(cfg) else {
                            return;
                        };
                        serve(rustls::StreamOwned::new(session, conn), &r, &l, &s);
                    }
                });
            }
        });
        HttpServer {
            port,
            scheme,
            routes,
            log,
            stop,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://127.0.0.1:{}{path}", self.scheme, self.port)
    }

    pub fn route(&self, path: &str, route: Route) {
        self.routes.lock().unwrap().insert(path.to_owned(), route);
    }

    /// Serves every file in `dir` under `prefix/`.
    pub fn serve_dir(&self, dir: &Path, prefix: &str) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            if !e.path().is_file() {
                continue;
            }
            let body = std::fs::read(e.path()).unwrap();
            let etag = format!("\"{:x}\"", fxhash(&body));
            self.route(
                &format!("{prefix}/{}", e.file_name().to_string_lossy()),
                Route::File { body, etag },
            );
        }
    }

    pub fn hits(&self, path: &str) -> Vec<u16> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, s)| *s)
            .collect()
    }
}

fn fxhash(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x100_0000_01b3)
    })
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(
    mut c: impl Read + Write,
    routes: &Mutex<HashMap<String, Route>>,
    log: &Mutex<Vec<(String, u16)>>,
    stop: &AtomicBool,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let path = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("/")
        .to_owned();
    let inm = text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("if-none-match")
            .then(|| v.trim().to_owned())
    });
    let route = routes.lock().unwrap().get(&path).cloned();
    // The request is logged when it arrives, before its answer is written: an answer the
    // client stops reading (a huge or slow one) ends only when the client goes, and a test
    // that looks at the log right after a round must see that round's requests.
    let status = match &route {
        None => 404,
        Some(Route::File { etag, .. }) if inm.as_deref() == Some(etag.as_str()) => 304,
        Some(Route::File { .. }) | Some(Route::Slow { .. }) => 200,
        Some(Route::Redirect(_)) => 302,
    };
    log.lock().unwrap().push((path, status));
    match route {
        None => {
            let _ = c.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
        Some(Route::File { body, etag }) => {
            if inm.as_deref() == Some(etag.as_str()) {
                let _ = c.write_all(
                    format!(
                        "HTTP/1.1 304 Not Modified\r\nETag: {etag}\r\nConnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                );
            } else {
                let _ = c.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: {etag}\r\nLast-Modified: Fri, 20 Nov 2026 10:00:00 GMT\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .as_bytes(),
                );
                let _ = c.write_all(&body);
            }
        }
        Some(Route::Redirect(to)) => {
            let _ = c.write_all(
                format!("HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
            );
        }
        Some(Route::Slow { body, delay }) => {
            let _ = c.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            );
            for b in body {
                if stop.load(Ordering::SeqCst) || c.write_all(&[b]).is_err() {
                    break;
                }
                std::thread::sleep(delay);
            }
        }
    }
    let _ = c.flush();
}

// ---------------------------------------------------------------- processes

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16, what: &str, child: &mut Child) {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(15) {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{what} exited early: {st}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on 127.0.0.1:{port} within 15 s");
}

/// aiosmtpd's Controller with its stock Maildir handler, STARTTLS and AUTH as asked.
const SMTP_SERVER_PY: &str = r#"
import ssl, sys, time
from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Mailbox
from aiosmtpd.smtp import AuthResult, LoginPassword
port, maildir, cert, key, user, pw = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
kw = {}
if cert:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    kw.update(tls_context=ctx, require_starttls=True)
if user:
    def check(server, session, envelope, mechanism, data):
        ok = isinstance(data, LoginPassword) and data.login.decode() == user and data.password.decode() == pw
        return AuthResult(success=ok, handled=False)
    kw.update(authenticator=check, auth_required=True, auth_require_tls=bool(cert))
c = Controller(Mailbox(maildir), hostname="127.0.0.1", port=port, **kw)
c.start()
while True:
    time.sleep(3600)
"#;

/// aiosmtpd on loopback delivering every mail into a Maildir.
pub struct SmtpServer {
    pub port: u16,
    pub maildir: PathBuf,
    child: Child,
}

impl SmtpServer {
    pub fn start(dir: &Path) -> SmtpServer {
        SmtpServer::start_with(dir, None, None)
    }

    /// With `tls`, STARTTLS is offered and required; with `auth` (user, password), AUTH is
    /// required (only after STARTTLS when `tls` is given).
    pub fn start_with(dir: &Path, tls: Option<&Certs>, auth: Option<(&str, &str)>) -> SmtpServer {
        let port = free_port();
        let maildir = dir.join("smtp-maildir");
        let s = |p: Option<&PathBuf>| p.map(|p| p.display().to_string()).unwrap_or_default();
        let (user, pw) = auth.unwrap_or(("", ""));
        let mut child = Command::new("/usr/bin/python3")
            .args(["-c", SMTP_SERVER_PY, &port.to_string()])
            .arg(&maildir)
            .args([s(tls.map(|c| &c.cert)), s(tls.map(|c| &c.key))])
            .args([user, pw])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3-aiosmtpd is needed (apt-get install python3-aiosmtpd)");
        wait_port(port, "aiosmtpd", &mut child);
        SmtpServer {
            port,
            maildir,
            child,
        }
    }

    /// Every delivered mail, oldest first.
    pub fn mails(&self) -> Vec<Vec<u8>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.maildir.join("new"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        files.iter().map(|f| std::fs::read(f).unwrap()).collect()
    }

    /// Waits until `n` mails arrived.
    pub fn wait_mails(&self, n: usize, within: Duration) -> Vec<Vec<u8>> {
        let t0 = Instant::now();
        loop {
            let m = self.mails();
            if m.len() >= n || t0.elapsed() > within {
                return m;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// dovecot on loopback (plain IMAP), one user `po` with password `imap-pw`, Maildir storage.
pub struct ImapServer {
    pub port: u16,
    pub dir: PathBuf,
    child: Child,
}

pub const IMAP_USER: &str = "po";
pub const IMAP_PASSWORD: &str = "imap-pw";

impl ImapServer {
    pub fn start(dir: &Path) -> ImapServer {
        ImapServer::start_with(dir, None)
    }

    /// With `tls`, dovecot offers STARTTLS with that certificate and refuses plain logins.
    pub fn start_with(dir: &Path, tls: Option<&Certs>) -> ImapServer {
        let port = free_port();
        let d = dir.join("dovecot");
        let mail = d.join("mail");
        std::fs::create_dir_all(&mail).unwrap();
        // The login and mail processes run as unprivileged users: let them through.
        for p in [dir, d.as_path()] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::os::unix::fs::chown(&mail, Some(65534), Some(65534)).unwrap();
        std::fs::write(
            d.join("passwd"),
            format!("{IMAP_USER}:{{PLAIN}}{IMAP_PASSWORD}\n"),
        )
        .unwrap();
        let conf = format!(
            r#"base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = imap
listen = 127.0.0.1
{ssl}
auth_mechanisms = plain login
first_valid_uid = 1
mail_location = maildir:{d}/mail/%u
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/passwd
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534 home={d}/mail/%u
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
"#,
            d = d.display(),
            ssl = match tls {
                None => "ssl = no\ndisable_plaintext_auth = no".to_owned(),
                Some(c) => format!(
                    "ssl = required\nssl_cert = <{}\nssl_key = <{}\ndisable_plaintext_auth = yes",
                    c.cert.display(),
                    c.key.display()
                ),
            },
        );
        std::fs::write(d.join("dovecot.conf"), conf).unwrap();
        let mut child = Command::new("/usr/sbin/dovecot")
            .arg("-F")
            .arg("-c")
            .arg(d.join("dovecot.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dovecot is needed (apt-get install dovecot-imapd)");
        wait_port(port, "dovecot", &mut child);
        ImapServer {
            port,
            dir: d,
            child,
        }
    }
}

impl Drop for ImapServer {
    fn drop(&mut self) {
        // SIGTERM: the master stops its children and removes its pid file.
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet, so the
        // pid cannot have been reused.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- TLS

/// A test CA and a server certificate it signed for localhost / 127.0.0.1 (openssl CLI).
pub struct Certs {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn certs(dir: &Path) -> Certs {
    let d = dir.join("tls");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&d)
            .output()
            .expect("openssl is needed");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=patchover test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    run(&a);
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "srv.key",
        "-out",
        "srv.csr",
        "-subj",
        "/CN=localhost",
    ]);
    run(&a);
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "srv.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    // dovecot's login process reads the key as root before dropping privileges; fine at 0644
    // in a throwaway test dir.
    std::fs::set_permissions(d.join("srv.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    Certs {
        ca: d.join("ca.pem"),
        cert: d.join("srv.pem"),
        key: d.join("srv.key"),
    }
}

// ---------------------------------------------------------------- the patch starter

/// Records every call instead of starting a cycle (the real cycle is tested with the
/// orchestrator).
#[derive(Default)]
pub struct RecordingStarter {
    pub calls: Mutex<Vec<(String, Vec<String>)>>,
}

impl PatchStarter for RecordingStarter {
    fn start(&self, lc: &str, bundle_ids: &[String]) -> Result<RunHandle, StartError> {
        self.calls
            .lock()
            .unwrap()
            .push((lc.to_owned(), bundle_ids.to_vec()));
        Ok(RunHandle {
            lc: lc.to_owned(),
            bundles: bundle_ids.to_vec(),
            pid: None,
        })
    }
}

// ---------------------------------------------------------------- replies

/// A reply as a mail client writes it: threading headers, the answer on top, the notice
/// quoted below.
pub fn client_reply(
    from: &str,
    notice: &mail_parser::Message<'_>,
    decision: &str,
    code: &str,
) -> Vec<u8> {
    let mid = notice.message_id().unwrap();
    let quoted: String = notice
        .body_text(0)
        .unwrap()
        .lines()
        .map(|l| format!("> {l}\r\n"))
        .collect();
    format!(
        "From: The Admin <{from}>\r\nTo: patchover@example.org\r\nSubject: Re: {subject}\r\n\
Date: Fri, 20 Nov 2026 11:00:00 +0000\r\nMessage-ID: <reply-{n}@example.org>\r\n\
In-Reply-To: <{mid}>\r\nReferences: <{mid}>\r\nMIME-Version: 1.0\r\n\
Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
Decision: {decision}\r\nCode: {code}\r\n\r\nOn Fri, 20 Nov 2026, patchover wrote:\r\n{quoted}",
        subject = notice.subject().unwrap(),
        n = code.len() + decision.len() + from.len(),
    )
    .into_bytes()
}

pub fn append(cfg: &patchover_monitor::MonitorConfig, mails: &[Vec<u8>]) {
    let mut inbox = patchover_monitor::mailbox::Inbox::open(cfg.imap.as_ref().unwrap()).unwrap();
    for m in mails {
        inbox.append(m).unwrap();
    }
    inbox.logout();
}
