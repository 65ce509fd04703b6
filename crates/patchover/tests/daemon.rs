//! `patchover serve`: the real binary on a socket in a temp dir, driven over HTTP/1.1 by a
//! small client of the test's own. Every route is exercised (runs on their refusal paths;
//! the full cycle is in patch_cycle.rs), the TCP listener's tokens, bad input (malformed,
//! unknown fields, huge bodies, unknown ids, many connections, a stalled client), the
//! OpenAPI document against the server, `/metrics` against what the test did, and SIGTERM.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{BIN, Topo, guest_dir, http_ready};

/// Parsed samples: (metric name, sorted labels) → value.
type Samples = HashMap<(String, Vec<(String, String)>), f64>;

const TOKEN: &str = "test-token-0123456789abcdef";

/// The daemon process; killed on drop if the test did not stop it.
struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Daemon {
    fn start(config: &Path, socket: &Path) -> Daemon {
        Daemon::start_as(config, socket, &[], &[])
    }

    /// Starts `patchover serve` with extra environment, run through `wrap` (e.g. `setpriv
    /// …`), without waiting for its socket.
    fn spawn(config: &Path, socket: &Path, env: &[(&str, &str)], wrap: &[&str]) -> Daemon {
        let mut cmd = match wrap.split_first() {
            None => Command::new(BIN),
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(BIN);
                c
            }
        };
        let child = cmd
            .env("PATCHOVER_CONFIG", config)
            .env("PATCHOVER_GUEST_DIR", guest_dir())
            .env("PATCHOVER_LOG", "info")
            .envs(env.iter().copied())
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start patchover serve");
        Daemon {
            child,
            socket: socket.to_owned(),
        }
    }

    /// [`Daemon::spawn`], then waits until the socket answers.
    fn start_as(config: &Path, socket: &Path, env: &[(&str, &str)], wrap: &[&str]) -> Daemon {
        let d = Daemon::spawn(config, socket, env, wrap);
        let t = Instant::now();
        while UnixStream::connect(socket).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the daemon did not listen on {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn req(&self, method: &str, path: &str, body: Option<&[u8]>) -> Resp {
        let s = UnixStream::connect(&self.socket).expect("connect to the daemon's socket");
        http(
            s,
            method,
            path,
            &[("content-type", "application/json")],
            body,
        )
    }

    fn get(&self, path: &str) -> Resp {
        self.req("GET", path, None)
    }

    fn post(&self, path: &str, body: &str) -> Resp {
        self.req("POST", path, Some(body.as_bytes()))
    }

    fn sigterm(&mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the daemon did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {} {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Asserts an error answer: the status, the stable code, a message.
    fn error(&self, status: u16, code: &str) {
        let v = self.json();
        assert_eq!(self.status, status, "{v}");
        assert_eq!(v["code"], code, "{v}");
        assert!(v["message"].as_str().is_some_and(|m| m.len() > 10), "{v}");
    }
}

/// One HTTP/1.1 request with `Connection: close`; reads the whole answer.
fn http<S: Read + Write>(
    mut s: S,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Resp {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: patchover\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    if let Some(b) = body {
        // A huge body may be refused before it is all sent.
        let _ = s.write_all(b);
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Resp {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .get("transfer-encoding")
        .is_some_and(|t| t == "chunked")
    {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let nl = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let n = usize::from_str_radix(std::str::from_utf8(&rest[..nl]).unwrap().trim(), 16)
                .unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&rest[nl + 2..nl + 2 + n]);
            rest = &rest[nl + 2 + n + 2..];
        }
        body = out;
    }
    Resp {
        status,
        headers,
        body,
    }
}

/// A Prometheus text-format parser: `name{labels} value` samples keyed by name and sorted
/// labels; checks `# TYPE` lines precede their samples.
fn parse_prometheus(text: &str) -> Samples {
    let mut typed = BTreeSet::new();
    let mut out = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let name = it.next().unwrap();
            let kind = it.next().unwrap();
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            typed.insert(name.to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect(line);
        let value: f64 = value.parse().expect(line);
        let (name, labels) = match series.split_once('{') {
            None => (series.to_owned(), Vec::new()),
            Some((n, l)) => {
                let l = l.strip_suffix('}').expect(line);
                let mut labels = Vec::new();
                let mut rest = l;
                while !rest.is_empty() {
                    let (k, r) = rest.split_once("=\"").expect(line);
                    let mut v = String::new();
                    let mut chars = r.char_indices();
                    let mut end = None;
                    while let Some((i, c)) = chars.next() {
                        match c {
                            '\\' => v.push(chars.next().expect(line).1),
                            '"' => {
                                end = Some(i);
                                break;
                            }
                            c => v.push(c),
                        }
                    }
                    let end = end.expect(line);
                    labels.push((k.to_owned(), v));
                    rest = r[end + 1..].trim_start_matches(',');
                }
                labels.sort();
                (n.to_owned(), labels)
            }
        };
        // A histogram's samples are its name's _bucket, _sum and _count.
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|x| name.strip_suffix(x).filter(|f| typed.contains(*f)))
            .unwrap_or(&name);
        assert!(
            typed.contains(family),
            "sample {name} without a # TYPE line"
        );
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{name}"
        );
        out.insert((name, labels), value);
    }
    out
}

fn metric(m: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut l: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    l.sort();
    m.get(&(name.to_owned(), l)).copied().unwrap_or(0.0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run_cli(config: &Path, args: &[&str]) -> serde_json::Value {
    let o = Command::new(BIN)
        .env("PATCHOVER_CONFIG", config)
        .arg("--json")
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The `[daemon] tokens` entry for [`TOKEN`], from `patchover serve --hash-token`.
fn token_hash() -> String {
    let mut c = Command::new(BIN)
        .args(["serve", "--hash-token"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(TOKEN.as_bytes()).unwrap();
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success());
    let hash = String::from_utf8(o.stdout).unwrap().trim().to_owned();
    assert!(hash.starts_with("sha256:") && hash.len() == 71, "{hash}");
    hash
}

/// A topology (config only: no LC is booted), a signed bundle in the patch table, and the
/// daemon on a Unix socket plus TCP with one token.
fn setup() -> (Topo, Daemon, u16, String) {
    let t = Topo::new(&[(0, 50, 64), (0, 50, 64)]);
    let d = t.dir.path();
    let s = |p: &str| d.join(p).to_str().unwrap().to_owned();
    let port = free_port();
    let socket = d.join("sock/patchover.sock");
    let hash = token_hash();
    t.write_config(&format!(
        "\n[bundles]\ntrusted_keys = [\"{key}\"]\n\n[daemon]\nsocket = \"{sock}\"\nlisten = \"127.0.0.1:{port}\"\ntokens = [\"{hash}\"]\nmax_body_bytes = 4096\nhead_timeout_secs = 1\n",
        key = s("release.pub"),
        sock = socket.display(),
    ));
    run_cli(
        &t.config,
        &[
            "bundle",
            "keygen",
            "--public",
            &s("release.pub"),
            "--secret",
            &s("release.key"),
        ],
    );
    std::fs::create_dir_all(d.join("src/payload")).unwrap();
    std::fs::write(
        d.join("src/manifest.toml"),
        "format = 1\nid = \"api-1\"\ntitle = \"API test\"\ncategory = \"bugfix\"\nseverity = \"low\"\n\
         published = 2026-11-20T10:00:00Z\n\n[[step]]\nkind = \"script\"\nfile = \"fix.sh\"\n",
    )
    .unwrap();
    std::fs::write(d.join("src/payload/fix.sh"), "echo fixed\n").unwrap();
    run_cli(
        &t.config,
        &["bundle", "create", &s("src"), "-o", &s("b.tar.zst")],
    );
    run_cli(
        &t.config,
        &[
            "bundle",
            "sign",
            &s("b.tar.zst"),
            "--key",
            &s("release.key"),
        ],
    );
    run_cli(&t.config, &["patches", "import", &s("b.tar.zst")]);
    let daemon = Daemon::start(&t.config, &socket);
    (t, daemon, port, hash)
}

#[test]
fn every_route_bad_input_tokens_metrics_and_sigterm() {
    let (t, mut d, port, _) = setup();
    let (a, b) = (t.lcs[0].id.clone(), t.lcs[1].id.clone());
    let mut expect: HashMap<(String, String), f64> = HashMap::new();
    let mut count = |route: &str, status: u16| {
        *expect
            .entry((route.to_owned(), status.to_string()))
            .or_default() += 1.0;
    };

    // The socket is root-only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");

    let st = d.get("/v1/status");
    assert_eq!(st.status, 200);
    assert_eq!(st.json()["lcs"].as_array().map(Vec::len), Some(2));
    assert_eq!(st.json()["daemon"]["running_runs"], 0);
    count("/v1/status", 200);

    let lcs = d.get("/v1/lcs");
    assert_eq!(lcs.status, 200);
    let ids: Vec<String> = lcs
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, [a.clone(), b.clone()]);
    count("/v1/lcs", 200);
    let one = d.get(&format!("/v1/lcs/{a}"));
    assert_eq!(one.json()["state"], "stopped");
    assert_eq!(one.json()["role"], "unused");
    count("/v1/lcs/{id}", 200);
    d.get("/v1/lcs/nope").error(404, "not_found");
    count("/v1/lcs/{id}", 404);
    // Booting an LC without a system disk: refused with what to do, and it stays stopped.
    let boot = d.post(&format!("/v1/lcs/{a}/boot"), "");
    boot.error(422, "unprocessable");
    assert!(
        boot.json()["message"]
            .as_str()
            .unwrap()
            .contains("image build-demo")
    );
    count("/v1/lcs/{id}/boot", 422);
    d.post("/v1/lcs/nope/reboot", "").error(404, "not_found");
    count("/v1/lcs/{id}/reboot", 404);
    let stop = d.post(&format!("/v1/lcs/{a}/stop"), "");
    stop.error(422, "unprocessable");
    assert!(
        stop.json()["message"]
            .as_str()
            .unwrap()
            .contains("not running")
    );
    count("/v1/lcs/{id}/stop", 422);

    // Patches: mark and unmark change the table; an unknown id changes nothing.
    let p = d.get("/v1/patches").json();
    assert_eq!(p[0]["id"], "api-1");
    assert_eq!(p[0]["apply_next"], false);
    count("/v1/patches", 200);
    let m = d.post("/v1/patches/api-1/mark", "");
    assert_eq!(m.json()["apply_next"], true);
    count("/v1/patches/{id}/mark", 200);
    assert_eq!(d.get("/v1/patches").json()[0]["apply_next"], true);
    count("/v1/patches", 200);
    d.post("/v1/patches/nope/mark", "").error(404, "not_found");
    count("/v1/patches/{id}/mark", 404);
    let u = d.post("/v1/patches/api-1/unmark", "");
    assert_eq!(u.json()["apply_next"], false);
    count("/v1/patches/{id}/unmark", 200);
    let cli = run_cli(&t.config, &["--direct", "patches", "list"]);
    assert_eq!(
        cli[0]["apply_next"], false,
        "the CLI sees the API's change: {cli}"
    );

    // Runs: every refusal opens no run.
    let r = d.post("/v1/runs", &format!("{{\"lc\":\"{a}\",\"dry_run\":true}}"));
    r.error(422, "unprocessable");
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("not running"),
        "{:?}",
        r.json()
    );
    count("/v1/runs", 422);
    d.post("/v1/runs", r#"{"lc":"nope"}"#)
        .error(404, "not_found");
    count("/v1/runs", 404);
    let unknown = d.post("/v1/runs", &format!("{{\"lc\":\"{a}\",\"dryrun\":true}}"));
    unknown.error(400, "invalid_body");
    assert!(
        unknown.json()["message"]
            .as_str()
            .unwrap()
            .contains("unknown field")
    );
    count("/v1/runs", 400);
    d.post("/v1/runs", "{\"lc\": ").error(400, "invalid_body");
    count("/v1/runs", 400);
    d.post(
        "/v1/runs",
        &format!("{{\"lc\":\"{a}\",\"mode\":\"teleport\"}}"),
    )
    .error(400, "invalid_body");
    count("/v1/runs", 400);
    let huge = format!("{{\"lc\":\"{}\"}}", "x".repeat(100_000));
    d.post("/v1/runs", &huge).error(413, "body_too_large");
    count("/v1/runs", 413);
    {
        let s = UnixStream::connect(&d.socket).unwrap();
        http(s, "POST", "/v1/runs", &[], Some(br#"{"lc":"x"}"#))
            .error(415, "unsupported_media_type");
        count("/v1/runs", 415);
    }
    // Another patchover holds the LC's run lock: 409, and the lock holder is untouched.
    {
        let dir = t.dir.path().join("run/runs");
        std::fs::create_dir_all(&dir).unwrap();
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("{a}.lock")))
            .unwrap();
        let _held = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| e)
            .unwrap();
        let c = d.post("/v1/runs", &format!("{{\"lc\":\"{a}\"}}"));
        c.error(409, "conflict");
        assert!(
            c.json()["message"]
                .as_str()
                .unwrap()
                .contains("in progress")
        );
        count("/v1/runs", 409);
    }
    d.post("/v1/rollback", r#"{"lc":"nope"}"#)
        .error(404, "not_found");
    count("/v1/rollback", 404);
    let rb = d.post("/v1/rollback", &format!("{{\"lc\":\"{b}\"}}"));
    rb.error(422, "unprocessable");
    assert!(
        rb.json()["message"]
            .as_str()
            .unwrap()
            .contains("no LC is active")
    );
    count("/v1/rollback", 422);
    assert_eq!(d.get("/v1/runs").json(), serde_json::json!([]));
    count("/v1/runs", 200);
    d.get("/v1/runs/1").error(404, "not_found");
    count("/v1/runs/{id}", 404);
    d.get("/v1/runs/one").error(400, "bad_request");
    count("/v1/runs/{id}", 400);

    // The monitor is not configured: said so.
    let mon = d.post("/v1/monitor/run-once", "");
    mon.error(422, "unprocessable");
    assert!(
        mon.json()["message"]
            .as_str()
            .unwrap()
            .contains("[monitor]")
    );
    count("/v1/monitor/run-once", 422);
    d.get("/v1/approve?decision=approve%20all")
        .error(400, "bad_request");
    count("/v1/approve", 400);
    // Well-formed, but this host has no [monitor] (no secret): refused, said so.
    let link = format!(
        "/v1/approve?challenge={}&decision=approve%20all&code={}",
        "A".repeat(32),
        "B".repeat(24)
    );
    d.get(&link).error(422, "unprocessable");
    count("/v1/approve", 422);

    // Unknown routes and methods.
    d.get("/v2/nothing").error(404, "not_found");
    count("unmatched", 404);
    d.req("DELETE", "/v1/lcs", None)
        .error(405, "method_not_allowed");
    count("/v1/lcs", 405);

    // A stalled client (half a request head) does not hold up others; many connections at
    // once are all answered.
    let mut stalled = UnixStream::connect(&d.socket).unwrap();
    stalled
        .write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let stalled_at = Instant::now();
    let threads: Vec<_> = (0..64)
        .map(|_| {
            let sock = d.socket.clone();
            std::thread::spawn(move || {
                let s = UnixStream::connect(&sock).unwrap();
                http(s, "GET", "/v1/status", &[], None).status
            })
        })
        .collect();
    for th in threads {
        assert_eq!(th.join().unwrap(), 200);
        count("/v1/status", 200);
    }
    // The stalled client is closed once its head deadline (1 s here) passes.
    stalled
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 64];
    match stalled.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        r => panic!("the stalled connection was not closed: {r:?}"),
    }
    assert!(stalled_at.elapsed() >= Duration::from_millis(900));

    // TCP: no token, a wrong token → 401 (the daemon stays up); the right one → 200.
    let tcp = |h: &[(&str, &str)]| {
        let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        http(s, "GET", "/v1/status", h, None)
    };
    tcp(&[]).error(401, "unauthorized");
    tcp(&[("authorization", "Bearer wrong-token-0123456789")]).error(401, "unauthorized");
    tcp(&[("authorization", TOKEN)]).error(401, "unauthorized");
    let ok = tcp(&[("authorization", &format!("Bearer {TOKEN}"))]);
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json()["lcs"].as_array().map(Vec::len), Some(2));
    count("/v1/status", 200);

    // The event stream answers as SSE.
    {
        let mut s = UnixStream::connect(&d.socket).unwrap();
        s.write_all(b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert!(line.starts_with("HTTP/1.1 200"), "{line}");
        let mut ct = String::new();
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if line.to_ascii_lowercase().starts_with("content-type:") {
                ct = line.clone();
            }
        }
        assert!(ct.contains("text/event-stream"), "{ct}");
    }

    // The CLI hands its run to the running daemon (same refusal, counted by the daemon),
    // or runs it itself with --direct (not counted by the daemon).
    let cli_patch = |extra: &[&str]| {
        let o = Command::new(BIN)
            .env("PATCHOVER_CONFIG", &t.config)
            .env("PATCHOVER_GUEST_DIR", guest_dir())
            .args(["--json", "patch", &a])
            .args(extra)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "{o:?}");
        // The last JSON document is the error (--direct prints the refused report first).
        let v = serde_json::Deserializer::from_slice(&o.stdout)
            .into_iter::<serde_json::Value>()
            .last()
            .unwrap()
            .unwrap();
        assert!(v["error"].as_str().unwrap().contains("not running"), "{v}");
    };
    cli_patch(&[]);
    count("/v1/runs", 422);
    cli_patch(&["--direct"]);
    let o = Command::new(BIN)
        .env("PATCHOVER_CONFIG", &t.config)
        .args(["runs", "watch", "99"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no run 99"),
        "{o:?}"
    );
    count("/v1/runs/{id}", 404);

    // The metrics follow what this test did.
    let text = d.get("/metrics");
    assert_eq!(text.status, 200);
    assert!(text.headers["content-type"].starts_with("text/plain"));
    let m = parse_prometheus(std::str::from_utf8(&text.body).unwrap());
    for ((route, status), n) in &expect {
        assert_eq!(
            metric(
                &m,
                "patchover_http_requests_total",
                &[("route", route), ("status", status)]
            ),
            *n,
            "{route} {status}"
        );
    }
    // The event stream request finished when the client went away: counted too; /metrics
    // itself is counted after it answers.
    assert_eq!(
        metric(&m, "patchover_runs_total", &[("outcome", "refused")]),
        2.0
    );
    assert_eq!(
        metric(&m, "patchover_runs_total", &[("outcome", "ok")]),
        0.0
    );
    assert_eq!(
        metric(&m, "patchover_approvals_total", &[("result", "refused")]),
        2.0
    );
    assert_eq!(
        metric(&m, "patchover_approvals_total", &[("result", "accepted")]),
        0.0
    );
    assert_eq!(metric(&m, "patchover_bytes_copied_total", &[]), 0.0);
    assert_eq!(metric(&m, "patchover_mails_sent_total", &[]), 0.0);
    assert_eq!(
        metric(&m, "patchover_feed_polls_total", &[("result", "failed")]),
        0.0
    );
    assert!(m.contains_key(&("patchover_switch_pause_seconds_count".to_owned(), vec![])));

    // Nothing a failed request did opened a run; the daemon is still up.
    assert_eq!(d.get("/v1/runs").json(), serde_json::json!([]));
    assert_eq!(
        d.get("/v1/status").json()["open_runs"],
        serde_json::json!([])
    );

    // SIGTERM: a clean exit, the socket removed.
    let st = d.sigterm();
    assert!(st.success(), "{st:?}");
    assert!(!d.socket.exists());
}

/// Every path and method of docs/openapi.yaml is on the server and every route of the server
/// is in the document; answers have the required top-level fields of their schema.
#[test]
fn openapi_document_matches_the_server() {
    let doc_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.yaml");
    let doc: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(&doc_path).unwrap()).unwrap();
    let mut documented = BTreeSet::new();
    let mut schema_of: HashMap<(String, String), Option<String>> = HashMap::new();
    for (path, ops) in doc["paths"].as_mapping().unwrap() {
        let path = path.as_str().unwrap();
        for (method, op) in ops.as_mapping().unwrap() {
            let method = method.as_str().unwrap().to_ascii_uppercase();
            documented.insert((method.clone(), path.to_owned()));
            let ok = op["responses"]
                .as_mapping()
                .unwrap()
                .iter()
                .find(|(k, _)| k.as_str().is_some_and(|k| k.starts_with('2')))
                .map(|(_, v)| v.clone())
                .expect("a 2xx response");
            let r = ok["content"]["application/json"]["schema"]["$ref"]
                .as_str()
                .map(|r| r.rsplit('/').next().unwrap().to_owned());
            schema_of.insert((method, path.to_owned()), r);
        }
    }
    let served: BTreeSet<(String, String)> = patchover_daemon::routes()
        .into_iter()
        .map(|(m, p)| (m.to_owned(), p.to_owned()))
        .collect();
    assert_eq!(
        documented, served,
        "docs/openapi.yaml and the server's routes differ"
    );
    let required = |schema: &str| -> Vec<String> {
        let s = &doc["components"]["schemas"][schema];
        let mut out: Vec<String> = s["required"]
            .as_sequence()
            .map(|r| r.iter().map(|x| x.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default();
        if let Some(all) = s["allOf"].as_sequence() {
            for part in all {
                if let Some(r) = part["$ref"].as_str() {
                    let inner = &doc["components"]["schemas"][r.rsplit('/').next().unwrap()];
                    out.extend(
                        inner["required"]
                            .as_sequence()
                            .unwrap()
                            .iter()
                            .map(|x| x.as_str().unwrap().to_owned()),
                    );
                }
                if let Some(r) = part["required"].as_sequence() {
                    out.extend(r.iter().map(|x| x.as_str().unwrap().to_owned()));
                }
            }
        }
        out
    };

    // Probe the live server: every documented route answers as itself (not the fallback's
    // "no such route" nor 405), and JSON answers carry their schema's required fields.
    let (t, d, _, _) = setup();
    let a = t.lcs[0].id.clone();
    let error_fields = required("Error");
    assert_eq!(error_fields, ["code", "message"]);
    for (method, path) in &documented {
        let concrete = path.replace(
            "{id}",
            if path.starts_with("/v1/lcs") {
                &a
            } else if path.starts_with("/v1/runs") {
                "1"
            } else {
                "api-1"
            },
        );
        if path == "/v1/events" {
            continue; // a stream; checked in the other test
        }
        let body = match path.as_str() {
            "/v1/runs" => Some(format!("{{\"lc\":\"{a}\"}}")),
            "/v1/rollback" => Some(format!("{{\"lc\":\"{a}\"}}")),
            _ => None,
        };
        // Boot would fail anyway (no image); stop and reboot are probed by what they answer.
        let r = d.req(method, &concrete, body.as_deref().map(str::as_bytes));
        assert_ne!(r.status, 405, "{method} {path}");
        if r.status == 404 {
            let v = r.json();
            assert!(
                !v["message"].as_str().unwrap().contains("no such route"),
                "{method} {path} is not on the server"
            );
        }
        if path == "/metrics" {
            assert_eq!(r.status, 200);
            continue;
        }
        let v = r.json();
        let fields = if r.status >= 400 {
            error_fields.clone()
        } else {
            match &schema_of[&(method.clone(), path.clone())] {
                Some(s) => required(s),
                None => Vec::new(), // an array; items checked below
            }
        };
        for f in &fields {
            assert!(v.get(f).is_some(), "{method} {path}: {f} missing in {v}");
        }
    }
    // Array answers: their items' fields.
    let lcs = d.get("/v1/lcs").json();
    for f in required("Lc") {
        assert!(lcs[0].get(&f).is_some(), "Lc.{f} missing in {lcs}");
    }
    let p = d.get("/v1/patches").json();
    for f in required("Patch") {
        assert!(p[0].get(&f).is_some(), "Patch.{f} missing in {p}");
    }
    // The request schemas are the server's: unknown fields refused, documented ones taken.
    let props = |s: &str| -> Vec<String> {
        doc["components"]["schemas"][s]["properties"]
            .as_mapping()
            .unwrap()
            .keys()
            .map(|k| k.as_str().unwrap().to_owned())
            .collect()
    };
    let all_fields: serde_json::Map<String, serde_json::Value> = props("RunRequest")
        .into_iter()
        .map(|k| {
            let v = match k.as_str() {
                "lc" => serde_json::json!("nope"),
                "bundles" => serde_json::json!([]),
                "mode" => serde_json::json!("readdress"),
                "dry_run" => serde_json::json!(true),
                _ => serde_json::json!(5),
            };
            (k, v)
        })
        .collect();
    // Every documented field parses (the LC is unknown, so 404, not 400).
    d.post(
        "/v1/runs",
        &serde_json::Value::Object(all_fields).to_string(),
    )
    .error(404, "not_found");
    drop(t);
}

/// A real LC booted, rebooted and stopped through the API, with the event stream reporting
/// each action and the CLI seeing the same state.
#[test]
fn lc_lifecycle_over_the_api_with_events() {
    let (t, mut d, _, _) = setup();
    let a = t.lcs[0].id.clone();
    t.build_image(0, "1.0.0");

    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.write_all(b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(s).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // Wait for the stream's head so the subscription exists before the actions.
    let t0 = Instant::now();
    loop {
        let l = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("event stream head");
        if l.is_empty() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
    let next_event = |kind: &str| -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut current = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let l = rx
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {kind} event"));
            // Chunked framing lines (sizes) are skipped; SSE fields are what matter.
            if let Some(k) = l.strip_prefix("event: ") {
                current = k.to_owned();
            } else if let Some(data) = l.strip_prefix("data: ")
                && current == kind
            {
                return serde_json::from_str(data).unwrap();
            }
        }
    };

    let boot = d.post(&format!("/v1/lcs/{a}/boot"), "");
    assert_eq!(boot.status, 200, "{}", String::from_utf8_lossy(&boot.body));
    let v = boot.json();
    assert_eq!(v["state"], "running", "{v}");
    assert!(v["pid"].as_i64().is_some_and(|p| p > 1), "{v}");
    let e = next_event("lc");
    assert_eq!(e["lc"], a.as_str());
    assert_eq!(e["action"], "boot");
    let cli = run_cli(&t.config, &["--direct", "lc", "list"]);
    assert_eq!(
        cli[0]["state"], "running",
        "the CLI sees the API's boot: {cli}"
    );
    assert_eq!(
        steady(&cli, &["uptime_s"]),
        steady(&d.get("/v1/lcs").json(), &["uptime_s"]),
        "`lc list --json` is the API's JSON"
    );

    // A second boot of a running LC is refused and changes nothing.
    let again = d.post(&format!("/v1/lcs/{a}/boot"), "");
    assert!(
        again.status == 422 || again.status == 409,
        "{:?}",
        again.json()
    );
    assert_eq!(d.get(&format!("/v1/lcs/{a}")).json()["pid"], v["pid"]);

    let rb = d.post(&format!("/v1/lcs/{a}/reboot"), "");
    assert_eq!(rb.status, 200, "{:?}", rb.json());
    assert_eq!(rb.json()["state"], "running");
    assert_ne!(rb.json()["pid"], v["pid"], "a reboot starts a new init");
    assert_eq!(next_event("lc")["action"], "reboot");

    let stop = d.post(&format!("/v1/lcs/{a}/stop"), "");
    assert_eq!(stop.status, 200, "{:?}", stop.json());
    assert_eq!(stop.json()["state"], "stopped");
    assert_eq!(next_event("lc")["action"], "stop");

    let m = parse_prometheus(std::str::from_utf8(&d.get("/metrics").body).unwrap());
    assert_eq!(metric(&m, "patchover_events_total", &[]), 3.0);
    assert_eq!(
        metric(
            &m,
            "patchover_http_requests_total",
            &[("route", "/v1/lcs/{id}/boot"), ("status", "200")]
        ),
        1.0
    );
    // SIGTERM with an event stream open: the stream ends and the daemon exits cleanly.
    assert!(d.sigterm().success());
}

/// Issue 27: a run started from the CLI (`--direct`, not through the daemon) is in the
/// daemon's `/metrics`, read from the journal: the run histogram counts it once, the pause
/// histogram has its observation; the gauges follow the real LCs; `promtool check metrics`
/// finds nothing to say.
#[test]
fn a_direct_cli_run_is_in_the_daemons_metrics_and_promtool_finds_them_clean() {
    use common::cycle::Cycle;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("po.sock");
    let c = Cycle::new(
        2,
        &format!("\n[daemon]\nsocket = \"{}\"\n", socket.display()),
    );
    c.upgrade_bundle();
    c.start_service();
    let (a, b) = (c.t.lcs[0].id.clone(), c.t.lcs[1].id.clone());
    let d = Daemon::start(&c.t.config, &socket);
    let before = parse_prometheus(std::str::from_utf8(&d.get("/metrics").body).unwrap());
    let series = |m: &Samples, lc: &str| {
        m.iter()
            .filter(|((n, l), _)| {
                n == "patchover_lc_state" && l.iter().any(|(k, v)| k == "lc" && v == lc)
            })
            .map(|((_, l), v)| (l.clone(), *v))
            .collect::<Vec<_>>()
    };
    let state = |m: &Samples, lc: &str| {
        let s = series(m, lc);
        assert_eq!(s.len(), 1, "one series per LC: {s:?}");
        assert_eq!(s[0].1, 1.0);
        let get = |k: &str| s[0].0.iter().find(|(n, _)| n == k).unwrap().1.clone();
        (get("state"), get("role"))
    };
    assert_eq!(
        state(&before, &a),
        ("running".to_owned(), "active".to_owned())
    );
    assert_eq!(
        metric(&before, "patchover_patches", &[("state", "approved")]),
        1.0
    );

    let run = common::po_json(&c.t.config, &["--direct", "patch", &a]);
    assert_eq!(run["outcome"], "ok", "{run:#}");
    let pause_ms = run["pause_ms"].as_f64().unwrap();

    let resp = d.get("/metrics");
    assert_eq!(
        resp.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = String::from_utf8(resp.body).unwrap();
    let said = common::promtool_check(&text);
    assert!(said.is_empty(), "promtool check metrics:\n{said}\n{text}");
    let m = parse_prometheus(&text);
    let run_count = |m: &Samples| {
        metric(
            m,
            "patchover_run_seconds_count",
            &[("kind", "patch"), ("outcome", "ok")],
        )
    };
    assert_eq!(run_count(&m), 1.0, "{text}");
    assert_eq!(
        metric(&m, "patchover_runs_total", &[("outcome", "ok")]),
        1.0
    );
    assert_eq!(metric(&m, "patchover_switch_pause_seconds_count", &[]), 1.0);
    assert_eq!(
        metric(
            &m,
            "patchover_switch_pause_seconds_bucket",
            &[("le", "+Inf")]
        ),
        1.0
    );
    let sum = metric(&m, "patchover_switch_pause_seconds_sum", &[]);
    assert!(
        (sum * 1000.0 - pause_ms).abs() < 0.01,
        "{sum} s, {pause_ms} ms"
    );
    assert_eq!(
        metric(&m, "patchover_step_seconds_count", &[("step", "switch")]),
        1.0
    );
    assert_eq!(metric(&m, "patchover_runs_in_progress", &[]), 0.0);
    assert_eq!(
        metric(&m, "patchover_patches", &[("state", "approved")]),
        0.0
    );
    // The service moved: the old LC stopped, the standby is active.
    assert_eq!(state(&m, &b), ("running".to_owned(), "active".to_owned()));
    assert_eq!(state(&m, &a).0, "stopped", "{text}");
    assert_eq!(
        metric(
            &m,
            "patchover_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    // A second scrape counts the run once; Prometheus, asking for OpenMetrics, gets it.
    let om = http(
        UnixStream::connect(&socket).unwrap(),
        "GET",
        "/metrics",
        &[("accept", "application/openmetrics-text; version=1.0.0")],
        None,
    );
    assert!(om.headers["content-type"].starts_with("application/openmetrics-text"));
    let om = String::from_utf8(om.body).unwrap();
    assert!(om.ends_with("# EOF\n") && om.contains("# TYPE patchover_runs counter\n"));
    let again = parse_prometheus(std::str::from_utf8(&d.get("/metrics").body).unwrap());
    assert_eq!(run_count(&again), 1.0);

    // The same run as a page (no load ran with it: the time line only), in a real browser.
    let id = run["run_id"].as_i64().unwrap().to_string();
    let page = dir.path().join("run.html");
    let page_arg = page.to_str().unwrap();
    let said = common::po_json(&c.t.config, &["runs", "show", &id, "--html", page_arg]);
    assert_eq!(said["html"], page_arg);
    let journal = d.get(&format!("/v1/runs/{id}")).json();
    let steps = journal["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] == "started")
        .count();
    assert!(steps >= 10, "{journal:#}");
    let r = common::chromium(&page);
    assert!(r.colours > 1, "the screenshot is blank");
    assert_eq!(
        r.dom.matches("<svg id=\"timeline\"").count(),
        1,
        "{}",
        r.dom
    );
    assert_eq!(r.dom.matches("class=\"step\"").count(), steps, "{}", r.dom);
    assert_eq!(
        r.dom
            .matches("id=\"timeline-switch\" class=\"switch\"")
            .count(),
        1
    );
    assert!(!r.dom.contains("id=\"latency\"") && r.dom.contains("No load ran"));
}

/// The whole cycle through the daemon: a run started over the API (202), a second run for
/// the same LC refused with 409 while it goes, its steps on the event stream, the metrics
/// after it; then a rollback run during which SIGTERM arrives: the daemon waits for it, exits
/// cleanly, and after a restart the journal shows it finished.
#[test]
fn runs_over_the_api_conflict_metrics_and_sigterm_during_a_run() {
    use common::cycle::{Cycle, version};
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("po.sock");
    let c = Cycle::new(
        2,
        &format!(
            "\n[daemon]\nsocket = \"{}\"\nshutdown_grace_secs = 120\n",
            socket.display()
        ),
    );
    c.upgrade_bundle();
    c.start_service();
    let (a, b) = (c.t.lcs[0].id.clone(), c.t.lcs[1].id.clone());
    let client = common::Client::new(&c.t.bridge, &c.t.client_addr(0));
    let svc = c.t.service();
    assert_eq!(version(&client, &svc), "1.0.0");
    let mut d = Daemon::start(&c.t.config, &socket);

    // Follow the event stream from before the run.
    let mut s = UnixStream::connect(&socket).unwrap();
    s.write_all(b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(s).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // (kind, data) of the next event, skipping the stream's head and chunk sizes.
    let next = || -> (String, serde_json::Value) {
        let mut kind = String::new();
        loop {
            let l = rx.recv_timeout(Duration::from_secs(120)).expect("an event");
            if let Some(k) = l.strip_prefix("event: ") {
                kind = k.to_owned();
            } else if let Some(data) = l.strip_prefix("data: ")
                && !kind.is_empty()
            {
                return (kind, serde_json::from_str(data).unwrap());
            }
        }
    };
    std::thread::sleep(Duration::from_millis(200));

    let r = d.post("/v1/runs", &format!("{{\"lc\":\"{a}\"}}"));
    assert_eq!(r.status, 202, "{:?}", r.json());
    let run_id = r.json()["run_id"].as_i64().unwrap();
    assert_eq!(r.json()["href"], format!("/v1/runs/{run_id}"));
    // `runs watch` follows it from the CLI.
    let watcher = Command::new(BIN)
        .env("PATCHOVER_CONFIG", &c.t.config)
        .args(["--json", "runs", "watch", &run_id.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // While it goes, a second run for the same LC is refused and changes nothing.
    let again = d.post("/v1/runs", &format!("{{\"lc\":\"{a}\"}}"));
    if again.status != 409 {
        panic!(
            "the first run ended already: {:#}",
            d.get(&format!("/v1/runs/{run_id}")).json()
        );
    }
    again.error(409, "conflict");
    assert_eq!(
        d.get("/v1/status").json()["daemon"]["running_runs"],
        1,
        "{:#}",
        d.get(&format!("/v1/runs/{run_id}")).json()
    );

    let mut steps_done = BTreeSet::new();
    let mut progress: Vec<serde_json::Value> = Vec::new();
    let outcome = loop {
        let (kind, e) = next();
        match kind.as_str() {
            "step" => {
                assert_eq!(e["run_id"], run_id, "{e}");
                if e["state"] == "done" {
                    steps_done.insert(e["step"].as_str().unwrap().to_owned());
                }
            }
            "progress" => {
                assert_eq!(e["run_id"], run_id, "{e}");
                progress.push(e);
            }
            "run" if e["run_id"] == run_id => break e,
            _ => {}
        }
    };
    assert_eq!(outcome["outcome"], "ok", "{outcome}");
    // Issue 25: the stream carries each copy's bytes: from 0 of the total counted first, never
    // going back, to the end of the bulk copy.
    let sys: Vec<_> = progress
        .iter()
        .filter(|e| e["step"] == "copy_system_disk")
        .collect();
    assert!(sys.len() >= 2, "{progress:?}");
    assert_eq!(sys[0]["bytes"], 0, "{progress:?}");
    assert!(sys[0]["total"].as_u64().unwrap() > 0, "{progress:?}");
    let bytes: Vec<u64> = sys.iter().map(|e| e["bytes"].as_u64().unwrap()).collect();
    assert!(bytes.windows(2).all(|w| w[0] <= w[1]), "{bytes:?}");
    assert_eq!(sys.last().unwrap()["bytes"], sys.last().unwrap()["total"]);
    assert!(
        progress.iter().any(|e| e["step"] == "copy_app_disk"),
        "{progress:?}"
    );
    assert!(steps_done.len() >= 5, "{steps_done:?}");
    assert_eq!(version(&client, &svc), "1.0.1");

    let w = watcher.wait_with_output().unwrap();
    assert!(w.status.success(), "{w:?}");
    let watched: serde_json::Value = serde_json::from_slice(&w.stdout).unwrap();
    assert_eq!(watched["run"]["outcome"], "ok", "{watched}");
    let watch_events = String::from_utf8_lossy(&w.stderr);
    assert!(
        watch_events
            .lines()
            .filter(|l| l.contains("\"step\""))
            .count()
            >= steps_done.len(),
        "{watch_events}"
    );
    // `runs watch --json` shows them as a run in its own process does: flat JSON lines.
    assert!(
        watch_events.lines().any(|l| {
            let e: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
            e["event"] == "progress" && e["step"] == "copy_system_disk" && e["total"].is_u64()
        }),
        "{watch_events}"
    );
    let run = d.get(&format!("/v1/runs/{run_id}")).json();
    assert_eq!(run["run"]["outcome"], "ok");
    assert_eq!(run["run"]["standby"], b.as_str());
    assert!(run["steps"].as_array().unwrap().len() >= 2 * steps_done.len());
    let cli = run_cli(
        &c.t.config,
        &["--direct", "runs", "show", &run_id.to_string()],
    );
    assert_eq!(cli, run, "`runs show --json` is the API's JSON");
    // Its text says where the switch's time went, phase by phase (issue 26).
    let text =
        c.t.po_ok(&["--direct", "runs", "show", &run_id.to_string()]);
    assert!(
        text.lines().any(|l| l.starts_with("switch phases (pause ")
            && l.contains("prepare ")
            && l.contains(", drain ")
            && l.contains(", release ")),
        "{text}"
    );

    let m = parse_prometheus(std::str::from_utf8(&d.get("/metrics").body).unwrap());
    assert_eq!(
        metric(&m, "patchover_runs_total", &[("outcome", "ok")]),
        1.0
    );
    let report = &run["run"]["report"];
    assert_eq!(
        metric(&m, "patchover_bytes_copied_total", &[]),
        report["bytes_copied"].as_f64().unwrap()
    );
    assert!(metric(&m, "patchover_bytes_copied_total", &[]) > 0.0);
    assert_eq!(metric(&m, "patchover_freeze_seconds_count", &[]), 1.0);
    assert_eq!(metric(&m, "patchover_switch_pause_seconds_count", &[]), 1.0);
    let pause = metric(&m, "patchover_switch_pause_seconds_sum", &[]);
    assert!(
        (pause * 1000.0 - report["pause_ms"].as_f64().unwrap()).abs() < 0.01,
        "{pause}"
    );
    assert_eq!(
        metric(&m, "patchover_switch_held_syns_total", &[]),
        report["switch"]["held_syns"].as_f64().unwrap()
    );
    for step in &steps_done {
        assert_eq!(
            metric(&m, "patchover_step_seconds_count", &[("step", step)]),
            1.0,
            "{step}"
        );
    }

    // Roll back, and SIGTERM once the rollback run is under way: the daemon stops
    // accepting but lets the run finish, then exits 0.
    let rb = d.post("/v1/rollback", &format!("{{\"lc\":\"{a}\"}}"));
    assert_eq!(rb.status, 202, "{:?}", rb.json());
    let rb_id = rb.json()["run_id"].as_i64().unwrap();
    assert!(rb_id > run_id);
    let st = d.sigterm();
    assert!(st.success(), "{st:?}");
    assert!(!socket.exists());
    assert_eq!(version(&client, &svc), "1.0.0", "the rollback finished");

    // Restarted: nothing to recover, the journal has both runs ended.
    let d2 = Daemon::start(&c.t.config, &socket);
    let rb_run = d2.get(&format!("/v1/runs/{rb_id}")).json();
    assert_eq!(rb_run["run"]["outcome"], "ok", "{rb_run}");
    assert_eq!(
        d2.get("/v1/status").json()["open_runs"],
        serde_json::json!([])
    );
    assert_eq!(d2.get("/v1/status").json()["active_lc"], a.as_str());
    // The restarted daemon's metrics hold both runs, from the journal, each of its kind.
    let m = parse_prometheus(std::str::from_utf8(&d2.get("/metrics").body).unwrap());
    for kind in ["patch", "rollback"] {
        let labels = [("kind", kind), ("outcome", "ok")];
        assert_eq!(
            metric(&m, "patchover_run_seconds_count", &labels),
            1.0,
            "{kind}"
        );
    }
    drop(d2);
}

/// SIGTERM with no grace: the daemon exits at once, cutting its run off; the run is recovered
/// from its journal (by the orchestrator's run guard, or by the next start before it answers),
/// and the service is where it was.
#[test]
fn a_run_cut_off_by_sigterm_is_recovered_by_the_next_start() {
    use common::cycle::{Cycle, version};
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("po.sock");
    let c = Cycle::new(
        2,
        &format!(
            "\n[daemon]\nsocket = \"{}\"\nshutdown_grace_secs = 0\n",
            socket.display()
        ),
    );
    c.upgrade_bundle();
    c.start_service();
    let a = c.t.lcs[0].id.clone();
    let client = common::Client::new(&c.t.bridge, &c.t.client_addr(0));
    let svc = c.t.service();
    let mut d = Daemon::start(&c.t.config, &socket);
    let r = d.post("/v1/runs", &format!("{{\"lc\":\"{a}\"}}"));
    assert_eq!(r.status, 202, "{:?}", r.json());
    let run_id = r.json()["run_id"].as_i64().unwrap();
    let t = Instant::now();
    assert!(d.sigterm().success());
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // Cut off: recovered from the journal, by the orchestrator's run guard as soon as the
    // daemon died or else by the next start, before it answers.
    let d2 = Daemon::start(&c.t.config, &socket);
    let t = Instant::now();
    let run = loop {
        let run = d2.get(&format!("/v1/runs/{run_id}")).json();
        if run["run"]["ended_ms"].is_i64() {
            break run;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "not recovered: {run}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_ne!(run["run"]["outcome"], "ok", "{run}");
    assert!(
        run["run"]["report"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("recovery")),
        "{run}"
    );
    assert_eq!(
        d2.get("/v1/status").json()["open_runs"],
        serde_json::json!([])
    );
    assert_eq!(
        version(&client, &svc),
        "1.0.0",
        "the service stayed on the active LC"
    );
    drop(d2);
}

/// A CLI run: exit code, the last JSON document on stdout, stderr.
struct CliOut {
    code: Option<i32>,
    json: serde_json::Value,
    stderr: String,
}

/// `patchover --json ARGS` (plus `--direct` when asked); the daemon is not asked for.
fn po_via(config: &Path, args: &[&str], direct: bool) -> CliOut {
    let mut c = Command::new(BIN);
    c.env("PATCHOVER_CONFIG", config)
        .env("PATCHOVER_GUEST_DIR", guest_dir())
        .arg("--json");
    if direct {
        c.arg("--direct");
    }
    let o = c.args(args).output().unwrap();
    let json = serde_json::Deserializer::from_slice(&o.stdout)
        .into_iter::<serde_json::Value>()
        .last()
        .unwrap_or_else(|| panic!("{args:?}: no JSON on stdout: {o:?}"))
        .unwrap();
    CliOut {
        code: o.status.code(),
        json,
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// `v` without the `keys` that change from one call to the next (times, PIDs), at the top
/// level and in the items of a top-level array.
fn steady(v: &serde_json::Value, keys: &[&str]) -> serde_json::Value {
    let strip = |o: &serde_json::Value| {
        let mut o = o.clone();
        if let Some(m) = o.as_object_mut() {
            for k in keys {
                m.remove(*k);
            }
        }
        o
    };
    match v {
        serde_json::Value::Array(a) => a.iter().map(strip).collect(),
        v => strip(v),
    }
}

/// A switch report with each of its `phases` reduced to its name: the same phases in the same
/// order both ways, their times aside.
fn phase_names(v: &serde_json::Value) -> serde_json::Value {
    let mut v = v.clone();
    if let Some(phases) = v.get_mut("phases").and_then(|p| p.as_array_mut()) {
        for p in phases.iter_mut() {
            *p = p["name"].clone();
        }
    }
    v
}

/// How many requests the daemon answered on `route` (any status).
fn served(d: &Daemon, route: &str) -> f64 {
    let m = parse_prometheus(std::str::from_utf8(&d.get("/metrics").body).unwrap());
    m.iter()
        .filter(|((name, labels), _)| {
            name == "patchover_http_requests_total"
                && labels.contains(&("route".to_owned(), route.to_owned()))
        })
        .map(|(_, v)| v)
        .sum()
}

/// Runs `args` through the daemon and with --direct against the same state: the daemon
/// serves the first (its `route` counter goes up by one) and not the second, and both give
/// the same exit code and the same JSON but for the `volatile` keys. Returns the JSON.
fn same_both_ways(
    d: &Daemon,
    config: &Path,
    args: &[&str],
    route: &str,
    volatile: &[&str],
) -> serde_json::Value {
    let before = served(d, route);
    let via = po_via(config, args, false);
    assert_eq!(
        served(d, route),
        before + 1.0,
        "{args:?} did not go through the daemon: {}",
        via.stderr
    );
    let direct = po_via(config, args, true);
    assert_eq!(
        served(d, route),
        before + 1.0,
        "{args:?} --direct went to the daemon"
    );
    assert_eq!(
        via.code, direct.code,
        "{args:?}: {} / {}",
        via.stderr, direct.stderr
    );
    assert_eq!(
        steady(&via.json, volatile),
        steady(&direct.json, volatile),
        "{args:?}: through the daemon, then --direct"
    );
    via.json
}

/// Every verb the daemon serves gives the same JSON through it and with --direct: `lc list`,
/// `lc show|status`, `lc boot|reboot|stop` on a real LC, `patches list|show|mark|unmark|import`,
/// `runs list`, `monitor status|run-once`.
#[test]
fn routed_verbs_give_the_same_json_through_the_daemon_and_direct() {
    let (t, d, _, _) = setup();
    let a = t.lcs[0].id.clone();
    let dir = t.dir.path();
    t.build_image(0, "1.0.0");
    // A [monitor] without feeds; the daemon reads the config at every request.
    std::fs::write(dir.join("secret"), "an approval secret for the test\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("secret"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&t.config)
            .unwrap();
        writeln!(
            f,
            "\n[monitor]\nsecret_file = \"{}\"",
            dir.join("secret").display()
        )
        .unwrap();
    }

    // The resource table and one LC: one shape (the row, the backend's report, the spec).
    let list = same_both_ways(&d, &t.config, &["lc", "list"], "/v1/lcs", &[]);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    let show = same_both_ways(&d, &t.config, &["lc", "show", &a], "/v1/lcs/{id}", &[]);
    assert_eq!(show, list[0], "`lc show` is the row of `lc list`");
    for k in [
        "id",
        "role",
        "state",
        "pid",
        "processes",
        "limits",
        "console_log",
        "spec",
    ] {
        assert!(show.get(k).is_some(), "{k} missing in {show}");
    }
    assert_eq!(show["spec"]["id"], a.as_str());
    same_both_ways(&d, &t.config, &["lc", "status", &a], "/v1/lcs/{id}", &[]);

    // The lifecycle on a real LC: through the daemon, then the same again directly.
    let volatile = ["pid", "took_ms", "agent_ms", "uptime_s", "processes"];
    let mut outs = Vec::new();
    for direct in [false, true] {
        let before = served(&d, "/v1/lcs/{id}/boot");
        let boot = po_via(&t.config, &["lc", "boot", &a], direct);
        assert_eq!(boot.code, Some(0), "{}", boot.stderr);
        assert_eq!(
            served(&d, "/v1/lcs/{id}/boot"),
            before + if direct { 0.0 } else { 1.0 }
        );
        assert_eq!(boot.json["state"], "running", "{}", boot.json);
        assert!(
            boot.json["agent_ms"].is_u64(),
            "waited for the agent: {}",
            boot.json
        );
        // While it runs, `lc show` both ways (the same init PID).
        let running = same_both_ways(
            &d,
            &t.config,
            &["lc", "show", &a],
            "/v1/lcs/{id}",
            &["uptime_s", "processes"],
        );
        assert_eq!(running["pid"], boot.json["pid"]);
        let reboot = po_via(&t.config, &["lc", "reboot", &a], direct);
        assert_eq!(reboot.code, Some(0), "{}", reboot.stderr);
        assert_ne!(reboot.json["pid"], boot.json["pid"]);
        let stop = po_via(&t.config, &["lc", "stop", &a], direct);
        assert_eq!(stop.code, Some(0), "{}", stop.stderr);
        assert_eq!(stop.json["state"], "stopped");
        outs.push([boot.json, reboot.json, stop.json].map(|v| steady(&v, &volatile)));
    }
    assert_eq!(
        outs[0], outs[1],
        "boot, reboot, stop: through the daemon, then --direct"
    );

    // The one screen: the same both ways but for who answered (the daemon knows its PID and
    // the runs it drives; the CLI only that something answers on the socket).
    let st = same_both_ways(&d, &t.config, &["status"], "/v1/status", &["daemon"]);
    assert_eq!(st["lcs"].as_array().map(Vec::len), Some(2), "{st}");
    assert_eq!(st["monitor"]["feeds"], serde_json::json!([]), "{st}");
    let via = po_via(&t.config, &["status"], false).json;
    assert_eq!(via["daemon"]["answers"], true, "{via}");
    assert!(
        via["daemon"]["pid"].as_u64().is_some_and(|p| p > 1),
        "{via}"
    );
    let direct = po_via(&t.config, &["status"], true).json;
    assert_eq!(direct["daemon"]["answers"], true, "{direct}");
    assert_eq!(direct["daemon"]["pid"], serde_json::Value::Null, "{direct}");

    // The patch table.
    same_both_ways(&d, &t.config, &["patches", "list"], "/v1/patches", &[]);
    let p = same_both_ways(
        &d,
        &t.config,
        &["patches", "show", "api-1"],
        "/v1/patches/{id}",
        &[],
    );
    assert_eq!(p["id"], "api-1");
    let m = same_both_ways(
        &d,
        &t.config,
        &["patches", "mark", "api-1"],
        "/v1/patch-marks",
        &[],
    );
    assert_eq!(m, serde_json::json!({"marked": true, "ids": ["api-1"]}));
    assert_eq!(
        po_via(&t.config, &["patches", "show", "api-1"], true).json["apply_next"],
        true
    );
    same_both_ways(
        &d,
        &t.config,
        &["patches", "unmark", "api-1"],
        "/v1/patch-marks",
        &[],
    );
    assert_eq!(
        po_via(&t.config, &["patches", "show", "api-1"], false).json["apply_next"],
        false
    );

    // Import changes the table: the same store before each (no connection is open between
    // requests), the same answer but for the registration time.
    let s = |p: &str| dir.join(p).to_str().unwrap().to_owned();
    std::fs::create_dir_all(dir.join("src2/payload")).unwrap();
    std::fs::write(
        dir.join("src2/manifest.toml"),
        "format = 1\nid = \"api-2\"\ntitle = \"API test 2\"\ncategory = \"security\"\nseverity = \"high\"\n\
         published = 2026-11-21T10:00:00Z\n\n[[step]]\nkind = \"script\"\nfile = \"fix.sh\"\n",
    )
    .unwrap();
    std::fs::write(dir.join("src2/payload/fix.sh"), "echo fixed\n").unwrap();
    run_cli(
        &t.config,
        &["bundle", "create", &s("src2"), "-o", &s("b2.tar.zst")],
    );
    run_cli(
        &t.config,
        &[
            "bundle",
            "sign",
            &s("b2.tar.zst"),
            "--key",
            &s("release.key"),
        ],
    );
    let db = dir.join("state/state.db");
    let wal = dir.join("state/state.db-wal");
    let snapshot = std::fs::read(&db).unwrap();
    assert!(!wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0);
    let before = served(&d, "/v1/patches");
    // A relative path: the CLI resolves it, the daemon gets it whole.
    let import = |direct| {
        let mut c = Command::new(BIN);
        c.current_dir(dir)
            .env("PATCHOVER_CONFIG", &t.config)
            .arg("--json");
        if direct {
            c.arg("--direct");
        }
        let o = c
            .args(["patches", "import", "b2.tar.zst", "--mark"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let via = import(false);
    assert_eq!(served(&d, "/v1/patches"), before + 1.0);
    assert_eq!(via["id"], "api-2");
    assert_eq!(via["apply_next"], true);
    assert!(
        via["key_id"].as_str().is_some_and(|k| !k.is_empty()),
        "{via}"
    );
    let _ = std::fs::remove_file(&wal);
    let _ = std::fs::remove_file(dir.join("state/state.db-shm"));
    std::fs::write(&db, &snapshot).unwrap();
    assert!(po_via(&t.config, &["patches", "show", "api-2"], true).code == Some(2));
    let direct = import(true);
    assert_eq!(served(&d, "/v1/patches"), before + 1.0);
    assert_eq!(
        steady(&via, &["registered_ms"]),
        steady(&direct, &["registered_ms"])
    );

    // The run journal (empty: runs are in runs_over_the_api_…).
    let runs = same_both_ways(&d, &t.config, &["runs", "list"], "/v1/runs", &[]);
    assert_eq!(runs, serde_json::json!([]));

    // The monitor.
    same_both_ways(&d, &t.config, &["monitor", "status"], "/v1/monitor", &[]);
    let r = same_both_ways(
        &d,
        &t.config,
        &["monitor", "run-once"],
        "/v1/monitor/run-once",
        &["duration_ms"],
    );
    assert_eq!(r["feeds"], serde_json::json!([]), "{r}");

    // The text output is printed from the same JSON: the same both ways.
    for args in [
        vec!["lc", "list"],
        vec!["lc", "show", &a],
        vec!["patches", "list"],
        vec!["patches", "show", "api-1"],
        vec!["runs", "list"],
        vec!["monitor", "status"],
    ] {
        let text = |direct: bool| {
            let mut c = Command::new(BIN);
            c.env("PATCHOVER_CONFIG", &t.config);
            if direct {
                c.arg("--direct");
            }
            let o = c.args(&args).output().unwrap();
            assert!(o.status.success(), "{args:?}: {o:?}");
            String::from_utf8(o.stdout).unwrap()
        };
        let via = text(false);
        assert!(!via.is_empty(), "{args:?}");
        assert_eq!(via, text(true), "{args:?}");
    }
    drop(t);
}

/// Bad input through the daemon: the same exit code (2) and the same message as directly,
/// in text and in JSON, and nothing changed.
#[test]
fn bad_input_through_the_daemon_gets_the_direct_code_and_message() {
    let (t, d, _, _) = setup();
    let a = t.lcs[0].id.clone();
    let b = t.lcs[1].id.clone();
    let bundle = t.dir.path().join("b.tar.zst");
    let bundle = bundle.to_str().unwrap();
    // A bundle whose signature is malformed, and one changed after it was signed.
    let dir = t.dir.path();
    std::fs::copy(dir.join("b.tar.zst"), dir.join("badsig.tar.zst")).unwrap();
    std::fs::write(dir.join("badsig.tar.zst.minisig"), "not a signature\n").unwrap();
    let mut changed = std::fs::read(dir.join("b.tar.zst")).unwrap();
    changed.extend_from_slice(b"tail");
    std::fs::write(dir.join("changed.tar.zst"), changed).unwrap();
    std::fs::copy(
        dir.join("b.tar.zst.minisig"),
        dir.join("changed.tar.zst.minisig"),
    )
    .unwrap();
    let badsig = dir.join("badsig.tar.zst");
    let badsig = badsig.to_str().unwrap();
    let changed = dir.join("changed.tar.zst");
    let changed = changed.to_str().unwrap();
    // Through the API: 422 with the stable code, not 500.
    for f in [badsig, changed] {
        d.post("/v1/patches", &format!("{{\"file\":\"{f}\"}}"))
            .error(422, "unprocessable");
    }
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (
            vec!["patches", "import", badsig],
            "/v1/patches",
            "is not a minisign signature",
        ),
        (
            vec!["patches", "import", changed],
            "/v1/patches",
            "the bundle was changed after it was signed",
        ),
        (
            vec!["net", "switch", "nope", &b, "--mode", "readdress"],
            "/v1/net/switch",
            "unknown LC \"nope\"",
        ),
        (
            vec!["net", "switch", &a, &b, "--mode", "readdress"],
            "/v1/net/switch",
            "is not running",
        ),
        (vec!["net", "back"], "/v1/net/back", "no switch recorded"),
        (
            vec!["service", "assign", "nope"],
            "/v1/service/assign",
            "unknown LC \"nope\"",
        ),
        (
            vec!["lc", "attach-disk", "nope", "/tmp", "/mnt/x"],
            "/v1/lcs/{id}/disks",
            "unknown LC \"nope\"",
        ),
        (
            vec!["lc", "attach-nic", &a, "eth0"],
            "/v1/lcs/{id}/nics",
            "already has a NIC named eth0",
        ),
        // Issue 22, item 5: names that could reach a shell, refused before anything is looked
        // up (a is stopped: the name is what is refused).
        (
            vec!["lc", "attach-nic", &a, "a;touch /x"],
            "/v1/lcs/{id}/nics",
            "invalid interface name \"a;touch /x\": use 1-15 characters of a-z, 0-9, '_' and '-'",
        ),
        (
            vec!["lc", "attach-nic", &a, "$(id)"],
            "/v1/lcs/{id}/nics",
            "invalid interface name \"$(id)\"",
        ),
        (
            vec!["lc", "show", "nope"],
            "/v1/lcs/{id}",
            "unknown LC \"nope\"",
        ),
        (
            vec!["lc", "boot", "nope"],
            "/v1/lcs/{id}/boot",
            "unknown LC \"nope\"",
        ),
        (vec!["lc", "stop", &a], "/v1/lcs/{id}/stop", "not running"),
        (
            vec!["patches", "show", "nope"],
            "/v1/patches/{id}",
            "no patch \"nope\"",
        ),
        // All or nothing: api-1 exists, nope does not; api-1 stays unmarked.
        (
            vec!["patches", "mark", "api-1", "nope"],
            "/v1/patch-marks",
            "nothing was changed",
        ),
        (
            vec!["patches", "import", bundle],
            "/v1/patches",
            "already in the patch table",
        ),
        (vec!["monitor", "status"], "/v1/monitor", "[monitor]"),
        (vec!["runs", "show", "7"], "/v1/runs/{id}", "no run 7"),
        (
            vec!["monitor", "run-once"],
            "/v1/monitor/run-once",
            "[monitor]",
        ),
    ];
    for (args, route, want) in &cases {
        // JSON: {"error", "code"} on stdout.
        let before = served(&d, route);
        let via = po_via(&t.config, args, false);
        assert_eq!(
            served(&d, route),
            before + 1.0,
            "{args:?} not served by the daemon"
        );
        let direct = po_via(&t.config, args, true);
        assert_eq!(via.code, Some(2), "{args:?}: {}", via.json);
        assert_eq!(direct.code, Some(2), "{args:?}: {}", direct.json);
        assert_eq!(via.json, direct.json, "{args:?}");
        assert!(
            via.json["error"].as_str().unwrap().contains(want),
            "{args:?}: {}",
            via.json
        );
        // Text: the same line on stderr.
        let text = |direct: bool| {
            let mut c = Command::new(BIN);
            c.env("PATCHOVER_CONFIG", &t.config);
            if direct {
                c.arg("--direct");
            }
            let o = c.args(args).output().unwrap();
            (
                o.status.code(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        };
        let (v, dr) = (text(false), text(true));
        assert_eq!(v, dr, "{args:?}");
        assert_eq!(v.0, Some(2));
        assert!(
            v.1.starts_with("error: ") && v.1.contains(want),
            "{args:?}: {}",
            v.1
        );
    }
    assert_eq!(
        po_via(&t.config, &["patches", "show", "api-1"], false).json["apply_next"],
        false
    );
    assert_eq!(
        po_via(&t.config, &["lc", "show", &a], false).json["state"],
        "stopped"
    );
}

/// The text of `/proc/net/fib_trie` inside LC `id`: the addresses it holds.
fn addresses(config: &Path, id: &str) -> String {
    let out = po_via(
        config,
        &["lc", "exec", id, "--", "cat", "/proc/net/fib_trie"],
        true,
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    out.json["stdout"].as_str().unwrap().to_owned()
}

/// `service assign`, `runs recover`, `net switch|back` and `lc attach-disk|attach-nic` on
/// real LCs, through the daemon and with --direct: the same JSON but for the timings, and the
/// same effect (the service address moves, the directory and the NIC appear inside).
#[test]
fn switch_assign_recover_and_attach_through_the_daemon_and_direct() {
    let (t, d, _, _) = setup();
    let (a, b) = (t.lcs[0].id.clone(), t.lcs[1].id.clone());
    let dir = t.dir.path();
    let service = t.service();
    for i in 0..2 {
        t.build_image(i, "1.0.0");
        let boot = po_via(&t.config, &["lc", "boot", &t.lcs[i].id], true);
        assert_eq!(boot.code, Some(0), "{}", boot.stderr);
    }

    // The service address on a: the same answer both ways (assigning it again is a no-op).
    let v = same_both_ways(
        &d,
        &t.config,
        &["service", "assign", &a],
        "/v1/service/assign",
        &[],
    );
    assert_eq!(v["lc"], a.as_str());
    assert!(addresses(&t.config, &a).contains(&service));
    assert_eq!(
        po_via(&t.config, &["lc", "show", &a], true).json["role"],
        "active"
    );

    // Both services answer (they start in the background at boot).
    for l in &t.lcs {
        assert_eq!(http_ready(&l.address, "/version").0, 200);
    }

    // No unfinished run: nothing to recover, both ways.
    let v = same_both_ways(&d, &t.config, &["runs", "recover"], "/v1/runs/recover", &[]);
    assert_eq!(v, serde_json::json!([]));

    // a -> b through the daemon, back directly; a -> b directly, back through the daemon.
    let timing = [
        "pause_ms",
        "drain_ms",
        "drain_first_look_ms",
        "first_request_ms",
        "window_ms",
    ];
    let fast = ["--port", "80", "--garp-refresh", "100ms"];
    let switch: Vec<&str> = ["net", "switch", &a, &b, "--mode", "readdress"]
        .into_iter()
        .chain(fast)
        .collect();
    let back: Vec<&str> = ["net", "back"].into_iter().chain(fast).collect();
    let mut outs = Vec::new();
    for direct in [false, true] {
        let n = served(&d, "/v1/net/switch");
        let sw = po_via(&t.config, &switch, direct);
        assert_eq!(sw.code, Some(0), "{} {}", sw.json, sw.stderr);
        assert_eq!(
            served(&d, "/v1/net/switch"),
            n + f64::from(u8::from(!direct))
        );
        assert_eq!(sw.json["from"], a.as_str());
        assert_eq!(sw.json["to"], b.as_str());
        assert_eq!(sw.json["mode"], "readdress");
        assert!(sw.json["pause_ms"].as_f64().is_some(), "{}", sw.json);
        assert!(addresses(&t.config, &b).contains(&service), "moved to b");
        assert!(!addresses(&t.config, &a).contains(&service), "gone from a");
        // Back the other way: through the daemon when the switch was direct.
        let n = served(&d, "/v1/net/back");
        let bk = po_via(&t.config, &back, !direct);
        assert_eq!(bk.code, Some(0), "{} {}", bk.json, bk.stderr);
        assert_eq!(served(&d, "/v1/net/back"), n + f64::from(u8::from(direct)));
        assert_eq!(bk.json["from"], b.as_str());
        assert_eq!(bk.json["to"], a.as_str());
        assert!(addresses(&t.config, &a).contains(&service), "back on a");
        outs.push([
            steady(&phase_names(&sw.json), &timing),
            steady(&phase_names(&bk.json), &timing),
        ]);
    }
    assert_eq!(
        outs[0], outs[1],
        "switch and back: through the daemon, then --direct"
    );

    // A host directory into a, at two places: through the daemon, then directly.
    std::fs::create_dir_all(dir.join("share")).unwrap();
    std::fs::write(dir.join("share/hello.txt"), "from the host\n").unwrap();
    let mut outs = Vec::new();
    for (direct, at) in [(false, "/mnt/s1"), (true, "/mnt/s2")] {
        let n = served(&d, "/v1/lcs/{id}/disks");
        // A relative source: the CLI resolves it, the daemon gets it whole.
        let mut c = Command::new(BIN);
        c.current_dir(dir)
            .env("PATCHOVER_CONFIG", &t.config)
            .arg("--json");
        if direct {
            c.arg("--direct");
        }
        let o = c
            .args(["lc", "attach-disk", &a, "share", at])
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        assert_eq!(
            served(&d, "/v1/lcs/{id}/disks"),
            n + f64::from(u8::from(!direct))
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["source"], dir.join("share").to_str().unwrap());
        assert_eq!(v["at"], at);
        let cat = po_via(
            &t.config,
            &["lc", "exec", &a, "--", "cat", &format!("{at}/hello.txt")],
            true,
        );
        assert_eq!(cat.json["stdout"], "from the host\n", "{}", cat.stderr);
        outs.push(steady(&v, &["at"]));
    }
    assert_eq!(outs[0], outs[1]);

    // A NIC into a through the daemon, into b directly.
    let mut outs = Vec::new();
    for (direct, lc, addr) in [(false, &a, ".51"), (true, &b, ".52")] {
        let address = format!("10.77.{}{addr}/24", t.net);
        let n = served(&d, "/v1/lcs/{id}/nics");
        let v = po_via(
            &t.config,
            &["lc", "attach-nic", lc, "eth1", "--address", &address],
            direct,
        );
        assert_eq!(v.code, Some(0), "{}", v.stderr);
        assert_eq!(
            served(&d, "/v1/lcs/{id}/nics"),
            n + f64::from(u8::from(!direct))
        );
        assert_eq!(v.json["host_port"], format!("po{lc}n1"));
        assert_eq!(v.json["nic"]["name"], "eth1");
        assert_eq!(v.json["nic"]["address"], address.as_str());
        assert!(addresses(&t.config, lc).contains(&address[..address.len() - 3]));
        let mut keys: Vec<String> = v.json.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        outs.push(keys);
    }
    assert_eq!(outs[0], outs[1]);

    // Issue 22, item 5: on a running LC, through the daemon and directly, a NIC name that
    // could reach a shell is refused (exit 2, the rule in the message) and nothing is made:
    // no host port, no interface inside.
    for name in ["$(id)", "a;touch /x"] {
        for direct in [false, true] {
            let v = po_via(&t.config, &["lc", "attach-nic", &a, name], direct);
            assert_eq!(v.code, Some(2), "{name:?} direct={direct}: {}", v.stderr);
            let e = v.json["error"].as_str().unwrap();
            assert!(e.contains("invalid interface name"), "{e}");
        }
    }
    assert!(
        !Path::new(&format!("/sys/class/net/po{a}n2")).exists(),
        "a host port was made"
    );
    let links = po_via(
        &t.config,
        &["lc", "exec", &a, "--", "ip", "-o", "link"],
        true,
    );
    let links = links.json["stdout"].as_str().unwrap();
    assert!(links.contains("eth1") && !links.contains("(id)"), "{links}");
    drop(d);
    drop(t);
}

/// A feed served on loopback; `monitor run-once` through the daemon registers its bundle and
/// makes an approval challenge; the approval link (its code from `approval-code`) taken by
/// `GET /v1/approve` records the decision, marks the patch for the next run as the direct
/// `approve` does, counts an accepted approval, and is not taken twice.
#[test]
fn an_approval_link_through_the_daemon_marks_the_patch() {
    let (t, d, _, _) = setup();
    let dir = t.dir.path();
    let s = |p: &str| dir.join(p).to_str().unwrap().to_owned();
    // A bundle signed with the release key, published in a feed signed with it too.
    std::fs::create_dir_all(dir.join("src3/payload")).unwrap();
    std::fs::write(
        dir.join("src3/manifest.toml"),
        "format = 1\nid = \"feed-1\"\ntitle = \"from the feed\"\ncategory = \"security\"\nseverity = \"critical\"\n\
         published = 2026-11-22T10:00:00Z\n\n[[step]]\nkind = \"script\"\nfile = \"fix.sh\"\n",
    )
    .unwrap();
    std::fs::write(dir.join("src3/payload/fix.sh"), "echo fixed\n").unwrap();
    std::fs::create_dir_all(dir.join("www/feed")).unwrap();
    let out = s("www/feed/feed-1.tar.zst");
    run_cli(&t.config, &["bundle", "create", &s("src3"), "-o", &out]);
    run_cli(
        &t.config,
        &["bundle", "sign", &out, "--key", &s("release.key")],
    );
    run_cli(
        &t.config,
        &[
            "feed",
            "publish",
            &s("www/feed"),
            "--key",
            &s("release.key"),
        ],
    );
    let port = free_port();
    let mut server = Command::new("/usr/bin/python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(dir.join("www"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Kill(&mut server);
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "http.server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::write(dir.join("secret"), "an approval secret for the test\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("secret"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&t.config)
            .unwrap();
        writeln!(
            f,
            "\n[monitor]\nsecret_file = \"{}\"\n\n[[monitor.feeds]]\nname = \"local\"\nurl = \"http://127.0.0.1:{port}/feed/index.json\"\ntrusted_keys = [\"{}\"]",
            s("secret"),
            s("release.pub"),
        )
        .unwrap();
    }

    // One round through the daemon: fetched, registered, a challenge (no SMTP: not sent).
    let n = served(&d, "/v1/monitor/run-once");
    let r = po_via(&t.config, &["monitor", "run-once"], false);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(served(&d, "/v1/monitor/run-once"), n + 1.0);
    let r = r.json;
    assert_eq!(r["feeds"][0]["status"], "fetched", "{r}");
    assert_eq!(r["feeds"][0]["registered"][0]["id"], "feed-1", "{r}");
    let challenge = r["notices"][0]["challenge"].as_str().unwrap().to_owned();
    assert_eq!(
        po_via(&t.config, &["patches", "show", "feed-1"], true).json["apply_next"],
        false
    );

    // The administrator's link, as the notice mail would carry it.
    let code = run_cli(
        &t.config,
        &[
            "approval-code",
            &challenge,
            "--decision",
            "approve all",
            "--link",
            "http://patchover/v1/approve",
        ],
    );
    let link = code["link"].as_str().unwrap();
    let query = &link[link.find('?').unwrap()..];
    // A wrong code first: refused, nothing decided.
    let wrong = query.replace(
        code["code"].as_str().unwrap(),
        "AAAA-AAAA-AAAA-AAAA-AAAA-AAAA",
    );
    d.get(&format!("/v1/approve{wrong}"))
        .error(403, "forbidden");
    let ok = d.get(&format!("/v1/approve{query}"));
    assert_eq!(ok.status, 200, "{}", String::from_utf8_lossy(&ok.body));
    let v = ok.json();
    assert_eq!(v["challenge"], challenge.as_str());
    assert_eq!(v["decision"], "approve all");
    assert_eq!(v["patches"], serde_json::json!(["feed-1"]));
    assert_eq!(v["decided_by"], "link");
    // The bundle names no LC and [monitor] lcs is empty: no run is started, and it says so.
    assert_eq!(v["started"], serde_json::json!([]));
    assert!(
        v["start_errors"][0]
            .as_str()
            .unwrap()
            .contains("names no LC"),
        "{v}"
    );

    // The effect, seen both ways: the patch is marked, the challenge used with its decision.
    for direct in [false, true] {
        let p = po_via(&t.config, &["patches", "show", "feed-1"], direct).json;
        assert_eq!(p["apply_next"], true, "{p}");
        let st = po_via(&t.config, &["monitor", "status"], direct).json;
        let c = &st["challenges"][0];
        assert_eq!(c["id"], challenge.as_str(), "{st}");
        assert!(c["used_ms"].is_i64(), "{st}");
        assert_eq!(c["decision"], "approve all");
        assert_eq!(c["decided_by"], "link");
        assert_eq!(c["failed_attempts"], 1);
    }
    let m = parse_prometheus(std::str::from_utf8(&d.get("/metrics").body).unwrap());
    assert_eq!(
        metric(&m, "patchover_approvals_total", &[("result", "accepted")]),
        1.0
    );
    assert_eq!(
        metric(&m, "patchover_approvals_total", &[("result", "refused")]),
        1.0
    );
    assert_eq!(metric(&m, "patchover_mails_sent_total", &[]), 0.0);
    // Single use: the same link again is refused.
    d.get(&format!("/v1/approve{query}"))
        .error(403, "forbidden");
    drop(d);
    drop(t);
}

/// A self-signed ECDSA certificate for 127.0.0.1 and its key, made with `openssl` as
/// docs/daemon.md shows: (cert, key).
fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    let o = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=patchover-test"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (cert, key)
}

/// A TLS connection to 127.0.0.1:`port` that trusts only `cert`.
fn tls_connect(
    cert: &Path,
    port: u16,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Runs `patchover serve` on a config it must refuse; its exit code and stderr.
fn serve_refuses(config: &Path) -> (Option<i32>, String) {
    let mut c = Command::new(BIN)
        .env("PATCHOVER_CONFIG", config)
        .arg("serve")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while c.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(20) {
            let _ = c.kill();
            let _ = c.wait();
            panic!("patchover serve did not refuse {}", config.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = c.wait_with_output().unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn tls_on_tcp_serves_tokens_refuses_plaintext_and_bad_tls_config_exits_2() {
    let t = Topo::new(&[(0, 50, 64)]);
    let d = t.dir.path();
    let (cert, key) = self_signed(d, "a");
    let (_, other_key) = self_signed(d, "b");
    let hash = token_hash();
    let port = free_port();
    let socket = d.join("sock/patchover.sock");
    let daemon = |listen: &str, tls: &str| {
        format!(
            "\n[daemon]\nsocket = \"{}\"\nlisten = \"{listen}\"\ntokens = [\"{hash}\"]\nhead_timeout_secs = 1\n{tls}",
            socket.display()
        )
    };
    let tls = |c: &Path, k: &Path| {
        format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
            c.display(),
            k.display()
        )
    };
    let local = format!("127.0.0.1:{port}");
    let missing = d.join("missing.pem");
    let bad: Vec<(String, &str)> = vec![
        (
            daemon(&local, &format!("tls_cert = \"{}\"\n", cert.display())),
            "`tls_cert` is set without `tls_key`",
        ),
        (daemon(&local, &tls(&missing, &key)), "no such file"),
        // A directory cannot be read as a file (root reads any file, whatever its mode).
        (daemon(&local, &tls(d, &key)), "cannot read it"),
        (daemon(&local, &tls(&key, &key)), "no PEM certificate"),
        (
            daemon(&local, &tls(&cert, &cert)),
            "no unencrypted PEM private key",
        ),
        (
            daemon(&local, &tls(&cert, &other_key)),
            "does not match the certificate",
        ),
        (
            daemon(&format!("0.0.0.0:{port}"), ""),
            "would cross the network in clear",
        ),
    ];
    for (cfg, want) in &bad {
        t.write_config(cfg);
        let (code, err) = serve_refuses(&t.config);
        assert_eq!(code, Some(2), "{want}: {err}");
        assert!(err.contains(want), "want {want:?} in: {err}");
        assert!(!socket.exists(), "{want}: the daemon bound its socket");
    }

    t.write_config(&daemon(&local, &tls(&cert, &key)));
    let mut dm = Daemon::start(&t.config, &socket);
    let auth = format!("Bearer {TOKEN}");
    let over_tls = |auth: Option<&str>| {
        let mut h = vec![("content-type", "application/json")];
        if let Some(a) = auth {
            h.push(("authorization", a));
        }
        http(tls_connect(&cert, port), "GET", "/v1/status", &h, None)
    };
    let ok = over_tls(Some(&auth));
    assert_eq!(ok.status, 200, "{:?}", String::from_utf8_lossy(&ok.body));
    assert_eq!(ok.json()["lcs"].as_array().map(Vec::len), Some(1));
    over_tls(Some("Bearer wrong-token-0123456789abcdef")).error(401, "unauthorized");
    over_tls(None).error(401, "unauthorized");
    // The right token in plaintext to the TLS port gets no HTTP answer.
    let mut p = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    p.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    p.write_all(
        format!("GET /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = p.read_to_end(&mut raw);
    assert!(
        !raw.starts_with(b"HTTP/"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    // The Unix socket is unchanged.
    assert_eq!(dm.get("/v1/status").status, 200);
    let st = dm.sigterm();
    assert!(st.success(), "{st:?}");
}

/// Journals an unfinished run on `lc`, as a patchover killed in its malware check leaves it.
fn unfinished_run(t: &Topo, lc: &str) -> i64 {
    let mut store =
        patchover_store::Store::open(&t.dir.path().join("state/state.db")).expect("the store");
    let run = store.begin_run(lc, "readdress", false).unwrap();
    store
        .record_step(run, "malware_check", "started", None)
        .unwrap();
    run
}

/// Asserts run `id` was found by a recovery: ended, rolled back, its last step `recover`.
fn assert_recovered(d: &Daemon, id: i64) {
    let v = d.get(&format!("/v1/runs/{id}")).json();
    assert!(v["run"]["ended_ms"].is_i64(), "not recovered: {v}");
    assert_ne!(v["run"]["outcome"], "ok", "{v}");
    assert!(
        v["run"]["report"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("recovery")),
        "{v}"
    );
    let steps = v["steps"].as_array().expect("steps");
    assert_eq!(steps.last().unwrap()["step"], "recover", "{v}");
}

/// `Type=notify` with this test as the service manager: the daemon says READY=1 only once its
/// socket takes connections and the journal's unfinished run is recovered. The daemon is
/// stopped (SIGSTOP) the moment READY arrives, so what the test sees then held when it was
/// said; STOPPING=1 comes on SIGTERM.
#[test]
fn ready_comes_only_after_the_socket_is_bound_and_unfinished_runs_are_recovered() {
    use std::os::unix::net::UnixDatagram;
    let t = Topo::new(&[(0, 30, 64)]);
    let a = t.lcs[0].id.clone();
    let run = unfinished_run(&t, &a);
    let manager_path = t.dir.path().join("notify.sock");
    let manager = UnixDatagram::bind(&manager_path).unwrap();
    manager
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let recv = || {
        let mut buf = [0u8; 1024];
        let n = manager.recv(&mut buf).expect("a notification within 30 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    // The default socket: the unit's RuntimeDirectory under run_dir.
    let socket = patchover_daemon::config::default_socket(&t.dir.path().join("run"));
    let mut d = Daemon::spawn(
        &t.config,
        &socket,
        &[("NOTIFY_SOCKET", manager_path.to_str().unwrap())],
        &[],
    );
    let pid = nix::unistd::Pid::from_raw(d.child.id() as i32);
    let mut before = Vec::new();
    loop {
        let m = recv();
        if m.lines().any(|l| l == "READY=1") {
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
            break;
        }
        before.push(m);
    }
    // Frozen where it said READY: the listener is bound (the kernel queues the connection),
    // and the journal already has the run's recovery.
    let queued = UnixStream::connect(&socket);
    let journal = patchover_store::Store::open(&t.dir.path().join("state/state.db"))
        .unwrap()
        .run(run)
        .unwrap()
        .unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(queued.is_ok(), "READY before the socket was bound");
    assert!(
        journal.ended_ms.is_some(),
        "READY before the unfinished run was recovered: {journal:?}"
    );
    assert_eq!(before, ["STATUS=recovering unfinished runs"]);
    assert_recovered(&d, run);
    assert!(d.sigterm().success());
    let m = recv();
    assert!(m.starts_with("STOPPING=1\nSTATUS=stopping"), "{m}");
}

/// The unit keeps LC records across restarts: a daemon run with the unit's capability
/// bounding set boots two LCs, a run is left unfinished, the daemon is stopped with SIGTERM
/// and its runtime directory (`RuntimeDirectory=patchover/daemon`: the socket's directory)
/// deleted as systemd does on stop; the next daemon lists both LCs running with the same
/// init PIDs, and recovers the run before it answers. The LCs' cgroups are a path, as the
/// unit's default (`system.slice/patchover.service/lcs`) is.
#[test]
fn a_restart_that_loses_the_runtime_directory_finds_every_lc_and_unfinished_run() {
    /// Removes the cgroup levels above the LCs' parent, after the topology's own cleanup.
    struct Levels(Vec<String>);
    impl Drop for Levels {
        fn drop(&mut self) {
            for rel in &self.0 {
                for ctl in ["unified", "cpu", "memory", "cpuset", "freezer"] {
                    let _ = std::fs::remove_dir(format!("/sys/fs/cgroup/{ctl}/{rel}"));
                }
            }
        }
    }
    let mut levels = Levels(Vec::new());
    let mut t = Topo::new(&[(0, 30, 64), (1, 30, 64)]);
    let top = format!("po-test-{}", t.suffix);
    levels.0 = vec![
        format!("{top}/patchover.service/lcs"),
        format!("{top}/patchover.service"),
        top.clone(),
    ];
    t.cgroup_parent = format!("{top}/patchover.service/lcs");
    t.write_config("");
    t.build_image(0, "1.0.0");
    t.build_image(1, "1.0.0");
    let ids: Vec<String> = t.lcs.iter().map(|l| l.id.clone()).collect();

    // The unit's CapabilityBoundingSet=~CAP_… as setpriv's -cap,… list.
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/patchover.service"),
    )
    .unwrap();
    let drop_list = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet=~"))
        .expect("the unit's CapabilityBoundingSet");
    let bounding = drop_list
        .split_whitespace()
        .map(|c| format!("-{}", c.trim_start_matches("CAP_").to_ascii_lowercase()))
        .collect::<Vec<_>>()
        .join(",");
    let wrap = ["setpriv", "--bounding-set", bounding.as_str(), "--"];

    let run_dir = t.dir.path().join("run");
    let socket = patchover_daemon::config::default_socket(&run_dir);
    let mut d = Daemon::start_as(&t.config, &socket, &[], &wrap);
    let mut pids = Vec::new();
    for id in &ids {
        let r = d.post(&format!("/v1/lcs/{id}/boot"), "");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let pid = r.json()["pid"].as_i64().expect("init PID");
        // The LC runs under the daemon's bounding set: no host kernel modules from inside.
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let capbnd = status
            .lines()
            .find_map(|l| l.strip_prefix("CapBnd:"))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap();
        assert_eq!(
            capbnd & (1 << 16),
            0,
            "CAP_SYS_MODULE in LC {id}'s bounding set"
        );
        assert!(
            Path::new(&format!("/sys/fs/cgroup/memory/{}/{id}", t.cgroup_parent)).exists(),
            "LC {id}'s memory cgroup under the parent path"
        );
        pids.push(pid);
    }
    let run = unfinished_run(&t, &ids[0]);
    assert!(d.sigterm().success());

    // What systemd removes on stop.
    let runtime = socket.parent().unwrap();
    assert_eq!(runtime, run_dir.join("daemon"));
    std::fs::remove_dir_all(runtime).unwrap();

    let d2 = Daemon::start_as(&t.config, &socket, &[], &wrap);
    // Recovery ran before the first answer.
    assert_recovered(&d2, run);
    let lcs = d2.get("/v1/lcs").json();
    for (id, pid) in ids.iter().zip(&pids) {
        let lc = lcs
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["id"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} not listed: {lcs}"));
        assert_eq!(lc["state"], "running", "{lc}");
        assert_eq!(lc["pid"].as_i64(), Some(*pid), "{lc}");
    }
    assert_eq!(
        d2.get("/v1/status").json()["open_runs"],
        serde_json::json!([])
    );
    // Still the daemon's LCs: it stops them and nothing is left.
    for id in &ids {
        let r = d2.post(&format!("/v1/lcs/{id}/stop"), "");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        t.assert_nothing_left(id);
    }
    drop(d2);
    drop(t);
    drop(levels);
}

/// The daemon on its socket and on TCP with [`TOKEN`], with `limits` in `[daemon]` and a
/// `[monitor]` without feeds (so `POST /v1/monitor/run-once` publishes an event).
fn limited(limits: &str) -> (Topo, Daemon, u16) {
    let t = Topo::new(&[(0, 50, 64)]);
    let d = t.dir.path();
    std::fs::write(d.join("secret"), "an approval secret for the test\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d.join("secret"), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let port = free_port();
    let socket = d.join("sock/patchover.sock");
    t.write_config(&format!(
        "\n[daemon]\nsocket = \"{}\"\nlisten = \"127.0.0.1:{port}\"\ntokens = [\"{}\"]\nmonitor = false\n{limits}\n[monitor]\nsecret_file = \"{}\"\n",
        socket.display(),
        token_hash(),
        d.join("secret").display(),
    ));
    let daemon = Daemon::start(&t.config, &socket);
    (t, daemon, port)
}

fn tcp_to(port: u16) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Sends one keep-alive request and reads its answer (a `Content-Length` body).
fn keep_alive<S: Read + Write>(s: &mut BufReader<S>, path: &str, token: Option<&str>) -> Resp {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    s.get_mut()
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n").as_bytes())
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut line = Vec::new();
        let n = s.read_until(b'\n', &mut line).unwrap();
        assert!(n > 0, "closed before a whole answer: {head:?}");
        head.extend_from_slice(&line);
    }
    let mut r = parse_response(&head);
    let len: usize = r.headers["content-length"].parse().unwrap();
    r.body = vec![0; len];
    s.read_exact(&mut r.body).unwrap();
    r
}

/// Waits for the daemon to close `s`: EOF or a reset, never a read timeout. The time it took.
fn closed_by_daemon<S: Read>(s: &mut S) -> Duration {
    let t = Instant::now();
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => t.elapsed(),
        Ok(n) => panic!("unexpected bytes: {:?}", String::from_utf8_lossy(&buf[..n])),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => t.elapsed(),
        Err(e) => panic!("the daemon did not close the connection: {e}"),
    }
}

/// Issue 22: no connection cap. Past `max_connections` a TCP connection is answered 503 and
/// closed (the Unix socket has its own budget, so a flood on TCP does not lock out the local
/// CLI); once the holders close, the daemon serves again.
#[test]
fn connections_past_the_cap_are_answered_503_and_the_daemon_serves_after_they_close() {
    let (_t, d, port) = limited("max_connections = 3\nhead_timeout_secs = 60\n");
    let holders: Vec<_> = (0..3).map(|_| tcp_to(port)).collect();
    // Admitted in order: the holders have the three places.
    std::thread::sleep(Duration::from_millis(300));
    let over = tcp_to(port);
    let r = http(
        over,
        "GET",
        "/v1/status",
        &[("authorization", &format!("Bearer {TOKEN}"))],
        None,
    );
    r.error(503, "unavailable");
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("max_connections (3)"),
        "{:?}",
        r.json()
    );
    assert_eq!(r.headers["connection"], "close");
    // The socket is not the TCP listener's budget.
    assert_eq!(d.get("/v1/status").status, 200);
    drop(holders);
    let t0 = Instant::now();
    loop {
        let r = http(
            tcp_to(port),
            "GET",
            "/v1/status",
            &[("authorization", &format!("Bearer {TOKEN}"))],
            None,
        );
        if r.status == 200 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "still refused 5 s after the holders closed: {}",
            r.status
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let m = parse_prometheus(&String::from_utf8(d.get("/metrics").body).unwrap());
    assert!(metric(&m, "patchover_connections_refused_total", &[]) >= 1.0);
}

/// Issue 22: the daemon kept the TCP connection after a 401. Now the answer says
/// `Connection: close` and the socket is closed (read returns EOF); a connection with the
/// token stays open for its next request.
#[test]
fn a_401_closes_the_connection_and_an_authorized_one_is_kept() {
    let (_t, _d, port) = limited("");
    let mut s = BufReader::new(tcp_to(port));
    let r = keep_alive(&mut s, "/v1/status", Some("wrong-token-0123456789"));
    r.error(401, "unauthorized");
    closed_by_daemon(&mut s);
    assert_eq!(r.headers["connection"], "close");

    let mut s = BufReader::new(tcp_to(port));
    for _ in 0..2 {
        let r = keep_alive(&mut s, "/v1/status", Some(TOKEN));
        assert_eq!(r.status, 200, "{r:?}");
    }
}

/// Issue 22: idle connections were never closed, and only the first request head had a
/// deadline. A keep-alive connection with no request for `idle_timeout_secs` is closed; a
/// second request head trickled byte by byte is cut `head_timeout_secs` after its first byte;
/// an event stream held past both stays open and still receives events.
#[test]
fn idle_and_trickling_connections_are_closed_but_an_event_stream_is_not() {
    let (_t, d, port) = limited("idle_timeout_secs = 1\nhead_timeout_secs = 1\n");
    // The event stream, over TCP with the token.
    let mut ev = BufReader::new(tcp_to(port));
    ev.get_mut()
        .write_all(
            format!("GET /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
    let mut line = String::new();
    ev.read_line(&mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");

    // Idle after an answer: closed after the idle timeout, not before.
    let mut idle = BufReader::new(tcp_to(port));
    assert_eq!(keep_alive(&mut idle, "/v1/status", Some(TOKEN)).status, 200);
    let took = closed_by_daemon(&mut idle);
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(5),
        "{took:?}"
    );

    // A second request trickled a byte every 200 ms (5 s in all): cut after about 1 s.
    let slow = UnixStream::connect(&d.socket).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut slow = BufReader::new(slow);
    assert_eq!(keep_alive(&mut slow, "/v1/status", None).status, 200);
    let mut w = slow.get_ref().try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        let t = Instant::now();
        for b in b"GET /v1/status HTTP/1.1\r\nHost: xxxxxxxxx" {
            if w.write_all(&[*b]).is_err() {
                return Some(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        None
    });
    let took = closed_by_daemon(&mut slow);
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(4),
        "{took:?}"
    );
    drop(slow);
    let _ = trickle.join().unwrap();

    // The stream, quiet for over twice the idle timeout, is open and gets the next event.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(d.post("/v1/monitor/run-once", "").status, 200);
    let t0 = Instant::now();
    loop {
        line.clear();
        let n = ev.read_line(&mut line).expect("the event stream is open");
        assert!(n > 0, "the event stream was closed");
        if line.trim() == "event: monitor" {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no monitor event");
    }
}
